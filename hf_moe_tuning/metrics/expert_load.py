"""Per-layer routing statistics: pure functions over routing decisions, and a device-side counter.

The functions take top-k expert indices (or router logits, from which :func:`select_experts` derives
them the way the model routes) and a token mask, and reduce them to per-expert token counts. Every
statistic is then a function of the counts of one MoE layer:

==========================  ===================================================================
statistic                   formula (``c_e``: tokens routed to expert ``e``, ``E`` experts)
==========================  ===================================================================
load fraction               ``p_e = c_e / sum(c)`` (fraction of routing assignments)
normalized entropy          ``-sum(p_e log p_e) / log E``; 1 = perfectly balanced, 0 = one expert
coefficient of variation    ``std(c) / mean(c)`` (population std); 0 = balanced
MaxVio                      ``max(c) / mean(c) - 1``; 0 = balanced, ``E - 1`` = one expert
dead experts                ``#{e : c_e = 0}``
dropped fraction            tokens past the expert capacity / tokens (capacity families)
top-1 change (drift)        share of probe tokens whose top-1 expert differs from the reference
load JS divergence (drift)  Jensen-Shannon divergence (base 2, in [0, 1]) of the probe load vs reference
==========================  ===================================================================

Counting happens on the device with scatter-adds (a ``torch.bincount`` that needs no host sync, so
it never stalls the CUDA stream); reductions to Python floats happen once per logging interval.

Example:
    >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
    >>> idx = select_experts(logits, top_k=1)
    >>> expert_counts(idx, torch.tensor([True, True, False]), num_experts=3).tolist()
    [1, 1, 0]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..reduction import reduce_sum

__all__ = [
    "LayerLoad",
    "ExpertLoadCounter",
    "select_experts",
    "expert_counts",
    "capacity_overflow",
    "load_fractions",
    "normalized_entropy",
    "coefficient_of_variation",
    "max_violation",
    "dead_experts",
    "top1_change_fraction",
    "js_divergence",
    "layer_statistics",
    "summarize_load",
    "drift_statistics",
    "load_matrix",
    "save_load_heatmap",
]


# ---------------------------------------------------------------------------------------------- routing
def select_experts(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    correction_bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
) -> torch.Tensor:
    """Top-``k`` expert indices ``[..., N, k]`` per token (column 0 is the top-1 expert), as the model routes.

    Softmax and sigmoid are monotonic, so without a correction bias the result is the top-k of the
    logits. DeepSeek-V3-style routers (``scoring="sigmoid"``) choose on ``sigmoid(logits) + bias`` and,
    with ``num_groups > 1``, only inside the ``topk_groups`` expert groups whose two best scores sum
    highest; both are reproduced here.

    Args:
        logits: router logits ``[N, E]``, or ``[L, N, E]`` for ``L`` layers that route alike, in one call.
        top_k: experts per token.
        scoring: ``"softmax"`` or ``"sigmoid"``.
        correction_bias: per-expert bias ``[E]`` (``[L, E]`` with stacked layers) added to the scores for
            choice only.
        num_groups: number of expert groups for group-limited routing (``None``/1: no groups).
        topk_groups: groups kept per token.
    """
    if logits.dim() not in (2, 3):
        raise ValueError(
            "router logits must be [num_tokens, num_experts] or [layers, num_tokens, num_experts], "
            f"got shape {tuple(logits.shape)}"
        )
    num_experts = logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    if correction_bias is None and (num_groups or 1) <= 1:
        if top_k == 1:
            return logits.argmax(dim=-1, keepdim=True)  # cheaper than topk on CPU
        return torch.topk(logits, top_k, dim=-1, sorted=True).indices
    logits = logits.detach()
    if scoring == "sigmoid":
        scores = logits.float().sigmoid()
    elif scoring == "softmax":
        scores = logits.float().softmax(dim=-1)
    else:
        raise ValueError(f"scoring={scoring!r} is not 'softmax' or 'sigmoid'")
    if correction_bias is not None:
        bias = correction_bias.detach().to(scores.device, scores.dtype)
        scores = scores + (bias.unsqueeze(-2) if bias.dim() == 2 else bias)
    if num_groups and num_groups > 1:
        if num_experts % num_groups:
            raise ValueError(f"num_experts={num_experts} is not divisible by num_groups={num_groups}")
        grouped = scores.unflatten(-1, (num_groups, num_experts // num_groups))
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        keep = torch.topk(group_scores, k=topk_groups or 1, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, keep, True)
        scores = scores.masked_fill(~group_mask.repeat_interleave(num_experts // num_groups, dim=-1), float("-inf"))
    return torch.topk(scores, top_k, dim=-1, sorted=True).indices


def expert_counts(indices: torch.Tensor, mask: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: ``bincount`` of ``indices[mask]`` as int64 ``[num_experts]``.

    Implemented as a scatter-add into ``E + 1`` bins (masked tokens go to the spare last bin), which
    equals ``torch.bincount(indices[mask].flatten(), minlength=E)`` without the host sync that boolean
    indexing and ``bincount`` cause on CUDA.

    Args:
        indices: expert indices ``[N]`` or ``[N, k]``.
        mask: bool ``[N]``, ``True`` for tokens that count; ``None`` counts all.
        num_experts: ``E``.
    """
    idx = indices.reshape(indices.shape[0], -1).long()
    if mask is not None:
        if mask.shape[0] != idx.shape[0]:
            raise ValueError(f"mask has {mask.shape[0]} tokens but indices have {idx.shape[0]}")
        idx = torch.where(mask.reshape(-1, 1).to(idx.device, torch.bool), idx, num_experts)
    flat = idx.reshape(-1)
    bins = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    bins.scatter_add_(0, flat, torch.ones_like(flat))
    return bins[:num_experts]


def capacity_overflow(top1: torch.Tensor, capacity: int, num_experts: int) -> torch.Tensor:
    """Bool ``[B, S]`` (``[L, B, S]``): tokens the Switch router drops because their expert is full.

    Switch Transformers routes each sequence in token order: a token's priority is its position among
    the sequence's tokens that chose the same expert (``cumsum`` of the one-hot choice along the
    sequence), and tokens with priority ``> capacity`` are dropped. Padding takes part in this order
    exactly as in the model; mask it out when counting.

    The positions come from a stable sort of the ``(sequence, expert)`` keys, not from a one-hot:
    temporaries are ``O(tokens)`` (a few int64 vectors of ``top1.numel()``), whatever the number of
    experts (the one-hot over all layers was ``O(tokens · experts)``: 268 MB at 16 layers, 16k tokens
    and 128 experts).

    Args:
        top1: top-1 expert indices ``[B, S]``, or ``[L, B, S]`` for ``L`` layers at once.
        capacity: tokens an expert takes per sequence (``router.expert_capacity``).
        num_experts: ``E``.
    """
    if top1.dim() not in (2, 3):
        raise ValueError(f"top1 must be [batch, seq] or [layers, batch, seq], got shape {tuple(top1.shape)}")
    if top1.numel() == 0:
        return torch.zeros(top1.shape, dtype=torch.bool, device=top1.device)
    seq_len = top1.shape[-1]
    # key = sequence * E + expert; a stable sort keeps the token order within each (sequence, expert) run
    sequence = torch.arange(top1.numel() // seq_len, device=top1.device).repeat_interleave(seq_len)
    keys = sequence.mul_(num_experts).add_(top1.reshape(-1).long())
    sorted_keys, order = torch.sort(keys, stable=True)
    # priority - 1 = rank within the run = sorted position - first sorted position of the same key
    rank = torch.arange(keys.numel(), device=keys.device).sub_(torch.searchsorted(sorted_keys, sorted_keys))
    dropped = torch.empty_like(order, dtype=torch.bool).index_put_((order,), rank >= capacity)
    return dropped.view(top1.shape)


# ---------------------------------------------------------------------------------------------- statistics
def _as_float_counts(counts: torch.Tensor | Sequence[float]) -> list[float]:
    """Counts as a list of Python floats (a handful of numbers per layer: plain Python beats tensor ops here)."""
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().reshape(-1).tolist()
    c = [float(x) for x in counts]
    if not c:
        raise ValueError("counts are empty")
    if min(c) < 0:
        raise ValueError("counts must be non-negative")
    return c


def load_fractions(counts: torch.Tensor | Sequence[float]) -> list[float] | None:
    """``p_e = c_e / sum(c)`` (sums to 1), or ``None`` when nothing was routed."""
    c = _as_float_counts(counts)
    total = sum(c)
    return None if total <= 0 else [x / total for x in c]


def normalized_entropy(counts: torch.Tensor | Sequence[float]) -> float | None:
    """``H(p) / log(E)`` with ``0 log 0 = 0``: 1 for a uniform load, 0 when one expert takes all."""
    p = load_fractions(counts)
    if p is None:
        return None
    if len(p) == 1:
        return 1.0
    return -sum(x * math.log(x) for x in p if x > 0) / math.log(len(p))


def coefficient_of_variation(counts: torch.Tensor | Sequence[float]) -> float | None:
    """``std(c) / mean(c)`` with the population std; ``None`` when nothing was routed."""
    c = _as_float_counts(counts)
    mean = sum(c) / len(c)
    if mean <= 0:
        return None
    return math.sqrt(sum((x - mean) ** 2 for x in c) / len(c)) / mean


def max_violation(counts: torch.Tensor | Sequence[float]) -> float | None:
    """MaxVio ``max(c) / mean(c) - 1`` (Wang et al. 2024); ``None`` when nothing was routed."""
    c = _as_float_counts(counts)
    mean = sum(c) / len(c)
    return None if mean <= 0 else max(c) / mean - 1.0


def dead_experts(counts: torch.Tensor | Sequence[float]) -> int:
    """Number of experts that received no token."""
    return sum(1 for x in _as_float_counts(counts) if x == 0)


def top1_change_fraction(
    reference: torch.Tensor, current: torch.Tensor, mask: torch.Tensor | None = None
) -> float | None:
    """Share of (unmasked) tokens whose top-1 expert differs between ``reference`` and ``current``."""
    if reference.shape != current.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and current {tuple(current.shape)} differ in shape")
    changed = reference.reshape(-1) != current.reshape(-1)
    if mask is not None:
        m = mask.reshape(-1).bool()
        changed, total = changed[m], int(m.sum())
    else:
        total = changed.numel()
    return None if total == 0 else float(changed.sum()) / total


def js_divergence(p_counts: torch.Tensor | Sequence[float], q_counts: torch.Tensor | Sequence[float]) -> float | None:
    """Jensen-Shannon divergence (base 2, in ``[0, 1]``) between two load distributions given as counts."""
    p, q = load_fractions(p_counts), load_fractions(q_counts)
    if p is None or q is None:
        return None
    if len(p) != len(q):
        raise ValueError(f"load distributions have different numbers of experts: {len(p)} vs {len(q)}")
    m = [0.5 * (a + b) for a, b in zip(p, q)]

    def kl(a: list[float]) -> float:
        return sum(x * math.log2(x / y) for x, y in zip(a, m) if x > 0)

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def _on(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(device, dtype)`` without a dispatch when it is already there (this runs every step)."""
    return tensor if tensor.device == device and tensor.dtype == dtype else tensor.to(device, dtype)


@dataclass
class LayerLoad:
    """Reduced counts of one MoE layer over one interval (what the JSONL file stores).

    Attributes:
        index: MoE-layer index (``moe/layer{index}/...``).
        path: module path of the MoE block.
        num_experts: ``E``.
        top_k: experts per token.
        tokens: unmasked tokens that reached the layer.
        counts: tokens routed to each expert (sums to ``tokens * top_k``).
        dropped: tokens dropped past capacity, per chosen expert; ``None`` where not measured.
    """

    index: int
    path: str
    num_experts: int
    top_k: int
    tokens: int
    counts: list[int]
    dropped: list[int] | None = None

    def to_dict(self) -> dict:
        out = {
            "layer": self.index,
            "path": self.path,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "tokens": self.tokens,
            "counts": self.counts,
        }
        if self.dropped is not None:
            out["dropped"] = self.dropped
        return out


def layer_statistics(load: LayerLoad) -> dict[str, float]:
    """``load_cv``, ``entropy``, ``max_violation``, ``dead_experts`` (+ ``dropped_frac``) of one layer.

    Returns ``{}`` when no unmasked token reached the layer (nothing to divide by).
    """
    if load.tokens <= 0 or sum(load.counts) <= 0:
        return {}
    stats = {
        "load_cv": coefficient_of_variation(load.counts),
        "entropy": normalized_entropy(load.counts),
        "max_violation": max_violation(load.counts),
        "dead_experts": float(dead_experts(load.counts)),
    }
    if load.dropped is not None:
        stats["dropped_frac"] = sum(load.dropped) / load.tokens
    return stats


def summarize_load(loads: Iterable[LayerLoad], prefix: str = "moe") -> dict[str, float]:
    """Flat metrics dict: ``{prefix}/layer{i}/{stat}`` for each layer plus cross-layer aggregates.

    Aggregates (over layers that routed tokens): ``load_cv_mean``, ``entropy_mean``,
    ``max_violation_max``, ``dead_experts_total`` and, where measured, ``dropped_frac_mean``.
    """
    metrics: dict[str, float] = {}
    per_stat: dict[str, list[float]] = {}
    for load in loads:
        for name, value in layer_statistics(load).items():
            metrics[f"{prefix}/layer{load.index}/{name}"] = value
            per_stat.setdefault(name, []).append(value)
    aggregates = {
        "load_cv_mean": ("load_cv", lambda v: sum(v) / len(v)),
        "entropy_mean": ("entropy", lambda v: sum(v) / len(v)),
        "max_violation_max": ("max_violation", max),
        "dead_experts_total": ("dead_experts", sum),
        "dropped_frac_mean": ("dropped_frac", lambda v: sum(v) / len(v)),
    }
    for key, (stat, fn) in aggregates.items():
        if per_stat.get(stat):
            metrics[f"{prefix}/{key}"] = float(fn(per_stat[stat]))
    return metrics


def drift_statistics(
    changed: Sequence[int],
    tokens: Sequence[int],
    reference_counts: Sequence[Sequence[int]],
    current_counts: Sequence[Sequence[int]],
    layer_indices: Sequence[int],
    prefix: str = "moe",
) -> dict[str, float]:
    """Routing-drift metrics from reduced probe counts, per layer and averaged over layers.

    Keys: ``{prefix}/layer{i}/routing_drift`` (top-1 change share), ``{prefix}/layer{i}/routing_drift_js``
    (JS divergence of the load), ``{prefix}/routing_drift`` and ``{prefix}/routing_drift_js`` (means).
    Layers whose probe tokens are all masked are left out.
    """
    metrics: dict[str, float] = {}
    shares, jss = [], []
    for i, n_changed, n_tokens, ref, cur in zip(layer_indices, changed, tokens, reference_counts, current_counts):
        if n_tokens <= 0:
            continue
        share = n_changed / n_tokens
        metrics[f"{prefix}/layer{i}/routing_drift"] = share
        shares.append(share)
        js = js_divergence(ref, cur)
        if js is not None:
            metrics[f"{prefix}/layer{i}/routing_drift_js"] = js
            jss.append(js)
    if shares:
        metrics[f"{prefix}/routing_drift"] = sum(shares) / len(shares)
    if jss:
        metrics[f"{prefix}/routing_drift_js"] = sum(jss) / len(jss)
    return metrics


# ---------------------------------------------------------------------------------------------- counter
class ExpertLoadCounter:
    """Per-layer expert counts accumulated on the device between two :meth:`reduce` calls.

    All layers share one flat int64 buffer. A layer with ``E`` experts owns ``2 (E + 1)`` bins: bins
    ``0..E-1`` take kept assignments, bins ``E+1..2E`` assignments dropped past capacity, and bins
    ``E`` and ``2E+1`` take masked tokens (never read). So :meth:`update_layers` adds any number of
    layers that route alike, dropped tokens included, with one scatter-add, and :meth:`reduce` sums
    everything over the training processes with one reduction (:func:`~hf_moe_tuning.reduction.reduce_sum`) and one
    host copy. A layer's token count is the
    sum of its expert counts divided by ``top_k`` (every unmasked token goes to exactly ``top_k``
    distinct experts), so it needs no counter of its own.

    Args:
        layers: ``(index, path, num_experts, top_k, measures_dropped)`` per MoE layer, in a fixed order
            that is the same on every process.
    """

    def __init__(self, layers: Sequence[tuple[int, str, int, int, bool]]) -> None:
        self.layers = [(int(i), str(path), int(e), int(k), bool(d)) for i, path, e, k, d in layers]
        self._offset: dict[int, int] = {}
        self._experts: dict[int, int] = {}
        size = 0
        for index, _, num_experts, _, _ in self.layers:
            if index in self._offset:
                raise ValueError(f"MoE layer index {index} appears twice in the counter's layers")
            self._offset[index], self._experts[index] = size, num_experts
            size += 2 * (num_experts + 1)
        self._size = size
        self._offset_tensors: dict[tuple, torch.Tensor] = {}
        self._bins: torch.Tensor | None = None
        self._ones: torch.Tensor | None = None
        self._unmeasured: set[int] = set()
        self.updates = 0

    def __repr__(self) -> str:
        return f"ExpertLoadCounter(layers={len(self.layers)}, updates={self.updates})"

    def _buffer(self, device: torch.device | str) -> torch.Tensor:
        if self._bins is None:
            self._bins = torch.zeros(self._size, dtype=torch.long, device=device)
            self._ones = torch.ones(1, dtype=torch.long, device=self._bins.device)
        return self._bins

    def _offsets(self, layers: tuple[int, ...], device: torch.device) -> torch.Tensor:
        offsets = self._offset_tensors.get(layers)
        if offsets is None:
            offsets = torch.tensor([self._offset[i] for i in layers], dtype=torch.long, device=device)
            offsets = self._offset_tensors[layers] = offsets.view(-1, 1, 1)
        return offsets

    def update(
        self,
        index: int,
        indices: torch.Tensor,
        mask: torch.Tensor,
        dropped: torch.Tensor | bool | None = None,
    ) -> None:
        """Add one forward of layer ``index``: top-k ``indices [N, k]``, ``mask [N]``, ``dropped [N]`` bools.

        ``dropped`` as in :meth:`update_layers`.
        """
        indices = indices.reshape(indices.shape[0], -1)
        if isinstance(dropped, torch.Tensor):
            dropped = dropped.reshape(1, -1)
        self.update_layers([index], indices.unsqueeze(0), mask, dropped)

    def update_layers(
        self,
        layer_indices: Sequence[int],
        indices: torch.Tensor,
        mask: torch.Tensor,
        dropped: torch.Tensor | bool | None = None,
    ) -> None:
        """Add one forward of ``L`` layers with the same number of experts, in one scatter-add.

        Args:
            layer_indices: the ``L`` MoE-layer indices, in the order of ``indices``' first dimension.
            indices: top-k expert indices ``[L, N, k]``.
            mask: bool ``[N]``, ``True`` for tokens that count (shared by the ``L`` layers).
            dropped: bool ``[L, N]``, tokens dropped past capacity (their top-1 choice is counted as
                dropped); ``False`` when none was; ``None`` when not measured, which marks the capacity
                layers' dropped counts of this interval as unknown.
        """
        layers = tuple(int(i) for i in layer_indices)
        unknown = [i for i in layers if i not in self._offset]
        if unknown:
            raise KeyError(f"MoE layers {unknown} are not among the counter's layers {sorted(self._offset)}")
        experts = {self._experts[i] for i in layers}
        if len(experts) != 1:
            raise ValueError(f"update_layers needs layers with one number of experts, got {sorted(experts)}")
        if indices.dim() != 3 or indices.shape[0] != len(layers) or mask.shape[0] != indices.shape[1]:
            raise ValueError(
                f"expected indices [{len(layers)}, N, k] and mask [N], got {tuple(indices.shape)} and {tuple(mask.shape)}"
            )
        num_experts = experts.pop()
        bins = self._buffer(indices.device)
        device = bins.device
        keep = _on(mask, device, torch.bool).view(1, -1, 1)
        slots = torch.where(keep, _on(indices, device, torch.long), num_experts)
        if dropped is None:
            self._unmeasured.update(layers)
        elif dropped is not False:
            slots[..., 0].add_(_on(dropped, device, torch.bool).view(len(layers), -1), alpha=num_experts + 1)
        slots += self._offsets(layers, device)
        flat = slots.view(-1)
        bins.scatter_add_(0, flat, self._ones.expand(flat.shape[0]))
        self.updates += 1

    def reset(self) -> None:
        """Zero every counter (the buffer stays on its device)."""
        if self._bins is not None:
            self._bins.zero_()
        self._unmeasured.clear()
        self.updates = 0

    def reduce(self, device: torch.device | str | None = None) -> list[LayerLoad]:
        """Sum over processes, move to the host and :meth:`reset`. Collective: call it on every process.

        Args:
            device: where to build the (zero) counters when this process counted nothing yet; the device
                the collective backend expects (CUDA for NCCL).
        """
        bins = self._buffer(device or "cpu")
        flags = torch.tensor(
            [1 if index in self._unmeasured else 0 for index, *_ in self.layers], dtype=torch.long, device=bins.device
        )
        flat = reduce_sum(torch.cat([bins, flags])).cpu().tolist()
        loads = []
        for row, (index, path, num_experts, top_k, measures_dropped) in enumerate(self.layers):
            start = self._offset[index]
            kept = flat[start : start + num_experts]
            lost = flat[start + num_experts + 1 : start + 2 * num_experts + 1]
            counts = [a + b for a, b in zip(kept, lost)]
            measured = measures_dropped and not flat[self._size + row]
            loads.append(
                LayerLoad(index, path, num_experts, top_k, sum(counts) // top_k, counts, lost if measured else None)
            )
        self.reset()
        return loads


# ---------------------------------------------------------------------------------------------- pictures
def load_matrix(loads: Sequence[LayerLoad]) -> torch.Tensor:
    """``[layers, max_E]`` float matrix of load relative to uniform (``c_e / mean(c)``; NaN where absent)."""
    width = max((load.num_experts for load in loads), default=0)
    matrix = torch.full((len(loads), width), float("nan"), dtype=torch.float64)
    for row, load in enumerate(loads):
        c = torch.tensor(load.counts, dtype=torch.float64)
        if c.sum() > 0:
            matrix[row, : load.num_experts] = c / c.mean()
    return matrix


def _short(path: str, width: int = 28) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1) :]


def save_load_heatmap(loads: Sequence[LayerLoad], path: str, title: str = "Expert load") -> str:
    """Save a layer x expert heatmap of ``c_e / mean(c)`` (1 = balanced) as a PNG; returns ``path``.

    Uses matplotlib's Agg canvas directly, so the global pyplot backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    matrix = load_matrix(loads).numpy()
    n_layers, n_experts = matrix.shape
    fig = Figure(figsize=(max(4.0, 0.5 * n_experts + 2.5), max(2.5, 0.45 * n_layers + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = matrix[~(matrix != matrix)]  # drop NaN
    vmax = max(2.0, float(finite.max()) if finite.size else 2.0)
    image = ax.imshow(matrix, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=vmax))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(n_experts))
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([f"{load.index}: {_short(load.path)}" for load in loads])
    if n_experts * n_layers <= 256:
        for r in range(n_layers):
            for c in range(n_experts):
                value = matrix[r, c]
                if value == value:  # not NaN
                    color = "white" if value < 0.35 or value > 1.0 + 0.6 * (vmax - 1.0) else "black"
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="load / mean load")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # also for a temporary name without the extension
    return path
