"""Compatibility re-exports: the MoE options now live in :mod:`hf_moe_tuning.configuration`.

``MoEArguments`` (every MoE option, one validator) is in :mod:`hf_moe_tuning.configuration`;
``MoETrainingArguments`` (``TrainingArguments`` + ``MoEArguments``) in :mod:`hf_moe_tuning.trainer`, loaded
lazily here so that importing this module does not import the trainer.
"""

from __future__ import annotations

from typing import Any

from .configuration import (
    FREEZE_STRATEGIES,
    HPARAM_PRESETS,
    NAN_POLICIES,
    ROUTER_LOSS_SCHEDULES,
    MoEArguments,
    parse_experts,
)


def __getattr__(name: str) -> Any:
    if name == "MoETrainingArguments":
        from .trainer import MoETrainingArguments  # noqa: PLC0415 - lazy: trainer.py imports the callbacks

        return MoETrainingArguments
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FREEZE_STRATEGIES",
    "HPARAM_PRESETS",
    "NAN_POLICIES",
    "ROUTER_LOSS_SCHEDULES",
    "MoEArguments",
    "MoETrainingArguments",
    "parse_experts",
]
