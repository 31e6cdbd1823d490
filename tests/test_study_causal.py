"""The study pipeline's decoder-only backend: chat format, MoESFTTrainer with all MoE callbacks, recipes, the study."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import ByT5Tokenizer

from hf_moe_tuning.anatomy import NoMoELayersError, describe_moe
from hf_moe_tuning.data import heldout_task, instruction_mixture
from hf_moe_tuning.models import build_tiny_model
from hf_moe_tuning.study import load_study_config, parse_study_config, validate_training_args
from hf_moe_tuning.study.backends import CAUSAL, SEQ2SEQ, backend_for
from hf_moe_tuning.study.chat import (
    BYTE_CHAT_TEMPLATE,
    align_special_tokens,
    ensure_chat_template,
    render_prompt,
    sft_config,
    to_prompt_completion,
)
from hf_moe_tuning.study.config import ConfigError, set_dotted
from hf_moe_tuning.study.evaluation import evaluate_chat_task


def build_sft_trainer(model, tokenizer, data, args, output_dir, peft_config=None):
    from hf_moe_tuning.sft import MoESFTTrainer

    return MoESFTTrainer(model=model, args=sft_config(args, output_dir), train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "instruct_moe" / "tiny.yaml"
REAL = ROOT / "recipes" / "instruct_moe" / "real.yaml"


@pytest.fixture
def tokenizer():
    return ensure_chat_template(ByT5Tokenizer(), "auto")


# ---------------------------------------------------------------------------------------------- chat
def test_byte_chat_template_renders_prompt_and_stop_token(tokenizer):
    assert tokenizer.chat_template == BYTE_CHAT_TEMPLATE
    prompt = render_prompt(tokenizer, "What does a cow say?")
    assert prompt == "U: What does a cow say?\nA: "
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does a cow say?"}, {"role": "assistant", "content": "moo"}], tokenize=False
    )
    assert full == prompt + "moo</s>"
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id  # the stop token is one token, trained with the answer
    assert ids[: len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_ensure_chat_template_modes(tokenizer):
    with pytest.raises(ValueError, match="has no chat template"):
        ensure_chat_template(ByT5Tokenizer(), "model")
    with pytest.raises(ValueError, match="not one of"):
        ensure_chat_template(ByT5Tokenizer(), "jinja")
    assert "<|im_start|>" in ensure_chat_template(ByT5Tokenizer(), "chatml").chat_template


def test_to_prompt_completion_converts_mixture_and_heldout():
    mixture = to_prompt_completion(instruction_mixture(8, seed=1), system="Answer briefly.")
    row = mixture[0]
    assert mixture.column_names == ["prompt", "completion"]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["completion"][0]["role"] == "assistant"
    task = heldout_task("passage_yesno", train_size=4, validation_size=2, test_size=2)
    assert to_prompt_completion(task["train"])[0]["completion"][0]["content"] in ("yes", "no")
    with pytest.raises(ValueError, match="inputs"):
        to_prompt_completion(task["train"].rename_column("inputs", "question"))


# ---------------------------------------------------------------------------------------------- SFT
def test_sft_config_is_one_config_for_trl_and_moe_options(tmp_path):
    config = sft_config({"learning_rate": 1e-3, "moe_z_loss_coef": 1e-3, "moe_freeze_strategy": "non_moe"}, str(tmp_path), seed=3)
    assert (config.learning_rate, config.moe_z_loss_coef, config.moe_freeze_strategy, config.seed) == (1e-3, 1e-3, "non_moe", 3)
    assert config.router_aux_loss_coef is None  # TRL's own field, untouched by the config
    with pytest.raises(ValueError, match="unknown training argument 'lerning_rate'"):
        sft_config({"lerning_rate": 1e-3}, str(tmp_path))
    with pytest.raises(ValueError, match="moe_expert_dropout must be a number"):
        sft_config({"moe_expert_dropout": "0.1"}, str(tmp_path))


def test_sft_config_checkpointing_names(tmp_path, recwarn):
    """Activation checkpointing is off by default (TRL turns it on) without transformers' deprecation warning, and
    the deprecated ``gradient_checkpointing`` spelling of a recipe still turns it on."""
    assert sft_config({}, str(tmp_path)).activation_checkpointing is False
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning) and "checkpointing" in str(w.message)]
    config = sft_config({"gradient_checkpointing": True}, str(tmp_path))
    assert (config.activation_checkpointing, config.gradient_checkpointing) == (True, True)
    assert sft_config({}, str(tmp_path), sft_options={"activation_checkpointing": True}).activation_checkpointing is True
    with pytest.raises(ValueError, match="set one argument twice"):
        sft_config({"gradient_checkpointing": True, "activation_checkpointing": False}, str(tmp_path))


def test_sft_trainer_dense_and_lora_errors(tmp_path, tokenizer):
    from peft import LoraConfig

    data = to_prompt_completion(instruction_mixture(8, seed=0))
    dense = align_special_tokens(build_tiny_model("llama"), tokenizer)
    trainer = build_sft_trainer(dense, tokenizer, data, {"max_steps": 1}, str(tmp_path))
    assert [type(cb).__name__ for cb in trainer.moe_callbacks()] == ["NaNGuardCallback"]
    with pytest.raises(NoMoELayersError, match="moe_aux_loss_coef"):
        build_sft_trainer(dense, tokenizer, data, {"moe_aux_loss_coef": 0.01}, str(tmp_path))
    lora = LoraConfig(r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="with LoRA the adapter targets choose"):
        build_sft_trainer(build_tiny_model("mixtral"), tokenizer, data, {"moe_freeze_strategy": "non_moe"}, str(tmp_path),
                          peft_config=lora)


def test_sft_end_to_end_with_all_callbacks(tmp_path, tokenizer):
    """TRL SFTTrainer + freezing preset + router losses + expert load: keys in the logs, frozen routers unchanged."""
    model = align_special_tokens(build_tiny_model("mixtral"), tokenizer)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    experts_before = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n}
    attention_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    data = to_prompt_completion(instruction_mixture(48, seed=0))
    args = {
        "max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 2,
        "moe_freeze_strategy": "non_moe", "moe_aux_loss_coef": 0.01, "moe_z_loss_coef": 0.001,
        "moe_drift_probe_size": 4,
    }
    from hf_moe_tuning.sft import MoESFTTrainer

    trainer = MoESFTTrainer(model=model, args=sft_config(args, str(tmp_path), seed=0, sft_options={"max_length": 128}),
                            train_dataset=data, processing_class=tokenizer)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2
    last = logs[-1]
    for key in ("lm_loss", "router/aux_loss", "router/z_loss", "router/aux_coef", "router/z_coef",
                "moe/load_cv_mean", "moe/entropy_mean", "moe/layer0/load_cv", "moe/layer1/entropy",
                "moe/dead_experts_total", "freeze/trainable_frac"):
        assert key in last, f"{key} missing from {sorted(last)}"
    assert last["router/aux_coef"] == pytest.approx(0.01)
    assert math.isfinite(last["loss"]) and last["router/aux_loss"] >= 1.0 - 1e-4  # Switch aux loss is >= 1 (balanced)
    assert 0.0 < last["freeze/trainable_frac"] < 1.0
    # non_moe: routers and experts frozen, attention trained
    for name, before in {**routers, **experts_before}.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, attention_before)
    # TRL's own aux loss is off: the router term comes from RouterLossCallback only
    assert trainer.args.router_aux_loss_coef == 0.0 and not trainer.aux_loss_enabled


def test_evaluate_chat_task_scores_and_generates(tokenizer):
    model = align_special_tokens(build_tiny_model("llama"), tokenizer)
    for name in ("multiple_choice", "fusion"):
        task = heldout_task(name, train_size=1, validation_size=1, test_size=4)
        from hf_moe_tuning.data import get_task

        spec = get_task(name)
        result = evaluate_chat_task(model, tokenizer, task["test"], spec.kind, spec.metrics, batch_size=3, max_new_tokens=4)
        assert set(result.metrics) >= set(spec.metrics)
        assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
        assert all(len(result.items[m]) == 4 for m in spec.metrics) and len(result.predictions) == 4


# ---------------------------------------------------------------------------------------------- recipes
def test_recipes_validate_offline_and_pick_the_backend():
    tiny = load_study_config(TINY)
    assert tiny.study == "instruct_moe" and tiny.sft["chat_template"] == "byte"
    assert set(tiny.arms) >= {"dense", "instruct_dense", "moe", "instruct_moe"}
    assert {backend_for(tiny, spec).name for spec in tiny.models.values()} == {CAUSAL}
    flan = load_study_config(ROOT / "recipes" / "flan_moe" / "tiny.yaml")
    assert {backend_for(flan, spec).name for spec in flan.models.values()} == {SEQ2SEQ}
    # matched active compute: dense MLP width = top_k x expert width
    dense = build_tiny_model("llama", **tiny.models["dense"].overrides)
    moe = build_tiny_model("mixtral", **tiny.models["moe"].overrides)
    layer = describe_moe(moe).layers[0]
    assert dense.config.intermediate_size == layer.top_k * moe.config.intermediate_size
    assert validate_training_args(tiny)
    real = load_study_config(REAL)
    checked = validate_training_args(real)
    assert any("olmoe" in line and "experts" in line for line in checked)
    assert real.sft["lora"]["expert_parameters"]


@pytest.mark.parametrize(
    "path, value, match",
    [
        ("sft.output_dir", "x", "sft.output_dir: is set by the pipeline"),
        ("sft.max_lenght", 128, "sft.max_lenght: unknown key"),
        ("sft.chat_template", "jinja", "sft.chat_template: unknown mode"),
        ("sft.lora", {"r": 8, "target_modules": ["q_proj"], "dense_target_modules": ["up_proj"], "expert_parameters": ["mlp.experts.down_proj"], "lora_dropout": 0.1}, None),
        ("arms.moe.args.moe_freeze_strategy", "some", "arms.moe.args.moe_freeze_strategy: unknown freezing strategy"),
        ("study", "flan_mo", "unknown study"),
    ],
)
def test_recipe_errors_name_the_key(path, value, match):
    raw = yaml.safe_load(TINY.read_text())
    set_dotted(raw, path, copy.deepcopy(value))
    if match is None:  # parses; the offline LoRA check catches what PEFT would reject at train time
        config = parse_study_config(raw, TINY)
        with pytest.raises(ConfigError, match="lora_dropout"):
            validate_training_args(config)
        return
    with pytest.raises(ConfigError, match=match):
        parse_study_config(raw, TINY)


# ---------------------------------------------------------------------------------------------- study
@pytest.mark.slow
def test_decoder_study_runs_through_the_one_pipeline(tmp_path):
    from hf_moe_tuning.study import compare

    overrides = {
        "data.tasks": ["passage_yesno"], "data.train_size": 8, "data.validation_size": 4, "data.test_size": 8,
        "data.corpus_size": 64, "data.mixture_size": 64, "pretrain.args.max_steps": 2, "instruct.args.max_steps": 2,
        "finetune.args": {"max_steps": 2, "learning_rate": 1e-3, "per_device_train_batch_size": 4},
        "finetune.early_stopping": {"eval_every": 1, "patience": 2},
        "arms.instruct_moe_0shot": {"model": "moe", "instruct": True, "finetune": False},
    }
    paths = compare(TINY, num_seeds=1, overrides=overrides, output_dir=tmp_path / "out",
                    cache_dir=tmp_path / "cache", progress=False, command="pytest")
    text = paths["md"].read_text()
    assert "Dense − MoE" in text and "(Instruct-MoE − MoE) − (Instruct-Dense − Dense)" in text
    assert "baseline:majority" in text and "95 % CI" in text
    info = json.loads(paths["run"].read_text())
    assert {m["backend"] for m in info["models"].values()} == {CAUSAL}
    assert all(m["mixture_eval_loss"] > 0 for m in info["models"].values())
    rows = [r for r in csv.DictReader(paths["csv"].open()) if r["primary"] == "1" and not r["arm"].startswith("baseline:")]
    assert {r["arm"] for r in rows} == set(yaml.safe_load(TINY.read_text())["arms"]) | {"instruct_moe_0shot"}
    moe_rows = [r for r in rows if r["arm"] == "moe"]
    assert moe_rows[0]["kind"] == "sparse" and int(moe_rows[0]["optimizer_steps"]) == 2
    assert paths["plot"].stat().st_size > 0
