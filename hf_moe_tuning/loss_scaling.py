"""The training loss of models whose loss is a per-batch mean, made correct under DDP and gradient accumulation.

transformers' ``Trainer`` treats every model whose ``forward`` takes ``**kwargs`` as one that divides its summed
token loss by the ``num_items_in_batch`` it passes (as causal LMs do through ``self.loss_function``). For such
models it multiplies the loss by the number of processes (``average_tokens_across_devices``) and does not divide
it by the gradient-accumulation steps. T5, Switch Transformers and NLLB-MoE take ``**kwargs`` but compute a plain
per-batch mean cross-entropy, so under DDP their gradients (and logged losses) come out N times too large, and
with accumulation ``gradient_accumulation_steps`` times too large.

:class:`~hf_moe_tuning.MoETrainer` trains such models under :func:`global_token_mean_loss`: the loss becomes the
summed token cross-entropy over the Trainer's ``num_items_in_batch`` (the model's mean times its target-token count,
so no second cross-entropy is computed). With transformers' scaling the gradient is
then the mean over every target token of the global batch, for any number of processes and any accumulation,
the same as one process over the same batch.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch

from .adapters import is_peft_model

__all__ = ["global_token_mean_loss", "loss_uses_num_items"]


def loss_uses_num_items(model: Any) -> bool:
    """Whether ``model``'s loss divides by the ``num_items_in_batch`` the Trainer passes (``self.loss_function``).

    Read from the source of the (PEFT-unwrapped) model class's ``forward``; ``True`` when it cannot be read, which
    leaves the model as transformers treats it.
    """
    base = model.get_base_model() if is_peft_model(model) else model
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return True
    return "loss_function" in source or "num_items_in_batch" in source


@contextlib.contextmanager
def global_token_mean_loss(model: Any) -> Iterator[None]:
    """While inside, a model whose loss is a per-batch mean (:func:`loss_uses_num_items` is ``False``) returns
    the summed token cross-entropy divided by ``num_items_in_batch`` when it is given one; otherwise unchanged.

    The model gets ``labels`` as before (it builds its decoder inputs, and the router losses mask padding, from
    them) and computes its own loss; that per-batch mean is rescaled by the batch's target-token count ``n``:
    ``loss * n / num_items_in_batch``, which is the summed token cross-entropy over ``num_items_in_batch``
    without a second cross-entropy over the logits (a ``tokens x vocab`` pass). Terms the model adds to its loss
    (Switch's and NLLB-MoE's own router losses, when a forward asks for ``output_router_logits=True``) are kept,
    weighted by the micro-batch's share ``n / num_items_in_batch`` of the global batch's tokens, so they keep
    their coefficient on the global batch. A micro-batch without target tokens contributes 0 (the model's own
    mean is NaN there). Without ``num_items_in_batch`` (evaluation, generation) the model is unchanged. The
    instance's ``forward`` is restored on exit.
    """
    if loss_uses_num_items(model):
        yield
        return
    original = model.forward

    @functools.wraps(original)
    def forward(*args: Any, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        outputs = original(*args, **kwargs)
        labels = kwargs.get("labels")
        loss = getattr(outputs, "loss", None)
        if num_items_in_batch is not None and labels is not None and loss is not None:
            tokens = (labels != -100).sum().to(loss.device)
            # where, not a product, for a batch without target tokens: its mean is NaN and NaN * 0 is NaN
            total = torch.where(tokens > 0, loss * tokens, torch.zeros_like(loss))
            outputs.loss = total / num_items_in_batch
        return outputs

    model.forward = forward
    try:
        yield
    finally:
        if model.__dict__.get("forward") is forward:
            del model.forward  # the class's forward again
