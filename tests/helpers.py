"""Small data builders shared by test modules (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import torch
from datasets import Dataset


def random_lm_dataset(n: int = 32, length: int = 12) -> Dataset:
    """``n`` seeded random token rows of ``length`` tokens, ``labels`` equal to ``input_ids`` (causal LM)."""
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 300, (length,), generator=g).tolist()} for _ in range(n)]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    return Dataset.from_list(rows)


def variable_length_rows(model_name: str, n: int = 16, seed: int = 0, ignore_all: bool = False) -> list[dict]:
    """``n`` seeded rows of 3 to 12 random tokens (so batches carry padding), with an all-ones ``attention_mask``.

    ``switch`` (encoder-decoder): ``labels`` are the first half of the ``input_ids`` (at least 2 tokens); any
    other model (decoder-only): ``labels`` are the ``input_ids`` with a prompt prefix of 2 tokens (none below
    4 tokens) set to ``-100``, or every label ``-100`` with ``ignore_all``.
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 13, (1,), generator=g))
        ids = torch.randint(3, 300, (length,), generator=g).tolist()
        if model_name == "switch":
            rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids[: max(2, length // 2)]})
        else:
            prompt = 0 if length < 4 else 2
            labels = [-100] * length if ignore_all else [-100] * prompt + ids[prompt:]
            rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return rows
