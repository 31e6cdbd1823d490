"""Cross-process reductions over the processes the Trainer's accelerator trains with, and nothing else.

Every MoE callback that sums counts or checks a flag on all processes (expert-load counts, router-loss
totals, NaN flags, bias-balancing loads) goes through :func:`reduce_sum` / :func:`reduce_max`, which are
``accelerate.utils.reduce`` over accelerate's process state – the state ``TrainingArguments`` sets up and the
Trainer's ``Accelerator`` trains with. They reduce over ``torch.distributed``'s process group only when that
state is distributed (DDP, FSDP, DeepSpeed, multi-CPU).

Why not ``torch.distributed`` directly: a process group can exist while the Trainer trains alone. A DDP config
launched without ``--cpu`` on a CPU-only machine starts ``N`` processes that each build a non-distributed
accelerator (``distributed_type == NO``) – ``N`` independent runs – while a process group may still be
initialised (transformers warns "torch.distributed process group is initialized, but parallel_mode !=
ParallelMode.DISTRIBUTED"). Reducing over that group summed the independent runs' counts: ``expert_load.jsonl``
got every line from each run with ``N`` times the counts. :func:`warn_if_independent_runs` names the situation
once per output directory.

Outside a Trainer (accelerate's state never set up) nothing is reduced: there is no training process group.
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, reduce

logger = logging.getLogger(__name__)

_warned_output_dirs: set[str] = set()


def _state() -> PartialState | None:
    """accelerate's process state if a Trainer / Accelerator has set it up (never creates it)."""
    if not PartialState._shared_state:  # creating it here would read the launcher's environment on its own
        return None
    return PartialState()


def training_world_size() -> int:
    """How many processes the Trainer's accelerator trains with (1 when not distributed or outside a Trainer)."""
    state = _state()
    if state is None or state.distributed_type == DistributedType.NO:
        return 1
    return int(state.num_processes)


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the training processes (a new tensor; ``tensor`` itself is left as it is).

    Collective when training is distributed: every training process must call it, in the same order.
    """
    if training_world_size() == 1:
        return tensor
    return reduce(tensor, reduction="sum")


def reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``tensor`` over the training processes (a new tensor). Collective, like
    :func:`reduce_sum`."""
    if training_world_size() == 1:
        return tensor
    return reduce(tensor, reduction="max")


def launched_processes() -> int:
    """How many processes were launched together: the ``torch.distributed`` group size if one is initialised,
    else the launcher's ``WORLD_SIZE`` (1 for a plain ``python`` run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def warn_if_independent_runs(output_dir: str | None) -> bool:
    """Warn (once per ``output_dir``) when more processes were launched than the accelerator trains with.

    Then the processes are independent runs that all write ``output_dir`` (``expert_load.jsonl``, checkpoints,
    ``moe_run.json``): their lines interleave in the same files. Returns whether it is the case.
    """
    launched, training = launched_processes(), training_world_size()
    if launched <= training:
        return False
    key = os.path.abspath(output_dir or ".")
    if key not in _warned_output_dirs:
        _warned_output_dirs.add(key)
        state = _state()
        kind = state.distributed_type.value if state is not None else "none"
        logger.warning(
            "%d processes were launched, but the Trainer's accelerator trains with %d (distributed_type=%s): they are "
            "%d independent runs, and each writes output_dir=%r (expert_load.jsonl, checkpoints), so their lines "
            "interleave there. The MoE metrics are reduced over the %d process(es) of each run only. To train one "
            "distributed run on a CPU-only machine, set use_cpu=True in the training arguments (accelerate then trains "
            "on gloo, MULTI_CPU); to keep independent runs, give each its own output_dir.",
            launched, training, kind, launched // max(training, 1), output_dir, training,
        )
    return True


__all__ = ["launched_processes", "reduce_max", "reduce_sum", "training_world_size", "warn_if_independent_runs"]
