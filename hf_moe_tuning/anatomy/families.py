"""Per-``model_type`` table of where the MoE parts of a Hugging Face model live.

Like PEFT's ``TRANSFORMERS_MODELS_TO_*_MAPPING`` tables, one row per model family keeps the
family-specific knowledge in one place: the attribute names of the router, the routed experts
and the shared experts inside an MoE block, the config keys that hold ``top_k``, how the router
scores experts (softmax or sigmoid), and whether the family routes with an expert capacity.

Families not listed here are handled by :data:`DEFAULT_FAMILY` plus the structural detection in
:mod:`hf_moe_tuning.anatomy.groups` (a block holding a router whose weight is ``[E, hidden]``
beside either ``E`` identical expert sub-modules or parameters whose leading dim is ``E``).
To add a family, add a row to :data:`MOE_FAMILIES`.

Fused 3-D expert tensors always carry the expert axis first (``[E, ...]``) in transformers 5.x;
the ``layout`` column only documents the order of the remaining axes (GPT-OSS is transposed:
``gate_up_proj`` is ``[E, hidden, 2*intermediate]`` and carries biases).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Scoring = Literal["softmax", "sigmoid"]


@dataclass(frozen=True)
class MoEFamily:
    """Where the MoE parts of one model family live.

    Attributes:
        model_type: the ``config.model_type`` this row describes.
        router_names: attribute names (relative to the MoE block, dotted allowed) of the router module.
            The router's ``[num_experts, hidden]`` weight is looked up in that module.
        expert_names: attribute names of the routed-expert containers inside the block.
        shared_names: attribute names of always-on experts and their gates (group ``shared_experts``).
        top_k_keys: config attributes holding the number of experts each token is sent to.
        num_experts_keys: config attributes holding the number of routed experts.
        scoring: how the router turns logits into routing scores (``sigmoid`` for DeepSeek-V3 style).
        capacity: whether the family drops tokens beyond an expert capacity (Switch, NLLB-MoE).
        layout: free-text description of fused expert tensors (documentation only).
        builtin_aux_flag: config attribute that switches the model's own router loss on.
        notes: traps worth knowing about this family.
    """

    model_type: str
    router_names: tuple[str, ...] = ("gate", "router")
    expert_names: tuple[str, ...] = ("experts",)
    shared_names: tuple[str, ...] = ("shared_expert", "shared_experts", "shared_expert_gate", "shared_mlp")
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k", "num_selected_experts")
    num_experts_keys: tuple[str, ...] = (
        "num_local_experts",
        "num_experts",
        "n_routed_experts",
        "moe_num_experts",
    )
    scoring: Scoring = "softmax"
    capacity: bool = False
    layout: str = "[E, out, in]"
    builtin_aux_flag: str | None = "output_router_logits"
    notes: str = ""
    extra: dict = field(default_factory=dict, compare=False)


DEFAULT_FAMILY = MoEFamily(model_type="<structural>")

_SIGMOID_NOTE = "sigmoid router with an e_score_correction_bias buffer used only for selection"

MOE_FAMILIES: dict[str, MoEFamily] = {
    f.model_type: f
    for f in [
        MoEFamily(
            "switch_transformers",
            router_names=("router.classifier",),
            top_k_keys=(),
            capacity=True,
            layout="per-expert modules experts.expert_j.{wi,wo}",
            builtin_aux_flag="output_router_logits",
            notes="router is mlp.router.classifier; aux loss is zero in transformers when sparse_step is 1",
        ),
        MoEFamily(
            "nllb-moe",
            router_names=("router.classifier",),
            top_k_keys=(),
            capacity=True,
            layout="per-expert modules experts.expert_j.{fc1,fc2}",
            extra={"top_k": 2},
        ),
        MoEFamily("mixtral"),
        MoEFamily("minimax"),
        MoEFamily("phimoe"),
        MoEFamily("qwen2_moe", notes="shared_expert and shared_expert_gate form the shared_experts group"),
        MoEFamily("qwen3_moe"),
        MoEFamily("qwen3_next"),
        MoEFamily("olmoe"),
        MoEFamily("granitemoe"),
        MoEFamily("granitemoeshared"),
        MoEFamily("granitemoehybrid"),
        MoEFamily(
            "jetmoe",
            router_names=("router.layer",),
            expert_names=("input_linear", "output_linear"),
            notes="mixture-of-attention experts in self_attention stay in the attention group",
        ),
        MoEFamily("deepseek_v2", notes="dense layers own mlp.gate_proj, which is not a router"),
        MoEFamily("deepseek_v3", scoring="sigmoid", builtin_aux_flag=None, notes=_SIGMOID_NOTE),
        MoEFamily("glm4_moe", scoring="sigmoid", builtin_aux_flag=None, notes=_SIGMOID_NOTE),
        MoEFamily("dots1", scoring="sigmoid", builtin_aux_flag=None, notes=_SIGMOID_NOTE),
        MoEFamily(
            "gpt_oss",
            layout="[E, in, out] (transposed) with *_bias tensors [E, out]",
            notes="router has a bias; fused experts are transposed and carry biases",
        ),
        MoEFamily("llama4_text", top_k_keys=("num_experts_per_tok",), notes="router output is sigmoid of top-k logits"),
        MoEFamily("ernie4_5_moe"),
        MoEFamily("hunyuan_v1_moe"),
        MoEFamily("dbrx", router_names=("router.layer", "router"), expert_names=("experts",)),
    ]
}


def get_family(model_type: str | None) -> MoEFamily:
    """Return the table row for ``model_type`` or :data:`DEFAULT_FAMILY` for unknown families."""
    if model_type is None:
        return DEFAULT_FAMILY
    return MOE_FAMILIES.get(model_type, DEFAULT_FAMILY)
