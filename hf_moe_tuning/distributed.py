"""Multi-process MoE training: FSDP wrap units and DeepSpeed ZeRO-3 leaf modules from the anatomy.

Two things go wrong when an MoE model is sharded the way a dense one is:

* **DeepSpeed ZeRO-3** gathers parameters module by module as the forward reaches them. Experts that
  receive no token on one process are never entered there, so that process gathers a different set of
  parameters than the others and the step hangs (DeepSpeed issue #4808). Registering the MoE blocks as
  *leaf modules* (``deepspeed.utils.set_z3_leaf_modules``) makes ZeRO-3 gather a whole block – router
  and all experts – at once on every process.
* **FSDP** wraps the model in units (by default the decoder layers of ``model._no_split_modules``).
  Making each MoE block a unit of its own keeps the expert weights, most of an MoE model, out of the
  attention layer's all-gather. With a freezing strategy (e.g. ``non_moe``) a unit can hold frozen and
  trainable parameters at once: FSDP2 (``fully_shard``, the accelerate/transformers default) keeps the
  original parameters and handles that; FSDP1 flattens a unit into one ``FlatParameter`` and needs
  ``use_orig_params=True`` (otherwise it raises, or trains frozen weights with older versions).

The MoE block classes come from :func:`~hf_moe_tuning.anatomy.describe_moe`, so every family the
anatomy knows works without a per-model list. :func:`configure_distributed` applies both to a built
``Trainer`` (``MoETrainer`` or plain) before ``train()``; ``recipes/train.py`` calls it.

DeepSpeed is optional: it is imported only when ZeRO-3 is actually used.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .anatomy import describe_moe

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- discovery
def moe_block_classes(model: nn.Module) -> list[type[nn.Module]]:
    """Classes of the model's MoE blocks (the modules at ``MoELayer.path``), in module order, unique."""
    classes: list[type[nn.Module]] = []
    for layer in describe_moe(model).layers:
        cls = type(model.get_submodule(layer.path))
        if cls not in classes:
            classes.append(cls)
    return classes


def moe_block_class_names(model: nn.Module) -> list[str]:
    """Names of :func:`moe_block_classes` (what accelerate's ``*_cls_names`` options take)."""
    return [cls.__name__ for cls in moe_block_classes(model)]


def _present_class_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for module in model.modules():
        name = type(module).__name__
        if name not in names:
            names.append(name)
    return names


def fsdp_wrap_class_names(model: nn.Module, base: Iterable[str] | None = None) -> list[str]:
    """FSDP transformer-wrap classes: ``base`` (default ``model._no_split_modules``) plus the MoE blocks.

    Only classes present in ``model`` are kept (accelerate raises on unknown names). A dense model gets
    the base classes alone.
    """
    present = set(_present_class_names(model))
    if base is None:
        base = getattr(model, "_no_split_modules", None) or []
    names = [n for n in base if n in present]
    for name in moe_block_class_names(model):
        if name not in names:
            names.append(name)
    return names


def wrap_unit_paths(model: nn.Module, class_names: Iterable[str]) -> list[str]:
    """Module paths that become FSDP units for ``class_names`` (the root ``""`` is always one)."""
    wanted = set(class_names)
    return [""] + [path for path, module in model.named_modules() if path and type(module).__name__ in wanted]


def mixed_requires_grad_units(model: nn.Module, class_names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """FSDP units owning both trainable and frozen parameters: ``{unit path: (trainable, frozen)}``.

    A parameter belongs to the innermost unit whose path prefixes it (nested units take their
    parameters out of the enclosing one, as FSDP does). Counts are parameter tensors.
    """
    units = sorted(wrap_unit_paths(model, class_names), key=len, reverse=True)
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        unit = next(u for u in units if u == "" or name.startswith(u + "."))
        entry = counts.setdefault(unit, [0, 0])
        entry[0 if param.requires_grad else 1] += 1
    return {u: (t, f) for u, (t, f) in counts.items() if t and f}


def set_zero3_leaf_modules(model: nn.Module) -> list[type[nn.Module]]:
    """Mark the MoE blocks of ``model`` as DeepSpeed ZeRO-3 leaf modules; returns the classes marked.

    Must run before ``deepspeed.initialize`` (i.e. before ``trainer.train()``).

    Raises:
        ImportError: DeepSpeed (>= 0.14) is not installed.
    """
    classes = moe_block_classes(model)
    if not classes:
        return []
    try:
        from deepspeed.utils import set_z3_leaf_modules
    except ImportError as err:
        raise ImportError(
            "DeepSpeed ZeRO-3 with MoE models needs deepspeed>=0.14 (deepspeed.utils.set_z3_leaf_modules); "
            "install it with `pip install deepspeed`"
        ) from err
    set_z3_leaf_modules(model, classes)
    logger.info("DeepSpeed ZeRO-3 leaf modules: %s", [c.__name__ for c in classes])
    return classes


# ----------------------------------------------------------------------------------------- trainer
@dataclass
class DistributedSetup:
    """What :func:`configure_distributed` did.

    Attributes:
        backend: ``"fsdp"``, ``"deepspeed"`` or ``"none"`` (DDP or a single process: nothing to do).
        fsdp_wrap: FSDP transformer-wrap class names set on the plugin.
        zero3_leaf: class names registered as ZeRO-3 leaf modules.
        mixed_units: FSDP units holding frozen and trainable parameters (fine with FSDP2 or
            ``use_orig_params=True``).
    """

    backend: str = "none"
    fsdp_wrap: list[str] = field(default_factory=list)
    zero3_leaf: list[str] = field(default_factory=list)
    mixed_units: list[str] = field(default_factory=list)


def _uses_slice_freezing(trainer: Any) -> bool:
    for cb in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        report = getattr(cb, "report", None)
        if report is not None and bool(getattr(report, "slice_freezer", None)):
            return True
    return False


def configure_distributed(trainer: Any) -> DistributedSetup:
    """Prepare a built trainer's MoE model for FSDP or DeepSpeed ZeRO-3; call before ``trainer.train()``.

    * FSDP with transformer-based wrapping: the MoE block classes are added to the wrap classes (to the
      ones configured, else to ``model._no_split_modules``). FSDP1 without ``use_orig_params`` and a unit
      mixing frozen and trainable parameters raises.
    * DeepSpeed ZeRO-3: the MoE blocks become leaf modules (:func:`set_zero3_leaf_modules`).
    * Expert subsets inside fused expert tensors (``moe_experts`` on Mixtral-style models) keep frozen
      slices with gradient hooks on the unsharded parameters, which FSDP and ZeRO-3 replace: raises.

    DDP and single-process runs need nothing and get ``backend="none"``.
    """
    model = trainer.model
    setup = DistributedSetup()
    fsdp = bool(getattr(trainer, "is_fsdp_enabled", False))
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    zero3 = bool(getattr(trainer, "is_deepspeed_enabled", False)) and getattr(plugin, "zero_stage", None) == 3
    if (fsdp or zero3) and _uses_slice_freezing(trainer):
        raise ValueError(
            "training an expert subset inside fused expert tensors (moe_experts=... on a fused-expert model) is "
            f"not supported with {'FSDP' if fsdp else 'DeepSpeed ZeRO-3'}: the frozen expert slices are kept by "
            "hooks on unsharded parameters. Use DDP (recipes/accelerate/ddp.yaml) or train all experts."
        )
    if fsdp:
        setup.backend = "fsdp"
        fsdp_plugin = trainer.accelerator.state.fsdp_plugin
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        policy = fsdp_plugin.auto_wrap_policy
        if isinstance(policy, functools.partial):
            policy = policy.func
        if policy is transformer_auto_wrap_policy:
            names = fsdp_wrap_class_names(model, base=fsdp_plugin.transformer_cls_names_to_wrap)
            fsdp_plugin.transformer_cls_names_to_wrap = names
            fsdp_plugin.auto_wrap_policy = transformer_auto_wrap_policy  # re-bound to the names at prepare()
            setup.fsdp_wrap = names
            logger.info("FSDP wrap units: %s", names)
        else:
            logger.warning(
                "FSDP auto_wrap_policy is not TRANSFORMER_BASED_WRAP: MoE blocks are not separate wrap units "
                "(set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, as recipes/accelerate/fsdp.yaml does)"
            )
        mixed = mixed_requires_grad_units(model, setup.fsdp_wrap or fsdp_wrap_class_names(model))
        setup.mixed_units = sorted(mixed)
        if mixed and getattr(fsdp_plugin, "fsdp_version", 1) == 1 and not fsdp_plugin.use_orig_params:
            example = next(iter(sorted(mixed)))
            raise ValueError(
                f"FSDP1 without use_orig_params cannot shard units mixing frozen and trainable parameters "
                f"({len(mixed)} such units, e.g. {example or '<root>'!r} with (trainable, frozen) tensors "
                f"{mixed[example]}); set fsdp_use_orig_params: true or fsdp_version: 2"
            )
    elif zero3:
        setup.backend = "deepspeed"
        setup.zero3_leaf = [cls.__name__ for cls in set_zero3_leaf_modules(model)]
    return setup
