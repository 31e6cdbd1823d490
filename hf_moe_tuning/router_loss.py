"""Router losses from router logits: load-balancing (aux) loss, router z-loss, coefficient schedules.

Pure functions over tensors; :class:`hf_moe_tuning.callbacks.router_loss.RouterLossCallback` wraps them.

Definitions (one MoE layer, ``E`` experts, top-``k`` routing, a *group* of counted tokens ``T``):

* **aux (load-balancing) loss**, Switch/GShard form ``E · Σ_e f_e · P_e`` where
  ``f_e = (1 / (k·|T|)) Σ_t 1[e ∈ topk(t)]`` is the fraction of routing *assignments* that go to
  expert ``e`` (so ``Σ_e f_e = 1``) and ``P_e = (1/|T|) Σ_t p_{t,e}`` the mean router probability.
  Perfect balance gives **1** for every ``k`` (and ``E`` for total collapse on one expert).

  Relation to transformers: ``load_balancing_loss_func`` of Mixtral, Qwen-MoE, OLMoE, GPT-OSS ...
  counts ``f_e`` per *token* (``Σ_e f_e = k``) and pools the tokens of all layers into one group, so
  on one layer and one group its value is ``k ×`` ours (balanced = ``k``). Switch's own function is
  top-1 and per batch row, but pools the layers of a stack, counts padding, and the model *sums* the
  encoder and decoder values. Here every MoE layer is its own term and the terms are **averaged over
  MoE layers**; for roughly the weight of a model config's ``router_aux_loss_coef`` (and TRL's
  ``SFTConfig.router_aux_loss_coef``, which weights the model's own loss), multiply that coefficient by
  ``k`` (Switch: by the number of stacks, 2) to get this package's ``moe_aux_loss_coef``.
* **z-loss** (ST-MoE): ``mean_t logsumexp(logits_t)²`` over the counted tokens of a group.
* **sigmoid routers** (DeepSeek-V3, GLM-4-MoE, dots1): ``p_{t,e}`` are the sigmoid scores the
  router routes on, normalised over experts (``s_{t,e} / Σ_j s_{t,j}``, DeepSeek-V3's
  sequence-wise balance loss); ``topk`` is the router's own selection (``scores +
  e_score_correction_bias``, group-limited when the router has ``num_group > 1``). The z-loss is
  taken on the raw logits for every family.
* ``topk`` is the expert choice *before* any capacity drop (Switch, NLLB-MoE), as in Mesh-TF.

Split invariance (why groups are sequences): the aux loss is not linear in the batch, so a value
computed per micro-batch changes with how the global batch is cut into micro-batches and processes.
Here a **group is one sequence** (a row of the batch: T5X/flaxformer compute both losses per group
and average over groups). Per layer and per sequence we get ``aux_s`` and ``z_s`` (masked tokens
excluded; a sequence with no counted token contributes 0), average them over MoE layers, and the
loss of a global batch is the **mean over its sequences**. That value does not depend on the
gradient-accumulation steps or the number of processes; the callback scales each micro-batch's sum
so that the gradient is that of the global-batch mean (see the callback module).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .configuration import ROUTER_LOSS_SCHEDULES
from .metrics.expert_load import select_experts as metrics_select_experts

__all__ = [
    "ROUTER_LOSS_SCHEDULES",
    "RouterLosses",
    "RoutingSpec",
    "aux_loss",
    "aux_loss_per_sequence",
    "coefficient_at",
    "compute_router_losses",
    "router_probs",
    "routing_spec",
    "select_experts",
    "validate_coefficient",
    "validate_schedule",
    "z_loss",
    "z_loss_per_sequence",
]


# --------------------------------------------------------------------------------------------- validation
def validate_coefficient(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` if it is not a finite number ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number >= 0, got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def validate_schedule(name: str, schedule: str) -> str:
    """Return ``schedule`` or raise ``ValueError`` naming the valid schedules."""
    if schedule not in ROUTER_LOSS_SCHEDULES:
        raise ValueError(f"{name}={schedule!r} is not one of {list(ROUTER_LOSS_SCHEDULES)}")
    return schedule


# --------------------------------------------------------------------------------------------- schedules
def coefficient_at(
    step: int,
    base: float,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
) -> float:
    """The coefficient of a router loss at optimizer step ``step`` (0-based, completed steps).

    * ``constant``: ``base``.
    * ``linear_warmup``: ``base · min(1, step / warmup_steps)`` (``base`` when ``warmup_steps == 0``),
      the convention of ``transformers.get_linear_schedule_with_warmup``.
    * ``cosine``: the linear warmup, then ``base · ½(1 + cos(π · progress))`` decaying to 0 at
      ``total_steps`` (required).
    * ``off``: 0.
    """
    if schedule == "off" or base == 0.0:
        return 0.0
    if schedule == "constant":
        return base
    if schedule not in ("linear_warmup", "cosine"):
        validate_schedule("schedule", schedule)
    if warmup_steps > 0 and step < warmup_steps:
        return base * step / warmup_steps
    if schedule == "linear_warmup":
        return base
    if total_steps is None or total_steps <= 0:
        raise ValueError("the 'cosine' router-loss schedule needs the total number of training steps (max_steps)")
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------- routing
@dataclass(frozen=True)
class RoutingSpec:
    """How one MoE layer turns router logits into scores and an expert choice.

    Attributes:
        num_experts: routed experts ``E``.
        top_k: experts per token ``k``.
        scoring: ``"softmax"`` or ``"sigmoid"``.
        correction_bias: per-expert bias added to sigmoid scores for *selection only* (DeepSeek-V3).
        num_group: expert groups for group-limited selection (DeepSeek-V3 ``n_group``), 1 = none.
        topk_group: groups kept per token when ``num_group > 1``.
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    correction_bias: torch.Tensor | None = None
    num_group: int = 1
    topk_group: int = 1


def routing_spec(model: nn.Module, layer: Any) -> RoutingSpec:
    """Read the :class:`RoutingSpec` of an anatomy ``MoELayer`` from its router module (and MoE block)."""
    router = model.get_submodule(layer.router_path)
    block = model.get_submodule(layer.path)
    bias = None
    num_group, topk_group = 1, 1
    if layer.scoring == "sigmoid":
        for mod in (router, block):
            candidate = getattr(mod, "e_score_correction_bias", None)
            if isinstance(candidate, torch.Tensor) and candidate.shape == (layer.num_experts,):
                bias = candidate
                break
        for mod in (router, block):
            groups = getattr(mod, "num_group", None) or getattr(mod, "n_group", None)
            if isinstance(groups, int) and groups > 1:
                num_group = groups
                topk_group = int(getattr(mod, "topk_group", 1) or 1)
                break
    return RoutingSpec(layer.num_experts, layer.top_k, layer.scoring, bias, num_group, topk_group)


def router_probs(logits: torch.Tensor, scoring: str = "softmax") -> torch.Tensor:
    """Per-token routing probabilities ``[N, E]`` (rows sum to 1) from router logits ``[N, E]``."""
    if scoring == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    if scoring == "sigmoid":
        scores = torch.sigmoid(logits.float())
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    raise ValueError(f"unknown router scoring {scoring!r}; expected 'softmax' or 'sigmoid'")


@torch.no_grad()
def select_experts(logits: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """The ``top_k`` experts each token is routed to, ``[N, k]`` (int64), as the family's router picks them."""
    return metrics_select_experts(
        logits,
        spec.top_k,
        scoring=spec.scoring,
        correction_bias=spec.correction_bias,
        num_groups=spec.num_group,
        topk_groups=spec.topk_group,
    )


# --------------------------------------------------------------------------------------------- losses
def _as_groups(x: torch.Tensor, num_sequences: int) -> torch.Tensor:
    if x.shape[0] % num_sequences:
        raise ValueError(f"{x.shape[0]} routed tokens cannot be split into {num_sequences} sequences")
    return x.reshape(num_sequences, x.shape[0] // num_sequences, *x.shape[1:])


def _mask_or_ones(mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """Float weights ``[N]`` of the tokens of ``logits`` (``[N, E]`` or ``[L, N, E]``): 1 counts, 0 does not."""
    n = logits.shape[-2]
    if mask is None:
        return torch.ones(n, dtype=torch.float32, device=logits.device)
    if mask.shape != (n,):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({n},)")
    return mask.to(device=logits.device, dtype=torch.float32)


def _stacked_losses(
    logits: torch.Tensor,
    spec: RoutingSpec,
    weights: torch.Tensor,
    num_sequences: int,
    selected: torch.Tensor | None,
    want_aux: bool = True,
    want_z: bool = True,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aux and z losses ``([L, B], [L, B])`` of ``L`` layers that route alike, in one pass over ``[L, N, E]``.

    ``weights`` (float ``[N]``, shared by the layers) is built once; the per-sequence expert counts
    ``f_e`` come from one scatter-add of the weights into ``L · B · E`` bins (no ``[N, E]`` one-hot).
    ``selected``: the router's choice ``[L, N, k]``, or ``None`` to derive it with ``spec`` (and the
    stacked ``correction_bias [L, E]``).
    """
    num_layers, n, num_experts = logits.shape
    seq_len = n // num_sequences
    if n % num_sequences:
        raise ValueError(f"{n} routed tokens cannot be split into {num_sequences} sequences")
    w_seq = weights.view(num_sequences, seq_len)
    denom = w_seq.sum(dim=1).clamp_min(1.0)  # counted tokens per sequence [B]
    zeros = logits.new_zeros(num_layers, num_sequences, dtype=torch.float32)
    aux = zeros
    if want_aux:
        probs = router_probs(logits, spec.scoring)  # [L, N, E]
        if selected is None:
            with torch.no_grad():
                selected = metrics_select_experts(
                    logits, spec.top_k, scoring=spec.scoring, correction_bias=correction_bias,
                    num_groups=spec.num_group, topk_groups=spec.topk_group,
                )
        # P_e per sequence: masked mean of the probabilities
        mean_prob = (probs * weights[:, None]).view(num_layers, num_sequences, seq_len, num_experts).sum(dim=2)
        mean_prob = mean_prob / denom[:, None]
        # f_e per sequence: one scatter-add of the token weights into bin (layer · B + sequence) · E + expert
        top_k = selected.shape[-1]
        bins = _sequence_bins(num_layers, num_sequences, seq_len, num_experts, logits.device)  # [L, N, 1]
        flat = (selected.to(device=logits.device, dtype=torch.long) + bins).reshape(-1)
        values = weights.view(1, n, 1).expand(num_layers, n, top_k).reshape(-1)
        counts = torch.zeros(num_layers * num_sequences * num_experts, dtype=torch.float32, device=logits.device)
        counts.scatter_add_(0, flat, values)
        fraction = counts.view(num_layers, num_sequences, num_experts) / (spec.top_k * denom[:, None])
        aux = spec.num_experts * (fraction * mean_prob).sum(dim=-1)
    z = zeros
    if want_z:
        z_tok = torch.logsumexp(logits.float(), dim=-1) ** 2  # [L, N]
        z = (z_tok * weights).view(num_layers, num_sequences, seq_len).sum(dim=2) / denom
    return aux, z


_BINS: dict[tuple, torch.Tensor] = {}


def _sequence_bins(num_layers: int, num_sequences: int, seq_len: int, num_experts: int, device) -> torch.Tensor:
    """``[L, N, 1]`` int64 offsets ``(layer · B + sequence of token) · E`` (cached per shape and device)."""
    key = (num_layers, num_sequences, seq_len, num_experts, str(device))
    bins = _BINS.get(key)
    if bins is None:
        if len(_BINS) > 64:
            _BINS.clear()
        rows = torch.arange(num_layers * num_sequences, device=device).mul_(num_experts)
        bins = _BINS[key] = rows.view(num_layers, num_sequences, 1).expand(-1, -1, seq_len).reshape(
            num_layers, num_sequences * seq_len, 1)
    return bins


def aux_loss_per_sequence(
    logits: torch.Tensor,
    spec: RoutingSpec,
    mask: torch.Tensor | None = None,
    num_sequences: int = 1,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aux loss ``E · Σ_e f_e P_e`` of each sequence, ``[num_sequences]`` (see module docstring).

    Args:
        logits: router logits ``[num_sequences * seq_len, E]`` (rows in row-major ``[batch, seq]`` order).
        spec: the layer's :class:`RoutingSpec`.
        mask: bool ``[N]``, ``True`` for tokens that count (padding / ignored labels ``False``).
        num_sequences: rows of the batch; each is one group.
        selected: the experts chosen per token ``[N, k]``; default :func:`select_experts`.
    """
    _as_groups(logits, num_sequences)  # same error as before for a token count that does not split
    bias = spec.correction_bias[None] if spec.correction_bias is not None else None
    aux, _ = _stacked_losses(
        logits[None], spec, _mask_or_ones(mask, logits), num_sequences,
        None if selected is None else selected[None], want_z=False, correction_bias=bias,
    )
    return aux[0]


def z_loss_per_sequence(
    logits: torch.Tensor, mask: torch.Tensor | None = None, num_sequences: int = 1
) -> torch.Tensor:
    """Router z-loss ``mean_t logsumexp(logits_t)²`` of each sequence over its counted tokens, ``[num_sequences]``."""
    _as_groups(logits, num_sequences)
    spec = RoutingSpec(logits.shape[-1], 1)
    _, z = _stacked_losses(logits[None], spec, _mask_or_ones(mask, logits), num_sequences, None, want_aux=False)
    return z[0]


def aux_loss(logits: torch.Tensor, spec: RoutingSpec, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Aux loss of one layer with all (counted) tokens as a single group (scalar)."""
    return aux_loss_per_sequence(logits, spec, mask, num_sequences=1)[0]


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss of one layer over all counted tokens (scalar)."""
    return z_loss_per_sequence(logits, mask, num_sequences=1)[0]


@dataclass
class RouterLosses:
    """Router losses of one forward pass.

    Attributes:
        aux: ``[num_sequences]`` aux loss per sequence, averaged over MoE layers.
        z: ``[num_sequences]`` z-loss per sequence, averaged over MoE layers.
        layer_ids: the MoE-layer indices that routed tokens, in anatomy order.
        aux_by_layer: ``[len(layer_ids), num_sequences]`` per-layer aux losses (rows in ``layer_ids`` order).
        z_by_layer: ``[len(layer_ids), num_sequences]`` per-layer z-losses.
    """

    aux: torch.Tensor
    z: torch.Tensor
    layer_ids: list[int]
    aux_by_layer: torch.Tensor
    z_by_layer: torch.Tensor

    @property
    def layer_aux(self) -> dict[int, torch.Tensor]:
        """``{layer index: [num_sequences]}`` per-layer aux losses."""
        return dict(zip(self.layer_ids, self.aux_by_layer.unbind(0)))

    @property
    def layer_z(self) -> dict[int, torch.Tensor]:
        """``{layer index: [num_sequences]}`` per-layer z-losses."""
        return dict(zip(self.layer_ids, self.z_by_layer.unbind(0)))

    @property
    def num_sequences(self) -> int:
        return int(self.aux.shape[0])

    def first_non_finite_layer(self) -> int | None:
        """Index of the first MoE layer whose losses are NaN/inf, else ``None``."""
        finite = (torch.isfinite(self.aux_by_layer).all(dim=-1) & torch.isfinite(self.z_by_layer).all(dim=-1)).tolist()
        return next((index for index, ok in zip(self.layer_ids, finite) if not ok), None)


def compute_router_losses(
    items: Iterable[tuple[Any, torch.Tensor, torch.Tensor | None]],
    specs: dict[int, RoutingSpec],
    num_sequences: int,
    want_aux: bool = True,
    want_z: bool = True,
    selected: Mapping[int, torch.Tensor] | None = None,
) -> RouterLosses | None:
    """Per-sequence aux and z losses averaged over the MoE layers of one forward pass.

    Layers that route alike (same routing rule, token count, mask and source of the expert choice) are
    stacked and computed together: one softmax, one logsumexp and one scatter-add per group of layers,
    not a handful of kernels per layer.

    Args:
        items: ``(layer, logits [N, E], mask [N])`` per MoE layer, e.g. ``RouterCapture.layer_items()``.
        specs: :class:`RoutingSpec` per layer index.
        num_sequences: rows in the batch (every layer's tokens are split into this many sequences).
        want_aux / want_z: skip a loss whose coefficient is 0 (its values are then zeros).
        selected: the experts each layer's router chose, ``[N, k]`` per layer index (e.g.
            ``RouterCapture.indices``); layers without an entry (or with another token count) use
            :func:`select_experts`.

    Returns ``None`` when no MoE layer routed tokens in the pass.
    """
    buckets: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]] = {}
    order: list[int] = []
    for layer, logits, mask in items:
        spec = specs[layer.index]
        chosen = (selected or {}).get(layer.index)
        if chosen is not None and (chosen.shape[0] != logits.shape[0] or chosen.shape[-1] != spec.top_k):
            chosen = None
        key = (
            spec.num_experts, spec.top_k, spec.scoring, spec.correction_bias is not None, spec.num_group,
            spec.topk_group, tuple(logits.shape), logits.dtype, logits.device, id(mask), chosen is not None,
        )
        buckets.setdefault(key, []).append((layer.index, logits, mask, chosen))
        order.append(layer.index)
    if not order:
        return None
    ids: list[int] = []
    aux_parts: list[torch.Tensor] = []
    z_parts: list[torch.Tensor] = []
    for group in buckets.values():
        indices = [index for index, *_ in group]
        spec = specs[indices[0]]
        stacked = group[0][1].unsqueeze(0) if len(group) == 1 else torch.stack([g[1] for g in group])
        chosen = None
        if group[0][3] is not None:
            chosen = group[0][3].unsqueeze(0) if len(group) == 1 else torch.stack([g[3] for g in group])
        bias = None
        if chosen is None and spec.correction_bias is not None:
            bias = torch.stack([specs[i].correction_bias for i in indices])
        weights = _mask_or_ones(group[0][2], stacked)
        aux, z = _stacked_losses(stacked, spec, weights, num_sequences, chosen, want_aux, want_z, bias)
        ids += indices
        aux_parts.append(aux)
        z_parts.append(z)
    aux_by_layer = aux_parts[0] if len(aux_parts) == 1 else torch.cat(aux_parts)
    z_by_layer = z_parts[0] if len(z_parts) == 1 else torch.cat(z_parts)
    if ids != order:  # several groups: back to anatomy order (the mean over layers sums in that order)
        position = {index: row for row, index in enumerate(ids)}
        perm = torch.tensor([position[i] for i in order], device=aux_by_layer.device)
        aux_by_layer, z_by_layer, ids = aux_by_layer.index_select(0, perm), z_by_layer.index_select(0, perm), order
    return RouterLosses(
        aux=aux_by_layer.mean(dim=0), z=z_by_layer.mean(dim=0), layer_ids=ids,
        aux_by_layer=aux_by_layer, z_by_layer=z_by_layer,
    )
