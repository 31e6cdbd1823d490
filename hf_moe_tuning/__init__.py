"""hf_moe_tuning: fine-tune Mixture-of-Experts models with Hugging Face ``Trainer``.

The public API (the README's API table lists the same names):

* configs and trainers: :class:`MoEArguments` (every MoE option, one validator), :class:`MoETrainingArguments`,
  :class:`MoETrainer`; with TRL installed (the ``[trl]`` extra) ``MoESFTConfig`` and ``MoESFTTrainer``, imported on
  first use so that ``import hf_moe_tuning`` never imports TRL;
* callbacks for a plain ``Trainer`` / ``SFTTrainer``: :class:`MoEFreezingCallback`, :class:`RouterLossCallback`,
  :class:`ExpertLoadCallback`, :class:`ExpertDropoutCallback`, :class:`CapacityFactorCallback`,
  :class:`RouterJitterCallback`, :class:`BiasBalancingCallback`, and :func:`enable_moe_logging` to merge their
  metrics into ``Trainer.log``;
* what is where and what trains: :func:`describe_moe`, :func:`apply_freezing`, :func:`apply_lora`;
* the Hub: :func:`write_model_card`, :func:`push_run`.

Everything else lives in its module (``hf_moe_tuning.anatomy``, ``.freezing``, ``.models``, ``.hub`` ...).
"""

from .adapters import apply_lora
from .anatomy import describe_moe
from .callbacks.bias_balancing import BiasBalancingCallback
from .callbacks.capacity import CapacityFactorCallback
from .callbacks.expert_dropout import ExpertDropoutCallback
from .callbacks.expert_load import ExpertLoadCallback
from .callbacks.freezing import MoEFreezingCallback
from .callbacks.router_jitter import RouterJitterCallback
from .callbacks.router_loss import RouterLossCallback
from .configuration import MoEArguments
from .freezing import apply_freezing
from .hub.card import write_model_card
from .hub.push import push_run
from .trainer import MoETrainer, MoETrainingArguments, enable_moe_logging

__version__ = "0.1.0"

#: Names loaded on first access from :mod:`hf_moe_tuning.sft` (needs TRL; not in ``__all__``, so that
#: ``from hf_moe_tuning import *`` does not import TRL either).
_SFT_NAMES = ("MoESFTConfig", "MoESFTTrainer")


def __getattr__(name: str):
    if name in _SFT_NAMES:
        from . import sft

        return getattr(sft, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    # configs and trainers
    "MoEArguments",
    "MoETrainingArguments",
    "MoETrainer",
    # callbacks
    "MoEFreezingCallback",
    "RouterLossCallback",
    "ExpertLoadCallback",
    "ExpertDropoutCallback",
    "CapacityFactorCallback",
    "RouterJitterCallback",
    "BiasBalancingCallback",
    "enable_moe_logging",
    # what is where, what trains
    "describe_moe",
    "apply_freezing",
    "apply_lora",
    # the Hub
    "write_model_card",
    "push_run",
]
