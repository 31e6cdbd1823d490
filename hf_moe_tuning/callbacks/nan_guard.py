"""``NaNGuardCallback``: stop (or skip the step) when the training loss is not finite.

:class:`~hf_moe_tuning.callbacks.router_loss.RouterLossCallback` guards the router logits and router
losses; this callback guards the loss the Trainer back-propagates (the LM loss plus whatever was added
to it). A non-finite loss in any micro-batch of an optimizer step, on any process, either

* ``policy="error"`` (default): raises :class:`FloatingPointError` naming the optimizer step, on every
  process at once (before ``optimizer.step()``, so no weight has been touched), or
* ``policy="skip"``: drops the step's update – every gradient is set to ``None`` before
  ``optimizer.step()``, so no parameter moves, no weight decay is applied and no optimizer moment is
  updated (the learning-rate schedule still advances) – and counts it.

The ``moe_nan_policy`` option sets the policy for both guards. The Trainer's own
``logging_nan_inf_filter`` (default on) keeps the logged ``loss`` finite on skipped steps.

How the loss is seen: by a forward hook reading ``outputs.loss`` of training forwards (plain
``Trainer``), or – after :meth:`NaNGuardCallback.bind_trainer`, for trainers whose loss is not the
model's ``outputs.loss`` (TRL ``SFTTrainer``, ``compute_loss_func``) – from what
``trainer.training_step`` returns.

========================== =========================================================
key                        meaning
========================== =========================================================
``nan_guard/skipped_steps`` optimizer steps skipped for a non-finite loss (cumulative,
                            kept across resume; logged with ``policy="skip"`` only)
========================== =========================================================
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers.trainer_callback import ExportableState

from ..configuration import NAN_POLICIES
from ..hub.run_record import copy_moe_run_to_checkpoint, record_moe_run
from .base import TRAIN, MoEMetricsCallback, saved_callback_state

logger = logging.getLogger(__name__)


def _output_loss(output: Any) -> torch.Tensor | None:
    """The scalar loss of a model output (``ModelOutput``, dict or tuple whose first item is the loss)."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        loss = output[0] if output[0].dim() == 0 else None
    return loss if isinstance(loss, torch.Tensor) else None


def any_process_flagged(flag: torch.Tensor) -> bool:
    """``True`` when ``flag`` (a 0-d tensor) is non-zero on any process (one ``all_reduce`` when distributed)."""
    flag = flag.detach().float().reshape(())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = flag.clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


class NaNGuardCallback(MoEMetricsCallback, ExportableState):
    """Raise on, or skip, optimizer steps whose training loss is NaN or infinite.

    Args:
        policy: ``"error"`` or ``"skip"`` (see the module docstring).
    """

    def __init__(self, policy: str = "error") -> None:
        super().__init__()
        if policy not in NAN_POLICIES:
            raise ValueError(f"moe_nan_policy={policy!r} is not one of {list(NAN_POLICIES)}")
        self.policy = policy
        self.skipped_steps = 0
        self._flag: torch.Tensor | None = None
        self._handle: Any = None
        self._bound = False

    @classmethod
    def from_args(cls, args: Any) -> "NaNGuardCallback":
        """Build from the MoE options of ``args`` (``moe_nan_policy``)."""
        return cls(policy=getattr(args, "moe_nan_policy", "error"))

    # ------------------------------------------------------------------ observing the loss
    def observe(self, loss: torch.Tensor) -> None:
        """Record whether ``loss`` is finite (no host sync; read once per optimizer step)."""
        bad = (~torch.isfinite(loss.detach())).any()
        self._flag = bad if self._flag is None else self._flag | bad.to(self._flag.device)

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._bound or not module.training or not torch.is_grad_enabled():
            return
        loss = _output_loss(output)
        if loss is not None:
            self.observe(loss)

    def bind_trainer(self, trainer: Any) -> None:
        """Watch what ``trainer.training_step`` returns instead of ``outputs.loss`` (for any trainer)."""
        original = trainer.training_step

        def training_step(bound_self, *args: Any, **kwargs: Any) -> torch.Tensor:
            loss = original(*args, **kwargs)
            self.observe(loss)
            return loss

        trainer.training_step = types.MethodType(training_step, trainer)
        self._bound = True

    # ------------------------------------------------------------------ trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = saved_callback_state(state, self)
        if saved is not None:  # resumed: keep counting from the checkpoint
            self.skipped_steps = int(saved.get("attributes", {}).get("skipped_steps", self.skipped_steps))
        if model is not None and self._handle is None:
            self._handle = model.register_forward_hook(self._hook)
        self._flag = None
        record_moe_run(args, state, self, model)  # moe_run.json: the policy and limits the card reports

    def on_save(self, args, state, control, **kwargs):
        copy_moe_run_to_checkpoint(args, state)

    def moe_run_settings(self) -> dict[str, Any]:
        """The policy and limits recorded in ``moe_run.json``."""
        return dict(self.state()["args"])

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        flag, self._flag = self._flag, None
        if flag is None and not (dist.is_available() and dist.is_initialized()):
            return
        if not any_process_flagged(flag if flag is not None else torch.zeros((), device=args.device)):
            return
        step = state.global_step + 1
        if self.policy == "error":
            raise FloatingPointError(
                f"non-finite training loss (NaN/inf) at optimizer step {step}; no update was applied. Lower the "
                "learning rate, check the data, or set moe_nan_policy='skip' to skip such steps"
            )
        if model is not None:
            for param in model.parameters():
                param.grad = None  # optimizers skip parameters without gradient: no update, no decay
        self.skipped_steps += 1
        logger.warning("optimizer step %d skipped: non-finite training loss (moe_nan_policy='skip')", step)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log and self.policy == "skip":
            self.push_metrics({"nan_guard/skipped_steps": float(self.skipped_steps)}, kind=TRAIN)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ------------------------------------------------------------------ ExportableState
    def state(self) -> dict:
        return {"args": {"policy": self.policy}, "attributes": {"skipped_steps": self.skipped_steps}}
