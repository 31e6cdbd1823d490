"""DeepSpeed ZeRO-3 for real on 2 CPU gloo processes: ``scripts/zero3_check.py``'s checks must all PASS.

The script trains a tiny Mixtral with ``MoETrainer`` under DDP (``recipes/accelerate/ddp.yaml``) and under ZeRO-3
(``recipes/accelerate/deepspeed_zero3.yaml``, fp32), both launched with ``accelerate launch --num_processes 2``
as on GPUs; without GPUs DeepSpeed picks its CPU accelerator and gloo. Its ``--compare`` step prints one
PASS/FAIL line per check (see its docstring):

* the parameters really are partitioned (``ds_id`` on every parameter, local partitions smaller than the
  tensors) and the MoE blocks are registered as ZeRO-3 leaf modules;
* ``non_moe`` freezing leaves experts and routers bitwise unchanged (and trains attention);
* router losses and expert-load metrics equal the DDP run's within 1e-5;
* DeepSpeed's partitioned checkpoint at step 2 resumes to the uninterrupted run's weights;
* an expert subset inside fused expert tensors is refused with an error naming ZeRO-3.

Skipped when deepspeed is not installed (an optional extra: ``pip install 'hf-moe-tuning[deepspeed]'``). The
first run on a machine also JIT-compiles DeepSpeed's shared-memory collective op (cached in
``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip(
        "deepspeed is not installed (optional: pip install 'hf-moe-tuning[deepspeed]'); ZeRO-3 is checked for "
        "configuration only (tests/test_distributed.py)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "zero3_check.py"
CONFIGS = ROOT / "recipes" / "accelerate"
CHECKS = [
    "parameters partitioned by ZeRO-3",
    "MoE blocks registered as ZeRO-3 leaf modules",
    "non_moe: experts and routers bitwise unchanged",
    "router losses and expert load equal DDP within 1e-5",
    "checkpoint resumes to the uninterrupted weights",
    "fused expert subsets refused with a clear error",
]


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository root; fail the test with the end of its output when it fails."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, str]:
    """``{check: "PASS" or "FAIL"}`` from both launches and ``--compare``."""
    out = tmp_path_factory.mktemp("zero3")
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
        MPLBACKEND="Agg", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu",
    )
    launch = ["accelerate", "launch", "--num_processes", "2", "--mixed_precision", "no"]
    _run([*launch, "--config_file", str(CONFIGS / "ddp.yaml"), str(SCRIPT), str(out), "--mode", "ddp"], env)
    _run([*launch, "--config_file", str(CONFIGS / "deepspeed_zero3.yaml"), str(SCRIPT), str(out), "--mode", "zero3"], env)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--compare"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line.split(None, 1) for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    found = {name: verdict for verdict, name in lines}
    assert proc.returncode == (0 if set(found.values()) == {"PASS"} else 1), proc.stderr[-4000:]
    return found


def test_every_check_is_reported(results):
    assert list(results) == CHECKS


@pytest.mark.parametrize("check", CHECKS)
def test_zero3_check_passes(results, check):
    assert results.get(check) == "PASS", results
