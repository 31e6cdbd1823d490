"""Expert capacity factors for training and evaluation (Switch Transformers, NLLB-MoE).

Families that drop tokens past an expert's capacity take an absolute ``expert_capacity`` from their
config. A capacity factor ``c`` instead sizes it from each routing group, as in Mesh-TF / ST-MoE:

    capacity = ceil(c * group_tokens * top_k / num_experts)

where a routing group is what the family counts capacity over: one sequence for Switch (its router
sees ``[batch, seq, hidden]`` and counts per sequence), the whole batch for NLLB-MoE (flattened
tokens). ST-MoE fine-tunes with ``1.25`` for training and ``2.0`` for evaluation. A forward pre-hook on
each router sets ``expert_capacity`` from the factor of the current mode (``module.training``); a mode
without a factor keeps the family's own capacity.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..anatomy import MoEAnatomy, describe_moe, require_moe

logger = logging.getLogger(__name__)

#: Families whose routers drop tokens by capacity (anatomy ``MoELayer.capacity``).
CAPACITY_FAMILIES = "Switch Transformers (switch_transformers), NLLB-MoE (nllb_moe)"


def validate_capacity_factor(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def expert_capacity(group_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Tokens (routing assignments) an expert takes per routing group: ``ceil(factor * tokens * k / E)``, at least 1."""
    if num_experts <= 0 or top_k <= 0 or group_tokens < 0:
        raise ValueError(f"invalid routing shape: tokens={group_tokens}, num_experts={num_experts}, top_k={top_k}")
    return max(1, math.ceil(factor * group_tokens * top_k / num_experts))


@dataclass
class CapacityControl:
    """Capacity-factor hooks on a model's routers; :meth:`remove` restores the family's own capacity."""

    train_factor: float | None
    eval_factor: float | None
    _routers: list[tuple[nn.Module, dict[str, Any]]] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for router, original in self._routers:
            for key, value in original.items():
                setattr(router, key, value)
        self._routers.clear()


def apply_capacity_factors(
    model: nn.Module,
    train_factor: float | None = None,
    eval_factor: float | None = None,
    anatomy: MoEAnatomy | None = None,
) -> CapacityControl:
    """Size expert capacity from ``train_factor`` while training and ``eval_factor`` in eval mode.

    Raises:
        ValueError: a factor ``<= 0``, or a model whose family routes without capacity (names the
            supported families).
    """
    train_factor = validate_capacity_factor(train_factor, "moe_capacity_factor_train")
    eval_factor = validate_capacity_factor(eval_factor, "moe_capacity_factor_eval")
    anatomy = anatomy or describe_moe(model)
    require_moe(anatomy, "A capacity factor")
    layers = [layer for layer in anatomy.layers if layer.capacity]
    if not layers:
        raise ValueError(
            f"a capacity factor was set, but model_type={anatomy.model_type!r} routes without an expert capacity "
            f"(no token dropping); capacity factors apply to {CAPACITY_FAMILIES}"
        )
    control = CapacityControl(train_factor, eval_factor)
    for layer in layers:
        router = model.get_submodule(layer.router_group_path)
        if not hasattr(router, "expert_capacity"):
            raise ValueError(f"router {layer.router_group_path} ({type(router).__name__}) has no expert_capacity attribute")
        original = {"expert_capacity": router.expert_capacity}
        if hasattr(router, "moe_eval_capacity_token_fraction"):  # NLLB-MoE sizes eval capacity itself
            original["moe_eval_capacity_token_fraction"] = router.moe_eval_capacity_token_fraction
        control._routers.append((router, original))
        control._handles.append(router.register_forward_pre_hook(_capacity_hook(layer.num_experts, layer.top_k, control, original)))
    logger.info("capacity factors: train=%s eval=%s on %d MoE layers", train_factor, eval_factor, len(layers))
    return control


def _capacity_hook(num_experts: int, top_k: int, control: CapacityControl, original: dict[str, Any]):
    def hook(module: nn.Module, args: Any) -> None:
        factor = control.train_factor if module.training else control.eval_factor
        if factor is None:
            for key, value in original.items():
                setattr(module, key, value)
            return
        hidden = args[0]
        group_tokens = hidden.shape[-2] if hidden.dim() >= 2 else hidden.shape[0]
        module.expert_capacity = expert_capacity(int(group_tokens), num_experts, top_k, factor)
        if "moe_eval_capacity_token_fraction" in original:
            module.moe_eval_capacity_token_fraction = 0.0

    return hook
