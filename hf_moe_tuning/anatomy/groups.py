"""What is where in an MoE model: parameter groups and MoE layers.

Every parameter of a model belongs to exactly one :class:`ParamGroup`. MoE layers are found from the
family table (:mod:`hf_moe_tuning.anatomy.families`) and, for families not in the table, by structure:
a module whose direct child holds either ``E >= 2`` identical expert sub-modules or parameters whose
leading dimension is ``E``, next to a router whose weight is ``[E, hidden]``.

Example:
    >>> from hf_moe_tuning.models import build_tiny_model
    >>> model = build_tiny_model("mixtral")
    >>> anatomy = describe_moe(model)
    >>> [layer.path for layer in anatomy.layers]
    ['model.layers.0.mlp', 'model.layers.1.mlp']
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable

import torch
from torch import nn

from .families import DEFAULT_FAMILY, MoEFamily, get_family

logger = logging.getLogger(__name__)


class ParamGroup(str, Enum):
    """The parameter groups of DESIGN.md; every parameter is in exactly one."""

    EMBEDDINGS = "embeddings"
    ATTENTION = "attention"
    ROUTER = "router"
    EXPERTS = "experts"
    SHARED_EXPERTS = "shared_experts"
    DENSE_FFN = "dense_ffn"
    NORMS = "norms"
    HEAD = "head"

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.value


class NoMoELayersError(ValueError):
    """Raised when an MoE-only operation is asked of a model without detectable MoE layers."""


class UnclassifiedParameterError(ValueError):
    """Raised when a parameter fits no group; the message says how to extend the rules."""


@dataclass
class MoELayer:
    """One MoE block of a model.

    Attributes:
        index: position among the model's MoE layers (0-based, in module order).
        path: dotted module path of the MoE block.
        num_experts: number of routed experts.
        top_k: experts each token is routed to.
        router_path: module path of the module that owns the router weight.
        router_weight: full parameter name of the ``[num_experts, hidden]`` router weight.
        router_bias: full parameter name of the router bias, if any.
        fused_experts: fused expert tensors, parameter name -> expert axis (always 0 in transformers 5).
        per_expert: parameters of per-expert modules, parameter name -> expert index.
        expert_paths: module paths of the routed-expert containers.
        shared_paths: module paths of shared experts and their gates.
        stack: ``"encoder"``/``"decoder"`` for encoder-decoder models, else ``None``.
        scoring: ``"softmax"`` or ``"sigmoid"`` router scores.
        capacity: whether the family drops tokens past an expert capacity.
    """

    index: int
    path: str
    num_experts: int
    top_k: int
    router_path: str
    router_weight: str
    router_bias: str | None
    fused_experts: dict[str, int] = field(default_factory=dict)
    per_expert: dict[str, int] = field(default_factory=dict)
    expert_paths: list[str] = field(default_factory=list)
    shared_paths: list[str] = field(default_factory=list)
    stack: str | None = None
    scoring: str = "softmax"
    capacity: bool = False

    @property
    def expert_params(self) -> list[str]:
        """All routed-expert parameter names of this layer (fused and per-expert)."""
        return sorted(set(self.fused_experts) | set(self.per_expert))


@dataclass
class MoEAnatomy:
    """The result of :func:`describe_moe`."""

    model_type: str | None
    family: MoEFamily
    layers: list[MoELayer]
    groups: dict[str, ParamGroup]
    numels: dict[str, int]

    @property
    def is_moe(self) -> bool:
        return bool(self.layers)

    def params_in(self, *groups: ParamGroup | str) -> set[str]:
        """Names of the parameters in any of ``groups``."""
        wanted = {ParamGroup(g) for g in groups}
        return {n for n, g in self.groups.items() if g in wanted}

    def group_counts(self) -> dict[ParamGroup, int]:
        """Number of scalar parameters per group (tied weights counted once)."""
        counts = {g: 0 for g in ParamGroup}
        for name, group in self.groups.items():
            counts[group] += self.numels[name]
        return counts

    @property
    def total_params(self) -> int:
        return sum(self.numels.values())

    def layer_of(self, param_name: str) -> MoELayer | None:
        """The MoE layer that owns ``param_name`` (router, experts or shared experts), if any."""
        for layer in self.layers:
            if param_name.startswith(layer.path + "."):
                return layer
        return None

    def format_table(self) -> str:
        """A plain-text table of parameter counts and shares per group."""
        counts = self.group_counts()
        total = max(self.total_params, 1)
        lines = [f"{'group':<16}{'params':>14}{'share':>9}"]
        for group, n in counts.items():
            lines.append(f"{group.value:<16}{n:>14,}{100 * n / total:>8.2f}%")
        lines.append(f"{'total':<16}{self.total_params:>14,}{100.0:>8.2f}%")
        if self.layers:
            first = self.layers[0]
            lines.append(
                f"MoE layers: {len(self.layers)} (e.g. {first.path}: {first.num_experts} experts, top-{first.top_k})"
            )
        else:
            lines.append("MoE layers: 0 (dense model)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- detection

_ATTN_IN_NAME = re.compile(r"attn|attention", re.IGNORECASE)


def _direct_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return dict(module.named_parameters(recurse=False))


def _param_signature(module: nn.Module) -> tuple:
    return (type(module).__name__, tuple((n, tuple(p.shape)) for n, p in module.named_parameters()))


def _expert_count_of_container(module: nn.Module) -> tuple[int, str] | None:
    """If ``module`` holds routed experts return ``(num_experts, kind)`` with kind ``fused``/``modules``."""
    if type(module).__module__.startswith("torch.nn"):
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            return None  # built-in layers (Conv1d of SSM mixers, Linear, ...) are never expert containers
    children = list(module.children())
    direct = _direct_params(module)
    with_params = [c for c in children if any(True for _ in c.parameters())]
    if len(with_params) >= 2 and not direct:
        sigs = {_param_signature(c) for c in with_params}
        names = [n for n, _ in module.named_parameters()]
        if len(sigs) == 1 and not any(_ATTN_IN_NAME.search(n) for n in names):
            return len(with_params), "modules"
        return None
    if not direct or any(p.numel() for c in children for p in c.parameters()):
        return None
    multi = [p for p in direct.values() if p.ndim >= 2]
    if not any(p.ndim >= 3 for p in multi):
        return None
    leading = {p.shape[0] for p in multi}
    if len(leading) == 1 and next(iter(leading)) >= 2:
        return next(iter(leading)), "fused"
    return None


def _router_weight(module: nn.Module, num_experts: int) -> tuple[str, nn.Parameter, nn.Parameter | None] | None:
    params = _direct_params(module)
    weight = params.get("weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] != num_experts:
        return None
    bias = params.get("bias")
    if bias is not None and tuple(bias.shape) != (num_experts,):
        bias = None
    return "weight", weight, bias


def _resolve(module: nn.Module, dotted: str) -> nn.Module | None:
    try:
        return module.get_submodule(dotted)
    except AttributeError:
        return None


def _text_configs(config) -> list:
    configs = [config]
    for attr in ("text_config", "decoder_config", "language_config"):
        sub = getattr(config, attr, None)
        if sub is not None and not isinstance(sub, dict):
            configs.append(sub)
    return configs


def _top_k(block: nn.Module, router: nn.Module, family: MoEFamily, config) -> int:
    for mod in (router, block):
        k = getattr(mod, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    if "top_k" in family.extra:
        return int(family.extra["top_k"])
    if config is not None:
        for cfg in _text_configs(config):
            for key in family.top_k_keys:
                k = getattr(cfg, key, None)
                if isinstance(k, int) and k > 0:
                    return k
    return 1


def _find_block(
    path: str, module: nn.Module, family: MoEFamily
) -> tuple[int, list[tuple[str, str]], str, nn.Module, str | None, list[str]] | None:
    """Check whether ``module`` is an MoE block; return its parts or ``None``."""
    shared = [n for n in family.shared_names if _resolve(module, n) is not None and "." not in n]
    # routed-expert containers: family names first, then any child that looks like one
    containers: list[tuple[str, int, str]] = []
    for child_name, child in module.named_children():
        if child_name in shared:
            continue
        found = _expert_count_of_container(child)
        if found is not None:
            containers.append((child_name, found[0], found[1]))
    if not containers:
        return None
    counts = {n for _, n, _ in containers}
    if len(counts) != 1:
        return None
    num_experts = counts.pop()
    # router: a [num_experts, hidden] weight outside the expert containers and shared experts
    candidates = list(family.router_names) + [n for n, _ in module.named_modules() if n]
    excluded = [c for c, _, _ in containers] + shared
    for name in candidates:
        if any(name == e or name.startswith(e + ".") for e in excluded):
            continue
        if name.count(".") > 1:
            continue
        sub = _resolve(module, name)
        if sub is None:
            continue
        found = _router_weight(sub, num_experts)
        if found is not None:
            _, _, bias = found
            return (
                num_experts,
                [(c, kind) for c, _, kind in containers],
                name,
                sub,
                "bias" if bias is not None else None,
                shared,
            )
    return None


def _skip_path(path: str, family: MoEFamily) -> bool:
    patterns = family.extra.get("skip_blocks", ())
    return any(re.search(p, path) for p in patterns)


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Find the MoE blocks of ``model`` in module order (see :func:`describe_moe`)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = get_family(model_type)
    if family is DEFAULT_FAMILY and config is not None:
        for sub in _text_configs(config)[1:]:
            family = get_family(getattr(sub, "model_type", None))
            if family is not DEFAULT_FAMILY:
                break
    layers: list[MoELayer] = []
    claimed: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(c + ".") for c in claimed) or _skip_path(path, family):
            continue
        found = _find_block(path, module, family)
        if found is None:
            continue
        num_experts, containers, router_name, router_mod, bias_name, shared = found
        prefix = f"{path}." if path else ""
        router_path = prefix + router_name
        fused: dict[str, int] = {}
        per_expert: dict[str, int] = {}
        for cname, kind in containers:
            container = module.get_submodule(cname)
            if kind == "fused":
                for pname, _ in container.named_parameters(recurse=False):
                    fused[f"{prefix}{cname}.{pname}"] = 0
            else:
                experts = [(n, c) for n, c in container.named_children() if any(True for _ in c.parameters())]
                for j, (ename, expert) in enumerate(experts):
                    for pname, _ in expert.named_parameters():
                        per_expert[f"{prefix}{cname}.{ename}.{pname}"] = j
        stack = None
        for part in path.split("."):
            if part in ("encoder", "decoder"):
                stack = part
                break
        layers.append(
            MoELayer(
                index=len(layers),
                path=path,
                num_experts=num_experts,
                top_k=_top_k(module, router_mod if not isinstance(router_mod, nn.Linear) else module, family, config),
                router_path=router_path,
                router_weight=f"{router_path}.weight",
                router_bias=f"{router_path}.{bias_name}" if bias_name else None,
                fused_experts=fused,
                per_expert=per_expert,
                expert_paths=[prefix + c for c, _ in containers],
                shared_paths=[prefix + s for s in shared],
                stack=stack,
                scoring=family.scoring,
                capacity=family.capacity,
            )
        )
        claimed.append(path)
    return layers


# --------------------------------------------------------------------------------------- classification

_HEAD = re.compile(r"(^|\.)(lm_head|score|classifier|qa_outputs|cls|proj_out|output_projection)(\.|$)")
_ATTENTION = re.compile(
    r"(^|\.)(\w*attn\w*|\w*attention\w*|mixer|mamba|ssm|linear_attn|token_mixer|conv1d|"
    r"q_proj|k_proj|v_proj|o_proj|qkv_proj|query|key|value|dt_proj|x_proj|in_proj|out_proj)(\.|$)",
    re.IGNORECASE,
)
_EMBED = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe|shared|embeddings?)(\.|$)", re.IGNORECASE)
_FFN = re.compile(
    r"(^|\.)(mlp|ffn|feed_forward|DenseReluDense|\w*ffn\w*|fc1|fc2|ff|intermediate|dense|block_sparse_moe|"
    r"gate_proj|up_proj|down_proj|wi|wo|wi_0|wi_1|w1|w2|w3|moe|layer\.\d+\.mlp)(\.|$)",
    re.IGNORECASE,
)


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


_SHARED = re.compile(r"(^|\.)(shared_mlp|shared_experts?|shared_expert_gate)(\.|$)")
# residual-stream scalings and mixers (layer scales, hyper-connections) are grouped with the norms
_RESIDUAL_SCALE = re.compile(r"(^|\.)(\w*residual\w*|\w*hidden_states_(scale|bias)|hc_\w+|\w*hyper_connection\w*|\w*_scale|layer_scale\w*)(\.|$)")
_ROTARY = re.compile(r"(^|\.)(rotary_emb|rope)(\.|$)")


def _classify_plain(model: nn.Module, name: str) -> ParamGroup | None:
    owner = _owner(model, name)
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in type(owner).__name__.lower() or re.search(r"(^|\.)\w*(norm|ln_\w*|ln\d*)(\.|$)", name, re.I):
        return ParamGroup.NORMS
    if _SHARED.search(name):
        return ParamGroup.SHARED_EXPERTS
    if _ROTARY.search(name):
        return ParamGroup.ATTENTION
    if _HEAD.search(name):
        return ParamGroup.HEAD
    if _ATTENTION.search(name):
        return ParamGroup.ATTENTION
    if isinstance(owner, nn.Embedding) or _EMBED.search(name) or "embed" in leaf:
        return ParamGroup.EMBEDDINGS
    if _FFN.search(name):
        return ParamGroup.DENSE_FFN
    if _RESIDUAL_SCALE.search(name):
        return ParamGroup.NORMS
    return None


def classify_parameters(model: nn.Module, layers: list[MoELayer] | None = None) -> dict[str, ParamGroup]:
    """Map every parameter name of ``model`` to its :class:`ParamGroup`.

    Tied weights appear once (``named_parameters`` de-duplicates them), under their first name.

    Raises:
        UnclassifiedParameterError: a parameter fits no rule (the message lists them).
    """
    if layers is None:
        layers = find_moe_layers(model)
    groups: dict[str, ParamGroup] = {}
    unknown: list[str] = []
    for name, _ in model.named_parameters():
        group: ParamGroup | None = None
        for layer in layers:
            if not name.startswith(layer.path + "."):
                continue
            if name.startswith(layer.router_path + "."):
                group = ParamGroup.ROUTER
            elif any(name.startswith(s + ".") for s in layer.shared_paths):
                group = ParamGroup.SHARED_EXPERTS
            elif "norm" in type(_owner(model, name)).__name__.lower():
                group = ParamGroup.NORMS
            else:
                # routed experts, plus block-level expert biases (e.g. JetMoE's mlp.bias)
                group = ParamGroup.EXPERTS
            break
        if group is None:
            group = _classify_plain(model, name)
        if group is None:
            unknown.append(name)
        else:
            groups[name] = group
    if unknown:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise UnclassifiedParameterError(
            f"{len(unknown)} parameter(s) of model_type={model_type!r} fit no parameter group: "
            f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}. Add a row for this family to "
            "hf_moe_tuning.anatomy.families.MOE_FAMILIES or open an issue with the model's parameter names."
        )
    return groups


def describe_moe(model: nn.Module) -> MoEAnatomy:
    """Describe ``model``: its MoE layers and the group of every parameter.

    Works for every MoE family of transformers 5.x listed in the family table and falls back to
    structural detection for others. Dense models report no MoE layers.
    """
    config = getattr(model, "config", None)
    layers = find_moe_layers(model)
    groups = classify_parameters(model, layers)
    numels = {n: p.numel() for n, p in model.named_parameters()}
    model_type = getattr(config, "model_type", None)
    return MoEAnatomy(model_type=model_type, family=get_family(model_type), layers=layers, groups=groups, numels=numels)


def require_moe(anatomy: MoEAnatomy, what: str) -> None:
    """Raise :class:`NoMoELayersError` naming ``what`` when ``anatomy`` has no MoE layers."""
    if not anatomy.is_moe:
        raise NoMoELayersError(
            f"{what} needs MoE layers, but no router was detected in model_type={anatomy.model_type!r}. "
            "If this is an MoE model, add a row for its model_type to "
            "hf_moe_tuning.anatomy.families.MOE_FAMILIES (router_names / expert_names)."
        )


def iter_router_modules(model: nn.Module, anatomy: MoEAnatomy) -> Iterable[tuple[MoELayer, nn.Module]]:
    """Yield ``(layer, module owning the router weight)`` for each MoE layer."""
    for layer in anatomy.layers:
        yield layer, model.get_submodule(layer.router_path)


def expert_param(model: nn.Module, name: str) -> torch.Tensor:
    """Return the parameter called ``name`` (helper for fused-expert slicing)."""
    return model.get_parameter(name)
