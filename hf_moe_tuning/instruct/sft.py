"""Supervised fine-tuning of decoder models with TRL's ``SFTTrainer`` and this package's MoE callbacks.

One recipe ``args`` mapping holds both kinds of options: the MoE knobs of
:class:`~hf_moe_tuning.MoETrainingArguments` (``moe_*``, ``router_*``) build the callbacks, everything
else goes to TRL's ``SFTConfig`` (:func:`split_training_args`). The callbacks are

* :class:`~hf_moe_tuning.MoEFreezingCallback` (the ST-MoE preset; not with LoRA, where the adapter
  targets decide what trains),
* :class:`~hf_moe_tuning.callbacks.router_loss.RouterLossCallback` (aux and z losses, when a coefficient is set),
* :class:`~hf_moe_tuning.callbacks.expert_load.ExpertLoadCallback` (``moe/*`` routing statistics),

and :func:`~hf_moe_tuning.enable_moe_logging` merges their metrics into ``SFTTrainer.log``. TRL's own
MoE aux loss is switched off (``SFTConfig.router_aux_loss_coef=0``): ``RouterLossCallback`` computes the
aux loss from the router logits with padding and prompt tokens masked, plus the z-loss, and logs the
terms apart. A dense model gets no MoE callbacks (and MoE options on it raise).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback, TrainingArguments

from ..anatomy import NoMoELayersError, describe_moe
from ..callbacks.expert_load import ExpertLoadCallback
from ..callbacks.freezing import MoEFreezingCallback
from ..callbacks.router_loss import RouterLossCallback
from ..config import MoETrainingArguments
from ..distributed import configure_distributed
from ..study.stages import STAGE_DEFAULTS
from ..trainer import enable_moe_logging

logger = logging.getLogger(__name__)

#: ``MoETrainingArguments`` fields that are not ``TrainingArguments`` fields: they configure the callbacks.
MOE_ARG_NAMES: frozenset[str] = frozenset(
    f.name for f in dataclasses.fields(MoETrainingArguments)
) - frozenset(f.name for f in dataclasses.fields(TrainingArguments))

#: Defaults of every SFT stage (recipe ``args`` override them): the encoder-decoder study's stage
#: defaults (no saving, constant LR, no per-run files), logging every 25 steps, and bf16 and gradient
#: checkpointing off. TRL defaults to both, which fail (bf16 on a CPU without support) or only cost time
#: for the tiny models; the real recipe turns both on.
SFT_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in STAGE_DEFAULTS.items() if k != "dataloader_pin_memory"},
    "bf16": False,
    "gradient_checkpointing": False,
    "logging_steps": 25,
}

#: ``MoETrainingArguments`` options a dense model must not be given.
_MOE_ONLY_WHEN_SET = {
    "router_aux_loss_coef": 0.0,
    "router_z_loss_coef": 0.0,
    "moe_freeze_strategy": "all",
    "moe_experts": "all",
    "moe_train_router": None,
}


def sft_config_fields() -> frozenset[str]:
    """Names of TRL ``SFTConfig`` fields."""
    from trl import SFTConfig  # noqa: PLC0415 - trl is imported only where SFT runs

    return frozenset(f.name for f in dataclasses.fields(SFTConfig))


def split_training_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split recipe ``args`` into ``(sft_kwargs, moe_kwargs)``: ``SFTConfig`` fields and MoE callback knobs."""
    sft_names = sft_config_fields()
    sft_kwargs, moe_kwargs = {}, {}
    for key, value in args.items():
        if key in MOE_ARG_NAMES:
            moe_kwargs[key] = value
        elif key in sft_names:
            sft_kwargs[key] = value
        else:
            raise ValueError(f"unknown training argument {key!r}: neither an SFTConfig nor a MoETrainingArguments field")
    return sft_kwargs, moe_kwargs


def moe_callbacks(model: Any, moe_args: MoETrainingArguments, *, lora: bool = False) -> list[TrainerCallback]:
    """The MoE callbacks ``moe_args`` asks for (freezing, router losses, expert load); none for a dense model."""
    if not describe_moe(model).is_moe:
        asked = [k for k, off in _MOE_ONLY_WHEN_SET.items() if getattr(moe_args, k) != off]
        if asked:
            raise NoMoELayersError(f"{', '.join(asked)} set, but {type(model).__name__} has no MoE layers")
        return []
    callbacks: list[TrainerCallback] = []
    freezing_asked = (
        moe_args.moe_freeze_strategy != "all"
        or moe_args.moe_experts != "all"
        or moe_args.moe_train_router is not None
        or moe_args.moe_extra_trainable
        or moe_args.moe_extra_frozen
    )
    if lora:
        if freezing_asked:
            raise ValueError(
                "freezing presets (moe_freeze_strategy / moe_experts / moe_train_router / moe_extra_*) choose whole "
                "parameters to train; with LoRA the adapter targets choose instead (sft.lora.target_modules / "
                "target_parameters). Remove one of them."
            )
    else:
        callbacks.append(MoEFreezingCallback.from_args(moe_args))
        callbacks[-1].print_table = False
    router = RouterLossCallback.from_args(moe_args)
    if router is not None:
        callbacks.append(router)
    load = ExpertLoadCallback.from_args(moe_args)
    if load is not None:
        callbacks.append(load)
    return callbacks


@dataclass
class SFTOutcome:
    """What an SFT run returns: final train metrics, wall seconds and the trainer's log history."""

    metrics: dict[str, float]
    seconds: float
    log_history: list[dict[str, Any]] = field(default_factory=list)
    trainer: Any = None

    def last_log_with(self, key: str) -> dict[str, Any] | None:
        """The last logged record containing ``key`` (e.g. ``"moe/load_cv_mean"``)."""
        for record in reversed(self.log_history):
            if key in record:
                return record
        return None


def build_sft_trainer(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    args: dict[str, Any],
    output_dir: str,
    seed: int = 0,
    sft_options: dict[str, Any] | None = None,
    peft_config: Any = None,
    eval_dataset: Any = None,
):
    """An ``SFTTrainer`` with the MoE callbacks of ``args`` and merged MoE logging.

    Args:
        model: a causal LM (tiny or Hub); its chat template must already be set on ``tokenizer``.
        train_dataset: conversational prompt/completion, ``messages`` or plain ``text`` dataset.
        args: recipe arguments (``SFTConfig`` and ``MoETrainingArguments`` fields, see :func:`split_training_args`).
        sft_options: extra ``SFTConfig`` fields from the recipe's ``sft`` section (``max_length`` ...).
        peft_config: a ``peft.LoraConfig`` (then no freezing preset is applied).
    """
    from trl import SFTConfig, SFTTrainer  # noqa: PLC0415

    merged = {**SFT_DEFAULTS, **args}
    sft_kwargs, moe_kwargs = split_training_args(merged)
    sft_kwargs.update(sft_options or {})
    # the package's RouterLossCallback replaces TRL's built-in aux loss (it would double-count it)
    sft_kwargs["router_aux_loss_coef"] = 0.0
    for key in ("output_dir", "seed", "data_seed", "report_to"):
        sft_kwargs.pop(key, None)
    report_to = args.get("report_to", "none")
    with tempfile.TemporaryDirectory() as tmp:  # validates the MoE knobs with the same checks as MoETrainer
        moe_args = MoETrainingArguments(output_dir=tmp, report_to="none", **moe_kwargs)
    config = SFTConfig(output_dir=str(output_dir), seed=seed, data_seed=seed, report_to=report_to, **sft_kwargs)
    callbacks = moe_callbacks(model, moe_args, lora=peft_config is not None)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
    )
    enable_moe_logging(trainer)  # merges MoE metrics into log and binds RouterLossCallback (SFTTrainer's own loss)
    if peft_config is None:
        configure_distributed(trainer)  # FSDP wrap units / ZeRO-3 leaf modules for the MoE blocks; no-op otherwise
    return trainer


def run_sft(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    args: dict[str, Any],
    output_dir: str,
    seed: int = 0,
    sft_options: dict[str, Any] | None = None,
    peft_config: Any = None,
) -> SFTOutcome:
    """Train ``model`` in place with :func:`build_sft_trainer`; returns metrics, seconds and log history."""
    trainer = build_sft_trainer(model, tokenizer, train_dataset, args, output_dir, seed, sft_options, peft_config)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    return SFTOutcome(dict(result.metrics), seconds, list(trainer.state.log_history), trainer)


def align_special_tokens(model: Any, tokenizer: Any) -> Any:
    """Make ``model``'s config and generation config use the tokenizer's EOS and PAD ids (returns ``model``).

    The tiny decoder configs carry Llama's ids (bos 1, eos 2); ``ByT5Tokenizer`` has eos 1 and pad 0, so
    generation would never stop without this.
    """
    for cfg in (model.config.get_text_config(), model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    if getattr(tokenizer, "bos_token_id", None) is None:
        model.config.get_text_config().bos_token_id = None
        model.generation_config.bos_token_id = None
    return model
