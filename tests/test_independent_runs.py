"""Processes that share a ``torch.distributed`` group but train alone are independent runs (issue 15, bug 3).

A DDP config launched without ``--cpu`` on a CPU-only machine starts ``N`` processes whose accelerators are
not distributed (``distributed_type == NO``): each trains alone on its own batches. The MoE callbacks used to
all-reduce over the ``torch.distributed`` group anyway, so ``expert_load.jsonl`` and the logged router /
expert-load metrics held ``N`` times the counts (5120 tokens for 2560). They now reduce over the processes the
Trainer's accelerator trains with (:mod:`hf_moe_tuning.reduction`), and warn that the runs are independent.

The file is also the training script: ``python tests/test_independent_runs.py OUT RANK INIT_FILE`` joins a
2-process gloo group through ``INIT_FILE`` (no launcher environment, so accelerate sees one process) and trains
alone; ``python tests/test_independent_runs.py OUT`` trains the same run without any group (the reference).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
WARNING = "they are 2 independent runs"


def run_training(out: str) -> None:
    """Train a tiny Switch 3 steps with router losses and expert-load logging; dump the log history."""
    import torch
    from datasets import Dataset
    from helpers import variable_length_rows
    from transformers import ByT5Tokenizer, DataCollatorForSeq2Seq

    from hf_moe_tuning import MoETrainer, MoETrainingArguments
    from hf_moe_tuning.models import build_tiny_model

    torch.manual_seed(0)
    model = build_tiny_model("switch", expert_capacity=3)
    rows = variable_length_rows("switch", 12)
    args = MoETrainingArguments(
        out,
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=1,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        moe_aux_loss_coef=0.01,
        moe_z_loss_coef=0.001,
        moe_drift_probe_size=0,
        moe_expert_load_heatmap=False,
    )
    trainer = MoETrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorForSeq2Seq(ByT5Tokenizer(), model=model, padding=True),
    )
    assert trainer.accelerator.num_processes == 1
    trainer.train()
    with open(os.path.join(out, "log_history.json"), "w", encoding="utf-8") as f:
        json.dump(trainer.state.log_history, f)


def _records(out: str) -> list[dict]:
    with open(os.path.join(out, "expert_load.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "log_history.json"), encoding="utf-8") as f:
        history = json.load(f)
    return [{k: v for k, v in row.items() if k.startswith(("router/", "moe/", "lm_loss"))} for row in history
            if "loss" in row]


@pytest.mark.slow
def test_independent_runs_sharing_a_process_group_count_alone_and_warn(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    init = str(tmp_path / "gloo_init")
    runs = [
        subprocess.Popen([sys.executable, HERE, str(tmp_path / f"rank{rank}"), str(rank), init], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    reference = str(tmp_path / "alone")
    run_training(reference)  # meanwhile, in this process: no process group at all
    errors = []
    for proc in runs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        errors.append(err)

    expected = _records(reference)
    assert [(r["split"], r["step"]) for r in expected] == [("train", 1), ("train", 2), ("train", 3)]
    for rank in range(2):
        out = str(tmp_path / f"rank{rank}")
        got = _records(out)
        assert [r["layers"] for r in got] == [r["layers"] for r in expected]  # not twice the counts
        for row, ref in zip(_metrics(out), _metrics(reference)):
            assert row.keys() == ref.keys() and {"router/aux_loss", "moe/load_cv_mean", "lm_loss"} <= set(row)
            for key in row:
                assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
        assert WARNING in errors[rank] and out in errors[rank]


if __name__ == "__main__":
    if len(sys.argv) == 4:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{sys.argv[3]}", rank=int(sys.argv[2]), world_size=2)
    run_training(sys.argv[1])
    if len(sys.argv) == 4:
        dist.barrier()
        dist.destroy_process_group()
