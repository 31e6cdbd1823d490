"""Every bad input named across the project: a clear message, and nothing half-written.

"Nothing half-written": no output directory left behind by a rejected run, no half-frozen model (every
parameter keeps ``requires_grad=True`` and its value), no checkpoint and no weight update from a step
that was stopped.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from helpers import random_lm_dataset
from transformers import HfArgumentParser

from hf_moe_tuning import MoETrainer, MoETrainingArguments, apply_freezing
from hf_moe_tuning.callbacks.nan_guard import NaNGuardCallback
from hf_moe_tuning.checkpoint import CheckpointLoadError, load_checkpoint_exact
from hf_moe_tuning.freezing import FreezingError
from hf_moe_tuning.models import build_tiny_model


def _snapshot(model: torch.nn.Module) -> dict[str, tuple[bool, torch.Tensor]]:
    return {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


def _assert_untouched(model: torch.nn.Module, before: dict[str, tuple[bool, torch.Tensor]]) -> None:
    for name, param in model.named_parameters():
        requires_grad, value = before[name]
        assert param.requires_grad == requires_grad, f"{name} requires_grad changed"
        assert torch.allclose(param.detach(), value, rtol=0, atol=0, equal_nan=True), f"{name} changed"



def _args(out, **kwargs) -> MoETrainingArguments:
    base = dict(output_dir=str(out), report_to=[], use_cpu=True, disable_tqdm=True, per_device_train_batch_size=4,
                max_steps=2, logging_steps=1, save_steps=1, moe_drift_probe_size=0, moe_expert_load_heatmap=False)
    return MoETrainingArguments(**{**base, **kwargs})


# ------------------------------------------------------------------------------------- training arguments
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(moe_freeze_strategy="everything"), "moe_freeze_strategy='everything' is not one of"),
        (dict(moe_aux_loss_coef=-0.01), "moe_aux_loss_coef must be >= 0"),
        (dict(moe_z_loss_coef=math.nan), "moe_z_loss_coef must be a finite number"),
        (dict(moe_aux_loss_schedule="exponential"), "moe_aux_loss_schedule='exponential' is not one of"),
        (dict(moe_nan_policy="ignore"), "moe_nan_policy='ignore' is not one of"),
        (dict(moe_router_loss_warmup_steps=-1), "moe_router_loss_warmup_steps must be >= 0"),
        (dict(moe_expert_dropout=1.5), r"moe_expert_dropout must be in \[0, 1\)"),
        (dict(moe_experts="0,x"), "moe_experts='0,x' is not"),
        (dict(moe_capacity_factor_train=0.0), "moe_capacity_factor_train must be > 0"),
        (dict(moe_hparam_preset="huge"), "moe_hparam_preset='huge' is not one of"),
    ],
)
def test_bad_training_arguments(tmp_path, kwargs, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        _args(out, **kwargs)
    assert not out.exists()


def test_unknown_key_in_training_arguments_yaml(tmp_path):
    config = tmp_path / "args.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nmoe_freeze_strategy: non_moe\nrouter_aux_los_coef: 0.01\n")
    with pytest.raises(ValueError, match="router_aux_los_coef"):
        HfArgumentParser(MoETrainingArguments).parse_yaml_file(str(config))
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_recipe_yaml(tmp_path):
    from hf_moe_tuning.study.config import ConfigError, load_study_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("study: flan_moe\nvariant: tiny\nlerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="lerning_rate: unknown key"):
        load_study_config(recipe)


# ------------------------------------------------------------------------------------- model requests
@pytest.mark.parametrize(
    "model_name, kwargs, error, message",
    [
        ("mixtral", dict(moe_freeze_strategy="ffn"), FreezingError, "no dense FFN layer"),
        ("t5", dict(moe_aux_loss_coef=0.01), ValueError, "moe_aux_loss_coef set, but model_type='t5' has no MoE"),
        ("llama", dict(moe_freeze_strategy="moe"), ValueError, "strategy 'moe' needs MoE layers"),
        ("t5", dict(moe_expert_dropout=0.1), ValueError, "moe_expert_dropout set, but model_type='t5' has no MoE"),
        ("mixtral", dict(moe_freeze_strategy="attention", moe_extra_frozen=["self_attn"]), FreezingError,
         "zero trainable parameters"),
        ("mixtral", dict(moe_freeze_strategy="moe", moe_experts="0,9"), FreezingError, r"expert index \[9\] out of range"),
        ("mixtral", dict(moe_experts='{"5": [0]}'), FreezingError, r"MoE layer\(s\) \[5\]"),
        ("mixtral", dict(moe_extra_trainable=["no_such_param"]), FreezingError, "'no_such_param' matches no parameter"),
        ("mixtral", dict(moe_extra_frozen=["(unclosed"]), FreezingError, "is invalid"),
        ("mixtral", dict(moe_freeze_strategy="attention", moe_experts="0"), FreezingError,
         "does not train routed experts"),
        ("mixtral", dict(moe_freeze_strategy="moe", moe_experts="esft-gate:1.5"), ValueError, r"\(0, 1\]"),
        ("mixtral", dict(moe_freeze_strategy="moe", moe_experts="esft-magic:0.1"), ValueError, "unknown ESFT method"),
    ],
)
def test_bad_model_requests_leave_nothing_behind(tmp_path, model_name, kwargs, error, message):
    model = build_tiny_model(model_name)
    before = _snapshot(model)
    out = tmp_path / "nested" / "run"
    with pytest.raises(error, match=message):
        MoETrainer(model=model, args=_args(out, **kwargs), train_dataset=random_lm_dataset(8, 10))
    _assert_untouched(model, before)  # no half-frozen model
    assert not (tmp_path / "nested").exists()  # no partial output dir


def test_esft_with_a_missing_dataset_column(tmp_path):
    model = build_tiny_model("mixtral")
    before = _snapshot(model)
    text_only = Dataset.from_list([{"text": "no token ids here"}] * 4)
    with pytest.raises(ValueError, match="ESFT scoring data has columns \\['text'\\]"):
        MoETrainer(model=model, args=_args(tmp_path / "run", moe_freeze_strategy="moe", moe_experts="esft-gate:0.5"),
                   train_dataset=text_only)
    _assert_untouched(model, before)
    assert not (tmp_path / "run").exists()


def test_apply_freezing_is_all_or_nothing():
    model = build_tiny_model("qwen2_moe")
    before = _snapshot(model)
    with pytest.raises(FreezingError, match="matches no parameter"):
        apply_freezing(model, "non_moe", extra_trainable=["mlp.gate"], extra_frozen=["nothing_like_this"])
    _assert_untouched(model, before)


def test_invalid_repo_id():
    from hf_moe_tuning.hub.push import check_repo_id

    with pytest.raises(ValueError, match="invalid repo id 'not/a/valid id'"):
        check_repo_id("not/a/valid id")


def test_foreign_checkpoint_is_not_half_loaded(tmp_path):
    build_tiny_model("olmoe").save_pretrained(tmp_path / "olmoe")
    model = build_tiny_model("mixtral")
    before = _snapshot(model)
    with pytest.raises(CheckpointLoadError, match="cannot load"):
        load_checkpoint_exact(model, str(tmp_path / "olmoe"))
    _assert_untouched(model, before)
    with pytest.raises(FileNotFoundError, match="no model weights"):
        load_checkpoint_exact(model, str(tmp_path))


# ------------------------------------------------------------------------------------- non-finite values
def _poisoned(target: str) -> torch.nn.Module:
    """A tiny Mixtral whose layer-0 router (``"router"``) or LM head (``"head"``) outputs NaN."""
    model = build_tiny_model("mixtral")
    with torch.no_grad():
        if target == "router":
            model.model.layers[0].mlp.gate.weight[0, 0] = float("nan")
        else:
            model.lm_head.weight[5, 0] = float("nan")
    return model


@pytest.mark.parametrize(
    "target, kwargs, message",
    [
        # the NaN guard passed here runs before the router-loss callback, so either names the layer and the step first
        ("router", dict(moe_aux_loss_coef=0.01),
         r"non-finite router logits in MoE layer 0 \(model.layers.0.mlp\) at optimizer step 1"
         r"|at optimizer step 1; the router logits of MoE layer 0 \(model.layers.0.mlp\) are non-finite"),
        ("head", dict(), "non-finite training loss .* at optimizer step 1"),
    ],
)
def test_non_finite_values_stop_the_run_naming_the_step(tmp_path, target, kwargs, message):
    model = _poisoned(target)
    args = _args(tmp_path / "run", moe_nan_policy="error", **kwargs)
    trainer = MoETrainer(model=model, args=args, train_dataset=random_lm_dataset(8, 10), callbacks=[NaNGuardCallback.from_args(args)])
    before = _snapshot(model)
    with pytest.raises(FloatingPointError, match=message):
        trainer.train()
    _assert_untouched(model, before)  # stopped before any optimizer step
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize(
    "target, kwargs, key",
    [("router", dict(moe_aux_loss_coef=0.01), "router/skipped_steps"), ("head", dict(), "nan_guard/skipped_steps")],
)
def test_non_finite_values_skip_the_step_when_asked(tmp_path, target, kwargs, key):
    model = _poisoned(target)
    args = _args(tmp_path / "run", moe_nan_policy="skip", moe_nan_max_skip_fraction=1.0, save_strategy="no", **kwargs)
    trainer = MoETrainer(model=model, args=args, train_dataset=random_lm_dataset(8, 10), callbacks=[NaNGuardCallback.from_args(args)])
    before = _snapshot(model)
    trainer.train()
    counts = [row[key] for row in trainer.state.log_history if key in row]
    assert counts == [1.0, 2.0]  # both steps skipped, counted in the logs
    _assert_untouched(model, before)  # no update, no weight decay
    assert not trainer.optimizer.state  # no optimizer moments
