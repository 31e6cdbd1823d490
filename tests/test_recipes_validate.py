"""Every recipe YAML validates offline; bad recipes fail naming the file and the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from hf_moe_tuning.study import ConfigError, load_study_config, validate_training_args
from hf_moe_tuning.study.cli import register
from hf_moe_tuning.study.config import delta_arms, evaluate_delta, parse_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
STUDY_DIRS = ("flan_moe", "st_moe_freezing", "expert_count")
YAMLS = sorted(p for d in STUDY_DIRS for p in (RECIPES / d).glob("*.yaml"))
TINY = RECIPES / "flan_moe" / "tiny.yaml"


def test_every_study_has_tiny_and_real():
    for d in STUDY_DIRS:
        assert {p.name for p in (RECIPES / d).glob("*.yaml")} >= {"tiny.yaml", "real.yaml"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_validates(path):
    config = load_study_config(path)
    validate_training_args(config)
    assert config.study == path.parent.name
    assert config.variant == path.stem
    assert config.arms and config.deltas
    if config.variant == "real":
        inits = {m.init for m in config.models.values()}
        assert all("/" in i for i in inits)  # Hub ids
        assert config.data["source"] == "hub"


def test_real_recipes_name_the_papers_models():
    inits = {m.init for p in YAMLS if p.stem == "real" for m in load_study_config(p).models.values()}
    assert {"google/t5-v1_1-base", "google/flan-t5-base", "google/switch-base-8"} <= inits
    flan = load_study_config(RECIPES / "flan_moe" / "real.yaml")
    assert flan.data["instruction_dataset"] and flan.data["task_dataset"]
    assert flan.finetune.sparse_args["learning_rate"] == 1e-3 and flan.finetune.dense_args["learning_rate"] == 1e-4


def _write(tmp_path, mutate) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["pretrain"].pop("shipped_dir")  # relative to the recipe file; the copy lives elsewhere
    mutate(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda r: r["finetune"]["args"].update(learning_rat=1e-3), "finetune.args.learning_rat"),
        (lambda r: r.update(arm={}), "arm"),
        (lambda r: r["arms"]["moe"].update(modle="switch"), "arms.moe.modle"),
        (lambda r: r["arms"]["moe"].update(model="switch8"), "arms.moe.model"),
        (lambda r: r["deltas"][0].update(expr="t5 - mo"), "deltas[0].expr"),
        (lambda r: r["models"]["switch"].pop("init"), "models.switch.init"),
        (lambda r: r["models"]["switch"].update(init="tiny:swich"), "models.switch.init"),
        (lambda r: r["arms"]["moe"].update(args={"moe_freeze_strategy": "non-moe"}), "arms.moe.args.moe_freeze_strategy"),
        (lambda r: r["finetune"]["args"].update(output_dir="x"), "finetune.args.output_dir"),
        (lambda r: r["data"].update(tasks=["boolq"]), "data.tasks[0]"),
        (lambda r: r.update(study="flan"), "study"),
    ],
    ids=["unknown-arg", "unknown-top-key", "unknown-arm-key", "unknown-model", "unknown-arm-in-delta",
         "missing-model-id", "unknown-tiny-model", "strategy-typo", "managed-arg", "unknown-task", "unknown-study"],
)
def test_bad_recipe_names_file_and_key(tmp_path, mutate, key):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as info:
        load_study_config(path)
    assert str(path) in str(info.value) and key in str(info.value)
    assert info.value.key == key


def test_missing_shipped_dir_is_an_error(tmp_path):
    path = _write(tmp_path, lambda r: r["pretrain"].update(shipped_dir="nowhere"))
    with pytest.raises(ConfigError, match="pretrain.shipped_dir: no such directory"):
        load_study_config(path)


def test_bad_value_caught_by_training_args(tmp_path):
    path = _write(tmp_path, lambda r: r["finetune"]["args"].update(lr_scheduler_type="cosinus"))
    config = load_study_config(path)
    with pytest.raises(ConfigError, match="bad.yaml: arms.t5: invalid training arguments"):
        validate_training_args(config)


def test_overrides_apply_and_are_validated():
    config = load_study_config(TINY, parse_overrides(["finetune.args.num_train_epochs=2", "seeds=[4, 5]"]))
    assert config.finetune.args["num_train_epochs"] == 2 and config.seeds == [4, 5]
    with pytest.raises(ConfigError, match="finetune.args.epochs"):
        load_study_config(TINY, parse_overrides(["finetune.args.epochs=2"]))


def test_delta_expressions():
    assert delta_arms("(flan_moe - moe) - (flan_t5 - t5)") == {"flan_moe", "moe", "flan_t5", "t5"}
    assert evaluate_delta("(a - b) - (c - d)", {"a": 5, "b": 1, "c": 3, "d": 2}) == 3
    with pytest.raises(ValueError):
        delta_arms("a * b")


def test_cli_validate(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    bad = _write(tmp_path, lambda r: r["arms"]["moe"].update(args={"moe_freeze_strategy": "expert"}))
    args = parser.parse_args(["validate", str(TINY), str(bad)])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert f"OK   {TINY}" in out and "arms.moe.args.moe_freeze_strategy" in out
    args = parser.parse_args(["validate", *map(str, YAMLS)])
    assert args.func(args) == 0
