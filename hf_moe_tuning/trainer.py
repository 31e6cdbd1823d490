"""``MoETrainingArguments`` and ``MoETrainer``: a ``transformers.Trainer`` with the MoE callbacks its arguments ask for.

* :class:`MoETrainingArguments` is ``TrainingArguments`` plus :class:`~hf_moe_tuning.configuration.MoEArguments`;
* :func:`build_moe_callbacks` builds the MoE callbacks (freezing, router losses, expert-load logging,
  expert-level controls, NaN guard) from the MoE options and the model's anatomy, computed once per trainer;
  :class:`MoETrainer` and :class:`~hf_moe_tuning.sft.MoESFTTrainer` both use it;
* one route to the logs, :class:`MoELoggingMixin`: its ``log`` merges the callbacks' pending metrics into the
  dict every reporter (console, TensorBoard, W&B, ``trainer_state.json``) receives, and its ``evaluate`` attaches
  the router-loss hooks for an evaluation outside ``train``. ``MoETrainer`` and ``MoESFTTrainer`` inherit it;
  a plain ``Trainer`` / TRL ``SFTTrainer`` gets the same class mixed in by :func:`enable_moe_logging`.
* one route to exact resume of fused-expert models, :class:`~hf_moe_tuning.callbacks.resume.FusedResumeCallback`:
  :func:`build_moe_callbacks` adds it (``moe_fix_fused_resume``) and ``train`` tells it the checkpoint; plain
  trainers add it themselves.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from transformers import Trainer, TrainerCallback, TrainingArguments

from .adapters import is_peft_model
from .anatomy import MoEAnatomy, NoMoELayersError, describe_moe
from .callbacks.base import MoEMetricsCallback, merge_pending_metrics
from .callbacks.bias_balancing import BiasBalancingCallback
from .callbacks.capacity import CapacityFactorCallback
from .callbacks.expert_dropout import ExpertDropoutCallback
from .callbacks.expert_load import ExpertLoadCallback
from .callbacks.freezing import MoEFreezingCallback
from .callbacks.nan_guard import NaNGuardCallback
from .callbacks.resume import FusedResumeCallback
from .callbacks.router_jitter import RouterJitterCallback
from .callbacks.router_loss import RouterLossCallback
from .checkpoint import has_checkpoint_layout_conversion
from .configuration import MoEArguments
from .crash_safety import CrashSafeCheckpointMixin, resolve_resume_checkpoint, run_training
from .distributed import configure_distributed
from .hub.mixin import MoECardMixin
from .loss_scaling import global_token_mean_loss, loss_uses_num_items
from .presets import apply_hparam_preset

logger = logging.getLogger(__name__)


@dataclass
class MoETrainingArguments(MoEArguments, TrainingArguments):
    """``TrainingArguments`` plus the MoE options of :class:`~hf_moe_tuning.configuration.MoEArguments`.

    Like TRL's ``SFTConfig``, it extends :class:`transformers.TrainingArguments`, so the same
    ``HfArgumentParser`` reads it from the command line, a YAML/JSON file or Python.

    Example:
        >>> args = MoETrainingArguments("out", moe_freeze_strategy="non_moe", moe_aux_loss_coef=0.01)
    """


def build_moe_callbacks(
    args: MoEArguments,
    model: Any,
    anatomy: MoEAnatomy | None = None,
    *,
    train_dataset: Any = None,
    data_collator: Any = None,
    **trainer_kwargs: Any,
) -> list[TrainerCallback]:
    """The MoE callbacks ``args`` asks for, for ``model``, each given the same ``anatomy``.

    The one place both trainers get their MoE callbacks from. ``anatomy`` is ``describe_moe(model)``,
    computed here when not given. Validates first: an option that needs MoE layers on a dense model, or a
    freezing option on a PEFT model (the adapter decides what trains), raises.

    Args:
        args: ``MoETrainingArguments`` or ``MoESFTConfig`` (any object with the MoE options).
        model: the model the trainer trains (after any PEFT wrapping).
        anatomy: ``describe_moe(model)``, if the caller has it already.
        train_dataset / data_collator: for ESFT expert selection (``moe_experts="esft-..."``).
    """
    if model is None:
        raise ValueError("the MoE trainers need a model (model_init is not supported)")
    anatomy = anatomy if anatomy is not None else describe_moe(model)
    if not anatomy.is_moe:
        asked = args.moe_layer_options_set()
        if asked:
            raise NoMoELayersError(f"{', '.join(asked)} set, but model_type={anatomy.model_type!r} has no MoE layers")
    freezing = args.freezing_options_set()
    if is_peft_model(model) and freezing:
        raise ValueError(
            f"{', '.join(freezing)} set on a PEFT model: a freezing plan sets requires_grad on every base weight, "
            "which would undo the adapter's choice. Choose what trains when wrapping instead (LoRA targets, or "
            f"hf_moe_tuning.apply_lora(model, groups, strategy={args.moe_freeze_strategy!r})) and leave the freezing "
            "options at their defaults."
        )
    callbacks: list[TrainerCallback | None] = []
    if freezing:
        resolver = None
        if isinstance(args.moe_experts, str) and args.moe_experts.startswith("esft-"):
            from .routing.esft import make_resolver

            resolver = make_resolver(args, train_dataset, data_collator)
        callbacks.append(MoEFreezingCallback.from_args(args, expert_resolver=resolver, anatomy=anatomy))
    elif is_peft_model(model):
        logger.info("PEFT model: the adapter decides which parameters train; no freezing callback is added.")
    elif anatomy.is_moe:  # strategy "all": logs freeze/* and checks a resume against the plan
        callbacks.append(MoEFreezingCallback.from_args(args, anatomy=anatomy))
    callbacks.append(RouterLossCallback.from_args(args, anatomy=anatomy))
    if anatomy.is_moe:  # on by default: dense baselines (the T5 arms of the studies) simply log nothing
        callbacks.append(ExpertLoadCallback.from_args(args, anatomy=anatomy))
    callbacks.append(ExpertDropoutCallback.from_args(args, anatomy=anatomy))
    callbacks.append(CapacityFactorCallback.from_args(args, anatomy=anatomy))
    callbacks.append(RouterJitterCallback.from_args(args, anatomy=anatomy))
    callbacks.append(BiasBalancingCallback.from_args(args, anatomy=anatomy))
    callbacks.append(NaNGuardCallback.from_args(args, anatomy=anatomy))
    if getattr(args, "moe_fix_fused_resume", True) and has_checkpoint_layout_conversion(model):
        callbacks.append(FusedResumeCallback())  # the trainer's train() tells it the checkpoint it resumes from
    return [cb for cb in callbacks if cb is not None]


def _without_second_resume(moe_callbacks: list[TrainerCallback], given: list) -> list[TrainerCallback]:
    """``moe_callbacks`` without the ``FusedResumeCallback`` when the user passed one (one reload, not two)."""
    if not any(isinstance(cb, FusedResumeCallback) for cb in given):
        return moe_callbacks
    return [cb for cb in moe_callbacks if not isinstance(cb, FusedResumeCallback)]


def _bind_callbacks(trainer: Trainer) -> None:
    """Give callbacks that need the trainer (router loss: exact global-batch counts, SFTTrainer) a handle."""
    for cb in trainer.callback_handler.callbacks:
        bind = getattr(cb, "bind_trainer", None)
        if bind is not None:
            bind(trainer)


@contextlib.contextmanager
def _evaluation_hooks(trainer: Trainer) -> Iterator[None]:
    """Attach the callbacks that only hook the model while training (router loss) for an evaluation run
    outside ``train`` (before it, after it, or eval-only); a no-op inside training."""
    with contextlib.ExitStack() as stack:
        for cb in trainer.callback_handler.callbacks:
            if isinstance(cb, RouterLossCallback):
                stack.enter_context(cb.evaluating(trainer.model))
        yield


def _merge_into(callbacks, logs: dict[str, float]) -> dict[str, float]:
    """Merge the pending MoE metrics into ``logs`` *in place* (as ``Trainer.log`` adds ``epoch``), so the dict
    ``Trainer.evaluate`` logs is the one it returns: eval_results.json / all_results.json and
    ``metric_for_best_model`` see the MoE keys too."""
    logs.update(merge_pending_metrics(callbacks, logs))
    return logs


def _first_missing_dir(path: str | None) -> str | None:
    """The outermost directory of ``path`` that does not exist yet (``None`` if ``path`` exists)."""
    if not path:
        return None
    path = os.path.abspath(path)
    missing = None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_empty_dirs(path: str | None, top: str | None) -> None:
    """Remove ``path`` and its parents up to ``top`` (inclusive) while they are empty directories."""
    if not path or not top:
        return
    path = os.path.abspath(path)
    while os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
        if path == top:
            break
        path = os.path.dirname(path)


class MoELoggingMixin:
    """The one route of the MoE callbacks' metrics to the logs, mixed into a ``Trainer`` class.

    Callbacks compute their metrics before the Trainer logs and queue them
    (:meth:`~hf_moe_tuning.callbacks.base.MoEMetricsCallback.push_metrics`); ``log`` merges them into the dict it
    hands to every reporter and to ``state.log_history``, in place, so the dict ``evaluate`` returns (and
    ``eval_results.json``, ``metric_for_best_model``) holds them too. ``evaluate`` attaches the router-loss hooks
    for an evaluation outside ``train`` (before it, after it, or eval-only). :class:`MoETrainer` and
    :class:`~hf_moe_tuning.sft.MoESFTTrainer` inherit it; :func:`enable_moe_logging` mixes it into a plain trainer.
    """

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate``; also outside ``train``, the returned metrics hold ``eval_router/*``,
        ``eval_lm_loss`` and ``eval_moe/*`` (those are logged too)."""
        with _evaluation_hooks(self):
            return super().evaluate(*args, **kwargs)  # type: ignore[misc]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log`` with the pending MoE metrics merged into ``logs`` first."""
        super().log(_merge_into(self.callback_handler.callbacks, logs), *args, **kwargs)  # type: ignore[misc]


class MoETrainerMixin(MoELoggingMixin, CrashSafeCheckpointMixin):
    """What :class:`MoETrainer` and :class:`~hf_moe_tuning.sft.MoESFTTrainer` share on top of their ``Trainer``.

    Metrics of the MoE callbacks merged into ``log`` (:class:`MoELoggingMixin`); ``train`` prepares FSDP / ZeRO-3,
    checks a resumed checkpoint and points the checkpoint-aware callbacks at it; the anatomy computed once at
    construction is kept in ``moe_anatomy``.
    """

    #: ``describe_moe`` of the trained model, computed once when the trainer was built.
    moe_anatomy: MoEAnatomy | None = None

    def moe_callbacks(self) -> list[MoEMetricsCallback]:
        """The MoE callbacks attached to this trainer."""
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, MoEMetricsCallback)]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``, after preparing FSDP / ZeRO-3 for the MoE blocks (:func:`configure_distributed`);
        when resuming, first resolves the checkpoint (``True``: the newest *complete* one; a path: checked, a
        broken one raises naming the file – see :mod:`~hf_moe_tuning.crash_safety`), checks it was made with the
        same freezing plan, and points the expert-load callback (for its saved drift reference) and the fused-resume
        callback (to reload fused expert weights exactly) at it."""
        checkpoint = resolve_resume_checkpoint(self, resume_from_checkpoint)  # True: the newest *complete* one
        path = checkpoint if isinstance(checkpoint, str) else None
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, MoEFreezingCallback) and path:
                cb.check_checkpoint(path)
            if isinstance(cb, ExpertLoadCallback):
                cb.resume_checkpoint = path
            if isinstance(cb, FusedResumeCallback) and path:
                cb.checkpoint_dir = path
        configure_distributed(self)  # FSDP wrap units / ZeRO-3 leaf modules from the anatomy; no-op for DDP/CPU
        return run_training(self, functools.partial(super().train, checkpoint, *args, **kwargs))


class MoETrainer(MoETrainerMixin, MoECardMixin, Trainer):
    """``Trainer`` with MoE freezing, router losses and expert-load logging from :class:`MoETrainingArguments`.

    The model's anatomy is computed once (``moe_anatomy``) and shared by every MoE callback, which
    :func:`build_moe_callbacks` builds before ``Trainer.__init__`` (freezing happens before the optimizer exists).

    Example:
        >>> args = MoETrainingArguments("out", moe_freeze_strategy="non_moe", moe_z_loss_coef=1e-3)
        >>> trainer = MoETrainer(model=model, args=args, train_dataset=ds)
        >>> trainer.train()
    """

    def __init__(self, model: Any = None, args: MoETrainingArguments | None = None, callbacks=None, **kwargs: Any):
        if args is None:
            args = MoETrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, MoETrainingArguments):
            raise TypeError(f"MoETrainer needs MoETrainingArguments, got {type(args).__name__}")
        if model is None:
            raise ValueError("MoETrainer needs a model (model_init is not supported)")
        anatomy = describe_moe(model)
        apply_hparam_preset(args, model, anatomy=anatomy)  # moe_hparam_preset="sparse"/"dense" (no-op for "none")
        moe_callbacks = build_moe_callbacks(
            args, model, anatomy, train_dataset=kwargs.get("train_dataset"), data_collator=kwargs.get("data_collator")
        )
        moe_callbacks = _without_second_resume(moe_callbacks, list(callbacks or []))
        missing = _first_missing_dir(args.output_dir)
        try:
            super().__init__(model=model, args=args, callbacks=list(callbacks or []) + moe_callbacks, **kwargs)
        except BaseException:
            # a request rejected in on_init_end (e.g. freezing) must not leave the output dir Trainer just created
            _remove_empty_dirs(args.output_dir, missing)
            raise
        self.moe_anatomy = anatomy
        self._moe_created_output_dir = missing  # removed again if training fails before writing anything
        self._moe_mean_loss_model = not loss_uses_num_items(self.model)
        _bind_callbacks(self)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """``Trainer.compute_loss``; a model whose loss is a per-batch mean (T5, Switch, NLLB-MoE) is trained on the
        global token mean instead, which transformers' scaling for DDP and gradient accumulation assumes
        (:mod:`~hf_moe_tuning.loss_scaling`): the same gradient for any number of processes and accumulation."""
        if not self._moe_mean_loss_model or num_items_in_batch is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with global_token_mean_loss(self.model):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)


@functools.cache
def _with_moe_logging(trainer_class: type) -> type:
    """``trainer_class`` with :class:`MoELoggingMixin` in front (one class per trainer class, same name)."""
    return type(trainer_class.__name__, (MoELoggingMixin, trainer_class), {"__module__": trainer_class.__module__,
                                                                          "__doc__": trainer_class.__doc__})


def enable_moe_logging(trainer: Trainer) -> Trainer:
    """Give a plain ``Trainer`` (or TRL ``SFTTrainer``, ``Seq2SeqTrainer`` ...) the logging route of ``MoETrainer``.

    Mixes :class:`MoELoggingMixin` into the trainer's class (the MoE metrics are merged into ``log``; an
    ``evaluate`` outside ``train`` reports ``eval_router/*``) and binds the callbacks that need the trainer
    (``RouterLossCallback`` must be bound under ``SFTTrainer``, which computes its own loss; ``ExpertLoadCallback``
    finds the TensorBoard writer). Without it the MoE callbacks' metrics reach no log: the callbacks warn once.
    ``MoETrainer`` and ``MoESFTTrainer`` need nothing. Returns ``trainer`` for chaining.
    """
    if isinstance(trainer, MoELoggingMixin):
        return trainer
    trainer.__class__ = _with_moe_logging(type(trainer))
    _bind_callbacks(trainer)
    return trainer
