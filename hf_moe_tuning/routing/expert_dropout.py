"""Expert dropout (Switch Transformers, Fedus et al. 2022, Table 4): a higher dropout rate *inside the
experts only* while fine-tuning (0.4 in the paper, with 0.1 elsewhere), off at evaluation.

* Per-expert modules (Switch, NLLB-MoE ...): every ``nn.Dropout`` inside an expert (Switch's and
  NLLB's sit between the two expert projections, exactly where the paper applies it) gets rate ``p``.
  An expert without a dropout module gets dropout on its output.
* Fused 3-D experts (Mixtral, Qwen-MoE, DeepSeek, GPT-OSS ...), whose intermediate activation is not
  reachable from outside: dropout on the routed experts' output (before shared experts and the residual).

Dropout follows ``module.training``, so ``model.eval()`` switches it off. :meth:`ExpertDropout.remove`
restores the original rates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import nn

from ..anatomy import MoEAnatomy, describe_moe, require_moe

logger = logging.getLogger(__name__)


def validate_dropout(p: Any, name: str = "moe_expert_dropout") -> float:
    """Return ``p`` as a float in ``[0, 1)`` or raise ``ValueError``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def _output_dropout(p: float):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, module.training),) + output[1:]
        return F.dropout(output, p, module.training)

    return hook


def _expert_modules(model: nn.Module, anatomy: MoEAnatomy) -> tuple[list[nn.Module], list[nn.Module]]:
    """(per-expert modules, fused expert containers) of every MoE layer."""
    per_expert: list[nn.Module] = []
    fused: list[nn.Module] = []
    for layer in anatomy.layers:
        for path in layer.expert_paths:
            container = model.get_submodule(path)
            if any(name.startswith(path + ".") for name in layer.fused_experts):
                fused.append(container)
                continue
            expert_names = {name[len(path) + 1 :].split(".")[0] for name in layer.per_expert if name.startswith(path + ".")}
            per_expert.extend(container.get_submodule(n) for n in sorted(expert_names))
    return per_expert, fused


@dataclass
class ExpertDropout:
    """Expert dropout installed on a model; :meth:`remove` restores it."""

    p: float
    dropout_modules: list[tuple[nn.Dropout, float]] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list, repr=False)

    @property
    def num_hooks(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        for module, original in self.dropout_modules:
            module.p = original
        self.dropout_modules.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def apply_expert_dropout(model: nn.Module, p: float, anatomy: MoEAnatomy | None = None) -> ExpertDropout:
    """Set dropout rate ``p`` inside the routed experts of ``model`` (see module docstring)."""
    p = validate_dropout(p)
    anatomy = anatomy or describe_moe(model)
    require_moe(anatomy, "Expert dropout")
    handle = ExpertDropout(p)
    per_expert, fused = _expert_modules(model, anatomy)
    for expert in per_expert:
        drops = [m for m in expert.modules() if isinstance(m, nn.Dropout)]
        if not drops:
            handle._handles.append(expert.register_forward_hook(_output_dropout(p)))
        for m in drops:
            handle.dropout_modules.append((m, m.p))
            m.p = p
    for container in fused:
        handle._handles.append(container.register_forward_hook(_output_dropout(p)))
    logger.info(
        "expert dropout %.2f: %d dropout modules inside experts, %d expert-output hooks",
        p,
        len(handle.dropout_modules),
        len(handle._handles),
    )
    return handle
