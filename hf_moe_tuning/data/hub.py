"""Real counterparts of the embedded world, from the Hub: the Flan collection and SuperGLUE tasks.

Only used by the ``real`` recipes; nothing here runs in the test suite (no network). Each SuperGLUE
task is mapped to the same columns as the embedded held-out tasks (``inputs``, ``targets``,
``choices``) with T5-style prompts, so the pipeline treats both alike. SuperGLUE's test labels are
hidden, so its validation split serves as the test split and a validation split is carved from train.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from datasets import Dataset, DatasetDict, load_dataset

logger = logging.getLogger(__name__)


def _boolq(row: dict) -> dict:
    return {
        "inputs": f"{row['passage']}\nQuestion: {row['question']}? Answer yes or no.",
        "targets": "yes" if row["label"] == 1 else "no",
        "choices": ["yes", "no"],
    }


def _rte(row: dict) -> dict:
    return {
        "inputs": f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}\nDoes the premise entail the hypothesis?",
        "targets": ("entailment", "not_entailment")[row["label"]],
        "choices": ["entailment", "not_entailment"],
    }


def _cb(row: dict) -> dict:
    labels = ["entailment", "contradiction", "neutral"]
    return {
        "inputs": f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}\nEntailment, contradiction or neutral?",
        "targets": labels[row["label"]],
        "choices": labels,
    }


def _copa(row: dict) -> dict:
    relation = "What was the cause?" if row["question"] == "cause" else "What happened as a result?"
    choices = [row["choice1"], row["choice2"]]
    return {
        "inputs": f"{row['premise']} {relation}\nOPTIONS: {choices[0]} | {choices[1]}",
        "targets": choices[row["label"]],
        "choices": choices,
    }


#: SuperGLUE task name -> row formatter (all four are scored by candidate log-likelihood, metric accuracy).
SUPERGLUE_TASKS: dict[str, Callable[[dict], dict]] = {"boolq": _boolq, "rte": _rte, "cb": _cb, "copa": _copa}


def superglue_task(
    name: str,
    dataset_id: str = "aps/super_glue",
    seed: int = 0,
    train_size: int | None = None,
    validation_size: int = 200,
) -> DatasetDict:
    """Train/validation/test splits of SuperGLUE task ``name`` in the held-out-task columns."""
    if name not in SUPERGLUE_TASKS:
        raise KeyError(f"unknown SuperGLUE task {name!r}; known: {sorted(SUPERGLUE_TASKS)}")
    raw = load_dataset(dataset_id, name)
    fmt = SUPERGLUE_TASKS[name]
    train = raw["train"].shuffle(seed=seed)
    validation_size = min(validation_size, len(train) // 5)
    carved = train.train_test_split(test_size=validation_size, seed=seed)
    train_split = carved["train"]
    if train_size is not None:
        train_split = train_split.select(range(min(train_size, len(train_split))))
    columns = raw["train"].column_names
    return DatasetDict(
        train=train_split.map(fmt, remove_columns=columns),
        validation=carved["test"].map(fmt, remove_columns=columns),
        test=raw["validation"].map(fmt, remove_columns=columns),
    )


def flan_mixture(
    dataset_id: str, num_examples: int, split: str = "train", config: str | None = None, seed: int = 0
) -> Dataset:
    """The first ``num_examples`` of a Flan collection dataset (streamed), as ``inputs``/``targets`` columns.

    Works with datasets exposing ``inputs``/``targets`` (e.g. ``Open-Orca/FLAN``) or
    ``input``/``output`` columns.
    """
    stream = load_dataset(dataset_id, config, split=split, streaming=True).shuffle(seed=seed, buffer_size=10_000)
    rows = []
    for row in stream:
        source = row.get("inputs", row.get("input"))
        target = row.get("targets", row.get("output"))
        if source is None or target is None:
            raise ValueError(f"{dataset_id}: expected inputs/targets (or input/output) columns, got {sorted(row)}")
        rows.append({"inputs": source, "targets": target})
        if len(rows) >= num_examples:
            break
    logger.info("loaded %d instruction examples from %s", len(rows), dataset_id)
    return Dataset.from_list(rows)
