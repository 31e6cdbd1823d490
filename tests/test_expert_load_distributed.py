"""A 2-process (gloo, CPU) run logs the same expert counts as a 1-process run over the same global batch.

The file is also the training script: ``python tests/test_expert_load_distributed.py OUT`` (1 process,
batch 4) or ``torchrun --standalone --nproc_per_node 2 tests/test_expert_load_distributed.py OUT``
(2 processes on the gloo backend, batch 2 each; ``accelerate launch --cpu`` starts one process only). Samples are taken in order, so every global batch holds the same examples.
The learning rate is 0 so both runs route with the same weights: the test is about counting and the
cross-process reduction, not about optimisation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
GLOBAL_BATCH = 4


def run_training(out: str) -> None:
    import torch
    from datasets import Dataset
    from helpers import variable_length_rows
    from torch.utils.data import SequentialSampler
    from transformers import ByT5Tokenizer, DataCollatorForSeq2Seq, Trainer

    from hf_moe_tuning import MoETrainingArguments
    from hf_moe_tuning.callbacks.expert_load import ExpertLoadCallback
    from hf_moe_tuning.models import build_tiny_model
    from hf_moe_tuning.trainer import enable_moe_logging

    class InOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    model = build_tiny_model("switch", expert_capacity=3)
    rows = variable_length_rows("switch", 12)
    args = MoETrainingArguments(
        out,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        per_device_eval_batch_size=GLOBAL_BATCH // world,
        max_steps=3,
        logging_steps=1,
        learning_rate=0.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        moe_drift_probe_size=4,
        moe_expert_load_heatmap=False,
        ddp_backend="gloo" if world > 1 else None,
    )
    trainer = InOrderTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows[:8]),
        data_collator=DataCollatorForSeq2Seq(ByT5Tokenizer(), model=model, padding=True),
        callbacks=[ExpertLoadCallback.from_args(args)],
    )
    enable_moe_logging(trainer)
    trainer.train()
    trainer.evaluate()
    assert trainer.args.world_size == world, "the launcher did not start the expected number of processes"
    if trainer.is_world_process_zero():
        with open(os.path.join(out, "log_history.json"), "w", encoding="utf-8") as f:
            json.dump(trainer.state.log_history, f)


def _load(out: str) -> tuple[list[dict], list[dict]]:
    with open(os.path.join(out, "expert_load.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(out, "log_history.json"), encoding="utf-8") as f:
        history = json.load(f)
    return records, history


@pytest.mark.slow
def test_two_processes_log_the_same_counts_as_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    single, double = str(tmp_path / "one"), str(tmp_path / "two")
    run_training(single)  # in this process: no second interpreter start-up
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", HERE, double]
    subprocess.run(launch, check=True, env=env, cwd=ROOT, timeout=300)

    one, one_history = _load(single)
    two, two_history = _load(double)
    assert [(r["split"], r["step"]) for r in one] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    assert [(r["split"], r["step"]) for r in two] == [(r["split"], r["step"]) for r in one]
    for a, b in zip(one, two):
        assert a["layers"] == b["layers"]  # counts, tokens and dropped per layer and expert
        assert a["metrics"] == pytest.approx(b["metrics"])
    assert any(sum(layer.get("dropped", [0])) for r in one for layer in r["layers"])
    keys = [k for k in one_history[0] if k.startswith("moe/")]
    assert keys and all(one_history[0][k] == pytest.approx(two_history[0][k]) for k in keys)


if __name__ == "__main__":
    run_training(sys.argv[1])
    from accelerate import PartialState

    # without this, gloo's threads can abort the interpreter at exit ("terminate called without an active
    # exception"), failing an otherwise finished run
    PartialState().wait_for_everyone()
    PartialState().destroy_process_group()
