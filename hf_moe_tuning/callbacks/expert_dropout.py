"""``ExpertDropoutCallback``: dropout inside the routed experts only while training (Switch: 0.4).

Thin wrapper over :func:`hf_moe_tuning.routing.expert_dropout.apply_expert_dropout`; installed in
``on_init_end`` (so evaluation before training sees the same model), removed by :meth:`remove`.
Dropout follows ``model.training``: off during evaluation and prediction.

==========================  ==========================================
key                         meaning
==========================  ==========================================
``moe/expert_dropout``      the dropout rate inside experts
==========================  ==========================================
"""

from __future__ import annotations

from typing import Any

from ..anatomy import MoEAnatomy, anatomy_for
from ..routing.expert_dropout import apply_expert_dropout, validate_dropout
from .base import ModelPatchCallback


class ExpertDropoutCallback(ModelPatchCallback):
    """Set dropout rate ``p`` inside the routed experts of the trained model."""

    def __init__(self, p: float, anatomy: MoEAnatomy | None = None) -> None:
        super().__init__(anatomy)
        self.p = validate_dropout(p)

    @classmethod
    def from_args(cls, args: Any, anatomy: MoEAnatomy | None = None) -> ExpertDropoutCallback | None:
        """The callback for ``args.moe_expert_dropout > 0``, else ``None``."""
        p = getattr(args, "moe_expert_dropout", 0.0)
        return cls(p, anatomy) if p > 0 else None

    def _install(self, model: Any):
        return apply_expert_dropout(model, self.p, anatomy_for(model, self.anatomy))

    def _metrics(self) -> dict[str, float]:
        return {"moe/expert_dropout": self.p}
