"""Per-item scores, rank classification without a length bias, and the trivial baselines.

Rank classification
-------------------
Each candidate answer is scored by the **mean** log-likelihood of its target tokens (answer + EOS)
given the input, and the best candidate is the prediction. The *sum* (T5's original rank
classification) favours short answers: every extra token adds a negative term, so with ByT5's byte
tokens "no" (2 bytes) beats "yes" (3) and "entailment" (10) beats "not_entailment" (14) for a model
that has learnt nothing. The mean per token removes that bias at no extra cost (one forward per
candidate, like the sum) and works for any label strings, which the two alternatives do not:
answers of equal token length constrain the task design, and calibration by the answer's likelihood
without the input needs a second forward per candidate and is noisy for tiny models. It is the
per-byte normalisation of lm-evaluation-harness' ``acc_norm`` for a byte-level tokenizer.

Per-item scores
---------------
Every metric of the shipped ``evaluate`` modules is a mean over items; :func:`item_scores` returns
the per-item values (0/1 for accuracy and exact match, the F1 for token F1) that the paired bootstrap
of :mod:`hf_moe_tuning.study.statistics` resamples, and checks that their mean equals what the
``evaluate`` module computes.

Trivial baselines
-----------------
:func:`baseline_predictions` gives the predictions of the baselines every results table shows:
``majority`` (the most frequent training answer), ``random`` (a uniformly random candidate, seeded),
and for generation tasks ``copy_input`` (the input verbatim) and ``copy_first_sentence``.

Constant answers
----------------
:func:`top_answer_share` is the share of items given the most frequent prediction: 1.0 for a model that
gives every item one answer. ``results.csv`` records it per classification run, so a constant answer is
read from the answers themselves; on label-balanced data a model at chance can also land exactly on the
constant answer's score (500 of 1,000 right) while its answers vary.
"""

from __future__ import annotations

import collections
import functools
import math
import random
import re
from collections.abc import Sequence

import torch

from ..data.heldout import CLASSIFICATION, GENERATION
from ..metrics_modules import load_metric
from ..metrics_modules.exact_match.exact_match import normalize
from ..metrics_modules.token_f1.token_f1 import f1_score

#: Baselines of classification and generation tasks (arm names are ``baseline:<name>``).
CLASSIFICATION_BASELINES: tuple[str, ...] = ("majority", "random")
GENERATION_BASELINES: tuple[str, ...] = ("copy_input", "copy_first_sentence")
BASELINE_PREFIX = "baseline:"

_ITEM_SCORERS = {
    "accuracy": lambda p, r: float(p == r),
    "exact_match": lambda p, r: float(normalize(p) == normalize(r)),
    "token_f1": f1_score,
}


@functools.cache
def metric_module(name: str):
    """The shipped ``evaluate`` module ``name`` (loaded once)."""
    return load_metric(name)


def item_scores(name: str, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-item values of metric ``name`` (each in [0, 1]); their mean is the ``evaluate`` module's result."""
    if name not in _ITEM_SCORERS:
        raise KeyError(f"no per-item scorer for metric {name!r}; known: {sorted(_ITEM_SCORERS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores = [_ITEM_SCORERS[name](p, r) for p, r in zip(predictions, references)]
    module_value = metric_module(name).compute(predictions=list(predictions), references=list(references))[name]
    if scores and not math.isclose(sum(scores) / len(scores), module_value, abs_tol=1e-9):
        raise RuntimeError(f"per-item {name} mean {sum(scores) / len(scores)} != evaluate module's {module_value}")
    return scores


def score_predictions(
    predictions: Sequence[str], references: Sequence[str], metrics: Sequence[str]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``(metric -> mean, metric -> per-item scores)`` of ``predictions``."""
    items = {name: item_scores(name, predictions, references) for name in metrics}
    return {name: (sum(v) / len(v) if v else math.nan) for name, v in items.items()}, items


def top_answer_share(predictions: Sequence[str]) -> float:
    """Share of ``predictions`` equal to the most frequent one (1.0: every item got the same answer)."""
    if not predictions:
        raise ValueError("no predictions")
    return max(collections.Counter(predictions).values()) / len(predictions)


def best_candidates(logliks: torch.Tensor, lengths: torch.Tensor, choices: Sequence[Sequence[str]]) -> list[int]:
    """Index of the best candidate of each item by mean log-likelihood per target token.

    ``logliks`` (summed log-likelihood) and ``lengths`` (number of target tokens) hold every candidate of
    every item back to back, in the order of ``choices``.
    """
    if (lengths <= 0).any():
        raise ValueError("every candidate needs at least one target token")
    mean = logliks / lengths
    best: list[int] = []
    offset = 0
    for options in choices:
        best.append(int(mean[offset : offset + len(options)].argmax()))
        offset += len(options)
    return best


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (up to the first ``.``/``!``/``?`` followed by space, or a newline)."""
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def baseline_predictions(
    name: str, kind: str, inputs: Sequence[str], choices: Sequence[Sequence[str]], train_targets: Sequence[str], seed: int = 0
) -> list[str]:
    """Predictions of trivial baseline ``name`` for a task of ``kind`` (see the module docstring)."""
    if name == "majority":
        counts = collections.Counter(train_targets)
        if not counts:
            raise ValueError("the majority baseline needs training targets")
        top = max(counts.values())
        answer = min(t for t, c in counts.items() if c == top)  # ties: a fixed, documented choice
        return [answer] * len(inputs)
    if name == "random":
        if kind != CLASSIFICATION:
            raise ValueError("the random baseline needs answer candidates (classification tasks)")
        rng = random.Random(f"baseline-random-{seed}")
        return [rng.choice(list(options)) for options in choices]
    if name == "copy_input":
        return list(inputs)
    if name == "copy_first_sentence":
        return [first_sentence(text) for text in inputs]
    raise KeyError(f"unknown baseline {name!r}")


def baselines_for(kind: str) -> tuple[str, ...]:
    """The baselines shown for a task of ``kind`` (majority and random for classification, copies for generation)."""
    if kind == CLASSIFICATION:
        return CLASSIFICATION_BASELINES
    if kind == GENERATION:
        return ("majority", *GENERATION_BASELINES)
    raise ValueError(f"unknown task kind {kind!r}")
