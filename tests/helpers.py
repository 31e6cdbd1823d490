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
