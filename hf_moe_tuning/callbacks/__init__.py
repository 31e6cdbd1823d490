"""One callback per file, each a thin wrapper over the package's pure functions."""

from .base import MoEMetricsCallback, merge_pending_metrics
from .expert_load import ExpertLoadCallback
from .freezing import MoEFreezingCallback
from .nan_guard import NaNGuardCallback
from .resume import FusedResumeCallback
from .router_loss import RouterLossCallback

__all__ = [
    "ExpertLoadCallback",
    "FusedResumeCallback",
    "NaNGuardCallback",
    "MoEFreezingCallback",
    "MoEMetricsCallback",
    "RouterLossCallback",
    "merge_pending_metrics",
]
