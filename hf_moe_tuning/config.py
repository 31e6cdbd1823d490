"""Compatibility re-exports: the MoE options now live in :mod:`hf_moe_tuning.configuration`.

``MoEArguments`` (every MoE option, one validator) is in :mod:`hf_moe_tuning.configuration`;
``MoETrainingArguments`` (``TrainingArguments`` + ``MoEArguments``) in :mod:`hf_moe_tuning.trainer`, loaded
lazily here (module ``__getattr__``, so not in ``__all__``) so that importing this module does not import
the trainer.
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
        from .trainer import MoETrainingArguments

        return MoETrainingArguments
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FREEZE_STRATEGIES",
    "HPARAM_PRESETS",
    "NAN_POLICIES",
    "ROUTER_LOSS_SCHEDULES",
    "MoEArguments",
    "parse_experts",
]
