"""Content fingerprints of generated datasets.

Shipped checkpoints (``pretrain.shipped_dir``, ``instruct.shipped_dir``) are found by their configuration key
alone, not by the package's source hash (:mod:`hf_moe_tuning.study.cache`). A change to the embedded corpus or
instruction mixture would otherwise leave the old checkpoints in use, trained on other data. The keys of those
stages therefore include :func:`content_fingerprint` of the data they train on.
"""

from __future__ import annotations

import hashlib
import json

from datasets import Dataset


def content_fingerprint(dataset: Dataset, columns: tuple[str, ...] | None = None, length: int = 16) -> str:
    """SHA-256 (first ``length`` hex digits) of ``columns`` of ``dataset`` (all columns by default), row by row.

    Two datasets have the same fingerprint exactly when they hold the same values in the same order.
    """
    names = tuple(columns) if columns is not None else tuple(dataset.column_names)
    missing = set(names) - set(dataset.column_names)
    if missing:
        raise ValueError(f"columns {sorted(missing)} are not in the dataset (it has {dataset.column_names})")
    digest = hashlib.sha256(json.dumps(names).encode())
    for batch in dataset.select_columns(list(names)).iter(batch_size=4096):
        digest.update(json.dumps([batch[name] for name in names], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:length]
