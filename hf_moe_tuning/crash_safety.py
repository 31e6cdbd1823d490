"""Crash safety: atomic writes, complete-checkpoint discovery and clear errors for broken checkpoints.

What ``MoETrainer`` guarantees (the Trainer writes a checkpoint as ``config.json`` + weights, ``optimizer.pt``,
``scheduler.pt``, ``rng_state*.pth`` and, last, ``trainer_state.json``; none of these writes is atomic):

* **Resume picks the newest complete checkpoint.** ``train(resume_from_checkpoint=True)`` inspects the
  ``checkpoint-N`` folders of ``output_dir`` newest first (:func:`inspect_checkpoint`: ``trainer_state.json``
  parses and has its fields, the weights are whole – safetensors header and size, zip directory of ``.bin``/
  ``.pt`` files –, ``optimizer.pt`` and ``scheduler.pt`` are there and whole) and resumes from the first
  complete one, with a warning naming every folder it skipped and why. A skipped folder is deleted right
  before the resumed run writes the same step again, so stale files never mix with new ones.
* **A checkpoint given by path is checked the same way**; a broken one raises :class:`CheckpointError`
  naming the file, the problem and the checkpoint to fall back to.
* **Missing ``optimizer.pt`` / ``scheduler.pt`` is refused**, not resumed with a fresh optimizer and a
  restarted schedule (that is not the run that was interrupted). To continue from such weights on purpose,
  load them with ``from_pretrained`` and start a new run; runs with ``save_only_model=True`` (checkpoints
  without optimizer state by choice) resume with a warning instead. A missing ``rng_state*.pth`` only warns
  (the data order and dropout then differ from the uninterrupted run).
* **This package's own files are written atomically** (:func:`atomic_torch_save`, :func:`atomic_write_text`:
  a temporary file in the same folder, ``fsync``, ``os.replace``), so they are either absent or whole.
  ``MoETrainer`` writes the routing-drift reference into the checkpoint folder *before* ``trainer_state.json``,
  so a checkpoint that looks complete always has it.
* **Raw loading errors name the file**: an error while loading the weights, the optimizer, the scheduler
  or the RNG state of a checkpoint is re-raised as :class:`CheckpointError` naming the file and the
  fallback checkpoint (:class:`CrashSafeCheckpointMixin`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers.trainer import (
    OPTIMIZER_NAME,
    OPTIMIZER_NAME_BIN,
    SCHEDULER_NAME,
    TRAINER_STATE_NAME,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"^" + PREFIX_CHECKPOINT_DIR + r"\-(\d+)$")
#: trainer_state.json fields every Trainer writes and resuming reads
_STATE_FIELDS: dict[str, type | tuple[type, ...]] = {"global_step": int, "max_steps": int, "log_history": list}


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from: a file is missing, truncated or unreadable (the message names it)."""


# ----------------------------------------------------------------------------------------- atomic writes
def _atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` so that ``path`` is either its old content or all of ``text`` (temp file + rename)."""
    return _atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str, obj: Any, **dumps_kwargs: Any) -> str:
    """:func:`atomic_write_text` of ``json.dumps(obj)``."""
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def atomic_torch_save(obj: Any, path: str) -> str:
    """``torch.save(obj, path)``, atomically (temp file in the same folder + ``os.replace``)."""
    import torch

    return _atomic_write(path, lambda f: torch.save(obj, f))


# ----------------------------------------------------------------------------------------- inspection
@dataclass
class CheckpointReport:
    """What :func:`inspect_checkpoint` found in one checkpoint folder.

    Attributes:
        folder: the checkpoint folder.
        step: ``N`` of ``checkpoint-N`` (``None`` for another name).
        fatal: ``(file, problem)`` pairs that make resuming impossible or wrong (missing, truncated, unreadable).
        inexact: ``(file, problem)`` pairs that only make the resumed run differ (a missing RNG state).
    """

    folder: str
    step: int | None
    fatal: list[tuple[str, str]] = field(default_factory=list)
    inexact: list[tuple[str, str]] = field(default_factory=list)
    model_type: str | None = None

    @property
    def complete(self) -> bool:
        return not self.fatal and not self.inexact

    def describe(self, problems: list[tuple[str, str]] | None = None) -> str:
        problems = self.fatal + self.inexact if problems is None else problems
        return "; ".join(f"{name}: {problem}" for name, problem in problems)


def checkpoint_step(folder: str) -> int | None:
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(folder)))
    return int(match.group(1)) if match else None


def checkpoint_folders(output_dir: str) -> list[str]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest (largest ``N``) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (checkpoint_step(name), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if checkpoint_step(name) is not None and os.path.isdir(os.path.join(output_dir, name))
    ]
    return [path for _, path in sorted(found, reverse=True)]


def _zip_problem(path: str) -> str | None:
    """Why the torch zip file ``path`` is not whole (``None`` when its central directory is intact)."""
    size = os.path.getsize(path)
    if size == 0:
        return "empty file (0 bytes)"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                zf.infolist()
        except (zipfile.BadZipFile, OSError) as err:  # pragma: no cover - is_zipfile already read the directory
            return f"unreadable zip archive ({err})"
        return None
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return f"truncated ({size} bytes; the zip directory at its end is missing)"
    return None  # a legacy (non-zip) torch.save file: nothing cheap to check


def _safetensors_problem(path: str) -> str | None:
    """Why the safetensors file ``path`` is not whole (``None`` when its header and size agree)."""
    size = os.path.getsize(path)
    if size < 8:
        return f"truncated ({size} bytes)"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            return f"truncated ({size} bytes; the header alone needs {header_len + 8})"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"corrupt header ({err})"
    if not isinstance(header, dict):
        return "corrupt header (not a JSON object)"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            return f"corrupt header (tensor {name!r} has no data_offsets)"
        end = max(end, int(offsets[1]))
    expected = 8 + header_len + end
    if size < expected:
        return f"truncated ({size} of {expected} bytes)"
    if size > expected:
        return f"corrupt ({size} bytes, the header describes {expected})"
    return None


def _file_problem(path: str) -> str | None:
    if path.endswith(".safetensors"):
        return _safetensors_problem(path)
    if path.endswith((".bin", ".pt", ".pth")):
        return _zip_problem(path)
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"not valid JSON (truncated or corrupt: {err})"
    return None


def _json_file(path: str) -> tuple[Any, str | None]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"not valid JSON (truncated or corrupt: {err})"


def _check_state(folder: str, report: CheckpointReport) -> None:
    path = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        report.fatal.append((TRAINER_STATE_NAME, "missing (the Trainer writes it last: the save was interrupted)"))
        return
    data, problem = _json_file(path)
    if problem is None:
        if not isinstance(data, dict):
            problem = f"not a JSON object ({type(data).__name__})"
        else:
            missing = [k for k, kind in _STATE_FIELDS.items() if not isinstance(data.get(k), kind)]
            if missing:
                problem = f"lacks the fields {missing} every Trainer writes (emptied or corrupt)"
    if problem is not None:
        report.fatal.append((TRAINER_STATE_NAME, problem))


def _check_weights(folder: str, report: CheckpointReport) -> None:
    names = set(os.listdir(folder))
    for single, index in ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        if single in names:
            problem = _file_problem(os.path.join(folder, single))
            if problem:
                report.fatal.append((single, problem))
            return
        if index in names:
            data, problem = _json_file(os.path.join(folder, index))
            if problem or not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
                report.fatal.append((index, problem or "has no weight_map"))
                return
            for shard in sorted(set(data["weight_map"].values())):
                if shard not in names:
                    report.fatal.append((shard, f"missing (listed in {index})"))
                elif problem := _file_problem(os.path.join(folder, shard)):
                    report.fatal.append((shard, problem))
            return
    for adapter in (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME):
        if adapter in names:
            if problem := _file_problem(os.path.join(folder, adapter)):
                report.fatal.append((adapter, problem))
            return
    if any(n.startswith(("pytorch_model_fsdp", "global_step")) for n in names):
        return  # FSDP / DeepSpeed checkpoints: their own loaders check them
    report.fatal.append((SAFE_WEIGHTS_NAME, "missing (no model weights in the folder)"))


def _check_optimizer(folder: str, report: CheckpointReport) -> None:
    names = set(os.listdir(folder))
    if any(n.startswith("global_step") for n in names):
        return  # DeepSpeed keeps optimizer and scheduler in its own folders
    sharded = any("optimizer" in n and os.path.isdir(os.path.join(folder, n)) for n in names)
    optimizer = next((n for n in (OPTIMIZER_NAME, OPTIMIZER_NAME_BIN) if n in names), None)
    if optimizer is None and not sharded:
        report.fatal.append((OPTIMIZER_NAME, "missing: resuming would restart the optimizer state"))
    elif optimizer is not None and (problem := _file_problem(os.path.join(folder, optimizer))):
        report.fatal.append((optimizer, problem))
    if SCHEDULER_NAME not in names:
        report.fatal.append((SCHEDULER_NAME, "missing: resuming would restart the learning-rate schedule"))
    elif problem := _file_problem(os.path.join(folder, SCHEDULER_NAME)):
        report.fatal.append((SCHEDULER_NAME, problem))


def _check_rng(folder: str, report: CheckpointReport, world_size: int, process_index: int) -> None:
    name = "rng_state.pth" if world_size <= 1 else f"rng_state_{process_index}.pth"
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        report.inexact.append((name, "missing: data order and dropout will differ from the uninterrupted run"))
    elif problem := _file_problem(path):
        report.fatal.append((name, problem))


def inspect_checkpoint(
    folder: str, *, optimizer: bool = True, rng: bool = True, world_size: int = 1, process_index: int = 0
) -> CheckpointReport:
    """Check that ``folder`` holds a whole checkpoint (cheap: headers, sizes and zip directories, no tensor is read).

    Args:
        folder: a ``checkpoint-N`` folder.
        optimizer: require ``optimizer.pt`` and ``scheduler.pt`` (off for ``save_only_model`` checks).
        rng: check the RNG state file of this process.
        world_size / process_index: which ``rng_state*.pth`` this process reads.
    """
    report = CheckpointReport(folder=folder, step=checkpoint_step(folder))
    if not os.path.isdir(folder):
        report.fatal.append((folder, "no such checkpoint folder"))
        return report
    _check_state(folder, report)
    config_path = os.path.join(folder, CONFIG_NAME)
    if os.path.isfile(config_path):
        data, problem = _json_file(config_path)
        if problem:
            report.fatal.append((CONFIG_NAME, problem))
        elif isinstance(data, dict):
            report.model_type = data.get("model_type")
    _check_weights(folder, report)
    if optimizer:
        _check_optimizer(folder, report)
    if rng:
        _check_rng(folder, report, world_size, process_index)
    return report


# ----------------------------------------------------------------------------------------- resolving a resume
def _model_type(model: Any) -> str | None:
    config = getattr(model, "config", None)
    if config is None:
        base = getattr(model, "get_base_model", None)  # PEFT
        config = getattr(base(), "config", None) if callable(base) else None
    return getattr(config, "model_type", None)


def _check_family(report: CheckpointReport, model: Any) -> None:
    current = _model_type(model)
    if report.model_type and current and report.model_type != current:
        raise CheckpointError(
            f"{report.folder!r} holds a {report.model_type!r} model but this trainer trains a {current!r} model: a "
            "checkpoint only resumes into the model family (and configuration) that wrote it. Resume with the same "
            "model, or start a new run without resume_from_checkpoint."
        )


def _inspect(trainer: Any, folder: str) -> CheckpointReport:
    args = trainer.args
    report = inspect_checkpoint(
        folder,
        optimizer=not getattr(trainer, "is_deepspeed_enabled", False),
        world_size=getattr(args, "world_size", 1),
        process_index=getattr(args, "process_index", 0),
    )
    if getattr(args, "save_only_model", False):  # the user chose checkpoints without optimizer state: opted in
        restart = [(n, p) for n, p in report.fatal if n in (OPTIMIZER_NAME, SCHEDULER_NAME) and p.startswith("missing")]
        report.fatal = [item for item in report.fatal if item not in restart]
        report.inexact += [(n, f"{p} (save_only_model=True)") for n, p in restart]
    return report


def _interrupted_saves_only(reports: list[CheckpointReport]) -> bool:
    """Whether every report is of a save interrupted before its last write (``trainer_state.json`` missing or cut)."""
    return all(any(name == TRAINER_STATE_NAME for name, _ in r.fatal) for r in reports)


def _fallback(trainer: Any, folder: str) -> str:
    """A sentence naming the checkpoint to fall back to from the broken ``folder``."""
    parent = os.path.dirname(os.path.normpath(folder)) or "."
    step = checkpoint_step(folder)
    for other in checkpoint_folders(parent):
        if os.path.normpath(other) == os.path.normpath(folder):
            continue
        if step is not None and (checkpoint_step(other) or 0) > step:
            continue
        if _inspect(trainer, other).complete:
            return (
                f"Resume from {other!r}, the newest complete checkpoint before it "
                "(train(resume_from_checkpoint=True) picks it and skips the broken one)."
            )
    return f"No complete checkpoint to fall back to in {parent!r}; start again without resume_from_checkpoint."


def resolve_resume_checkpoint(trainer: Any, resume_from_checkpoint: str | bool | None) -> str | None:
    """The checkpoint folder ``trainer.train(resume_from_checkpoint=...)`` should resume from (see module docstring).

    ``True``: the newest complete ``checkpoint-N`` of ``output_dir`` (warning for each newer one skipped; the
    skipped folders are remembered in ``trainer._moe_stale_checkpoints`` so they are replaced, not merged,
    when the step is saved again). When the interrupted run completed no save at all (no folder, or only
    folders whose ``trainer_state.json`` – the Trainer's last write – is missing or cut), ``None`` with a
    warning: training starts from step 0, as the interrupted run did (transformers raises instead; that error
    is kept when ``output_dir`` did not exist before this trainer, i.e. for a mistyped folder).
    A path: that folder, checked. ``None``/``False``: ``None``.

    Raises:
        CheckpointError: the given checkpoint is broken (naming the file and the fallback), no checkpoint of
            ``output_dir`` is complete, or the checkpoint holds another model family.
        ValueError: ``True`` and ``output_dir`` holds no checkpoint (transformers' own message).
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    model = getattr(trainer, "model", None)
    if resume_from_checkpoint is True:
        output_dir = trainer.args.output_dir
        folders = checkpoint_folders(output_dir)
        if (not folders or get_last_checkpoint(output_dir) is None) and (
            getattr(trainer, "_moe_created_output_dir", None) is not None or not os.path.isdir(output_dir)
        ):  # the folder did not exist before this trainer: a wrong output_dir, not an interrupted run
            raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")
        skipped: list[CheckpointReport] = []
        chosen: CheckpointReport | None = None
        for folder in folders:
            report = _inspect(trainer, folder)
            _check_family(report, model)
            if report.complete:
                chosen = report
                break
            skipped.append(report)
        if chosen is None:  # none complete: the newest that only resumes inexactly, if any
            chosen = next((r for r in skipped if not r.fatal), None)
            if chosen is not None:
                skipped = skipped[: skipped.index(chosen)]
        if chosen is None and _interrupted_saves_only(skipped) and getattr(trainer, "_moe_created_output_dir", None) is None:
            # the interrupted run never completed a save: starting over is what resuming it means
            logger.warning(
                "resume: no complete checkpoint in %s (%s); training starts from step 0, as the interrupted run did.",
                output_dir,
                "; ".join(f"{r.folder}: {r.describe()}" for r in skipped) or "it holds no checkpoint",
            )
            trainer._moe_stale_checkpoints = {os.path.abspath(r.folder) for r in skipped}
            return None
        if chosen is None:
            details = "\n".join(f"  {r.folder}: {r.describe()}" for r in skipped)
            raise CheckpointError(
                f"no complete checkpoint in {output_dir!r} to resume from:\n{details}\nStart again without "
                "resume_from_checkpoint, or resume from one of them by path after restoring the named files."
            )
        for report in skipped:
            logger.warning(
                "resume: skipping %s, it is incomplete (%s); resuming from %s. The skipped folder is replaced when "
                "training reaches step %s again.",
                report.folder, report.describe(), chosen.folder, report.step,
            )
        trainer._moe_stale_checkpoints = {os.path.abspath(r.folder) for r in skipped}
        if chosen.inexact:
            logger.warning("resume: %s is not exact: %s", chosen.folder, chosen.describe(chosen.inexact))
        return chosen.folder
    folder = str(resume_from_checkpoint)
    report = _inspect(trainer, folder)
    _check_family(report, model)
    if report.fatal:
        raise CheckpointError(f"cannot resume from {folder!r}: {report.describe(report.fatal)}. {_fallback(trainer, folder)}")
    if report.inexact:
        logger.warning("resume: %s is not exact: %s", folder, report.describe(report.inexact))
    return folder


# ----------------------------------------------------------------------------------------- the trainer mixin
def _loads(path: str) -> bool:
    """Whether ``path`` (a torch or safetensors file) can be read in full; used on error paths only."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
        else:
            import torch

            torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return True


class CrashSafeCheckpointMixin:
    """``Trainer`` mixin (``MoETrainer`` uses it): clear errors for unreadable checkpoint files, stale folders replaced.

    * a skipped incomplete ``checkpoint-N`` (see :func:`resolve_resume_checkpoint`) is deleted right before the
      resumed run saves step ``N`` again, so no stale file of the interrupted save survives next to new ones;
    * every ``ExportableState`` callback gets an entry in ``state.stateful_callbacks`` before the Trainer saves
      (transformers raises ``KeyError`` when a callback that the resumed checkpoint did not know saves);
    * files written before ``trainer_state.json``: the MoE callbacks' ``save_checkpoint_files(folder)``;
    * errors while loading the weights, the optimizer/scheduler or the RNG state are re-raised as
      :class:`CheckpointError` naming the file and the checkpoint to fall back to.
    """

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        stale = getattr(self, "_moe_stale_checkpoints", set())
        if os.path.abspath(folder) in stale:
            stale.discard(os.path.abspath(folder))
            if self.args.should_save and os.path.isdir(folder):
                logger.info("removing the incomplete %s before saving that step again", folder)
                shutil.rmtree(folder, ignore_errors=True)
        if self.args.should_save:
            from transformers.trainer_callback import ExportableState

            for cb in self.callback_handler.callbacks:
                if isinstance(cb, ExportableState) and type(cb).__name__ not in self.state.stateful_callbacks:
                    self.state.stateful_callbacks[type(cb).__name__] = cb.state()
            for cb in self.callback_handler.callbacks:
                save_files = getattr(cb, "save_checkpoint_files", None)
                if save_files is not None:
                    save_files(folder, self.state)
        super()._save_checkpoint(model, trial)  # type: ignore[misc]

    def _explain_load_error(self, checkpoint: str, files: tuple[str, ...], err: Exception) -> CheckpointError:
        present = [f for f in files if os.path.isfile(os.path.join(checkpoint, f))]
        unreadable = [f for f in present if not _loads(os.path.join(checkpoint, f))]
        return CheckpointError(
            f"cannot resume from {checkpoint!r}: reading {', '.join(unreadable or present or list(files))} failed "
            f"({type(err).__name__}: {err}). The file is corrupt, or was written for another model or configuration. "
            f"{_fallback(self, checkpoint)}"
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        from .checkpoint import CheckpointLoadError

        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        except (CheckpointLoadError, CheckpointError):
            raise
        except Exception as err:  # re-raised with the file named
            files = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
                     ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)
            raise self._explain_load_error(resume_from_checkpoint, files, err) from err

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        try:
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        except Exception as err:  # re-raised with the file named
            if checkpoint is None:
                raise
            raise self._explain_load_error(checkpoint, (OPTIMIZER_NAME, SCHEDULER_NAME), err) from err

    def _load_rng_state(self, checkpoint: str | None) -> None:
        try:
            super()._load_rng_state(checkpoint)  # type: ignore[misc]
        except Exception as err:  # re-raised with the file named
            if checkpoint is None:
                raise
            index = getattr(self.args, "process_index", 0)
            name = "rng_state.pth" if getattr(self.args, "world_size", 1) <= 1 else f"rng_state_{index}.pth"
            raise self._explain_load_error(checkpoint, (name,), err) from err


# ----------------------------------------------------------------------------------------- clear training errors
def check_train_dataset(trainer: Any) -> None:
    """Raise a clear error for an empty training set (torch would say ``num_samples=0``)."""
    dataset = getattr(trainer, "train_dataset", None)
    if dataset is None:
        return
    try:
        size = len(dataset)
    except TypeError:  # an iterable dataset
        return
    if size == 0:
        raise ValueError(
            "train_dataset is empty (0 examples): there is nothing to train on. Check the data loading and any "
            "filtering or length limit that may have dropped every example."
        )


_TOKEN_COLUMNS = ("input_ids", "decoder_input_ids", "labels")


def _rows(dataset: Any, columns: list[str], batch: int = 1024):
    """``(index, {column: ids})`` for every example of ``dataset`` (a ``datasets.Dataset`` or a sequence of dicts)."""
    column_names = getattr(dataset, "column_names", None)
    if isinstance(column_names, list):
        for start in range(0, len(dataset), batch):
            chunk = dataset[start : start + batch]
            for offset in range(len(chunk[columns[0]])):
                yield start + offset, {c: chunk[c][offset] for c in columns}
        return
    for index in range(len(dataset)):
        row = dataset[index]
        if isinstance(row, dict):
            yield index, {c: row.get(c) for c in columns}


def _flat(values: Any) -> list[int]:
    if values is None:
        return []
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (list, tuple)):
        out: list[int] = []
        for v in values:
            out.extend(_flat(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else [v])
        return out
    return [values]


def token_id_problem(trainer: Any) -> str | None:
    """The first token id of the training set outside the model's vocabulary, described (``None`` if none)."""
    model = getattr(trainer, "model", None)
    dataset = getattr(trainer, "train_dataset", None)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if dataset is None or get_embeddings is None:
        return None
    try:
        vocab = int(get_embeddings().num_embeddings)
        len(dataset)
    except Exception:
        return None
    present = getattr(dataset, "column_names", None)
    if isinstance(present, list):
        columns = [c for c in _TOKEN_COLUMNS if c in present]
    else:
        first = dataset[0] if len(dataset) else {}
        columns = [c for c in _TOKEN_COLUMNS if isinstance(first, dict) and c in first]
    if not columns:
        return None
    for index, row in _rows(dataset, columns):
        for column in columns:
            for value in _flat(row[column]):
                if not isinstance(value, int):
                    continue
                if (column == "labels" and value == -100) or 0 <= value < vocab:
                    continue
                return (
                    f"training example {index} has token id {value} in {column!r}, outside the model's vocabulary "
                    f"(embedding size {vocab}: ids 0..{vocab - 1}{', or -100 in labels' if column == 'labels' else ''}). "
                    "The tokenizer does not match the model, or the ids were built wrong."
                )
    return None


def explain_training_error(trainer: Any, err: BaseException) -> Exception | None:
    """A clearer exception for a raw error raised while training, or ``None`` to keep the original."""
    text = str(err)
    if isinstance(err, (IndexError, RuntimeError)) and (
        "out of range" in text or "out of bounds" in text or "device-side assert" in text
    ):
        problem = token_id_problem(trainer)
        if problem is not None:
            return ValueError(f"{problem} (PyTorch said: {type(err).__name__}: {text.splitlines()[0] if text else ''})")
    return None


#: files a run writes when it starts (nothing of value once it failed before its first log or checkpoint)
START_FILES = ("moe_run.json",)


def remove_empty_output_dir(path: str | None, top: str | None) -> None:
    """Remove ``path`` and its parents up to ``top`` (the outermost folder the trainer created) while they hold
    nothing but the files a run writes when it starts (:data:`START_FILES`)."""
    if not path or not top:
        return
    path, top = os.path.abspath(path), os.path.abspath(top)
    if not (path == top or path.startswith(top + os.sep)) or not os.path.isdir(path):
        return
    if set(os.listdir(path)) <= set(START_FILES):
        for name in os.listdir(path):
            os.remove(os.path.join(path, name))
    while os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
        if path == top:
            break
        path = os.path.dirname(path)


def run_training(trainer: Any, train: Callable[[], Any]) -> Any:
    """Run ``train()`` (the Trainer's own) with the clear errors and clean-up above.

    Empty training set: a clear error before anything runs. A failure while training: the output folder
    this trainer created is removed again if it is still empty, and a raw out-of-vocabulary ``IndexError`` is
    re-raised naming the example and token id. The returned ``TrainOutput`` carries the ``train_loss`` the
    logs show (without skipped steps).
    """
    try:
        check_train_dataset(trainer)
        output = train()
    except BaseException as err:
        if getattr(trainer.args, "should_save", True):
            remove_empty_output_dir(trainer.args.output_dir, getattr(trainer, "_moe_created_output_dir", None))
        better = explain_training_error(trainer, err) if isinstance(err, Exception) else None
        if better is not None:
            raise better from err
        raise
    metrics = getattr(output, "metrics", None)
    if isinstance(metrics, dict) and "train_loss" in metrics and hasattr(output, "_replace"):
        output = output._replace(training_loss=metrics["train_loss"])
    return output
