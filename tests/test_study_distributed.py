"""A whole study on 2 processes equals the same study on 1 (the README's launch line, shrunk with ``--set``).

``accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 recipes/train.py <smoke.yaml>``
runs every stage (pretrain, instruct, fine-tune with early stopping, zero-shot and test evaluation) with both
gloo processes. Checked against a 1-process run of the same command, for the encoder-decoder study
(``flan_moe``: Switch through ``MoETrainer``) and the decoder-only one (``instruct_moe``: Mixtral through TRL's
``SFTTrainer``): every score within 2 points, every training loss within 1 %, the same global batch and
optimizer steps; rank 0 alone wrote the results. (``accelerate launch --cpu --num_processes 2`` would start one
process: ``--cpu`` selects accelerate's one-process launcher.)

Each smoke recipe is shrunk to one fine-tuned and one zero-shot arm of the instruction-tuned MoE, one seed and
fewer pretraining / instruction steps, so both runs of a study finish in about a minute on 2 idle cores.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ["accelerate", "launch", "--config_file", "recipes/accelerate/ddp.yaml", "--num_processes", "2"]
COMMON = ["--seeds", "1", "--threads", "1", "--no-progress", "--set", "pretrain.args.max_steps=8",
          "--set", "instruct.args.max_steps=6"]
STUDIES = {
    "flan_moe": [
        "--set", "arms={flan_moe: {model: switch, instruct: true}, "
                 "flan_moe_0shot: {model: switch, instruct: true, finetune: false}}",
        "--set", "deltas=[{name: d, expr: flan_moe - flan_moe_0shot, paper: '+'}]",
    ],
    "instruct_moe": [
        "--set", "arms={instruct_moe: {model: moe, instruct: true}, "
                 "instruct_moe_0shot: {model: moe, instruct: true, finetune: false}}",
        "--set", "deltas=[{name: d, expr: instruct_moe - instruct_moe_0shot, paper: '+'}]",
    ],
}


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg")


def _rows(out: Path) -> dict[tuple, dict[str, str]]:
    with (out / "results.csv").open(newline="") as f:
        return {(r["arm"], r["task"], r["seed"], r["metric"]): r for r in csv.DictReader(f)}


def _close(a: str, b: str, rel: float) -> bool:
    return abs(float(a) - float(b)) <= rel * abs(float(a))


@pytest.mark.slow
@pytest.mark.parametrize("study", sorted(STUDIES))
def test_two_processes_reproduce_one_process(tmp_path, study):
    recipe = f"recipes/{study}/smoke.yaml"
    runs = {}
    for n, launcher in ((1, [sys.executable]), (2, LAUNCH)):
        folder = tmp_path / f"p{n}"
        cmd = [*launcher, "recipes/train.py", recipe, *COMMON, *STUDIES[study],
               "--output-dir", str(folder / "out"), "--cache-dir", str(folder / "cache")]
        runs[n] = (folder, subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True))
    for _folder, proc in runs.values():  # started together: the 1-process run overlaps the launcher's start-up
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        assert out.count("results in") == 1, out  # printed by rank 0 only
    (one, _), (two, _) = runs[1], runs[2]

    info1, info2 = (json.loads((f / "out" / "run.json").read_text()) for f in (one, two))
    assert "processes" not in info1 and info2["processes"] == 2
    rows1, rows2 = _rows(one / "out"), _rows(two / "out")
    assert rows1.keys() == rows2.keys()
    trained = [k for k, r in rows1.items() if r["finetuned"] == "1"]
    assert {k[0] for k in trained} == {study}  # the fine-tuned arm has training losses to compare
    for key, r1 in rows1.items():
        r2 = rows2[key]
        assert abs(float(r1["score"]) - float(r2["score"])) <= 2.0, (key, r1["score"], r2["score"])
        for column in ("batch_size", "optimizer_steps"):
            assert r1[column] == r2[column], (key, column)
        if key in trained:
            assert _close(r1["train_loss"], r2["train_loss"], 0.01), (key, r1["train_loss"], r2["train_loss"])
    for name, model1 in info1["models"].items():
        model2 = info2["models"][name]
        for loss in ("pretrain_loss", "mixture_train_loss", "mixture_eval_loss"):
            assert _close(model1[loss], model2[loss], 0.01), (name, loss, model1[loss], model2[loss])

    # rank 0 owns the cache: every stage folder is complete, with no second rank's leftovers
    stages = [p for p in (two / "cache").glob("*/*") if p.is_dir()]
    assert stages and all((p / "DONE").is_file() for p in stages)
    assert not [p for p in (two / "cache").rglob("tmp*") if p.is_dir()]
