"""Recipe YAML of the decoder-only instruction-tuning study (``study: instruct_moe``).

The schema is the Flan-MoE study's (``data``, ``models``, ``pretrain``, ``instruct``, ``finetune``,
``evaluate``, ``arms``, ``deltas``; see :mod:`hf_moe_tuning.study.config`, which validates those keys),
plus one section for the decoder-only SFT path::

    sft:
      chat_template: auto          # auto | model | byte | chatml (hf_moe_tuning.instruct.chat)
      system: null                 # optional system message for every prompt
      max_length: 256              # and any other TRL SFTConfig-only field (packing, loss_type, ...)
      accelerate_config: recipes/instruct_moe/accelerate_fsdp.yaml   # checked to exist and parse
      lora:                        # optional: PEFT LoRA instead of full fine-tuning
        r: 16
        lora_alpha: 32
        target_modules: [q_proj, k_proj, v_proj, o_proj]     # attention, every model
        dense_target_modules: [gate_proj, up_proj, down_proj] # MLPs of dense models
        expert_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]  # fused experts of MoE models

Stage ``args`` may name ``SFTConfig`` fields as well as :class:`~hf_moe_tuning.MoETrainingArguments`
fields; the MoE ones configure the callbacks (:mod:`hf_moe_tuning.instruct.sft`).
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from ..models import HUB_IDS, TINY_MODELS
from ..study.config import (
    KINDS,
    ConfigError,
    StudyConfig,
    parse_study_config,
    read_recipe_yaml,
)
from .chat import CHAT_TEMPLATE_MODES

STUDY = "instruct_moe"
#: Keys of the ``sft`` section that are not ``SFTConfig`` fields.
_OWN_SFT_KEYS = {"chat_template", "system", "lora", "accelerate_config"}
_LORA_KEYS = {
    "r", "lora_alpha", "lora_dropout", "bias", "target_modules", "dense_target_modules", "expert_parameters",
    "modules_to_save", "use_rslora",
}
#: ``SFTConfig`` fields the pipeline sets itself.
_MANAGED_SFT = {"output_dir", "seed", "data_seed", "report_to", "router_aux_loss_coef", "chat_template_path"}
_ACCELERATE_TYPES = {"NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED"}
#: Embedded stand-ins of the real models, used to check LoRA targets offline (same module names).
TINY_COUNTERPARTS: dict[str, str] = {
    **{hub: name for name, hub in HUB_IDS.items() if name in TINY_MODELS},
    "allenai/OLMo-1B-0724-hf": "olmo",
    "mistralai/Mistral-7B-v0.1": "mistral",
    "Qwen/Qwen1.5-1.8B": "qwen2",
}


@dataclass
class InstructStudyConfig(StudyConfig):
    """A validated ``instruct_moe`` recipe: :class:`StudyConfig` plus the ``sft`` section."""

    sft: dict[str, Any] = field(default_factory=dict)

    @property
    def chat_template(self) -> str:
        return self.sft.get("chat_template", "auto")

    @property
    def system(self) -> str | None:
        return self.sft.get("system")

    @property
    def lora(self) -> dict[str, Any] | None:
        return self.sft.get("lora")

    def sft_options(self) -> dict[str, Any]:
        """The ``SFTConfig`` fields of the ``sft`` section."""
        return {k: v for k, v in self.sft.items() if k not in _OWN_SFT_KEYS}


def _sft_only_fields() -> frozenset[str]:
    from trl import SFTConfig  # noqa: PLC0415

    return frozenset(f.name for f in dataclasses.fields(SFTConfig)) - frozenset(
        f.name for f in dataclasses.fields(TrainingArguments)
    )


def _check_sft(raw: Any, path: Any, base_dir: Path) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(path, "sft", f"expected a mapping, got {type(raw).__name__}")
    allowed = _sft_only_fields() | _OWN_SFT_KEYS
    for key, value in raw.items():
        where = f"sft.{key}"
        if key in _MANAGED_SFT:
            hint = " (router losses go in args: moe_aux_loss_coef / moe_z_loss_coef)" if "router" in key else ""
            raise ConfigError(path, where, f"is set by the pipeline and cannot be given in a recipe{hint}")
        if key not in allowed:
            raise ConfigError(path, where, f"unknown key: not an SFTConfig-only field nor one of {sorted(_OWN_SFT_KEYS)}")
    mode = raw.get("chat_template", "auto")
    if mode not in CHAT_TEMPLATE_MODES:
        raise ConfigError(path, "sft.chat_template", f"unknown mode {mode!r}; use one of {list(CHAT_TEMPLATE_MODES)}")
    if raw.get("lora") is not None:
        _check_lora(raw["lora"], path)
    if raw.get("accelerate_config") is not None:
        _check_accelerate(raw["accelerate_config"], path, base_dir)
    return dict(raw)


def _check_lora(lora: Any, path: Any) -> None:
    if not isinstance(lora, dict):
        raise ConfigError(path, "sft.lora", f"expected a mapping, got {type(lora).__name__}")
    for key in lora:
        if key not in _LORA_KEYS:
            raise ConfigError(path, f"sft.lora.{key}", f"unknown key; allowed: {sorted(_LORA_KEYS)}")
    if not lora.get("target_modules"):
        raise ConfigError(path, "sft.lora.target_modules", "missing: LoRA needs attention target modules")
    for key in ("target_modules", "dense_target_modules", "expert_parameters"):
        value = lora.get(key, [])
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ConfigError(path, f"sft.lora.{key}", f"expected a list of names, got {value!r}")
    try:
        lora_config(lora, sparse=True)
    except (TypeError, ValueError) as err:
        raise ConfigError(path, "sft.lora", f"invalid LoRA settings: {err}") from None


def _check_accelerate(value: Any, path: Any, base_dir: Path) -> None:
    candidates = [Path(value), base_dir / value]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise ConfigError(path, "sft.accelerate_config", f"no such file {value!r}")
    try:
        cfg = yaml.safe_load(found.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(path, "sft.accelerate_config", f"{found}: not valid YAML: {err}") from None
    kind = cfg.get("distributed_type")
    if kind not in _ACCELERATE_TYPES:
        raise ConfigError(path, "sft.accelerate_config", f"{found}: distributed_type {kind!r} not one of {sorted(_ACCELERATE_TYPES)}")


def lora_config(lora: dict[str, Any], sparse: bool):
    """A ``peft.LoraConfig`` from the recipe's ``sft.lora`` for a sparse (MoE) or dense model.

    Attention modules are targeted in every model; MLP modules (``dense_target_modules``) in dense
    models; the fused expert tensors (``expert_parameters``, through PEFT's ``target_parameters``) in MoE models.
    """
    from peft import LoraConfig  # noqa: PLC0415

    kwargs = {k: v for k, v in lora.items() if k not in ("target_modules", "dense_target_modules", "expert_parameters")}
    modules = list(lora["target_modules"]) + ([] if sparse else list(lora.get("dense_target_modules", [])))
    params = list(lora.get("expert_parameters", [])) if sparse else []
    return LoraConfig(task_type="CAUSAL_LM", target_modules=modules, target_parameters=params or None, **kwargs)


def parse_instruct_config(raw: dict[str, Any], path: str | Path | None = None) -> InstructStudyConfig:
    """Validate an ``instruct_moe`` recipe mapping (common keys by :func:`parse_study_config`)."""
    if not isinstance(raw, dict):
        raise ConfigError(path, "<root>", f"expected a mapping, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    if raw.get("study") != STUDY:
        raise ConfigError(path, "study", f"this loader reads '{STUDY}' recipes, got {raw.get('study')!r}")
    sft = _check_sft(raw.pop("sft", None), path, Path(path).parent if path else Path("."))
    # The shared validator knows the encoder-decoder studies; the schema is identical, so validate it
    # under that name and restore ours (``study`` is the only study-dependent key).
    common = parse_study_config({**raw, "study": "flan_moe"}, path)
    fields = {f.name: getattr(common, f.name) for f in dataclasses.fields(StudyConfig)}
    fields.update(study=STUDY, raw={**raw, "sft": sft}, output_dir=str(raw.get("output_dir", f"results/{STUDY}")))
    config = InstructStudyConfig(**fields, sft=sft)
    for name, spec in config.models.items():
        if spec.is_tiny and TINY_MODELS[spec.init[5:]][0] in ("t5", "switch_transformers"):
            raise ConfigError(path, f"models.{name}.init", "the decoder-only study needs decoder models (llama, mixtral, ...)")
    return config


def load_instruct_config(path: str | Path, overrides: dict[str, Any] | None = None) -> InstructStudyConfig:
    """Read, override (dotted keys) and validate an ``instruct_moe`` recipe YAML file."""
    return parse_instruct_config(read_recipe_yaml(path, overrides), Path(path))


def validate_instruct_config(config: InstructStudyConfig, check_lora_targets: bool = True) -> list[str]:
    """Offline checks beyond the schema; returns what was checked (raises :class:`ConfigError`).

    * every stage / arm ``args`` builds a ``MoESFTConfig`` (values valid);
    * with LoRA, the targets resolve on the tiny stand-in of each Hub model (same module names):
      attention plus experts for MoE models, attention plus MLP for dense ones.
    """
    from .sft import sft_config  # noqa: PLC0415

    checked: list[str] = []
    import torch  # noqa: PLC0415

    mixed = False
    with tempfile.TemporaryDirectory() as tmp:
        for arm in config.arms.values():
            model = config.models[arm.model]
            for kind in [model.kind] if model.kind else list(KINDS):
                combos = [(f"arms.{arm.name}", {**config.finetune.args_for(kind), **model.args, **arm.args})]
                for stage_name in ("pretrain", "instruct"):
                    stage = getattr(config, stage_name)
                    if stage.enabled:
                        combos.append((stage_name, {**stage.args_for(kind), **model.args}))
                for where, args in combos:
                    if args.get("bf16") and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
                        args = {**args, "bf16": False}  # TrainingArguments rejects bf16 without a capable device
                        mixed = True
                    try:
                        sft_config(args, tmp, sft_options=config.sft_options())
                    except (ValueError, TypeError) as err:
                        raise ConfigError(config.path, where, f"invalid training arguments: {err}") from None
        checked.append("training arguments of every stage and arm" + (" (bf16 not checked: no bf16 device here)" if mixed else ""))
        if config.lora and check_lora_targets:
            checked += _check_lora_targets(config)
    return checked


def _check_lora_targets(config: InstructStudyConfig) -> list[str]:
    from peft import get_peft_model  # noqa: PLC0415

    from ..anatomy import describe_moe  # noqa: PLC0415
    from ..models import build_from_config, build_tiny_model, tiny_config  # noqa: PLC0415

    checked = []
    for name, spec in config.models.items():
        tiny = spec.init[5:] if spec.is_tiny else TINY_COUNTERPARTS.get(spec.init)
        if tiny is None:
            checked.append(f"models.{name}: no tiny stand-in for {spec.init}, LoRA targets not checked")
            continue
        model = build_tiny_model(tiny) if tiny in TINY_MODELS else build_from_config(tiny_config(tiny))
        sparse = describe_moe(model).is_moe
        try:
            peft_model = get_peft_model(model, lora_config(config.lora, sparse=sparse))
        except ValueError as err:
            raise ConfigError(config.path, "sft.lora", f"targets do not resolve on {spec.init} ({tiny} stand-in): {err}") from None
        trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        need = {"attention": ("self_attn",), **({"experts": ("experts",)} if sparse else {"MLP": ("mlp",)})}
        for what, markers in need.items():
            if not any(any(m in n for m in markers) for n in trained):
                raise ConfigError(config.path, "sft.lora", f"no LoRA adapter on the {what} of {spec.init} ({tiny} stand-in)")
        checked.append(f"models.{name}: LoRA on attention and {'experts' if sparse else 'MLP'} ({len(trained)} adapter tensors on the {tiny} stand-in)")
    return checked


__all__ = [
    "STUDY",
    "InstructStudyConfig",
    "load_instruct_config",
    "lora_config",
    "parse_instruct_config",
    "validate_instruct_config",
]
