"""Capture router logits and token masks with forward hooks, for every family in the anatomy.

One :class:`RouterCapture` per model is shared by all callbacks (router loss, expert load, ESFT
scoring): :meth:`RouterCapture.acquire` returns the model's capture and counts users, and
:meth:`RouterCapture.release` removes the hooks when the last user is done.

What is captured on each forward of the top-level model:

* ``logits[layer.index]``: router logits ``[num_tokens, num_experts]`` in float32, with autograd
  history (so losses built on them reach the router weights). They are taken from the router
  module's output when it is an ``nn.Linear`` (Switch, NLLB-MoE, JetMoE ...) and otherwise recomputed
  from the router's input and its ``[E, hidden]`` weight (Mixtral, Qwen-MoE, DeepSeek, GPT-OSS ...),
  so nothing depends on the model's own ``output_router_logits`` path.
* ``mask(layer)``: a bool ``[num_tokens]`` vector, ``True`` for tokens that count: padding
  (``attention_mask`` / ``decoder_attention_mask``) and ignored labels (``-100``) are ``False``.

Rows follow the row-major flattening of ``[batch, seq]``, as every family does before routing.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import MoEAnatomy, MoELayer, describe_moe, require_moe

logger = logging.getLogger(__name__)

_ATTR = "_hf_moe_router_capture"


class RouterCapture:
    """Forward hooks that record router logits and token masks (see module docstring)."""

    def __init__(self, model: nn.Module, anatomy: MoEAnatomy | None = None) -> None:
        self.model = model
        self.anatomy = anatomy or describe_moe(model)
        require_moe(self.anatomy, "Capturing router logits")
        self.logits: dict[int, torch.Tensor] = {}
        self.batch: dict[str, torch.Tensor] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self.enabled = True
        self.keep_grad = True
        self._handles: list[Any] = []
        self._users = 0
        self.forward_count = 0

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def acquire(cls, model: nn.Module, anatomy: MoEAnatomy | None = None) -> "RouterCapture":
        """Return the capture attached to ``model`` (creating and attaching it on first use)."""
        capture = getattr(model, _ATTR, None)
        if capture is None:
            capture = cls(model, anatomy)
            capture.attach()
            object.__setattr__(model, _ATTR, capture)
        capture._users += 1
        return capture

    def release(self) -> None:
        """Drop one user; detach hooks when none is left."""
        self._users = max(0, self._users - 1)
        if self._users == 0:
            self.detach()
            if getattr(self.model, _ATTR, None) is self:
                object.__delattr__(self.model, _ATTR)

    def attach(self) -> None:
        if self._handles:
            return
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        for layer in self.anatomy.layers:
            if layer.scoring == "product_key":
                logger.info("%s routes by product keys (no per-expert logits); not captured", layer.path)
                continue
            module = self.model.get_submodule(layer.router_path)
            self._handles.append(module.register_forward_hook(self._make_router_hook(layer, module)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.logits.clear()
        self.batch.clear()
        self._masks.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # ------------------------------------------------------------------ hooks
    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.logits = {}
        self._masks = {}
        self.forward_count += 1
        batch: dict[str, torch.Tensor] = {}
        for key in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"):
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor):
                batch[key] = value
        if args and isinstance(args[0], torch.Tensor) and "input_ids" not in batch:
            batch["input_ids"] = args[0]
        self.batch = batch

    def _make_router_hook(self, layer: MoELayer, module: nn.Module):
        weight = module.get_parameter("weight")
        bias = module.get_parameter("bias") if layer.router_bias else None

        def hook(mod: nn.Module, inputs: tuple, output: Any) -> None:
            if not self.enabled:
                return
            if isinstance(mod, nn.Linear) and isinstance(output, torch.Tensor):
                logits = output.reshape(-1, output.shape[-1]).float()
            else:
                hidden = inputs[0]
                x = hidden.reshape(-1, hidden.shape[-1]).float()
                logits = F.linear(x, weight.float(), bias.float() if bias is not None else None)
            if logits.shape[-1] > layer.num_experts:
                # extra router rows come last (Inkling's shared-expert gates, Zaya's skip expert)
                logits = logits[:, : layer.num_experts]
            if not self.keep_grad or not torch.is_grad_enabled():
                logits = logits.detach()
            self.logits[layer.index] = logits

        return hook

    # ------------------------------------------------------------------ masks
    def mask(self, layer: MoELayer, num_tokens: int | None = None) -> torch.Tensor:
        """Bool mask ``[num_tokens]`` of the tokens that count for ``layer`` in the last forward.

        Built once per forward for each stack (encoder, decoder, decoder-only), token count and device.
        """
        logits = self.logits.get(layer.index)
        n = num_tokens if num_tokens is not None else (logits.shape[0] if logits is not None else 0)
        device = logits.device if logits is not None else None
        key = (layer.stack, n, device)
        cached = self._masks.get(key)
        if cached is not None:
            return cached
        mask = self._mask_for_stack(layer.stack)
        if mask is None or mask.numel() != n:
            if mask is not None:
                logger.debug("token mask of %s does not match %d routed tokens; counting all", layer.path, n)
            mask = torch.ones(n, dtype=torch.bool, device=device)
        else:
            mask = mask.reshape(-1).to(device=device, dtype=torch.bool)
        self._masks[key] = mask
        return mask

    def _mask_for_stack(self, stack: str | None) -> torch.Tensor | None:
        b = self.batch
        labels = b.get("labels")
        if stack == "encoder":
            am = b.get("attention_mask")
            return am.bool() if am is not None else None
        if stack == "decoder":
            dam = b.get("decoder_attention_mask")
            mask = dam.bool() if dam is not None else None
            dii = b.get("decoder_input_ids")
            # labels[t] is the target of decoder position t (also when a collator passed the shifted
            # decoder_input_ids), so -100 marks a padded/ignored decoder position either way.
            if labels is not None and (dii is None or dii.shape == labels.shape):
                lab = labels != -100
                mask = lab if mask is None or mask.shape != lab.shape else mask & lab
            return mask
        # decoder-only
        am = b.get("attention_mask")
        mask = am.bool() if am is not None else None
        if labels is not None and (mask is None or labels.shape == mask.shape):
            lab = labels != -100
            mask = lab if mask is None else mask & lab
        return mask

    def layer_items(self):
        """Yield ``(layer, logits, mask)`` for every MoE layer that routed tokens in the last forward."""
        for layer in self.anatomy.layers:
            logits = self.logits.get(layer.index)
            if logits is None:
                continue
            yield layer, logits, self.mask(layer, logits.shape[0])
