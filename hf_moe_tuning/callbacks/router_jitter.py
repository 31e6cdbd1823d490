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

from ..routing.jitter import RouterJitter, set_router_jitter, validate_jitter
from .base import MoEMetricsCallback


class RouterJitterCallback(MoEMetricsCallback):
    """Set the router jitter of every MoE layer to ``eps``."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = validate_jitter(eps)
        self.handle: RouterJitter | None = None

    @classmethod
    def from_args(cls, args: Any) -> "RouterJitterCallback | None":
        """The callback when ``moe_router_jitter`` is set, else ``None``."""
        eps = getattr(args, "moe_router_jitter", None)
        return cls(eps) if eps is not None else None

    def install(self, model: Any) -> None:
        if self.handle is None:
            self.handle = set_router_jitter(model, self.eps)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.install(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.install(model)
        self.push_metrics({"moe/router_jitter": self.eps})
