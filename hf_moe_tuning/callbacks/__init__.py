"""One callback per file, each a thin wrapper over the package's pure functions."""

from .base import MoEMetricsCallback, merge_pending_metrics
from .freezing import MoEFreezingCallback

__all__ = ["MoEFreezingCallback", "MoEMetricsCallback", "merge_pending_metrics"]
