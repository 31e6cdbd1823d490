"""ST-MoE freezing strategies: which parameters (and which expert slices) train.

========== ==========================================================
strategy   trains
========== ==========================================================
all        every parameter
non_moe    everything but routers and routed experts
moe        routers and routed experts only
attention  attention only (self- and cross-attention, other token mixers)
ffn        dense FFNs of non-MoE layers only
========== ==========================================================

Modifiers: ``train_router`` (override the strategy for routers), ``experts`` (only these routed experts
train: a list of indices for every MoE layer, ``{moe_layer_index: [indices]}``, or an already resolved
ESFT selection), ``extra_trainable`` / ``extra_frozen`` (regexes on parameter names, each must match).

:func:`plan_freezing` is pure: it validates everything and returns a :class:`FreezePlan` without touching
the model, so a bad request leaves nothing half-applied. :func:`apply_freezing` applies a plan: whole
tensors get ``requires_grad=False``; for expert subsets inside fused 3-D tensors an
:class:`ExpertSliceFreezer` freezes the fused tensor and trains a small parameter holding only the
selected expert slices, so frozen slices have no gradient, optimizer state or weight decay (they stay
bitwise unchanged) and checkpoints remain ordinary full models. Freezing must happen before the
optimizer is built.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .anatomy import MoEAnatomy, NoMoELayersError, ParamGroup, describe_moe
from .configuration import FREEZE_STRATEGIES, parse_experts

logger = logging.getLogger(__name__)

_G = ParamGroup
STRATEGY_GROUPS: dict[str, frozenset[ParamGroup]] = {
    "all": frozenset(ParamGroup),
    "non_moe": frozenset(ParamGroup) - {_G.ROUTER, _G.EXPERTS},
    "moe": frozenset({_G.ROUTER, _G.EXPERTS}),
    "attention": frozenset({_G.ATTENTION}),
    "ffn": frozenset({_G.DENSE_FFN}),
}

ExpertSpec = Any  # "all" | list[int] | dict[int, list[int]]


class FreezingError(ValueError):
    """A freezing request that cannot be honoured (nothing was changed on the model)."""


@dataclass
class FreezePlan:
    """What trains: whole tensors plus per-expert masks of partially trainable fused tensors.

    Attributes:
        strategy: the ST-MoE strategy name.
        trainable: names of parameters that train as whole tensors.
        expert_masks: fused expert tensor name -> list of bools (``True`` = that expert trains).
        experts: the expert selection per MoE layer index (``None`` when all experts may train).
        anatomy: the model anatomy the plan was made for.
    """

    strategy: str
    trainable: set[str]
    expert_masks: dict[str, list[bool]]
    experts: dict[int, list[int]] | None
    train_router: bool
    anatomy: MoEAnatomy = field(repr=False)

    def trainable_numel(self, name: str) -> int:
        """Trainable scalars of parameter ``name`` under this plan."""
        numel = self.anatomy.numels[name]
        if name in self.trainable:
            return numel
        mask = self.expert_masks.get(name)
        if mask:
            return numel * sum(mask) // len(mask)
        return 0

    def group_table(self) -> dict[str, tuple[int, int]]:
        """``{group: (trainable, total)}`` scalar counts."""
        table = {g.value: [0, 0] for g in ParamGroup}
        for name, group in self.anatomy.groups.items():
            table[group.value][0] += self.trainable_numel(name)
            table[group.value][1] += self.anatomy.numels[name]
        return {g: (t, n) for g, (t, n) in table.items()}

    @property
    def trainable_params(self) -> int:
        return sum(self.trainable_numel(n) for n in self.anatomy.groups)

    @property
    def total_params(self) -> int:
        return self.anatomy.total_params

    @property
    def trainable_frac(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def format_table(self) -> str:
        """Per-group table of trainable and total parameters."""
        lines = [f"MoE freezing strategy: {self.strategy}", f"{'group':<16}{'trainable':>14}{'total':>14}{'share':>9}"]
        for group, (t, n) in self.group_table().items():
            if n:
                lines.append(f"{group:<16}{t:>14,}{n:>14,}{100 * t / n:>8.1f}%")
        lines.append(f"{'total':<16}{self.trainable_params:>14,}{self.total_params:>14,}{100 * self.trainable_frac:>8.1f}%")
        if self.experts is not None:
            lines.append(f"trainable experts per MoE layer: {self.experts}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (used for callback state and model cards)."""
        return {
            "strategy": self.strategy,
            "train_router": self.train_router,
            "experts": {str(k): v for k, v in self.experts.items()} if self.experts is not None else "all",
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_frac": self.trainable_frac,
            "groups": {g: {"trainable": t, "total": n} for g, (t, n) in self.group_table().items()},
        }


def _compile_all(patterns: Iterable[str] | str, what: str) -> list[re.Pattern]:
    if isinstance(patterns, str):
        patterns = [patterns]  # one regex, not one per character
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise FreezingError(f"{what} regex {p!r} is invalid: {err}") from err
    return compiled


def _matching(names: Iterable[str], patterns: Sequence[re.Pattern], what: str) -> set[str]:
    names = list(names)
    matched: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if pattern.search(n)}
        if not hits:
            raise FreezingError(
                f"{what} regex {pattern.pattern!r} matches no parameter name (e.g. {names[:3]})"
            )
        matched |= hits
    return matched


def resolve_experts(anatomy: MoEAnatomy, experts: ExpertSpec) -> dict[int, list[int]] | None:
    """Validate an expert selection and expand it to ``{moe_layer_index: sorted indices}``.

    Returns ``None`` for ``"all"``. Raises :class:`FreezingError` for indices out of range, unknown layers,
    empty selections in every layer, or an unresolved ESFT spec.
    """
    experts = parse_experts(experts)
    if experts == "all":
        return None
    if isinstance(experts, str):
        raise FreezingError(
            f"experts={experts!r} is an ESFT spec; it must be resolved on task data first "
            "(MoEFreezingCallback/MoETrainer do this with a train_dataset; or call "
            "hf_moe_tuning.routing.esft.select_experts and pass the result)"
        )
    if not anatomy.is_moe:
        raise NoMoELayersError(
            f"an expert subset was requested but model_type={anatomy.model_type!r} has no MoE layers"
        )
    n_layers = len(anatomy.layers)
    if isinstance(experts, list):
        per_layer = {i: list(experts) for i in range(n_layers)}
    else:
        unknown = sorted(k for k in experts if not 0 <= k < n_layers)
        if unknown:
            raise FreezingError(f"experts names MoE layer(s) {unknown}, but the model has MoE layers 0..{n_layers - 1}")
        per_layer = {i: list(experts.get(i, [])) for i in range(n_layers)}
    for i, idx in per_layer.items():
        layer = anatomy.layers[i]
        bad = [j for j in idx if not 0 <= j < layer.num_experts]
        if bad:
            raise FreezingError(
                f"expert index {bad} out of range for MoE layer {i} ({layer.path}) with {layer.num_experts} experts"
            )
        per_layer[i] = sorted(set(idx))
    return per_layer


def plan_freezing(
    model: nn.Module,
    strategy: str = "all",
    *,
    train_router: bool | None = None,
    experts: ExpertSpec = "all",
    extra_trainable: Sequence[str] = (),
    extra_frozen: Sequence[str] = (),
    anatomy: MoEAnatomy | None = None,
) -> FreezePlan:
    """Validate a freezing request and return what would train, without changing ``model``.

    Raises:
        FreezingError: unknown strategy, ``ffn`` without dense FFN layers, expert index out of range,
            a regex matching nothing, a request leaving zero trainable parameters.
        NoMoELayersError: an MoE-only request (``moe``, ``non_moe``, routers, expert subsets) on a model
            without MoE layers.
    """
    if strategy not in STRATEGY_GROUPS:
        raise FreezingError(f"unknown freezing strategy {strategy!r}; valid strategies: {list(FREEZE_STRATEGIES)}")
    anatomy = anatomy or describe_moe(model)
    if strategy in ("moe", "non_moe") and not anatomy.is_moe:
        raise NoMoELayersError(
            f"strategy {strategy!r} needs MoE layers, but model_type={anatomy.model_type!r} has none "
            "(use 'all', 'attention' or 'ffn' for dense models)"
        )
    if train_router is not None and not isinstance(train_router, bool):
        raise FreezingError(f"train_router must be True, False or None, got {train_router!r}")
    if train_router is not None and not anatomy.is_moe:
        raise NoMoELayersError(f"train_router was set but model_type={anatomy.model_type!r} has no routers")
    groups = set(STRATEGY_GROUPS[strategy])
    if strategy == "ffn" and not anatomy.params_in(ParamGroup.DENSE_FFN):
        raise FreezingError(
            f"strategy 'ffn' trains the dense FFNs of non-MoE layers, but model_type={anatomy.model_type!r} has "
            "no dense FFN layer (every FFN is an MoE layer); use 'non_moe' or extra_trainable instead"
        )
    if train_router is True:
        groups.add(ParamGroup.ROUTER)
    elif train_router is False:
        groups.discard(ParamGroup.ROUTER)

    selection = resolve_experts(anatomy, experts)
    if selection is not None and ParamGroup.EXPERTS not in groups:
        raise FreezingError(
            f"an expert subset was given, but strategy {strategy!r} does not train routed experts; "
            "use strategy 'moe' or 'all' (or extra_trainable) with experts=..."
        )

    trainable = {n for n, g in anatomy.groups.items() if g in groups}
    expert_masks: dict[str, list[bool]] = {}
    if selection is not None:
        for layer in anatomy.layers:
            chosen = set(selection[layer.index])
            for name, j in layer.per_expert.items():
                if j not in chosen:
                    trainable.discard(name)
            for name in layer.fused_experts:
                if name not in trainable:
                    continue
                trainable.discard(name)
                mask = [j in chosen for j in range(layer.num_experts)]
                if any(mask):
                    expert_masks[name] = mask

    names = list(anatomy.groups)
    extra_t = _matching(names, _compile_all(extra_trainable, "extra_trainable"), "extra_trainable")
    extra_f = _matching(names, _compile_all(extra_frozen, "extra_frozen"), "extra_frozen")
    trainable |= extra_t
    for name in extra_t:
        expert_masks.pop(name, None)
    trainable -= extra_f
    for name in extra_f:
        expert_masks.pop(name, None)

    plan = FreezePlan(
        strategy=strategy,
        trainable=trainable,
        expert_masks=expert_masks,
        experts=selection,
        train_router=ParamGroup.ROUTER in groups,
        anatomy=anatomy,
    )
    if plan.trainable_params == 0:
        raise FreezingError(
            f"strategy {strategy!r} with these modifiers leaves zero trainable parameters in "
            f"model_type={anatomy.model_type!r}"
        )
    return plan


class ExpertSliceFreezer:
    """Trains only the selected expert slices of fused 3-D expert tensors; the frozen slices get nothing.

    Each partially trainable fused tensor is frozen as a whole and its selected slices move to a small
    trainable parameter (see :mod:`hf_moe_tuning.routing.expert_subset`): the frozen slices have no
    gradient, no optimizer state and no weight decay, so they stay bitwise unchanged. The fused tensor
    keeps its name and always holds the current values (synced after every optimizer step once
    :meth:`attach` ran, before each forward and before ``state_dict()``), so checkpoints are ordinary
    full models.

    Args:
        model: the model, changed in place.
        expert_masks: fused expert tensor name -> per-expert mask (``True`` = that expert trains).
        anatomy: the model's anatomy (computed when omitted).
    """

    def __init__(
        self,
        model: nn.Module,
        expert_masks: Mapping[str, Sequence[bool]],
        anatomy: MoEAnatomy | None = None,
    ) -> None:
        from .routing.expert_subset import install_expert_subsets

        self.masks = {k: list(v) for k, v in expert_masks.items()}
        self.subsets = install_expert_subsets(model, self.masks, anatomy)

    def __bool__(self) -> bool:
        return bool(self.subsets)

    @property
    def trainable_names(self) -> list[str]:
        """Names of the trainable slice parameters (one per partially trainable fused tensor)."""
        return self.subsets.trainable_names

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the fused tensors current after every ``optimizer.step()``."""
        self.subsets.attach(optimizer)

    def remove(self) -> None:
        """Detach from the optimizer; the model keeps training and saving correctly on its own."""
        self.subsets.sync()
        self.subsets.detach_optimizer()

    def uninstall(self) -> None:
        """Merge the slices into the fused tensors and remove the slice parameters (fused tensors stay frozen)."""
        self.subsets.uninstall()


@dataclass
class FreezeReport:
    """The applied plan plus the slice freezer that keeps frozen fused slices unchanged."""

    plan: FreezePlan
    slice_freezer: ExpertSliceFreezer

    def __getattr__(self, item: str) -> Any:  # delegate read access to the plan
        if item in ("plan", "slice_freezer"):
            raise AttributeError(item)
        return getattr(self.plan, item)


def apply_plan(model: nn.Module, plan: FreezePlan) -> FreezeReport:
    """Set ``requires_grad`` as ``plan`` says and move partially trainable fused tensors to expert subsets.

    Expert subsets installed by an earlier call are merged back first, so re-applying is safe. The
    returned report's plan lists the trainable slice parameters in ``trainable`` as well (their scalars
    are counted once, under the fused tensor they belong to).
    """
    from .routing.expert_subset import uninstall_expert_subsets

    uninstall_expert_subsets(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in plan.trainable)
    freezer = ExpertSliceFreezer(model, plan.expert_masks, anatomy=plan.anatomy)
    if freezer:
        plan = replace(plan, trainable=plan.trainable | set(freezer.trainable_names))
    return FreezeReport(plan=plan, slice_freezer=freezer)


def apply_freezing(
    model: nn.Module,
    strategy: str = "all",
    *,
    train_router: bool | None = None,
    experts: ExpertSpec = "all",
    extra_trainable: Sequence[str] = (),
    extra_frozen: Sequence[str] = (),
    anatomy: MoEAnatomy | None = None,
) -> FreezeReport:
    """Freeze ``model`` in place by an ST-MoE strategy and return the report.

    Everything is validated first (:func:`plan_freezing`); on error nothing on the model changes.
    Call before the optimizer is built; if fused expert slices are frozen, call
    ``report.slice_freezer.attach(optimizer)`` once the optimizer exists (the callback does this).

    Example:
        >>> report = apply_freezing(model, "non_moe")
        >>> print(report.format_table())
    """
    from .routing.expert_subset import uninstall_expert_subsets

    if anatomy is None:
        uninstall_expert_subsets(model)  # plan on the plain model, not on slices of an earlier application
    plan = plan_freezing(
        model,
        strategy,
        train_router=train_router,
        experts=experts,
        extra_trainable=extra_trainable,
        extra_frozen=extra_frozen,
        anatomy=anatomy,
    )
    return apply_plan(model, plan)
