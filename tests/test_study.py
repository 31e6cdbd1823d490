"""The study pipeline end to end on a miniature setting, its stage cache, and the report helpers."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from hf_moe_tuning.study import StageCache, config_hash, load_study_config, run_study
from hf_moe_tuning.study.cli import register
from hf_moe_tuning.study.report import direction_holds, mean_std, verdict

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

#: A few steps of every stage on a handful of examples: exercises the code, not the science.
MINIATURE = [
    "data.tasks=[passage_yesno, fusion]",
    "data.corpus_size=32",
    "data.mixture_size=32",
    "data.train_size=8",
    "data.validation_size=4",
    "data.test_size=6",
    "pretrain.args.max_steps=2",
    "pretrain.args.per_device_train_batch_size=8",
    "instruct.args.max_steps=2",
    "instruct.args.per_device_train_batch_size=8",
    "finetune.args.max_steps=2",
    "evaluate.max_new_tokens=8",
]


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def _sets(items):
    return [a for item in items for a in ("--set", item)]


@pytest.mark.slow
def test_compare_end_to_end_and_cache(tmp_path, one_thread):
    out, cache = tmp_path / "results", tmp_path / "cache"
    argv = ["compare", str(RECIPES / "flan_moe" / "tiny.yaml"), "--seeds", "2", "--output-dir", str(out),
            "--cache-dir", str(cache), "--no-progress", *_sets(MINIATURE)]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0

    # every output exists and parses
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 * 2 * 2  # arms x tasks x seeds
    assert {r["arm"] for r in rows} == {"t5", "flan_t5", "moe", "flan_moe"}
    assert {r["kind"] for r in rows if r["arm"] in ("moe", "flan_moe")} == {"sparse"}
    assert {r["kind"] for r in rows if r["arm"] in ("t5", "flan_t5")} == {"dense"}
    for r in rows:
        assert 0.0 <= float(r["score"]) <= 100.0
        assert math.isfinite(float(r["train_loss"]))
    sparse_lr = {float(r["learning_rate"]) for r in rows if r["kind"] == "sparse"}
    dense_lr = {float(r["learning_rate"]) for r in rows if r["kind"] == "dense"}
    assert sparse_lr == {1e-3} and dense_lr == {5e-4}  # family hyperparameters from the recipe
    assert all(r["token_f1"] for r in rows if r["task"] == "fusion")
    md = (out / "results.md").read_text()
    for needed in ("| Flan-MoE |", "T5 − MoE", "(Flan-MoE − MoE) − (Flan-T5 − T5)", "versions:", "seeds: 0, 1", "wall time"):
        assert needed in md
    assert md.count("\n| ") >= 4 + 1 + 3 + 1  # arm rows + header, delta rows + header
    png = (out / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000

    # the stages are cached: a second run trains nothing
    stage_dirs = {p.name for p in cache.glob("*/*") if StageCache.is_done(p)}
    assert any(n.startswith("t5-") for n in stage_dirs) and any(n.startswith("switch-") for n in stage_dirs)
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    assert all(r["cached"] == "True" for r in csv.DictReader((out / "results.csv").open()))

    # changing one arm's fine-tuning reruns only that arm
    args = _parser().parse_args([*argv, "--set", "arms.moe.args={moe_freeze_strategy: non_moe}"])
    assert args.func(args) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["arm"] for r in rows if r["cached"] == "False"} == {"moe"}
    assert {r["freeze_strategy"] for r in rows if r["arm"] == "moe"} == {"non_moe"}


@pytest.mark.slow
def test_ablate_runs_freezing_arms(tmp_path, one_thread):
    from hf_moe_tuning.study.config import parse_overrides

    overrides = parse_overrides([*MINIATURE, "data.tasks=[multiple_choice]"])
    overrides = {k: v for k, v in overrides.items() if not k.startswith("instruct.")}
    config = load_study_config(RECIPES / "st_moe_freezing" / "tiny.yaml", overrides)
    result = run_study(config, seeds=[0], output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert {r["freeze_strategy"] for r in result.records} == {"all", "non_moe", "moe", "attention", "ffn"}
    assert "all − moe" in (tmp_path / "out" / "results.md").read_text()


def test_shipped_pretrained_models_match_the_recipes(tmp_path):
    """The checkpoints shipped for the quick start are found by key: no pretraining on a fresh clone."""
    from hf_moe_tuning.study.stages import ensure_pretrained

    for recipe in ("flan_moe", "st_moe_freezing"):
        config = load_study_config(RECIPES / recipe / "tiny.yaml")
        for name in config.models:
            path, _, info = ensure_pretrained(config, config.models[name], StageCache(tmp_path))
            assert info.get("shipped") and Path(path, "model.safetensors").is_file()
    assert not any(tmp_path.iterdir())  # nothing trained or written
    changed = load_study_config(RECIPES / "flan_moe" / "tiny.yaml", {"pretrain.args.max_steps": 1})
    from hf_moe_tuning.study.stages import pretrain_key

    # another pretraining config has another key, so the shipped stage would not be used
    assert config_hash(pretrain_key(changed, changed.models["t5"])) not in {
        p.name.split("-")[-1] for p in (RECIPES / "flan_moe" / "checkpoints" / "pretrain").iterdir()
    }


def test_stage_cache_and_hash(tmp_path):
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    cache = StageCache(tmp_path)
    path = cache.path("finetune", "arm-task-s0", "abc")
    assert not cache.is_done(path)
    cache.prepare(path)
    (path / "partial").write_text("x")
    cache.prepare(path)  # an unfinished stage is wiped
    assert not (path / "partial").exists()
    cache.finish(path, {"k": 1}, {"score": 50.0})
    assert cache.is_done(path) and cache.result(path) == {"score": 50.0}
    assert json.loads((path / "stage.json").read_text()) == {"k": 1}


def test_direction_verdicts_and_stats():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([4.0]) == (4.0, 0.0)
    assert direction_holds("+", 0.5, 3.0) is True
    assert direction_holds("+", -0.5, 0.1) is False
    assert direction_holds("-", -2.0, 1.0) is True
    assert direction_holds("0", 0.8, 0.1) is True  # within 1 point
    assert direction_holds("0", 3.0, 1.0) is False
    assert direction_holds("+", math.nan, 0.0) is None
    assert verdict("+", 3.0, 1.0) == "yes"
    assert verdict("+", 0.2, 0.0) == "within noise"
    assert verdict("+", -2.0, 0.5).startswith("**no**")
    assert verdict("0", 0.5, 0.0) == "yes" and verdict("0", -4.0, 1.0) == "**no**"
