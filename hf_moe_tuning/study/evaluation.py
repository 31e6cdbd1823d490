"""Evaluation of a model on a held-out task: candidate scoring or greedy generation, both backends.

Encoder-decoder models (:func:`evaluate_task`) read the input and score/generate the target;
decoder-only models (:func:`evaluate_chat_task`) read the chat-formatted prompt and score/generate the
assistant turn (candidate + EOS). The protocol is the same:

* classification tasks: every candidate answer is scored by its mean log-likelihood per target token
  given the input (rank classification without the length bias of the sum; see
  :mod:`hf_moe_tuning.study.scoring`) and the best one is the prediction;
* generation tasks: greedy decoding (``model.generate``, one beam, no sampling).

Metrics come from the evaluate modules shipped in :mod:`hf_moe_tuning.metrics_modules`, with the
per-item scores the paired bootstrap resamples.

Under a multi-process launch the batches are dealt out over the processes (batch ``k`` to rank
``k mod N``) and the per-item results gathered (``accelerate.utils.gather_object``): every item is
computed once, in the same batch (so with the same padding) as in a one-process run, and every rank
ends with all of them. A sharded model (FSDP, DeepSpeed ZeRO-3) needs every rank in every forward: then
each rank runs the same number of batches (a rank short of one repeats its first batch and discards the
result), and ``generate`` keeps the ranks in step itself (transformers' ``synced_gpus``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset

from ..data.heldout import CLASSIFICATION, GENERATION
from .cache import process_state
from .chat import render_prompt
from .scoring import best_candidates, score_predictions


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def _is_sharded(model) -> bool:
    """Whether every process must join each forward of ``model`` (FSDP-managed, or DeepSpeed ZeRO-3 partitioned)."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.integrations.fsdp import is_fsdp_managed_module

    return is_fsdp_managed_module(model) or is_deepspeed_zero3_enabled()


def _my_batches(n: int, size: int, model=None) -> list[tuple[range, bool]]:
    """The ``(batch, keep)`` pairs of ``n`` items this process computes: all of them, or every N-th under N
    processes; for a sharded ``model`` padded to the same count on every rank (``keep=False``: discard)."""
    state = process_state()
    batches = list(_batches(n, size))
    if state is None:
        return [(b, True) for b in batches]
    mine = [(b, True) for b in batches[state.process_index :: state.num_processes]]
    if model is not None and batches and _is_sharded(model):
        rounds = -(-len(batches) // state.num_processes)
        mine += [(batches[0], False)] * (rounds - len(mine))
    return mine


def _gather_items(values: dict[int, object]) -> dict[int, object]:
    """``{item index: value}`` of every process, merged (the identity with one process)."""
    if process_state() is None:
        return values
    from accelerate.utils import gather_object

    merged: dict[int, object] = {}
    for index, value in gather_object(list(values.items())):
        if index in merged:
            raise RuntimeError(f"evaluation item {index} was computed by two processes")
        merged[index] = value
    return merged


def _gather_logliks(logliks: torch.Tensor, lengths: torch.Tensor, mine: list[tuple[range, bool]]) -> None:
    """Fill ``logliks`` / ``lengths`` with the entries the other processes computed."""
    if process_state() is None:
        return
    merged = _gather_items({j: (float(logliks[j]), float(lengths[j])) for batch, keep in mine if keep for j in batch})
    if len(merged) != len(logliks):
        raise RuntimeError(f"gathered {len(merged)} of {len(logliks)} scored candidates")
    for j, (loglik, length) in merged.items():
        logliks[j], lengths[j] = loglik, length


def _store_target_logliks(logliks, lengths, batch, logits, targets, mask) -> None:
    """Write the summed log-likelihood of each row's masked ``targets`` and its number of target tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logliks[list(batch)] = (logprobs * mask).sum(-1).cpu()
    lengths[list(batch)] = mask.sum(-1).float().cpu()


def _rank_candidates(
    model,
    choices: Sequence[Sequence[str]],
    batch_size: int,
    forward: Callable[[list[tuple[int, str]]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> list[int]:
    """Index of the most likely candidate of each input (mean log-likelihood per target token), both backends.

    The ``(input index, candidate)`` pairs are dealt out in batches over the processes (:func:`_my_batches`);
    ``forward(pairs)`` runs ``model`` on one batch and returns ``(logits, targets, mask)`` aligned token by
    token. The summed log-likelihoods of the batches this process keeps are gathered from every process
    before the candidates are compared.
    """
    pairs = [(i, c) for i, options in enumerate(choices) for c in options]
    if not pairs:
        return []
    logliks, lengths = torch.empty(len(pairs)), torch.empty(len(pairs))
    model.eval()
    mine = _my_batches(len(pairs), batch_size, model)
    for batch, keep in mine:
        logits, targets, mask = forward([pairs[j] for j in batch])
        if keep:
            _store_target_logliks(logliks, lengths, batch, logits, targets, mask)
    _gather_logliks(logliks, lengths, mine)
    return best_candidates(logliks, lengths, choices)


@torch.no_grad()
def score_candidates(
    model,
    tokenizer,
    inputs: Sequence[str],
    choices: Sequence[Sequence[str]],
    batch_size: int = 64,
    max_source_length: int = 192,
) -> list[int]:
    """Index of the most likely candidate (mean log-likelihood per target token) for each input."""

    def forward(pairs: list[tuple[int, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = model.device
        sources = [inputs[i] for i, _ in pairs]
        targets = [candidate for _, candidate in pairs]
        enc = tokenizer(sources, max_length=max_source_length, truncation=True, padding=True, return_tensors="pt").to(device)
        labels = tokenizer(text_target=targets, padding=True, return_tensors="pt")["input_ids"].to(device)
        mask = labels != tokenizer.pad_token_id
        labels = labels.masked_fill(~mask, -100)
        return model(**enc, labels=labels).logits, labels.clamp(min=0), mask

    return _rank_candidates(model, choices, batch_size, forward)


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
    out: dict[int, str] = {}
    for batch, keep in _my_batches(len(inputs), batch_size, model):
        enc = tokenizer([inputs[j] for j in batch], max_length=max_source_length, truncation=True, padding=True, return_tensors="pt")
        generated = model.generate(**enc.to(model.device), max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        if keep:
            out.update(zip(batch, tokenizer.batch_decode(generated, skip_special_tokens=True)))
    return _in_order(_gather_items(out), len(inputs))


def _in_order(answers: dict[int, object], n: int) -> list:
    if sorted(answers) != list(range(n)):
        raise RuntimeError(f"gathered {len(answers)} of {n} generations")
    return [answers[j] for j in range(n)]


@dataclass
class TaskEvaluation:
    """Metrics (each in [0, 1]), per-item scores of every metric, and the predictions."""

    metrics: dict[str, float]
    items: dict[str, list[float]]
    predictions: list[str]


def evaluate_task(
    model,
    tokenizer,
    dataset: Dataset,
    kind: str,
    metrics: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 48,
    max_source_length: int = 192,
) -> TaskEvaluation:
    """Evaluate ``model`` on ``dataset`` (columns ``inputs``, ``targets``, ``choices``)."""
    return _evaluate(
        dataset, list(dataset["inputs"]), kind, metrics,
        lambda texts, choices: score_candidates(model, tokenizer, texts, choices, batch_size, max_source_length),
        lambda texts: generate_answers(model, tokenizer, texts, batch_size, max_new_tokens, max_source_length),
    )


def _evaluate(dataset: Dataset, texts: list[str], kind: str, metrics: Sequence[str], score, generate) -> TaskEvaluation:
    """Predict with ``score(texts, choices)`` (classification) or ``generate(texts)`` and score against ``targets``."""
    if kind == CLASSIFICATION:
        choices = list(dataset["choices"])
        predictions = [options[i] for options, i in zip(choices, score(texts, choices))]
    elif kind == GENERATION:
        predictions = generate(texts)
    else:
        raise ValueError(f"unknown task kind {kind!r}; use {CLASSIFICATION!r} or {GENERATION!r}")
    means, items = score_predictions(predictions, list(dataset["targets"]), metrics)
    return TaskEvaluation(means, items, predictions)


# ------------------------------------------------------------------------------------------ decoder-only, chat format
def _encode(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_length:] if max_length else ids  # keep the end: the question and generation prompt


@torch.no_grad()
def score_chat_candidates(
    model,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    batch_size: int = 64,
    max_prompt_length: int = 192,
) -> list[int]:
    """Index of the most likely candidate (mean log-likelihood per token of ``candidate + EOS`` after the prompt)."""
    # encoded once per prompt, and only when there is a candidate to score
    prompt_ids = [_encode(tokenizer, p, max_prompt_length) for p in prompts] if any(map(len, choices)) else []

    def forward(pairs: list[tuple[int, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pad = tokenizer.pad_token_id
        sequences, starts = [], []
        for i, candidate in pairs:
            completion = _encode(tokenizer, candidate) + [tokenizer.eos_token_id]
            starts.append(len(prompt_ids[i]))
            sequences.append(prompt_ids[i] + completion)
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for row, (seq, start) in enumerate(zip(sequences, starts)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            target_mask[row, start : len(seq)] = True
        input_ids, attention = input_ids.to(model.device), attention.to(model.device)
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
        return logits, input_ids[:, 1:], target_mask[:, 1:].to(logits.device)

    return _rank_candidates(model, choices, batch_size, forward)


@torch.no_grad()
def generate_chat_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 48,
    max_prompt_length: int = 192,
) -> list[str]:
    """Greedy completions (until EOS) of chat-formatted ``prompts``, left-padded in batches."""
    model.eval()
    pad = tokenizer.pad_token_id
    out: dict[int, str] = {}
    for batch, keep in _my_batches(len(prompts), batch_size, model):
        encoded = [_encode(tokenizer, prompts[j], max_prompt_length) for j in batch]
        width = max(len(e) for e in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention.to(model.device),
            max_new_tokens=max_new_tokens,
            num_beams=1,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        if keep:
            out.update(zip(batch, (t.strip() for t in tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))))
    return _in_order(_gather_items(out), len(prompts))


def evaluate_chat_task(
    model,
    tokenizer,
    dataset: Dataset,
    kind: str,
    metrics: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 48,
    max_prompt_length: int = 192,
    system: str | None = None,
) -> TaskEvaluation:
    """Evaluate a causal LM on ``dataset`` (columns ``inputs``, ``targets``, ``choices``)."""
    return _evaluate(
        dataset, [render_prompt(tokenizer, text, system) for text in dataset["inputs"]], kind, metrics,
        lambda texts, choices: score_chat_candidates(model, tokenizer, texts, choices, batch_size, max_prompt_length),
        lambda texts: generate_chat_answers(model, tokenizer, texts, batch_size, max_new_tokens, max_prompt_length),
    )
