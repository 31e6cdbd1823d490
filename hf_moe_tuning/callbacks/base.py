"""Shared plumbing of the MoE callbacks: pending metrics that are merged into ``Trainer.log``.

A callback computes its metrics *before* the Trainer logs (e.g. in ``on_step_end`` when
``control.should_log`` is set, or in ``on_prediction_step`` for evaluation) and stores them with
:meth:`MoEMetricsCallback.push_metrics`. The trainer then merges them into the ``logs`` dict it is about
to hand to every reporter:

this is the one route of the metrics to the logs (:class:`hf_moe_tuning.trainer.MoELoggingMixin`), which
``MoETrainer`` and ``MoESFTTrainer`` inherit and :func:`hf_moe_tuning.enable_moe_logging` mixes into a plain
``transformers.Trainer`` or TRL ``SFTTrainer``.

Callbacks never mutate ``logs`` inside ``on_log`` (reporters such as TensorBoard have already run by
then). If nothing merged the metrics (a plain trainer without ``enable_moe_logging``), the callback drops them at
that log and warns once, naming the fix.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from ..anatomy import MoEAnatomy
from ..hub.run_record import copy_moe_run_to_checkpoint, record_moe_run

logger = logging.getLogger(__name__)

TRAIN = "train"
EVAL = "eval"


def log_kind(logs: dict) -> str:
    """``"eval"`` for an evaluation log dict (keys prefixed ``eval_``), else ``"train"``."""
    return EVAL if any(str(k).startswith("eval_") for k in logs) else TRAIN


class MoEMetricsCallback(TrainerCallback):
    """Base class for callbacks whose metrics are merged into ``Trainer.log``."""

    def __init__(self) -> None:
        self._pending: dict[str, dict[str, float]] = {TRAIN: {}, EVAL: {}}
        self._warned_unmerged = False

    # -- producer side ------------------------------------------------------------------------
    def push_metrics(self, metrics: dict[str, float], kind: str = TRAIN) -> None:
        """Queue ``metrics`` for the next train (or eval) log; eval keys get the ``eval_`` prefix on merge."""
        self._pending[kind].update(metrics)

    # -- consumer side (the trainer) ----------------------------------------------------------
    def pop_metrics(self, kind: str = TRAIN) -> dict[str, float]:
        """Return and clear the queued metrics of ``kind`` (eval keys prefixed with ``eval_``)."""
        metrics = self._pending[kind]
        self._pending[kind] = {}
        if kind == EVAL:
            return {f"eval_{k}": v for k, v in metrics.items()}
        return metrics

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Metrics still queued at a log were merged by nothing: drop them (warn once, naming the fix)."""
        kind = log_kind(logs or {})
        if not self._pending[kind]:
            return
        metrics = self.pop_metrics(kind)
        if not self._warned_unmerged:
            self._warned_unmerged = True
            logger.warning(
                "%s: metrics %s reach no log: the trainer does not merge them. Use hf_moe_tuning.MoETrainer / "
                "MoESFTTrainer, or call hf_moe_tuning.enable_moe_logging(trainer) once after building it.",
                type(self).__name__,
                sorted(metrics)[:4],
            )


def saved_callback_state(state, callback: TrainerCallback) -> dict | None:
    """What ``callback``'s class saved in the checkpoint this run resumed from (``TrainerState.stateful_callbacks``).

    ``Trainer`` writes every ``ExportableState`` callback's ``state()`` into ``trainer_state.json`` but only
    restores it with ``restore_callback_states_from_checkpoint=True``; callbacks that must keep counting
    across a resume read it here in ``on_train_begin``. ``None`` on a fresh run.
    """
    saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(callback).__name__)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    return saved if isinstance(saved, dict) else None


def real_eval_samples(batch_size: int) -> int:
    """How many of the ``batch_size`` samples of this process's current evaluation batch are real.

    Under data parallelism accelerate pads the last global batch with copies of the first samples (so every
    process gets a full batch); ``Accelerator.gather_for_metrics`` drops them again, keeping the first
    ``remainder`` samples of the batch gathered in rank order. This mirrors it per process, so every evaluation
    example is counted once. ``batch_size`` outside the last batch, on one process or when unknown.
    """
    from accelerate.state import GradientState, PartialState

    gradient_state = GradientState()
    if not gradient_state.end_of_dataloader or gradient_state.remainder is None or gradient_state.remainder <= 0:
        return batch_size
    state = PartialState()
    if state.num_processes <= 1:
        return batch_size
    return max(0, min(batch_size, gradient_state.remainder - state.process_index * batch_size))


def merge_pending_metrics(callbacks, logs: dict) -> dict:
    """Return ``logs`` updated with the pending metrics of every :class:`MoEMetricsCallback` in ``callbacks``."""
    kind = log_kind(logs)
    merged = dict(logs)
    for cb in callbacks:
        if isinstance(cb, MoEMetricsCallback):
            merged.update(cb.pop_metrics(kind))
    return merged


class ModelPatchCallback(MoEMetricsCallback):
    """Base of callbacks that patch the model once and log the setting they applied.

    Subclasses implement :meth:`_install` (returning a handle with ``remove()``) and :meth:`_metrics` (the
    settings to log at train start). The patch is installed in ``on_init_end`` (so an evaluation before training
    sees the same model) or, at the latest, in ``on_train_begin``, and undone by :meth:`remove`.
    """

    def __init__(self, anatomy: MoEAnatomy | None = None) -> None:
        super().__init__()
        self.handle = None
        #: the trainer's anatomy of the model, computed once and shared by the MoE callbacks (``None``: computed
        #: on install); see :func:`~hf_moe_tuning.anatomy.anatomy_for`
        self.anatomy = anatomy

    def _install(self, model):  # pragma: no cover - abstract
        raise NotImplementedError

    def _metrics(self) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def install(self, model) -> None:
        """Patch ``model`` (idempotent)."""
        if self.handle is None:
            self.handle = self._install(model)

    def remove(self) -> None:
        """Undo the patch."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.install(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.install(model)
        self.push_metrics(self._metrics())
        record_moe_run(args, state, self, model)  # moe_run.json: the setting the card reports

    def on_save(self, args, state, control, **kwargs):
        copy_moe_run_to_checkpoint(args, state)

    def moe_run_settings(self) -> dict[str, float]:
        """The applied setting, recorded in ``moe_run.json``."""
        return self._metrics()
