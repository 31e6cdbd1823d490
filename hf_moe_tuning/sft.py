"""``MoESFTConfig`` and ``MoESFTTrainer``: TRL's ``SFTConfig`` / ``SFTTrainer`` with this package's MoE options.

Needs TRL (``pip install "hf-moe-tuning[trl]"``); nothing else in the package imports it, so the plain
``Trainer`` path (``import hf_moe_tuning``, :class:`~hf_moe_tuning.MoETrainer`) works without it.

* :class:`MoESFTConfig` is ``SFTConfig`` plus :class:`~hf_moe_tuning.configuration.MoEArguments` (the same
  ``moe_*`` options as :class:`~hf_moe_tuning.MoETrainingArguments`, with the same validator).
* :class:`MoESFTTrainer` behaves like :class:`~hf_moe_tuning.MoETrainer`: the same MoE callbacks, built by
  :func:`~hf_moe_tuning.trainer.build_moe_callbacks` from the model's anatomy (computed once, after TRL has
  loaded the model and applied ``peft_config``), metrics merged into ``log``, the same ``train``
  (FSDP / ZeRO-3 preparation, resume checks) and the same hyperparameter presets.

Two load-balancing losses, never both
-------------------------------------
TRL's ``SFTConfig.router_aux_loss_coef`` weights the *model's own* aux loss (transformers'
``load_balancing_loss_func``: tokens of all layers pooled, about ``k`` times this package's value for top-``k``
routing); ``None`` (TRL's default) takes the model config's coefficient. This package's ``moe_aux_loss_coef``
and ``moe_z_loss_coef`` weight :class:`~hf_moe_tuning.callbacks.router_loss.RouterLossCallback`'s losses
(per MoE layer, padding and prompt tokens masked, logged apart). They are not added up:

* our router loss on (a ``moe_*_loss_coef`` > 0 with a schedule other than ``"off"``): TRL's is switched off.
  ``router_aux_loss_coef=None`` becomes ``0.0`` (logged); an explicit non-zero value raises ``ValueError``.
  While it trains, the callback also keeps the model's own router loss off (``output_router_logits`` and the
  model's coefficients), as under ``MoETrainer``.
* our router loss off: ``router_aux_loss_coef`` works as TRL documents it, next to expert-load logging,
  freezing and the expert-level controls.

Example:
    >>> from hf_moe_tuning.sft import MoESFTConfig, MoESFTTrainer
    >>> args = MoESFTConfig("out", moe_freeze_strategy="non_moe", moe_aux_loss_coef=0.01, max_length=512)
    >>> MoESFTTrainer(model=model, args=args, train_dataset=chat_dataset, processing_class=tokenizer).train()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "hf_moe_tuning.sft (MoESFTConfig, MoESFTTrainer) needs TRL: pip install 'hf-moe-tuning[trl]'"
    ) from err

from .anatomy import describe_moe
from .configuration import MoEArguments
from .hub.mixin import AllowListPushMixin
from .presets import apply_hparam_preset
from .trainer import (
    MoETrainerMixin,
    _bind_callbacks,
    _first_missing_dir,
    _remove_empty_dirs,
    _without_second_resume,
    build_moe_callbacks,
)

logger = logging.getLogger(__name__)


@dataclass
class MoESFTConfig(MoEArguments, SFTConfig):
    """TRL's ``SFTConfig`` plus the MoE options of :class:`~hf_moe_tuning.configuration.MoEArguments`.

    ``router_aux_loss_coef`` stays TRL's field (the model's own aux loss); this package's router losses are
    ``moe_aux_loss_coef`` / ``moe_z_loss_coef`` (see the module docstring for how the two interact).

    Example:
        >>> args = MoESFTConfig("out", moe_freeze_strategy="non_moe", moe_z_loss_coef=1e-3)
    """


def resolve_trl_aux_loss(args: MoESFTConfig) -> None:
    """Switch TRL's aux loss off when this package's router loss is on (see the module docstring).

    Raises:
        ValueError: ``router_aux_loss_coef`` explicitly non-zero together with ``moe_aux_loss_coef`` /
            ``moe_z_loss_coef``: the model's aux loss would be added on top of ours.
    """
    if not args.router_loss_on:
        return
    coef = args.router_aux_loss_coef
    if coef is None:
        args.router_aux_loss_coef = 0.0
        logger.info(
            "moe_aux_loss_coef=%g / moe_z_loss_coef=%g: TRL's router_aux_loss_coef (the model's own aux loss) is set "
            "to 0.0, so the load-balancing loss is counted once",
            args.moe_aux_loss_coef, args.moe_z_loss_coef,
        )
    elif coef != 0:
        raise ValueError(
            f"router_aux_loss_coef={coef} (TRL: the model's own aux loss) together with moe_aux_loss_coef="
            f"{args.moe_aux_loss_coef} / moe_z_loss_coef={args.moe_z_loss_coef} (this package's router losses) would "
            "add two load-balancing losses. Use one: leave router_aux_loss_coef unset (or 0.0) with the moe_* "
            "coefficients, or set the moe_* coefficients to 0."
        )


class MoESFTTrainer(MoETrainerMixin, AllowListPushMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with the MoE callbacks of :class:`MoESFTConfig`, like :class:`~hf_moe_tuning.MoETrainer`.

    The MoE callbacks are built after ``SFTTrainer.__init__`` (TRL may load the model from a name and wrap it in
    PEFT there), from the anatomy of the model that trains, and get ``on_init_end`` then, so freezing still
    happens before the optimizer is created. With ``peft_config`` the adapter decides what trains: freezing
    options raise.

    Example:
        >>> args = MoESFTConfig("out", moe_freeze_strategy="non_moe", moe_aux_loss_coef=0.01)
        >>> trainer = MoESFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
        >>> trainer.train()
    """

    def __init__(
        self,
        model: Any = None,
        args: MoESFTConfig | None = None,
        callbacks: list | None = None,
        peft_config: Any = None,
        **kwargs: Any,
    ):
        if model is None:
            raise ValueError("MoESFTTrainer needs a model (a model or a model id)")
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = MoESFTConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-SFT")
        if not isinstance(args, MoESFTConfig):
            raise TypeError(f"MoESFTTrainer needs MoESFTConfig, got {type(args).__name__}")
        resolve_trl_aux_loss(args)
        freezing = args.freezing_options_set()
        if peft_config is not None and freezing:
            raise ValueError(
                f"{', '.join(freezing)} set together with peft_config: with LoRA the adapter targets choose what "
                "trains (target_modules / target_parameters), a freezing plan would undo that. Remove one of them."
            )
        missing = _first_missing_dir(args.output_dir)
        try:
            super().__init__(model=model, args=args, callbacks=callbacks, peft_config=peft_config, **kwargs)
            anatomy = describe_moe(self.model)
            apply_hparam_preset(args, self.model, anatomy=anatomy)
            moe_callbacks = build_moe_callbacks(
                args, self.model, anatomy, train_dataset=self.train_dataset, data_collator=self.data_collator
            )
            moe_callbacks = _without_second_resume(moe_callbacks, list(callbacks or []))
            for callback in moe_callbacks:
                self.add_callback(callback)
            for callback in moe_callbacks:  # the event Trainer.__init__ sent before these callbacks existed
                callback.on_init_end(
                    self.args, self.state, self.control, model=self.model, processing_class=self.processing_class,
                    optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, train_dataloader=None,
                    eval_dataloader=None,
                )
        except BaseException:
            # a rejected request (e.g. freezing) must not leave the output dir Trainer just created
            _remove_empty_dirs(args.output_dir, missing)
            raise
        self.moe_anatomy = anatomy
        _bind_callbacks(self)


__all__ = ["MoESFTConfig", "MoESFTTrainer", "resolve_trl_aux_loss"]
