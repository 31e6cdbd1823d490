"""Sparse vs dense fine-tuning hyperparameter presets (ST-MoE, Zoph et al. 2022, Sec. 4.3 and Fig. 7).

ST-MoE found that sparse models fine-tune best with *noisier* hyperparameters – small batches and a high
learning rate – while FLOP-matched dense models prefer nearly the opposite. The presets encode the ends
of the grid they swept (batch 65k / 262k / 1M tokens, learning rate 1e-4 / 5e-4 / 1e-3), the
fine-tuning dropout of 0.1, and Switch's expert dropout of 0.4 for the sparse preset (Fedus et al. 2022,
Table 4).

========  =============  ===============  =========  ===============
preset    learning rate  tokens / batch   dropout    expert dropout
========  =============  ===============  =========  ===============
sparse    1e-3           65,536           0.1        0.4
dense     1e-4           1,048,576        0.1        0.0
========  =============  ===============  =========  ===============

:func:`apply_hparam_preset` sets ``learning_rate`` and ``moe_expert_dropout`` on the arguments, the model's
dropout (config field and ``nn.Dropout`` modules outside the experts), and – when the sequence length is
known – ``gradient_accumulation_steps`` so that one optimizer step sees about the preset's tokens.

A value the user set explicitly wins over the preset's, with a logged note: an argument counts as set
when it differs from its dataclass default (``learning_rate=3e-5`` stays 3e-5 under ``"sparse"``). The
preset cannot tell an explicit value equal to the default from an unset one; such a value is replaced.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

#: Config fields through which transformers models read their main dropout rate.
DROPOUT_CONFIG_FIELDS: tuple[str, ...] = ("dropout_rate", "dropout", "hidden_dropout_prob", "hidden_dropout")


@dataclass(frozen=True)
class HParamPreset:
    """One fine-tuning preset (see module docstring)."""

    name: str
    learning_rate: float
    tokens_per_batch: int
    dropout: float
    expert_dropout: float


HPARAM_PRESETS: dict[str, HParamPreset] = {
    "sparse": HParamPreset("sparse", learning_rate=1e-3, tokens_per_batch=65_536, dropout=0.1, expert_dropout=0.4),
    "dense": HParamPreset("dense", learning_rate=1e-4, tokens_per_batch=1_048_576, dropout=0.1, expert_dropout=0.0),
}


def get_preset(name: str) -> HParamPreset | None:
    """The preset called ``name`` (``None`` for ``"none"``); raises ``ValueError`` for unknown names."""
    if name in (None, "none"):
        return None
    if name not in HPARAM_PRESETS:
        raise ValueError(f"unknown hyperparameter preset {name!r}; expected 'none' or one of {sorted(HPARAM_PRESETS)}")
    return HPARAM_PRESETS[name]


def accumulation_steps_for(tokens_per_batch: int, per_device_batch_size: int, seq_len: int, world_size: int = 1) -> int:
    """Gradient-accumulation steps so that a step sees about ``tokens_per_batch`` tokens (at least 1)."""
    if min(per_device_batch_size, seq_len, world_size) <= 0:
        raise ValueError("batch size, sequence length and world size must be positive")
    return max(1, round(tokens_per_batch / (per_device_batch_size * seq_len * world_size)))


def set_model_dropout(model: nn.Module, p: float, skip: tuple[nn.Module, ...] = ()) -> int:
    """Set dropout ``p`` in the model config and every ``nn.Dropout`` not inside ``skip`` modules; returns the count."""
    skipped = {id(m) for root in skip for m in root.modules()}
    config = getattr(model, "config", None)
    for name in DROPOUT_CONFIG_FIELDS:
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, p)
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and id(module) not in skipped:
            module.p = p
            changed += 1
    return changed


def _explicit(args: Any, name: str) -> bool:
    """Whether ``args.name`` was set by the user: it differs from the default of ``args``'s own dataclass."""
    spec = next((f for f in dataclasses.fields(args) if f.name == name), None) if dataclasses.is_dataclass(args) else None
    if spec is None:
        return False
    default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    return getattr(args, name) != default


def _set_unless_explicit(args: Any, name: str, value: Any, preset: str) -> None:
    if _explicit(args, name):
        if getattr(args, name) != value:
            logger.info(
                "hyperparameter preset %r: keeping the explicitly set %s=%r (the preset's value is %r)",
                preset, name, getattr(args, name), value,
            )
        return
    setattr(args, name, value)


def apply_hparam_preset(
    args: Any, model: nn.Module | None = None, seq_len: int | None = None, anatomy: Any = None
) -> HParamPreset | None:
    """Apply ``args.moe_hparam_preset`` to ``args`` (and ``model``); returns the preset or ``None``.

    Sets ``learning_rate`` and ``moe_expert_dropout`` (the latter only on an MoE model); with ``model``, the
    dropout outside the experts; with ``seq_len``, ``gradient_accumulation_steps`` for the preset's tokens per
    batch. Arguments the user set explicitly (see the module docstring) keep their values, with a logged note.
    ``anatomy`` is ``describe_moe(model)`` if the caller has it.
    """
    preset = get_preset(getattr(args, "moe_hparam_preset", "none"))
    if preset is None:
        return None
    if model is not None and anatomy is None:
        from .anatomy import describe_moe

        anatomy = describe_moe(model)
    _set_unless_explicit(args, "learning_rate", preset.learning_rate, preset.name)
    if anatomy is None or anatomy.is_moe:  # a dense model has no experts to drop out in
        _set_unless_explicit(args, "moe_expert_dropout", preset.expert_dropout, preset.name)
    if model is not None:
        experts = tuple(model.get_submodule(p) for layer in anatomy.layers for p in layer.expert_paths)
        set_model_dropout(model, preset.dropout, skip=experts)
    if seq_len:
        world = max(1, getattr(args, "world_size", 1))
        steps = accumulation_steps_for(preset.tokens_per_batch, args.per_device_train_batch_size, seq_len, world)
        _set_unless_explicit(args, "gradient_accumulation_steps", steps, preset.name)
    logger.info(
        "hyperparameter preset %r: learning_rate=%g, expert dropout=%g, dropout=%g%s",
        preset.name,
        args.learning_rate,
        getattr(args, "moe_expert_dropout", 0.0),
        preset.dropout,
        f", gradient_accumulation_steps={args.gradient_accumulation_steps}" if seq_len else "",
    )
    return preset


__all__ = [
    "HPARAM_PRESETS",
    "HParamPreset",
    "accumulation_steps_for",
    "apply_hparam_preset",
    "get_preset",
    "set_model_dropout",
]
