"""Content-addressed stage cache: a stage reruns when its configuration, the code or the platform changed.

A stage's key is the SHA-256 of the canonical JSON of everything that determines its output: its own
settings, the key of the stage it starts from, data settings and seeds (the *configuration key*,
:func:`config_key`), plus the :func:`provenance` of the run: a hash of every source file of the
package, the versions of the libraries that compute the numbers, the platform and the torch thread
count (the thread count changes CPU float results), and the number of processes when there are several
(``accelerate launch -n N``: reductions run in another order). Finished stages live in
``<cache_dir>/<stage>/<name>-<key>/`` with ``stage.json`` (the hashed config and provenance) and a
``DONE`` marker written last, so an interrupted stage is simply redone.

Under a multi-process launch rank 0 owns the cache: it alone decides whether a stage is done, writes
the stage folder and its markers; the other ranks train with it and wait (:func:`process_state`; see
:func:`hf_moe_tuning.study.stages.run_cached`). Several nodes need the cache on a shared filesystem.

Shipped pretrained checkpoints (``pretrain.shipped_dir``) are inputs, like a Hub checkpoint: they are
found by their configuration key alone, and the results record that a shipped checkpoint was used. That
key covers the content of the data the stage trains on (a fingerprint of the embedded corpus or
instruction mixture), so a change to the data generators cannot leave a stale checkpoint in use.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks; elsewhere concurrent runs on one cache are not protected
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

#: Format version of configuration keys (part of every key; shipped checkpoints were keyed with 1).
KEY_FORMAT = 1
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
#: Libraries whose versions change the numbers.
VERSIONED_LIBRARIES: tuple[str, ...] = ("torch", "transformers", "accelerate", "datasets", "evaluate", "peft", "trl", "numpy")


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """SHA-256 of every Python source file of the package (relative path and content, in path order)."""
    digest = hashlib.sha256()
    for file in sorted(PACKAGE_ROOT.rglob("*.py")):
        if "__pycache__" in file.parts:
            continue
        digest.update(file.relative_to(PACKAGE_ROOT).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`VERSIONED_LIBRARIES` (``"absent"`` for one not installed)."""
    out = {}
    for name in VERSIONED_LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def process_state():
    """accelerate's ``PartialState`` when this process is one of several (``accelerate launch -n N``, torchrun), else ``None``."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not (dist.is_available() and dist.is_initialized()):
        return None
    import torch
    from accelerate import PartialState

    # without a GPU the processes train on gloo (MULTI_CPU); the stages' TrainingArguments get use_cpu=True too
    state = PartialState(cpu=not torch.cuda.is_available())
    return state if state.num_processes > 1 else None


def num_processes() -> int:
    """Number of processes of this run (1 without a multi-process launch)."""
    state = process_state()
    return state.num_processes if state is not None else 1


def is_main_process() -> bool:
    """Whether this process owns the cache and the results (rank 0, or the only process)."""
    state = process_state()
    return state is None or state.is_main_process


def provenance() -> dict[str, Any]:
    """What besides the configuration determines a stage's output: code, libraries, platform, threads
    (and the number of processes, when more than one)."""
    import torch

    record = {
        "source": source_hash(),
        "versions": library_versions(),
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
    }
    processes = num_processes()
    if processes > 1:  # one-process keys stay as they were
        record["processes"] = processes
    return record


def config_key(payload: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-able configuration payload (keys sorted, non-JSON values stringified)."""
    text = json.dumps({"payload": payload, "pipeline_version": KEY_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def config_hash(payload: Any, length: int = 12) -> str:
    """Cache key of a stage: its configuration key combined with the run's :func:`provenance`."""
    text = json.dumps({"config": config_key(payload, 64), "provenance": provenance()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


class StageCache:
    """Directories of finished stages under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, stage: str, name: str, key: str) -> Path:
        return self.root / stage / f"{name}-{key}"

    @contextlib.contextmanager
    def lock(self, path: Path) -> Iterator[None]:
        """Hold an exclusive lock on stage ``path`` so concurrent studies sharing a cache compute it once.

        Callers re-check :meth:`is_done` after acquiring it.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "w") as handle:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def is_done(path: Path) -> bool:
        return (path / "DONE").is_file()

    @staticmethod
    def prepare(path: Path) -> Path:
        """Empty ``path`` (a stale, unfinished stage) and create it."""
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    @staticmethod
    def finish(path: Path, config: Any, result: dict[str, Any] | None = None) -> None:
        """Record the stage config (and result) and mark the stage done."""
        record = {"config": config, "provenance": provenance()}
        (path / "stage.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        if result is not None:
            (path / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
        (path / "DONE").write_text("")

    @staticmethod
    def result(path: Path) -> dict[str, Any]:
        return json.loads((path / "result.json").read_text())
