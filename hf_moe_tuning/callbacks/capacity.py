"""``CapacityFactorCallback``: expert capacity factors for training and evaluation (Switch, NLLB-MoE).

Thin wrapper over :func:`hf_moe_tuning.routing.capacity.apply_capacity_factors` (ST-MoE fine-tuned with
1.25 for training and 2.0 for evaluation). Installed in ``on_init_end`` so ``trainer.evaluate()`` uses the
eval factor even before training.

===============================  =========================================
key                              meaning
===============================  =========================================
``moe/capacity_factor_train``    capacity factor while training
``moe/capacity_factor_eval``     capacity factor at evaluation
===============================  =========================================
"""

from __future__ import annotations

from typing import Any

from ..anatomy import MoEAnatomy, anatomy_for
from ..routing.capacity import apply_capacity_factors, validate_capacity_factor
from .base import ModelPatchCallback


class CapacityFactorCallback(ModelPatchCallback):
    """Size expert capacity from ``train_factor`` / ``eval_factor`` (``None``: the family's own capacity)."""

    def __init__(
        self, train_factor: float | None = None, eval_factor: float | None = None, anatomy: MoEAnatomy | None = None
    ) -> None:
        super().__init__(anatomy)
        self.train_factor = validate_capacity_factor(train_factor, "moe_capacity_factor_train")
        self.eval_factor = validate_capacity_factor(eval_factor, "moe_capacity_factor_eval")
        if self.train_factor is None and self.eval_factor is None:
            raise ValueError("CapacityFactorCallback needs a train or an eval capacity factor")

    @classmethod
    def from_args(cls, args: Any, anatomy: MoEAnatomy | None = None) -> CapacityFactorCallback | None:
        """The callback when ``moe_capacity_factor_train`` or ``moe_capacity_factor_eval`` is set, else ``None``."""
        train = getattr(args, "moe_capacity_factor_train", None)
        evaluation = getattr(args, "moe_capacity_factor_eval", None)
        return cls(train, evaluation, anatomy) if train is not None or evaluation is not None else None

    def _install(self, model: Any):
        return apply_capacity_factors(model, self.train_factor, self.eval_factor, anatomy_for(model, self.anatomy))

    def _metrics(self) -> dict[str, float]:
        metrics = {}
        if self.train_factor is not None:
            metrics["moe/capacity_factor_train"] = self.train_factor
        if self.eval_factor is not None:
            metrics["moe/capacity_factor_eval"] = self.eval_factor
        return metrics
