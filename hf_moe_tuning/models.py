"""Tiny models built from configs (offline) and the Hub ids of their real counterparts.

The embedded default of the project: a dense T5 and a Switch Transformer of matching shape (same
``d_model``, layers and heads; the Switch has an MoE layer every other layer with 8 experts), tiny
decoder MoEs (Mixtral-, Qwen2-MoE-, DeepSeek-V3-like) and a dense Llama. None needs a download.

:func:`tiny_config` also shrinks the default config of *any* transformers model type, which the
tests use to check the anatomy on every MoE family of the installed transformers.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    CONFIG_MAPPING,
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

# Generic shrink applied to any config attribute that exists (used for the all-families check).
_SHRINK: dict[str, Any] = dict(
    hidden_size=32,
    d_model=32,
    intermediate_size=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    ffn_dim=64,
    d_ff=64,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    expert_ffn_dim=64,
    num_hidden_layers=2,
    num_layers=2,
    num_decoder_layers=2,
    encoder_layers=2,
    decoder_layers=2,
    num_attention_heads=4,
    num_heads=4,
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
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    max_position_embeddings=64,
    n_shared_experts=1,
    num_sparse_encoder_layers=1,
    num_sparse_decoder_layers=1,
    encoder_sparse_step=2,
    decoder_sparse_step=1,
    pad_token_id=0,
)

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
            f"Unknown tiny model {model_type!r}: use one of {sorted(TINY_MODELS)} or a transformers model_type."
        )
    config = CONFIG_MAPPING[model_type]()
    for key, value in {**_SHRINK, **overrides}.items():
        if hasattr(config, key) and not isinstance(getattr(config, key), (list, dict)):
            try:
                setattr(config, key, value)
            except Exception:  # noqa: BLE001 - strict configs refuse some values; keep their default
                logger.debug("could not set %s=%r on %s", key, value, model_type)
    n = getattr(config, "num_hidden_layers", None)
    for key in ("layer_types", "mlp_layer_types"):
        value = getattr(config, key, None)
        if not (isinstance(value, list) and isinstance(n, int)) or key in overrides:
            continue
        if key == "mlp_layer_types":  # first layer dense, the rest sparse (DeepSeek-V3.2 style)
            value = ["dense"] + ["sparse"] * (n - 1)
        try:
            setattr(config, key, value[:n])
        except Exception:  # noqa: BLE001
            logger.debug("could not set %s on %s", key, model_type)
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
    raise ValueError(f"cannot build a model for model_type={config.model_type!r}: {errors}")


def build_tiny_model(name: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """Build a tiny model (random init, seeded) by embedded name or transformers ``model_type``."""
    return build_from_config(tiny_config(name, **overrides), seed=seed)


def load_model(name_or_path: str, *, meta: bool = False, seed: int = 0, **kwargs: Any) -> PreTrainedModel:
    """Load a model by tiny name, local path or Hub id.

    With ``meta=True`` the model is built from its config on the meta device (no weights are allocated
    or downloaded beyond ``config.json``), which is enough to describe its anatomy.
    """
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
