"""Compatibility module: the Hub code lives in :mod:`hf_moe_tuning.hub` (run summary, card, push, CLI).

``hf_moe_tuning/__init__.py``, ``trainer.py`` and ``cli.py`` still import from here, so the public
names are re-exported unchanged.
"""

from __future__ import annotations

from .hub.card import (
    CARD_ARGS,
    PROJECT_URL,
    CardValidationError,
    build_model_card,
    card_tags,
    expert_load_rows,
    moe_card_section,
    save_card,
    validate_card,
    write_model_card,
)
from .hub.cli import register
from .hub.mixin import MoECardMixin
from .hub.push import (
    UPLOAD_ALLOW_PATTERNS,
    UPLOAD_IGNORE_PATTERNS,
    HubPushError,
    UploadPlan,
    check_repo_id,
    files_to_upload,
    push_run,
    upload_plan,
)
from .hub.run_record import MOE_RUN_NAME
from .hub.summary import (
    CARD_NAME,
    EXPERT_LOAD_JSONL,
    RUN_INFO_NAME,
    TRAIN_HEATMAP,
    NoFinishedRunError,
    RunSummary,
    load_run,
    read_expert_load,
    read_run_info,
    require_finished_run,
    save_run_state,
    summary_from_trainer,
    write_run_info,
)

__all__ = [
    "CARD_ARGS",
    "CARD_NAME",
    "EXPERT_LOAD_JSONL",
    "MOE_RUN_NAME",
    "PROJECT_URL",
    "RUN_INFO_NAME",
    "TRAIN_HEATMAP",
    "UPLOAD_ALLOW_PATTERNS",
    "UPLOAD_IGNORE_PATTERNS",
    "CardValidationError",
    "HubPushError",
    "MoECardMixin",
    "NoFinishedRunError",
    "RunSummary",
    "UploadPlan",
    "build_model_card",
    "card_tags",
    "check_repo_id",
    "expert_load_rows",
    "files_to_upload",
    "load_run",
    "moe_card_section",
    "push_run",
    "read_expert_load",
    "read_run_info",
    "register",
    "require_finished_run",
    "save_card",
    "save_run_state",
    "summary_from_trainer",
    "upload_plan",
    "validate_card",
    "write_model_card",
    "write_run_info",
]
