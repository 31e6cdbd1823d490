"""``RouterLossCallback``: add the router aux and z losses to the training loss, scaled, scheduled, logged apart.

``total = lm_loss + aux_coef(step) · aux_loss + z_coef(step) · z_loss`` with the losses of
:mod:`hf_moe_tuning.router_loss`, computed from the router logits that
:class:`~hf_moe_tuning.routing.capture.RouterCapture` records (no dependence on ``output_router_logits``).

How the loss gets in
--------------------
* **Plain ``transformers.Trainer``** (nothing else needed): a forward hook on the top-level model adds
  the weighted router losses to ``outputs.loss`` while ``model.training``.
* **Bound trainers** (``MoETrainer``, or any trainer after :meth:`RouterLossCallback.bind_trainer`,
  which :func:`hf_moe_tuning.enable_moe_logging` calls): the term is added to what
  ``trainer.compute_loss`` returns instead. Needed for trainers that do not use ``outputs.loss``,
  such as TRL's ``SFTTrainer`` (its loss comes from fused-head log-probs) or a ``compute_loss_func``.
  If the router term is never back-propagated (e.g. an unbound ``SFTTrainer``), the first optimizer
  step raises an error instead of training silently without it.

While the callback trains, the model's built-in router loss is off: ``config.output_router_logits``
is set to ``False`` and the model's ``router_aux_loss_coef`` / ``router_z_loss_coef`` attributes (the
model config's, not this package's ``moe_aux_loss_coef`` / ``moe_z_loss_coef``) are set to 0; both are
restored at train end. A training forward that explicitly asks for ``output_router_logits=True`` (e.g.
TRL's plain ``SFTTrainer`` with a non-zero ``SFTConfig.router_aux_loss_coef``) raises, since that caller
adds the model's aux loss on top; :class:`~hf_moe_tuning.sft.MoESFTTrainer` switches TRL's off itself.

Scaling (transformers issue #48690)
-----------------------------------
The router loss of an optimizer step is the mean over the sequences of the *global* batch (all
micro-batches of the accumulation window, all processes) of the per-sequence losses (see
:mod:`hf_moe_tuning.router_loss`). Each micro-batch adds ``c · Σ_{s in micro-batch} ℓ_s · P / (g · S)``
where ``S`` is the number of sequences of the global batch, ``P`` the data-parallel world size (DDP
averages gradients over processes) and ``g`` the factor the Trainer applies to the loss before
``backward``: in ``Trainer.training_step`` the loss is divided by the accumulation steps unless it is
"scaled for GA" (the model received ``num_items_in_batch``, or a ``compute_loss_func`` is set), and in
``Trainer.compute_loss`` it is multiplied by the number of processes when
``average_tokens_across_devices`` applies. Summed over micro-batches and averaged over processes, the
gradient is then exactly ``c · ∇ mean_s ℓ_s``, the same for 1×8, 4×2 and 2 processes × 4.

``S`` is counted exactly by a bound trainer (its ``get_batch_samples`` is wrapped); with the forward
hook it is ``batch size × micro-batches in the window × processes`` (exact when micro-batches hold
equal numbers of sequences, i.e. all but a short last batch of an epoch with ``dataloader_drop_last=False``).

Logged keys (averaged over the logging interval and over processes; ``eval_`` prefixed in evaluation)
------------------------------------------------------------------------------------------------------
``lm_loss`` (the loss without the router terms, on the scale of the Trainer's ``loss``),
``router/aux_loss``, ``router/z_loss``, ``router/aux_coef``, ``router/z_coef`` and, with
``nan_policy="skip"``, ``router/skipped_steps`` (cumulative).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..anatomy import MoEAnatomy, anatomy_for, require_moe
from ..configuration import NAN_POLICIES
from ..hub.run_record import copy_moe_run_to_checkpoint, record_moe_run
from ..reduction import reduce_max, reduce_sum, training_world_size
from ..router_loss import (
    RouterLosses,
    RoutingSpec,
    coefficient_at,
    compute_router_losses,
    routing_spec,
    validate_coefficient,
    validate_schedule,
)
from ..routing.capture import RouterCapture
from .base import EVAL, TRAIN, MoEMetricsCallback, saved_callback_state

logger = logging.getLogger(__name__)

_BUILTIN_COEF_ATTRS = ("router_aux_loss_coef", "router_z_loss_coef")


def accumulation_window(global_step: int, steps_in_epoch: int | None, accumulation_steps: int) -> int:
    """Micro-batches in the accumulation window that starts after ``global_step`` optimizer steps.

    Mirrors ``Trainer._inner_training_loop``: every window holds ``accumulation_steps`` micro-batches
    except the last of an epoch, which holds the remainder of ``steps_in_epoch`` (batches per epoch).
    """
    if not steps_in_epoch or accumulation_steps <= 1:
        return max(1, accumulation_steps)
    updates_per_epoch = max(1, math.ceil(steps_in_epoch / accumulation_steps))
    k = global_step % updates_per_epoch
    if k == updates_per_epoch - 1:
        return steps_in_epoch - k * accumulation_steps
    return accumulation_steps


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, dict):
        for key in ("input_ids", "labels", "attention_mask", "inputs_embeds", "decoder_input_ids"):
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and value.ndim >= 1:
                return int(value.shape[0])
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim >= 1:
                return int(value.shape[0])
    return None


def _output_loss(output: Any) -> torch.Tensor | None:
    if isinstance(output, dict) or hasattr(output, "keys"):
        return output.get("loss")
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor) and output[0].ndim == 0:
        return output[0]
    return None


def _with_loss(output: Any, loss: torch.Tensor) -> Any:
    if isinstance(output, dict) or hasattr(output, "keys"):
        output["loss"] = loss
        return output
    return (loss, *output[1:]) if isinstance(output, tuple) else [loss, *output[1:]]


def _unless(bad: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``value``, or 0 where the 0-d bool ``bad`` is set (on the device, no host sync)."""
    return value if bad is None else torch.where(bad, torch.zeros_like(value), value)


def _zero_loss(loss: torch.Tensor) -> torch.Tensor:
    """A zero that keeps ``loss``'s graph (``backward`` still runs; its gradients are dropped)."""
    return torch.nan_to_num(loss * 0.0, nan=0.0, posinf=0.0, neginf=0.0)


class RouterLossCallback(MoEMetricsCallback, ExportableState):
    """Add scheduled router aux / z losses to the training loss and log them apart (see module docstring).

    Args:
        aux_coef: weight of the load-balancing loss (ST-MoE: 0.01); 0 disables it.
        z_coef: weight of the router z-loss (ST-MoE: 0.001); 0 disables it.
        aux_schedule / z_schedule: ``"constant"``, ``"linear_warmup"``, ``"cosine"`` or ``"off"``.
        warmup_steps: warmup steps of ``linear_warmup`` and ``cosine``.
        nan_policy: ``"error"`` (raise, naming the MoE layer and step) or ``"skip"`` (drop the step's
            update and count it in ``router/skipped_steps``) on non-finite router logits.
        anatomy: the trainer's anatomy of the model (computed when attaching if ``None``).

    Example (plain ``Trainer``):
        >>> cb = RouterLossCallback(aux_coef=0.01, z_coef=0.001)
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
        >>> enable_moe_logging(trainer)  # optional: metrics reach TensorBoard/W&B (and SFTTrainer needs it)
    """

    def __init__(
        self,
        aux_coef: float = 0.01,
        z_coef: float = 0.001,
        aux_schedule: str = "constant",
        z_schedule: str = "constant",
        warmup_steps: int = 0,
        nan_policy: str = "error",
        anatomy: MoEAnatomy | None = None,
    ) -> None:
        super().__init__()
        self.aux_coef = validate_coefficient("moe_aux_loss_coef", aux_coef)
        self.z_coef = validate_coefficient("moe_z_loss_coef", z_coef)
        self.aux_schedule = validate_schedule("moe_aux_loss_schedule", aux_schedule)
        self.z_schedule = validate_schedule("moe_z_loss_schedule", z_schedule)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"moe_router_loss_warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"moe_nan_policy={nan_policy!r} is not one of {list(NAN_POLICIES)}")
        self.nan_policy = nan_policy
        self.anatomy = anatomy
        if not self.active:
            raise ValueError(
                "RouterLossCallback with both router losses off (coefficient 0 or schedule 'off') does nothing; "
                "use RouterLossCallback.from_args(args), which returns None in that case"
            )
        self.model: nn.Module | None = None
        self.capture: RouterCapture | None = None
        self.specs: dict[int, RoutingSpec] = {}
        self.trainer: Any = None
        self._handles: list[Any] = []
        self._restore: list[tuple[Any, str, Any]] = []
        # trainer geometry
        self._step = 0
        self._max_steps: int | None = None
        self._accumulation_steps = 1
        self._steps_in_epoch: int | None = None
        self._window = 1
        self._window_sequences: int | None = None
        self._world_size = 1
        self._average_tokens = True
        # per-micro-batch hand-off to a bound compute_loss
        self._pending_terms: list[torch.Tensor] = []
        self._micro_batch_bad: torch.Tensor | None = None  # 0-d bool on the device: non-finite router losses
        # NaN policy (read once per optimizer step, in on_pre_optimizer_step) and back-propagation probe
        self._layer_ids: list[int] = []
        self._bad_layers: torch.Tensor | None = None  # [MoE layers] bool on the device, OR over the step's forwards
        self.skipped_steps = 0
        self._terms_added = 0
        self._term_backpropagated = False
        self._probe_checked = False
        self._reset_train_interval()
        self._reset_eval()

    # ------------------------------------------------------------------ construction
    @property
    def aux_on(self) -> bool:
        return self.aux_coef > 0 and self.aux_schedule != "off"

    @property
    def z_on(self) -> bool:
        return self.z_coef > 0 and self.z_schedule != "off"

    @property
    def active(self) -> bool:
        return self.aux_on or self.z_on

    @classmethod
    def from_args(cls, args: TrainingArguments, anatomy: MoEAnatomy | None = None) -> RouterLossCallback | None:
        """Build from the MoE options of ``args`` (``moe_*_loss_*`` fields); ``None`` when both losses are off."""
        aux = validate_coefficient("moe_aux_loss_coef", getattr(args, "moe_aux_loss_coef", 0.0))
        z = validate_coefficient("moe_z_loss_coef", getattr(args, "moe_z_loss_coef", 0.0))
        aux_schedule = validate_schedule("moe_aux_loss_schedule", getattr(args, "moe_aux_loss_schedule", "constant"))
        z_schedule = validate_schedule("moe_z_loss_schedule", getattr(args, "moe_z_loss_schedule", "constant"))
        if not ((aux > 0 and aux_schedule != "off") or (z > 0 and z_schedule != "off")):
            return None
        return cls(
            aux_coef=aux,
            z_coef=z,
            aux_schedule=aux_schedule,
            z_schedule=z_schedule,
            warmup_steps=getattr(args, "moe_router_loss_warmup_steps", 0),
            nan_policy=getattr(args, "moe_nan_policy", "error"),
            anatomy=anatomy,
        )

    def coefficients(self, step: int | None = None) -> tuple[float, float]:
        """``(aux_coef, z_coef)`` at optimizer step ``step`` (default: the current one)."""
        step = self._step if step is None else step
        aux = coefficient_at(step, self.aux_coef, self.aux_schedule, self.warmup_steps, self._max_steps)
        z = coefficient_at(step, self.z_coef, self.z_schedule, self.warmup_steps, self._max_steps)
        return aux, z

    # ------------------------------------------------------------------ binding to a trainer
    def bind_trainer(self, trainer: Any) -> None:
        """Add the router term to ``trainer.compute_loss``'s result (instead of ``outputs.loss``).

        Use it for trainers whose loss is not ``outputs.loss`` (TRL ``SFTTrainer``, ``compute_loss_func``,
        label smoothing); ``MoETrainer`` and ``enable_moe_logging`` call it. It also counts the sequences
        of each global batch exactly (wrapping ``trainer.get_batch_samples``).
        """
        if self.trainer is trainer:
            return
        if self.trainer is not None:
            raise ValueError("RouterLossCallback is already bound to another trainer")
        self.trainer = trainer
        compute_loss = trainer.compute_loss
        get_batch_samples = trainer.get_batch_samples

        def bound_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            self._pending_terms = []
            self._micro_batch_bad = None
            result = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if not (model.training and torch.is_grad_enabled()):
                return result
            loss, rest = (result[0], result[1:]) if return_outputs else (result, ())
            loss = self._finish_bound_loss(trainer, loss, num_items_in_batch)
            return (loss, *rest) if return_outputs else loss

        def counting_get_batch_samples(epoch_iterator, num_batches, device):
            batches, num_items = get_batch_samples(epoch_iterator, num_batches, device)
            sizes = [_batch_size(b) for b in batches]
            if batches and all(s is not None for s in sizes) and training_world_size() == 1:
                self._window_sequences = sum(sizes)
            elif batches and all(s is not None for s in sizes):
                total = torch.tensor(float(sum(sizes)), device=device)
                self._window_sequences = int(reduce_sum(total).item())
            else:
                self._window_sequences = None
            return batches, num_items

        trainer.compute_loss = bound_compute_loss
        trainer.get_batch_samples = counting_get_batch_samples

    def _finish_bound_loss(self, trainer: Any, loss: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
        bad, self._micro_batch_bad = self._micro_batch_bad, None
        scaled = trainer.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                trainer.compute_loss_func is not None
            )
        window = max(1, int(getattr(trainer, "current_gradient_accumulation_steps", self._accumulation_steps)))
        factor = 1.0 if scaled else 1.0 / window
        self._lm_sum = self._lm_sum + _unless(bad, factor * loss.detach().float())
        terms, self._pending_terms = self._pending_terms, []
        total = self._add_term(loss, torch.stack(terms).sum(), factor, window) if terms else loss
        # a micro-batch with non-finite router losses contributes nothing (decided on the device, no host sync);
        # the step is stopped or skipped in on_pre_optimizer_step
        return total if bad is None else torch.where(bad, _zero_loss(loss), total)

    # ------------------------------------------------------------------ lifecycle
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:  # fail at Trainer creation, not after the first step, on a dense model
            require_moe(anatomy_for(model, self.anatomy), "The router loss (moe_aux_loss_coef / moe_z_loss_coef)")
        # also needed by an evaluation before training (the eval loss scale, see _after_forward)
        self._world_size = max(1, args.world_size)
        self._average_tokens = bool(getattr(args, "average_tokens_across_devices", False))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if model is None:
            raise ValueError("RouterLossCallback needs the model in on_train_begin")
        self._max_steps = state.max_steps if state.max_steps and state.max_steps > 0 else None
        if "cosine" in (self.aux_schedule, self.z_schedule) and self._max_steps is None:
            raise ValueError("the 'cosine' router-loss schedule needs max_steps (or a dataloader with a length)")
        self._step = state.global_step
        saved = saved_callback_state(state, self)
        if saved is not None:  # resumed: router/skipped_steps keeps counting from the checkpoint
            self.skipped_steps = int(saved.get("attributes", {}).get("skipped_steps", self.skipped_steps))
        self._accumulation_steps = max(1, args.gradient_accumulation_steps)
        self._world_size = max(1, args.world_size)
        self._average_tokens = bool(getattr(args, "average_tokens_across_devices", False))
        dataloader = kwargs.get("train_dataloader")
        try:
            self._steps_in_epoch = len(dataloader) if dataloader is not None else None
        except TypeError:
            self._steps_in_epoch = None
        self._window = accumulation_window(self._step, self._steps_in_epoch, self._accumulation_steps)
        self.attach(model)
        record_moe_run(args, state, self, model)  # moe_run.json: the coefficients the card reports

    def on_save(self, args, state, control, **kwargs):
        copy_moe_run_to_checkpoint(args, state)

    def attach(self, model: nn.Module) -> None:
        """Capture router logits of ``model``, hook its forward and switch its built-in router loss off."""
        if self.model is model and self.capture is not None and self.capture.attached:
            return
        self.detach()
        anatomy = anatomy_for(model, self.anatomy)
        require_moe(anatomy, "The router loss (moe_aux_loss_coef / moe_z_loss_coef)")
        self.model = model
        self.capture = RouterCapture.acquire(model, anatomy)
        self.capture.keep_grad = True
        self.specs = {layer.index: routing_spec(model, layer) for layer in anatomy.layers}
        self._layer_ids = [layer.index for layer in anatomy.layers]
        self._bad_layers = None
        self._handles = [
            model.register_forward_pre_hook(self._check_forward_kwargs, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]
        self._disable_builtin_router_loss(model)
        logger.info(
            "router loss on %d MoE layers: aux_coef=%g (%s), z_coef=%g (%s)",
            len(anatomy.layers), self.aux_coef, self.aux_schedule, self.z_coef, self.z_schedule,
        )

    def detach(self) -> None:
        """Remove the hooks, release the capture and restore the model's built-in router-loss settings."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.capture is not None:
            self.capture.release()
            self.capture = None
        for obj, attr, value in reversed(self._restore):
            setattr(obj, attr, value)
        self._restore = []
        self.model = None

    @contextlib.contextmanager
    def evaluating(self, model: nn.Module | None) -> Iterator[None]:
        """Attach to ``model`` for an evaluation outside training and detach afterwards.

        The callback is attached from train begin to train end; ``trainer.evaluate()`` before ``train``, after
        it or without it runs through this (``MoETrainer`` and :func:`~hf_moe_tuning.enable_moe_logging` do it),
        so the evaluation reports ``eval_router/*`` and ``eval_lm_loss`` like one inside training. A no-op while
        attached.
        """
        if model is None or (self.capture is not None and self.capture.attached):
            yield
            return
        self.attach(model)
        try:
            yield
        finally:
            self.detach()

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()

    def moe_run_settings(self) -> dict:
        """The settings recorded in ``moe_run.json`` (read by the model card)."""
        return dict(self.state()["args"])

    def state(self) -> dict:
        """Saved in every checkpoint's ``trainer_state.json``; ``skipped_steps`` is read back on resume."""
        return {
            "args": {
                "aux_coef": self.aux_coef, "z_coef": self.z_coef, "aux_schedule": self.aux_schedule,
                "z_schedule": self.z_schedule, "warmup_steps": self.warmup_steps, "nan_policy": self.nan_policy,
            },
            "attributes": {"skipped_steps": self.skipped_steps},
        }

    def _disable_builtin_router_loss(self, model: nn.Module) -> None:
        for module in model.modules():
            for attr in _BUILTIN_COEF_ATTRS:
                value = module.__dict__.get(attr)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0:
                    self._restore.append((module, attr, value))
                    setattr(module, attr, 0.0)
        config = getattr(model, "config", None)
        configs = [config] if config is not None else []
        if config is not None and hasattr(config, "get_text_config"):
            text = config.get_text_config()
            if text is not config:
                configs.append(text)
        for cfg in configs:
            if getattr(cfg, "output_router_logits", False):
                self._restore.append((cfg, "output_router_logits", True))
                cfg.output_router_logits = False
        if self._restore:
            logger.info("built-in router loss switched off while RouterLossCallback trains: %s",
                        sorted({attr for _, attr, _ in self._restore}))

    # ------------------------------------------------------------------ trainer events
    def on_epoch_begin(self, args, state, control, **kwargs):
        self._window = accumulation_window(state.global_step, self._steps_in_epoch, self._accumulation_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = state.global_step
        self._window = accumulation_window(state.global_step, self._steps_in_epoch, self._accumulation_steps)
        aux, z = self.coefficients()
        self._aux_coef_sum += aux
        self._z_coef_sum += z
        self._interval_steps += 1

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._terms_added and not self._term_backpropagated and not self._probe_checked:
            raise RuntimeError(
                "RouterLossCallback added the router loss to the model output, but the trainer back-propagated a "
                "loss that does not contain it (it computes its own loss, e.g. TRL's SFTTrainer, a "
                "compute_loss_func or label smoothing). Call hf_moe_tuning.enable_moe_logging(trainer) or "
                "callback.bind_trainer(trainer) after creating the trainer, or use hf_moe_tuning.MoETrainer."
            )
        if self._terms_added:
            self._probe_checked = True
        self._apply_nan_policy(state.global_step + 1, model)

    def on_step_end(self, args, state, control, **kwargs):
        self._step = state.global_step
        if control.should_log:
            self._push_train_metrics()

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_log:
            self._push_train_metrics()

    def on_prediction_step(self, args, state, control, **kwargs):
        batch, self._eval_batch = self._eval_batch, None
        if batch is None:
            return
        self._eval_totals = batch if self._eval_totals is None else self._eval_totals + batch.to(self._eval_totals)
        aux_sum, z_sum, seqs, lm_sum, lm_count = reduce_sum(self._eval_totals).tolist()
        if seqs <= 0:
            return
        aux_coef, z_coef = self.coefficients()
        metrics = {"router/aux_loss": aux_sum / seqs, "router/z_loss": z_sum / seqs,
                   "router/aux_coef": aux_coef, "router/z_coef": z_coef}
        if lm_count > 0:
            metrics["lm_loss"] = lm_sum / lm_count
        self.push_metrics(metrics, kind=EVAL)

    def on_evaluate(self, args, state, control, **kwargs):
        self._reset_eval()

    # ------------------------------------------------------------------ forward hooks
    def _check_forward_kwargs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        flag = kwargs.get("output_router_logits")
        if isinstance(flag, torch.Tensor):
            flag = bool(flag.any())
        if module.training and flag:
            raise ValueError(
                "a training forward asked for output_router_logits=True, so the caller adds the model's own router "
                "aux loss on top of RouterLossCallback's. Turn the built-in one off (TRL SFTTrainer: "
                "SFTConfig(router_aux_loss_coef=0.0), or use hf_moe_tuning.sft.MoESFTTrainer, which does it; "
                "otherwise do not pass output_router_logits)."
            )

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        capture = self.capture
        if capture is None or capture.probing:  # e.g. the expert-load drift probe: no loss, no metrics
            return None
        training = module.training
        if training and not torch.is_grad_enabled():
            return None  # e.g. a metrics-only forward of TRL under no_grad
        num_sequences = _batch_size(capture.batch) or 1
        losses = compute_router_losses(
            capture.layer_items(), self.specs, num_sequences, self.aux_on, self.z_on, selected=capture.indices
        )
        if losses is None:
            return None
        lm_loss = _output_loss(output)
        if not training:
            if lm_loss is not None and kwargs.get("num_items_in_batch") is not None and self._average_tokens:
                # transformers 5 passes the token count of all processes in evaluation too, so the model's loss
                # is this process's share of the global mean; Trainer.compute_loss multiplies it by the world
                # size, and so does this (else eval_lm_loss reads eval_loss / world size under DDP)
                lm_loss = lm_loss * self._world_size
            self._accumulate_eval(losses, lm_loss, num_sequences)
            return None
        bad = self._record_non_finite(losses)
        aux_coef, z_coef = self.coefficients()
        per_sequence = aux_coef * losses.aux + z_coef * losses.z
        self._aux_sum = self._aux_sum + _unless(bad, losses.aux.detach().float().sum())
        self._z_sum = self._z_sum + _unless(bad, losses.z.detach().float().sum())
        self._sequences = self._sequences + (~bad).float() * num_sequences  # no host-to-device copy
        if self.trainer is not None:
            self._pending_terms.append(per_sequence.sum())
            self._micro_batch_bad = bad if self._micro_batch_bad is None else self._micro_batch_bad | bad
            return None
        if lm_loss is None:
            raise ValueError(
                "RouterLossCallback adds the router loss to outputs.loss, but the model returned no loss (no labels, "
                "or the trainer pops them for a compute_loss_func/label smoothing). Bind the callback to the trainer "
                "with enable_moe_logging(trainer) or callback.bind_trainer(trainer), or use MoETrainer."
            )
        scaled = kwargs.get("num_items_in_batch") is not None
        factor = (float(self._world_size) if scaled and self._average_tokens else 1.0) * (
            1.0 if scaled else 1.0 / self._window
        )
        self._lm_sum = self._lm_sum + _unless(bad, factor * lm_loss.detach().float())
        total = self._add_term(lm_loss, per_sequence.sum(), factor, self._window, num_sequences)
        return _with_loss(output, torch.where(bad, _zero_loss(lm_loss), total))

    def _add_term(
        self, loss: torch.Tensor, sequence_sum: torch.Tensor, factor: float, window: int, num_sequences: int = 0
    ) -> torch.Tensor:
        """``loss + c·Σ_s ℓ_s · P / (factor · S)`` (see module docstring)."""
        if self.trainer is not None and self._window_sequences:
            global_sequences = self._window_sequences
        else:
            local = num_sequences or (_batch_size(self.capture.batch) if self.capture is not None else None) or 1
            global_sequences = local * window * self._world_size
        term = sequence_sum * (self._world_size / (factor * global_sequences))
        if term.requires_grad:
            self._terms_added += 1
            if not self._probe_checked:
                term.register_hook(self._mark_backpropagated)
        return loss + term.to(loss.dtype)

    def _mark_backpropagated(self, grad: torch.Tensor) -> None:
        self._term_backpropagated = True

    def _record_non_finite(self, losses: RouterLosses) -> torch.Tensor:
        """Fold this forward's per-layer finiteness into the step's flags; return its 0-d "non-finite" flag.

        Device ops only: the flags are read once per optimizer step, in :meth:`_apply_nan_policy`.
        """
        ids = losses.layer_ids
        sums = losses.aux_by_layer.float().sum(dim=-1) + losses.z_by_layer.float().sum(dim=-1)
        bad = ~torch.isfinite(sums)
        if ids != self._layer_ids:  # some layers routed no token: put the flags in anatomy order
            by_id = dict(zip(ids, bad.unbind()))
            none = bad.new_zeros(())
            bad = torch.stack([by_id.get(i, none) for i in self._layer_ids])
        self._bad_layers = bad if self._bad_layers is None else self._bad_layers | bad.to(self._bad_layers.device)
        return bad.any()

    def _apply_nan_policy(self, step: int, model: nn.Module | None) -> None:
        """Before the update: stop (``error``) or skip (``skip``) when a forward of this step had non-finite
        router losses, on any process. One host read per optimizer step, none when nothing was recorded."""
        bad, self._bad_layers = self._bad_layers, None
        if bad is None and training_world_size() == 1:
            return
        if bad is None:
            bad = torch.zeros(len(self._layer_ids), dtype=torch.bool, device=self._device())
        flags = reduce_max(bad.float()).tolist()
        index = next((self._layer_ids[i] for i, flag in enumerate(flags) if flag > 0), None)
        if index is None:
            return
        layer = next((layer for layer in self.capture.anatomy.layers if layer.index == index), None) if (
            self.capture is not None) else None
        where = f"MoE layer {index} ({layer.path})" if layer is not None else "an MoE layer"
        if self.nan_policy == "error":
            raise FloatingPointError(
                f"non-finite router logits in {where} at optimizer step {step}; no update was applied. Set "
                "moe_nan_policy='skip' to skip such steps (or lower the learning rate / raise moe_z_loss_coef)"
            )
        for p in (model or self.model).parameters():
            p.grad = None  # optimizers skip parameters without a gradient: no update, no decay
        self.skipped_steps += 1
        logger.warning("optimizer step %d skipped: non-finite router logits in %s (moe_nan_policy='skip')", step, where)

    # ------------------------------------------------------------------ metrics
    def _device(self) -> torch.device:
        if self.model is not None:
            try:
                return next(self.model.parameters()).device
            except StopIteration:
                pass
        return torch.device("cpu")

    def _reset_train_interval(self) -> None:
        self._aux_sum = torch.zeros(())
        self._z_sum = torch.zeros(())
        self._lm_sum = torch.zeros(())
        self._sequences = 0
        self._aux_coef_sum = 0.0
        self._z_coef_sum = 0.0
        self._interval_steps = 0

    def _push_train_metrics(self) -> None:
        if self._interval_steps == 0:
            return
        device = self._device()
        values = torch.stack([
            self._aux_sum.to(device).float(), self._z_sum.to(device).float(),
            torch.as_tensor(self._sequences, dtype=torch.float32).to(device), self._lm_sum.to(device).float(),
        ])
        aux_sum, z_sum, seqs, lm_sum = reduce_sum(values).tolist()
        world = training_world_size()
        metrics = {
            "router/aux_coef": self._aux_coef_sum / self._interval_steps,
            "router/z_coef": self._z_coef_sum / self._interval_steps,
            "lm_loss": lm_sum / (world * self._interval_steps),
        }
        if seqs > 0:
            metrics["router/aux_loss"] = aux_sum / seqs
            metrics["router/z_loss"] = z_sum / seqs
        if self.nan_policy == "skip":
            metrics["router/skipped_steps"] = float(self.skipped_steps)
        self.push_metrics(metrics, kind=TRAIN)
        self._reset_train_interval()

    def _reset_eval(self) -> None:
        # totals [aux_sum, z_sum, sequences, lm_sum, lm_count] of the evaluation so far, and of the last
        # eval-mode forward (folded in by on_prediction_step, so stray eval-mode forwards outside the
        # evaluation loop, e.g. probes of other callbacks, are not counted)
        self._eval_totals: torch.Tensor | None = None
        self._eval_batch: torch.Tensor | None = None

    def _accumulate_eval(self, losses: RouterLosses, lm_loss: torch.Tensor | None, num_sequences: int) -> None:
        aux, z = losses.aux.detach().float().sum(), losses.z.detach().float().sum()
        if not bool(torch.isfinite(aux + z)):
            logger.warning("non-finite router losses in an evaluation batch; left out of eval router metrics")
            self._eval_batch = None
            return
        has_lm = lm_loss is not None and lm_loss.numel() == 1
        lm = lm_loss.detach().float().reshape(()).to(aux.device) * num_sequences if has_lm else aux.new_zeros(())
        count = float(num_sequences) if has_lm else 0.0
        self._eval_batch = torch.stack([aux, z, aux.new_tensor(float(num_sequences)), lm, aux.new_tensor(count)])
