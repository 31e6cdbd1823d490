"""Capture router logits and token masks with forward hooks, for every family in the anatomy.

One :class:`RouterCapture` per model is shared by all callbacks (router loss, expert load, ESFT
scoring): :meth:`RouterCapture.acquire` returns the model's capture and counts users, and
:meth:`RouterCapture.release` removes the hooks when the last user is done.

What is captured on each forward of the top-level model:

* ``logits[layer.index]``: router logits ``[num_tokens, num_experts]`` in float32, with autograd
  history (so losses built on them reach the router weights). They are taken from the router
  module's output when it is an ``nn.Linear`` (Switch, NLLB-MoE, JetMoE ...) or when the family table
  says its router returns raw logits first (``router_raw_logits``: the ``(logits, weights, indices)``
  routers of Mixtral, Qwen-MoE, DeepSeek, GPT-OSS ...), so monitoring adds no matmul; otherwise they
  are recomputed from the router's input and its ``[E, hidden]`` weight (routers that return
  probabilities or top-k scores, e.g. Llama-4; transformers #45120). Nothing depends on the model's
  own ``output_router_logits`` path.
* ``indices[layer.index]``: the experts the router chose, ``[num_tokens, top_k]`` int64, when the router
  module returns them (the ``(logits, weights, indices)`` routers of transformers 5: Mixtral, Qwen-MoE,
  OLMoE, DeepSeek, GPT-OSS and most others). That is the model's own choice, whatever its rule (group
  limits, correction bias, hash routing); the columns need not be sorted by score. Families whose
  router is a bare ``nn.Linear`` (Switch, NLLB-MoE, JetMoE, DBRX ...) have no entry.
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
_INDEX_DTYPES = (torch.int64, torch.int32)


class RouterCapture:
    """Forward hooks that record router logits and token masks (see module docstring)."""

    def __init__(self, model: nn.Module, anatomy: MoEAnatomy | None = None) -> None:
        self.model = model
        self.anatomy = anatomy or describe_moe(model)
        require_moe(self.anatomy, "Capturing router logits")
        self.logits: dict[int, torch.Tensor] = {}
        self.indices: dict[int, torch.Tensor] = {}
        self.batch: dict[str, torch.Tensor] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._index_ok: dict[int, bool] = {}
        self.enabled = True
        self.keep_grad = True
        #: set while a callback runs a forward of its own (the expert-load drift probe): others ignore it
        self.probing = False
        self._handles: list[Any] = []
        self._users = 0
        self.forward_count = 0

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def acquire(cls, model: nn.Module, anatomy: MoEAnatomy | None = None) -> RouterCapture:
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
        self.indices.clear()
        self.batch.clear()
        self._masks.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # ------------------------------------------------------------------ hooks
    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.logits = {}
        self.indices = {}
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

    def set_token_labels(self, labels: torch.Tensor) -> None:
        """Count only the tokens ``labels`` marks (``-100``: ignored) in the last forward, as if they had been passed.

        For a forward that left its labels out so as not to compute a loss (the expert-load drift probe): the
        token masks come out as they would have with the labels. Clears the masks already built.
        """
        self.batch["labels"] = labels
        self._masks = {}

    def _make_router_hook(self, layer: MoELayer, module: nn.Module):
        weight = module.get_parameter("weight")
        bias = module.get_parameter("bias") if layer.router_bias else None

        def hook(mod: nn.Module, inputs: tuple, output: Any) -> None:
            if not self.enabled:
                return
            raw = None
            if isinstance(mod, nn.Linear) and isinstance(output, torch.Tensor):
                raw = output
            elif isinstance(output, (tuple, list)):
                self._keep_router_choice(layer, output)
                first = output[0] if output else None
                if layer.router_raw_logits and isinstance(first, torch.Tensor) and first.shape[-1] == layer.router_outputs:
                    raw = first  # the router's own logits: no second matmul
            if raw is not None:
                logits = raw.reshape(-1, raw.shape[-1]).float()
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

    def _keep_router_choice(self, layer: MoELayer, output: tuple | list) -> None:
        """Record the ``[N, k]`` expert indices a router returned, once they proved to be in range.

        The range is checked on the first forward of each layer (one host sync); a router whose indices
        fall outside ``[0, num_experts)`` (extra "zero" experts, global expert ids) is not used again.
        """
        chosen = next((o for o in output if isinstance(o, torch.Tensor) and o.dtype in _INDEX_DTYPES), None)
        if chosen is None or chosen.shape[-1] != layer.top_k or self._index_ok.get(layer.index) is False:
            return
        chosen = chosen.reshape(-1, layer.top_k)
        if layer.index not in self._index_ok:
            ok = chosen.numel() == 0 or (int(chosen.min()) >= 0 and int(chosen.max()) < layer.num_experts)
            self._index_ok[layer.index] = ok
            if not ok:
                logger.warning(
                    "the router of %s returned expert indices outside [0, %d); its choice is derived from its "
                    "logits instead",
                    layer.path,
                    layer.num_experts,
                )
                return
        self.indices[layer.index] = chosen if chosen.dtype == torch.long else chosen.long()

    def choice(self, layer: MoELayer) -> torch.Tensor | None:
        """The router's own ``[N, k]`` choice for ``layer`` in the last forward, or ``None``."""
        chosen = self.indices.get(layer.index)
        logits = self.logits.get(layer.index)
        if chosen is None or logits is None or chosen.shape[0] != logits.shape[0]:
            return None
        return chosen

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
