"""FSDP2 (``fully_shard`` by :func:`hf_moe_tuning.distributed.fully_shard_trainer`) against DDP, for ``tests/test_fsdp2.py``.

    torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp2_train.py OUT      # 2 gloo processes on CPU

One launch runs six short ``MoETrainer`` trainings of a tiny Mixtral (router aux + z loss, expert-load
logging, weight decay 0.1, lr 1e-2, global batch 4 = 2 per process, sequences taken in order) one after
another, each from the same initial weights:

=================  ===========================================================================
phase              what
=================  ===========================================================================
``ddp_non_moe``    DDP (accelerate's wrapper), ``moe_freeze_strategy="non_moe"``, 4 steps
``fsdp2_non_moe``  the same sharded by the package helper
``fsdp2_subset``   sharded, ``moe_freeze_strategy="moe"``, ``moe_experts="0,2"`` (fused expert slices)
``fsdp2_all``      sharded, everything trains, 4 steps (the uninterrupted run)
``fsdp2_first``    sharded, 2 steps, then a sharded checkpoint (``save_sharded_checkpoint``)
``fsdp2_resumed``  a new model and trainer sharded, the checkpoint loaded, the last 2 batches trained
=================  ===========================================================================

Rank 0 writes ``OUT/initial.pt`` (the full initial weights), ``OUT/<phase>.pt`` (the full final weights,
gathered from the shards by every rank) and ``OUT/report.json`` (per phase: log history, what the model's
parameters were during training, the setup the helper returned).
"""

from __future__ import annotations

import json
import os
import sys

GLOBAL_BATCH = 4
SEQ_LEN = 12
STEPS = 4
PHASES = {
    "ddp_non_moe": {"shard": False, "args": {"moe_freeze_strategy": "non_moe"}},
    "fsdp2_non_moe": {"shard": True, "args": {"moe_freeze_strategy": "non_moe"}},
    "fsdp2_subset": {"shard": True, "args": {"moe_freeze_strategy": "moe", "moe_experts": "0,2"}},
    "fsdp2_all": {"shard": True, "args": {}},
    "fsdp2_first": {"shard": True, "args": {}, "steps": 2, "save": True},
    "fsdp2_resumed": {"shard": True, "args": {}, "steps": 2, "resume": True},
}


def full_state(model) -> dict:
    """Every parameter as a full tensor (DTensor shards gathered: a collective, every rank calls it)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in model.named_parameters():
        value = param.full_tensor() if isinstance(param, DTensor) else param
        out[name] = value.detach().clone()
    return out


def _probe_class():
    from torch.distributed.tensor import DTensor, Shard
    from transformers import TrainerCallback

    from hf_moe_tuning.distributed import load_sharded_checkpoint, save_sharded_checkpoint

    class Probe(TrainerCallback):
        """Records what the parameters are while training; loads / saves the sharded checkpoint."""

        def __init__(self, checkpoint: str, resume: bool, save_at: int | None):
            self.checkpoint, self.resume, self.save_at, self.seen = checkpoint, resume, save_at, {}

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if self.resume:  # the optimizer exists now (its moments are created by the load)
                load_sharded_checkpoint(model, optimizer, self.checkpoint)
            params = dict(model.named_parameters())
            self.seen.update(
                dtensor=sorted(n for n, p in params.items() if isinstance(p, DTensor)),
                plain=sorted(n for n, p in params.items() if not isinstance(p, DTensor)),
                shard0=all(p.placements == (Shard(0),) for p in params.values() if isinstance(p, DTensor)),
                local_numel=sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params.values()),
                numel=sum(p.numel() for p in params.values()),
                fsdp_modules=sum(type(m).__name__.startswith("FSDP") for m in model.modules()),
            )

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == self.save_at:
                save_sharded_checkpoint(model, optimizer, self.checkpoint)

    return Probe


def main(out: str) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import PartialState
    from datasets import Dataset
    from torch.utils.data import SequentialSampler

    from hf_moe_tuning import MoETrainer, MoETrainingArguments
    from hf_moe_tuning.distributed import fully_shard_trainer
    from hf_moe_tuning.models import build_tiny_model

    Probe = _probe_class()
    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    torch.set_num_threads(1)

    class InOrderTrainer(MoETrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 300, (SEQ_LEN,), generator=g).tolist()} for _ in range(GLOBAL_BATCH * STEPS)]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    os.makedirs(out, exist_ok=True)
    if rank == 0:
        torch.save(full_state(build_tiny_model("mixtral", seed=0)), os.path.join(out, "initial.pt"))
    checkpoint = os.path.join(out, "sharded_checkpoint")
    report = {}

    for phase, spec in PHASES.items():
        steps = spec.get("steps", STEPS)
        data = rows[GLOBAL_BATCH * (STEPS - steps):] if spec.get("resume") else rows[: GLOBAL_BATCH * steps]
        model = build_tiny_model("mixtral", seed=0)
        args = MoETrainingArguments(
            os.path.join(out, phase), per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=steps,
            logging_steps=1, save_strategy="no", learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="constant",
            use_cpu=True, report_to=[], disable_tqdm=True, seed=0, moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001,
            moe_drift_probe_size=0, moe_expert_load_heatmap=False, moe_expert_load_jsonl=False, moe_model_card=False,
            ddp_backend="gloo", **spec["args"],
        )
        probe = Probe(checkpoint, resume=bool(spec.get("resume")), save_at=steps if spec.get("save") else None)
        trainer = InOrderTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), callbacks=[probe])
        setup = fully_shard_trainer(trainer) if spec["shard"] else None
        trainer.train()
        final = full_state(trainer.model)
        if rank == 0:
            torch.save(final, os.path.join(out, f"{phase}.pt"))
            report[phase] = {
                "log": trainer.state.log_history, "seen": probe.seen, "world": trainer.args.world_size,
                "wrapper": type(trainer.model_wrapped).__name__,
                "is_fsdp_enabled": trainer.is_fsdp_enabled,
                "setup": None if setup is None else {"backend": setup.backend, "fsdp_wrap": setup.fsdp_wrap,
                                                     "expert_masks": setup.expert_masks},
            }
        dist.barrier()
    if rank == 0:
        with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
    from accelerate import PartialState

    PartialState().wait_for_everyone()
    PartialState().destroy_process_group()
