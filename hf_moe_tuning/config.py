"""``MoETrainingArguments``: every MoE knob of the package as a ``TrainingArguments`` field.

Like TRL's ``SFTConfig``, the dataclass extends :class:`transformers.TrainingArguments`, so the same
``HfArgumentParser`` reads it from the command line, a YAML/JSON file or Python.

Example:
    >>> from hf_moe_tuning import MoETrainingArguments
    >>> args = MoETrainingArguments(output_dir="out", moe_freeze_strategy="non_moe", router_aux_loss_coef=0.01)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

#: ST-MoE's five fine-tuning sets (Zoph et al. 2022, Fig. 5).
FREEZE_STRATEGIES: tuple[str, ...] = ("all", "non_moe", "moe", "attention", "ffn")
#: Coefficient schedules for the router losses.
ROUTER_LOSS_SCHEDULES: tuple[str, ...] = ("constant", "linear_warmup", "cosine", "off")
NAN_POLICIES: tuple[str, ...] = ("error", "skip")
HPARAM_PRESETS: tuple[str, ...] = ("none", "sparse", "dense")


def parse_experts(value: Any) -> Any:
    """Parse the ``moe_experts`` modifier.

    Accepts ``"all"``, a list of ints, a comma-separated string (``"0,3"``), a JSON object mapping
    MoE-layer index to a list of expert indices (``'{"0": [1, 2]}'``), a dict, or an ESFT spec
    (``"esft-gate:0.1"`` / ``"esft-token:0.2"``).
    """
    if value is None or value == "all":
        return "all"
    if isinstance(value, dict):
        return {int(k): [int(i) for i in v] for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [int(i) for i in value]
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("esft-"):
            return text
        if text.startswith("{"):
            return {int(k): [int(i) for i in v] for k, v in json.loads(text).items()}
        if text.startswith("["):
            return [int(i) for i in json.loads(text)]
        try:
            return [int(i) for i in text.split(",") if i.strip()]
        except ValueError as err:
            raise ValueError(
                f"moe_experts={value!r} is not 'all', a list of expert indices, a {{layer: [indices]}} mapping "
                "or an ESFT spec like 'esft-gate:0.1'"
            ) from err
    raise ValueError(f"moe_experts={value!r} has unsupported type {type(value).__name__}")


def _check_coef(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


@dataclass
class MoETrainingArguments(TrainingArguments):
    """Training arguments with the MoE fine-tuning knobs of hf_moe_tuning.

    Groups: freezing (``moe_freeze_strategy`` ...), router losses (``router_*``), expert-load logging
    (``moe_log_expert_load`` ...), expert-level controls (``moe_expert_dropout`` ...).
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
        metadata={"help": "Override whether routers train (default: as the strategy says)."},
    )
    moe_experts: str = field(
        default="all",
        metadata={
            "help": "Which routed experts may train: 'all', '0,3' (indices in every MoE layer), "
            "'{\"0\": [1, 2]}' (per MoE layer), or an ESFT spec 'esft-gate:0.1' / 'esft-token:0.2'."
        },
    )
    moe_extra_trainable: list[str] = field(
        default_factory=list,
        metadata={"help": "Regexes of parameter names to train in addition to the strategy."},
    )
    moe_extra_frozen: list[str] = field(
        default_factory=list,
        metadata={"help": "Regexes of parameter names to freeze in addition to the strategy."},
    )
    moe_esft_num_samples: int = field(
        default=256,
        metadata={"help": "Training examples scored to choose ESFT experts (with moe_experts='esft-...')."},
    )
    # ------------------------------------------------------------------ router losses
    router_aux_loss_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the load-balancing (aux) loss; ST-MoE used 0.01. 0 disables it."},
    )
    router_z_loss_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the router z-loss; ST-MoE used 0.001. 0 disables it."},
    )
    router_aux_loss_schedule: str = field(
        default="constant",
        metadata={"help": "Schedule of the aux coefficient.", "choices": list(ROUTER_LOSS_SCHEDULES)},
    )
    router_z_loss_schedule: str = field(
        default="constant",
        metadata={"help": "Schedule of the z-loss coefficient.", "choices": list(ROUTER_LOSS_SCHEDULES)},
    )
    router_loss_warmup_steps: int = field(
        default=0,
        metadata={"help": "Steps of linear warmup for 'linear_warmup' schedules (and before cosine decay)."},
    )
    router_nan_policy: str = field(
        default="error",
        metadata={
            "help": "On non-finite router logits or losses: 'error' stops naming layer and step; 'skip' skips "
            "the step and counts it.",
            "choices": list(NAN_POLICIES),
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
            "help": "'sparse' or 'dense' hyperparameter preset from ST-MoE (lr, batch size, dropout); 'none' keeps "
            "the arguments as given.",
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
        _check_choice("moe_freeze_strategy", self.moe_freeze_strategy, FREEZE_STRATEGIES)
        self.moe_experts = parse_experts(self.moe_experts)
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "moe_bias_update_rate"):
            _check_coef(name, getattr(self, name))
        _check_choice("router_aux_loss_schedule", self.router_aux_loss_schedule, ROUTER_LOSS_SCHEDULES)
        _check_choice("router_z_loss_schedule", self.router_z_loss_schedule, ROUTER_LOSS_SCHEDULES)
        _check_choice("router_nan_policy", self.router_nan_policy, NAN_POLICIES)
        _check_choice("moe_hparam_preset", self.moe_hparam_preset, HPARAM_PRESETS)
        if self.router_loss_warmup_steps < 0:
            raise ValueError(f"router_loss_warmup_steps must be >= 0, got {self.router_loss_warmup_steps}")
        if not 0.0 <= self.moe_expert_dropout < 1.0:
            raise ValueError(f"moe_expert_dropout must be in [0, 1), got {self.moe_expert_dropout}")
        for name in ("moe_capacity_factor_train", "moe_capacity_factor_eval"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.moe_drift_every_steps < 1:
            raise ValueError(f"moe_drift_every_steps must be >= 1, got {self.moe_drift_every_steps}")
        if self.moe_drift_probe_size < 0:
            raise ValueError(f"moe_drift_probe_size must be >= 0, got {self.moe_drift_probe_size}")
        super().__post_init__()
