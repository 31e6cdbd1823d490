"""One callback per file, each a thin wrapper over the package's pure functions."""

from .base import MoEMetricsCallback, merge_pending_metrics
from .expert_load import ExpertLoadCallback
from .freezing import MoEFreezingCallback
from .router_loss import RouterLossCallback

__all__ = [
    "ExpertLoadCallback",
    "MoEFreezingCallback",
    "MoEMetricsCallback",
    "RouterLossCallback",
    "merge_pending_metrics",
]
