"""Auxiliary-loss-free load balancing (DeepSeek-V3, Wang et al. 2024): a per-expert bias added to the routing
scores *for the choice of experts only*, updated from the observed load after every training step:

    b_e <- b_e + gamma * sign(mean(c) - c_e)

(``c_e``: tokens routed to expert ``e`` in the step), so overloaded experts become less likely to be
chosen and underloaded ones more. transformers keeps DeepSeek-V3's ``e_score_correction_bias`` but never
updates it; this module does. Modes per MoE layer:

==============  ==================================================================================
mode            where the bias acts
==============  ==================================================================================
``correction``  the router's own ``e_score_correction_bias`` buffer (DeepSeek-V3, GLM-4-MoE, dots1 ...);
                saved with the model
``topk``        routers returning ``(logits, weights, indices)`` (Mixtral, Qwen-MoE, OLMoE ...): a
                forward hook re-selects the top-k on ``logits + b``; the gate weights stay the
                unbiased probabilities (renormalised when the router renormalises). The bias is in
                logit units here (saturated softmax probabilities would make the choice among the
                less likely experts depend on the bias alone and make sign updates cycle)
``logits``      ``nn.Linear`` routers (Switch, NLLB-MoE): the bias is added to the router logits, so it
                shifts the gate values as well as the choice
==============  ==================================================================================

Counts are summed over the micro-batches of a step (and across processes when distributed) and only
counted in training mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..anatomy import MoEAnatomy, MoELayer, describe_moe, require_moe
from ..metrics.expert_load import expert_counts, max_violation
from ..reduction import reduce_sum

logger = logging.getLogger(__name__)

_ATTR = "_hf_moe_bias_balancer"


@torch.no_grad()
def sign_bias_update(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """``bias + rate * sign(mean(counts) - counts)`` (a new tensor, dtype of ``bias``).

    Experts above the mean load get ``-rate``, below it ``+rate``, exactly at the mean ``0``.
    """
    c = counts.to(torch.float64)
    step = torch.sign(c.mean() - c) * rate
    return (bias.to(torch.float64) + step.to(bias.device)).to(bias.dtype)


def _is_selection_output(output: Any) -> bool:
    return (
        isinstance(output, tuple)
        and len(output) >= 3
        and isinstance(output[2], torch.Tensor)
        and not output[2].is_floating_point()
    )


@dataclass
class _LayerState:
    layer: MoELayer
    mode: str
    bias: torch.Tensor
    counts: torch.Tensor


@dataclass
class BiasBalancer:
    """Per-expert routing biases of a model, updated from the load of each step (see module docstring).

    Args:
        model: the MoE model.
        rate: update rate ``gamma`` (DeepSeek-V3: 0.001).
        allow_hooks: for families without a correction bias, act through a routing hook; if ``False`` such
            a model raises.
    """

    model: nn.Module
    rate: float = 1e-3
    allow_hooks: bool = True
    anatomy: MoEAnatomy | None = None
    layers: list[_LayerState] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not self.rate > 0:
            raise ValueError(f"bias update rate must be > 0, got {self.rate!r}")
        self.anatomy = self.anatomy or describe_moe(self.model)
        require_moe(self.anatomy, "Bias balancing")
        previous = getattr(self.model, _ATTR, None)
        if previous is not None:
            previous.remove()
        for layer in self.anatomy.layers:
            self.layers.append(self._install(layer))
        object.__setattr__(self.model, _ATTR, self)
        modes = sorted({s.mode for s in self.layers})
        logger.info("aux-loss-free bias balancing (rate %g) on %d MoE layers, mode(s) %s", self.rate, len(self.layers), modes)

    # ------------------------------------------------------------------ installation
    def _install(self, layer: MoELayer) -> _LayerState:
        group = self.model.get_submodule(layer.router_group_path)
        router = self.model.get_submodule(layer.router_path)
        device = router.weight.device if hasattr(router, "weight") else None
        counts = torch.zeros(layer.num_experts, dtype=torch.long, device=device)
        for module in (group, self.model.get_submodule(layer.path)):
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor) and bias.shape == (layer.num_experts,):
                state = _LayerState(layer, "correction", bias, counts)
                self._handles.append(group.register_forward_hook(self._count_hook(state, group)))
                return state
        if not self.allow_hooks:
            raise ValueError(
                f"model_type={self.anatomy.model_type!r} has no e_score_correction_bias; enable the routing-bias hook "
                "(allow_hooks=True) to balance it"
            )
        bias = torch.zeros(layer.num_experts, dtype=torch.float32, device=device)
        if isinstance(router, nn.Linear):
            state = _LayerState(layer, "logits", bias, counts)
            self._handles.append(router.register_forward_hook(self._logits_hook(state)))
        else:
            state = _LayerState(layer, "topk", bias, counts)
            self._handles.append(group.register_forward_hook(self._topk_hook(state, group)))
        return state

    def _count(self, state: _LayerState, indices: torch.Tensor) -> None:
        flat = indices.reshape(-1, indices.shape[-1])
        state.counts += expert_counts(flat, None, state.layer.num_experts).to(state.counts.device)

    def _count_hook(self, state: _LayerState, group: nn.Module):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not module.training:
                return
            if not _is_selection_output(output):
                raise RuntimeError(
                    f"bias balancing expects {type(group).__name__} to return (logits, weights, indices); got {type(output)}"
                )
            self._count(state, output[2])

        return hook

    def _logits_hook(self, state: _LayerState):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            biased = output + state.bias.to(output.device, output.dtype)
            if module.training:
                logits = biased.detach().reshape(-1, biased.shape[-1])[:, : state.layer.num_experts]
                self._count(state, torch.topk(logits, state.layer.top_k, dim=-1).indices)
            return biased

        return hook

    def _topk_hook(self, state: _LayerState, group: nn.Module):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not _is_selection_output(output):
                raise RuntimeError(
                    f"bias balancing expects {type(group).__name__} to return (logits, weights, indices); got {type(output)}"
                )
            logits, weights, indices = output[0], output[1], output[2]
            scores = logits.float()[..., : state.layer.num_experts]
            probs = torch.softmax(logits.float(), dim=-1)[..., : state.layer.num_experts]
            k = indices.shape[-1]
            # choose on the logits (log-probabilities up to a constant) plus the bias: unlike saturated
            # probabilities they keep the tokens' own preferences among the non-dominant experts
            choice = scores.detach() + state.bias.to(scores.device)
            new_indices = torch.topk(choice, k, dim=-1).indices
            new_weights = probs.gather(-1, new_indices)
            renormalised = torch.allclose(weights.float().sum(-1), torch.ones_like(weights[..., 0].float()), atol=1e-3)
            if renormalised:
                new_weights = new_weights / new_weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
            if module.training:
                self._count(state, new_indices)
            return (logits, new_weights.to(weights.dtype), new_indices.to(indices.dtype)) + tuple(output[3:])

        return hook

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """Update every layer's bias from the counts since the last step; return MaxVio per layer and the mean."""
        stats: dict[str, float] = {}
        if not self.layers:
            return stats
        counts = reduce_sum(torch.stack([s.counts for s in self.layers]))  # over the training processes
        violations = []
        for state, layer_counts in zip(self.layers, counts):
            if int(layer_counts.sum()) == 0:
                continue
            violation = max_violation(layer_counts)
            violations.append(violation)
            stats[f"moe/layer{state.layer.index}/bias_max_violation"] = violation
            state.bias.copy_(sign_bias_update(state.bias, layer_counts, self.rate))
            state.counts.zero_()
        if violations:
            stats["moe/bias_max_violation_mean"] = float(sum(violations) / len(violations))
            stats["moe/bias_range"] = float(max(float(s.bias.max() - s.bias.min()) for s in self.layers))
        return stats

    def reset_counts(self) -> None:
        for state in self.layers:
            state.counts.zero_()

    def hook_biases(self) -> dict[str, list[float]]:
        """Biases of hook-mode layers (correction biases are saved with the model)."""
        return {str(s.layer.index): s.bias.tolist() for s in self.layers if s.mode != "correction"}

    @torch.no_grad()
    def load_hook_biases(self, biases: dict[str, list[float]]) -> None:
        for state in self.layers:
            values = biases.get(str(state.layer.index))
            if values is not None and state.mode != "correction":
                state.bias.copy_(torch.tensor(values, dtype=state.bias.dtype))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if getattr(self.model, _ATTR, None) is self:
            object.__delattr__(self.model, _ATTR)
