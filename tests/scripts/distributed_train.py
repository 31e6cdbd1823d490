"""Tiny MoE training run for the multi-process tests (``tests/test_distributed.py``).

    python tests/scripts/distributed_train.py OUT                       # 1 process, batch 4
    accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 \
        tests/scripts/distributed_train.py OUT                          # 2 processes x batch 2 (gloo on CPU)

A tiny Mixtral trains 4 steps with the router aux and z losses on and expert-load logging; samples are
taken in order, so every global batch holds the same 4 sequences whatever the process count, and all
sequences have the same length (no padding), so per-process token means equal the global mean. A
checkpoint is saved at step 2; after training, 21 held-out sequences are evaluated once. Every process records the files it creates or writes under OUT (Python
audit hook, plus ``torch.save`` and the safetensors writer) in ``OUT/../writes_rank{r}.json``; rank 0 also dumps ``log_history.json`` next to it.
"""

from __future__ import annotations

import json
import os
import sys

GLOBAL_BATCH = 4
SEQ_LEN = 12
EVAL_SIZE = 21


def _record_writes(root: str, sink: list[str]) -> None:
    """Record paths under ``root`` that this process opens for writing, creates, renames or removes."""
    root = os.path.abspath(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode = args[0], args[1]
            writes = isinstance(mode, str) and any(c in mode for c in "wax+")
            if isinstance(mode, int) or mode is None:  # os.open flags
                writes = bool(args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)) if len(args) > 2 else False
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "shutil.rmtree", "shutil.copyfile"):
            path, writes = args[0], True
        else:
            return
        if writes and isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(root):
                sink.append(os.path.relpath(path, root))

    sys.addaudithook(hook)

    # tensors are written by C++ (torch.save's zip writer, safetensors), which the audit hook does not see
    import torch
    import transformers.modeling_utils as modeling_utils

    def recording(save, position):
        def wrapper(*args, **kwargs):
            target = args[position] if len(args) > position else kwargs.get("f", kwargs.get("filename"))
            if isinstance(target, (str, os.PathLike)):
                hook("open", (target, "wb"))
            return save(*args, **kwargs)

        return wrapper

    torch.save = recording(torch.save, 1)
    modeling_utils.safe_save_file = recording(modeling_utils.safe_save_file, 1)


def run(out: str, expect_backend: str = "none") -> None:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    writes: list[str] = []
    _record_writes(out, writes)

    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler

    from hf_moe_tuning import MoETrainer, MoETrainingArguments
    from hf_moe_tuning.callbacks.expert_load import ExpertLoadCallback
    from hf_moe_tuning.callbacks.router_loss import RouterLossCallback
    from hf_moe_tuning.distributed import configure_distributed
    from hf_moe_tuning.models import build_tiny_model
    from hf_moe_tuning.trainer import build_moe_callbacks

    class InOrderTrainer(MoETrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    torch.set_num_threads(1)
    model = build_tiny_model("mixtral", seed=0)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 300, (SEQ_LEN,), generator=g).tolist()} for _ in range(16)]
    # 21 evaluation sequences: 2 processes x batch 2 leave a short last batch, which accelerate pads with
    # duplicates of the first samples (gather_for_metrics drops them again)
    eval_rows = [{"input_ids": torch.randint(3, 300, (SEQ_LEN,), generator=g).tolist()} for _ in range(EVAL_SIZE)]
    for row in rows + eval_rows:
        row["labels"] = list(row["input_ids"])
    args = MoETrainingArguments(
        out,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        per_device_eval_batch_size=GLOBAL_BATCH // world,
        max_steps=4,
        logging_steps=1,
        save_steps=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        moe_aux_loss_coef=0.01,
        moe_z_loss_coef=0.001,
        moe_drift_probe_size=0,
        moe_expert_load_heatmap=False,
        ddp_backend="gloo" if world > 1 else None,
    )
    wanted = [RouterLossCallback.from_args(args), ExpertLoadCallback.from_args(args)]
    present = {type(cb) for cb in build_moe_callbacks(args, model)}  # MoETrainer may build them already
    trainer = InOrderTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows),
        callbacks=[cb for cb in wanted if cb is not None and type(cb) not in present],
    )
    setup = configure_distributed(trainer)
    assert setup.backend == expect_backend, setup  # DDP needs nothing
    trainer.train()
    trainer.evaluate()
    assert trainer.args.world_size == world, "the launcher did not start the expected number of processes"
    audit_dir = os.path.dirname(os.path.abspath(out))
    with open(os.path.join(audit_dir, f"writes_rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(sorted(set(writes)), f)
    if trainer.is_world_process_zero():
        with open(os.path.join(audit_dir, "log_history.json"), "w", encoding="utf-8") as f:
            json.dump(trainer.state.log_history, f)


if __name__ == "__main__":
    run(*sys.argv[1:3])
    from accelerate import PartialState

    # without this, gloo's threads can abort the interpreter at exit ("terminate called without an active
    # exception"), failing an otherwise finished run
    PartialState().wait_for_everyone()
    PartialState().destroy_process_group()
