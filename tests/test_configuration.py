"""MoE options as one dataclass composed into both trainers' configs; one callback builder; strict option types.

Issue 15 (points 7-9) and issue 17 (points 10-12): ``MoEArguments`` and its validator, ``MoETrainingArguments`` /
``MoESFTConfig``, ``build_moe_callbacks`` with the anatomy computed once, the hyperparameter preset not overriding
explicit values, TRL's ``router_aux_loss_coef`` never added on top of ours, recipe values type-checked.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from transformers import ByT5Tokenizer, HfArgumentParser, TrainingArguments

import hf_moe_tuning.anatomy.groups as anatomy_groups
from hf_moe_tuning import MoEArguments, MoETrainer, MoETrainingArguments, apply_freezing
from hf_moe_tuning.anatomy import NoMoELayersError
from hf_moe_tuning.configuration import MOE_ARGUMENT_NAMES
from hf_moe_tuning.models import build_tiny_model

BASE = {"report_to": [], "use_cpu": True, "disable_tqdm": True, "save_strategy": "no", "per_device_train_batch_size": 4,
        "max_steps": 2, "logging_steps": 1, "moe_drift_probe_size": 0, "moe_expert_load_heatmap": False}
#: MoE option sets both trainers must turn into the same callbacks
OPTION_SETS = [
    {},
    {"moe_freeze_strategy": "non_moe", "moe_aux_loss_coef": 0.01, "moe_z_loss_coef": 0.001},
    {"moe_freeze_strategy": "moe", "moe_experts": [0, 1], "moe_expert_dropout": 0.1, "moe_router_jitter": 0.01,
     "moe_bias_balancing": True, "moe_log_expert_load": False},
]


def _lm_dataset(n: int = 8, length: int = 10) -> Dataset:
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 300, (length,), generator=g).tolist()} for _ in range(n)]
    return Dataset.from_list([{**r, "labels": list(r["input_ids"])} for r in rows])


def _sft_dataset(n: int = 8) -> Dataset:
    return Dataset.from_list([{"prompt": f"Q: {i}+2?", "completion": f" A: {i + 2}."} for i in range(n)])


def _sft_trainer(tmp_path, model, **options):
    from hf_moe_tuning.sft import MoESFTConfig, MoESFTTrainer

    args = MoESFTConfig(str(tmp_path / "sft"), bf16=False, learning_rate=1e-3, **{**BASE, **options})
    return MoESFTTrainer(model=model, args=args, train_dataset=_sft_dataset(), processing_class=ByT5Tokenizer())


@pytest.fixture
def count_anatomy(monkeypatch):
    """Count ``find_moe_layers`` calls (the expensive part of ``describe_moe``)."""
    calls = collections.Counter()
    original = anatomy_groups.find_moe_layers

    def counting(model):
        calls["find_moe_layers"] += 1
        return original(model)

    monkeypatch.setattr(anatomy_groups, "find_moe_layers", counting)
    return calls


# ------------------------------------------------------------------------------------------ the dataclass
def test_moe_options_never_collide_with_transformers_or_trl_fields():
    trl = pytest.importorskip("trl")
    assert all(name.startswith("moe_") for name in MOE_ARGUMENT_NAMES)
    others = {f.name for f in dataclasses.fields(TrainingArguments)} | {f.name for f in dataclasses.fields(trl.SFTConfig)}
    assert not MOE_ARGUMENT_NAMES & others
    from hf_moe_tuning.sft import MoESFTConfig

    for composed in (MoETrainingArguments, MoESFTConfig):
        names = {f.name for f in dataclasses.fields(composed)}
        assert MOE_ARGUMENT_NAMES <= names
        assert all(f.metadata.get("help") for f in dataclasses.fields(MoEArguments))
        HfArgumentParser(composed)  # every field parses from the command line


def test_plain_trainer_path_does_not_import_trl(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import hf_moe_tuning
        from hf_moe_tuning import MoETrainer, MoETrainingArguments
        from hf_moe_tuning.models import build_tiny_model
        from datasets import Dataset
        rows = [{{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}}] * 4
        args = MoETrainingArguments({str(tmp_path / 'run')!r}, max_steps=1, per_device_train_batch_size=2, report_to=[],
                                    use_cpu=True, save_strategy="no", moe_aux_loss_coef=0.01, moe_drift_probe_size=0,
                                    moe_expert_load_heatmap=False, disable_tqdm=True)
        MoETrainer(model=build_tiny_model("mixtral"), args=args, train_dataset=Dataset.from_list(rows)).train()
        assert "trl" not in sys.modules, sorted(m for m in sys.modules if m.startswith("trl"))
        print("no trl")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no trl" in result.stdout


def test_cli_strings_are_converted_by_the_parser(tmp_path):
    (args,) = HfArgumentParser(MoETrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--moe_train_router", "yes", "--moe_expert_dropout", "0.1",
         "--moe_extra_trainable", "lm_head", "--moe_experts", "0,1", "--moe_aux_loss_coef", "1e-2"]
    )
    assert (args.moe_train_router, args.moe_expert_dropout, args.moe_extra_trainable) == (True, 0.1, ["lm_head"])
    assert (args.moe_experts, args.moe_aux_loss_coef) == ([0, 1], 0.01)


# ------------------------------------------------------------------------------------------ option types
def test_single_extra_trainable_string_is_one_pattern(tmp_path):
    args = MoETrainingArguments(str(tmp_path), moe_freeze_strategy="moe", moe_extra_trainable="lm_head",
                                moe_extra_frozen="layers\\.1\\.mlp\\.gate")
    assert args.moe_extra_trainable == ["lm_head"] and args.moe_extra_frozen == ["layers\\.1\\.mlp\\.gate"]
    model = build_tiny_model("mixtral")
    MoETrainer(model=model, args=args, train_dataset=_lm_dataset())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in trainable and "model.embed_tokens.weight" not in trainable  # not every parameter
    assert not any("self_attn" in n for n in trainable)
    # the freezing functions take one string as one pattern too
    report = apply_freezing(build_tiny_model("mixtral"), "moe", extra_trainable="lm_head")
    assert report.plan.trainable_params < report.plan.total_params


@pytest.mark.parametrize("experts", ["", "  ", [], {}, ","])
def test_empty_expert_selection_raises(tmp_path, experts):
    with pytest.raises(ValueError, match="moe_experts=.* selects no expert"):
        MoETrainingArguments(str(tmp_path), moe_experts=experts)


@pytest.mark.parametrize("value", ["yes", 1, 0, "True"])
def test_train_router_accepts_booleans_only(tmp_path, value):
    with pytest.raises(ValueError, match="moe_train_router must be a boolean or None"):
        MoETrainingArguments(str(tmp_path), moe_train_router=value)
    assert MoETrainingArguments(str(tmp_path), moe_train_router=False).moe_train_router is False


@pytest.mark.parametrize(
    "name, value",
    [("moe_expert_dropout", "0.1"), ("moe_capacity_factor_train", "1.25"), ("moe_capacity_factor_eval", "2"),
     ("moe_drift_probe_size", "8"), ("moe_drift_every_steps", 2.5), ("moe_aux_loss_coef", "0.01"),
     ("moe_z_loss_coef", True), ("moe_router_jitter", "0.01"), ("moe_bias_update_rate", "1e-3"),
     ("moe_router_loss_warmup_steps", "3"), ("moe_esft_num_samples", "16"), ("moe_log_expert_load", 1),
     ("moe_bias_balancing", "false"), ("moe_freeze_strategy", 3)],
)
def test_wrong_type_raises_naming_the_field(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"^{name} must be "):
        MoETrainingArguments(str(tmp_path), **{name: value})
    assert not (tmp_path / "never").exists()


def test_ints_are_accepted_for_numbers(tmp_path):
    args = MoETrainingArguments(str(tmp_path), moe_aux_loss_coef=0, moe_capacity_factor_train=2)
    assert args.moe_aux_loss_coef == 0.0 and isinstance(args.moe_capacity_factor_train, float)


def test_recipe_numbers_read_as_strings_are_converted_or_rejected_with_the_key(tmp_path):
    from hf_moe_tuning.study.config import (
        ConfigError,
        load_study_config,
        parse_overrides,
    )

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent("""
        study: st_moe_freezing
        variant: tiny
        data: {source: embedded, tasks: [passage_yesno]}
        models: {switch: {init: "tiny:switch", args: {moe_aux_loss_coef: 1e-2}}}
        finetune: {args: {learning_rate: 1e-3, max_steps: 1e2, moe_bias_update_rate: 5e-4}}
        arms: {moe: {model: switch}}
    """))
    config = load_study_config(recipe)
    assert config.finetune.args == {"learning_rate": 0.001, "max_steps": 100, "moe_bias_update_rate": 0.0005}
    assert config.models["switch"].args == {"moe_aux_loss_coef": 0.01}
    for override, key in [("finetune.args.num_train_epochs=abc", "finetune.args.num_train_epochs"),
                          ("finetune.args.max_steps=1.5", "finetune.args.max_steps"),
                          ("finetune.args.bf16=maybe", "finetune.args.bf16"),
                          ("arms.moe.args.moe_expert_dropout=lots", "arms.moe.args.moe_expert_dropout")]:
        with pytest.raises(ConfigError, match=f"{key}: .* must be "):
            load_study_config(recipe, parse_overrides([override]))


# ------------------------------------------------------------------------------------------ presets
def test_preset_keeps_an_explicit_learning_rate(tmp_path, caplog):
    model = build_tiny_model("mixtral")
    explicit = MoETrainingArguments(str(tmp_path / "a"), moe_hparam_preset="sparse", learning_rate=3e-5)
    with caplog.at_level(logging.INFO, logger="hf_moe_tuning.presets"):
        MoETrainer(model=model, args=explicit, train_dataset=_lm_dataset())
    assert explicit.learning_rate == 3e-5
    assert explicit.moe_expert_dropout == 0.4  # not set explicitly: the preset's
    assert "keeping the explicitly set learning_rate=3e-05" in caplog.text
    unset = MoETrainingArguments(str(tmp_path / "b"), moe_hparam_preset="sparse", moe_expert_dropout=0.2)
    MoETrainer(model=build_tiny_model("mixtral"), args=unset, train_dataset=_lm_dataset())
    assert (unset.learning_rate, unset.moe_expert_dropout) == (1e-3, 0.2)


# ------------------------------------------------------------------------------------------ one builder, one anatomy
def test_anatomy_is_computed_once_per_trainer(tmp_path, count_anatomy):
    model = build_tiny_model("mixtral")
    args = MoETrainingArguments(
        str(tmp_path), moe_freeze_strategy="non_moe", moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001,
        moe_expert_dropout=0.1, moe_router_jitter=0.01, moe_bias_balancing=True, moe_drift_probe_size=2,
        moe_drift_every_steps=1, **{k: v for k, v in BASE.items() if k != "moe_drift_probe_size"},
    )
    trainer = MoETrainer(model=model, args=args, train_dataset=_lm_dataset())
    trainer.train()
    trainer.evaluate(_lm_dataset(4))
    assert len(trainer.moe_callbacks()) == 7
    assert count_anatomy["find_moe_layers"] == 1


def test_sft_trainer_computes_the_anatomy_once(tmp_path, count_anatomy):
    pytest.importorskip("trl")
    trainer = _sft_trainer(tmp_path, build_tiny_model("mixtral"), moe_freeze_strategy="non_moe", moe_aux_loss_coef=0.01)
    trainer.train()
    assert count_anatomy["find_moe_layers"] == 1


@pytest.mark.parametrize("options", OPTION_SETS, ids=["defaults", "freeze+router-loss", "controls"])
def test_sft_and_plain_trainer_build_the_same_callbacks(tmp_path, options):
    pytest.importorskip("trl")
    plain = MoETrainer(model=build_tiny_model("mixtral"), args=MoETrainingArguments(str(tmp_path / "plain"), **BASE, **options),
                       train_dataset=_lm_dataset())
    sft = _sft_trainer(tmp_path, build_tiny_model("mixtral"), **options)
    plain_classes = [type(cb).__name__ for cb in plain.moe_callbacks()]
    assert plain_classes == [type(cb).__name__ for cb in sft.moe_callbacks()]
    assert "NaNGuardCallback" in plain_classes
    # the callbacks took effect in both: same trainable set
    trainable = [{n for n, p in t.model.named_parameters() if p.requires_grad} for t in (plain, sft)]
    assert trainable[0] == trainable[1]


@pytest.mark.parametrize("option", [{"moe_aux_loss_coef": 0.01}, {"moe_expert_dropout": 0.1}, {"moe_train_router": True}])
def test_moe_options_on_a_dense_model_raise_in_both_trainers(tmp_path, option):
    pytest.importorskip("trl")
    name = next(iter(option))
    with pytest.raises(NoMoELayersError, match=f"{name} set, but model_type='llama' has no MoE layers"):
        MoETrainer(model=build_tiny_model("llama"), args=MoETrainingArguments(str(tmp_path / "p"), **BASE, **option))
    with pytest.raises(NoMoELayersError, match=f"{name} set, but model_type='llama' has no MoE layers"):
        _sft_trainer(tmp_path, build_tiny_model("llama"), **option)
    assert not (tmp_path / "p").exists() and not (tmp_path / "sft").exists()


# ------------------------------------------------------------------------------------------ TRL's aux loss
def test_trl_aux_loss_is_off_while_ours_is_on(tmp_path):
    pytest.importorskip("trl")
    trainer = _sft_trainer(tmp_path, build_tiny_model("mixtral"), moe_aux_loss_coef=0.5, moe_z_loss_coef=0.0)
    assert trainer.args.router_aux_loss_coef == 0.0 and not trainer.aux_loss_enabled
    trainer.train()
    log = next(r for r in trainer.state.log_history if "router/aux_loss" in r)
    assert "aux_loss" not in log  # TRL logs its own aux loss only when it adds it
    # the loss is the LM loss plus our weighted aux loss, and nothing else
    assert log["loss"] == pytest.approx(log["lm_loss"] + 0.5 * log["router/aux_loss"], rel=1e-3)


def test_explicit_trl_aux_loss_with_ours_raises(tmp_path):
    pytest.importorskip("trl")
    with pytest.raises(ValueError, match="would add two load-balancing losses"):
        _sft_trainer(tmp_path, build_tiny_model("mixtral"), moe_aux_loss_coef=0.01, router_aux_loss_coef=0.02)
    # explicitly off is fine
    assert _sft_trainer(tmp_path, build_tiny_model("mixtral"), moe_z_loss_coef=0.01, router_aux_loss_coef=0.0)


def test_trl_aux_loss_works_as_in_trl_when_ours_is_off(tmp_path):
    pytest.importorskip("trl")
    trainer = _sft_trainer(tmp_path, build_tiny_model("mixtral"), router_aux_loss_coef=0.02)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.02
    trainer.train()
    log = trainer.state.log_history[0]
    assert "aux_loss" in log and "moe/load_cv_mean" in log  # TRL's aux loss next to our expert-load logging
