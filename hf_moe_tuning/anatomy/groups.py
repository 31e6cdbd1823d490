"""What is where in an MoE model: parameter groups and MoE layers.

Every parameter of a model belongs to exactly one :class:`ParamGroup`. MoE layers are found by
structure, guided by the family table (:mod:`hf_moe_tuning.anatomy.families`): a module whose direct
child holds either ``E >= 2`` identical expert sub-modules or parameters whose leading dimension is
``E`` (or a container the table names), next to a router whose weight is ``[E, hidden]``. The table
adds what structure cannot know: router rows beyond the experts (zero-computation or skip experts,
shared-expert gates), MLP routers, DBRX's 2-D expert blocks, Doge's product keys, blocks that are not
MoE layers (JetMoE's mixture of attention heads) and families the anatomy refuses.

Example:
    >>> from hf_moe_tuning.models import build_tiny_model
    >>> model = build_tiny_model("mixtral")
    >>> anatomy = describe_moe(model)
    >>> [layer.path for layer in anatomy.layers]
    ['model.layers.0.mlp', 'model.layers.1.mlp']
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from enum import Enum

from torch import nn

from .families import DEFAULT_FAMILY, MoEFamily, get_family

logger = logging.getLogger(__name__)


class ParamGroup(str, Enum):
    """The parameter groups of a model (see the README's freezing section); every parameter is in exactly one."""

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


class UnsupportedMoEFamilyError(UnclassifiedParameterError):
    """Raised for a family whose table row marks it unsupported; the message gives the reason."""


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
        scoring: ``"softmax"`` or ``"sigmoid"`` router scores; ``"product_key"`` when the router logits
            score key halves rather than experts (Doge), so per-expert router statistics do not apply.
        capacity: whether the family drops tokens past an expert capacity.
        router_outputs: rows of the router weight (= columns of the router logits). Equals
            ``num_experts`` except where the family table says otherwise: extra rows come last and route
            to parameter-free experts (Longcat-Flash zero-computation experts, Zaya's skip expert) or gate
            the shared experts (Inkling); ``logits[:, :num_experts]`` are the routed experts' columns.
        router_raw_logits: the router module returns its raw logits first (family table column of the same
            name), so the router capture reuses them instead of recomputing them.
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
    router_outputs: int | None = None
    router_raw_logits: bool = False

    def __post_init__(self) -> None:
        if self.router_outputs is None:
            self.router_outputs = self.num_experts

    @property
    def router_group_path(self) -> str:
        """Module path of the whole router (the block's child holding the router weight, e.g. ``mlp.gate``)."""
        if self.router_path == self.path:
            return self.router_path
        rel = self.router_path[len(self.path) + 1 :] if self.path else self.router_path
        return f"{self.path}.{rel.split('.')[0]}" if self.path else rel.split(".")[0]

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


def _unwrap(module: nn.Module) -> nn.Module:
    """The module a PEFT tuner layer wraps (LoRA on experts or linears), else ``module`` itself."""
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else module


def _shape(param: nn.Parameter) -> tuple[int, ...]:
    """The full shape of ``param``, also when DeepSpeed ZeRO-3 has partitioned it: a model built while a ZeRO-3
    config is active (``zero3_init_flag``, ``HfDeepSpeedConfig``) holds empty tensors and the shape in ``ds_shape``."""
    shape = getattr(param, "ds_shape", None)
    return tuple(shape if shape is not None else param.shape)


def _numel(param: nn.Parameter) -> int:
    """The full number of elements of ``param`` (``ds_numel`` of a ZeRO-3-partitioned parameter)."""
    numel = getattr(param, "ds_numel", None)
    return int(numel) if numel is not None else param.numel()


def _direct_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return dict(module.named_parameters(recurse=False))


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _param_signature(module: nn.Module) -> tuple:
    return (type(module).__name__, tuple((n, _shape(p)) for n, p in module.named_parameters()))


def _fused_params(container: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of a fused expert container, minus norms shared by all experts (MuseSpark)."""
    norm_prefixes = [f"{n}." for n, m in container.named_modules() if n and _is_norm(m)]
    return {n: p for n, p in container.named_parameters() if not any(n.startswith(x) for x in norm_prefixes)}


def _expert_count_of_container(module: nn.Module) -> tuple[int, str] | None:
    """If ``module`` holds routed experts return ``(num_experts, kind)`` with kind ``fused``/``modules``."""
    if type(module).__module__.startswith("torch.nn"):
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            return None  # built-in layers (Conv1d of SSM mixers, Linear, ...) are never expert containers
    children = [c for c in module.children() if not _is_norm(c)]
    direct = _direct_params(module)
    with_params = [c for c in children if any(True for _ in c.parameters())]
    if len(with_params) >= 2 and not direct:
        sigs = {_param_signature(c) for c in with_params}
        names = [n for n, _ in module.named_parameters()]
        if len(sigs) == 1 and not any(_ATTN_IN_NAME.search(n) for n in names):
            return len(with_params), "modules"
        return None
    if not direct or with_params:
        return None
    multi = [_shape(p) for p in direct.values() if len(_shape(p)) >= 2]
    if not any(len(shape) >= 3 for shape in multi):
        return None
    leading = {shape[0] for shape in multi}
    if len(leading) == 1 and next(iter(leading)) >= 2:
        return next(iter(leading)), "fused"
    return None


def _named_container(module: nn.Module, family: MoEFamily) -> tuple[int, str] | None:
    """A container the family table names whose tensors all stack the experts along axis 0.

    Covers experts stored as embedding rows (Doge, ``[E, hidden]``) and DBRX's 2-D blocks
    (``[E * intermediate, hidden]``, kind ``blocks``: the count is a multiple of ``E`` fixed by the router).
    """
    params = list(_fused_params(module).values())
    if not params or any(len(_shape(p)) < 2 for p in params):
        return None
    leading = {_shape(p)[0] for p in params}
    if len(leading) != 1 or next(iter(leading)) < 2:
        return None
    return next(iter(leading)), "blocks" if family.expert_blocks else "fused"


def _resolve(module: nn.Module, dotted: str) -> nn.Module | None:
    try:
        return module.get_submodule(dotted)
    except AttributeError:
        return None


def _text_configs(config) -> list:
    configs = [config]
    for attr in ("text_config", "decoder_config", "language_config", "ffn_config"):
        sub = getattr(config, attr, None)
        if sub is not None and not isinstance(sub, dict):
            configs.append(sub)
    return configs


def _config_int(config, key: str) -> int | None:
    for cfg in _text_configs(config) if config is not None else []:
        try:
            value = getattr(cfg, key, None)
        except Exception:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _config_str(config, key: str) -> str | None:
    for cfg in _text_configs(config) if config is not None else []:
        try:
            value = getattr(cfg, key, None)
        except Exception:
            continue
        if isinstance(value, str):
            return value
    return None


def _router_rows(num_experts: int, family: MoEFamily, config) -> int:
    """Rows the router weight of a block with ``num_experts`` routed experts has."""
    if family.scoring == "product_key":
        return 2 * math.isqrt(num_experts)
    extra = family.router_extra_rows
    if isinstance(extra, str):
        extra = _config_int(config, extra) or 0
    return num_experts + extra


def _top_k(block: nn.Module, router: nn.Module, family: MoEFamily, config) -> int:
    for mod in (router, block):
        k = getattr(mod, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    if "top_k" in family.extra:
        return int(family.extra["top_k"])
    for key in family.top_k_keys:
        k = _config_int(config, key)
        if k is not None and k > 0:
            return k
    return 1


@dataclass
class _Block:
    """What :func:`_find_block` found in one module."""

    num_experts: int
    containers: list[tuple[str, str]]  # (child name, kind)
    router_name: str
    router: nn.Module
    router_rows: int
    has_bias: bool
    shared: list[str]


def _find_block(module: nn.Module, family: MoEFamily, config) -> _Block | None:
    """Check whether ``module`` is an MoE block; return its parts or ``None``."""
    shared = [n for n in family.shared_names if "." not in n and _resolve(module, n) is not None]
    # routed-expert containers: any child that looks like one, or one the family table names
    containers: list[tuple[str, int, str]] = []
    for child_name, child in module.named_children():
        if child_name in shared:
            continue
        base = _unwrap(child)  # a PEFT model's experts may sit inside a LoRA wrapper
        found = _expert_count_of_container(base)
        if found is None and child_name in family.expert_names:
            found = _named_container(base, family)
        if found is not None:
            containers.append((child_name, found[0], found[1]))
    if not containers:
        return None
    counts = {n for _, n, _ in containers}
    if len(counts) != 1:
        return None
    count = counts.pop()
    blocks = any(kind == "blocks" for _, _, kind in containers)
    # router: a [rows, in] weight outside the expert containers and shared experts
    candidates = list(family.router_names) + [n for n, _ in module.named_modules() if n and n.count(".") <= 1]
    excluded = [c for c, _, _ in containers] + shared
    for name in dict.fromkeys(candidates):
        if any(name == e or name.startswith(e + ".") for e in excluded):
            continue
        sub = _resolve(module, name)
        if sub is None:
            continue
        weight = _direct_params(sub).get("weight")
        if weight is None or len(_shape(weight)) != 2:
            continue
        rows = _shape(weight)[0]
        if blocks:  # DBRX: the router fixes E, the 2-D expert tensors hold E blocks of rows
            if rows < 2 or count % rows:
                continue
            num_experts = rows
        else:
            num_experts = count
        if rows != _router_rows(num_experts, family, config):
            continue
        bias = _direct_params(sub).get("bias")
        has_bias = bias is not None and _shape(bias) == (rows,)
        return _Block(num_experts, [(c, kind) for c, _, kind in containers], name, sub, rows, has_bias, shared)
    return None


def _skip_path(path: str, family: MoEFamily) -> bool:
    patterns = tuple(family.skip_blocks) + tuple(family.extra.get("skip_blocks", ()))
    return any(re.search(p, path) for p in patterns)


def _family_of(config) -> MoEFamily:
    """The table row for ``config`` or, for multimodal wrappers, for its text sub-config."""
    family = get_family(getattr(config, "model_type", None))
    if family is DEFAULT_FAMILY and config is not None:
        for sub in _text_configs(config)[1:]:
            sub_family = get_family(getattr(sub, "model_type", None))
            if sub_family is not DEFAULT_FAMILY:
                return sub_family
    return family


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Find the MoE blocks of ``model`` in module order (see :func:`describe_moe`)."""
    config = getattr(model, "config", None)
    family = _family_of(config)
    if family.unsupported:
        raise UnsupportedMoEFamilyError(
            f"model_type={family.model_type!r} is not supported by the MoE anatomy: {family.unsupported}. "
            "See hf_moe_tuning.anatomy.families.MOE_FAMILIES."
        )
    layers: list[MoELayer] = []
    claimed: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(c + ".") for c in claimed) or _skip_path(path, family):
            continue
        block = _find_block(module, family, config)
        if block is None:
            continue
        prefix = f"{path}." if path else ""
        router_path = prefix + block.router_name
        fused: dict[str, int] = {}
        per_expert: dict[str, int] = {}
        for cname, kind in block.containers:
            container = module.get_submodule(cname)
            if kind in ("fused", "blocks"):
                # names as they are in the (possibly LoRA-wrapped) model: experts.base_layer.gate_up_proj
                wrapped_names = {id(p): n for n, p in container.named_parameters(remove_duplicate=False)}
                for param in _fused_params(_unwrap(container)).values():
                    fused[f"{prefix}{cname}.{wrapped_names[id(param)]}"] = 0
            else:
                experts = [
                    (n, c)
                    for n, c in container.named_children()
                    if not _is_norm(c) and any(True for _ in c.parameters())
                ]
                for j, (ename, expert) in enumerate(experts):
                    for pname, _ in expert.named_parameters():
                        per_expert[f"{prefix}{cname}.{ename}.{pname}"] = j
        stack = next((part for part in path.split(".") if part in ("encoder", "decoder")), None)
        scoring = next(
            (s for key in family.scoring_keys if (s := _config_str(config, key)) in ("softmax", "sigmoid")),
            family.scoring,
        )
        layers.append(
            MoELayer(
                index=len(layers),
                path=path,
                num_experts=block.num_experts,
                top_k=_top_k(module, block.router, family, config),
                router_path=router_path,
                router_weight=f"{router_path}.weight",
                router_bias=f"{router_path}.bias" if block.has_bias else None,
                fused_experts=fused,
                per_expert=per_expert,
                expert_paths=[prefix + c for c, _ in block.containers],
                shared_paths=[prefix + s for s in block.shared],
                stack=stack,
                scoring=scoring,
                capacity=family.capacity,
                router_outputs=block.router_rows,
                router_raw_logits=family.router_raw_logits,
            )
        )
        claimed.append(path)
    return layers


# --------------------------------------------------------------------------------------- classification

_HEAD = re.compile(r"(^|\.)(lm_head|score|classifier|qa_outputs|cls|proj_out|output_projection)(\.|$)")
_ATTENTION = re.compile(
    r"(^|\.)(\w*attn\w*|\w*attention\w*|mixer|mamba|ssm|linear_attn|token_mixer|conv1d|conv|"
    r"q_proj|k_proj|v_proj|o_proj|qkv_proj|query|key|value|dt_proj|x_proj|in_proj|out_proj)(\.|$)",
    re.IGNORECASE,
)
# per_layer_*: Gemma 3n/4 per-layer input embeddings and their projections and gates
_EMBED = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe|shared|embeddings?|per_layer_\w+)(\.|$)", re.IGNORECASE)
_FFN = re.compile(
    r"(^|\.)(mlp|ffn|feed_forward|DenseReluDense|\w*ffn\w*|fc1|fc2|ff|intermediate|dense|block_sparse_moe|"
    r"gate_proj|up_proj|down_proj|wi|wo|wi_0|wi_1|w1|w2|w3|moe|layer\.\d+\.mlp)(\.|$)",
    re.IGNORECASE,
)


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


_SHARED = re.compile(r"(^|\.)(shared_mlp|shared_experts?|shared_expert_gate)(\.|$)")
# residual-stream scalings and mixers (layer scales, hyper-connections) are grouped with the norms
_RESIDUAL_SCALE = re.compile(
    r"(^|\.)(\w*residual\w*|\w*hidden_states_(scale|bias)|hc_\w+|\w*hyper_connection\w*|\w*_scale|layer_scale\w*)(\.|$)"
)
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


def _layer_owning(layers: list[MoELayer], name: str) -> MoELayer | None:
    for layer in layers:
        if not layer.path or name.startswith(layer.path + "."):
            return layer
    return None


def _classify_in_block(model: nn.Module, layer: MoELayer, name: str) -> ParamGroup:
    """Group of a parameter inside an MoE block.

    Router (the whole router module and per-expert selection biases on the block), shared experts,
    routed experts and norms by position; other
    parameters of the block are part of the expert pathway (JetMoE's expert bias ``mlp.bias``, MuseSpark's
    ``pre_expert_proj``) unless they are attention, embeddings or head parameters of a block that is a
    whole decoder layer (Gemma 4).
    """
    if name.startswith(layer.router_group_path + "."):
        return ParamGroup.ROUTER
    param = model.get_parameter(name)
    if name.rsplit(".", 1)[0] == layer.path and len(_shape(param)) == 1 and _shape(param)[0] in (
        layer.num_experts,
        layer.router_outputs,
    ):
        return ParamGroup.ROUTER  # block-level per-expert selection bias (AFMoE's expert_bias)
    if any(name.startswith(s + ".") for s in layer.shared_paths):
        return ParamGroup.SHARED_EXPERTS
    if _is_norm(_owner(model, name)):
        return ParamGroup.NORMS
    if name in layer.fused_experts or name in layer.per_expert:
        return ParamGroup.EXPERTS
    if any(name.startswith(p + ".") for p in layer.expert_paths):
        return ParamGroup.EXPERTS
    plain = _classify_plain(model, name)
    if plain in (None, ParamGroup.DENSE_FFN):
        return ParamGroup.EXPERTS
    return plain


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
        layer = _layer_owning(layers, name)
        if layer is not None:
            group = _classify_in_block(model, layer, name)
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
            f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}. If they belong to the MoE blocks, add a row "
            f"MoEFamily({model_type!r}, router_names=(...), expert_names=(...), shared_names=(...)) to "
            "hf_moe_tuning.anatomy.families.MOE_FAMILIES (names relative to the MoE block); otherwise extend "
            "the name patterns in hf_moe_tuning/anatomy/groups.py, or open an issue with the model's parameter names."
        )
    return groups


def describe_moe(model: nn.Module) -> MoEAnatomy:
    """Describe ``model``: its MoE layers and the group of every parameter.

    Works for every MoE family of the installed transformers that builds tiny on CPU (checked by
    ``tests/test_anatomy_families.py``) and falls back to structural detection for unknown ones. Dense
    models report no MoE layers.

    Raises:
        UnsupportedMoEFamilyError: the family table marks the family unsupported (reason in the message).
        UnclassifiedParameterError: a parameter fits no group.
    """
    config = getattr(model, "config", None)
    layers = find_moe_layers(model)
    groups = classify_parameters(model, layers)
    numels = {n: _numel(p) for n, p in model.named_parameters()}
    model_type = getattr(config, "model_type", None)
    return MoEAnatomy(model_type=model_type, family=_family_of(config), layers=layers, groups=groups, numels=numels)


def anatomy_for(model: nn.Module, anatomy: MoEAnatomy | None = None) -> MoEAnatomy:
    """``anatomy`` if it describes ``model``, else ``describe_moe(model)``.

    Trainers compute the anatomy once and hand it to every MoE callback; a callback that later sees a
    different module tree (the model wrapped since, e.g. by PEFT or FSDP1, so the MoE layer paths no longer
    resolve) describes the model it got instead.
    """
    if anatomy is not None and anatomy.model_type == getattr(getattr(model, "config", None), "model_type", None):
        if all(
            _resolve(model, layer.path) is not None and _resolve(model, layer.router_path) is not None
            for layer in anatomy.layers
        ):
            return anatomy
    return describe_moe(model)


def require_moe(anatomy: MoEAnatomy, what: str) -> None:
    """Raise :class:`NoMoELayersError` naming ``what`` when ``anatomy`` has no MoE layers."""
    if not anatomy.is_moe:
        raise NoMoELayersError(
            f"{what} needs MoE layers, but no router was detected in model_type={anatomy.model_type!r}. "
            "If this is an MoE model, add a row for its model_type to "
            "hf_moe_tuning.anatomy.families.MOE_FAMILIES (router_names / expert_names)."
        )
