"""``MoETrainer``: a ``transformers.Trainer`` that wires the MoE callbacks from ``MoETrainingArguments``.

* builds the callbacks the arguments ask for (freezing, router losses, expert-load logging, ...);
* merges their metrics into ``Trainer.log`` so every reporter (console, TensorBoard, W&B, ...) sees them.

Plain ``Trainer`` / TRL ``SFTTrainer`` users pass the callbacks themselves and call
:func:`enable_moe_logging` once to get the same merged logging.
"""

from __future__ import annotations

import logging
import os
import types
from typing import Any, Callable

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .adapters import is_peft_model
from .anatomy import NoMoELayersError, describe_moe
from .cards import MoECardMixin
from .checkpoint import FusedResumeMixin
from .callbacks.nan_guard import NaNGuardCallback
from .callbacks.bias_balancing import BiasBalancingCallback
from .callbacks.capacity import CapacityFactorCallback
from .callbacks.expert_dropout import ExpertDropoutCallback
from .callbacks.router_jitter import RouterJitterCallback
from .callbacks.base import MoEMetricsCallback, merge_pending_metrics
from .callbacks.expert_load import ExpertLoadCallback
from .callbacks.freezing import MoEFreezingCallback
from .callbacks.router_loss import RouterLossCallback
from .config import MoETrainingArguments
from .distributed import configure_distributed
from .presets import apply_hparam_preset

logger = logging.getLogger(__name__)

#: Factories ``(args, model, trainer_kwargs) -> callback | None`` run by :func:`build_moe_callbacks`,
#: in order. Feature modules append theirs here (router losses, expert load, expert controls, ...).
CallbackFactory = Callable[[MoETrainingArguments, Any, dict], "TrainerCallback | None"]
CALLBACK_FACTORIES: list[CallbackFactory] = []


def _freezing_factory(args: MoETrainingArguments, model: Any, trainer_kwargs: dict) -> TrainerCallback | None:
    uses_freezing = (
        args.moe_freeze_strategy != "all"
        or args.moe_train_router is not None
        or args.moe_experts != "all"
        or args.moe_extra_trainable
        or args.moe_extra_frozen
    )
    if not uses_freezing:
        if is_peft_model(model):
            logger.info("PEFT model: the adapter decides which parameters train; no freezing callback is added.")
            return None
        return MoEFreezingCallback.from_args(args) if describe_moe(model).is_moe else None
    resolver = None
    if isinstance(args.moe_experts, str) and args.moe_experts.startswith("esft-"):
        from .routing.esft import make_resolver  # noqa: PLC0415 - optional feature, imported when asked for

        resolver = make_resolver(args, trainer_kwargs.get("train_dataset"), trainer_kwargs.get("data_collator"))
    return MoEFreezingCallback.from_args(args, expert_resolver=resolver)


def _expert_load_factory(args: MoETrainingArguments, model: Any, trainer_kwargs: dict) -> TrainerCallback | None:
    # on by default: dense baselines (the T5 arms of the studies) simply log nothing
    return ExpertLoadCallback.from_args(args) if describe_moe(model).is_moe else None


def _router_loss_factory(args: MoETrainingArguments, model: Any, trainer_kwargs: dict) -> TrainerCallback | None:
    return RouterLossCallback.from_args(args)


def _expert_dropout_factory(args: MoETrainingArguments, model: Any, trainer_kwargs: dict) -> TrainerCallback | None:
    return ExpertDropoutCallback.from_args(args)


def _capacity_factory(args: MoETrainingArguments, model: Any, trainer_kwargs: dict) -> TrainerCallback | None:
    return CapacityFactorCallback.from_args(args)


def _jitter_factory(args: MoETrainingArguments, model: Any, trainer_kwargs: dict) -> TrainerCallback | None:
    return RouterJitterCallback.from_args(args)


def _bias_balancing_factory(args: MoETrainingArguments, model: Any, trainer_kwargs: dict) -> TrainerCallback | None:
    return BiasBalancingCallback.from_args(args)


def _nan_guard_factory(args: MoETrainingArguments, model: Any, trainer_kwargs: dict) -> TrainerCallback | None:
    return NaNGuardCallback.from_args(args)


CALLBACK_FACTORIES.append(_freezing_factory)
CALLBACK_FACTORIES.append(_router_loss_factory)
CALLBACK_FACTORIES.append(_expert_load_factory)
CALLBACK_FACTORIES.append(_expert_dropout_factory)
CALLBACK_FACTORIES.append(_capacity_factory)
CALLBACK_FACTORIES.append(_jitter_factory)
CALLBACK_FACTORIES.append(_bias_balancing_factory)
CALLBACK_FACTORIES.append(_nan_guard_factory)


def _bind_callbacks(trainer: Trainer) -> None:
    """Give callbacks that need the trainer (router loss: exact global-batch counts, SFTTrainer) a handle."""
    for cb in trainer.callback_handler.callbacks:
        bind = getattr(cb, "bind_trainer", None)
        if bind is not None:
            bind(trainer)


def build_moe_callbacks(args: MoETrainingArguments, model: Any, **trainer_kwargs: Any) -> list[TrainerCallback]:
    """The MoE callbacks ``args`` asks for, for ``model`` (validated: MoE options on a dense model raise)."""
    if model is None:
        raise ValueError("MoETrainer needs a model (model_init is not supported)")
    anatomy = describe_moe(model)
    if not anatomy.is_moe:
        asked = [
            name
            for name, on in (
                ("router_aux_loss_coef", args.router_aux_loss_coef > 0),
                ("router_z_loss_coef", args.router_z_loss_coef > 0),
                ("moe_experts", args.moe_experts != "all"),
                ("moe_train_router", args.moe_train_router is not None),
                ("moe_expert_dropout", args.moe_expert_dropout > 0),
                ("moe_bias_balancing", args.moe_bias_balancing),
                ("moe_capacity_factor_train", args.moe_capacity_factor_train is not None),
                ("moe_capacity_factor_eval", args.moe_capacity_factor_eval is not None),
                ("moe_router_jitter", args.moe_router_jitter is not None),
            )
            if on
        ]
        if asked:
            raise NoMoELayersError(
                f"{', '.join(asked)} set, but model_type={anatomy.model_type!r} has no MoE layers"
            )
    callbacks = []
    for factory in CALLBACK_FACTORIES:
        cb = factory(args, model, trainer_kwargs)
        if cb is not None:
            callbacks.append(cb)
    return callbacks


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


class MoETrainer(FusedResumeMixin, MoECardMixin, Trainer):
    """``Trainer`` with MoE freezing, router losses and expert-load logging from :class:`MoETrainingArguments`.

    Example:
        >>> args = MoETrainingArguments("out", moe_freeze_strategy="non_moe", router_z_loss_coef=1e-3)
        >>> trainer = MoETrainer(model=model, args=args, train_dataset=ds)
        >>> trainer.train()
    """

    def __init__(self, model: Any = None, args: MoETrainingArguments | None = None, callbacks=None, **kwargs: Any):
        if args is None:
            args = MoETrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, MoETrainingArguments):
            raise TypeError(f"MoETrainer needs MoETrainingArguments, got {type(args).__name__}")
        apply_hparam_preset(args, model)  # moe_hparam_preset="sparse"/"dense" (no-op for "none")
        moe_callbacks = build_moe_callbacks(args, model, **kwargs)
        missing = _first_missing_dir(args.output_dir)
        try:
            super().__init__(model=model, args=args, callbacks=list(callbacks or []) + moe_callbacks, **kwargs)
        except BaseException:
            # a request rejected in on_init_end (e.g. freezing) must not leave the output dir Trainer just created
            _remove_empty_dirs(args.output_dir, missing)
            raise
        _bind_callbacks(self)

    def moe_callbacks(self) -> list[MoEMetricsCallback]:
        """The MoE callbacks attached to this trainer."""
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, MoEMetricsCallback)]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``, after preparing FSDP / ZeRO-3 for the MoE blocks (:func:`configure_distributed`);
        when resuming, first checks the checkpoint was made with the same freezing plan, and points the
        expert-load callback at it (for its saved drift reference)."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, MoEFreezingCallback) and isinstance(checkpoint, str):
                cb.check_checkpoint(checkpoint)
            if isinstance(cb, ExpertLoadCallback):
                cb.resume_checkpoint = checkpoint if isinstance(checkpoint, str) else None
        configure_distributed(self)  # FSDP wrap units / ZeRO-3 leaf modules from the anatomy; no-op for DDP/CPU
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(merge_pending_metrics(self.callback_handler.callbacks, logs), start_time)


def enable_moe_logging(trainer: Trainer) -> Trainer:
    """Make a plain ``Trainer`` (or TRL ``SFTTrainer``) merge MoE callback metrics into ``log``.

    Also binds callbacks that need the trainer (``RouterLossCallback`` must be bound under ``SFTTrainer``,
    which computes its own loss). ``MoETrainer`` does all this already. Returns ``trainer`` for chaining.
    """
    if isinstance(trainer, MoETrainer) or getattr(trainer, "_moe_logging_enabled", False):
        return trainer
    _bind_callbacks(trainer)
    original = trainer.log

    def log(self: Trainer, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        original(merge_pending_metrics(self.callback_handler.callbacks, logs), *args, **kwargs)

    trainer.log = types.MethodType(log, trainer)
    trainer._moe_logging_enabled = True
    return trainer
