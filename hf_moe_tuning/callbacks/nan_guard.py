"""``NaNGuardCallback``: stop (or skip the step) when the training loss or the gradient norm is not finite.

:class:`~hf_moe_tuning.callbacks.router_loss.RouterLossCallback` guards the router logits and router
losses; this callback guards the loss the Trainer back-propagates (the LM loss plus whatever was added
to it) and the gradient norm of each optimizer step (a finite but exploding loss, e.g. with
``learning_rate=1e3``, shows as ``grad_norm=inf`` first). A non-finite loss in any micro-batch of an
optimizer step, or a non-finite gradient norm, on any process, either

* ``policy="error"`` (default): raises :class:`FloatingPointError` naming the optimizer step (as the logs
  number it), the first MoE layer whose router logits were non-finite if any (also with the router losses
  off), and the likely cause – a micro-batch without any labelled token (every label ``-100``, a 0/0 mean
  loss) is named as such –, on every process at once, before ``optimizer.step()``, so no weight has been
  touched; or
* ``policy="skip"``: drops the step's update – every gradient is set to ``None`` before
  ``optimizer.step()``, so no parameter moves, no weight decay is applied and no optimizer moment is
  updated (the learning-rate schedule still advances) – and counts it.

``skip`` has limits (they count the router loss's skipped steps too): the run stops with
:class:`FloatingPointError` at ``max_consecutive_skips`` consecutive skipped steps (default 3), or once
more than ``max_skip_fraction`` (default 10 %) of the optimizer steps so far were skipped; the fraction is
taken over at least ``1 / max_skip_fraction`` steps, so one early skip is allowed. A skipped step's loss is
left out of the logged ``loss`` and of ``train_loss`` (the average is over the steps that trained; an
interval whose steps were all skipped logs no ``loss``) – with a bound trainer (``MoETrainer``,
``MoESFTTrainer``, ``enable_moe_logging``); otherwise the Trainer's ``logging_nan_inf_filter`` decides.

The ``moe_nan_policy``, ``moe_nan_max_consecutive_skips`` and ``moe_nan_max_skip_fraction`` options set
them for both guards.

How the loss is seen: by a forward hook reading ``outputs.loss`` of training forwards (plain
``Trainer``), or – after :meth:`NaNGuardCallback.bind_trainer`, for trainers whose loss is not the
model's ``outputs.loss`` (TRL ``SFTTrainer``, ``compute_loss_func``) – from what
``trainer.training_step`` returns. The gradient norm is the one the bound trainer computes for clipping
and logging; unbound, the guard computes the norm of the gradients itself.

========================== =========================================================
key                        meaning
========================== =========================================================
``nan_guard/skipped_steps`` optimizer steps skipped for a non-finite loss or gradient
                            norm (cumulative, kept across resume; logged with
                            ``policy="skip"`` only)
========================== =========================================================
"""

from __future__ import annotations

import logging
import math
import types
from typing import Any

import torch
from torch import nn
from transformers.trainer_callback import ExportableState

from ..configuration import NAN_POLICIES
from ..hub.run_record import copy_moe_run_to_checkpoint, record_moe_run
from ..reduction import reduce_max
from .base import TRAIN, MoEMetricsCallback, saved_callback_state

logger = logging.getLogger(__name__)


def _first_float_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor) and o.is_floating_point()), None)
    return None


def _no_labelled_token(labels: Any) -> torch.Tensor | None:
    """0-d bool tensor: ``labels`` has no label other than ``-100`` (``None`` without labels)."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
        return None
    return ~(labels != -100).any()


def _output_loss(output: Any) -> torch.Tensor | None:
    """The scalar loss of a model output (``ModelOutput``, dict or tuple whose first item is the loss)."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        loss = output[0] if output[0].dim() == 0 else None
    return loss if isinstance(loss, torch.Tensor) else None


def any_process_flagged(flag: torch.Tensor) -> bool:
    """``True`` when ``flag`` (a 0-d tensor) is non-zero on any training process (one reduction when distributed)."""
    return bool(reduce_max(flag.detach().float().reshape(())).item() > 0)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 gradients), the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


class NaNGuardCallback(MoEMetricsCallback, ExportableState):
    """Raise on, or skip, optimizer steps whose training loss or gradient norm is NaN or infinite.

    Args:
        policy: ``"error"`` or ``"skip"`` (see the module docstring).
        max_consecutive_skips: with ``"skip"``, stop at this many consecutive skipped steps.
        max_skip_fraction: with ``"skip"``, stop once more than this fraction of the steps so far were skipped
            (over at least ``1 / max_skip_fraction`` steps); ``1.0`` means no limit.
    """

    def __init__(
        self, policy: str = "error", max_consecutive_skips: int = 3, max_skip_fraction: float = 0.1, anatomy: Any = None
    ) -> None:
        super().__init__()
        if policy not in NAN_POLICIES:
            raise ValueError(f"moe_nan_policy={policy!r} is not one of {list(NAN_POLICIES)}")
        if isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ValueError(f"moe_nan_max_consecutive_skips must be an int >= 1, got {max_consecutive_skips!r}")
        if isinstance(max_skip_fraction, bool) or not isinstance(max_skip_fraction, (int, float)) or not (
            0.0 < max_skip_fraction <= 1.0
        ):
            raise ValueError(f"moe_nan_max_skip_fraction must be in (0, 1], got {max_skip_fraction!r}")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.max_skip_fraction = float(max_skip_fraction)
        self.anatomy = anatomy
        #: steps this guard skipped (non-finite loss or gradient norm)
        self.skipped_steps = 0
        #: steps skipped for any reason (also by the router loss): what the limits count
        self.skipped_total = 0
        self.consecutive_skips = 0
        self._flag: torch.Tensor | None = None
        self._unlabelled: torch.Tensor | None = None
        self._grad_norm: Any = None
        self._handle: Any = None
        self._router_handles: list[Any] = []
        self._router_flags: dict[int, torch.Tensor] = {}
        self._router_paths: dict[int, str] = {}
        self._bound = False
        self.trainer: Any = None
        self._step_skipped = False
        self._loss_before: torch.Tensor | None = None
        self._router_skips_before = 0
        self._interval_steps = self._interval_skipped = 0
        self._run_steps = self._run_skipped = 0

    @classmethod
    def from_args(cls, args: Any, anatomy: Any = None) -> NaNGuardCallback:
        """Build from the MoE options of ``args`` (``moe_nan_policy``, ``moe_nan_max_consecutive_skips``,
        ``moe_nan_max_skip_fraction``); ``anatomy``: the trainer's ``describe_moe`` of the model, if known."""
        return cls(
            policy=getattr(args, "moe_nan_policy", "error"),
            max_consecutive_skips=getattr(args, "moe_nan_max_consecutive_skips", 3),
            max_skip_fraction=getattr(args, "moe_nan_max_skip_fraction", 0.1),
            anatomy=anatomy,
        )

    # ------------------------------------------------------------------ observing the loss
    def observe(self, loss: torch.Tensor, labels: Any = None) -> None:
        """Record whether ``loss`` is finite, and whether a non-finite one had no labelled token (no host sync)."""
        bad = (~torch.isfinite(loss.detach())).any()
        self._flag = bad if self._flag is None else self._flag | bad.to(self._flag.device)
        empty = _no_labelled_token(labels)
        if empty is not None:
            empty = empty.to(bad.device) & bad
            self._unlabelled = empty if self._unlabelled is None else self._unlabelled | empty.to(self._unlabelled.device)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._bound or not module.training or not torch.is_grad_enabled():
            return
        loss = _output_loss(output)
        if loss is not None:
            self.observe(loss, kwargs.get("labels"))

    def _router_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not module.training or not torch.is_grad_enabled():
                return
            logits = _first_float_tensor(output)
            if logits is None:
                return
            bad = (~torch.isfinite(logits.detach())).any()
            previous = self._router_flags.get(index)
            self._router_flags[index] = bad if previous is None else previous | bad

        return hook

    def _watch_routers(self, model: nn.Module) -> None:
        """Hook every router so a non-finite loss can name the first MoE layer whose logits were non-finite."""
        if self._router_handles:
            return
        from ..anatomy import anatomy_for

        capture = getattr(model, "_hf_moe_router_capture", None)
        try:
            anatomy = anatomy_for(model, self.anatomy if self.anatomy is not None else getattr(capture, "anatomy", None))
            for layer in anatomy.layers:
                router = model.get_submodule(layer.router_path)
                self._router_handles.append(router.register_forward_hook(self._router_hook(layer.index)))
                self._router_paths[layer.index] = layer.path
        except Exception as err:
            logger.debug("NaN guard: routers not watched (%s)", err)

    def _bad_router_layer(self) -> str:
        for index in sorted(self._router_flags):
            if bool(self._router_flags[index]):
                return f"; the router logits of MoE layer {index} ({self._router_paths.get(index, '?')}) are non-finite"
        return ""

    def bind_trainer(self, trainer: Any) -> None:
        """Watch what ``trainer.training_step`` returns and the gradient norm it computes (for any trainer), and
        keep skipped steps out of the logged ``loss`` / ``train_loss``."""
        if self.trainer is trainer:
            return
        self.trainer = trainer
        original = trainer.training_step

        def training_step(bound_self, model, inputs, *args: Any, **kwargs: Any) -> torch.Tensor:
            loss = original(model, inputs, *args, **kwargs)
            self.observe(loss, inputs.get("labels") if isinstance(inputs, dict) or hasattr(inputs, "get") else None)
            return loss

        trainer.training_step = types.MethodType(training_step, trainer)
        get_grad_norm = getattr(trainer, "_get_grad_norm", None)
        if get_grad_norm is not None:

            def recording_get_grad_norm(bound_self, *args: Any, **kwargs: Any) -> Any:
                norm = get_grad_norm(*args, **kwargs)
                self._grad_norm = norm
                return norm

            trainer._get_grad_norm = types.MethodType(recording_get_grad_norm, trainer)
        log = trainer.log

        def skip_aware_log(bound_self, logs: dict, *args: Any, **kwargs: Any) -> None:
            return log(self._exclude_skipped(logs), *args, **kwargs)

        trainer.log = types.MethodType(skip_aware_log, trainer)
        self._bound = True

    # ------------------------------------------------------------------ skipped steps in the logs
    def _exclude_skipped(self, logs: dict) -> dict:
        """``logs`` with the skipped steps left out of ``loss`` and ``train_loss`` (their losses are already
        taken out of the Trainer's running sum; here the step counts are corrected)."""
        if "loss" in logs:
            steps, skipped = self._interval_steps, self._interval_skipped
            self._interval_steps = self._interval_skipped = 0
            if skipped and isinstance(logs["loss"], (int, float)):
                logs = dict(logs)
                if steps > skipped:
                    logs["loss"] = logs["loss"] * steps / (steps - skipped)
                else:
                    del logs["loss"]  # every step of the interval was skipped: there is no loss to report
        if "train_loss" in logs and self._run_skipped and isinstance(logs["train_loss"], (int, float)):
            steps, skipped = self._run_steps, self._run_skipped
            logs["train_loss"] = logs["train_loss"] * steps / (steps - skipped) if steps > skipped else float("nan")
        return logs

    def _router_loss_skips(self) -> int:
        if self.trainer is None:
            return 0
        return sum(
            int(getattr(cb, "skipped_steps", 0))
            for cb in self.trainer.callback_handler.callbacks
            if type(cb).__name__ == "RouterLossCallback"
        )

    # ------------------------------------------------------------------ trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = saved_callback_state(state, self)
        if saved is not None:  # resumed: keep counting from the checkpoint
            attributes = saved.get("attributes", {})
            self.skipped_steps = int(attributes.get("skipped_steps", self.skipped_steps))
            self.skipped_total = int(attributes.get("skipped_total", self.skipped_steps))
            self.consecutive_skips = int(attributes.get("consecutive_skips", 0))
        if model is not None and self._handle is None:
            self._handle = model.register_forward_hook(self._hook, with_kwargs=True)
        if model is not None:
            self._watch_routers(model)
        self._flag = self._unlabelled = self._grad_norm = None
        self._router_flags = {}
        self._interval_steps = self._interval_skipped = 0
        self._run_steps = self._run_skipped = 0
        record_moe_run(args, state, self, model)  # moe_run.json: the policy and limits the card reports

    def on_save(self, args, state, control, **kwargs):
        copy_moe_run_to_checkpoint(args, state)

    def moe_run_settings(self) -> dict[str, Any]:
        """The policy and limits recorded in ``moe_run.json``."""
        return dict(self.state()["args"])

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_skipped = False
        self._router_skips_before = self._router_loss_skips()
        loss = getattr(self.trainer, "_tr_loss", None) if self.trainer is not None else None
        self._loss_before = loss.detach().clone() if isinstance(loss, torch.Tensor) else None

    def _grad_norm_flag(self, model: nn.Module | None, device: torch.device) -> torch.Tensor:
        norm, self._grad_norm = self._grad_norm, None
        if norm is None and model is not None and not self._bound:
            # this process's shard of each gradient (FSDP2 / DTensor grads hold a shard; the flags are reduced over
            # the processes below, so a non-finite element in any shard counts)
            grads = [_local(p.grad.detach()) for p in model.parameters() if p.grad is not None]
            if grads:
                norm = torch.nn.utils.get_total_norm(grads)
        if norm is None:
            return torch.zeros((), device=device)
        norm = torch.as_tensor(norm, device=device, dtype=torch.float32) if not isinstance(norm, torch.Tensor) else norm
        return (~torch.isfinite(norm.detach().float())).any().to(device)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        flag, self._flag = self._flag, None
        unlabelled, self._unlabelled = self._unlabelled, None
        device = flag.device if flag is not None else args.device
        bad_grad = self._grad_norm_flag(model, device)
        parts = [
            flag.to(device) if flag is not None else torch.zeros((), device=device),
            bad_grad.to(device),
            unlabelled.to(device) if unlabelled is not None else torch.zeros((), device=device),
        ]
        values = reduce_max(torch.stack([p.float().reshape(()) for p in parts]))
        bad_loss, bad_norm, no_labels = (v > 0 for v in values.tolist())
        where = self._bad_router_layer() if (bad_loss or bad_norm) else ""
        self._router_flags = {}
        if not (bad_loss or bad_norm):
            return
        step = state.global_step + 1
        what = "non-finite training loss (NaN/inf)" if bad_loss else "non-finite gradient norm (NaN/inf)"
        if no_labels:
            advice = (
                "A micro-batch of this step has no labelled token (every label is -100), so its mean loss is 0/0: "
                "check the labels and the data collator (truncation, prompt masking)"
            )
        else:
            advice = "Lower the learning rate, check the data, or set moe_nan_policy='skip' to skip such steps"
        if self.policy == "error":
            raise FloatingPointError(f"{what} at optimizer step {step}{where}; no update was applied. {advice}")
        if model is not None:
            for param in model.parameters():
                param.grad = None  # optimizers skip parameters without gradient: no update, no decay
        self.skipped_steps += 1
        self._step_skipped = True
        logger.warning("optimizer step %d skipped: %s%s (moe_nan_policy='skip')", step, what, where)

    def on_step_end(self, args, state, control, **kwargs):
        skipped = self._step_skipped or self._router_loss_skips() > self._router_skips_before
        self._step_skipped = False
        self._interval_steps += 1
        self._run_steps += 1
        if skipped:
            self._interval_skipped += 1
            self._run_skipped += 1
            self.skipped_total += 1
            self.consecutive_skips += 1
            loss = getattr(self.trainer, "_tr_loss", None) if self.trainer is not None else None
            if isinstance(loss, torch.Tensor) and self._loss_before is not None:
                with torch.no_grad():
                    loss.copy_(self._loss_before)  # the skipped step's loss (0, NaN or huge) leaves the running sum
            self._check_limits(state.global_step)
        else:
            self.consecutive_skips = 0
        if control.should_log and self.policy == "skip":
            self.push_metrics({"nan_guard/skipped_steps": float(self.skipped_steps)}, kind=TRAIN)

    def _check_limits(self, step: int) -> None:
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise FloatingPointError(
                f"{self.consecutive_skips} consecutive optimizer steps skipped (steps {step - self.consecutive_skips + 1}"
                f"-{step}) for non-finite values; stopping (moe_nan_max_consecutive_skips={self.max_consecutive_skips}). "
                "The model is as it was before the skipped steps. Lower the learning rate or check the data."
            )
        counted = max(step, math.ceil(1.0 / self.max_skip_fraction))
        if self.skipped_total > self.max_skip_fraction * counted:
            raise FloatingPointError(
                f"{self.skipped_total} of the {step} optimizer steps so far were skipped for non-finite values, more "
                f"than {self.max_skip_fraction:.0%} (moe_nan_max_skip_fraction={self.max_skip_fraction:g}); stopping at "
                f"step {step}. Lower the learning rate or check the data."
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for handle in self._router_handles:
            handle.remove()
        self._router_handles = []

    # ------------------------------------------------------------------ ExportableState
    def state(self) -> dict:
        return {
            "args": {
                "policy": self.policy,
                "max_consecutive_skips": self.max_consecutive_skips,
                "max_skip_fraction": self.max_skip_fraction,
            },
            "attributes": {
                "skipped_steps": self.skipped_steps,
                "skipped_total": self.skipped_total,
                "consecutive_skips": self.consecutive_skips,
            },
        }
