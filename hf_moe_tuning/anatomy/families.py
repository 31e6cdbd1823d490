"""Per-``model_type`` table of where the MoE parts of a Hugging Face model live.

Like PEFT's ``TRANSFORMERS_MODELS_TO_*_MAPPING`` tables, one row per model family keeps the
family-specific knowledge in one place: the attribute names of the router, the routed experts
and the shared experts inside an MoE block, the config keys that hold ``top_k``, how the router
scores experts (softmax or sigmoid), and whether the family routes with an expert capacity.

Families not listed here are handled by :data:`DEFAULT_FAMILY` plus the structural detection in
:mod:`hf_moe_tuning.anatomy.groups` (a block holding a router whose weight is ``[E, hidden]``
beside either ``E`` identical expert sub-modules or parameters whose leading dim is ``E``); most
families of transformers 5.x need no row. A row is needed when structure alone misleads: extra
router rows, an MLP router, 2-D expert blocks, product-key routing, MoE-looking blocks that are not
MoE layers, or a family the anatomy refuses (``unsupported``). To add a family, add a row to
:data:`MOE_FAMILIES`; ``tests/test_anatomy_families.py`` checks every MoE family of the installed
transformers.

Fused 3-D expert tensors always carry the expert axis first (``[E, ...]``) in transformers 5.x; the
comments beside the rows note the remaining axes where they differ (GPT-OSS is transposed:
``gate_up_proj`` is ``[E, hidden, 2*intermediate]`` and carries biases) and other traps of a family.
The table has only columns the anatomy reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Scoring = Literal["softmax", "sigmoid", "product_key"]


@dataclass(frozen=True)
class MoEFamily:
    """Where the MoE parts of one model family live.

    Attributes:
        model_type: the ``config.model_type`` this row describes.
        router_names: attribute names (relative to the MoE block, dotted allowed) of the module owning
            the router weight (``[router rows, router input]``). The router *group* is the block's direct
            child holding that module (e.g. all of Zaya's MLP router ``gate``).
        expert_names: attribute names of the routed-expert containers inside the block.
        shared_names: attribute names of always-on experts and their gates (group ``shared_experts``).
        top_k_keys: config attributes holding the number of experts each token is sent to.
        scoring: how the router turns logits into routing scores (``sigmoid`` for DeepSeek-V3 style,
            ``product_key`` when the logits score key halves instead of experts, as in Doge).
        scoring_keys: config attributes that override ``scoring`` when they hold ``"softmax"`` or
            ``"sigmoid"`` (Cohere2-MoE's ``expert_selection_fn``, Inkling 2's ``scoring_func``).
        capacity: whether the family drops tokens beyond an expert capacity (Switch, NLLB-MoE).
        router_extra_rows: router rows past the routed experts (they come last): a config attribute or
            a constant. Longcat-Flash's zero-computation experts, Inkling's shared-expert sink gates,
            Zaya's skip expert.
        expert_blocks: fused expert tensors are 2-D with the experts as contiguous blocks along axis 0
            (``[E * intermediate, hidden]``, DBRX) instead of a leading ``E`` axis.
        router_raw_logits: the router module returns its raw logits ``x · Wᵀ (+ b)`` as its first output
            (the ``(logits, weights, indices)`` routers of transformers 5.x), so
            :class:`~hf_moe_tuning.routing.capture.RouterCapture` reuses them. ``False``: the capture
            recomputes them from the router's input and weight (one more matmul), for routers that return
            probabilities, top-k scores or nothing usable (transformers #45120: ``router_logits`` that were
            already softmaxed); a bare ``nn.Linear`` router's output is used whatever this says. Set from
            :data:`_RAW_LOGIT_FAMILIES`, which ``tests/test_anatomy_families.py`` checks.
        skip_blocks: regexes of module paths that look like MoE blocks but are not MoE layers
            (JetMoE's mixture-of-attention heads; their parameters stay in ``attention``).
        unsupported: why the anatomy refuses this family (``describe_moe`` raises instead of guessing).
        extra: per-family constants the config does not hold (``top_k``, ``skip_blocks``).
    """

    model_type: str
    router_names: tuple[str, ...] = ("gate", "router")
    expert_names: tuple[str, ...] = ("experts",)
    shared_names: tuple[str, ...] = ("shared_expert", "shared_experts", "shared_expert_gate", "shared_mlp")
    top_k_keys: tuple[str, ...] = (
        "num_experts_per_tok",
        "moe_k",
        "moe_topk",
        "top_k",
        "num_selected_experts",
        "top_k_experts",
        "moe_top_k",
    )
    scoring: Scoring = "softmax"
    scoring_keys: tuple[str, ...] = ("scoring_func", "expert_selection_fn")
    capacity: bool = False
    router_extra_rows: str | int = 0
    expert_blocks: bool = False
    router_raw_logits: bool = False
    skip_blocks: tuple[str, ...] = ()
    unsupported: str = ""
    extra: dict = field(default_factory=dict, compare=False)


DEFAULT_FAMILY = MoEFamily(model_type="<structural>")

MOE_FAMILIES: dict[str, MoEFamily] = {
    f.model_type: f
    for f in [
        # router is mlp.router.classifier; experts are per-expert modules experts.expert_j.{wi,wo};
        # transformers' aux loss is zero when sparse_step is 1
        MoEFamily("switch_transformers", router_names=("router.classifier",), top_k_keys=(), capacity=True),
        # per-expert modules experts.expert_j.{fc1,fc2}
        MoEFamily("nllb-moe", router_names=("router.classifier",), top_k_keys=(), capacity=True, extra={"top_k": 2}),
        MoEFamily("mixtral"),
        MoEFamily("minimax"),
        MoEFamily("phimoe"),
        MoEFamily("qwen2_moe"),  # shared_expert and shared_expert_gate form the shared_experts group
        MoEFamily("qwen3_moe"),
        MoEFamily("qwen3_next"),
        MoEFamily("olmoe"),
        MoEFamily("granitemoe"),
        MoEFamily("granitemoeshared"),
        MoEFamily("granitemoehybrid"),
        # the mixture-of-attention heads (self_attention.experts, with their own router) are not MoE layers:
        # they are token mixers and stay in the attention group; mlp.bias is an expert-output bias
        MoEFamily(
            "jetmoe",
            router_names=("router.layer",),
            expert_names=("input_linear", "output_linear"),
            skip_blocks=(r"(^|\.)self_attention\.experts$",),
        ),
        MoEFamily("deepseek_v2"),  # dense layers own mlp.gate_proj, which is not a router
        # sigmoid routers with an e_score_correction_bias buffer used only for selection
        MoEFamily("deepseek_v3", scoring="sigmoid"),
        MoEFamily("glm4_moe", scoring="sigmoid"),
        MoEFamily("dots1", scoring="sigmoid"),
        # router has a bias; fused experts are [E, in, out] (transposed) with *_bias tensors [E, out]
        MoEFamily("gpt_oss"),
        # the router's output is the sigmoid of the top-k logits
        MoEFamily("llama4_text", top_k_keys=("num_experts_per_tok",), scoring="sigmoid"),
        MoEFamily("ernie4_5_moe"),
        MoEFamily("hunyuan_v1_moe"),
        # 2-D experts.mlp.{w1,v1,w2} [E * ffn_hidden_size, hidden]: expert j is rows j*I:(j+1)*I (expert_axis 0
        # holds E contiguous blocks); top_k is ffn_config.moe_top_k
        MoEFamily("dbrx", router_names=("router.layer",), expert_names=("experts",), expert_blocks=True),
        # CDMoE (needs is_moe=True): experts are embedding rows down_embed/up_embed [E, hidden]; router_gate scores
        # sqrt(E) row keys and sqrt(E) column keys ([2*sqrt(E), hidden]), so router logits are not one score per
        # expert; the block's own gate/up/down_proj is its always-on shared expert
        MoEFamily(
            "doge",
            router_names=("router_gate",),
            expert_names=("down_embed", "up_embed"),
            shared_names=("gate_proj", "up_proj", "down_proj"),
            scoring="product_key",
        ),
        # MoE block only with enable_moe_block=True; router and experts sit on the decoder layer itself next to
        # the dense mlp, which runs for every token (shared_experts)
        MoEFamily("gemma4_text", router_names=("router.proj",), shared_names=("mlp",)),
        MoEFamily("diffusion_gemma_text", router_names=("router.proj",), shared_names=("mlp",)),  # Gemma 4 layers
        # router rows E + zero_expert_num: the last rows route to zero-computation (identity) experts
        MoEFamily(
            "longcat_flash",
            router_names=("router.classifier",),
            router_extra_rows="zero_expert_num",
            unsupported="LongcatFlashExperts allocates gate_up_proj with n_routed_experts + zero_expert_num rows "
            "but down_proj with n_routed_experts rows, so its fused tensors share no expert axis (expert "
            "subsets cannot be sliced), and its router applies classifier.weight with F.linear, so hooks on "
            "the router never fire",
        ),
        # router rows E + n_shared_experts: the last rows gate the shared experts (sink); gate.global_scale scales
        # the routing weights and is part of the router group
        MoEFamily("inkling_text", router_extra_rows="n_shared_experts", scoring="sigmoid"),
        # MLP router on a router_hidden_size stream (down_proj, router_mlp, router_states_scale: all router group);
        # out_proj has E + 1 rows, the last one a skip expert without compute
        MoEFamily("zaya", router_names=("gate.router_mlp.out_proj",), router_extra_rows=1),
        # experts run in a moe_hidden_size latent: pre/post_expert_proj belong to the experts group, the norms
        # (incl. experts.post_expert_norm) to norms
        MoEFamily("muse_spark_text"),
    ]
}

#: Families whose router scores experts with a sigmoid (DeepSeek-V3 style, usually with a selection-only
#: ``e_score_correction_bias``) and that need no other row; checked against each router's forward.
_SIGMOID_FAMILIES = (
    "afmoe", "axk1", "axk2", "bailing_hybrid", "beam", "deepseek_v32", "dots3_note_text", "exaone_moe",
    "flint", "glm4_moe_lite", "glm4v_moe_text", "glm5_next_text", "glm_moe_dsa", "hy_v3", "hy_v4",
    "hy_v4_vl_text", "kimi_linear", "kolibri1", "laguna", "lfm2_moe", "mimo_v2_flash", "minimax_m2",
    "minimax_m3_vl_text", "nemotron_h", "sarvam_mla", "sarvam_moe", "solar_open", "step3p5",
)  # fmt: skip
for _model_type in _SIGMOID_FAMILIES:
    MOE_FAMILIES.setdefault(_model_type, MoEFamily(_model_type, scoring="sigmoid"))

#: Families whose router module (not a bare ``nn.Linear``) returns the raw logits ``x · Wᵀ (+ b)`` first:
#: the ``router_raw_logits`` column. Left out on purpose: llama4_text (returns the sigmoid of the top-k
#: logits), muse_spark_text (scales inside the router), inkling_text (returns only the routed experts'
#: columns of its E + shared rows), doge (product keys); bare ``nn.Linear`` routers need no entry.
_RAW_LOGIT_FAMILIES = (
    "aria_text", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_ocr2_text", "deepseek_v2",
    "deepseek_v3", "deepseek_v32", "deepseek_v4", "dots1", "dots3_note_text", "ernie4_5_moe",
    "ernie4_5_vl_moe_text", "exaone_moe", "flex_olmo", "flint", "glm4_moe", "glm4_moe_lite", "glm4v_moe_text",
    "glm5_next_text", "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoe_swa", "granitemoehybrid",
    "granitemoeshared", "hy_v3", "hy_v4", "hy_v4_vl_text", "inkling2_loop_text", "inkling2_text", "jamba",
    "kimi_linear", "kolibri1", "laguna", "lara_mini", "lfm2_moe", "mellum", "mimo_v2_flash", "minimax",
    "minimax_m2", "minimax_m3_vl_text", "mistral4", "mistral_large4_text", "mixtral", "nemotron_h", "olmoe",
    "openai_privacy_filter", "phimoe", "qwen2_moe", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next",
    "qwen3_omni_moe_talker_text", "qwen3_omni_moe_text", "qwen3_vl_moe_text", "qwen4_exp_text", "sarvam_mla",
    "sarvam_moe", "solar_open", "step3p5", "unlimited_ocr_text",
)  # fmt: skip
for _model_type in _RAW_LOGIT_FAMILIES:
    _row = MOE_FAMILIES.get(_model_type) or MoEFamily(_model_type)
    MOE_FAMILIES[_model_type] = replace(_row, router_raw_logits=True)


def get_family(model_type: str | None) -> MoEFamily:
    """Return the table row for ``model_type`` or :data:`DEFAULT_FAMILY` for unknown families."""
    if model_type is None:
        return DEFAULT_FAMILY
    return MOE_FAMILIES.get(model_type, DEFAULT_FAMILY)
