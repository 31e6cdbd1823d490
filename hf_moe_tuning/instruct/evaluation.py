"""Evaluation of a decoder-only model on a held-out task, in chat format.

The decoder-only counterpart of :mod:`hf_moe_tuning.study.evaluation` (same protocol, same metric modules):

* classification: each candidate answer, followed by EOS, is scored by its summed log-likelihood after
  the chat-formatted prompt (rank classification), the best one is the prediction;
* generation: greedy decoding from the chat-formatted prompt until EOS.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from datasets import Dataset

from ..data.heldout import CLASSIFICATION, GENERATION
from ..study.evaluation import _batches, _metric, best_per_item
from .chat import render_prompt


def _encode(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_length:] if max_length else ids  # keep the end: the question and generation prompt


@torch.no_grad()
def score_candidates(
    model,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    batch_size: int = 64,
    max_prompt_length: int = 192,
) -> list[int]:
    """Index of the most likely candidate (summed log-likelihood of ``candidate + EOS`` after the prompt)."""
    pairs = [(i, c) for i, options in enumerate(choices) for c in options]
    if not pairs:
        return []
    prompt_ids = [_encode(tokenizer, p, max_prompt_length) for p in prompts]
    pad = tokenizer.pad_token_id
    scores = torch.empty(len(pairs))
    model.eval()
    for batch in _batches(len(pairs), batch_size):
        sequences, starts = [], []
        for j in batch:
            i, candidate = pairs[j]
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
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        mask = target_mask[:, 1:].to(logprobs.device)
        scores[list(batch)] = (logprobs * mask).sum(-1).cpu()
    return best_per_item(scores, choices)


@torch.no_grad()
def generate_answers(
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
    out: list[str] = []
    for batch in _batches(len(prompts), batch_size):
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
        out.extend(t.strip() for t in tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
    return out


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
) -> dict[str, float]:
    """Metrics (each in [0, 1]) of a causal LM on ``dataset`` (columns ``inputs``, ``targets``, ``choices``)."""
    prompts = [render_prompt(tokenizer, text, system) for text in dataset["inputs"]]
    references = list(dataset["targets"])
    if kind == CLASSIFICATION:
        choices = list(dataset["choices"])
        best = score_candidates(model, tokenizer, prompts, choices, batch_size, max_prompt_length)
        predictions = [options[i] for options, i in zip(choices, best)]
    elif kind == GENERATION:
        predictions = generate_answers(model, tokenizer, prompts, batch_size, max_new_tokens, max_prompt_length)
    else:
        raise ValueError(f"unknown task kind {kind!r}; use {CLASSIFICATION!r} or {GENERATION!r}")
    results: dict[str, float] = {}
    for name in metrics:
        results.update(_metric(name).compute(predictions=predictions, references=references))
    return results
