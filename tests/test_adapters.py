"""PEFT LoRA by anatomy group + freezing presets; checkpoint round trips; adapter push checks."""

from __future__ import annotations

import json
import os

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import filter_repo_objects
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, Trainer, TrainingArguments

from hf_moe_tuning import describe_moe
from hf_moe_tuning.adapters import (
    AdapterTargetError,
    apply_lora,
    check_adapter_checkpoint,
    load_lora_model,
    lora_targets,
    merge_adapter,
    plan_lora,
    validate_lora_targets,
)
from hf_moe_tuning.anatomy import ParamGroup
from hf_moe_tuning.hub import build_model_card, load_run, push_run, write_run_info
from hf_moe_tuning.models import build_tiny_model

NON_MOE = [g for g in ParamGroup if g not in (ParamGroup.ROUTER, ParamGroup.EXPERTS)]


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _batch(seq2seq: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (4, 12), generator=g)
    return {"input_ids": ids, "labels": torch.randint(3, 300, (4, 6), generator=g) if seq2seq else ids}


@pytest.mark.parametrize("name,auto", [("switch", AutoModelForSeq2SeqLM), ("mixtral", AutoModelForCausalLM)])
def test_full_checkpoint_round_trip(name, auto, tmp_path):
    model = build_tiny_model(name)
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    if name == "mixtral":  # transformers 5 writes fused experts in the per-expert hub layout ...
        assert any(".experts.0." in k for k in keys) and not any(k.endswith("gate_up_proj") for k in keys)
    reloaded = auto.from_pretrained(tmp_path)  # ... and converts back on load, exactly
    assert _state_equal(model, reloaded)


def test_lora_targets_per_family():
    switch = build_tiny_model("switch")
    targets = lora_targets(switch, ["experts"])
    assert len(targets.target_modules) == 4 * 8 * 2 and not targets.target_parameters
    assert all(m.rsplit(".", 1)[-1] in ("wi", "wo") and ".experts.expert_" in m for m in targets.target_modules)
    attention = lora_targets(switch, ["attention"])
    assert all(m.rsplit(".", 1)[-1] in "qkvo" for m in attention.target_modules)
    assert any("relative_attention_bias" in n for n in attention.skipped)
    mixtral = build_tiny_model("mixtral")
    fused = lora_targets(mixtral, ["experts"])
    assert fused.target_parameters == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")
    )
    assert fused.target_modules == []


def test_lora_non_moe_exact_trainable_set_and_training(tmp_path):
    model = build_tiny_model("switch")
    anatomy = describe_moe(model)
    router_before = {n: model.get_parameter(n).detach().clone() for n in anatomy.params_in(ParamGroup.ROUTER)}
    expert_before = {n: model.get_parameter(n).detach().clone() for n in anatomy.params_in(ParamGroup.EXPERTS)}
    peft_model, report = apply_lora(model, ["experts"], strategy="non_moe", r=2, lora_alpha=4)

    lora = {
        f"base_model.model.{m}.lora_{ab}.default.weight"
        for m in lora_targets(build_tiny_model("switch"), ["experts"]).target_modules
        for ab in "AB"
    }
    full = {
        "base_model.model.{}.modules_to_save.default.{}".format(*n.rsplit(".", 1)) for n in anatomy.params_in(*NON_MOE)
    }
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == lora | full == set(report.trainable_names)
    # per-group report: routers and expert base weights frozen, experts carry adapters, the rest trains in full
    groups = report.groups
    assert groups["router"]["full"] == groups["router"]["adapter"] == 0
    assert groups["experts"]["full"] == 0 and groups["experts"]["adapter"] == 64 * 2 * (64 + 128)
    assert groups["experts"]["adapted_tensors"] == 64
    for g in NON_MOE:
        assert groups[g.value]["full"] == groups[g.value]["total"] and groups[g.value]["adapter"] == 0
    # tied embeddings (shared / encoder / decoder / lm_head) stay one trainable tensor
    inner = peft_model.base_model.model
    tied = {id(m.modules_to_save["default"].weight) for m in (inner.shared, inner.encoder.embed_tokens, inner.decoder.embed_tokens, inner.lm_head)}
    assert len(tied) == 1

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"input_ids": torch.randint(3, 300, (12,), generator=g), "labels": torch.randint(3, 300, (6,), generator=g)}

    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=peft_model, args=args, train_dataset=Rows()).train()
    base = peft_model.get_base_model()
    for n, before in {**router_before, **expert_before}.items():
        path, attr = n.rsplit(".", 1)
        module = base.get_submodule(path)
        module = getattr(module, "base_layer", module)
        assert torch.equal(getattr(module, attr), before), n
    assert inner.shared.modules_to_save["default"].weight is inner.lm_head.modules_to_save["default"].weight
    assert not torch.equal(inner.shared.modules_to_save["default"].weight, inner.shared.original_module.weight)

    # adapter checkpoint round trip: exact outputs and weights
    peft_model.eval()
    batch = _batch(seq2seq=True)
    with torch.no_grad():
        expected = peft_model(**batch).logits
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)
    reloaded = PeftModel.from_pretrained(build_tiny_model("switch"), out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
    retied = load_lora_model(build_tiny_model("switch"), str(out))
    assert retied.base_model.model.shared.modules_to_save["default"].weight is retied.base_model.model.lm_head.modules_to_save["default"].weight
    assert check_adapter_checkpoint(str(out))["target_modules"]


def test_fused_expert_lora_merge_and_round_trip(tmp_path):
    model = build_tiny_model("mixtral")
    peft_model, report = apply_lora(model, ["experts", "attention"], r=2, lora_alpha=4)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == set(report.trainable_names) and all(".lora_" in n for n in trainable)
    assert report.groups["experts"]["adapted_tensors"] == 4 and report.groups["experts"]["full"] == 0
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.eval()
    batch = _batch(seq2seq=False)
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(build_tiny_model("mixtral"), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
        merged = merge_adapter(reloaded)
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    assert _state_equal(merged, AutoModelForCausalLM.from_pretrained(tmp_path / "merged"))


def test_bad_adapter_requests():
    model = build_tiny_model("mixtral")
    with pytest.raises(AdapterTargetError, match=r"'qproj'.*did you mean.*q_proj"):
        validate_lora_targets(model, LoraConfig(target_modules=["q_proj", "qproj"]))
    with pytest.raises(AdapterTargetError, match="target_parameters"):
        validate_lora_targets(model, LoraConfig(target_modules=[], target_parameters=["mlp.experts.w1"]))
    with pytest.raises(AdapterTargetError, match="router"):
        plan_lora(model, ["router"])
    with pytest.raises(AdapterTargetError, match="both LoRA-adapted and trained in full"):
        plan_lora(model, ["experts"], strategy="all")
    with pytest.raises(AdapterTargetError, match="lora_dropout"):
        plan_lora(model, ["experts"], lora_dropout=0.1)
    with pytest.raises(AdapterTargetError, match="dense_ffn.*nothing to adapt"):
        plan_lora(model, ["dense_ffn"])


@pytest.fixture
def adapter_run(tmp_path):
    """A saved switch adapter (LoRA on experts + non_moe) whose base is saved locally."""
    base_dir = tmp_path / "base"
    build_tiny_model("switch").save_pretrained(base_dir)
    peft_model, _ = apply_lora(AutoModelForSeq2SeqLM.from_pretrained(base_dir), ["experts"], strategy="non_moe", r=2)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = tmp_path / "adapter-run"
    peft_model.save_pretrained(out)
    write_run_info(str(out), base_model=str(base_dir), task="reverse")
    return str(out), peft_model


def test_adapter_card(adapter_run):
    out, peft_model = adapter_run
    card = build_model_card(load_run(out))
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft"
    assert {"lora", "freeze-non-moe", "moe", "mixture-of-experts"} <= set(meta["tags"])
    report = peft_model.moe_adapter_report
    assert f"| `experts` | {report.groups['experts']['total']:,} | 0 | {report.groups['experts']['adapter']:,} |" in card.text
    assert f"| `attention` | {report.groups['attention']['total']:,} | {report.groups['attention']['total']:,} | 0 |" in card.text


@pytest.fixture
def hub(monkeypatch):
    calls = []

    def record(name):
        def fn(self, *args, **kwargs):
            if name == "upload_folder":  # the files upload_folder selects, read while the staging folder exists
                kwargs["sent"] = {
                    rel: os.path.join(kwargs["folder_path"], rel)
                    for rel in filter_repo_objects(sorted(os.listdir(kwargs["folder_path"])), allow_patterns=kwargs["allow_patterns"])
                }
                kwargs["merged"] = load_file(kwargs["sent"]["model.safetensors"]) if "model.safetensors" in kwargs["sent"] else None
                kwargs["card"] = open(kwargs["sent"]["README.md"], encoding="utf-8").read()
            calls.append((name, args, kwargs))

        return fn

    for name in ("create_repo", "create_branch", "create_commit", "upload_folder"):
        monkeypatch.setattr(HfApi, name, record(name))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # push_run refuses offline mode; nothing leaves here
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    return calls


def test_push_adapter_and_merged(adapter_run, hub):
    out, peft_model = adapter_run
    push_run(out, "me/switch-lora")
    sent = hub[-1][2]["sent"]
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "run_info.json"} <= set(sent)
    push_run(out, "me/switch-merged", merge_adapter=True)
    commit = hub[-1][2]
    assert "model.safetensors" in commit["sent"] and "adapter_model.safetensors" not in commit["sent"]
    assert ModelCard(commit["card"]).data.library_name == "transformers" and "merge_and_unload" in commit["card"]
    expected = merge_adapter(peft_model).state_dict()
    merged = AutoModelForSeq2SeqLM.from_pretrained(os.path.dirname(out) + "/base")
    merged.load_state_dict(commit["merged"], strict=False)
    assert all(torch.equal(merged.state_dict()[k], expected[k]) for k in expected)


def test_adapter_targeting_missing_names_fails_before_upload(adapter_run, hub):
    out, _ = adapter_run
    path = os.path.join(out, "adapter_config.json")
    config = json.load(open(path, encoding="utf-8"))
    config["target_modules"] = config["target_modules"] + ["encoder.block.1.layer.1.mlp.experts.expert_9.wi"]
    json.dump(config, open(path, "w", encoding="utf-8"))
    with pytest.raises(AdapterTargetError, match="expert_9"):
        push_run(out, "me/switch-lora")
    assert hub == []


# ---------------------------------------------------------------------------------------------- MoETrainer on PEFT
def _train_rows(seq2seq: bool, n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 300, (12,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids[:6] if seq2seq else ids})
    return rows


@pytest.mark.parametrize("name, groups", [("mixtral", ("experts",)), ("switch", ("experts",)), ("qwen2_moe", ("attention",))])
def test_moe_trainer_on_peft_model_keeps_adapter_choice_and_sees_routers(name, groups, tmp_path):
    """MoETrainer's defaults must not retrain the base weights of a LoRA model, and its routing callbacks
    find the routers through the PEFT wrappers (LoRA on fused experts replaces the experts module)."""
    from datasets import Dataset
    from transformers import ByT5Tokenizer, DataCollatorForSeq2Seq

    from hf_moe_tuning import MoETrainer, MoETrainingArguments

    base = build_tiny_model(name)
    base_layers = [(layer.router_path, layer.num_experts, layer.top_k) for layer in describe_moe(base).layers]
    peft_model, _ = apply_lora(base, groups, r=4)
    anatomy = describe_moe(peft_model)
    assert [(layer.router_path, layer.num_experts, layer.top_k) for layer in anatomy.layers] == [
        ("base_model.model." + path, e, k) for path, e, k in base_layers
    ]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    seq2seq = name == "switch"
    args = MoETrainingArguments(
        str(tmp_path), max_steps=2, logging_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no", moe_aux_loss_coef=0.01, moe_drift_every_steps=1, disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(ByT5Tokenizer(), model=base if seq2seq else None, padding=True)
    trainer = MoETrainer(
        model=peft_model, args=args, train_dataset=Dataset.from_list(_train_rows(seq2seq)), data_collator=collator
    )
    trainer.train()
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == trainable
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert "router/aux_loss" in log and "moe/layer0/load_cv" in log and "moe/routing_drift" in log
    assert not any(k.startswith("freeze/") for k in log)  # the adapter, not a freezing plan, chose what trains


def test_freezing_arguments_on_a_peft_model_are_refused(tmp_path):
    from hf_moe_tuning import MoETrainer, MoETrainingArguments
    from hf_moe_tuning.callbacks.freezing import MoEFreezingCallback

    peft_model, _ = apply_lora(build_tiny_model("mixtral"), ("experts",), r=4)
    args = MoETrainingArguments(str(tmp_path / "out"), moe_freeze_strategy="non_moe", report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"apply_lora\(model, groups, strategy='non_moe'\)"):
        MoETrainer(model=peft_model, args=args)
    with pytest.raises(ValueError, match="PEFT model"):
        MoEFreezingCallback("all").freeze(peft_model)
