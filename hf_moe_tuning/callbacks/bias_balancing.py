"""``BiasBalancingCallback``: auxiliary-loss-free load balancing (DeepSeek-V3) for any ``Trainer``.

Thin wrapper over :class:`hf_moe_tuning.routing.bias_balancing.BiasBalancer`: the hooks count the experts
chosen in every training forward; after each optimizer step (``on_step_end``) every layer's bias moves by
``rate * sign(mean load - load)``. DeepSeek-V3-style ``e_score_correction_bias`` buffers are updated in
place (and saved with the model); other families use a routing-bias hook whose biases are kept in this
callback's state in ``trainer_state.json`` and restored on resume.

======================================  =============================================================
key                                     meaning
======================================  =============================================================
``moe/layer{i}/bias_max_violation``     MaxVio ``max(c)/mean(c) - 1`` of the step's load of layer i
``moe/bias_max_violation_mean``         its mean over MoE layers
``moe/bias_range``                      largest ``max(b) - min(b)`` over layers
======================================  =============================================================
"""

from __future__ import annotations

import logging
from typing import Any

from transformers.trainer_callback import ExportableState

from ..anatomy import MoEAnatomy, anatomy_for
from ..hub.run_record import copy_moe_run_to_checkpoint, record_moe_run
from ..routing.bias_balancing import BiasBalancer
from .base import MoEMetricsCallback

logger = logging.getLogger(__name__)


class BiasBalancingCallback(MoEMetricsCallback, ExportableState):
    """Update per-expert routing biases from the load after every training step.

    Args:
        rate: update rate ``gamma`` (DeepSeek-V3 used 0.001).
        allow_hooks: balance families without a correction bias through a routing-bias hook.
        anatomy: the trainer's anatomy of the model (computed on install when ``None``).
    """

    def __init__(self, rate: float = 1e-3, allow_hooks: bool = True, anatomy: MoEAnatomy | None = None) -> None:
        super().__init__()
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            raise ValueError(f"moe_bias_update_rate must be > 0 for bias balancing, got {rate!r}")
        self.rate = float(rate)
        self.allow_hooks = allow_hooks
        self.anatomy = anatomy
        self.balancer: BiasBalancer | None = None
        self._stats: dict[str, float] = {}

    @classmethod
    def from_args(cls, args: Any, anatomy: MoEAnatomy | None = None) -> BiasBalancingCallback | None:
        """The callback for ``moe_bias_balancing=True`` (rate ``moe_bias_update_rate``), else ``None``."""
        if not getattr(args, "moe_bias_balancing", False):
            return None
        return cls(rate=args.moe_bias_update_rate, anatomy=anatomy)

    def install(self, model: Any) -> None:
        if self.balancer is None:
            self.balancer = BiasBalancer(
                model, rate=self.rate, allow_hooks=self.allow_hooks, anatomy=anatomy_for(model, self.anatomy)
            )

    def remove(self) -> None:
        if self.balancer is not None:
            self.balancer.remove()
            self.balancer = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.install(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.install(model)
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        biases = (saved or {}).get("attributes", {}).get("hook_biases")
        if biases:
            self.balancer.load_hook_biases(biases)
            logger.info("restored routing-bias hooks of %d MoE layers from the checkpoint", len(biases))
        self.balancer.reset_counts()
        record_moe_run(args, state, self, model)

    def on_save(self, args, state, control, **kwargs):
        copy_moe_run_to_checkpoint(args, state)

    def moe_run_settings(self) -> dict:
        """The settings recorded in ``moe_run.json``."""
        return {"rate": self.rate, "allow_hooks": self.allow_hooks}

    def on_step_end(self, args, state, control, **kwargs):
        stats = self.balancer.step()
        if stats:
            self._stats = stats
        if control.should_log and self._stats:
            self.push_metrics(dict(self._stats))

    def state(self) -> dict:
        return {
            "args": {"rate": self.rate, "allow_hooks": self.allow_hooks},
            "attributes": {"hook_biases": self.balancer.hook_biases() if self.balancer is not None else {}},
        }
