"""Sparse upcycling (Komatsuzaki et al. 2023): turn a dense T5 into a Switch Transformer whose experts start
as copies of the dense FFN.

* every ``moe_every``-th FFN layer (Switch's rule: layers ``i`` with ``i % step == 1``; ``moe_every=2``
  gives MoE in every other layer, ``1`` in every layer) becomes an MoE layer with ``num_experts`` copies
  of the dense ``wi``/``wo`` and a new top-1 router;
* every other weight (embeddings, attention, norms, head, the remaining dense FFNs) is copied as is;
* the router starts at zero (``router_std=0``: a uniform router) or ``N(0, router_std²)``.

Function preservation: Switch scales each token's expert output by its router probability, which is
``1/E`` under a uniform router. With ``rescale_experts=True`` (default) each expert's output projection
``wo`` is multiplied by ``E``, so with a zero router the upcycled model computes exactly the dense model's
function at initialization (up to float rounding of ``E * (1/E)``; tested to 1e-5), as long as no token is
dropped (``expert_capacity`` >= tokens per sequence: a uniform router's ties send every token to expert 0).
With ``rescale_experts=False`` the experts are plain copies and MoE layers start at ``1/E`` of the dense FFN.

Supported: T5 (``model_type`` ``t5``/``mt5``) with a non-gated FFN (``feed_forward_proj`` ``relu`` or
``gelu``), because Switch experts have a single input projection ``wi``.

CLI::

    hf-moe-tuning upcycle t5 runs/upcycled-switch --num-experts 8 --moe-every 2
"""

from __future__ import annotations

import argparse
import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

from ..anatomy import describe_moe

logger = logging.getLogger(__name__)

SUPPORTED_SOURCES = "dense T5 models (model_type 't5' or 'mt5') with a non-gated FFN (feed_forward_proj 'relu' or 'gelu')"
_COPIED_CONFIG = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "dropout_rate",
    "layer_norm_epsilon",
    "initializer_factor",
    "dense_act_fn",
    "is_encoder_decoder",
    "use_cache",
    "pad_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "tie_word_embeddings",
)


class UpcyclingError(ValueError):
    """The model cannot be upcycled (the message names what is supported)."""


@dataclass(frozen=True)
class UpcycleOptions:
    """How to upcycle.

    Attributes:
        num_experts: experts per MoE layer.
        moe_every: MoE in every ``moe_every``-th layer of each stack (2 = every other layer, 1 = all).
        expert_capacity: tokens an expert takes per sequence (Switch); size it with a capacity factor later.
        router_std: std of the router init (0 = uniform router).
        rescale_experts: multiply each expert's ``wo`` by ``num_experts`` (function-preserving at init).
        router_z_loss_coef / router_aux_loss_coef: the Switch model's own router losses (0 = off; use
            ``router_*`` in :class:`~hf_moe_tuning.MoETrainingArguments` instead).
        seed: seed of the router init.
    """

    num_experts: int = 8
    moe_every: int = 2
    expert_capacity: int = 64
    router_std: float = 0.0
    rescale_experts: bool = True
    router_z_loss_coef: float = 0.0
    router_aux_loss_coef: float = 0.0
    seed: int = 0

    def validate(self, num_layers: int, num_decoder_layers: int) -> None:
        if self.num_experts < 2:
            raise UpcyclingError(f"num_experts must be >= 2, got {self.num_experts}")
        if not 1 <= self.moe_every <= min(num_layers, num_decoder_layers):
            raise UpcyclingError(
                f"moe_every must be in [1, {min(num_layers, num_decoder_layers)}] for a model with "
                f"{num_layers} encoder / {num_decoder_layers} decoder layers, got {self.moe_every}"
            )
        if self.expert_capacity < 1:
            raise UpcyclingError(f"expert_capacity must be >= 1, got {self.expert_capacity}")
        if self.router_std < 0:
            raise UpcyclingError(f"router_std must be >= 0, got {self.router_std}")


def check_upcyclable(model: nn.Module) -> None:
    """Raise :class:`UpcyclingError` unless ``model`` is a dense, non-gated T5 (see :data:`SUPPORTED_SOURCES`)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ("t5", "mt5"):
        anatomy_hint = ""
        try:
            if describe_moe(model).is_moe:
                anatomy_hint = " (it is already a Mixture-of-Experts model)"
        except ValueError:
            pass
        raise UpcyclingError(f"cannot upcycle model_type={model_type!r}{anatomy_hint}; upcycling supports {SUPPORTED_SOURCES}")
    if getattr(config, "is_gated_act", False):
        raise UpcyclingError(
            f"cannot upcycle a T5 with a gated FFN (feed_forward_proj={config.feed_forward_proj!r}): Switch experts "
            f"have a single input projection wi; upcycling supports {SUPPORTED_SOURCES}"
        )
    if not hasattr(model, "lm_head") or not hasattr(model, "encoder"):
        raise UpcyclingError(f"upcycling needs a T5ForConditionalGeneration; got {type(model).__name__}")


def switch_config_from_t5(t5_config: Any, options: UpcycleOptions) -> SwitchTransformersConfig:
    """The Switch Transformers config with the T5's shape and ``options``' MoE layout."""
    options.validate(t5_config.num_layers, t5_config.num_decoder_layers)
    kwargs = {k: getattr(t5_config, k) for k in _COPIED_CONFIG if hasattr(t5_config, k)}
    return SwitchTransformersConfig(
        **kwargs,
        num_experts=options.num_experts,
        num_sparse_encoder_layers=t5_config.num_layers // options.moe_every,
        num_sparse_decoder_layers=t5_config.num_decoder_layers // options.moe_every,
        expert_capacity=options.expert_capacity,
        router_bias=False,
        router_jitter_noise=0.0,
        router_dtype="float32",
        router_ignore_padding_tokens=False,
        router_z_loss_coef=options.router_z_loss_coef,
        router_aux_loss_coef=options.router_aux_loss_coef,
    )


def _dense_source_key(switch_key: str) -> tuple[str, int | None] | None:
    """T5 key (and expert index) that a Switch FFN key is copied from; ``None`` for non-FFN keys."""
    for kind in ("wi", "wo"):
        if switch_key.endswith(f".mlp.{kind}.weight"):
            return switch_key.replace(f".mlp.{kind}.weight", f".DenseReluDense.{kind}.weight"), None
        if ".mlp.experts.expert_" in switch_key and switch_key.endswith(f".{kind}.weight"):
            head, tail = switch_key.split(".mlp.experts.expert_")
            index = int(tail.split(".")[0])
            return f"{head}.DenseReluDense.{kind}.weight", index
    return None


@torch.no_grad()
def upcycle_t5(model: PreTrainedModel, options: UpcycleOptions | None = None) -> SwitchTransformersForConditionalGeneration:
    """Build a Switch Transformer from the dense T5 ``model`` (see module docstring)."""
    options = options or UpcycleOptions()
    check_upcyclable(model)
    config = switch_config_from_t5(model.config, options)
    dense = model.state_dict()
    torch.manual_seed(options.seed)
    switch = SwitchTransformersForConditionalGeneration(config).to(dtype=next(model.parameters()).dtype)
    target = switch.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    for key, value in target.items():
        if key in dense:
            new_state[key] = dense[key].clone()
            continue
        if key.endswith(".mlp.router.classifier.weight"):
            router = torch.zeros_like(value)
            if options.router_std > 0:
                router.normal_(0.0, options.router_std)
            new_state[key] = router
            continue
        source = _dense_source_key(key)
        if source is None or source[0] not in dense:
            raise UpcyclingError(f"no dense weight for {key!r} in the T5 state dict (is the model a standard T5?)")
        weight = dense[source[0]].clone()
        if source[1] is not None and options.rescale_experts and key.endswith(".wo.weight"):
            weight = weight * options.num_experts
        new_state[key] = weight
    switch.load_state_dict(new_state, strict=True)
    if getattr(model, "generation_config", None) is not None:
        switch.generation_config = copy.deepcopy(model.generation_config)
    anatomy = describe_moe(switch)
    logger.info(
        "upcycled %s to %d MoE layers x %d experts (%s params -> %s)",
        model.config.model_type,
        len(anatomy.layers),
        options.num_experts,
        f"{sum(p.numel() for p in model.parameters()):,}",
        f"{anatomy.total_params:,}",
    )
    return switch


# --------------------------------------------------------------------------------------------- CLI
def _upcycle_command(args: argparse.Namespace) -> int:
    from ..models import load_model

    source = load_model(args.model, seed=args.seed)
    options = UpcycleOptions(
        num_experts=args.num_experts,
        moe_every=args.moe_every,
        expert_capacity=args.expert_capacity,
        router_std=args.router_std,
        rescale_experts=not args.no_rescale,
        seed=args.seed,
    )
    switch = upcycle_t5(source, options)
    switch.save_pretrained(args.output_dir)
    anatomy = describe_moe(switch)
    print(f"upcycled {args.model} -> {args.output_dir} (model_type=switch_transformers)")
    print(anatomy.format_table())
    return 0


def register(subparsers: Any) -> None:
    """Add ``hf-moe-tuning upcycle`` to the CLI."""
    p = subparsers.add_parser(
        "upcycle",
        help="build a Switch Transformer from a dense T5 (experts = copies of the dense FFN) and save it",
    )
    p.add_argument("model", help="dense T5: tiny name ('t5'), local path or Hub id")
    p.add_argument("output_dir", help="where save_pretrained writes the upcycled model")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--moe-every", type=int, default=2, help="MoE in every n-th layer (2 = every other, 1 = all)")
    p.add_argument("--expert-capacity", type=int, default=64, help="tokens per expert and sequence")
    p.add_argument("--router-std", type=float, default=0.0, help="router init std (0 = uniform router)")
    p.add_argument("--no-rescale", action="store_true", help="plain expert copies (no wo *= num_experts)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_upcycle_command)
