"""The overhead benchmarks still run end to end (tiny settings) and end with their ratio, as documented.

These are smoke runs, not measurements: the ratios are only checked to be positive numbers. The
figures in the README come from the default settings (see the scripts' docstrings).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script, args",
    [
        ("expert_load_overhead.py", ["--rounds", "1", "--logging-steps", "2", "--drift-every-steps", "4",
                                     "--max-len", "16", "--expert-capacity", "4"]),
        ("router_loss_overhead.py", ["--hidden", "64", "--seq", "32", "--layers", "2", "--rounds", "1",
                                     "--logging-steps", "2"]),
    ],
)
def test_overhead_benchmark_runs_and_prints_its_ratio_last(script, args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert float(lines[-1]) > 0
    assert any(line.startswith("noise floor") for line in lines)
