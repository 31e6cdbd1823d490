"""ST-MoE freezing strategies: exact trainable sets, bitwise-frozen tensors, bad input."""

from __future__ import annotations

import re

import pytest
import torch

from hf_moe_tuning import apply_freezing
from hf_moe_tuning.anatomy import NoMoELayersError
from hf_moe_tuning.freezing import FreezingError, plan_freezing
from hf_moe_tuning.models import build_tiny_model

# Independent, hand-written name rules per family (not the package's classifier): group -> regex.
RULES: dict[str, dict[str, str]] = {
    "switch": {
        "router": r"\.mlp\.router\.classifier\.weight$",
        "experts": r"\.mlp\.experts\.expert_\d+\.(wi|wo)\.weight$",
        "attention": r"\.(SelfAttention|EncDecAttention)\.",
        "dense_ffn": r"\.layer\.\d\.mlp\.(wi|wo)\.weight$",
        "norms": r"layer_norm\.weight$",
        "embeddings": r"^shared\.weight$",
    },
    "mixtral": {
        "router": r"\.mlp\.gate\.weight$",
        "experts": r"\.mlp\.experts\.(gate_up_proj|down_proj)$",
        "attention": r"\.self_attn\.",
        "norms": r"(layernorm|^model\.norm)\.weight$",
        "embeddings": r"embed_tokens",
        "head": r"^lm_head\.",
    },
    "qwen2_moe": {
        "router": r"\.mlp\.gate\.weight$",
        "experts": r"\.mlp\.experts\.(gate_up_proj|down_proj)$",
        "shared_experts": r"\.mlp\.shared_expert(_gate)?\.",
        "attention": r"\.self_attn\.",
        "norms": r"(layernorm|^model\.norm)\.weight$",
        "embeddings": r"embed_tokens",
        "head": r"^lm_head\.",
    },
    "deepseek_v3": {
        # layer 0 is dense: its mlp.gate_proj is a dense FFN weight, not a router
        "router": r"layers\.[12]\.mlp\.gate\.weight$",
        "experts": r"\.mlp\.experts\.(gate_up_proj|down_proj)$",
        "shared_experts": r"\.mlp\.shared_experts\.",
        "dense_ffn": r"layers\.0\.mlp\.(gate|up|down)_proj\.weight$",
        "attention": r"\.self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)\.",
        "norms": r"(layernorm|^model\.norm)\.weight$",
        "embeddings": r"embed_tokens",
        "head": r"^lm_head\.",
    },
    "gpt_oss": {
        "router": r"\.mlp\.router\.(weight|bias)$",
        "experts": r"\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$",
        "attention": r"\.self_attn\.",
        "norms": r"(layernorm|^model\.norm)\.weight$",
        "embeddings": r"embed_tokens",
        "head": r"^lm_head\.",
    },
}

STRATEGY_GROUPS = {
    "all": None,
    "non_moe": lambda g: g not in ("router", "experts"),
    "moe": lambda g: g in ("router", "experts"),
    "attention": lambda g: g == "attention",
    "ffn": lambda g: g == "dense_ffn",
}


def _groups_by_rules(model, family: str) -> dict[str, str]:
    out = {}
    for name, _ in model.named_parameters():
        hits = [g for g, rx in RULES[family].items() if re.search(rx, name)]
        assert len(hits) == 1, f"test rule ambiguity for {name}: {hits}"
        out[name] = hits[0]
    return out


@pytest.mark.parametrize("family", sorted(RULES))
@pytest.mark.parametrize("strategy", sorted(STRATEGY_GROUPS))
def test_exact_trainable_set(family: str, strategy: str) -> None:
    model = build_tiny_model(family)
    groups = _groups_by_rules(model, family)
    keep = STRATEGY_GROUPS[strategy]
    expected = {n for n, g in groups.items() if keep is None or keep(g)}
    if not expected:
        with pytest.raises(FreezingError, match="no dense FFN layer"):
            apply_freezing(model, strategy)
        assert all(p.requires_grad for p in model.parameters()), "a failed request must change nothing"
        return
    report = apply_freezing(model, strategy)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_deepseek_dense_gate_proj_is_not_a_router() -> None:
    model = build_tiny_model("deepseek_v3")
    plan = plan_freezing(model, "moe")
    assert "model.layers.0.mlp.gate_proj.weight" not in plan.trainable
    assert "model.layers.1.mlp.gate.weight" in plan.trainable


def test_modifiers_train_router_and_regexes() -> None:
    model = build_tiny_model("mixtral")
    plan = plan_freezing(model, "non_moe", train_router=True, extra_frozen=[r"embed_tokens"])
    assert "model.layers.0.mlp.gate.weight" in plan.trainable
    assert "model.embed_tokens.weight" not in plan.trainable
    assert "model.layers.0.mlp.experts.gate_up_proj" not in plan.trainable
    plan = plan_freezing(model, "attention", extra_trainable=[r"lm_head"])
    assert plan.trainable == {n for n, _ in model.named_parameters() if ".self_attn." in n} | {"lm_head.weight"}


def test_expert_subset_masks_and_table() -> None:
    model = build_tiny_model("mixtral")
    plan = plan_freezing(model, "moe", experts={0: [1], 1: [0, 3]})
    assert plan.expert_masks["model.layers.0.mlp.experts.gate_up_proj"] == [False, True, False, False]
    assert plan.expert_masks["model.layers.1.mlp.experts.down_proj"] == [True, False, False, True]
    experts = model.model.layers[0].mlp.experts
    per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // 4
    table = plan.group_table()
    assert table["experts"][0] == 3 * per_expert  # expert 1 of layer 0, experts 0 and 3 of layer 1
    assert "trainable experts per MoE layer" in plan.format_table()

    switch = build_tiny_model("switch")
    plan = plan_freezing(switch, "all", experts=[0, 7])
    expert_names = {n for n, _ in switch.named_parameters() if ".experts.expert_" in n}
    assert {n for n in expert_names if n in plan.trainable} == {
        n for n in expert_names if re.search(r"expert_(0|7)\.", n)
    }


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(strategy="frozen_everything"), FreezingError, r"valid strategies: \['all', 'non_moe'"),
        (dict(strategy="moe", experts=[9]), FreezingError, "out of range .* 4 experts"),
        (dict(strategy="moe", experts={5: [0]}), FreezingError, "MoE layer"),
        (dict(strategy="all", extra_trainable=[r"no_such_param"]), FreezingError, "matches no parameter"),
        (dict(strategy="attention", extra_frozen=[r"self_attn"]), FreezingError, "zero trainable"),
        (dict(strategy="non_moe", experts=[0]), FreezingError, "does not train routed experts"),
        (dict(strategy="moe", experts="esft-gate:0.1"), FreezingError, "ESFT spec"),
        (dict(strategy="all", extra_trainable=["(unclosed"]), FreezingError, "invalid"),
    ],
)
def test_bad_requests_change_nothing(kwargs, error, match) -> None:
    model = build_tiny_model("mixtral")
    strategy = kwargs.pop("strategy")
    with pytest.raises(error, match=match):
        apply_freezing(model, strategy, **kwargs)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("strategy", ["moe", "non_moe"])
def test_moe_strategies_on_dense_model(strategy: str) -> None:
    model = build_tiny_model("t5")
    with pytest.raises(NoMoELayersError, match="model_type='t5' has none"):
        apply_freezing(model, strategy)
    with pytest.raises(NoMoELayersError):
        apply_freezing(model, "all", experts=[0])
    apply_freezing(model, "attention")  # fine on dense models


def _train_steps(model, steps: int = 3) -> set[str]:
    """A few AdamW steps with weight decay on random tokens; returns names that received a gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    report = getattr(model, "_test_report", None)
    if report is not None:
        report.slice_freezer.attach(opt)
    got_grad: set[str] = set()
    for _ in range(steps):
        ids = torch.randint(3, 300, (4, 12))
        if model.config.is_encoder_decoder:
            loss = model(input_ids=ids, labels=torch.randint(3, 300, (4, 6))).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        got_grad |= {n for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    return got_grad


@pytest.mark.parametrize("family", ["switch", "mixtral"])
@pytest.mark.parametrize(
    "strategy, experts",
    [("all", "all"), ("non_moe", "all"), ("moe", "all"), ("attention", "all"), ("ffn", "all"), ("moe", [1, 2])],
)
def test_frozen_tensors_bitwise_unchanged(family: str, strategy: str, experts) -> None:
    model = build_tiny_model(family)
    try:
        report = apply_freezing(model, strategy, experts=experts)
    except FreezingError:
        assert family == "mixtral" and strategy == "ffn"
        return
    model._test_report = report
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got_grad = _train_steps(model)
    for name, param in model.named_parameters():
        mask = report.plan.expert_masks.get(name)
        if mask is not None:
            for j, trains in enumerate(mask):
                same = torch.equal(param[j], before[name][j])
                assert same != trains, f"{name}[expert {j}] trains={trains} but unchanged={same}"
        elif name in report.plan.trainable and name in got_grad:  # unrouted experts get no gradient
            assert not torch.equal(param, before[name]), f"trainable {name} did not move"
        elif name not in report.plan.trainable:
            assert name not in got_grad, f"frozen {name} received a gradient"
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    if experts != "all" and family == "mixtral":
        assert report.plan.expert_masks, "fused tensors should be partially frozen"
