"""Tiny MoE run that can be SIGKILLed at a chosen write, for the crash-safety tests (``tests/test_crash_safety.py``).

    python tests/scripts/crash_train.py OUT                    # uninterrupted; counts the writes it makes
    python tests/scripts/crash_train.py OUT --kill-at K --frac F   # SIGKILL itself in the middle of write K
    python tests/scripts/crash_train.py OUT --resume           # train(resume_from_checkpoint=True), no manual step

A tiny Mixtral trains ``STEPS`` steps with ``MoETrainer``: router aux + z losses, expert-load logging with the
JSONL file, routing drift every 2 steps (so the drift reference is in every checkpoint), a checkpoint every step.
Every file write of the run is an event: model weights (safetensors), ``torch.save`` (optimizer, scheduler, RNG
state, training args; this package's atomic writes go through it too), ``trainer_state.json`` and each
``expert_load.jsonl`` line. With ``--kill-at K`` the K-th event writes only the first ``F`` share of its bytes
(to the path, or to the temporary file of an atomic write), flushes and the process SIGKILLs itself: a kill in
the middle of a checkpoint write, as a power cut or the OOM killer would leave it.

Files next to OUT: ``events.json`` (number of events of an uninterrupted run), ``log_history.json`` and
``final_weights.pt`` after a finished run.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import signal
import sys

STEPS = 6


class Killer:
    def __init__(self, kill_at: int | None, frac: float) -> None:
        self.kill_at, self.frac, self.events = kill_at, frac, 0

    def event(self, data: bytes, target) -> bool:
        """Count one write; at the chosen one write ``frac`` of ``data`` to ``target`` and SIGKILL this process."""
        self.events += 1
        if self.kill_at is None or self.events != self.kill_at:
            return False
        part = data[: int(len(data) * self.frac)]
        if isinstance(target, (str, os.PathLike)):
            with open(target, "wb") as f:
                f.write(part)
                f.flush()
                os.fsync(f.fileno())
        else:
            target.write(part)
            target.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        return True  # pragma: no cover - not reached


def instrument(killer: Killer) -> None:
    import safetensors.torch
    import torch
    from transformers import TrainerState, modeling_utils

    from hf_moe_tuning.callbacks import expert_load

    torch_save = torch.save

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        torch_save(obj, buffer, *args, **kwargs)
        if not killer.event(buffer.getvalue(), f):
            torch_save(obj, f, *args, **kwargs)

    torch.save = save

    safe_save = modeling_utils.safe_save_file

    def safe_save_file(tensors, filename, metadata=None):
        if not killer.event(safetensors.torch.save(tensors, metadata=metadata), filename):
            safe_save(tensors, filename, metadata=metadata)

    modeling_utils.safe_save_file = safe_save_file

    save_to_json = TrainerState.save_to_json

    def state_save_to_json(self, json_path):
        text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"
        if not killer.event(text.encode(), json_path):
            save_to_json(self, json_path)

    TrainerState.save_to_json = state_save_to_json

    write_jsonl = expert_load.ExpertLoadCallback._write_jsonl

    def jsonl(self, args, state, split, loads, metrics):
        if self.write_jsonl:  # the line the callback is about to append; a kill leaves part of it
            record = {"split": split, "step": state.global_step, "epoch": state.epoch,
                      "layers": [load.to_dict() for load in loads], "metrics": metrics}
            with open(os.path.join(args.output_dir, expert_load.JSONL_NAME), "ab") as f:
                killer.event((json.dumps(record) + "\n").encode(), f)
        write_jsonl(self, args, state, split, loads, metrics)

    expert_load.ExpertLoadCallback._write_jsonl = jsonl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--frac", type=float, default=0.5)
    parser.add_argument("--resume", action="store_true")
    opts = parser.parse_args()

    killer = Killer(opts.kill_at, opts.frac)
    instrument(killer)

    import torch
    from datasets import Dataset

    from hf_moe_tuning import MoETrainer, MoETrainingArguments
    from hf_moe_tuning.models import build_tiny_model

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 300, (12,), generator=g).tolist()} for _ in range(32)]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    args = MoETrainingArguments(
        opts.out, max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=1,
        use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
        moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001, moe_drift_probe_size=4, moe_drift_every_steps=2,
        moe_expert_load_heatmap=False,
    )
    trainer = MoETrainer(model=build_tiny_model("mixtral", seed=0), args=args, train_dataset=Dataset.from_list(rows))
    trainer.train(resume_from_checkpoint=True if opts.resume else None)

    here = os.path.dirname(os.path.abspath(opts.out))
    killer.kill_at = None
    if not opts.resume:
        with open(os.path.join(here, "events.json"), "w", encoding="utf-8") as f:
            json.dump(killer.events, f)
    with open(os.path.join(here, "log_history.json"), "w", encoding="utf-8") as f:
        json.dump(trainer.state.log_history, f)
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, os.path.join(here, "final_weights.pt"))


if __name__ == "__main__":
    sys.exit(main())
