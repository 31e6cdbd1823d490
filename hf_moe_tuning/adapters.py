"""PEFT LoRA on MoE models, by parameter group, combined with the ST-MoE freezing presets.

LoRA targets come from the anatomy (:func:`~hf_moe_tuning.anatomy.describe_moe`), not from name lists:

========================  =====================================================================
group                     what gets a LoRA adapter
========================  =====================================================================
``attention``             every ``nn.Linear`` of attention (q/k/v/o, cross-attention, mixers)
``dense_ffn``             every ``nn.Linear`` of the FFNs of non-MoE layers
``experts``               routed experts: per-expert ``nn.Linear`` modules (Switch, NLLB-MoE)
                          through ``target_modules``; fused 3-D ``[num_experts, ...]`` tensors
                          (Mixtral, Qwen-MoE, OLMoE, DeepSeek, GPT-OSS in transformers 5) through
                          PEFT's ``target_parameters`` (one rank-``r`` adapter per expert)
``shared_experts``        the ``nn.Linear`` modules of always-on shared experts
========================  =====================================================================

Biases, relative-position tables and other non-linear parameters of a group are not adapted (the
report lists them). Routers, embeddings, norms and heads are not LoRA targets: train them in full
with a freezing strategy.

A freezing ``strategy`` says which base parameters train *in full* next to the adapters (``None``:
none, as in plain PEFT). ``strategy="non_moe"`` with ``groups=("experts",)`` trains attention,
embeddings, norms, dense FFNs and head in full, adapts every routed expert with LoRA and keeps the
routers frozen. Fully trained parameters go through PEFT's ``modules_to_save`` so the adapter
checkpoint holds them; weights tied in the base model (T5/Switch embeddings and head) stay tied while
training (PEFT would otherwise train untied copies) and are all saved, so
``PeftModel.from_pretrained`` restores the exact model. A group both LoRA-adapted and trained in
full is refused.

Example:
    >>> model = build_tiny_model("switch")
    >>> peft_model, report = apply_lora(model, groups=("experts",), strategy="non_moe", r=4)
    >>> print(report.format_table())
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers.utils import ADAPTER_CONFIG_NAME  # "adapter_config.json"
from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME  # "adapter_model.safetensors"

from .anatomy import MoEAnatomy, ParamGroup, describe_moe
from .freezing import FreezePlan, plan_freezing

logger = logging.getLogger(__name__)

#: Groups that can carry LoRA adapters.
LORA_GROUPS: tuple[str, ...] = ("attention", "dense_ffn", "experts", "shared_experts")

_PEFT_PREFIX = "base_model.model."


class AdapterTargetError(ValueError):
    """An adapter request or adapter config that targets names the model does not have (or cannot adapt)."""


# --------------------------------------------------------------------------------------------- targets


@dataclass
class LoraTargets:
    """Where LoRA adapters go, as PEFT needs it.

    Attributes:
        target_modules: full names of ``nn.Linear``-like modules (exact PEFT ``target_modules`` entries).
        target_parameters: full names of fused 3-D expert tensors (PEFT ``target_parameters``).
        adapted: base parameter name -> group, for every weight that gets an adapter.
        skipped: base parameter name -> reason, for parameters of the requested groups left alone.
    """

    target_modules: list[str]
    target_parameters: list[str]
    adapted: dict[str, str]
    skipped: dict[str, str] = field(default_factory=dict)


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a PEFT wrapper (``isinstance(model, PeftModel)``): its adapter decides which
    parameters train."""
    from peft import PeftModel  # a dependency; transformers' Trainer has imported it already

    return isinstance(model, PeftModel)


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 style linear


def lora_targets(model: nn.Module, groups: Sequence[str] = ("experts",), *, anatomy: MoEAnatomy | None = None) -> LoraTargets:
    """The LoRA targets of ``groups`` in ``model``.

    Raises:
        AdapterTargetError: an unknown or non-adaptable group, or a group with nothing to adapt.
    """
    groups = list(dict.fromkeys(groups))
    if not groups:
        raise AdapterTargetError(f"no LoRA groups given; choose from {list(LORA_GROUPS)}")
    for group in groups:
        if group not in LORA_GROUPS:
            hint = (
                " (train routers, embeddings, norms and heads in full with a freezing strategy instead)"
                if group in {g.value for g in ParamGroup}
                else ""
            )
            raise AdapterTargetError(f"LoRA group {group!r} is not supported; choose from {list(LORA_GROUPS)}{hint}")
    anatomy = anatomy or describe_moe(model)
    fused = {name: layer for layer in anatomy.layers for name in layer.fused_experts}
    modules, params = [], []
    adapted: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, group in anatomy.groups.items():
        if group.value not in groups:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if _is_linear(owner) and attr == "weight":
            modules.append(owner_path)
            adapted[name] = group.value
        elif name in fused and getattr(owner, attr).ndim == 3:
            params.append(name)
            adapted[name] = group.value
        else:
            skipped[name] = "bias" if attr.endswith("bias") else f"not a linear weight ({type(owner).__name__}.{attr})"
    for group in groups:
        if group not in adapted.values():
            raise AdapterTargetError(
                f"LoRA group {group!r} has nothing to adapt in model_type={anatomy.model_type!r} "
                f"(group sizes: { {g.value: n for g, n in anatomy.group_counts().items() if n} })"
            )
    return LoraTargets(sorted(set(modules)), sorted(params), adapted, skipped)


# --------------------------------------------------------------------------------------------- validation


def _peft_module_match(target: str, name: str) -> bool:
    """PEFT's rule for a list entry of ``target_modules``: exact name or ``.``-separated suffix."""
    return name == target or name.endswith("." + target)


def _unmatched(targets: Iterable[str], names: Sequence[str]) -> list[str]:
    return [t for t in targets if not any(_peft_module_match(t, n) for n in names)]


def _suggest(missing: Sequence[str], names: Sequence[str]) -> str:
    tails = sorted({n.rsplit(".", 1)[-1] for n in names})
    hints = []
    for target in missing:
        close = difflib.get_close_matches(target.rsplit(".", 1)[-1], tails, n=3)
        if close:
            hints.append(f"{target!r}: did you mean one of {close}?")
    return (" " + " ".join(hints)) if hints else ""


def validate_lora_targets(model: nn.Module, config: Any) -> None:
    """Raise :class:`AdapterTargetError` if any entry of a LoRA config names nothing in ``model``.

    PEFT only fails when *no* entry matches; a typo next to valid entries would silently leave
    weights unadapted. This checks every entry of ``target_modules`` (list entries by PEFT's suffix
    rule, a string as a full-match regex), ``target_parameters`` and ``modules_to_save``.
    """
    module_names = [n for n, _ in model.named_modules() if n]
    param_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    problems = []
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in module_names):
            problems.append(f"target_modules regex {targets!r} matches no module")
    elif targets:
        missing = _unmatched(targets, module_names)
        if missing:
            problems.append(f"target_modules {missing} match no module.{_suggest(missing, module_names)}")
    missing = _unmatched(getattr(config, "target_parameters", None) or [], param_names)
    if missing:
        problems.append(f"target_parameters {missing} match no parameter.{_suggest(missing, param_names)}")
    missing = _unmatched(getattr(config, "modules_to_save", None) or [], module_names)
    if missing:
        problems.append(f"modules_to_save {missing} match no module.{_suggest(missing, module_names)}")
    if problems:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise AdapterTargetError(f"adapter config does not fit model_type={model_type!r}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------- planning


@dataclass
class LoraPlan:
    """A validated LoRA request: the PEFT config plus what trains in full and which weights are tied.

    Attributes:
        config: the ``peft.LoraConfig`` to pass to ``get_peft_model``.
        targets: the adapter targets per group.
        freeze: the freezing plan of the base weights trained in full (``None``: adapters only).
        tied: groups of parameter names sharing one tensor among the fully trained ones.
        anatomy: the base model's anatomy.
    """

    config: Any
    targets: LoraTargets
    freeze: FreezePlan | None
    tied: list[list[str]]
    anatomy: MoEAnatomy = field(repr=False)


def _tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name of the same tensor (only for tensors with several names)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return {name: names for names in by_id.values() if len(names) > 1 for name in names}


def plan_lora(
    model: nn.Module,
    groups: Sequence[str] = ("experts",),
    *,
    strategy: str | None = None,
    train_router: bool | None = None,
    extra_trainable: Sequence[str] = (),
    extra_frozen: Sequence[str] = (),
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    task_type: str | None = None,
    **lora_kwargs: Any,
) -> LoraPlan:
    """Validate a LoRA + freezing request for ``model`` and build its ``LoraConfig`` (the model is not changed).

    Args:
        groups: groups that get LoRA adapters (:data:`LORA_GROUPS`).
        strategy: freezing strategy for base weights trained in full next to the adapters, or ``None``.
        train_router, extra_trainable, extra_frozen: freezing modifiers (see :func:`plan_freezing`).
        r, lora_alpha, lora_dropout, task_type, lora_kwargs: passed to ``peft.LoraConfig``.

    Raises:
        AdapterTargetError: bad groups, a group both adapted and trained in full, dropout with fused
            expert targets, or a fully trained module that contains adapter targets.
        FreezingError / NoMoELayersError: an invalid freezing request.
    """
    from peft import LoraConfig

    anatomy = describe_moe(model)
    targets = lora_targets(model, groups, anatomy=anatomy)
    if targets.target_parameters and lora_dropout:
        raise AdapterTargetError(
            f"lora_dropout={lora_dropout} is not supported for fused expert tensors (PEFT target_parameters); "
            "use lora_dropout=0.0"
        )
    freeze = None
    modules_to_save: list[str] = []
    tied: list[list[str]] = []
    if strategy is not None or train_router is not None or extra_trainable:
        freeze = plan_freezing(
            model,
            strategy or "all",
            train_router=train_router,
            extra_trainable=extra_trainable,
            extra_frozen=extra_frozen,
            anatomy=anatomy,
        )
        if freeze.expert_masks:
            raise AdapterTargetError(
                "expert subsets inside fused expert tensors cannot be trained in full next to LoRA "
                f"(partially trainable: {sorted(freeze.expert_masks)[:2]}...)"
            )
        both = sorted(set(targets.adapted) & freeze.trainable)
        if both:
            overlap = sorted({targets.adapted[n] for n in both})
            raise AdapterTargetError(
                f"group(s) {overlap} would be both LoRA-adapted and trained in full by strategy {freeze.strategy!r} "
                f"(e.g. {both[0]}); drop them from groups or use a strategy that freezes them (e.g. 'non_moe' with "
                "groups=('experts',))"
            )
        aliases = _tied_groups(model)
        full = set(freeze.trainable)
        for name in list(full):
            full.update(aliases.get(name, []))
        tied = sorted({tuple(aliases[n]) for n in full if n in aliases})
        tied = [list(t) for t in tied]
        modules_to_save = sorted({n.rpartition(".")[0] for n in full})
        lora_owners = targets.target_modules + [p.rpartition(".")[0] for p in targets.target_parameters]
        for owner in modules_to_save:
            inner = [t for t in lora_owners if t == owner or t.startswith(owner + ".") or owner.startswith(t + ".")]
            if inner:
                raise AdapterTargetError(
                    f"module {owner!r} would be trained in full and also hold LoRA target {inner[0]!r}; "
                    "adjust extra_trainable/extra_frozen so that adapted modules are not trained in full"
                )
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets.target_modules,
        target_parameters=targets.target_parameters or None,
        modules_to_save=modules_to_save or None,
        task_type=task_type,
        **lora_kwargs,
    )
    validate_lora_targets(model, config)
    return LoraPlan(config=config, targets=targets, freeze=freeze, tied=tied, anatomy=anatomy)


# --------------------------------------------------------------------------------------------- applying


def _strip_peft(name: str) -> str:
    """Base-model name of a PEFT module/parameter path (drops the wrapper prefix and ``base_layer`` hops)."""
    name = name.removeprefix(_PEFT_PREFIX)
    return re.sub(r"(^|\.)base_layer(?=\.|$)", "", name).lstrip(".")


def _wrapper_copy(peft_model: nn.Module, module_path: str, adapter_name: str) -> nn.Module:
    wrapper = peft_model.base_model.model.get_submodule(module_path)
    copies = getattr(wrapper, "modules_to_save", None)
    if copies is None or adapter_name not in copies:
        raise RuntimeError(f"PEFT did not wrap {module_path!r} in modules_to_save")
    return copies[adapter_name]


def _retie(peft_model: nn.Module, tied: Sequence[Sequence[str]], adapter_name: str) -> None:
    """Make the trainable copies of tied weights one tensor again (PEFT copies each module separately)."""
    for names in tied:
        first_path, _, first_attr = names[0].rpartition(".")
        shared = getattr(_wrapper_copy(peft_model, first_path, adapter_name), first_attr)
        for name in names[1:]:
            path, _, attr = name.rpartition(".")
            setattr(_wrapper_copy(peft_model, path, adapter_name), attr, shared)


def _set_full_trainable(peft_model: nn.Module, plan: LoraPlan, adapter_name: str) -> None:
    """Trainable copies hold exactly the planned parameters (a module copy may also hold frozen ones)."""
    trainable = set(plan.freeze.trainable) if plan.freeze else set()
    aliases = _tied_groups_from(plan.tied)
    for module_path in plan.config.modules_to_save or []:
        copy = _wrapper_copy(peft_model, module_path, adapter_name)
        for attr, param in copy.named_parameters():
            name = f"{module_path}.{attr}"
            wanted = name in trainable or any(a in trainable for a in aliases.get(name, ()))
            param.requires_grad_(wanted)


def _tied_groups_from(tied: Sequence[Sequence[str]]) -> dict[str, list[str]]:
    return {name: list(names) for names in tied for name in names}


def apply_lora(model: nn.Module, groups: Sequence[str] = ("experts",), *, adapter_name: str = "default", **kwargs: Any):
    """Wrap ``model`` in a ``PeftModel`` with LoRA on ``groups`` and the base weights ``strategy`` trains in full.

    Keyword arguments are those of :func:`plan_lora`. Returns ``(peft_model, report)``; the report is
    also stored as ``peft_model.moe_adapter_report`` (the model cards read it).
    """
    from peft import get_peft_model

    plan = plan_lora(model, groups, **kwargs)
    with warnings.catch_warnings():
        # tied layers in modules_to_save: tying is restored right below (_retie)
        warnings.filterwarnings("ignore", message=".*tied layer is part of the adapter.*")
        peft_model = get_peft_model(model, plan.config, adapter_name=adapter_name)
    if plan.freeze is not None:
        _retie(peft_model, plan.tied, adapter_name)
        _set_full_trainable(peft_model, plan, adapter_name)
    report = adapter_report(peft_model, plan)
    peft_model.moe_adapter_report = report
    logger.info("LoRA on %s:\n%s", list(groups), report.format_table())
    return peft_model, report


def load_lora_model(base_model: nn.Module, adapter_dir: str, *, is_trainable: bool = False, adapter_name: str = "default"):
    """``PeftModel.from_pretrained`` after checking the adapter config fits ``base_model``; re-ties tied copies."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(adapter_dir)
    validate_lora_targets(base_model, config)
    aliases = _tied_groups(base_model)
    saved = set(config.modules_to_save or [])
    tied = sorted({tuple(names) for name, names in aliases.items() if name.rpartition(".")[0] in saved})
    peft_model = PeftModel.from_pretrained(base_model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable)
    _retie(peft_model, [list(t) for t in tied if all(n.rpartition(".")[0] in saved for n in t)], adapter_name)
    return peft_model


def merge_adapter(peft_model: nn.Module) -> nn.Module:
    """Fold the LoRA weights into the base weights and return the plain transformers model."""
    return peft_model.merge_and_unload()


# --------------------------------------------------------------------------------------------- report


@dataclass
class AdapterReport:
    """Trainable set of a LoRA (+ freezing) model, per parameter group.

    Attributes:
        strategy: freezing strategy of the fully trained base weights (``None``: adapters only).
        lora_groups: groups with adapters.
        r, lora_alpha: LoRA rank and alpha.
        groups: ``{group: {"total": base scalars, "full": trained in full, "adapter": LoRA scalars,
            "adapted_tensors": base tensors with an adapter}}``.
        trainable_names: exact names of the trainable parameters of the ``PeftModel``.
        base_params: scalars of the base model (tied weights once).
    """

    strategy: str | None
    lora_groups: list[str]
    r: int
    lora_alpha: int
    groups: dict[str, dict[str, int]]
    trainable_names: list[str]
    base_params: int

    @property
    def adapter_params(self) -> int:
        return sum(g["adapter"] for g in self.groups.values())

    @property
    def full_params(self) -> int:
        return sum(g["full"] for g in self.groups.values())

    @property
    def trainable_params(self) -> int:
        return self.adapter_params + self.full_params

    @property
    def trainable_frac(self) -> float:
        """Trainable scalars (adapters + full) relative to the base model's scalars."""
        return self.trainable_params / max(self.base_params, 1)

    def format_table(self) -> str:
        lines = [
            f"LoRA r={self.r} alpha={self.lora_alpha} on {self.lora_groups}; trained in full: "
            f"{self.strategy or 'nothing (adapters only)'}",
            f"{'group':<16}{'base':>12}{'full':>12}{'adapter':>12}{'adapted':>9}",
        ]
        for group, row in self.groups.items():
            if row["total"]:
                lines.append(
                    f"{group:<16}{row['total']:>12,}{row['full']:>12,}{row['adapter']:>12,}{row['adapted_tensors']:>9}"
                )
        lines.append(
            f"{'total':<16}{self.base_params:>12,}{self.full_params:>12,}{self.adapter_params:>12,}"
            f"{'':>9}  trainable {100 * self.trainable_frac:.2f}% of base"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "lora_groups": self.lora_groups,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "groups": self.groups,
            "adapter_params": self.adapter_params,
            "full_params": self.full_params,
            "trainable_params": self.trainable_params,
            "base_params": self.base_params,
            "trainable_frac": self.trainable_frac,
        }


def _lora_layers(peft_model: nn.Module) -> dict[str, str]:
    """PEFT module name of every LoRA layer -> name of the base parameter it adapts."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            attr = getattr(module, "parameter_name", None) or "weight"
            layers[name] = f"{_strip_peft(name)}.{attr}"
    return layers


def adapter_report(peft_model: nn.Module, plan: LoraPlan) -> AdapterReport:
    """Count trainable scalars per group: base weights trained in full plus adapter weights.

    Raises ``RuntimeError`` if the model's trainable parameters are not exactly the planned adapters and
    fully trained copies (e.g. something unfroze base weights behind PEFT's back).
    """
    anatomy = plan.anatomy
    table = {g.value: {"total": 0, "full": 0, "adapter": 0, "adapted_tensors": 0} for g in ParamGroup}
    for name, group in anatomy.groups.items():
        table[group.value]["total"] += anatomy.numels[name]
        if plan.freeze is not None:
            table[group.value]["full"] += plan.freeze.trainable_numel(name)
    layers = _lora_layers(peft_model)
    for base_name in set(layers.values()):
        table[anatomy.groups[base_name].value]["adapted_tensors"] += 1
    trainable_names = []
    full_copies = set(plan.config.modules_to_save or [])
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            continue
        trainable_names.append(name)
        if ".lora_" in name:
            base = layers[name.split(".lora_")[0]]
            table[anatomy.groups[base].value]["adapter"] += param.numel()
        elif ".modules_to_save." in name:
            owner = _strip_peft(name.split(".modules_to_save.")[0])
            if owner not in full_copies:
                raise RuntimeError(f"unexpected trainable copy {name}")
        else:
            raise RuntimeError(f"base parameter {name} is trainable outside the adapter plan")
    return AdapterReport(
        strategy=plan.freeze.strategy if plan.freeze else None,
        lora_groups=sorted(set(plan.targets.adapted.values())),
        r=plan.config.r,
        lora_alpha=plan.config.lora_alpha,
        groups=table,
        trainable_names=sorted(trainable_names),
        base_params=anatomy.total_params,
    )


# --------------------------------------------------------------------------------------------- checkpoints


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME))


def saved_adapter_modules(adapter_dir: str) -> dict[str, dict[str, int]]:
    """Base-model module path -> ``{"adapter": LoRA scalars, "full": fully trained scalars}`` saved for it."""
    from safetensors import safe_open

    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise AdapterTargetError(f"{adapter_dir} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME}")
    sizes: dict[str, dict[str, int]] = {}
    with safe_open(path, "pt") as f:
        for key in f.keys():
            numel = 1
            for dim in f.get_slice(key).get_shape():
                numel *= dim
            kind = "adapter" if ".lora_" in key else "full"
            module = _strip_peft(key.split(".lora_")[0] if kind == "adapter" else key.rpartition(".")[0])
            row = sizes.setdefault(module, {"adapter": 0, "full": 0})
            row[kind] += numel
    return sizes


def check_adapter_checkpoint(adapter_dir: str, base_model: nn.Module | None = None) -> dict[str, Any]:
    """Check a saved adapter before upload; returns its ``adapter_config.json`` content.

    Every ``target_modules`` / ``target_parameters`` / ``modules_to_save`` entry must have saved
    weights (an entry without weights targeted a name that does not exist), and, when ``base_model``
    is given, must name something in it.

    Raises:
        AdapterTargetError: with the entries that match nothing.
    """
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG_NAME), encoding="utf-8") as f:
        config = json.load(f)
    saved = list(saved_adapter_modules(adapter_dir))
    problems = []
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, m) for m in saved):
            problems.append(f"target_modules regex {targets!r} has no saved adapter weights")
    else:
        missing = _unmatched(targets or [], saved)
        if missing:
            problems.append(f"target_modules {missing} have no saved adapter weights")
    missing = [p for p in config.get("target_parameters") or [] if _unmatched([p.rpartition(".")[0]], saved)]
    if missing:
        problems.append(f"target_parameters {missing} have no saved adapter weights")
    missing = _unmatched(config.get("modules_to_save") or [], saved)
    if missing:
        problems.append(f"modules_to_save {missing} have no saved weights")
    if problems:
        raise AdapterTargetError(f"adapter in {adapter_dir} targets names that do not exist: " + "; ".join(problems))
    if base_model is not None:
        from peft import PeftConfig

        validate_lora_targets(base_model, PeftConfig.from_pretrained(adapter_dir))
    return config


def saved_adapter_groups(adapter_dir: str, anatomy: MoEAnatomy) -> dict[str, dict[str, int]]:
    """Saved scalars per parameter group of ``anatomy``: ``{group: {"adapter": n, "full": m}}``.

    Fully trained tied weights are saved once per alias; they are counted once here.
    """
    owners: dict[str, str] = {}
    for name, group in anatomy.groups.items():
        owners.setdefault(name.rpartition(".")[0], group.value)
    out: dict[str, dict[str, int]] = {}
    for module, row in saved_adapter_modules(adapter_dir).items():
        if module not in owners:  # an alias of a tied weight (anatomy lists each tensor once)
            continue
        entry = out.setdefault(owners[module], {"adapter": 0, "full": 0})
        entry["adapter"] += row["adapter"]
        entry["full"] += row["full"]
    return out
