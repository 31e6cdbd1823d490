"""Evaluation of a seq2seq model on a held-out task: candidate scoring or greedy generation.

* classification tasks: every candidate answer is scored by its summed log-likelihood given the input
  (T5's rank classification) and the best one is the prediction;
* generation tasks: greedy decoding (``model.generate``, one beam, no sampling).

Metrics come from the evaluate modules shipped in :mod:`hf_moe_tuning.metrics_modules`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from datasets import Dataset

from ..data.heldout import CLASSIFICATION, GENERATION
from ..metrics_modules import load_metric


@functools.lru_cache(maxsize=None)
def _metric(name: str):
    return load_metric(name)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def best_per_item(scores: torch.Tensor, choices: Sequence[Sequence[str]]) -> list[int]:
    """Index of the highest-scoring candidate of each item; ``scores`` holds all candidates back to back."""
    best: list[int] = []
    offset = 0
    for options in choices:
        best.append(int(scores[offset : offset + len(options)].argmax()))
        offset += len(options)
    return best


@torch.no_grad()
def score_candidates(
    model,
    tokenizer,
    inputs: Sequence[str],
    choices: Sequence[Sequence[str]],
    batch_size: int = 64,
    max_source_length: int = 192,
) -> list[int]:
    """Index of the most likely candidate (summed target log-likelihood) for each input."""
    pairs = [(i, c) for i, options in enumerate(choices) for c in options]
    if not pairs:
        return []
    scores = torch.empty(len(pairs))
    model.eval()
    device = model.device
    for batch in _batches(len(pairs), batch_size):
        sources = [inputs[pairs[j][0]] for j in batch]
        targets = [pairs[j][1] for j in batch]
        enc = tokenizer(sources, max_length=max_source_length, truncation=True, padding=True, return_tensors="pt").to(device)
        labels = tokenizer(text_target=targets, padding=True, return_tensors="pt")["input_ids"].to(device)
        mask = labels != tokenizer.pad_token_id
        labels = labels.masked_fill(~mask, -100)
        logits = model(**enc, labels=labels).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores[list(batch)] = (logprobs * mask).sum(-1).cpu()
    return best_per_item(scores, choices)


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    inputs: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 48,
    max_source_length: int = 192,
) -> list[str]:
    """Greedy generations for ``inputs``."""
    model.eval()
    out: list[str] = []
    for batch in _batches(len(inputs), batch_size):
        enc = tokenizer([inputs[j] for j in batch], max_length=max_source_length, truncation=True, padding=True, return_tensors="pt")
        generated = model.generate(**enc.to(model.device), max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        out.extend(tokenizer.batch_decode(generated, skip_special_tokens=True))
    return out


def evaluate_task(
    model,
    tokenizer,
    dataset: Dataset,
    kind: str,
    metrics: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 48,
    max_source_length: int = 192,
) -> dict[str, float]:
    """Metrics (each in [0, 1]) of ``model`` on ``dataset`` (columns ``inputs``, ``targets``, ``choices``)."""
    inputs, references = list(dataset["inputs"]), list(dataset["targets"])
    if kind == CLASSIFICATION:
        choices = list(dataset["choices"])
        best = score_candidates(model, tokenizer, inputs, choices, batch_size, max_source_length)
        predictions = [options[i] for options, i in zip(choices, best)]
    elif kind == GENERATION:
        predictions = generate_answers(model, tokenizer, inputs, batch_size, max_new_tokens, max_source_length)
    else:
        raise ValueError(f"unknown task kind {kind!r}; use {CLASSIFICATION!r} or {GENERATION!r}")
    results: dict[str, float] = {}
    for name in metrics:
        results.update(_metric(name).compute(predictions=predictions, references=references))
    return results
