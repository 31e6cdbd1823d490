"""Expert-level controls: fused expert subsets (memory), expert dropout, capacity, jitter, bias balancing, presets."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_moe_tuning import MoETrainer, MoETrainingArguments, apply_freezing
from hf_moe_tuning.anatomy import NoMoELayersError
from hf_moe_tuning.callbacks.bias_balancing import BiasBalancingCallback
from hf_moe_tuning.callbacks.capacity import CapacityFactorCallback
from hf_moe_tuning.callbacks.expert_dropout import ExpertDropoutCallback
from hf_moe_tuning.callbacks.router_jitter import RouterJitterCallback
from hf_moe_tuning.metrics.expert_load import max_violation
from hf_moe_tuning.models import build_tiny_model
from hf_moe_tuning.presets import accumulation_steps_for, apply_hparam_preset, get_preset
from hf_moe_tuning.routing.bias_balancing import BiasBalancer, sign_bias_update
from hf_moe_tuning.routing.capacity import apply_capacity_factors, expert_capacity
from hf_moe_tuning.routing.expert_dropout import apply_expert_dropout
from hf_moe_tuning.routing.jitter import set_router_jitter

SUBSET = {0: [1], 1: [0, 3]}


def _lm_batch(seed: int = 0, batch: int = 4, length: int = 12, vocab: int = 300):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "labels": ids}


# ----------------------------------------------------------------------------------------- fused subsets
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "dbrx"])  # dbrx: experts as 2-D blocks of rows
def test_fused_subset_frozen_slices_bitwise_and_optimizer_state(family: str) -> None:
    model = build_tiny_model(family)
    report = apply_freezing(model, "moe", train_router=False, experts=SUBSET)
    fused = {n: p for n, p in model.named_parameters() if n in report.plan.expert_masks}
    assert fused and all(not p.requires_grad for p in fused.values())
    before = {n: p.detach().clone() for n, p in fused.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
    report.slice_freezer.attach(opt)
    for step in range(3):
        model(**_lm_batch(step, vocab=min(300, model.config.vocab_size))).loss.backward()
        assert all(p.grad is None for p in fused.values()), "frozen fused tensors must get no gradient"
        opt.step()
        opt.zero_grad()
    for name, param in fused.items():
        mask = report.plan.expert_masks[name]
        rows = param.shape[0] // len(mask)  # 1 for [E, ...] tensors; the block height for DBRX's [E * I, H]
        for j, trains in enumerate(mask):
            unchanged = torch.equal(param[j * rows : (j + 1) * rows], before[name][j * rows : (j + 1) * rows])
            assert unchanged != trains, f"{name}[{j}] trains={trains} unchanged={unchanged}"
    # optimizer state exists only for the selected slices
    state_numel = sum(s["exp_avg"].numel() for s in opt.state.values())
    selected = sum(report.plan.trainable_numel(n) for n in fused)
    assert state_numel == selected == report.plan.trainable_params
    assert state_numel < 0.6 * sum(p.numel() for p in fused.values())


def test_fused_subset_checkpoint_is_ordinary_and_resumes(tmp_path) -> None:
    """MoETrainer with a fused subset: checkpoints hold only ordinary keys; resume == uninterrupted run."""
    from datasets import Dataset

    rows = [{k: v[0].tolist() for k, v in _lm_batch(i, batch=1, length=10).items()} for i in range(32)]
    ds = Dataset.from_list(rows)

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    def run(out, stop=False, resume=None):
        model = build_tiny_model("mixtral", seed=1)
        args = MoETrainingArguments(
            output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1,
            save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
            moe_freeze_strategy="moe", moe_train_router=False, moe_experts=json.dumps({str(k): v for k, v in SUBSET.items()}),
        )
        # transformers 5 saves fused experts per expert; MoETrainer reloads them exactly on resume
        trainer = MoETrainer(model=model, args=args, train_dataset=ds, callbacks=[StopAt()] if stop else None)
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full")
    run(tmp_path / "part", stop=True)
    ckpt = tmp_path / "part" / "checkpoint-2"
    keys = set(load_file(os.path.join(ckpt, "model.safetensors")))
    assert not any("expert_subset" in k for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(str(ckpt))
    assert not any("expert_subset" in n for n, _ in reloaded.named_parameters())
    resumed = run(tmp_path / "part", resume=str(ckpt))
    full_sd, resumed_sd = full.state_dict(), resumed.state_dict()
    assert set(full_sd) == set(resumed_sd)
    for name in full_sd:
        assert torch.allclose(full_sd[name], resumed_sd[name], atol=1e-6), name
    start = build_tiny_model("mixtral", seed=1).state_dict()
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(full_sd[gate_up][0], start[gate_up][0]) and not torch.equal(full_sd[gate_up][1], start[gate_up][1])


# ----------------------------------------------------------------------------------------- expert dropout
def test_expert_dropout_inside_experts_only_and_off_at_eval() -> None:
    model = build_tiny_model("switch")
    reference = build_tiny_model("switch")
    handle = apply_expert_dropout(model, 0.4)
    inside = [m for m, _ in handle.dropout_modules]
    assert len(inside) == 8 * 4 and all(m.p == 0.4 for m in inside)
    assert all(m.p == 0.0 for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and ".experts." not in n)
    batch = {"input_ids": torch.randint(3, 300, (2, 10)), "labels": torch.randint(3, 300, (2, 6))}
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, reference(**batch).logits)
    handle.remove()
    assert all(m.p == 0.0 for m in inside)


def test_expert_dropout_on_fused_experts_and_bad_rates() -> None:
    model = build_tiny_model("mixtral")
    reference = build_tiny_model("mixtral")
    handle = apply_expert_dropout(model, 0.3)
    assert handle.num_hooks == 2
    batch = _lm_batch()
    with torch.no_grad():
        model.eval(), reference.eval()
        assert torch.equal(model(**batch).logits, reference(**batch).logits)
        model.train()
        assert not torch.equal(model(**batch).logits, reference(**batch).logits)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            apply_expert_dropout(build_tiny_model("mixtral"), bad)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ExpertDropoutCallback(1.0)
    with pytest.raises(NoMoELayersError):
        apply_expert_dropout(build_tiny_model("t5"), 0.4)


# ----------------------------------------------------------------------------------------- capacity
def test_capacity_factor_switch_train_and_eval() -> None:
    assert expert_capacity(16, 8, 1, 1.25) == 3 and expert_capacity(16, 8, 1, 2.0) == 4
    assert expert_capacity(10, 4, 2, 1.0) == 5 and expert_capacity(0, 4, 1, 1.0) == 1
    model = build_tiny_model("switch")
    control = apply_capacity_factors(model, 1.0, 2.0)
    router = model.encoder.block[1].layer[1].mlp.router
    batch = {"input_ids": torch.randint(3, 300, (2, 16)), "labels": torch.randint(3, 300, (2, 8))}
    model.train()
    model(**batch)
    assert router.expert_capacity == 2  # ceil(1.0 * 16 / 8) per sequence
    model.eval()
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    assert router.expert_capacity == 4
    # with capacity 4 per sequence of 16 tokens at most 8*4 tokens route; the model still runs
    assert out.logits.shape[:2] == (2, 8)
    control.remove()
    assert router.expert_capacity == 64


def test_capacity_factor_rejects_dropless_families() -> None:
    with pytest.raises(ValueError, match="Switch Transformers.*NLLB-MoE"):
        apply_capacity_factors(build_tiny_model("mixtral"), 1.25, 2.0)
    with pytest.raises(ValueError, match="> 0"):
        CapacityFactorCallback(0.0, None)


def test_capacity_factor_nllb_moe_eval() -> None:
    model = build_tiny_model("nllb-moe")
    apply_capacity_factors(model, None, 2.0)
    model.eval()
    ids = torch.randint(3, 100, (2, 10))
    with torch.no_grad():
        model(input_ids=ids, decoder_input_ids=ids[:, :5])
    routers = [m for n, m in model.named_modules() if n.endswith("ffn.router")]
    assert routers and all(r.moe_eval_capacity_token_fraction == 0.0 for r in routers)
    # encoder routers see 20 tokens, top-2 of 4 experts: ceil(2.0 * 20 * 2 / 4) = 20
    assert any(r.expert_capacity == 20 for r in routers)


# ----------------------------------------------------------------------------------------- jitter
def test_router_jitter_where_supported() -> None:
    switch = build_tiny_model("switch")
    handle = set_router_jitter(switch, 0.01)
    assert switch.encoder.block[1].layer[1].mlp.router.jitter_noise == 0.01
    assert switch.config.router_jitter_noise == 0.01
    handle.remove()
    assert switch.encoder.block[1].layer[1].mlp.router.jitter_noise == 0.0
    mixtral = build_tiny_model("mixtral")
    set_router_jitter(mixtral, 0.02)
    assert mixtral.model.layers[0].mlp.jitter_noise == 0.02
    with pytest.raises(ValueError, match="no router jitter.*Switch Transformers, Mixtral"):
        set_router_jitter(build_tiny_model("qwen2_moe"), 0.01)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        RouterJitterCallback(1.0)


# ----------------------------------------------------------------------------------------- bias balancing
def test_sign_bias_update() -> None:
    bias = torch.zeros(4)
    new = sign_bias_update(bias, torch.tensor([10, 2, 4, 4]), 0.1)
    assert torch.allclose(new, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert torch.allclose(sign_bias_update(new, torch.tensor([5, 5, 5, 5]), 0.1), new)


def _imbalance_router(model) -> None:
    """Push every token towards expert 0 of each MoE layer: add the mean router input direction to its row."""
    inputs = {}
    handles = [
        layer.mlp.gate.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
        for i, layer in enumerate(model.model.layers)
        if hasattr(layer.mlp, "gate")
    ]
    with torch.no_grad():
        model(**{k: torch.cat([_lm_batch(s, batch=8, length=32)[k] for s in range(4)]) for k in ("input_ids", "labels")})
        for i, layer in enumerate(model.model.layers):
            if i in inputs:
                d = inputs[i].mean(0)
                layer.mlp.gate.weight[0] += 3.0 * d / d.norm() ** 2
    for h in handles:
        h.remove()


def _mean_max_violation(balancer: BiasBalancer, model, steps: int, update: bool) -> list[float]:
    values = []
    model.train()
    for _step in range(steps):
        with torch.no_grad():
            model(**_lm_batch(0, batch=8, length=32))
        counts = [s.counts.clone() for s in balancer.layers]
        values.append(sum(max_violation(c) for c in counts) / len(counts))
        if update:
            balancer.step()
        else:
            balancer.reset_counts()
    return values


def test_bias_balancing_lowers_max_violation_topk_hook() -> None:
    model = build_tiny_model("mixtral")
    _imbalance_router(model)
    balancer = BiasBalancer(model, rate=0.1)  # logit units for the top-k hook
    assert {s.mode for s in balancer.layers} == {"topk"}
    before = sum(_mean_max_violation(balancer, model, 2, update=False)) / 2
    during = _mean_max_violation(balancer, model, 30, update=True)
    after = sum(during[-10:]) / 10
    assert before > 0.5
    assert after < 0.6 * before, (before, during[-10:])


def test_bias_balancing_updates_deepseek_correction_bias() -> None:
    model = build_tiny_model("deepseek_v3")
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        for gate in gates:  # a constructed imbalance: the correction bias favours expert 0 strongly
            gate.e_score_correction_bias.copy_(torch.tensor([0.3, 0.0, 0.0, 0.0]))
    balancer = BiasBalancer(model, rate=0.01)
    assert {s.mode for s in balancer.layers} == {"correction"}
    before = sum(_mean_max_violation(balancer, model, 2, update=False)) / 2
    during = _mean_max_violation(balancer, model, 40, update=True)
    assert sum(during[-10:]) / 10 < 0.6 * before
    assert all(float(g.e_score_correction_bias[0]) < 0.3 for g in gates)
    balancer.remove()


def test_bias_balancing_callback_in_trainer_logs(tmp_path) -> None:
    from datasets import Dataset

    rows = [{k: v[0].tolist() for k, v in _lm_batch(i, batch=1, length=10).items()} for i in range(16)]
    args = MoETrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, moe_bias_balancing=True, moe_bias_update_rate=0.01,
        moe_expert_dropout=0.1, moe_router_jitter=0.01,
    )
    assert CapacityFactorCallback.from_args(args) is None
    # MoETrainer builds the controls from the arguments
    trainer = MoETrainer(model=build_tiny_model("mixtral"), args=args, train_dataset=Dataset.from_list(rows))
    kinds = {type(c) for c in trainer.callback_handler.callbacks}
    assert {BiasBalancingCallback, ExpertDropoutCallback, RouterJitterCallback} <= kinds
    assert CapacityFactorCallback not in kinds
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, BiasBalancingCallback))
    trainer.train()
    logged = [r for r in trainer.state.log_history if "moe/bias_max_violation_mean" in r]
    assert len(logged) == 3 and all("moe/layer0/bias_max_violation" in r for r in logged)
    assert any(r.get("moe/expert_dropout") == 0.1 for r in trainer.state.log_history)
    assert cb.state()["attributes"]["hook_biases"]["0"] != [0.0] * 4


# ----------------------------------------------------------------------------------------- presets
def test_hparam_presets(tmp_path) -> None:
    args = MoETrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, moe_hparam_preset="sparse", report_to=[])
    model = build_tiny_model("switch")
    preset = apply_hparam_preset(args, model, seq_len=512)
    assert preset.name == "sparse" and args.learning_rate == 1e-3 and args.moe_expert_dropout == 0.4
    assert args.gradient_accumulation_steps == accumulation_steps_for(65_536, 8, 512) == 16
    assert model.config.dropout_rate == 0.1
    assert all(m.p == 0.1 for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and ".experts." not in n)
    assert all(m.p == 0.0 for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and ".experts." in n)
    dense = MoETrainingArguments(output_dir=str(tmp_path), moe_hparam_preset="dense", report_to=[])
    apply_hparam_preset(dense)
    assert dense.learning_rate == 1e-4 and dense.moe_expert_dropout == 0.0
    assert get_preset("none") is None
    with pytest.raises(ValueError, match="unknown hyperparameter preset"):
        get_preset("medium")
