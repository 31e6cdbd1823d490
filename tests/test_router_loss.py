"""Router-loss values: our vectorised functions vs a straightforward per-token reference, schedules, validation."""

from __future__ import annotations

import math

import pytest
import torch

from hf_moe_tuning.anatomy import describe_moe
from hf_moe_tuning.models import build_tiny_model
from hf_moe_tuning.router_loss import (
    RoutingSpec,
    aux_loss,
    coefficient_at,
    compute_router_losses,
    routing_spec,
    select_experts,
    validate_coefficient,
    validate_schedule,
    z_loss,
)
from hf_moe_tuning.routing.capture import RouterCapture

SWITCH_SPARSE_1 = dict(num_sparse_encoder_layers=4, num_sparse_decoder_layers=4)  # encoder/decoder_sparse_step = 1


def _batch(model_name: str, batch: int = 3, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids with right padding of different lengths per row, and ignored labels on the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 384, (batch, seq), generator=g)
    lengths = [seq - 2 * i for i in range(batch)]
    attention = torch.zeros(batch, seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        attention[row, :n] = 1
    ids = ids.masked_fill(attention == 0, 0)
    labels = ids.masked_fill(attention == 0, -100)
    if model_name == "switch":
        labels = labels[:, : seq - 1].clone()
        labels[0, -2:] = -100  # decoder padding different from the encoder's
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def _randomize_routers(model: torch.nn.Module) -> None:
    """Spread router weights (DeepSeek-V3 initialises them to 0) and give DeepSeek a correction bias."""
    g = torch.Generator().manual_seed(1)
    anatomy = describe_moe(model)
    with torch.no_grad():
        for layer in anatomy.layers:
            weight = model.get_parameter(layer.router_weight)
            weight.copy_(torch.randn(weight.shape, generator=g) * 0.3)
            router = model.get_submodule(layer.router_path)
            bias = getattr(router, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.05)


def _token_masks(model_name: str, batch: dict, layer) -> list[list[bool]]:
    if model_name == "switch" and layer.stack == "encoder":
        return (batch["attention_mask"] == 1).tolist()
    if model_name == "switch":
        return (batch["labels"] != -100).tolist()
    return ((batch["attention_mask"] == 1) & (batch["labels"] != -100)).tolist()


def _reference(model_name: str, model, batch) -> tuple[list[float], list[float]]:
    """Per-sequence aux and z averaged over MoE layers, with explicit loops over tokens and experts."""
    anatomy = describe_moe(model)
    inputs, chosen = {}, {}
    hooks = []
    for layer in anatomy.layers:
        router = model.get_submodule(layer.router_path)

        def hook(mod, args, output, index=layer.index):
            inputs[index] = args[0].detach().reshape(-1, args[0].shape[-1])
            if isinstance(output, tuple) and len(output) == 3 and not output[2].is_floating_point():
                chosen[index] = output[2].detach()  # the router's own choice (DeepSeek-V3: group-limited, biased)

        hooks.append(router.register_forward_hook(hook))
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()

    num_seq = batch["input_ids"].shape[0]
    aux_per_layer, z_per_layer = [], []
    for layer in anatomy.layers:
        weight = model.get_parameter(layer.router_weight).detach().float()
        bias = model.get_parameter(layer.router_bias).detach().float() if layer.router_bias else None
        x = inputs[layer.index].float()
        masks = _token_masks(model_name, batch, layer)
        seq_len = x.shape[0] // num_seq
        aux_s, z_s = [], []
        for s in range(num_seq):
            counts = [0.0] * layer.num_experts
            prob_sums = [0.0] * layer.num_experts
            z_sum, n = 0.0, 0
            for t in range(seq_len):
                if not masks[s][t]:
                    continue
                row = s * seq_len + t
                logits = [float(torch.dot(weight[e], x[row])) + (float(bias[e]) if bias is not None else 0.0)
                          for e in range(layer.num_experts)]
                m = max(logits)
                lse = m + math.log(sum(math.exp(v - m) for v in logits))
                z_sum += lse**2
                if layer.scoring == "sigmoid":
                    scores = [1.0 / (1.0 + math.exp(-v)) for v in logits]
                    probs = [v / sum(scores) for v in scores]
                    top = chosen[layer.index][row].tolist()
                else:
                    probs = [math.exp(v - lse) for v in logits]
                    top = sorted(range(layer.num_experts), key=lambda e: -probs[e])[: layer.top_k]
                for e in range(layer.num_experts):
                    prob_sums[e] += probs[e]
                for e in top:
                    counts[e] += 1.0
                n += 1
            if n == 0:
                aux_s.append(0.0)
                z_s.append(0.0)
                continue
            f = [c / (layer.top_k * n) for c in counts]
            p = [v / n for v in prob_sums]
            aux_s.append(layer.num_experts * sum(fi * pi for fi, pi in zip(f, p)))
            z_s.append(z_sum / n)
        aux_per_layer.append(aux_s)
        z_per_layer.append(z_s)
    n_layers = len(anatomy.layers)
    aux = [sum(layer[s] for layer in aux_per_layer) / n_layers for s in range(num_seq)]
    z = [sum(layer[s] for layer in z_per_layer) / n_layers for s in range(num_seq)]
    return aux, z


def _ours(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    anatomy = describe_moe(model)
    specs = {layer.index: routing_spec(model, layer) for layer in anatomy.layers}
    capture = RouterCapture.acquire(model, anatomy)
    try:
        with torch.no_grad():
            model(**batch)
        losses = compute_router_losses(capture.layer_items(), specs, batch["input_ids"].shape[0])
    finally:
        capture.release()
    assert not capture.attached
    return losses.aux, losses.z


@pytest.mark.parametrize("name", ["switch", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_values_match_per_token_reference_with_padding(name):
    overrides = SWITCH_SPARSE_1 if name == "switch" else {}
    model = build_tiny_model(name, **overrides).eval()
    _randomize_routers(model)
    batch = _batch(name)
    ref_aux, ref_z = _reference(name, model, batch)
    aux, z = _ours(model, batch)
    torch.testing.assert_close(aux, torch.tensor(ref_aux), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z, torch.tensor(ref_z), rtol=1e-4, atol=1e-5)
    assert all(v > 0 for v in ref_aux)


def test_switch_sparse_step_1_gives_nonzero_aux_on_every_layer():
    model = build_tiny_model("switch", **SWITCH_SPARSE_1).eval()
    assert model.config.encoder_sparse_step == 1 and model.config.decoder_sparse_step == 1
    anatomy = describe_moe(model)
    assert len(anatomy.layers) == 8  # every encoder and decoder block is an MoE block
    specs = {layer.index: routing_spec(model, layer) for layer in anatomy.layers}
    batch = _batch("switch")
    capture = RouterCapture.acquire(model, anatomy)
    with torch.no_grad():
        model(**batch)
    losses = compute_router_losses(capture.layer_items(), specs, 3)
    capture.release()
    assert set(losses.layer_aux) == set(range(8))
    assert all(float(v.min()) > 0.5 for v in losses.layer_aux.values())  # balanced = 1, never near 0
    assert float(losses.aux.mean()) > 0.5


def test_padding_changes_nothing_but_padded_rows():
    """Appending padding to a sequence leaves its losses unchanged."""
    model = build_tiny_model("mixtral").eval()
    batch = _batch("mixtral", batch=2, seq=6)
    padded = {k: torch.cat([v, torch.full((2, 3), 0 if k != "labels" else -100)], dim=1) for k, v in batch.items()}
    aux, z = _ours(model, batch)
    aux_p, z_p = _ours(model, padded)
    torch.testing.assert_close(aux, aux_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z, z_p, rtol=1e-5, atol=1e-6)


def test_balanced_and_collapsed_extremes():
    spec = RoutingSpec(num_experts=4, top_k=2)
    # 4 tokens, each expert chosen exactly twice with uniform probabilities -> exactly 1
    balanced = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]] * 2) * 1e-6
    assert float(aux_loss(balanced, spec)) == pytest.approx(1.0, rel=1e-4)
    collapsed = torch.tensor([[30.0, 30.0, -30.0, -30.0]] * 4)
    assert float(aux_loss(collapsed, spec)) == pytest.approx(2.0, rel=1e-4)  # E·(½·½ + ½·½)
    top1 = RoutingSpec(num_experts=4, top_k=1)
    assert float(aux_loss(torch.tensor([[40.0, 0.0, 0.0, 0.0]] * 3), top1)) == pytest.approx(4.0, rel=1e-4)
    assert float(z_loss(torch.zeros(5, 4))) == pytest.approx(math.log(4) ** 2, rel=1e-6)


def test_relation_to_transformers_load_balancing_loss_func():
    """On one layer and one group, transformers' top-k-scaled convention is k times ours."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    spec = RoutingSpec(num_experts=4, top_k=2)
    theirs = load_balancing_loss_func((logits,), num_experts=4, top_k=2)
    assert float(theirs) == pytest.approx(2 * float(aux_loss(logits, spec)), rel=1e-5)


def test_sigmoid_selection_matches_deepseek_router():
    model = build_tiny_model("deepseek_v3").eval()
    _randomize_routers(model)
    layer = describe_moe(model).layers[0]
    router = model.get_submodule(layer.router_path)
    hidden = torch.randn(20, model.config.hidden_size)
    logits, _, indices = router(hidden)
    ours = select_experts(logits, routing_spec(model, layer))
    assert routing_spec(model, layer).num_group == model.config.n_group
    assert torch.equal(ours.sort(-1).values, indices.sort(-1).values)


def test_schedules():
    assert coefficient_at(5, 0.01, "constant") == 0.01
    assert coefficient_at(5, 0.01, "off") == 0.0
    assert coefficient_at(0, 0.01, "linear_warmup", warmup_steps=10) == 0.0
    assert coefficient_at(5, 0.01, "linear_warmup", warmup_steps=10) == pytest.approx(0.005)
    assert coefficient_at(50, 0.01, "linear_warmup", warmup_steps=10) == 0.01
    assert coefficient_at(10, 0.01, "cosine", warmup_steps=10, total_steps=110) == pytest.approx(0.01)
    assert coefficient_at(60, 0.01, "cosine", warmup_steps=10, total_steps=110) == pytest.approx(0.005)
    assert coefficient_at(110, 0.01, "cosine", warmup_steps=10, total_steps=110) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="max_steps"):
        coefficient_at(3, 0.01, "cosine")


@pytest.mark.parametrize("bad", [-0.1, "0.01", None, float("nan"), float("inf"), True])
def test_bad_coefficients(bad):
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        validate_coefficient("router_aux_loss_coef", bad)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="'linear'.*constant"):
        validate_schedule("router_z_loss_schedule", "linear")
    with pytest.raises(ValueError, match="one of"):
        coefficient_at(1, 0.1, "exponential")
