"""hf_moe_tuning: fine-tune Mixture-of-Experts models with Hugging Face ``Trainer``.

Public API (re-exports only):

* anatomy: :func:`describe_moe`, :func:`classify_parameters`, :class:`ParamGroup`
* freezing: :func:`apply_freezing`, :func:`plan_freezing`, :class:`MoEFreezingCallback`
* training: :class:`MoEArguments`, :class:`MoETrainingArguments`, :class:`MoETrainer`, :func:`enable_moe_logging`;
  with TRL installed (the ``[trl]`` extra) :class:`MoESFTConfig`, :class:`MoESFTTrainer` (imported on first use,
  so ``import hf_moe_tuning`` never imports TRL)
* tiny models: :func:`build_tiny_model`
"""

from .anatomy import MoEAnatomy, MoELayer, ParamGroup, classify_parameters, describe_moe
from .adapters import AdapterReport, AdapterTargetError, apply_lora, plan_lora
from .callbacks.expert_load import ExpertLoadCallback
from .callbacks.freezing import MoEFreezingCallback
from .callbacks.router_loss import RouterLossCallback
from .cards import MoECardMixin, build_model_card, push_run, write_run_info
from .callbacks.nan_guard import NaNGuardCallback
from .callbacks.resume import FusedResumeCallback
from .checkpoint import CheckpointLoadError, FusedResumeMixin, load_checkpoint_exact
from .configuration import MoEArguments
from .distributed import configure_distributed
from .freezing import FreezingError, FreezePlan, FreezeReport, apply_freezing, plan_freezing
from .models import build_tiny_model
from .presets import apply_hparam_preset
from .routing.esft import score_experts, select_experts
from .routing.upcycling import upcycle_t5
from .trainer import MoETrainer, MoETrainingArguments, build_moe_callbacks, enable_moe_logging

__version__ = "0.1.0"

#: Names loaded on first access from :mod:`hf_moe_tuning.sft` (needs TRL; not in ``__all__``, so that
#: ``from hf_moe_tuning import *`` does not import TRL either).
_SFT_NAMES = ("MoESFTConfig", "MoESFTTrainer")


def __getattr__(name: str):
    if name in _SFT_NAMES:
        from . import sft  # noqa: PLC0415 - TRL is an optional extra: import it only when asked for

        return getattr(sft, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "apply_hparam_preset",
    "score_experts",
    "select_experts",
    "upcycle_t5",
    "CheckpointLoadError",
    "FusedResumeCallback",
    "FusedResumeMixin",
    "NaNGuardCallback",
    "configure_distributed",
    "load_checkpoint_exact",
    "AdapterReport",
    "AdapterTargetError",
    "MoECardMixin",
    "apply_lora",
    "build_model_card",
    "plan_lora",
    "push_run",
    "write_run_info",
    "ExpertLoadCallback",
    "FreezePlan",
    "FreezeReport",
    "FreezingError",
    "MoEAnatomy",
    "MoEFreezingCallback",
    "MoEArguments",
    "MoELayer",
    "MoETrainer",
    "MoETrainingArguments",
    "ParamGroup",
    "RouterLossCallback",
    "apply_freezing",
    "build_moe_callbacks",
    "build_tiny_model",
    "classify_parameters",
    "describe_moe",
    "enable_moe_logging",
    "plan_freezing",
]
