"""ESFT expert selection (Wang et al. 2024, "Let the Expert Stick to His Last"): score the routed experts
of every MoE layer on a sample of the task data and keep, per layer, the smallest set of experts whose
share of the score reaches a threshold ``top_p``.

Scores of expert ``e`` in one MoE layer, over the counted tokens ``t`` of sequence ``s`` (padding and
ignored labels excluded, as :class:`~hf_moe_tuning.routing.capture.RouterCapture` masks them):

==============  ===============================================================================
method          score
==============  ===============================================================================
``gate``        average gate score: ``mean_s mean_t g_{t,e}`` with ``g_{t,e}`` the routing
                probability of ``e`` if ``e`` is among the token's top-k experts, else 0
``token``       token selection ratio: ``mean_s mean_t 1[e in topk(t)] / k``
==============  ===============================================================================

Scores are normalised to sum to 1 per layer; experts are sorted by score (ties: lower index first) and
the first ones whose cumulative score reaches ``top_p`` are selected. ESFT uses ``top_p = 0.1`` for
``gate`` and ``0.2`` for ``token``; these are the defaults of ``"esft-gate"`` / ``"esft-token"``.

Usage::

    args = MoETrainingArguments(..., moe_freeze_strategy="moe", moe_train_router=False, moe_experts="esft-gate:0.1")
    MoETrainer(model=model, args=args, train_dataset=ds, data_collator=collator)  # scores, selects, freezes

or by hand::

    scores = score_experts(model, ds, collator, method="gate", num_samples=256)
    apply_freezing(model, "moe", train_router=False, experts=select_experts(scores, 0.1))
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..router_loss import router_probs, routing_spec
from ..router_loss import select_experts as routed_experts
from .capture import RouterCapture

logger = logging.getLogger(__name__)

ESFT_METHODS: tuple[str, ...] = ("gate", "token")
#: ESFT's thresholds: 0.1 for the average gate score, 0.2 for the token selection ratio.
DEFAULT_TOP_P: dict[str, float] = {"gate": 0.1, "token": 0.2}
#: Batch keys forwarded to the model while scoring (other dataset columns are dropped).
MODEL_INPUTS: tuple[str, ...] = (
    "input_ids",
    "attention_mask",
    "labels",
    "decoder_input_ids",
    "decoder_attention_mask",
    "token_type_ids",
)


class ESFTError(ValueError):
    """An ESFT request that cannot be honoured (bad spec, threshold or scoring data)."""


@dataclass(frozen=True)
class ESFTSpec:
    """A parsed ``"esft-<method>[:<top_p>]"`` spec."""

    method: str
    top_p: float

    def __str__(self) -> str:
        return f"esft-{self.method}:{self.top_p:g}"


def validate_top_p(top_p: Any) -> float:
    """Return ``top_p`` as a float in ``(0, 1]`` or raise :class:`ESFTError`."""
    try:
        value = float(top_p)
    except (TypeError, ValueError) as err:
        raise ESFTError(f"ESFT threshold must be a number in (0, 1], got {top_p!r}") from err
    if not 0.0 < value <= 1.0:
        raise ESFTError(f"ESFT threshold must be in (0, 1], got {top_p!r}")
    return value


def parse_esft_spec(spec: str) -> ESFTSpec:
    """Parse ``"esft-gate"``, ``"esft-gate:0.1"``, ``"esft-token:0.2"`` (threshold defaults as in ESFT)."""
    text = str(spec).strip()
    if not text.startswith("esft-"):
        raise ESFTError(f"{spec!r} is not an ESFT spec; expected 'esft-gate[:top_p]' or 'esft-token[:top_p]'")
    method, _, threshold = text[len("esft-") :].partition(":")
    if method not in ESFT_METHODS:
        raise ESFTError(f"unknown ESFT method {method!r} in {spec!r}; expected one of {list(ESFT_METHODS)}")
    top_p = validate_top_p(threshold) if threshold else DEFAULT_TOP_P[method]
    return ESFTSpec(method, top_p)


# --------------------------------------------------------------------------------------------- pure scoring
def token_expert_values(logits: torch.Tensor, selected: torch.Tensor, method: str, scoring: str = "softmax") -> torch.Tensor:
    """Per-token expert values ``[N, E]`` before averaging: gate scores or ``1/k`` selection indicators.

    Args:
        logits: router logits ``[N, E]``.
        selected: the top-k experts per token ``[N, k]``.
        method: ``"gate"`` or ``"token"``.
        scoring: the router's ``"softmax"`` / ``"sigmoid"`` scoring (for ``gate``).
    """
    chosen = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, selected.long(), 1.0)
    if method == "token":
        return chosen / selected.shape[1]
    if method == "gate":
        return router_probs(logits.detach(), scoring) * chosen
    raise ESFTError(f"unknown ESFT method {method!r}; expected one of {list(ESFT_METHODS)}")


def sequence_means(values: torch.Tensor, mask: torch.Tensor | None, num_sequences: int) -> tuple[torch.Tensor, int]:
    """Sum over sequences of each sequence's mean token value, ``[E]``, and the number of sequences with tokens.

    ``values`` is ``[num_sequences * seq_len, E]`` in row-major ``[batch, seq]`` order.
    """
    n, e = values.shape
    if n % num_sequences:
        raise ValueError(f"{n} routed tokens cannot be split into {num_sequences} sequences")
    weights = torch.ones(n, device=values.device) if mask is None else mask.to(values.device, torch.float32)
    per_seq = (values * weights[:, None]).reshape(num_sequences, -1, e).sum(dim=1)
    counted = weights.reshape(num_sequences, -1).sum(dim=1)
    has_tokens = counted > 0
    means = per_seq[has_tokens] / counted[has_tokens, None]
    return means.sum(dim=0), int(has_tokens.sum())


@dataclass
class ExpertScores:
    """Normalised ESFT scores per MoE layer (``{layer index: [E] tensor summing to 1}``)."""

    method: str
    scores: dict[int, torch.Tensor]
    num_sequences: int
    layer_paths: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "num_sequences": self.num_sequences,
            "scores": {str(i): [round(float(v), 6) for v in s] for i, s in self.scores.items()},
        }


def normalize_scores(raw: torch.Tensor) -> torch.Tensor:
    """``raw / raw.sum()`` (float64); raises if nothing was scored."""
    raw = torch.as_tensor(raw, dtype=torch.float64).flatten()
    total = raw.sum()
    if not torch.isfinite(total) or total <= 0:
        raise ESFTError("ESFT scores of a layer are all zero (no counted token reached it)")
    return raw / total


def select_experts(scores: ExpertScores | Mapping[int, Sequence[float] | torch.Tensor], top_p: float) -> dict[int, list[int]]:
    """Per layer, the smallest set of experts whose cumulative (normalised) score reaches ``top_p``.

    Experts are taken in decreasing score order (ties: lower index first). Returns
    ``{layer: sorted expert indices}``.

    Example:
        >>> select_experts({0: [0.05, 0.6, 0.3, 0.05]}, 0.8)
        {0: [1, 2]}
    """
    top_p = validate_top_p(top_p)
    per_layer = scores.scores if isinstance(scores, ExpertScores) else scores
    if not per_layer:
        raise ESFTError("no ESFT scores to select experts from")
    selection: dict[int, list[int]] = {}
    for layer, values in per_layer.items():
        p = normalize_scores(values)
        order = torch.sort(-p, stable=True).indices
        cumulative = torch.cumsum(p[order], dim=0)
        needed = int(torch.searchsorted(cumulative, torch.tensor([top_p - 1e-9], dtype=cumulative.dtype))[0]) + 1
        selection[int(layer)] = sorted(int(j) for j in order[: min(needed, p.numel())])
    return selection


# --------------------------------------------------------------------------------------------- data
def _rows_for_scoring(dataset: Any, num_samples: int, seed: int, tokenizer: Any, text_column: str) -> list[dict]:
    if dataset is None:
        raise ESFTError("ESFT needs task data to score experts, but no dataset was given (train_dataset=None)")
    try:
        size = len(dataset)
    except TypeError as err:
        raise ESFTError(f"ESFT scoring data must be a sized dataset, got {type(dataset).__name__}") from err
    if size == 0:
        raise ESFTError("ESFT scoring data is empty: give a non-empty train_dataset")
    if num_samples <= 0:
        raise ESFTError(f"ESFT num_samples must be > 0, got {num_samples}")
    if size > num_samples:
        gen = torch.Generator().manual_seed(seed)
        indices = sorted(torch.randperm(size, generator=gen)[:num_samples].tolist())
    else:
        indices = list(range(size))
    rows = [dict(dataset[i]) for i in indices]
    columns = set(rows[0])
    if "input_ids" not in columns:
        if text_column in columns and tokenizer is not None:
            return [{k: v for k, v in tokenizer(row[text_column], truncation=True).items()} for row in rows]
        hint = (
            f"a tokenizer to tokenize its {text_column!r} column (e.g. a data collator with .tokenizer)"
            if text_column in columns
            else f"an 'input_ids' column or a {text_column!r} text column"
        )
        raise ESFTError(f"ESFT scoring data has columns {sorted(columns)}; it needs {hint}")
    return [{k: v for k, v in row.items() if k in MODEL_INPUTS} for row in rows]


def _collate(collator: Callable | None, rows: list[dict]) -> dict[str, torch.Tensor]:
    if collator is not None:
        return collator(rows)
    from transformers import default_data_collator

    try:
        return default_data_collator(rows)
    except (ValueError, RuntimeError) as err:
        raise ESFTError(
            "ESFT scoring rows have different lengths; pass a data_collator that pads (e.g. DataCollatorForSeq2Seq)"
        ) from err


# --------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_experts(
    model: nn.Module,
    dataset: Any,
    collator: Callable | None = None,
    method: str = "gate",
    num_samples: int = 256,
    *,
    batch_size: int = 8,
    seed: int = 0,
    tokenizer: Any = None,
    text_column: str = "text",
) -> ExpertScores:
    """Score every routed expert of ``model`` on up to ``num_samples`` rows of ``dataset``.

    Args:
        model: an MoE model (eval mode is used while scoring; the training mode is restored).
        dataset: tokenised rows (``input_ids`` and, for encoder-decoders, ``labels``), or rows with a
            ``text_column`` when ``tokenizer`` (or ``collator.tokenizer``) is given.
        collator: batches and pads rows (``transformers.default_data_collator`` when ``None``).
        method: ``"gate"`` (average gate score) or ``"token"`` (token selection ratio).
        num_samples: rows scored (a seeded random sample when the dataset is larger).
        batch_size: rows per forward pass.
        seed: seed of the sample.
    """
    if method not in ESFT_METHODS:
        raise ESFTError(f"unknown ESFT method {method!r}; expected one of {list(ESFT_METHODS)}")
    tokenizer = tokenizer if tokenizer is not None else getattr(collator, "tokenizer", None)
    rows = _rows_for_scoring(dataset, num_samples, seed, tokenizer, text_column)
    capture = RouterCapture.acquire(model)
    was_training = model.training
    device = next(model.parameters()).device
    totals: dict[int, torch.Tensor] = {}
    sequences: dict[int, int] = {}
    try:
        specs = {layer.index: routing_spec(model, layer) for layer in capture.anatomy.layers}
        model.eval()
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = _collate(collator, chunk)
            batch = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS and isinstance(v, torch.Tensor)}
            model(**batch)
            for layer, logits, mask in capture.layer_items():
                spec = specs[layer.index]
                logits = logits[:, : layer.num_experts].float()
                selected = routed_experts(logits, spec)
                values = token_expert_values(logits, selected, method, spec.scoring)
                summed, count = sequence_means(values, mask, len(chunk))
                totals[layer.index] = totals.get(layer.index, 0) + summed.double().cpu()
                sequences[layer.index] = sequences.get(layer.index, 0) + count
    finally:
        model.train(was_training)
        capture.release()
    missing = [layer.index for layer in capture.anatomy.layers if not sequences.get(layer.index)]
    if missing:
        raise ESFTError(f"MoE layer(s) {missing} routed no counted token on the ESFT scoring data")
    scores = {i: normalize_scores(totals[i] / sequences[i]) for i in sorted(totals)}
    return ExpertScores(method, scores, len(rows), {layer.index: layer.path for layer in capture.anatomy.layers})


# --------------------------------------------------------------------------------------------- trainer glue
class ESFTResolver:
    """Resolve an ESFT spec on a model: score on the task data, select, remember the result.

    Called by :class:`~hf_moe_tuning.callbacks.freezing.MoEFreezingCallback` as
    ``resolver(model, "esft-gate:0.1") -> {layer: [experts]}``; afterwards :attr:`scores`,
    :attr:`selection` and :meth:`summary` describe the choice (for logs and the model card).
    """

    def __init__(
        self,
        dataset: Any,
        collator: Callable | None = None,
        *,
        num_samples: int = 256,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        if dataset is None:
            raise ESFTError("ESFT (moe_experts='esft-...') needs task data to score experts: pass train_dataset")
        try:
            if len(dataset) == 0:
                raise ESFTError("ESFT scoring data is empty: give a non-empty train_dataset")
        except TypeError as err:
            raise ESFTError(f"ESFT scoring data must be a sized dataset, got {type(dataset).__name__}") from err
        self.dataset = dataset
        self.collator = collator
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.spec: ESFTSpec | None = None
        self.scores: ExpertScores | None = None
        self.selection: dict[int, list[int]] | None = None

    def __call__(self, model: nn.Module, spec: str) -> dict[int, list[int]]:
        self.spec = parse_esft_spec(spec)
        self.scores = score_experts(
            model,
            self.dataset,
            self.collator,
            self.spec.method,
            self.num_samples,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        self.selection = select_experts(self.scores, self.spec.top_p)
        for layer, chosen in self.selection.items():
            share = float(self.scores.scores[layer][chosen].sum())
            logger.info(
                "ESFT %s: MoE layer %d (%s) trains experts %s (%.1f%% of the score)",
                self.spec,
                layer,
                self.scores.layer_paths.get(layer, "?"),
                chosen,
                100 * share,
            )
        return self.selection

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable record of the selection (spec, scores, chosen experts)."""
        if self.spec is None or self.scores is None or self.selection is None:
            return {}
        return {
            "spec": str(self.spec),
            "top_p": self.spec.top_p,
            **self.scores.to_dict(),
            "selected": {str(k): v for k, v in self.selection.items()},
        }


def make_resolver(args: Any, train_dataset: Any, data_collator: Callable | None) -> ESFTResolver:
    """Build the :class:`ESFTResolver` for :class:`~hf_moe_tuning.MoETrainingArguments` (validated now)."""
    spec = args.moe_experts
    if isinstance(spec, str):
        parse_esft_spec(spec)  # fail at trainer construction on a bad threshold
    return ESFTResolver(
        train_dataset,
        data_collator,
        num_samples=getattr(args, "moe_esft_num_samples", 256),
        batch_size=getattr(args, "per_device_eval_batch_size", 8),
        seed=getattr(args, "seed", 0),
    )
