"""Router jitter: multiplicative noise ``x * U(1 - eps, 1 + eps)`` on the router input while training, for
families that implement it (Switch Transformers and Mixtral/MiniMax ``jitter_noise``, PhiMoE
``router_jitter_noise``, DBRX ``moe_jitter_eps``). The family's own code applies it only in training mode.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..anatomy import MoEAnatomy, describe_moe, require_moe

logger = logging.getLogger(__name__)

#: Attributes through which transformers' MoE modules read their router jitter.
JITTER_ATTRIBUTES: tuple[str, ...] = ("jitter_noise", "router_jitter_noise", "moe_jitter_eps")


def validate_jitter(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"moe_router_jitter must be a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"moe_router_jitter must be in [0, 1), got {value}")
    return float(value)


@dataclass
class RouterJitter:
    """Jitter set on a model; :meth:`remove` restores the original values."""

    value: float
    modules: list[tuple[Any, str, Any]] = field(default_factory=list)

    def remove(self) -> None:
        for module, attr, original in self.modules:
            setattr(module, attr, original)
        self.modules.clear()


def set_router_jitter(model: nn.Module, value: float, anatomy: MoEAnatomy | None = None) -> RouterJitter:
    """Set the router jitter of every MoE layer to ``value``.

    Raises:
        ValueError: ``value`` outside ``[0, 1)`` or a family without router jitter (names those with it).
    """
    value = validate_jitter(value)
    anatomy = anatomy or describe_moe(model)
    require_moe(anatomy, "Router jitter")
    jitter = RouterJitter(value)
    for layer in anatomy.layers:
        candidates = [model.get_submodule(layer.router_group_path), model.get_submodule(layer.path)]
        found = next(((m, a) for m in candidates for a in JITTER_ATTRIBUTES if isinstance(getattr(m, a, None), (int, float))), None)
        if found is None:
            jitter.remove()
            raise ValueError(
                f"model_type={anatomy.model_type!r} has no router jitter (layer {layer.path}); router jitter is "
                "supported where the family implements it: Switch Transformers, Mixtral, MiniMax, PhiMoE, DBRX"
            )
        module, attr = found
        jitter.modules.append((module, attr, getattr(module, attr)))
        setattr(module, attr, value)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "router_jitter_noise"):  # saved configs then record the jitter used
        jitter.modules.append((config, "router_jitter_noise", config.router_jitter_noise))
        config.router_jitter_noise = value
    logger.info("router jitter %.3f on %d MoE layers", value, len(jitter.modules))
    return jitter
