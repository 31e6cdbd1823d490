"""The study pipeline end to end on a miniature setting, its stage cache, and the report helpers."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from hf_moe_tuning.study import StageCache, config_hash, load_study_config, render, run_study
from hf_moe_tuning.study.cache import config_key
from hf_moe_tuning.study.cli import register

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
    "finetune.early_stopping={eval_every: 1, patience: 5}",
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

    # results.csv is long: one row per (arm, task, seed, metric), baselines included
    rows = list(csv.DictReader((out / "results.csv").open()))
    primary = [r for r in rows if r["primary"] == "1"]
    trained = {"t5", "flan_t5", "moe", "flan_moe", "flan_t5_0shot", "flan_moe_0shot"}
    baselines = {"baseline:majority", "baseline:random", "baseline:copy_input", "baseline:copy_first_sentence"}
    assert {r["arm"] for r in rows} == trained | baselines
    assert len([r for r in primary if r["arm"] in trained]) == 6 * 2 * 2  # arms x tasks x seeds
    assert {r["metric"] for r in rows if r["task"] == "fusion"} == {"token_f1", "exact_match"}
    assert {r["arm"] for r in primary if r["task"] == "passage_yesno" and r["arm"].startswith("baseline:")} == {
        "baseline:majority", "baseline:random"}
    assert {r["kind"] for r in primary if r["arm"] in ("moe", "flan_moe")} == {"sparse"}
    assert {r["kind"] for r in primary if r["arm"] in ("t5", "flan_t5")} == {"dense"}
    for r in primary:
        assert 0.0 <= float(r["score"]) <= 100.0
    # classification runs record how many items got the most frequent answer; baselines too (majority: all of them)
    for r in primary:
        share = r["top_answer_share"]
        if r["task_kind"] == "classification":
            assert (float(share) == 100.0) if r["arm"] == "baseline:majority" else 0.0 < float(share) <= 100.0
        else:
            assert share == ""
    for r in (r for r in primary if r["arm"] in trained - {"flan_t5_0shot", "flan_moe_0shot"}):
        assert int(r["optimizer_steps"]) == 2 and 1 <= int(r["best_step"]) <= 2 and int(r["train_tokens"]) > 0
        assert r["finetuned"] == "1" and math.isfinite(float(r["validation_score"]))
    zero_shot = [r for r in primary if r["arm"] == "flan_moe_0shot"]
    assert {r["finetuned"] for r in zero_shot} == {"0"} and {r["optimizer_steps"] for r in zero_shot} == {"0"}
    sparse_batch = {int(r["batch_size"]) for r in primary if r["kind"] == "sparse" and r["finetuned"] == "1"}
    dense_batch = {int(r["batch_size"]) for r in primary if r["kind"] == "dense" and r["finetuned"] == "1"}
    assert sparse_batch == {16} and dense_batch == {32}  # family hyperparameters from the recipe

    deltas = list(csv.DictReader((out / "deltas.csv").open()))
    assert list(deltas[0])[:6] == ["delta", "paper", "mean", "ci_low", "ci_high", "verdict"]
    average = [d for d in deltas if d["task"] == "average"]
    assert [d["delta"] for d in average] == [
        "T5 − MoE", "Flan-MoE − Flan-T5", "(Flan-MoE − MoE) − (Flan-T5 − T5)", "Flan-MoE − Flan-T5, zero-shot"]
    for d in deltas:
        assert float(d["ci_low"]) <= float(d["mean"]) <= float(d["ci_high"])
        assert d["verdict"] in ("reproduced", "opposite", "inconclusive")

    md = (out / "results.md").read_text()
    for needed in ("| Flan-MoE |", "| baseline:copy_input |", "T5 − MoE", "95 % CI", "versions:", "seeds: 0, 1", "wall time",
                   "runs, cached ones included"):
        assert needed in md
    run = json.loads((out / "run.json").read_text())
    job_seconds = sum(float(r["train_seconds"] or 0) + float(r["eval_seconds"] or 0) for r in primary)
    assert run["job_seconds"] == pytest.approx(job_seconds, rel=1e-3, abs=0.5)
    png = (out / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    # the report is a pure function of the files next to it
    before = md
    (out / "results.md").unlink()
    render(out)
    assert (out / "results.md").read_text() == before

    # the stages are cached: a second run trains nothing
    stage_dirs = {p.name for p in cache.glob("*/*") if StageCache.is_done(p)}
    assert any(n.startswith("t5-") for n in stage_dirs) and any(n.startswith("switch-") for n in stage_dirs)
    info = json.loads((out / "run.json").read_text())
    assert info["cached_runs"] < info["runs"]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["cached_runs"] == info["runs"]
    assert list(csv.DictReader((out / "results.csv").open())) == rows

    # changing one arm's fine-tuning reruns only that arm
    args = _parser().parse_args([*argv, "--set", "arms.moe.args={moe_freeze_strategy: non_moe}"])
    assert args.func(args) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["runs"] - info["cached_runs"] == 2 * 2  # moe: tasks x seeds
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["freeze_strategy"] for r in rows if r["arm"] == "moe"} == {"non_moe"}


@pytest.mark.slow
def test_ablate_runs_freezing_arms(tmp_path, one_thread):
    from hf_moe_tuning.study.config import parse_overrides

    overrides = parse_overrides([*MINIATURE, "data.tasks=[multiple_choice]"])
    overrides = {k: v for k, v in overrides.items() if not k.startswith("instruct.")}
    config = load_study_config(RECIPES / "st_moe_freezing" / "tiny.yaml", overrides)
    paths = run_study(config, seeds=[0], output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert {r["freeze_strategy"] for r in rows if r["finetuned"] == "1"} == {"all", "non_moe", "moe", "attention", "ffn"}
    assert "all − moe" in paths["md"].read_text()


def test_shipped_pretrained_models_match_the_recipes(tmp_path, monkeypatch):
    """The checkpoints shipped for the quick start are found by configuration key: no pretraining (and for
    flan_moe no instruction tuning) on a fresh clone; another configuration of either stage trains again."""
    from hf_moe_tuning.study.stages import ensure_instructed, ensure_pretrained, pretrain_key

    for recipe in ("flan_moe", "st_moe_freezing"):
        config = load_study_config(RECIPES / recipe / "tiny.yaml")
        for name in config.models:
            path, _, info = ensure_pretrained(config, config.models[name], StageCache(tmp_path))
            assert info.get("shipped") and Path(path, "model.safetensors").is_file()
    assert not any(tmp_path.iterdir())  # nothing trained or written
    changed = load_study_config(RECIPES / "flan_moe" / "tiny.yaml", {"pretrain.args.max_steps": 1})
    changed_instruct = load_study_config(RECIPES / "flan_moe" / "tiny.yaml", {"instruct.args.max_steps": 1})
    # another pretraining config has another key, so the shipped stage would not be used
    assert config_key(pretrain_key(changed, changed.models["t5"])) not in {
        p.name.split("-")[-1] for p in (RECIPES / "flan_moe" / "checkpoints" / "pretrain").iterdir()
    }
    config = load_study_config(RECIPES / "flan_moe" / "tiny.yaml")
    for name in config.models:
        start, key, _ = ensure_pretrained(config, config.models[name], StageCache(tmp_path))
        path, _, info = ensure_instructed(config, config.models[name], start, key, StageCache(tmp_path))
        assert info.get("shipped") and Path(path, "model.safetensors").is_file()
        assert info["mixture_eval_loss"] > 0
    assert not any(tmp_path.iterdir())
    # the key of a shipped instruct stage covers its own configuration and that of the pretraining under it
    from hf_moe_tuning.study import stages

    def refuse(*args, **kwargs):
        raise RuntimeError("would train")

    monkeypatch.setattr(stages, "run_cached", refuse)
    for other in (changed, changed_instruct):
        with pytest.raises(RuntimeError, match="would train"):
            ensure_instructed(other, other.models["t5"], "unused", "unused", StageCache(tmp_path))


def test_stage_cache_keys_cover_code_versions_and_threads(tmp_path, monkeypatch):
    from hf_moe_tuning.study import cache as cache_module

    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    key = config_hash({"a": 1})
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert config_hash({"a": 1}) != key  # the thread count changes CPU float results
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(cache_module, "source_hash", lambda: "other-code")
    assert config_hash({"a": 1}) != key  # so does any change to the package's source
    monkeypatch.setattr(cache_module, "library_versions", lambda: {"torch": "0.0"})
    assert config_hash({"a": 1}) != key
    assert config_key({"a": 1}) == config_key({"a": 1})  # the configuration key alone ignores all three

    cache = StageCache(tmp_path)
    path = cache.path("finetune", "arm-task-s0", "abc")
    assert not cache.is_done(path)
    cache.prepare(path)
    (path / "partial").write_text("x")
    cache.prepare(path)  # an unfinished stage is wiped
    assert not (path / "partial").exists()
    cache.finish(path, {"k": 1}, {"score": 50.0})
    assert cache.is_done(path) and cache.result(path) == {"score": 50.0}
    recorded = json.loads((path / "stage.json").read_text())
    assert recorded["config"] == {"k": 1} and set(recorded["provenance"]) >= {"source", "versions", "platform", "threads"}


def test_source_hash_changes_with_the_code(tmp_path, monkeypatch):
    from hf_moe_tuning.study import cache as cache_module

    (tmp_path / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(cache_module, "PACKAGE_ROOT", tmp_path)
    cache_module.source_hash.cache_clear()
    try:
        first = cache_module.source_hash()
        (tmp_path / "a.py").write_text("x = 2\n")
        cache_module.source_hash.cache_clear()
        assert cache_module.source_hash() != first
    finally:
        cache_module.source_hash.cache_clear()


def test_early_stopping_keeps_the_best_weights_and_stops_on_a_plateau():
    from transformers import TrainerControl, TrainerState

    from hf_moe_tuning.study.stages import ValidationEarlyStopping

    model = torch.nn.Linear(2, 1)
    scores = iter([0.5, 0.7, 0.6, 0.7, 0.65])  # best at the 2nd evaluation; ties do not count as improvement
    stopper = ValidationEarlyStopping(lambda m: next(scores), eval_every=10, patience=3)
    state, control = TrainerState(max_steps=1000), TrainerControl()
    best_weight = None
    for step in range(1, 1000):
        state.global_step = step
        with torch.no_grad():
            model.weight.fill_(float(step))
        stopper.on_step_end(None, state, control, model=model)
        if step == 20:
            best_weight = model.weight.detach().clone()
        if control.should_training_stop:
            break
    assert state.global_step == 50  # evaluations at 10..50: three without improvement after step 20
    assert stopper.best_step == 20 and stopper.best_score == 0.7
    assert [s for s, _ in stopper.history] == [10, 20, 30, 40, 50]
    stopper.on_train_end(None, state, control, model=model)  # the last step was already evaluated
    assert len(stopper.history) == 5
    stopper.restore_best(model)
    assert torch.equal(model.weight, best_weight)
    with pytest.raises(ValueError, match="patience"):
        ValidationEarlyStopping(lambda m: 0.0, eval_every=10, patience=0)
    with pytest.raises(RuntimeError, match="0 steps"):
        ValidationEarlyStopping(lambda m: 0.0, eval_every=10, patience=1).restore_best(model)


def test_early_stopping_waits_for_min_steps_through_a_plateau():
    """A plateau at chance before the model learns (the binary tasks) does not count against the patience until
    ``min_steps``."""
    from transformers import TrainerControl, TrainerState

    from hf_moe_tuning.study.stages import ValidationEarlyStopping

    curve = [0.5] * 8 + [0.7, 0.9, 0.9, 0.9, 0.9, 0.9]  # chance until step 80, then learnt
    model = torch.nn.Linear(2, 1)
    stopped = {}
    for min_steps in (0, 60):
        scores = iter(curve)
        stopper = ValidationEarlyStopping(lambda m, scores=scores: next(scores), eval_every=10, patience=3, min_steps=min_steps)
        state, control = TrainerState(max_steps=140), TrainerControl()
        for step in range(1, 141):
            state.global_step = step
            stopper.on_step_end(None, state, control, model=model)
            if control.should_training_stop:
                break
        stopped[min_steps] = (state.global_step, stopper.best_score)
    assert stopped[0] == (40, 0.5)  # three evaluations without improvement after step 10
    assert stopped[60] == (130, 0.9)  # evaluations up to step 60 do not count; three without improvement after 100
    with pytest.raises(ValueError, match="min_steps"):
        ValidationEarlyStopping(lambda m: 0.0, eval_every=10, patience=1, min_steps=-1)


@pytest.mark.slow
def test_worker_processes_give_the_one_process_results(tmp_path, one_thread):
    """``num_jobs=2`` runs the fine-tuning jobs in spawned workers with ``job_threads`` threads: the same scores (and
    the same cache keys) as one process with that thread count."""
    from hf_moe_tuning.study.config import parse_overrides

    overrides = parse_overrides([*MINIATURE, "data.tasks=[multiple_choice]"])
    overrides = {k: v for k, v in overrides.items() if not k.startswith("instruct.")}
    config = load_study_config(RECIPES / "st_moe_freezing" / "tiny.yaml", overrides)
    cache = tmp_path / "cache"
    one = run_study(config, seeds=[0], output_dir=tmp_path / "one", cache_dir=cache, progress=False)
    two = run_study(config, seeds=[0], output_dir=tmp_path / "two", cache_dir=tmp_path / "cache2", progress=False,
                    num_jobs=2, job_threads=1)
    scores = [[(r["arm"], r["task"], r["metric"], r["score"]) for r in csv.DictReader(p["csv"].open())] for p in (one, two)]
    assert scores[0] == scores[1]
    assert json.loads(two["run"].read_text())["threads"] == 1
    # the workers' cache keys are the one-process keys: a second pool run over the first cache is all cache hits
    again = run_study(config, seeds=[0], output_dir=tmp_path / "again", cache_dir=cache, progress=False,
                      num_jobs=2, job_threads=1)
    assert json.loads(again["run"].read_text())["cached_runs"] == len(config.arms)


@pytest.fixture
def fresh_data_fingerprints():
    from hf_moe_tuning.study import stages

    stages._corpus_fingerprint.cache_clear()
    stages._embedded_mixture_fingerprint.cache_clear()
    yield stages
    stages._corpus_fingerprint.cache_clear()
    stages._embedded_mixture_fingerprint.cache_clear()


def test_shipped_stage_keys_cover_the_data(fresh_data_fingerprints, monkeypatch):
    """Shipped stages are found by configuration key alone, so that key must change with the data the stage
    trains on: another corpus or instruction mixture (same recipe) has other keys."""
    from datasets import Dataset

    stages = fresh_data_fingerprints
    config = load_study_config(RECIPES / "flan_moe" / "tiny.yaml")
    spec = config.models["t5"]
    pretrain = config_key(stages.pretrain_key(config, spec))
    instruct = config_key(stages.instruct_key(config, spec, "upstream"))
    assert pretrain == config_key(stages.pretrain_key(config, spec))  # stable
    monkeypatch.setattr(stages, "pretraining_corpus", lambda n, seed: Dataset.from_dict({"text": ["other"] * n}))
    monkeypatch.setattr(stages, "instruction_mixture", lambda n, **kw: Dataset.from_dict({"inputs": ["q"] * n, "targets": ["a"] * n}))
    stages._corpus_fingerprint.cache_clear()
    stages._embedded_mixture_fingerprint.cache_clear()
    assert config_key(stages.pretrain_key(config, spec)) != pretrain
    assert config_key(stages.instruct_key(config, spec, "upstream")) != instruct
    # a Hub mixture is identified by its name and split, not fingerprinted (it is not downloaded to make a key)
    assert stages.mixture_fingerprint({"source": "hub", "instruction_dataset": "x"}) is None


def test_content_fingerprint():
    from datasets import Dataset

    from hf_moe_tuning.data.fingerprint import content_fingerprint

    a = Dataset.from_dict({"x": ["1", "2"], "y": [1, 2]})
    assert content_fingerprint(a) == content_fingerprint(Dataset.from_dict({"x": ["1", "2"], "y": [1, 2]}))
    assert content_fingerprint(a) != content_fingerprint(Dataset.from_dict({"x": ["2", "1"], "y": [2, 1]}))
    assert content_fingerprint(a, ("x",)) != content_fingerprint(a)
    assert content_fingerprint(a, ("x",)) == content_fingerprint(Dataset.from_dict({"x": ["1", "2"], "z": [0, 0]}), ("x",))
    with pytest.raises(ValueError, match="not in the dataset"):
        content_fingerprint(a, ("nope",))
