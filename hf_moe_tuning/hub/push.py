"""Pushing a finished run to the Hub: an allow-list of files through ``HfApi.upload_folder``.

A push uploads top-level files only, those matching :data:`UPLOAD_ALLOW_PATTERNS` (safetensors weights
and their index, configs, tokenizer files, the card, the adapter, this package's JSON files and PNG
plots); hidden files, folders, pickles (``*.bin``, ``*.pt``, ``*.pth``; ``training_args.bin`` holds the
raw ``hub_token``) and symlinks that point out of the folder never go. :func:`upload_plan` computes the
list once; the dry run prints it and the upload passes exactly those names to ``upload_folder``
(:func:`upload_allowed`, also used by ``MoETrainer.push_to_hub`` and the trainer's ``hub_strategy`` checkpoint
pushes, see :mod:`.mixin`). Every check that needs no network runs first: repo id, finished run, adapter
targets, offline mode, token.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import HfApi
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME

from .card import build_model_card, save_card
from .run_record import MOE_RUN_NAME
from .summary import (
    ADAPTER_CONFIG_NAME,
    CARD_NAME,
    EXPERT_LOAD_JSONL,
    RUN_INFO_NAME,
    _resolve_base,
    load_run,
    read_run_info,
    require_finished_run,
)

logger = logging.getLogger(__name__)

#: The only files a push uploads: fnmatch patterns on top-level file names (nothing in sub-folders).
UPLOAD_ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors",  # model.safetensors, model-0000i-of-0000n.safetensors, adapter_model.safetensors
    "*.safetensors.index.json",
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    ADAPTER_CONFIG_NAME,
    # tokenizer / processor files
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    # the card and this package's own files
    CARD_NAME,
    MOE_RUN_NAME,
    RUN_INFO_NAME,
    EXPERT_LOAD_JSONL,
    TRAINER_STATE_NAME,
    "*.png",
)

#: Never uploaded even where an allow pattern matches (defence in depth; also passed to ``upload_folder``):
#: hidden and private files, anything in a sub-folder, pickles, optimizer/scheduler/RNG state.
UPLOAD_IGNORE_PATTERNS: tuple[str, ...] = (
    ".*",
    "_*",
    "*/*",
    TRAINING_ARGS_NAME,
    "*.bin",
    "*.pt",
    "*.pth",
    "*.pkl",
    "*.pickle",
    "*.lock",
)


class HubPushError(OSError):
    """A push could not start or failed at the Hub (no token, offline mode, no connection, refused); one-line message."""


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is a valid Hub repo id, else raise ``ValueError`` naming the rule it breaks."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"invalid repo id {repo_id!r}: {err}") from err
    return repo_id


@dataclass
class UploadPlan:
    """What a push of ``folder`` sends (``files``, top-level names) and what it leaves out (``skipped``: name -> reason)."""

    folder: str
    files: list[str]
    skipped: dict[str, str] = field(default_factory=dict)


def _allowed_name(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in UPLOAD_ALLOW_PATTERNS) and not any(
        fnmatch.fnmatchcase(name, p) for p in UPLOAD_IGNORE_PATTERNS
    )


def upload_plan(folder: str) -> UploadPlan:
    """The files of ``folder`` a push uploads: top-level regular files whose name matches
    :data:`UPLOAD_ALLOW_PATTERNS` and no :data:`UPLOAD_IGNORE_PATTERNS`; a symlink only when it resolves
    to a regular file inside ``folder``. Sub-folders are never entered."""
    root = os.path.realpath(folder)
    files, skipped = [], {}
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name
            if entry.is_dir(follow_symlinks=False):
                skipped[name + "/"] = "folder"
            elif not _allowed_name(name):
                skipped[name] = "not on the allow-list"
            elif entry.is_symlink():
                target = os.path.realpath(entry.path)
                if os.path.commonpath([root, target]) != root:
                    skipped[name] = "symlink out of the folder"
                elif not os.path.isfile(target):
                    skipped[name] = "symlink to a non-file"
                else:
                    files.append(name)
            elif not entry.is_file(follow_symlinks=False):
                skipped[name] = "not a regular file"
            else:
                files.append(name)
    return UploadPlan(folder=folder, files=files, skipped=skipped)


def files_to_upload(folder: str) -> list[str]:
    """Names (sorted) of the files a push of ``folder`` uploads; see :func:`upload_plan`."""
    return upload_plan(folder).files


def upload_allowed(
    api: HfApi,
    repo_id: str,
    folder: str,
    *,
    commit_message: str,
    path_in_repo: str | None = None,
    token: str | None = None,
    revision: str | None = None,
    run_as_future: bool = False,
    plan: UploadPlan | None = None,
) -> Any:
    """``api.upload_folder`` of exactly the files of ``plan`` (default: :func:`upload_plan` of ``folder``).

    The one upload call of both ``hf-moe-tuning push`` and ``MoETrainer.push_to_hub`` / its checkpoint pushes:
    the checked names go as ``allow_patterns`` (glob-escaped) and :data:`UPLOAD_IGNORE_PATTERNS` as
    ``ignore_patterns``, so ``huggingface_hub``'s own file selection can add nothing. Returns what
    ``upload_folder`` returns (a ``Future`` with ``run_as_future``), or ``None`` when nothing is on the
    allow-list (no empty commit).
    """
    plan = plan if plan is not None else upload_plan(folder)
    if not plan.files:
        logger.warning("nothing of %s is on the upload allow-list; nothing was pushed to %s", folder, repo_id)
        return None
    logger.info("pushing %d files of %s to %s%s%s: %s", len(plan.files), folder, repo_id,
                f"/{path_in_repo}" if path_in_repo else "", f"@{revision}" if revision else "", ", ".join(plan.files))
    if plan.skipped:
        logger.info("not pushed (see hf_moe_tuning.hub.push): %s",
                    ", ".join(f"{name} ({why})" for name, why in sorted(plan.skipped.items())))
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        path_in_repo=path_in_repo,
        allow_patterns=[glob.escape(name) for name in plan.files],
        ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),
        commit_message=commit_message,
        token=token,
        revision=revision,
        run_as_future=run_as_future,
    )


_MODEL_FILES = re.compile(r"(model.*\.safetensors(\.index\.json)?|adapter_model\.safetensors|adapter_config\.json|config\.json)")


def _merge_into(output_dir: str, staging: str, run_info: dict[str, Any]) -> None:
    """Merge the adapter in ``output_dir`` into its base model and save the result (and the run files) in ``staging``."""
    from peft import PeftConfig

    from ..adapters import load_lora_model, merge_adapter

    spec = run_info.get("base_model") or PeftConfig.from_pretrained(output_dir).base_model_name_or_path
    base = _resolve_base(spec, run_info, meta=False)
    if base is None:
        raise ValueError(
            f"--merge-adapter needs the base model offline; {spec!r} is neither a local folder nor 'tiny:<name>' "
            f"(set base_model in {RUN_INFO_NAME})"
        )
    merged = merge_adapter(load_lora_model(base, output_dir))
    merged.save_pretrained(staging)
    for name in files_to_upload(output_dir):
        if name == CARD_NAME or _MODEL_FILES.fullmatch(name):
            continue
        shutil.copyfile(os.path.join(output_dir, name), os.path.join(staging, name))


def _hub_error_types() -> tuple[type[BaseException], ...]:
    """Errors of a failed Hub call: ``OSError`` (``HfHubHTTPError``, ``OfflineModeIsEnabled``, ``ConnectionError``)
    and the base error of the HTTP client ``huggingface_hub`` uses (``httpx`` / ``httpx2`` transport errors)."""
    types: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        error = getattr(module, "HTTPError", None) if module is not None else None
        if isinstance(error, type) and issubclass(error, BaseException):
            types.append(error)
    return tuple(types)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n")[0].split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _require_hub_access(token: str | None) -> str:
    """The token to push with; raises :class:`HubPushError` in offline mode or when there is no token (no network used)."""
    if hub_constants.is_offline_mode():
        raise HubPushError("HF_HUB_OFFLINE is set: pushing needs the Hub; unset it, or use --dry-run to list the files")
    if token:
        return token
    try:
        token = huggingface_hub.get_token()
    except Exception as err:  # e.g. a failed OIDC exchange or token refresh
        raise HubPushError(f"could not get a Hugging Face token ({_one_line(err)})") from err
    if not token:
        raise HubPushError(
            "no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token (nothing was uploaded)"
        )
    return token


def push_run(
    output_dir: str,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    merge_adapter: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
    dry_run: bool = False,
    **card_kwargs: Any,
) -> Any:
    """Write the card of the finished run in ``output_dir`` and upload the run to ``repo_id``.

    Everything is checked before the first Hub call: the repo id, that the folder holds a finished
    run, (adapters) that every adapter target has saved weights and exists in the base model when
    that is available offline, offline mode, and that there is a token. ``merge_adapter`` uploads the
    base model with the adapter merged in (``merge_and_unload``) instead of the adapter. Only the
    files of :func:`upload_plan` are sent, through ``HfApi.upload_folder`` with exactly those names as
    ``allow_patterns``.

    Args:
        dry_run: build and validate the card without writing it, and return the :class:`UploadPlan`
            (``README.md`` included) without any network call.

    Returns:
        The ``CommitInfo`` of ``upload_folder``, or the :class:`UploadPlan` with ``dry_run``.

    Raises:
        ValueError: a bad repo id or request; :class:`NoFinishedRunError`: nothing to push;
        :class:`HubPushError`: no token, offline mode, or the Hub could not be reached / refused the push.
    """
    from ..adapters import check_adapter_checkpoint, is_adapter_dir

    check_repo_id(repo_id)
    require_finished_run(output_dir)
    adapter = is_adapter_dir(output_dir)
    run_info = read_run_info(output_dir)
    if adapter:
        spec = run_info.get("base_model") or check_adapter_checkpoint(output_dir).get("base_model_name_or_path")
        check_adapter_checkpoint(output_dir, base_model=_resolve_base(spec, run_info, meta=True))
    elif merge_adapter:
        raise ValueError(f"--merge-adapter was given, but {output_dir!r} holds a full model, not an adapter")
    if not dry_run:
        token = _require_hub_access(token)
    card_kwargs.setdefault("model_name", repo_id.split("/")[-1])
    with tempfile.TemporaryDirectory() as staging:
        folder = output_dir
        if merge_adapter:
            _merge_into(output_dir, staging, run_info)
            summary = load_run(staging)
            summary.base_model = run_info.get("base_model") or summary.base_model
            card = build_model_card(summary, **card_kwargs)
            card.text += "\nThe LoRA adapter of this run was merged into the base weights (`merge_and_unload`) before upload.\n"
            folder = staging
        else:
            card = build_model_card(load_run(output_dir), **card_kwargs)
        if dry_run:
            plan = upload_plan(folder)
            plan.files = sorted(set(plan.files) | {CARD_NAME})  # the push writes the card first
            plan.skipped.pop(CARD_NAME, None)
            plan.folder = output_dir
            return plan
        save_card(card, folder)
        plan = upload_plan(folder)
        if CARD_NAME not in plan.files:
            raise OSError(f"the card {os.path.join(folder, CARD_NAME)} was not written as a regular file")
        api = api or HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return upload_allowed(
                api,
                repo_id,
                folder,
                plan=plan,
                commit_message=commit_message or f"Upload MoE fine-tuning run {Path(os.path.abspath(output_dir)).name}",
                revision=revision,
            )
        except _hub_error_types() as err:
            raise HubPushError(
                f"push to {repo_id} at {getattr(api, 'endpoint', None) or hub_constants.ENDPOINT} failed: {_one_line(err)}"
            ) from err
