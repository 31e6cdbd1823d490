"""Step-time overhead of ``ExpertLoadCallback``: ratio of training step time with the callback vs without.

Three copies of the same tiny MoE train on the same batches in one process, one step each in turn
(the order rotates every step), so that machine noise hits all alike. Copy A carries the callback,
driven through the same events the Trainer fires (``on_train_begin`` builds the drift probe,
``on_step_end`` counts every step and, every ``--logging-steps``, all-reduces, computes the metrics and
writes the JSONL line; the drift probe runs every ``--drift-every-steps``); copies B and C have no
hooks at all. A block spans whole logging and drift intervals, so that work is amortised as in a real
run; the median of the per-block ratios A/B is reported, and C/B, two identical runs, shows the noise
floor of the measurement. Probe size and drift interval default to ``MoETrainingArguments``' defaults,
i.e. what a user gets. On a CPU machine shared with other jobs, process CPU time (``--clock process``,
the default) is far less noisy than wall time. The last line printed is the ratio A/B (target <= 1.03).

    python benchmarks/expert_load_overhead.py --model switch --logging-steps 10
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import math
import tempfile

import torch
from _interleave import CLOCKS, interleaved_block_times, median_ratio
from torch.utils.data import DataLoader
from transformers import ByT5Tokenizer, DataCollatorForSeq2Seq, TrainerControl, TrainerState, TrainingArguments

from hf_moe_tuning import MoETrainingArguments
from hf_moe_tuning.callbacks.expert_load import ExpertLoadCallback
from hf_moe_tuning.models import build_tiny_model

DEFAULTS = {name: f.default for name, f in MoETrainingArguments.__dataclass_fields__.items()}


def make_batches(model_name: str, model, n_batches: int, batch_size: int, max_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_batches * batch_size):
        length = int(torch.randint(max_len // 2, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, 300, (length,), generator=g).tolist()
        labels = ids[: length // 2] if model_name == "switch" else ids
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    collator = DataCollatorForSeq2Seq(ByT5Tokenizer(), model=model if model_name == "switch" else None, padding=True)
    loader = DataLoader(rows, batch_size=batch_size, collate_fn=collator)
    return loader, list(loader)


def train_step(model, optimizer, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="switch", help="tiny model name (switch, mixtral, qwen2_moe, ...)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument(
        "--expert-capacity",
        type=int,
        default=None,
        help="Switch only: tokens per expert and sequence (tiny default 64 = max-len, so none is dropped); "
        "below max-len the dropped-token count runs every step",
    )
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--probe-size", type=int, default=DEFAULTS["moe_drift_probe_size"])
    parser.add_argument("--drift-every-steps", type=int, default=DEFAULTS["moe_drift_every_steps"])
    parser.add_argument("--rounds", type=int, default=8, help="blocks (each spans whole logging and drift intervals)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription noise)")
    parser.add_argument(
        "--clock",
        choices=["process", "wall"],
        default="process",
        help="process CPU time (robust to other jobs on a shared CPU machine) or wall time",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    overrides = {} if args.expert_capacity is None else {"expert_capacity": args.expert_capacity}
    base = build_tiny_model(args.model, **overrides)
    copies = {"with": base, "without": copy.deepcopy(base), "control": copy.deepcopy(base)}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in copies.items()}
    loader, batches = make_batches(args.model, base, 2 * args.logging_steps, args.batch_size, args.max_len)

    out = tempfile.mkdtemp(prefix="expert_load_bench_")
    targs = TrainingArguments(out, report_to=[], use_cpu=True, logging_steps=args.logging_steps)
    state, control = TrainerState(), TrainerControl()
    callback = ExpertLoadCallback(
        probe_size=args.probe_size, drift_every_steps=args.drift_every_steps, write_heatmap=False, tensorboard=False
    )
    # A block covers whole logging and drift intervals, so every block does the same amortised work.
    block_steps = math.lcm(args.logging_steps, args.drift_every_steps if args.probe_size else 1)
    batches = [batches[i % len(batches)] for i in range(block_steps)]
    callback.on_init_end(targs, state, control, model=copies["with"])
    for model in copies.values():
        model.train()
    callback.on_train_begin(targs, state, control, model=copies["with"], train_dataloader=loader)

    def step(name: str, batch) -> None:
        train_step(copies[name], optimizers[name], batch)
        if name != "with":
            return
        state.global_step += 1
        control.should_log = state.global_step % args.logging_steps == 0
        callback.on_step_end(targs, state, control)
        if control.should_log:
            callback.pop_metrics("train")  # what Trainer.log does with the pushed metrics
            control.should_log = False

    times = interleaved_block_times(
        {name: functools.partial(step, name) for name in copies},
        batches,
        args.rounds,
        clock=CLOCKS[args.clock],
        warmup=args.logging_steps,
    )
    callback.close()
    steps = args.rounds * block_steps
    names = list(copies)
    capacity = getattr(base.config, "expert_capacity", None)

    print(f"model={args.model} batch={args.batch_size} max_len={args.max_len} expert_capacity={capacity} "
          f"logging_steps={args.logging_steps} "
          f"probe_size={args.probe_size} drift_every_steps={args.drift_every_steps} steps_each={steps} "
          f"threads={args.threads} clock={args.clock}")
    for name in names:
        print(f"step time {name + ':':9s} {1000 * sum(times[name]) / steps:.2f} ms")
    null, null_lo, null_hi = median_ratio(times, "control", "without")
    print(f"noise floor, identical copies C/B: {null:.4f} (blocks {null_lo:.3f}..{null_hi:.3f})")
    median, lo, hi = median_ratio(times, "with", "without")
    print(f"ratio of totals A/B: {sum(times['with']) / sum(times['without']):.4f}; blocks {lo:.3f}..{hi:.3f}")
    print(f"step-time ratio with/without ExpertLoadCallback (median of {len(times['with'])} blocks):")
    print(f"{median:.4f}")


if __name__ == "__main__":
    main()
