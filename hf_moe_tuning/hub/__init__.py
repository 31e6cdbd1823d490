"""The Hub side of a run: what trained, model cards and pushing.

============================  ================================================================================
module                        what
============================  ================================================================================
:mod:`.run_record`            ``moe_run.json``: what trained, written by the MoE callbacks (no heavy imports)
:mod:`.summary`               :class:`RunSummary` from a run folder (JSON only, never a pickle) or a live trainer
:mod:`.card`                  the card: ``ModelCard.from_template`` with ``templates/model_card.md``, validated
:mod:`.push`                  an allow-list of files through ``HfApi.upload_folder``; dry run; one-line errors
:mod:`.mixin`                 :class:`MoECardMixin` (card) and :class:`AllowListPushMixin` (pushes) for ``Trainer``
:mod:`.cli`                   ``hf-moe-tuning card`` and ``hf-moe-tuning push``
============================  ================================================================================

Commands::

    hf-moe-tuning card OUTPUT_DIR                      # writes OUTPUT_DIR/README.md
    hf-moe-tuning push OUTPUT_DIR user/repo [--private] [--revision BRANCH] [--merge-adapter] [--dry-run]

The names below are imported lazily, so that the callbacks can import :mod:`.run_record` without
loading the card and push code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MOE_RUN_NAME": "run_record",
    "read_moe_run": "run_record",
    "record_moe_run": "run_record",
    "NoFinishedRunError": "summary",
    "RunSummary": "summary",
    "load_run": "summary",
    "read_run_info": "summary",
    "summary_from_trainer": "summary",
    "write_run_info": "summary",
    "CardValidationError": "card",
    "build_model_card": "card",
    "moe_card_section": "card",
    "validate_card": "card",
    "write_model_card": "card",
    "HubPushError": "push",
    "UploadPlan": "push",
    "check_repo_id": "push",
    "files_to_upload": "push",
    "push_run": "push",
    "upload_allowed": "push",
    "upload_plan": "push",
    "AllowListPushMixin": "mixin",
    "MoECardMixin": "mixin",
    "register": "cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
