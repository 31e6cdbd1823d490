"""``MoEArguments``: every MoE option of the package, declared once, with one validator.

A plain dataclass, composed into the configs of the two trainers (each field keeps its
``metadata={"help": ...}``, so ``HfArgumentParser`` reads the composed configs from the command line,
YAML/JSON or Python):

* :class:`hf_moe_tuning.MoETrainingArguments` = ``TrainingArguments`` + ``MoEArguments`` (``MoETrainer``);
* :class:`hf_moe_tuning.sft.MoESFTConfig` = TRL's ``SFTConfig`` + ``MoEArguments`` (``MoESFTTrainer``).

Every option starts with ``moe_``, so none can collide with a transformers or TRL field (TRL's
``SFTConfig.router_aux_loss_coef`` weights the model's *own* aux loss; ours is ``moe_aux_loss_coef``).

Example:
    >>> from hf_moe_tuning import MoETrainingArguments
    >>> args = MoETrainingArguments(output_dir="out", moe_freeze_strategy="non_moe", moe_aux_loss_coef=0.01)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

#: ST-MoE's five fine-tuning sets (Zoph et al. 2022, Fig. 5).
FREEZE_STRATEGIES: tuple[str, ...] = ("all", "non_moe", "moe", "attention", "ffn")
#: Coefficient schedules for the router losses.
ROUTER_LOSS_SCHEDULES: tuple[str, ...] = ("constant", "linear_warmup", "cosine", "off")
#: What to do on a non-finite router logit or training loss.
NAN_POLICIES: tuple[str, ...] = ("error", "skip")
#: ST-MoE hyperparameter presets (:mod:`hf_moe_tuning.presets`).
HPARAM_PRESETS: tuple[str, ...] = ("none", "sparse", "dense")

#: Options that choose which parameters train (the freezing callback is built when any is set).
FREEZING_OPTIONS: tuple[str, ...] = (
    "moe_freeze_strategy", "moe_train_router", "moe_experts", "moe_extra_trainable", "moe_extra_frozen",
)
#: Options that need MoE layers: set away from its default on a model without MoE layers, each raises.
#: (``moe_freeze_strategy="moe"``/``"non_moe"`` are refused by the freezing plan with their own message;
#: ``"attention"`` and ``"ffn"`` work on dense models.)
MOE_LAYER_OPTIONS: tuple[str, ...] = (
    "moe_aux_loss_coef", "moe_z_loss_coef", "moe_train_router", "moe_experts", "moe_expert_dropout",
    "moe_capacity_factor_train", "moe_capacity_factor_eval", "moe_router_jitter", "moe_bias_balancing",
)


def parse_experts(value: Any) -> Any:
    """Parse the ``moe_experts`` option.

    Accepts ``"all"``, a list of ints, a comma-separated string (``"0,3"``), a JSON object mapping
    MoE-layer index to a list of expert indices (``'{"0": [1, 2]}'``), a dict, or an ESFT spec
    (``"esft-gate:0.1"`` / ``"esft-token:0.2"``).

    Raises:
        ValueError: an unsupported value, or an empty selection (``""``, ``[]``, ``{}``), which would train
            no expert at all (freeze the experts with ``moe_freeze_strategy`` instead).
    """
    if value is None or value == "all":
        return "all"
    empty = ValueError(
        f"moe_experts={value!r} selects no expert; use 'all', a list of expert indices, a {{layer: [indices]}} "
        "mapping or an ESFT spec (to train no expert at all, choose a moe_freeze_strategy that freezes them)"
    )
    if isinstance(value, dict):
        parsed = {_expert_index(k, value): [_expert_index(i, value) for i in _index_list(v, value)] for k, v in value.items()}
        if not parsed:
            raise empty
        return parsed
    if isinstance(value, (list, tuple)):
        if not value:
            raise empty
        return [_expert_index(i, value) for i in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise empty
        if text.startswith("esft-"):
            return text
        if text.startswith(("{", "[")):
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"moe_experts={value!r} is not valid JSON: {err}") from None
            return parse_experts(loaded)
        try:
            parsed = [int(i) for i in text.split(",") if i.strip()]
        except ValueError as err:
            raise ValueError(
                f"moe_experts={value!r} is not 'all', a list of expert indices, a {{layer: [indices]}} mapping "
                "or an ESFT spec like 'esft-gate:0.1'"
            ) from err
        if not parsed:
            raise empty
        return parsed
    raise ValueError(f"moe_experts={value!r} has unsupported type {type(value).__name__}")


def _expert_index(item: Any, whole: Any) -> int:
    try:
        index = None if isinstance(item, bool) else int(item)
    except (TypeError, ValueError):
        index = None
    if index is None:
        raise ValueError(f"moe_experts={whole!r}: {item!r} is not an expert or layer index")
    return index


def _index_list(value: Any, whole: Any) -> list:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"moe_experts={whole!r}: each MoE layer needs a list of expert indices, got {value!r}")


# ------------------------------------------------------------------------------------------ type checks
def _describe(hint: Any) -> str:
    members = typing.get_args(hint) if _is_union(hint) else (hint,)
    names = []
    for member in members:
        if member is type(None):
            names.append("None")
        elif typing.get_origin(member) in (list, tuple):
            names.append("a list")
        elif typing.get_origin(member) is dict or member is dict:
            names.append("a mapping")
        elif isinstance(member, type):
            names.append({bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(member, member.__name__))
        else:
            names.append(str(member))
    return " or ".join(dict.fromkeys(names))


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(hint)
        return not args or args[0] is not str or all(isinstance(v, str) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, (hint, str))
    return True  # a type this check does not know (e.g. a config object): left to the dataclass itself


def check_field_type(name: str, value: Any, hint: Any, *, coerce_strings: bool = False) -> Any:
    """Return ``value`` if it fits the type hint ``hint`` of field ``name``, else raise ``ValueError`` naming it.

    Booleans are never taken for numbers. With ``coerce_strings`` (recipe files: YAML 1.1 reads ``1e-3``
    as a string), a numeric string given for an ``int`` / ``float`` field is converted (``"1e-3"`` ->
    ``0.001``, ``"100"`` -> ``100``); any other string still raises.
    """
    members = typing.get_args(hint) if _is_union(hint) else (hint,)
    if any(_matches(value, member) for member in members):
        return value
    if coerce_strings and isinstance(value, str):
        text = value.strip()
        for member in members:
            try:
                if member is int:
                    number = float(text)
                    if number.is_integer() and math.isfinite(number):
                        return int(number)
                elif member is float:
                    number = float(text)
                    if math.isfinite(number):
                        return number
            except ValueError:
                continue
    raise ValueError(f"{name} must be {_describe(hint)}, got {value!r} ({type(value).__name__})")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type hint of every field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _pattern_list(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]  # one pattern, not one per character
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name} must be a regex string or a list of regex strings, got {value!r}")


def _check_range(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = True) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be in [{low:g}, {high:g}), got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


@dataclass
class MoEArguments:
    """The MoE fine-tuning options of hf_moe_tuning (composed into ``MoETrainingArguments`` and ``MoESFTConfig``).

    Groups: freezing (``moe_freeze_strategy`` ...), router losses (``moe_aux_loss_coef`` ...), expert-load
    logging (``moe_log_expert_load`` ...), expert-level controls (``moe_expert_dropout`` ...). Validated by
    :meth:`validate_moe_arguments` when built (types included: ``"0.1"`` for a number raises, naming the field).
    """

    # ------------------------------------------------------------------ freezing
    moe_freeze_strategy: str = field(
        default="all",
        metadata={
            "help": "Which parameters train (ST-MoE's fine-tuning sets): 'all', 'non_moe' (all but routers and "
            "routed experts), 'moe' (routers and routed experts only), 'attention' (attention only), 'ffn' "
            "(dense FFNs of non-MoE layers only).",
            "choices": list(FREEZE_STRATEGIES),
        },
    )
    moe_train_router: bool | None = field(
        default=None,
        metadata={"help": "Override whether routers train (True/False; default: as the strategy says)."},
    )
    moe_experts: str = field(
        default="all",
        metadata={
            "help": "Which routed experts may train: 'all', '0,3' (indices in every MoE layer), "
            "'{\"0\": [1, 2]}' (per MoE layer), or an ESFT spec 'esft-gate:0.1' / 'esft-token:0.2'. "
            "In Python also a list of ints or a dict. An empty selection raises."
        },
    )
    moe_extra_trainable: list[str] = field(
        default_factory=list,
        metadata={"help": "Regexes of parameter names to train in addition to the strategy (one string = one regex)."},
    )
    moe_extra_frozen: list[str] = field(
        default_factory=list,
        metadata={"help": "Regexes of parameter names to freeze in addition to the strategy (one string = one regex)."},
    )
    moe_esft_num_samples: int = field(
        default=256,
        metadata={"help": "Training examples scored to choose ESFT experts (with moe_experts='esft-...')."},
    )
    # ------------------------------------------------------------------ router losses
    moe_aux_loss_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of this package's load-balancing (aux) loss: the mean over MoE layers and sequences, "
            "padding masked (ST-MoE used 0.01). 0 disables it. While on, the model's own aux loss (and TRL's "
            "router_aux_loss_coef) is off. Not the model config's router_aux_loss_coef."
        },
    )
    moe_z_loss_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the router z-loss (mean over MoE layers and sequences); ST-MoE used 0.001. 0 disables it."},
    )
    moe_aux_loss_schedule: str = field(
        default="constant",
        metadata={"help": "Schedule of the aux coefficient.", "choices": list(ROUTER_LOSS_SCHEDULES)},
    )
    moe_z_loss_schedule: str = field(
        default="constant",
        metadata={"help": "Schedule of the z-loss coefficient.", "choices": list(ROUTER_LOSS_SCHEDULES)},
    )
    moe_router_loss_warmup_steps: int = field(
        default=0,
        metadata={"help": "Steps of linear warmup for 'linear_warmup' schedules (and before cosine decay)."},
    )
    moe_nan_policy: str = field(
        default="error",
        metadata={
            "help": "On non-finite router logits, router losses or training loss: 'error' stops naming layer and "
            "step; 'skip' skips the step and counts it.",
            "choices": list(NAN_POLICIES),
        },
    )
    moe_nan_max_consecutive_skips: int = field(
        default=3,
        metadata={
            "help": "With moe_nan_policy='skip': stop (raise) at this many consecutive skipped optimizer steps."
        },
    )
    moe_nan_max_skip_fraction: float = field(
        default=0.1,
        metadata={
            "help": "With moe_nan_policy='skip': stop (raise) once more than this fraction of the optimizer steps so "
            "far were skipped, counted over at least 1/fraction steps (so one early skip is allowed). 1.0: no limit."
        },
    )
    # ------------------------------------------------------------------ expert-load logging
    moe_log_expert_load: bool = field(
        default=True, metadata={"help": "Log per-layer routing statistics (moe/* keys) for MoE models."}
    )
    moe_expert_load_jsonl: bool = field(
        default=True, metadata={"help": "Write per-layer, per-expert token counts to output_dir/expert_load.jsonl."}
    )
    moe_expert_load_heatmap: bool = field(
        default=True, metadata={"help": "Save a layer x expert load heatmap PNG at train end and each evaluation."}
    )
    moe_drift_probe_size: int = field(
        default=8,
        metadata={
            "help": "Examples in the fixed probe batch used for routing drift against the start model (0: no drift). "
            "The same tokens are routed at start and later, so a small probe measures drift without sampling noise."
        },
    )
    moe_drift_every_steps: int = field(
        default=50,
        metadata={"help": "Measure routing drift at the first log at or after every N optimizer steps."},
    )
    # ------------------------------------------------------------------ expert-level controls
    moe_expert_dropout: float = field(
        default=0.0, metadata={"help": "Dropout inside experts only (Switch used 0.4 for fine-tuning)."}
    )
    moe_capacity_factor_train: float | None = field(
        default=None, metadata={"help": "Expert capacity factor while training (Switch/NLLB-MoE; ST-MoE: 1.25)."}
    )
    moe_capacity_factor_eval: float | None = field(
        default=None, metadata={"help": "Expert capacity factor at evaluation (ST-MoE: 2.0)."}
    )
    moe_router_jitter: float | None = field(
        default=None, metadata={"help": "Multiplicative router input jitter where the family supports it."}
    )
    moe_bias_balancing: bool = field(
        default=False,
        metadata={"help": "Aux-loss-free balancing: update a per-expert routing bias from the load every step."},
    )
    moe_bias_update_rate: float = field(
        default=1e-3, metadata={"help": "Rate gamma of the sign-based bias update (DeepSeek-V3)."}
    )
    moe_hparam_preset: str = field(
        default="none",
        metadata={
            "help": "'sparse' or 'dense' hyperparameter preset from ST-MoE (lr, expert dropout, dropout); 'none' "
            "keeps the arguments as given. A value set explicitly (learning_rate, moe_expert_dropout) wins over "
            "the preset's.",
            "choices": list(HPARAM_PRESETS),
        },
    )
    # ------------------------------------------------------------------ checkpoints and cards
    moe_fix_fused_resume: bool = field(
        default=True,
        metadata={"help": "Convert per-expert checkpoints back to fused expert tensors when resuming."},
    )
    moe_model_card: bool = field(
        default=True, metadata={"help": "Add the MoE tuning section to the model card on save/push."}
    )

    def __post_init__(self) -> None:
        self.validate_moe_arguments()
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # TrainingArguments / SFTConfig in the composed configs
            parent()

    def validate_moe_arguments(self) -> None:
        """Check (and normalise) every MoE option; raises ``ValueError`` naming the field.

        Types first, for every field (``bool`` only for flags, numbers for numeric options, no strings where a
        number belongs); then the special forms (``moe_experts`` parsed, one regex string becomes a list of one)
        and the ranges and choices.
        """
        self.moe_experts = parse_experts(self.moe_experts)
        self.moe_extra_trainable = _pattern_list("moe_extra_trainable", self.moe_extra_trainable)
        self.moe_extra_frozen = _pattern_list("moe_extra_frozen", self.moe_extra_frozen)
        special = {"moe_experts", "moe_extra_trainable", "moe_extra_frozen"}
        for name, hint in field_types(MoEArguments).items():
            if name not in special:
                value = check_field_type(name, getattr(self, name), hint)
                if hint in (float, float | None) and isinstance(value, int):
                    setattr(self, name, float(value))
        _check_choice("moe_freeze_strategy", self.moe_freeze_strategy, FREEZE_STRATEGIES)
        _check_choice("moe_aux_loss_schedule", self.moe_aux_loss_schedule, ROUTER_LOSS_SCHEDULES)
        _check_choice("moe_z_loss_schedule", self.moe_z_loss_schedule, ROUTER_LOSS_SCHEDULES)
        _check_choice("moe_nan_policy", self.moe_nan_policy, NAN_POLICIES)
        _check_range("moe_nan_max_consecutive_skips", self.moe_nan_max_consecutive_skips, low=1)
        if not 0.0 < self.moe_nan_max_skip_fraction <= 1.0:
            raise ValueError(f"moe_nan_max_skip_fraction must be in (0, 1], got {self.moe_nan_max_skip_fraction!r}")
        _check_choice("moe_hparam_preset", self.moe_hparam_preset, HPARAM_PRESETS)
        for name in ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_bias_update_rate"):
            _check_range(name, getattr(self, name), low=0.0)
        _check_range("moe_expert_dropout", self.moe_expert_dropout, low=0.0, high=1.0)
        _check_range("moe_router_jitter", self.moe_router_jitter, low=0.0, high=1.0)
        for name in ("moe_capacity_factor_train", "moe_capacity_factor_eval"):
            _check_range(name, getattr(self, name), low=0.0, low_open=True)
        _check_range("moe_router_loss_warmup_steps", self.moe_router_loss_warmup_steps, low=0)
        _check_range("moe_drift_probe_size", self.moe_drift_probe_size, low=0)
        _check_range("moe_drift_every_steps", self.moe_drift_every_steps, low=1)
        _check_range("moe_esft_num_samples", self.moe_esft_num_samples, low=1)

    # ------------------------------------------------------------------ which options are set
    def _set(self, names: tuple[str, ...]) -> list[str]:
        defaults = {f.name: f for f in dataclasses.fields(MoEArguments)}
        set_names = []
        for name in names:
            spec = defaults[name]
            default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
            if getattr(self, name) != default:
                set_names.append(name)
        return set_names

    def freezing_options_set(self) -> list[str]:
        """The options of :data:`FREEZING_OPTIONS` set away from their defaults."""
        return self._set(FREEZING_OPTIONS)

    def moe_layer_options_set(self) -> list[str]:
        """The options of :data:`MOE_LAYER_OPTIONS` set away from their defaults (they need MoE layers)."""
        return self._set(MOE_LAYER_OPTIONS)

    @property
    def router_loss_on(self) -> bool:
        """Whether this package's router loss is on (a coefficient > 0 whose schedule is not ``"off"``)."""
        return (self.moe_aux_loss_coef > 0 and self.moe_aux_loss_schedule != "off") or (
            self.moe_z_loss_coef > 0 and self.moe_z_loss_schedule != "off"
        )


#: Names of the :class:`MoEArguments` fields.
MOE_ARGUMENT_NAMES: frozenset[str] = frozenset(f.name for f in dataclasses.fields(MoEArguments))

__all__ = [
    "FREEZE_STRATEGIES",
    "FREEZING_OPTIONS",
    "HPARAM_PRESETS",
    "MOE_ARGUMENT_NAMES",
    "MOE_LAYER_OPTIONS",
    "NAN_POLICIES",
    "ROUTER_LOSS_SCHEDULES",
    "MoEArguments",
    "check_field_type",
    "field_types",
    "parse_experts",
]
