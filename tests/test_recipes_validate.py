"""Every recipe YAML validates offline; bad recipes fail naming the file and the key."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from hf_moe_tuning.study import ConfigError, load_study_config, validate_training_args
from hf_moe_tuning.study.cli import register
from hf_moe_tuning.study.config import delta_arms, evaluate_delta, merge_recipes, parse_overrides, read_recipe_yaml
from hf_moe_tuning.study.runner import DEFAULT_RECIPES

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


def test_quick_recipe_is_tiny_with_a_smaller_budget():
    """The README's first command runs recipes/flan_moe/quick.yaml: the study's recipe with fewer steps and one seed,
    writing outside results/ (the shipped checkpoints' configuration keys must match the study's)."""
    own = yaml.safe_load((RECIPES / "flan_moe" / "quick.yaml").read_text())
    assert own["extends"] == "tiny.yaml"
    assert set(own) == {"extends", "variant", "description", "seeds", "output_dir", "finetune"}
    assert own["finetune"] == {"early_stopping": {"min_steps": 0}, "args": {"max_steps": 400}}
    tiny = read_recipe_yaml(TINY)
    quick = read_recipe_yaml(RECIPES / "flan_moe" / "quick.yaml")
    assert (quick.pop("variant"), quick.pop("seeds"), quick.pop("output_dir")) == ("quick", 1, "runs/quick/flan_moe")
    assert quick.pop("description").startswith(tiny.pop("description").strip())
    assert quick["finetune"]["args"].pop("max_steps") < tiny["finetune"]["args"].pop("max_steps")
    assert quick["finetune"]["early_stopping"].pop("min_steps") == 0
    tiny["finetune"]["early_stopping"].pop("min_steps")
    tiny.pop("variant"), tiny.pop("seeds")
    assert quick == tiny
    assert DEFAULT_RECIPES["flan_moe"] == "recipes/flan_moe/quick.yaml"


def test_extends_deep_merges_over_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"seeds": 3, "data": {"tasks": ["a", "b"], "seed": 0},
                                                        "finetune": {"args": {"max_steps": 9, "learning_rate": 1.0}}}))
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\nfinetune: {args: {max_steps: 2}}\ndata: {tasks: [c]}\n")
    (tmp_path / "top.yaml").write_text("extends: mid.yaml\nseeds: 1\n")
    raw = read_recipe_yaml(tmp_path / "top.yaml", {"finetune.args.learning_rate": 0.5})
    assert raw == {"seeds": 1, "data": {"tasks": ["c"], "seed": 0},
                   "finetune": {"args": {"max_steps": 2, "learning_rate": 0.5}}}
    assert merge_recipes({"a": {"b": 1}}, {"a": 2}) == {"a": 2}


def test_replace_tag_replaces_a_mapping_of_the_base(tmp_path):
    """`arms: !replace {...}` drops the base's arms (a probe of one arm); untagged mappings still merge."""
    (tmp_path / "probe.yaml").write_text(
        f"extends: {TINY}\nseeds: 1\narms: !replace\n  t5: {{model: t5, label: T5}}\n"
        "deltas: [{name: d, expr: t5 - t5, paper: '0'}]\nfinetune: {args: {max_steps: 7}}\n"
        "pretrain: {shipped_dir: null}\ninstruct: {shipped_dir: null}\n"
    )
    config = load_study_config(tmp_path / "probe.yaml")
    assert list(config.arms) == ["t5"] and config.finetune.args["max_steps"] == 7
    assert config.finetune.args["learning_rate"] == load_study_config(TINY).finetune.args["learning_rate"]
    raw = read_recipe_yaml(tmp_path / "probe.yaml")
    assert type(raw["arms"]) is dict  # the tag does not leak into the merged recipe
    (tmp_path / "bad.yaml").write_text(f"extends: {TINY}\narms: !replace [t5]\n")
    with pytest.raises(ConfigError, match="!replace tags a mapping"):
        read_recipe_yaml(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "files, message",
    [
        ({"top.yaml": "extends: missing.yaml\n"}, "no such recipe file (extended by"),
        ({"top.yaml": "extends: other.yaml\n", "other.yaml": "extends: top.yaml\n"}, "cycle"),
        ({"top.yaml": "extends: [a.yaml]\n"}, "expected the path of a recipe file"),
        ({"top.yaml": "extends: other.yaml\n", "other.yaml": "- a list\n"}, "expected a mapping"),
    ],
)
def test_bad_extends_is_an_error_naming_the_file(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_recipe_yaml(tmp_path / "top.yaml")


def _write(tmp_path, mutate) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["pretrain"].pop("shipped_dir")  # relative to the recipe file; the copy lives elsewhere
    raw["instruct"].pop("shipped_dir")
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
        (lambda r: r["finetune"].update(early_stopping={"min_steps": -100}), "finetune.early_stopping.min_steps"),
    ],
    ids=["unknown-arg", "unknown-top-key", "unknown-arm-key", "unknown-model", "unknown-arm-in-delta",
         "missing-model-id", "unknown-tiny-model", "strategy-typo", "managed-arg", "unknown-task", "unknown-study",
         "negative-min-steps"],
)
def test_bad_recipe_names_file_and_key(tmp_path, mutate, key):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as info:
        load_study_config(path)
    assert str(path) in str(info.value) and key in str(info.value)
    assert info.value.key == key


@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
def test_missing_shipped_dir_is_an_error(tmp_path, stage):
    path = _write(tmp_path, lambda r: r[stage].update(shipped_dir="nowhere"))
    with pytest.raises(ConfigError, match=f"{stage}.shipped_dir: no such directory"):
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


def test_validate_reads_hub_configs_only_from_the_local_cache(monkeypatch):
    """`validate` is offline by design: with the offline switches off it still never asks the Hub for a config (an
    offline machine would otherwise wait through the Hub client's retries for every model); an uncached Hub id's
    backend follows its name."""
    import transformers

    from hf_moe_tuning.study import backends

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    asked: list[tuple[str, bool]] = []

    def from_pretrained(name, **kwargs):
        asked.append((name, kwargs.get("local_files_only", False)))
        raise OSError(f"{name} is not in the local cache")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    config = load_study_config(RECIPES / "flan_moe" / "real.yaml")
    validate_training_args(config)
    assert {name for name, _ in asked} == {m.init for m in config.models.values()}
    assert all(local for _, local in asked)
    assert {backends.backend_name(m, local_files_only=True) for m in config.models.values()} == {backends.SEQ2SEQ}


# ------------------------------------------------------------------------------------------ global batch
def test_global_batch_splits_over_processes():
    from hf_moe_tuning.study.config import resolve_batch

    # written for one process: per-device 32 x 1 is the global batch, and 32 the micro-batch limit
    assert resolve_batch({"per_device_train_batch_size": 32}, 1) == {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 1}
    assert resolve_batch({"per_device_train_batch_size": 32}, 8) == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}
    assert resolve_batch({"per_device_train_batch_size": 8, "gradient_accumulation_steps": 4}, 2) == {
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}
    # explicit: per-device batch is the limit, accumulation derived (fewest steps that fit)
    args = {"global_batch_size": 128, "per_device_train_batch_size": 8, "learning_rate": 1e-3}
    assert resolve_batch(args, 1) == {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 16, "learning_rate": 1e-3}
    assert resolve_batch(args, 8) == {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "learning_rate": 1e-3}
    assert resolve_batch(args, 16)["gradient_accumulation_steps"] == 1
    assert resolve_batch({"global_batch_size": 12}, 2) == {"per_device_train_batch_size": 6, "gradient_accumulation_steps": 1}
    for n in (1, 2, 4, 8, 16):  # the same global batch for any number of processes
        r = resolve_batch(args, n)
        assert r["per_device_train_batch_size"] * r["gradient_accumulation_steps"] * n == 128
    with pytest.raises(ValueError, match="cannot be split evenly over 3 processes"):
        resolve_batch({"global_batch_size": 128}, 3)
    with pytest.raises(ValueError, match="not both"):
        resolve_batch({"global_batch_size": 128, "gradient_accumulation_steps": 2}, 1)


def test_validate_checks_the_global_batch_for_n_processes(tmp_path, capsys):
    path = _write(tmp_path, lambda r: r["finetune"]["sparse_args"].update(global_batch_size=12, per_device_train_batch_size=4))
    config = load_study_config(path)
    validate_training_args(config, num_processes=2)
    with pytest.raises(ConfigError, match=r"bad.yaml: arms\.\w+: batch size: global batch 12 cannot be split evenly over 8"):
        validate_training_args(config, num_processes=8)
    (tmp_path / "other").mkdir()
    bad = _write(tmp_path / "other", lambda r: r["finetune"]["args"].update(global_batch_size="many"))
    with pytest.raises(ConfigError, match="finetune.args.global_batch_size: expected a positive int"):
        load_study_config(bad)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["validate", "--num-processes", "8", str(path)])
    assert args.func(args) == 1 and "cannot be split evenly over 8" in capsys.readouterr().out


@pytest.mark.parametrize("path", [p for p in YAMLS if p.stem == "real"], ids=lambda p: p.parent.name)
def test_real_recipes_state_the_papers_global_batch(path):
    config = load_study_config(path)
    assert config.finetune.sparse_args["global_batch_size"] == 128  # ST-MoE: 65,536 tokens of 512-token inputs
    for n in (1, 8, 16):  # 1 GPU, 1 node x 8, 2 nodes x 8
        validate_training_args(config, num_processes=n)


# ------------------------------------------------------------------------------------------ launch configs and README
ACCELERATE = RECIPES / "accelerate"
README = RECIPES.parent / "README.md"
STUDIES = ("flan_moe", "st_moe_freezing", "expert_count", "instruct_moe")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_env(config: Path, *extra: str) -> dict[str, str]:
    """The environment ``accelerate launch --config_file config [extra] recipes/train.py`` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), *extra, "recipes/train.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("config", sorted(ACCELERATE.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_accelerate_config_loads_and_launches(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    text = config.read_text()
    assert text.startswith("#") and "accelerate launch" in text  # each says how to launch it
    if loaded.distributed_type in ("NO",):
        assert loaded.num_processes == 1
        return
    # accelerate refuses a main process port that something else on this machine holds (another test's launch):
    # the rank-0 node checks it, so give it a free one
    nodes = (["--machine_rank", "0", "--main_process_ip", "10.0.0.1", "--main_process_port", str(_free_port())]
             if loaded.num_machines > 1 else [])
    env = _launch_env(config, *nodes)
    if loaded.distributed_type == "FSDP":
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    if loaded.distributed_type == "DEEPSPEED":
        assert loaded.deepspeed_config["zero_stage"] == 3
        # the Trainer fills gradient accumulation from the recipe's global batch ("auto")
        assert "gradient_accumulation_steps" not in loaded.deepspeed_config
    if "2nodes" in config.stem:
        assert (loaded.num_machines, loaded.num_processes) == (2, 16) and loaded.main_process_port
    elif loaded.distributed_type in ("FSDP", "DEEPSPEED"):
        assert (loaded.num_machines, loaded.num_processes) == (1, 8)


def _readme_launch_lines() -> list[str]:
    return [line.strip() for line in README.read_text().splitlines() if line.strip().startswith("accelerate launch")]


def test_readme_launch_lines_name_existing_files():
    lines = _readme_launch_lines()
    assert lines
    for line in lines:
        for ref in re.findall(r"(?:recipes|scripts|tests)/[\w./-]+\.(?:ya?ml|py)", line):
            assert (RECIPES.parent / ref).is_file(), (ref, line)
    assert not list((RECIPES / "instruct_moe").glob("accelerate_*.yaml"))  # merged into recipes/accelerate


@pytest.mark.parametrize("study", STUDIES)
def test_readme_has_a_launch_line_per_study_and_machine(study):
    lines = [line for line in _readme_launch_lines() if f"recipes/{study}/" in line]
    kinds = {
        "1 CPU": lambda line: "single_cpu.yaml" in line,
        "1 GPU": lambda line: "--num_processes 1 " in line and "real.yaml" in line,
        "8 GPUs": lambda line: re.search(r"(fsdp|deepspeed_zero3)\.yaml", line) and "real.yaml" in line,
        "2 nodes": lambda line: "2nodes.yaml" in line and "--machine_rank" in line and "real.yaml" in line,
    }
    for kind, matches in kinds.items():
        assert any(matches(line) for line in lines), (study, kind)


def test_readme_two_process_line_is_the_one_the_tests_run():
    from test_study_distributed import LAUNCH

    assert " ".join([*LAUNCH, "recipes/train.py", "recipes/flan_moe/smoke.yaml"]) in _readme_launch_lines()
