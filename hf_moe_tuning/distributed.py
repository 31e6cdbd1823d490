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

**FSDP2 without accelerate's plugin** (:func:`fully_shard_trainer`). accelerate enables FSDP only for
GPU-type processes: on CPU (gloo, ``MULTI_CPU``) an FSDP config silently trains with DDP. The package
therefore also applies ``torch.distributed.fsdp.fully_shard`` itself, with the same wrap units (every MoE
block, then every decoder layer of ``model._no_split_modules``, then the root), and hands the sharded model
to the Trainer the way transformers takes a model sharded at load time (``from_pretrained(distributed_config=
...)``): the model owns its gradient reduction, the Trainer neither wraps it in DDP nor moves it. Expert
subsets inside fused expert tensors are kept by masking on the shards (:class:`ShardedExpertMask`): the
frozen experts' rows get a zero gradient and are restored after every optimizer step, so they stay bitwise
unchanged (their optimizer moments exist but stay zero). The Trainer does not checkpoint the optimizer of
such a model: :func:`save_sharded_checkpoint` / :func:`load_sharded_checkpoint` write and read model and
optimizer state with ``torch.distributed.checkpoint`` (each rank its shards). Tested on 2 gloo processes
(``tests/test_fsdp2.py``).

DeepSpeed is optional: it is imported only when ZeRO-3 is actually used.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

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
        backend: ``"fsdp"`` (accelerate's plugin), ``"fsdp2"`` (:func:`fully_shard_trainer`), ``"deepspeed"`` or
            ``"none"`` (DDP or a single process: nothing to do).
        fsdp_wrap: FSDP transformer-wrap class names set on the plugin.
        zero3_leaf: class names registered as ZeRO-3 leaf modules.
        mixed_units: FSDP units holding frozen and trainable parameters (fine with FSDP2 or
            ``use_orig_params=True``).
    """

    backend: str = "none"
    fsdp_wrap: list[str] = field(default_factory=list)
    zero3_leaf: list[str] = field(default_factory=list)
    mixed_units: list[str] = field(default_factory=list)
    #: fused expert tensors whose frozen experts are masked on the shards (:func:`fully_shard_trainer`)
    expert_masks: list[str] = field(default_factory=list)


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


# ----------------------------------------------------------------------------------------- FSDP2 by the package
def fsdp2_unit_paths(model: nn.Module) -> list[str]:
    """Module paths :func:`fully_shard_moe` shards, innermost first: MoE blocks, decoder layers, then the root ``""``."""
    paths = [p for p in wrap_unit_paths(model, fsdp_wrap_class_names(model)) if p]
    return sorted(paths, key=lambda p: p.count("."), reverse=True) + [""]


def fully_shard_moe(model: nn.Module, mesh: Any = None, reshard_after_forward: bool = True, **kwargs: Any) -> list[str]:
    """Shard ``model`` with FSDP2 (``torch.distributed.fsdp.fully_shard``), one unit per MoE block and per decoder layer.

    The units are :func:`fsdp2_unit_paths`: each MoE block (router and experts, found by the anatomy) is a unit
    of its own inside its decoder layer, so the expert weights are gathered apart from attention. Parameters
    become ``DTensor`` shards (``Shard(0)`` over ``mesh``, default: all processes). Freeze before sharding or
    after: ``requires_grad`` is kept per parameter, so a unit may mix frozen and trainable parameters.
    ``kwargs`` go to ``fully_shard`` (``mp_policy``, ``offload_policy``). Returns the unit paths.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    units = fsdp2_unit_paths(model)
    options = {"reshard_after_forward": reshard_after_forward, **kwargs}
    if mesh is not None:
        options["mesh"] = mesh
    for path in units:
        fully_shard(model.get_submodule(path) if path else model, **options)
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")  # generate() runs the sharded forward
    logger.info("FSDP2 units: %d (%d MoE blocks)", len(units), len(describe_moe(model).layers))
    return units


def _local_rows(param: Any) -> tuple[torch.Tensor, int]:
    """The local shard of a ``Shard(0)`` DTensor parameter (or the tensor itself) and its first global row."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param.data, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), int(offset[0]) if offset else 0


class ShardedExpertMask:
    """Train only some experts of fused expert tensors sharded by FSDP2 (or any tensor): mask and restore.

    The fused tensors stay trainable parameters (FSDP2 shards them like any other); before every optimizer
    step the gradient rows of the frozen experts are zeroed on this process's shard, and after it their
    values are written back from a copy, so neither the gradient, the optimizer's update nor weight decay
    moves them (bitwise). Their optimizer moments exist (unlike the unsharded expert subsets) and stay zero.

    Args:
        model: the model, already sharded (or not).
        masks: fused expert tensor name -> per-expert mask (``True`` = that expert trains).
    """

    def __init__(self, model: nn.Module, masks: dict[str, list[bool]]):
        self.rows: dict[str, tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = {}
        for name, mask in masks.items():
            param = model.get_parameter(name)
            if len(mask) != param.shape[0]:
                raise ValueError(f"mask of {name} has {len(mask)} entries but the tensor has {param.shape[0]} rows")
            local, start = _local_rows(param)
            frozen = [i - start for i, keep in enumerate(mask) if not keep and start <= i < start + local.shape[0]]
            index = torch.tensor(frozen, dtype=torch.long, device=local.device)
            param.requires_grad_(True)
            self.rows[name] = (param, index, local.index_select(0, index).clone())
        self._handles: list[Any] = []

    @torch.no_grad()
    def zero_frozen_grads(self) -> None:
        for param, index, _ in self.rows.values():
            if param.grad is not None and index.numel():
                grad, _ = _local_rows(param.grad)
                grad.index_fill_(0, index, 0.0)

    @torch.no_grad()
    def restore_frozen(self) -> None:
        for param, index, saved in self.rows.values():
            if index.numel():
                local, _ = _local_rows(param)
                local.index_copy_(0, index, saved)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the frozen rows' gradients before, and restore their values after, every ``optimizer.step()``."""
        inner = optimizer
        while hasattr(inner, "optimizer") and isinstance(inner.optimizer, torch.optim.Optimizer):
            inner = inner.optimizer  # accelerate's AcceleratedOptimizer wraps the real one
        self._handles += [
            inner.register_step_pre_hook(lambda *_: self.zero_frozen_grads()),
            inner.register_step_post_hook(lambda *_: self.restore_frozen()),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _AttachMask(TrainerCallback):
    def __init__(self, mask: ShardedExpertMask):
        self.mask = mask

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.mask.detach()
        self.mask.attach(optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self.mask.detach()


def _freezing_report(trainer: Any) -> Any:
    for cb in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        report = getattr(cb, "report", None)
        if report is not None and hasattr(report, "slice_freezer"):
            return report
    return None


def _full_grad_norm(trainer: Any) -> None:
    """Make the trainer's gradient clipping return the global norm as a plain tensor, not a DTensor.

    ``torch.nn.utils.clip_grad_norm_`` over DTensor gradients clips correctly but returns a DTensor, which the
    logging and the non-finite checks (plain collectives) cannot take.
    """
    from torch.distributed.tensor import DTensor

    accelerator = trainer.accelerator
    clip = accelerator.clip_grad_norm_

    def clip_grad_norm_(parameters, max_norm, norm_type=2):
        norm = clip(parameters, max_norm, norm_type=norm_type)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    accelerator.clip_grad_norm_ = clip_grad_norm_


def fully_shard_trainer(trainer: Any, mesh: Any = None, **kwargs: Any) -> DistributedSetup:
    """Shard a built trainer's model with FSDP2 (:func:`fully_shard_moe`); call after building it, before ``train()``.

    For CPU runs (gloo) and anywhere accelerate's FSDP plugin is not used; on GPUs
    ``recipes/accelerate/fsdp*.yaml`` shards through accelerate with the same units. Freezing (applied when
    the trainer was built) is kept; expert subsets inside fused tensors move to :class:`ShardedExpertMask`.
    The trainer then treats the model like one transformers sharded at load time: no DDP wrapper, no device
    move, gradients reduced by FSDP2 (also under gradient accumulation).

    Raises:
        ValueError: one process only, or checkpoints that would hold optimizer state (``save_strategy`` other
            than ``"no"`` without ``save_only_model``; use :func:`save_sharded_checkpoint`).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        raise ValueError("fully_shard_trainer needs several processes (torchrun / accelerate launch -n N)")
    args = trainer.args
    if str(getattr(args.save_strategy, "value", args.save_strategy)) != "no" and not args.save_only_model:
        raise ValueError(
            "the Trainer cannot checkpoint the optimizer of a model sharded by the package: set save_strategy='no' "
            "(or save_only_model=True) and save with hf_moe_tuning.distributed.save_sharded_checkpoint"
        )
    model = trainer.model
    setup = DistributedSetup(backend="fsdp2")
    masks: dict[str, list[bool]] = {}
    report = _freezing_report(trainer)
    if report is not None and report.slice_freezer:
        masks = {k: list(v) for k, v in report.slice_freezer.masks.items()}
        report.slice_freezer.uninstall()  # slices merged back into the fused tensors, which FSDP2 then shards
    setup.fsdp_wrap = fsdp_wrap_class_names(model)  # before sharding renames the classes (FSDP<name>)
    setup.mixed_units = sorted(mixed_requires_grad_units(model, setup.fsdp_wrap))
    units = fully_shard_moe(model, mesh=mesh, **kwargs)
    if masks:
        mask = ShardedExpertMask(model, masks)
        trainer.add_callback(_AttachMask(mask))
        setup.expert_masks = sorted(masks)
    _full_grad_norm(trainer)
    object.__setattr__(model, "_is_distributed_loading_by_transformers", True)  # read by Trainer(...) built later
    trainer.is_distributed_loading_by_transformers = True  # the model owns its gradient reduction
    trainer.place_model_on_device = False
    logger.info("FSDP2: %d units; expert masks on %s", len(units), sorted(masks) or "none")
    return setup


def _torch_optimizer(optimizer: Any) -> Any:
    while optimizer is not None and hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps the real one
    return optimizer


def save_sharded_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer | None, path: str | Path) -> None:
    """Save model (and optimizer) state of an FSDP2 model with ``torch.distributed.checkpoint``; every rank calls it.

    Each rank writes its own shards (``path/__{rank}_0.distcp``) plus one metadata file; nothing is
    gathered. :func:`load_sharded_checkpoint` reads it back, also on another number of processes.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    optimizer = _torch_optimizer(optimizer)
    model_state, optim_state = get_state_dict(model, [optimizer] if optimizer is not None else [])
    state = {"model": model_state, **({"optimizer": optim_state} if optimizer is not None else {})}
    dcp.save(state, checkpoint_id=str(path))


def load_sharded_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer | None, path: str | Path) -> None:
    """Load what :func:`save_sharded_checkpoint` wrote into a model sharded the same way (and its optimizer)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizer = _torch_optimizer(optimizer)
    optimizers = [optimizer] if optimizer is not None else []
    model_state, optim_state = get_state_dict(model, optimizers)
    state = {"model": model_state, **({"optimizer": optim_state} if optimizer is not None else {})}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state.get("optimizer", {}))
