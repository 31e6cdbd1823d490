"""Train a subset of the experts stored in fused 3-D tensors, with no gradient, optimizer state or
weight decay for the frozen experts.

Modern MoEs (Mixtral, Qwen-MoE, OLMoE, DeepSeek, GPT-OSS ...) keep all experts of a layer in one
``nn.Parameter`` of shape ``[num_experts, ...]``. Masking its gradient still makes the optimizer keep
full AdamW moments and apply weight decay to every expert. Here instead:

* the fused parameter ``P`` is frozen (``requires_grad=False``) and stays the single source of truth:
  it keeps its name, so ``state_dict()`` / ``save_pretrained`` write an ordinary full model;
* a small trainable parameter holds the selected slices ``P[selected]`` (flattened to
  ``[num_selected, -1]`` so that the anatomy does not mistake it for another fused expert tensor). It
  lives in a child module ``expert_subset`` of the MoE block, e.g.
  ``model.layers.0.mlp.expert_subset.experts__gate_up_proj``, so ``Trainer`` puts it in the optimizer;
* during the MoE block's forward the experts module sees ``P`` spliced with the trainable slices
  (``_Splice``: the slices are written into ``P`` whenever they changed, and the block reads an alias
  of ``P`` whose backward hands only ``grad[selected]`` to the slices);
* the slices are written back into ``P`` after every optimizer step (optimizer post-hook), before
  each forward when they were written since (their version counter moved; without an attached
  optimizer also when their values differ, since fused optimizer kernels move no version counter),
  and before every ``state_dict()`` when they differ; the trainable slice parameters are left out of
  ``state_dict()``, and after ``load_state_dict`` (or any other in-place write to ``P``) they are
  reloaded from ``P``, so ``Trainer`` checkpoints and resume work unchanged.

Hot path: with the optimizer attached (``Trainer`` through ``MoEFreezingCallback``), a forward reads
only version counters (host integers): no ``torch.equal``, no host sync.

Memory: the selected slices exist twice (in ``P`` and as the trainable copy) and their gradient and
optimizer moments exist once; frozen slices have none. Backward still forms the transient gradient of
the fused tensor that autograd builds for any indexed weight (the experts' code indexes or multiplies the
whole fused tensor; only a rewrite of each family's experts forward could avoid it), reduced to the
selected rows at once.

Limitations: parameters must be materialised on one process (plain / DDP training). With DeepSpeed
ZeRO-3 or FSDP sharding, freeze whole expert tensors instead (``moe_freeze_strategy``, ``moe_experts="all"``);
:func:`install_expert_subsets` refuses ZeRO-3-partitioned tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..anatomy import MoEAnatomy, describe_moe

logger = logging.getLogger(__name__)

#: Name of the child module of an MoE block holding its trainable expert slices.
SUBSET_MODULE = "expert_subset"


class _Splice(torch.autograd.Function):
    """Return an alias of the fused tensor (already holding the slices); route ``grad[index]`` to the slices."""

    @staticmethod
    def forward(ctx: Any, slices: torch.Tensor, fused: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.slice_shape = slices.shape
        return fused.view_as(fused)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index).reshape(ctx.slice_shape), None, None


def _key(relative_name: str) -> str:
    return relative_name.replace(".", "__")


class TrainableExpertSlices(nn.Module):
    """The trainable slices of the fused expert tensors of one MoE block.

    Args:
        block: the MoE block module.
        masks: fused tensor name relative to ``block`` (e.g. ``"experts.gate_up_proj"``) -> expert mask.
        blocks: the tensors stack each expert as a block of rows (DBRX: ``[E * intermediate, hidden]``);
            expert ``e`` owns rows ``e * R .. (e + 1) * R - 1`` with ``R = rows / E``.
    """

    def __init__(self, block: nn.Module, masks: Mapping[str, Sequence[bool]], blocks: bool = False) -> None:
        super().__init__()
        self.relative_names: list[str] = []
        self._indices: dict[str, torch.Tensor] = {}
        self._fused_versions: dict[str, int] = {}  # version of each fused tensor after our own last write
        self._slice_versions: dict[str, int] = {}  # version of each slice parameter when last written to its tensor
        for rel, mask in masks.items():
            fused = block.get_parameter(rel)
            keep = torch.tensor(list(mask), dtype=torch.bool)
            if blocks and keep.numel() and fused.shape[0] % keep.numel() == 0:
                keep = keep.repeat_interleave(fused.shape[0] // keep.numel())  # expert mask -> row mask
            if keep.numel() != fused.shape[0]:
                raise ValueError(f"mask of {rel} has {keep.numel()} entries but the tensor has {fused.shape[0]} experts")
            index = keep.nonzero().flatten().to(fused.device)
            if index.numel() == 0:
                continue
            slices = nn.Parameter(fused.detach().index_select(0, index).reshape(index.numel(), -1).clone())
            self.register_parameter(_key(rel), slices)
            self.relative_names.append(rel)
            self._indices[rel] = index
            self._fused_versions[rel] = fused._version
            self._slice_versions[rel] = slices._version

    def slices(self, rel: str) -> nn.Parameter:
        return self.get_parameter(_key(rel))

    def index(self, rel: str) -> torch.Tensor:
        return self._indices[rel]

    @torch.no_grad()
    def sync(self, block: nn.Module, force: bool = False, compare: bool = True) -> None:
        """Write the trainable slices into the fused tensors.

        Written when ``force``, when a slice was written in place since its last write (its version
        counter moved: a for-each or single-tensor optimizer step, a user's in-place edit), or, with
        ``compare``, when its values differ (fused optimizer kernels move no version counter; the
        comparison is a host sync). So a fused tensor is modified in place only after an update of the
        slices, never between a forward and its backward. If the fused tensor itself was written by
        someone else since (an in-place checkpoint load), that write wins: the slices are reloaded from it.
        """
        for rel in self.relative_names:
            fused = block.get_parameter(rel)
            if fused._version != self._fused_versions.get(rel):
                self.load_from_fused(block, [rel])
                continue
            slices = self.slices(rel)
            index = self._indices[rel].to(fused.device)
            values = slices.detach().reshape(index.numel(), *fused.shape[1:]).to(fused.dtype)
            if (
                force
                or slices._version != self._slice_versions.get(rel)
                or (compare and not torch.equal(fused.index_select(0, index), values))
            ):
                fused.index_copy_(0, index, values)
                self._fused_versions[rel] = fused._version
                self._slice_versions[rel] = slices._version

    @torch.no_grad()
    def load_from_fused(self, block: nn.Module, names: Sequence[str] | None = None) -> None:
        """Set the trainable slices from the current fused tensors (all, or the relative ``names``)."""
        for rel in self.relative_names if names is None else names:
            slices = self.slices(rel)
            fused = block.get_parameter(rel)
            slices.copy_(fused.detach().index_select(0, self._indices[rel].to(fused.device)).reshape(slices.shape))
            self._fused_versions[rel] = fused._version
            self._slice_versions[rel] = slices._version


def _owner_and_leaf(block: nn.Module, rel: str) -> tuple[nn.Module, str]:
    if "." in rel:
        owner_path, leaf = rel.rsplit(".", 1)
        return block.get_submodule(owner_path), leaf
    return block, rel


@dataclass
class ExpertSubsets:
    """Installed expert subsets of a model: the holders per MoE block and the hooks that splice them."""

    model: nn.Module
    blocks: dict[str, TrainableExpertSlices] = field(default_factory=dict)
    _module_hooks: list[Any] = field(default_factory=list, repr=False)
    _optimizer_hooks: list[Any] = field(default_factory=list, repr=False)

    def __bool__(self) -> bool:
        return bool(self.blocks)

    @property
    def trainable_names(self) -> list[str]:
        """Full parameter names of the trainable slice parameters."""
        return [
            f"{path}.{SUBSET_MODULE}.{name}" if path else f"{SUBSET_MODULE}.{name}"
            for path, holder in self.blocks.items()
            for name, _ in holder.named_parameters()
        ]

    def sync(self, force: bool = False) -> None:
        """Write every changed trainable slice into its fused tensor."""
        for path, holder in self.blocks.items():
            holder.sync(self.model.get_submodule(path), force=force)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Write the slices into the fused tensors after every ``optimizer.step()`` (unconditionally: a step
        changes them, and comparing would be a host sync), so the fused tensors are always current and a
        forward needs no comparison."""
        if not self.blocks:
            return
        inner = optimizer
        while hasattr(inner, "optimizer") and isinstance(inner.optimizer, torch.optim.Optimizer):
            inner = inner.optimizer  # accelerate's AcceleratedOptimizer wraps the real one
        self._optimizer_hooks.append(inner.register_step_post_hook(lambda *_: self.sync(force=True)))

    @property
    def optimizer_attached(self) -> bool:
        """Whether an optimizer writes the slices into the fused tensors after each of its steps."""
        return bool(self._optimizer_hooks)

    def detach_optimizer(self) -> None:
        """Remove the optimizer hooks (the model keeps working: forwards and saves sync by themselves)."""
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks.clear()

    def uninstall(self) -> None:
        """Merge the slices into the fused tensors and remove holders and hooks; the fused tensors stay frozen."""
        self.sync(force=True)
        self.detach_optimizer()
        for handle in self._module_hooks:
            handle.remove()
        self._module_hooks.clear()
        for path in list(self.blocks):
            block = self.model.get_submodule(path)
            for rel in self.blocks[path].relative_names:
                owner, leaf = _owner_and_leaf(block, rel)
                owner.__dict__.pop(leaf, None)
            delattr(block, SUBSET_MODULE)
        self.blocks.clear()
        if getattr(self.model, _ATTR, None) is self:
            object.__delattr__(self.model, _ATTR)


_ATTR = "_hf_moe_expert_subsets"


def installed_expert_subsets(model: nn.Module) -> ExpertSubsets | None:
    """The :class:`ExpertSubsets` installed on ``model``, if any."""
    return getattr(model, _ATTR, None)


def uninstall_expert_subsets(model: nn.Module) -> None:
    """Merge and remove any expert subsets installed on ``model`` (no-op if none)."""
    subsets = installed_expert_subsets(model)
    if subsets is not None:
        subsets.uninstall()


def _install_block_hooks(subsets: ExpertSubsets, path: str, block: nn.Module, holder: TrainableExpertSlices) -> None:
    prefix_of_holder = f"{SUBSET_MODULE}."

    def pre_forward(module: nn.Module, args: Any) -> None:
        # with an attached optimizer, only version counters are read (no comparison, no host sync)
        holder.sync(module, compare=not subsets.optimizer_attached)
        for rel in holder.relative_names:
            owner, leaf = _owner_and_leaf(module, rel)
            fused = owner._parameters[leaf]
            owner.__dict__[leaf] = _Splice.apply(holder.slices(rel), fused, holder.index(rel).to(fused.device))

    def post_forward(module: nn.Module, args: Any, output: Any) -> None:
        for rel in holder.relative_names:
            owner, leaf = _owner_and_leaf(module, rel)
            owner.__dict__.pop(leaf, None)

    def before_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
        holder.sync(module)

    def drop_slices(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + prefix_of_holder)]:
            del state_dict[key]

    def after_load(module: nn.Module, incompatible_keys: Any) -> None:
        holder.load_from_fused(module)  # the loaded fused tensors are the truth (also without a slice key)
        marker = f".{SUBSET_MODULE}." if path else f"{SUBSET_MODULE}."
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if marker not in k]

    subsets._module_hooks += [
        block.register_forward_pre_hook(pre_forward),
        block.register_forward_hook(post_forward, always_call=True),
        block.register_state_dict_pre_hook(before_state_dict),
        block.register_state_dict_post_hook(drop_slices),
        block.register_load_state_dict_post_hook(after_load),
    ]


def install_expert_subsets(
    model: nn.Module, expert_masks: Mapping[str, Sequence[bool]], anatomy: MoEAnatomy | None = None
) -> ExpertSubsets:
    """Freeze the fused expert tensors in ``expert_masks`` and train only their selected slices.

    Args:
        model: the model (its parameters are changed in place).
        expert_masks: fused tensor name -> per-expert mask (``True`` = trains), as in
            :attr:`hf_moe_tuning.freezing.FreezePlan.expert_masks`.
        anatomy: the model's anatomy (computed if omitted).

    Returns:
        the installed :class:`ExpertSubsets` (also reachable with :func:`installed_expert_subsets`).
    """
    uninstall_expert_subsets(model)
    subsets = ExpertSubsets(model)
    if not expert_masks:
        return subsets
    anatomy = anatomy or describe_moe(model)
    per_block: dict[str, dict[str, Sequence[bool]]] = {}
    for name, mask in expert_masks.items():
        if hasattr(model.get_parameter(name), "ds_id"):
            raise ValueError(
                f"{name!r} is partitioned by DeepSpeed ZeRO-3; training an expert subset inside fused tensors needs "
                "materialised parameters (use ZeRO-1/2, DDP, or freeze whole expert tensors)"
            )
        layer = anatomy.layer_of(name)
        if layer is None or name not in layer.fused_experts:
            raise ValueError(f"{name!r} is not a fused expert tensor of an MoE layer of this model")
        if layer.fused_experts[name] != 0:
            raise ValueError(f"{name!r} stacks its experts on axis {layer.fused_experts[name]}; only axis 0 is supported")
        rel = name[len(layer.path) + 1 :] if layer.path else name
        per_block.setdefault(layer.path, {})[rel] = mask
    for path, masks in per_block.items():
        block = model.get_submodule(path)
        if hasattr(block, SUBSET_MODULE):
            raise ValueError(f"MoE block {path!r} already has a child named {SUBSET_MODULE!r}")
        holder = TrainableExpertSlices(block, masks, blocks=anatomy.family.expert_blocks)
        for rel in masks:
            block.get_parameter(rel).requires_grad_(False)
        if not holder.relative_names:
            continue
        block.add_module(SUBSET_MODULE, holder)
        subsets.blocks[path] = holder
        _install_block_hooks(subsets, path, block, holder)
    object.__setattr__(model, _ATTR, subsets)
    logger.info(
        "expert subsets: %d trainable slice tensors in %d MoE blocks (frozen experts get no gradient or optimizer state)",
        len(subsets.trainable_names),
        len(subsets.blocks),
    )
    return subsets
