"""Multi-process runs: DDP launched for real on CPU (gloo); FSDP / ZeRO-3 configuration checked without GPUs.

* ``accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2`` runs
  ``tests/scripts/distributed_train.py`` (tiny Mixtral, router aux + z loss, expert-load logging): it
  finishes, its router-loss and expert-load metrics equal a 1-process run over the same global batch,
  and only rank 0 writes files (other ranks: their own RNG state in checkpoints, nothing else).
* ``fsdp.yaml`` needs GPUs (accelerate falls back to MULTI_CPU without them) and ``deepspeed_zero3.yaml``
  the optional deepspeed (with it, ``tests/test_zero3.py`` runs ZeRO-3 for real on CPU), so here the
  launcher environment they produce is turned into accelerate's plugins and :func:`configure_distributed`
  is checked on them: MoE blocks become FSDP wrap units / ZeRO-3 leaf modules, units mixing frozen and
  trainable parameters are found.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest

from hf_moe_tuning import apply_freezing
from hf_moe_tuning.distributed import (
    configure_distributed,
    fsdp_wrap_class_names,
    mixed_requires_grad_units,
    moe_block_class_names,
    set_zero3_leaf_modules,
    wrap_unit_paths,
)
from hf_moe_tuning.models import build_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "distributed_train.py")
CONFIGS = os.path.join(ROOT, "recipes", "accelerate")


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=ROOT,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        MPLBACKEND="Agg",
    )


def _metrics(history: list[dict]) -> list[dict]:
    keys = ("router/", "moe/")
    return [{k: v for k, v in row.items() if k.startswith(keys)} for row in history if "loss" in row]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_and_only_rank0_writes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    launch = ["accelerate", "launch", "--config_file", os.path.join(CONFIGS, "ddp.yaml"), "--num_processes", "2",
              SCRIPT, str(two / "run")]
    runs = [  # started together: the 1-process reference overlaps the launcher's start-up
        subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd in ([sys.executable, SCRIPT, str(one / "run")], launch)
    ]
    for proc in runs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]

    history_one = json.loads((one / "log_history.json").read_text())
    history_two = json.loads((two / "log_history.json").read_text())
    m1, m2 = _metrics(history_one), _metrics(history_two)
    assert len(m1) == len(m2) == 4
    for row1, row2 in zip(m1, m2):
        assert {"router/aux_loss", "router/z_loss", "moe/layer0/load_cv", "moe/load_cv_mean"} <= set(row1)
        assert row1.keys() == row2.keys()
        for key in row1:
            assert row2[key] == pytest.approx(row1[key], rel=1e-5, abs=1e-7), key

    # the per-expert token counts written to expert_load.jsonl are the same, once per log (rank 0 only)
    rec1_all = [json.loads(line) for line in (one / "run" / "expert_load.jsonl").read_text().splitlines()]
    rec2_all = [json.loads(line) for line in (two / "run" / "expert_load.jsonl").read_text().splitlines()]
    rec1 = [r for r in rec1_all if r["split"] == "train"]
    rec2 = [r for r in rec2_all if r["split"] == "train"]
    assert [r["step"] for r in rec2] == [r["step"] for r in rec1] == [1, 2, 3, 4]
    assert [r["layers"] for r in rec2] == [r["layers"] for r in rec1]

    # evaluation: the loss without router terms is not divided by the world size (issue 15 point 1), and each of
    # the 21 sequences is counted once, without accelerate's padded duplicates (point 2)
    eval1, eval2 = ([row for row in h if "eval_loss" in row] for h in (history_one, history_two))
    assert len(eval1) == len(eval2) == 1
    eval1, eval2 = eval1[0], eval2[0]
    assert eval1["eval_lm_loss"] == pytest.approx(eval1["eval_loss"], rel=1e-4)
    assert eval2["eval_lm_loss"] == pytest.approx(eval1["eval_lm_loss"], rel=0.01)
    assert eval2["eval_lm_loss"] == pytest.approx(eval2["eval_loss"], rel=0.01)
    ev1 = [r for r in rec1_all if r["split"] != "train"]
    ev2 = [r for r in rec2_all if r["split"] != "train"]
    assert len(ev1) == len(ev2) == 1
    assert [layer["tokens"] for layer in ev1[0]["layers"]] == [21 * 12] * len(ev1[0]["layers"])
    assert ev2[0]["layers"] == ev1[0]["layers"]
    for key in (k for k in eval1 if k.startswith("eval_moe/")):
        assert eval2[key] == pytest.approx(eval1[key], rel=1e-5, abs=1e-7), key

    writes0 = set(json.loads((two / "writes_rank0.json").read_text()))
    writes1 = set(json.loads((two / "writes_rank1.json").read_text()))
    assert {"checkpoint-2/model.safetensors", "checkpoint-2/optimizer.pt", "expert_load.jsonl"} <= writes0
    allowed1 = {f"checkpoint-{s}" for s in (2, 4)} | {f"checkpoint-{s}/rng_state_1.pth" for s in (2, 4)}
    assert writes1 <= allowed1, f"rank 1 wrote {sorted(writes1 - allowed1)}"
    files_one = {p.relative_to(one / "run").as_posix() for p in (one / "run").rglob("*") if p.is_file()}
    files_two = {p.relative_to(two / "run").as_posix() for p in (two / "run").rglob("*") if p.is_file()}
    per_rank_rng = {f"checkpoint-{s}/rng_state{suffix}.pth" for s in (2, 4) for suffix in ("", "_0", "_1")}
    assert files_one - per_rank_rng == files_two - per_rank_rng


# ------------------------------------------------------------------------------------------- configuration
def _launch_env(config: str) -> dict[str, str]:
    """The environment ``accelerate launch --config_file config`` gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", os.path.join(CONFIGS, config), SCRIPT])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def _fake_trainer(model, fsdp_plugin=None, deepspeed_plugin=None, callbacks=()):
    state = SimpleNamespace(fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin)
    return SimpleNamespace(
        model=model,
        is_fsdp_enabled=fsdp_plugin is not None,
        is_deepspeed_enabled=deepspeed_plugin is not None,
        accelerator=SimpleNamespace(state=state),
        callback_handler=SimpleNamespace(callbacks=list(callbacks)),
    )


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: load_config_from_file(os.path.join(CONFIGS, f"{name}.yaml")) for name in ("ddp", "fsdp", "deepspeed_zero3")}
    assert kinds["ddp"].distributed_type == "MULTI_GPU" and kinds["ddp"].num_processes == 2
    assert kinds["fsdp"].fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert kinds["fsdp"].fsdp_config["fsdp_version"] == 2
    assert kinds["deepspeed_zero3"].deepspeed_config["zero_stage"] == 3


def test_fsdp_config_wraps_moe_blocks_and_allows_mixed_units(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    env = _launch_env("fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    model = build_tiny_model("mixtral")
    apply_freezing(model, "non_moe")  # the MoE block freezes, the attention of the same layer trains
    setup = configure_distributed(_fake_trainer(model, fsdp_plugin=plugin))
    assert setup.backend == "fsdp"
    assert plugin.transformer_cls_names_to_wrap == ["MixtralDecoderLayer", "MixtralSparseMoeBlock"]
    assert "model.layers.0.mlp" in wrap_unit_paths(model, setup.fsdp_wrap)
    # with MoE blocks as units of their own, non_moe leaves no unit mixing frozen and trainable tensors; with the
    # decoder layers alone every layer would mix them (fine for FSDP2, needs use_orig_params with FSDP1)
    assert setup.mixed_units == []
    assert set(mixed_requires_grad_units(model, ["MixtralDecoderLayer"])) == {"model.layers.0", "model.layers.1"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("model.layers.0.mlp."))


def test_fsdp1_without_orig_params_rejects_mixed_units():
    from accelerate.utils import FullyShardedDataParallelPlugin

    model = build_tiny_model("mixtral")
    apply_freezing(model, "all", train_router=False)  # the router freezes inside the trainable MoE block unit
    names = fsdp_wrap_class_names(model)
    assert mixed_requires_grad_units(model, names) == {"model.layers.0.mlp": (2, 1), "model.layers.1.mlp": (2, 1)}
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1, auto_wrap_policy="TRANSFORMER_BASED_WRAP", use_orig_params=False)
    with pytest.raises(ValueError, match="use_orig_params"):
        configure_distributed(_fake_trainer(model, fsdp_plugin=plugin))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1, auto_wrap_policy="TRANSFORMER_BASED_WRAP", use_orig_params=True)
    assert configure_distributed(_fake_trainer(model, fsdp_plugin=plugin)).mixed_units == ["model.layers.0.mlp", "model.layers.1.mlp"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mixtral", ["MixtralSparseMoeBlock"]),
        ("qwen2_moe", ["Qwen2MoeSparseMoeBlock"]),
        ("deepseek_v3", ["DeepseekV3MoE"]),
        ("switch", ["SwitchTransformersSparseMLP"]),
        ("t5", []),
    ],
)
def test_zero3_leaf_classes_from_anatomy(name, expected):
    assert moe_block_class_names(build_tiny_model(name)) == expected


def test_zero3_registers_moe_blocks_as_leaf_modules(monkeypatch):
    calls = []
    fake = types.ModuleType("deepspeed")
    fake.utils = types.ModuleType("deepspeed.utils")
    fake.utils.set_z3_leaf_modules = lambda model, classes: calls.append((model, list(classes)))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", fake.utils)
    model = build_tiny_model("qwen2_moe")
    setup = configure_distributed(_fake_trainer(model, deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    assert setup.backend == "deepspeed" and setup.zero3_leaf == ["Qwen2MoeSparseMoeBlock"]
    assert calls and calls[0][0] is model and [c.__name__ for c in calls[0][1]] == ["Qwen2MoeSparseMoeBlock"]
    # ZeRO-1/2 do not partition parameters: nothing to register
    assert configure_distributed(_fake_trainer(model, deepspeed_plugin=SimpleNamespace(zero_stage=2))).backend == "none"


def test_zero3_without_deepspeed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "deepspeed.utils", None)
    with pytest.raises(ImportError, match="pip install deepspeed"):
        set_zero3_leaf_modules(build_tiny_model("mixtral"))
    assert set_zero3_leaf_modules(build_tiny_model("t5")) == []  # dense: nothing to do, no import


def test_sharding_rejects_fused_expert_slice_freezing():
    from accelerate.utils import FullyShardedDataParallelPlugin

    model = build_tiny_model("mixtral")
    report = apply_freezing(model, "moe", experts=[0, 1])
    assert report.slice_freezer  # fused tensors partially trainable
    callback = SimpleNamespace(report=report)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    with pytest.raises(ValueError, match="not supported with FSDP"):
        configure_distributed(_fake_trainer(model, fsdp_plugin=plugin, callbacks=[callback]))
    with pytest.raises(ValueError, match="ZeRO-3"):
        configure_distributed(_fake_trainer(model, deepspeed_plugin=SimpleNamespace(zero_stage=3), callbacks=[callback]))
    assert configure_distributed(_fake_trainer(model, callbacks=[callback])).backend == "none"  # DDP is fine
    report.slice_freezer.remove()
