"""Supervised fine-tuning of decoder models for the ``instruct_moe`` study, with :class:`~hf_moe_tuning.sft.MoESFTTrainer`.

One recipe ``args`` mapping holds both kinds of options; they are all fields of the one config,
:class:`~hf_moe_tuning.sft.MoESFTConfig` (TRL's ``SFTConfig`` plus the ``moe_*`` options), built by
:func:`sft_config` and validated by it. :class:`~hf_moe_tuning.sft.MoESFTTrainer` builds the same MoE
callbacks as :class:`~hf_moe_tuning.MoETrainer` (freezing, router losses, expert-load logging, expert-level
controls, NaN guard; with LoRA the adapter targets decide what trains) and merges their metrics into ``log``.
With ``moe_aux_loss_coef`` / ``moe_z_loss_coef`` set, TRL's own aux loss (``router_aux_loss_coef``) is off, so
the load-balancing loss is counted once (:mod:`hf_moe_tuning.sft`). A dense model gets no MoE callbacks
but the NaN guard (and MoE options on it raise).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..study.stages import STAGE_DEFAULTS

logger = logging.getLogger(__name__)

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

#: Config fields the pipeline sets itself (from the stage's output folder and seed), not the recipe.
_MANAGED = ("output_dir", "seed", "data_seed")


def sft_config(
    args: dict[str, Any],
    output_dir: str,
    seed: int = 0,
    sft_options: dict[str, Any] | None = None,
) -> Any:
    """The :class:`~hf_moe_tuning.sft.MoESFTConfig` of one SFT run: :data:`SFT_DEFAULTS`, then ``args``, then
    ``sft_options`` (the recipe's ``sft`` section), with the pipeline's ``output_dir`` and seeds.

    Raises:
        ValueError: a key that is no ``MoESFTConfig`` field, or a value its validators reject (names the field).
    """
    # imported here, not at the top: trl is imported only where SFT runs
    from ..sft import MoESFTConfig

    kwargs = {**SFT_DEFAULTS, **args, **(sft_options or {})}
    for key in _MANAGED:
        kwargs.pop(key, None)
    kwargs.setdefault("report_to", "none")
    names = {f.name for f in dataclasses.fields(MoESFTConfig)}
    unknown = sorted(k for k in kwargs if k not in names)
    if unknown:
        raise ValueError(f"unknown training argument {unknown[0]!r}: not a MoESFTConfig (SFTConfig or moe_*) field")
    return MoESFTConfig(output_dir=str(output_dir), seed=seed, data_seed=seed, **kwargs)


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
    """A :class:`~hf_moe_tuning.sft.MoESFTTrainer` for one SFT run of the study.

    Args:
        model: a causal LM (tiny or Hub); its chat template must already be set on ``tokenizer``.
        train_dataset: conversational prompt/completion, ``messages`` or plain ``text`` dataset.
        args: recipe arguments (``MoESFTConfig`` fields: ``SFTConfig`` ones and the ``moe_*`` options).
        sft_options: extra ``SFTConfig`` fields from the recipe's ``sft`` section (``max_length`` ...).
        peft_config: a ``peft.LoraConfig`` (then the adapter decides what trains; freezing options raise).
    """
    # imported here, not at the top: trl is imported only where SFT runs
    from ..sft import MoESFTTrainer

    return MoESFTTrainer(
        model=model,
        args=sft_config(args, output_dir, seed, sft_options),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


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
