"""Tiny models built from configs (offline) and the Hub ids of their real counterparts.

The embedded default of the project: a dense T5 and a Switch Transformer of matching shape (same
``d_model``, layers and heads; the Switch has an MoE layer every other layer with 8 experts), tiny
decoder MoEs (Mixtral-, Qwen2-MoE-, DeepSeek-V3-like) and a dense Llama. None needs a download.

:func:`tiny_config` also shrinks the default config of *any* transformers model type, which the
tests use to check the anatomy on every MoE family of the installed transformers.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from typing import Any

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PretrainedConfig,
    PreTrainedModel,
)

logger = logging.getLogger(__name__)

#: Hub ids of the real models the tiny ones stand in for.
HUB_IDS: dict[str, str] = {
    "t5": "google/t5-v1_1-base",
    "flan-t5": "google/flan-t5-base",
    "switch": "google/switch-base-8",
    "switch-16": "google/switch-base-16",
    "switch-32": "google/switch-base-32",
    "mixtral": "mistralai/Mixtral-8x7B-v0.1",
    "qwen2_moe": "Qwen/Qwen1.5-MoE-A2.7B",
    "olmoe": "allenai/OLMoE-1B-7B-0924",
    "deepseek_v3": "deepseek-ai/DeepSeek-V3",
    "gpt_oss": "openai/gpt-oss-20b",
}

#: Vocabulary of ``ByT5Tokenizer()`` (256 bytes + 3 specials), used by every tiny model.
TINY_VOCAB = 384

# Shape shared by tiny dense T5 and tiny Switch so that their active compute matches.
_T5_SHAPE = dict(
    vocab_size=TINY_VOCAB,
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=4,
    num_decoder_layers=4,
    num_heads=4,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)

_DECODER_SHAPE = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# Generic shrink for any transformers config (used for the all-families anatomy check). Each key is
# passed to the config constructor when the config class declares it, so that ``__post_init__`` derives
# per-layer lists (``layer_types``, ``mlp_layer_types``, per-layer configs) for the tiny depth.
_SHRINK: dict[str, Any] = dict(
    hidden_size=32,
    d_model=32,
    intermediate_size=64,
    moe_intermediate_size=32,
    moe_hidden_size=32,
    shared_expert_intermediate_size=32,
    shared_experts_intermediate_size=32,
    ffn_dim=64,
    ffn_hidden_size=64,
    expert_ffn_hidden_size=32,
    d_ff=64,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    expert_ffn_dim=64,
    num_hidden_layers=2,
    num_layers=2,
    n_layers=2,
    num_decoder_layers=2,
    encoder_layers=2,
    decoder_layers=2,
    num_attention_heads=4,
    num_heads=4,
    n_heads=4,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    d_kv=8,
    vocab_size=128,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    moe_num_experts=4,
    num_experts_per_tok=2,
    moe_k=2,
    moe_topk=2,
    top_k_experts=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    num_dense_layers=1,
    mlp_only_layers=[0],
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    max_position_embeddings=64,
    max_seq_len=64,
    n_shared_experts=1,
    num_sparse_encoder_layers=1,
    num_sparse_decoder_layers=1,
    encoder_sparse_step=2,
    decoder_sparse_step=1,
    # widths of secondary paths (dense/shared MLPs beside the experts, routers, indexers, linear attention)
    dense_intermediate_size=64,
    intermediate_size_mlp=64,
    shared_intermediate_size=32,
    moe_shared_expert_intermediate_size=32,
    share_expert_dim=32,
    router_hidden_size=16,
    o_lora_rank=16,
    kv_channels=8,
    swa_head_dim=8,
    index_head_dim=16,
    index_n_heads=4,
    linear_head_dim=8,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    # Mamba-2 mixers of hybrids: heads * head_dim == expand * hidden_size
    mamba_n_heads=4,
    mamba_d_head=16,
    mamba_d_state=16,
    mamba_chunk_size=16,
    mamba_num_heads=4,
    mamba_head_dim=16,
    ssm_state_size=16,
    n_groups=1,
    vocab_size_per_layer_input=128,
    hidden_size_per_layer_input=8,
    pad_token_id=0,
)

# What a family's default config needs on top of :data:`_SHRINK` to be sparse at all or to build tiny.
_FAMILY_SHRINK: dict[str, dict[str, Any]] = {
    # DbrxAttentionConfig declares no rope_theta, which the modeling code reads (checkpoints carry it), and
    # its forward clamps q/k/v with clip_qkv, whose default None breaks torch.clamp.
    "dbrx": dict(
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
    ),
    # Doge's CDMoE is off by default; its product-key routing needs a square number of experts.
    "doge": dict(is_moe=True, num_experts=16, num_experts_per_tok=2),
    # Gemma 4 runs its MoE block beside the dense MLP only when enabled.
    "gemma4_text": dict(enable_moe_block=True),
    "diffusion_gemma_text": dict(enable_moe_block=True),
    # DeepSeek-OCR2's text config derives no MLP layer pattern (checkpoints carry it).
    "deepseek_ocr2_text": dict(mlp_layer_types=["dense", "sparse"]),
    # ERNIE-4.5-VL splits the rotary dims into (h, w, t) sections that must fit head_dim=8.
    "ernie4_5_vl_moe_text": dict(
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [1, 1, 2]}
    ),
    # GLM-4.1V-MoE splits the rotary dims into (t, h, w) sections that must fit head_dim=8.
    "glm4v_moe_text": dict(
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 1.0,
            "mrope_section": [2, 1, 1],
        }
    ),
    # Step-3.5 has sliding-window layers but no default window.
    "step3p5": dict(sliding_window=16),
    # Kolibri 1.1 (transformers 5.25) validates NVFP4 key/value rounding (head_dim a multiple of 16) and at most
    # num_attention_heads // num_key_value_heads indexer heads; mlp_only_layers defaults to the first two layers,
    # the whole tiny depth, so the rejected kwargs left no MoE layer
    "kolibri1_1": dict(head_dim=16, index_num_heads=2, mlp_only_intermediate_size=64),
    # The talker's MoE reads shared_expert_intermediate_size, which its config only gets from the parent config.
    "qwen3_omni_moe_talker_text": dict(shared_expert_intermediate_size=32),
    # LFM2-MoE has no default layer pattern (checkpoints carry it): one conv layer, one attention layer.
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
}

#: Hand-written tiny configs for the embedded models (model name -> (model_type, kwargs)).
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "t5": ("t5", dict(_T5_SHAPE, feed_forward_proj="relu")),
    "switch": (
        "switch_transformers",
        dict(
            _T5_SHAPE,
            num_sparse_encoder_layers=2,
            num_sparse_decoder_layers=2,
            num_experts=8,
            expert_capacity=64,
            router_jitter_noise=0.0,
            router_z_loss_coef=0.0,
            router_aux_loss_coef=0.0,
        ),
    ),
    "llama": ("llama", dict(_DECODER_SHAPE)),
    "mixtral": (
        "mixtral",
        dict(_DECODER_SHAPE, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0),
    ),
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            _DECODER_SHAPE,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            decoder_sparse_step=1,
        ),
    ),
    "deepseek_v3": (
        "deepseek_v3",
        dict(
            _DECODER_SHAPE,
            num_hidden_layers=3,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            head_dim=8,
            num_key_value_heads=4,
            v_head_dim=16,
        ),
    ),
    "gpt_oss": (
        "gpt_oss",
        dict(_DECODER_SHAPE, num_local_experts=4, num_experts_per_tok=2, layer_types=None, sliding_window=16),
    ),
    "olmoe": ("olmoe", dict(_DECODER_SHAPE, num_experts=4, num_experts_per_tok=2)),
}


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A tiny config for ``model_type``: a named embedded model, or any transformers model type shrunk.

    Args:
        model_type: a key of :data:`TINY_MODELS` (``"switch"``, ``"t5"``, ``"mixtral"`` ...) or any
            ``model_type`` registered in transformers' ``CONFIG_MAPPING``.
        **overrides: config attributes to set on top.
    """
    if model_type in TINY_MODELS:
        real_type, kwargs = TINY_MODELS[model_type]
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.update(overrides)
        return AutoConfig.for_model(real_type, **kwargs)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"unknown tiny model {model_type!r}: use one of {sorted(TINY_MODELS)} or a transformers model_type."
        )
    required = {**_FAMILY_SHRINK.get(model_type, {}), **overrides}
    return _shrunk_config(CONFIG_MAPPING[model_type], _SHRINK, required)


def _config_fields(config_class: type[PretrainedConfig]) -> set[str]:
    """Names a config class accepts as constructor arguments."""
    if dataclasses.is_dataclass(config_class):
        return {f.name for f in dataclasses.fields(config_class)}
    params = inspect.signature(config_class.__init__).parameters
    return {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD and n != "self"}


def _shrunk_config(
    config_class: type[PretrainedConfig], shrink: dict[str, Any], required: dict[str, Any]
) -> PretrainedConfig:
    """Build ``config_class`` from the ``shrink`` values it declares plus all of ``required``.

    Passing the values to the constructor keeps derived fields consistent (``__post_init__`` derives
    ``layer_types``, ``mlp_layer_types`` and per-layer configs for the tiny depth). Configs whose
    validation rejects the combination fall back to setting attributes on their default instance.
    """
    fields = _config_fields(config_class)
    kwargs = {k: v for k, v in shrink.items() if k in fields}
    if "kv_lora_rank" in fields and "num_attention_heads" in kwargs:  # MLA: one kv head per query head
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    kwargs.update(required)
    try:
        config = config_class(**kwargs)
    except Exception as err:
        logger.debug("%s rejected the tiny kwargs (%s); shrinking attribute-wise", config_class.__name__, err)
    else:
        mlp_types = getattr(config, "mlp_layer_types", None)
        if "mlp_layer_types" in required or not (isinstance(mlp_types, list) and set(mlp_types) == {"dense"}):
            return config
        # the default dense prefix (e.g. three dense layers) covers the whole tiny depth: keep one dense layer
        kwargs["mlp_layer_types"] = ["dense"] + ["sparse"] * (len(mlp_types) - 1)
        try:
            return config_class(**kwargs)
        except Exception as err:
            logger.debug("%s rejected a sparse mlp_layer_types (%s)", config_class.__name__, err)
            return config
    config = config_class()
    for key, value in kwargs.items():
        current = getattr(config, key, None)
        if key not in required and isinstance(current, (list, dict)):
            continue
        try:
            setattr(config, key, value)
        except Exception:
            logger.debug("could not set %s=%r on %s", key, value, config_class.__name__)
    n = getattr(config, "num_hidden_layers", None)
    for key in ("layer_types", "mlp_layer_types"):
        value = getattr(config, key, None)
        if not (isinstance(value, list) and isinstance(n, int)) or key in required:
            continue
        if key == "mlp_layer_types":  # first layer dense, the rest sparse (DeepSeek-V3.2 style)
            value = ["dense"] + ["sparse"] * (n - 1)
        try:
            setattr(config, key, value[:n])
        except Exception:
            logger.debug("could not set %s on %s", key, config_class.__name__)
    return config


def build_from_config(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """Instantiate the LM-head model for ``config`` (seq2seq, causal LM, else base model)."""
    torch.manual_seed(seed)
    errors = []
    for auto in (AutoModelForSeq2SeqLM, AutoModelForCausalLM, AutoModel):
        try:
            return auto.from_config(config)
        except (ValueError, KeyError) as err:
            errors.append(f"{auto.__name__}: {err}")
    model_class = _model_class_for(type(config))
    if model_class is not None:  # text sub-configs of multimodal models have no Auto mapping of their own
        return model_class(config)
    raise ValueError(f"cannot build a model for model_type={config.model_type!r}: {errors}")


def _model_class_for(config_class: type[PretrainedConfig]) -> type[PreTrainedModel] | None:
    """The model class of ``config_class``'s modeling module built from exactly that config class.

    Prefers a ``*ForCausalLM`` head, then a bare ``*Model``; abstract ``*PreTrainedModel`` bases are skipped.
    """
    module_name = config_class.__module__.replace(".configuration_", ".modeling_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    candidates = [
        obj
        for name, obj in vars(module).items()
        if inspect.isclass(obj)
        and issubclass(obj, PreTrainedModel)
        and obj.__module__ == module.__name__
        and getattr(obj, "config_class", None) is config_class
        and not name.endswith("PreTrainedModel")
    ]
    candidates.sort(key=lambda cls: (not cls.__name__.endswith("ForCausalLM"), cls.__name__))
    return candidates[0] if candidates else None


def build_tiny_model(name: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """Build a tiny model (random init, seeded) by embedded name or transformers ``model_type``."""
    return build_from_config(tiny_config(name, **overrides), seed=seed)


def load_model(name_or_path: str, *, meta: bool = False, seed: int = 0, **kwargs: Any) -> PreTrainedModel:
    """Load a model by tiny name (``"switch"``, or ``"tiny:switch"`` as recipes spell it), local path or Hub id.

    With ``meta=True`` the model is built from its config on the meta device (no weights are allocated
    or downloaded beyond ``config.json``), which is enough to describe its anatomy.
    """
    if name_or_path.startswith("tiny:"):  # tiny_config names the embedded models for an unknown one
        return build_tiny_model(name_or_path[len("tiny:"):], seed=seed)
    if name_or_path in TINY_MODELS or (name_or_path in CONFIG_MAPPING and "/" not in name_or_path):
        return build_tiny_model(name_or_path, seed=seed)
    if meta:
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        with torch.device("meta"):
            return build_from_config(config)
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    for auto in (AutoModelForSeq2SeqLM, AutoModelForCausalLM, AutoModel):
        try:
            return auto.from_pretrained(name_or_path, **kwargs)
        except ValueError:
            continue
    raise ValueError(f"cannot load {name_or_path!r} (model_type={config.model_type!r})")
