"""Content-addressed stage cache: a stage reruns only when its configuration (hash) changed.

A stage's key is the SHA-256 of the canonical JSON of everything that determines its output (its
own settings, the key of the stage it starts from, data settings, seeds and :data:`PIPELINE_VERSION`).
Finished stages live in ``<cache_dir>/<stage>/<name>-<key>/`` with ``stage.json`` (the hashed
config) and a ``DONE`` marker written last, so an interrupted stage is simply redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks; elsewhere concurrent runs on one cache are not protected
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

#: Bump when the pipeline's code changes what a stage produces for the same configuration.
PIPELINE_VERSION = 1


def config_hash(payload: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-able payload (keys sorted, non-JSON values stringified)."""
    text = json.dumps({"payload": payload, "pipeline_version": PIPELINE_VERSION}, sort_keys=True, default=str)
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
        (path / "stage.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if result is not None:
            (path / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
        (path / "DONE").write_text("")

    @staticmethod
    def result(path: Path) -> dict[str, Any]:
        return json.loads((path / "result.json").read_text())
