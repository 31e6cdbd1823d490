"""Exact anatomy of the embedded tiny models, the table format, structural detection and errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_moe_tuning.anatomy import (
    DEFAULT_FAMILY,
    MOE_FAMILIES,
    NoMoELayersError,
    ParamGroup,
    UnclassifiedParameterError,
    describe_moe,
    find_moe_layers,
    require_moe,
)
from hf_moe_tuning.models import build_tiny_model

G = ParamGroup


@pytest.fixture(scope="module")
def tiny():
    """Tiny models and their anatomies, built once per module."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            model = build_tiny_model(name)
            cache[name] = (model, describe_moe(model))
        return cache[name]

    return get


def in_group(anatomy, group: ParamGroup, prefix: str) -> set[str]:
    return {n for n in anatomy.params_in(group) if n.startswith(prefix)}


# ----------------------------------------------------------------------------------------------- Switch


def test_switch_layers_stacks_and_routing(tiny):
    model, anatomy = tiny("switch")
    assert [(layer.path, layer.stack) for layer in anatomy.layers] == [
        ("encoder.block.1.layer.1.mlp", "encoder"),
        ("encoder.block.3.layer.1.mlp", "encoder"),
        ("decoder.block.1.layer.2.mlp", "decoder"),
        ("decoder.block.3.layer.2.mlp", "decoder"),
    ]
    for i, layer in enumerate(anatomy.layers):
        assert layer.index == i
        assert (layer.num_experts, layer.top_k, layer.router_outputs) == (8, 1, 8)
        assert layer.capacity and layer.scoring == "softmax"
        assert layer.router_path == f"{layer.path}.router.classifier"
        assert layer.router_weight == f"{layer.path}.router.classifier.weight" and layer.router_bias is None
        assert layer.expert_paths == [f"{layer.path}.experts"] and layer.shared_paths == []
        assert layer.fused_experts == {}


def test_switch_exact_groups_of_one_layer(tiny):
    model, anatomy = tiny("switch")
    p = "encoder.block.1.layer.1.mlp"
    experts = {f"{p}.experts.expert_{j}.{w}.weight" for j in range(8) for w in ("wi", "wo")}
    assert in_group(anatomy, G.ROUTER, p) == {f"{p}.router.classifier.weight"}
    assert in_group(anatomy, G.EXPERTS, p) == experts
    assert anatomy.layers[0].per_expert == {
        f"{p}.experts.expert_{j}.{w}.weight": j for j in range(8) for w in ("wi", "wo")
    }
    # the dense layers in between keep their FFN in dense_ffn; norms, attention, shared embedding
    assert in_group(anatomy, G.DENSE_FFN, "encoder.block.0.") == {
        "encoder.block.0.layer.1.mlp.wi.weight",
        "encoder.block.0.layer.1.mlp.wo.weight",
    }
    assert anatomy.groups["encoder.block.1.layer.1.layer_norm.weight"] is G.NORMS
    assert anatomy.groups["decoder.block.1.layer.1.EncDecAttention.q.weight"] is G.ATTENTION
    assert anatomy.params_in(G.EMBEDDINGS) == {"shared.weight"}  # lm_head is tied to it
    assert anatomy.params_in(G.SHARED_EXPERTS) == set()


def test_switch_group_counts_follow_from_config(tiny):
    model, anatomy = tiny("switch")
    c = model.config
    counts = anatomy.group_counts()
    n_moe = 4
    assert counts[G.ROUTER] == n_moe * c.num_experts * c.d_model
    assert counts[G.EXPERTS] == n_moe * c.num_experts * 2 * c.d_model * c.d_ff
    assert counts[G.DENSE_FFN] == 4 * 2 * c.d_model * c.d_ff  # blocks 0 and 2 of each stack
    assert sum(counts.values()) == anatomy.total_params == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------- decoder MoEs


def test_mixtral_exact_groups(tiny):
    model, anatomy = tiny("mixtral")
    assert [layer.path for layer in anatomy.layers] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    layer = anatomy.layers[0]
    p = "model.layers.0.mlp"
    assert (layer.num_experts, layer.top_k, layer.router_bias, layer.stack) == (4, 2, None, None)
    assert in_group(anatomy, G.ROUTER, p) == {f"{p}.gate.weight"}
    assert layer.fused_experts == {f"{p}.experts.gate_up_proj": 0, f"{p}.experts.down_proj": 0}
    assert in_group(anatomy, G.EXPERTS, p) == set(layer.fused_experts)
    assert layer.per_expert == {} and layer.shared_paths == []
    assert tuple(model.get_parameter(f"{p}.experts.gate_up_proj").shape) == (4, 2 * 128, 64)
    assert anatomy.params_in(G.HEAD) == {"lm_head.weight"}
    assert anatomy.params_in(G.DENSE_FFN) == set()


def test_qwen2_moe_shared_expert_and_its_gate(tiny):
    model, anatomy = tiny("qwen2_moe")
    p = "model.layers.0.mlp"
    layer = anatomy.layers[0]
    assert layer.shared_paths == [f"{p}.shared_expert", f"{p}.shared_expert_gate"]
    assert in_group(anatomy, G.SHARED_EXPERTS, p) == {
        f"{p}.shared_expert.gate_proj.weight",
        f"{p}.shared_expert.up_proj.weight",
        f"{p}.shared_expert.down_proj.weight",
        f"{p}.shared_expert_gate.weight",
    }
    assert in_group(anatomy, G.ROUTER, p) == {f"{p}.gate.weight"}
    assert in_group(anatomy, G.EXPERTS, p) == {f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj"}
    assert (layer.num_experts, layer.top_k) == (4, 2)


def test_deepseek_v3_dense_first_layer_is_not_a_router(tiny):
    model, anatomy = tiny("deepseek_v3")
    assert [layer.path for layer in anatomy.layers] == ["model.layers.1.mlp", "model.layers.2.mlp"]
    # trap: the dense layer's gate_proj is an FFN weight, not a router
    assert in_group(anatomy, G.DENSE_FFN, "model.layers.0.") == {
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    }
    assert not in_group(anatomy, G.ROUTER, "model.layers.0.")
    p = "model.layers.1.mlp"
    layer = anatomy.layers[0]
    assert (layer.num_experts, layer.top_k, layer.scoring) == (4, 2, "sigmoid")
    assert in_group(anatomy, G.ROUTER, p) == {f"{p}.gate.weight"}
    assert in_group(anatomy, G.SHARED_EXPERTS, p) == {
        f"{p}.shared_experts.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")
    }
    assert layer.fused_experts == {f"{p}.experts.gate_up_proj": 0, f"{p}.experts.down_proj": 0}
    assert anatomy.groups["model.layers.1.self_attn.kv_a_layernorm.weight"] is G.NORMS
    assert anatomy.groups["model.layers.1.self_attn.kv_b_proj.weight"] is G.ATTENTION


def test_gpt_oss_transposed_experts_with_biases(tiny):
    model, anatomy = tiny("gpt_oss")
    p = "model.layers.0.mlp"
    layer = anatomy.layers[0]
    assert layer.router_path == f"{p}.router"
    assert (layer.router_weight, layer.router_bias) == (f"{p}.router.weight", f"{p}.router.bias")
    assert in_group(anatomy, G.ROUTER, p) == {f"{p}.router.weight", f"{p}.router.bias"}
    fused = {f"{p}.experts.{n}": 0 for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}
    assert layer.fused_experts == fused
    assert in_group(anatomy, G.EXPERTS, p) == set(fused)
    c = model.config
    # transposed: [E, hidden, 2 * intermediate] and [E, intermediate, hidden]
    assert tuple(model.get_parameter(f"{p}.experts.gate_up_proj").shape) == (4, c.hidden_size, 2 * c.intermediate_size)
    assert tuple(model.get_parameter(f"{p}.experts.down_proj").shape) == (4, c.intermediate_size, c.hidden_size)
    assert anatomy.groups["model.layers.0.self_attn.sinks"] is G.ATTENTION


def test_t5_is_dense(tiny):
    model, anatomy = tiny("t5")
    assert anatomy.layers == [] and not anatomy.is_moe
    assert in_group(anatomy, G.DENSE_FFN, "encoder.block.0.") == {
        "encoder.block.0.layer.1.DenseReluDense.wi.weight",
        "encoder.block.0.layer.1.DenseReluDense.wo.weight",
    }
    counts = anatomy.group_counts()
    assert counts[G.ROUTER] == counts[G.EXPERTS] == counts[G.SHARED_EXPERTS] == 0
    with pytest.raises(NoMoELayersError, match="expert load logging.*model_type='t5'.*MOE_FAMILIES"):
        require_moe(anatomy, "expert load logging")


# ------------------------------------------------------------------------------------------- table


def test_format_table(tiny):
    model, anatomy = tiny("switch")
    lines = anatomy.format_table().splitlines()
    assert lines[0].split() == ["group", "params", "share"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:-1]}
    assert list(rows) == [g.value for g in ParamGroup] + ["total"]
    counts = anatomy.group_counts()
    total = anatomy.total_params
    for group in ParamGroup:
        params, share = rows[group.value]
        assert int(params.replace(",", "")) == counts[group]
        assert share == f"{100 * counts[group] / total:.2f}%"
    assert rows["total"] == [f"{total:,}", "100.00%"]
    assert lines[-1] == "MoE layers: 4 (e.g. encoder.block.1.layer.1.mlp: 8 experts, top-1)"
    assert tiny("t5")[1].format_table().splitlines()[-1] == "MoE layers: 0 (dense model)"


# ---------------------------------------------------------------------------------- family traps


def test_jetmoe_mixture_of_attention_is_not_an_moe_layer(tiny):
    model, anatomy = tiny("jetmoe")
    assert [layer.path for layer in anatomy.layers] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    moa = {n for n in anatomy.groups if ".self_attention.experts." in n}
    assert moa and all(anatomy.groups[n] is G.ATTENTION for n in moa)
    assert anatomy.groups["model.layers.0.mlp.bias"] is G.EXPERTS  # expert-output bias of the MoE block
    assert anatomy.groups["model.layers.0.mlp.router.layer.weight"] is G.ROUTER


def test_mlp_router_is_one_router_group(tiny):
    """Zaya routes with an MLP on its own stream: all of it is router, the last of E + 1 rows is a skip expert."""
    model, anatomy = tiny("zaya")
    layer = anatomy.layers[1]
    p = layer.path
    assert layer.router_path == f"{p}.gate.router_mlp.out_proj"
    assert (layer.num_experts, layer.router_outputs) == (4, 5)
    router = {n for n in anatomy.groups if n.startswith(f"{p}.gate.")}
    assert f"{p}.gate.down_proj.weight" in router and f"{p}.gate.router_states_scale" in router
    assert all(anatomy.groups[n] is G.ROUTER for n in router)  # incl. the router MLP's own norm


def test_dbrx_two_dimensional_expert_blocks(tiny):
    model, anatomy = tiny("dbrx")
    layer = anatomy.layers[0]
    assert layer.num_experts == model.config.ffn_config.moe_num_experts
    assert layer.top_k == model.config.ffn_config.moe_top_k
    for name, axis in layer.fused_experts.items():
        assert axis == 0
        assert model.get_parameter(name).shape[0] == layer.num_experts * model.config.ffn_config.ffn_hidden_size
    assert layer.router_path.endswith("ffn.router.layer")


def test_doge_product_key_experts(tiny):
    model, anatomy = tiny("doge")
    layer = anatomy.layers[0]
    p = layer.path
    assert (layer.scoring, layer.num_experts, layer.router_outputs) == ("product_key", 16, 8)
    assert set(layer.fused_experts) == {f"{p}.down_embed.weight", f"{p}.up_embed.weight"}
    assert in_group(anatomy, G.SHARED_EXPERTS, p) == {f"{p}.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")}
    assert anatomy.groups[f"{p}.down_embed.weight"] is G.EXPERTS  # not embeddings


def test_gemma4_moe_on_the_decoder_layer(tiny):
    model, anatomy = tiny("gemma4_text")
    layer = anatomy.layers[0]
    p = layer.path
    assert p == "model.layers.0" and layer.router_path == f"{p}.router.proj"
    assert layer.shared_paths == [f"{p}.mlp"]
    assert in_group(anatomy, G.ROUTER, p) == {f"{p}.router.{n}" for n in ("proj.weight", "scale", "per_expert_scale")}
    assert anatomy.groups[f"{p}.self_attn.q_proj.weight"] is G.ATTENTION  # the block is a whole layer
    assert anatomy.groups[f"{p}.post_feedforward_layernorm_2.weight"] is G.NORMS


def test_scoring_from_table_and_config():
    assert describe_moe(build_tiny_model("deepseek_v3")).layers[0].scoring == "sigmoid"
    assert describe_moe(build_tiny_model("mixtral")).layers[0].scoring == "softmax"
    # Cohere2-MoE picks its scoring function in the config
    for fn in ("softmax", "sigmoid"):
        anatomy = describe_moe(build_tiny_model("cohere2_moe", expert_selection_fn=fn))
        assert {layer.scoring for layer in anatomy.layers} == {fn}


# ---------------------------------------------------------------------------- structural fallback


class _Expert(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)


class _ToyMoE(nn.Module):
    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(_Expert(hidden, 2 * hidden) for _ in range(experts))


class _ToyBlock(nn.Module):
    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(hidden, hidden), "o_proj": nn.Linear(hidden, hidden)})
        self.norm = nn.LayerNorm(hidden)
        self.moe = _ToyMoE(hidden, experts)


class _ToyModel(nn.Module):
    def __init__(self, hidden: int = 16, experts: int = 3, layers: int = 2) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="toy_moe_not_in_table", num_experts_per_tok=2)
        self.embed_tokens = nn.Embedding(32, hidden)
        self.blocks = nn.ModuleList(_ToyBlock(hidden, experts) for _ in range(layers))
        self.lm_head = nn.Linear(hidden, 32, bias=False)


def test_structural_fallback_on_an_unknown_family():
    model = _ToyModel()
    assert "toy_moe_not_in_table" not in MOE_FAMILIES
    anatomy = describe_moe(model)
    assert anatomy.family is DEFAULT_FAMILY
    assert [layer.path for layer in anatomy.layers] == ["blocks.0.moe", "blocks.1.moe"]
    layer = anatomy.layers[0]
    assert (layer.num_experts, layer.top_k, layer.router_path) == (3, 2, "blocks.0.moe.router")
    assert layer.per_expert == {
        f"blocks.0.moe.experts.{j}.{lin}.{w}": j for j in range(3) for lin in ("fc1", "fc2") for w in ("weight", "bias")
    }
    assert anatomy.params_in(G.ROUTER) == {"blocks.0.moe.router.weight", "blocks.1.moe.router.weight"}
    assert anatomy.groups["blocks.0.attn.q_proj.weight"] is G.ATTENTION
    assert anatomy.groups["blocks.0.norm.weight"] is G.NORMS
    assert anatomy.params_in(G.EMBEDDINGS) == {"embed_tokens.weight"}
    assert anatomy.params_in(G.HEAD) == {"lm_head.weight"}


def test_structural_fallback_ignores_experts_without_router():
    model = _ToyModel()
    for block in model.blocks:
        block.moe.router = nn.Linear(16, 5, bias=False)  # 5 rows for 3 experts: not a router of this block
    assert find_moe_layers(model) == []


def test_unclassifiable_parameter_names_model_type_and_fix():
    model = _ToyModel()
    model.mystery = nn.Module()
    model.mystery.blob = nn.Parameter(torch.zeros(3))
    with pytest.raises(UnclassifiedParameterError) as err:
        describe_moe(model)
    message = str(err.value)
    assert "mystery.blob" in message and "model_type='toy_moe_not_in_table'" in message
    assert "MoEFamily('toy_moe_not_in_table', router_names=" in message and "MOE_FAMILIES" in message


@pytest.mark.parametrize("name", ["mixtral", "switch", "qwen2_moe", "gpt_oss", "dbrx"])
def test_zero3_partitioned_parameters_give_the_same_anatomy(name):
    """A model built under an active DeepSpeed ZeRO-3 config (``zero3_init_flag``) holds empty tensors whose full
    shape is in ``ds_shape`` / ``ds_numel``; the anatomy reads those, so it finds the same layers and groups."""
    model = build_tiny_model(name)
    expected = describe_moe(model)
    for param in model.parameters():  # what deepspeed.zero.Init leaves on a process
        param.ds_shape, param.ds_numel = param.shape, param.numel()
        param.data = torch.empty(0, dtype=param.dtype)
    partitioned = describe_moe(model)
    assert partitioned.layers == expected.layers
    assert partitioned.groups == expected.groups and partitioned.numels == expected.numels
