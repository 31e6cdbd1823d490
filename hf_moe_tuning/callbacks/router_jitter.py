"""``RouterJitterCallback``: multiplicative router-input jitter while training, where the family supports it.

Thin wrapper over :func:`hf_moe_tuning.routing.jitter.set_router_jitter` (Switch Transformers, Mixtral,
MiniMax, PhiMoE, DBRX); the family applies the noise in training mode only.

======================  ===============================
key                     meaning
======================  ===============================
``moe/router_jitter``   jitter ``eps`` of ``U(1-eps, 1+eps)``
======================  ===============================
"""

from __future__ import annotations

from typing import Any

from ..anatomy import MoEAnatomy, anatomy_for
from ..routing.jitter import set_router_jitter, validate_jitter
from .base import ModelPatchCallback


class RouterJitterCallback(ModelPatchCallback):
    """Set the router jitter of every MoE layer to ``eps``."""

    def __init__(self, eps: float, anatomy: MoEAnatomy | None = None) -> None:
        super().__init__(anatomy)
        self.eps = validate_jitter(eps)

    @classmethod
    def from_args(cls, args: Any, anatomy: MoEAnatomy | None = None) -> RouterJitterCallback | None:
        """The callback when ``moe_router_jitter`` is set, else ``None``."""
        eps = getattr(args, "moe_router_jitter", None)
        return cls(eps, anatomy) if eps is not None else None

    def _install(self, model: Any):
        return set_router_jitter(model, self.eps, anatomy_for(model, self.anatomy))

    def _metrics(self) -> dict[str, float]:
        return {"moe/router_jitter": self.eps}
