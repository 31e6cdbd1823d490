"""``evaluate`` metric modules shipped with the package, loaded by local path (no Hub access).

>>> from hf_moe_tuning.metrics_modules import load_metric
>>> load_metric("accuracy").compute(predictions=["yes"], references=["yes"])
{'accuracy': 1.0}
"""

from __future__ import annotations

from pathlib import Path

import evaluate

MODULES_DIR = Path(__file__).parent
#: Names of the shipped metric modules (one folder each, holding ``<name>.py``).
METRICS: tuple[str, ...] = ("accuracy", "exact_match", "token_f1")


def metric_path(name: str) -> str:
    """Local path of the shipped metric module ``name``, for ``evaluate.load``."""
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; shipped metrics: {list(METRICS)}")
    return str(MODULES_DIR / name)


def load_metric(name: str) -> evaluate.EvaluationModule:
    """``evaluate.load`` of a shipped metric module by name (offline)."""
    return evaluate.load(metric_path(name))
