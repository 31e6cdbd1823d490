"""Step-time overhead of ``ExpertLoadCallback``: ratio of training step time with the callback vs without.

Two copies of the same tiny MoE train on the same batches in one process, interleaved in blocks
(A B B A A B ...), so that machine noise hits both alike. Copy A carries the callback, driven through
the same events the Trainer fires (``on_train_begin`` builds the drift probe, ``on_step_end`` counts
every step and, every ``--logging-steps``, all-reduces, computes the metrics and writes the JSONL line;
the drift probe runs every ``--drift-every-steps``); copy B has no hooks at all. Steps alternate
between the copies; a block spans whole logging and drift intervals, so that work is amortised as in a
real run, and the median of the per-block ratios is reported. On a CPU machine shared with other jobs,
process CPU time (``--clock process``, the default) is far less noisy than wall time. The last line
printed is the ratio (target <= 1.03).

    python benchmarks/expert_load_overhead.py --model switch --logging-steps 10
"""

from __future__ import annotations

import argparse
import copy
import math
import logging
import tempfile
import time

import torch
from torch.utils.data import DataLoader
from transformers import ByT5Tokenizer, DataCollatorForSeq2Seq, TrainerControl, TrainerState, TrainingArguments

from hf_moe_tuning.callbacks.expert_load import ExpertLoadCallback
from hf_moe_tuning.models import build_tiny_model


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
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--probe-size", type=int, default=16)
    parser.add_argument("--drift-every-steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=6, help="A/B block pairs")
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

    base = build_tiny_model(args.model)
    with_cb, without_cb = base, copy.deepcopy(base)
    loader, batches = make_batches(args.model, base, 2 * args.logging_steps, args.batch_size, args.max_len)
    opt_a = torch.optim.AdamW(with_cb.parameters(), lr=1e-4)
    opt_b = torch.optim.AdamW(without_cb.parameters(), lr=1e-4)

    out = tempfile.mkdtemp(prefix="expert_load_bench_")
    targs = TrainingArguments(out, report_to=[], use_cpu=True, logging_steps=args.logging_steps)
    state, control = TrainerState(), TrainerControl()
    callback = ExpertLoadCallback(
        probe_size=args.probe_size, drift_every_steps=args.drift_every_steps, write_heatmap=False, tensorboard=False
    )
    # A block covers whole logging and drift intervals, so every block does the same amortised work.
    block_steps = math.lcm(args.logging_steps, args.drift_every_steps if args.probe_size else 1)
    batches = [batches[i % len(batches)] for i in range(block_steps)]
    callback.on_init_end(targs, state, control, model=with_cb)
    with_cb.train()
    without_cb.train()
    callback.on_train_begin(targs, state, control, model=with_cb, train_dataloader=loader)

    clock = time.process_time if args.clock == "process" else time.perf_counter

    def step_a(batch) -> None:
        train_step(with_cb, opt_a, batch)
        state.global_step += 1
        control.should_log = state.global_step % args.logging_steps == 0
        callback.on_step_end(targs, state, control)
        if control.should_log:
            callback.pop_metrics("train")  # what Trainer.log does with the pushed metrics
            control.should_log = False

    def step_b(batch) -> None:
        train_step(without_cb, opt_b, batch)

    def timed(fn, batch) -> float:
        start = clock()
        fn(batch)
        return clock() - start

    for batch in batches[: args.logging_steps]:  # warm-up
        step_a(batch)
        step_b(batch)
    # Steps alternate A B / B A, so both copies see the same machine load; a block spans whole logging and
    # drift intervals so it carries the same amortised logging work every time.
    times: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(args.rounds):
        block = {"with": 0.0, "without": 0.0}
        for i, batch in enumerate(batches):
            pair = [("with", step_a), ("without", step_b)]
            for name, fn in pair if i % 2 == 0 else pair[::-1]:
                block[name] += timed(fn, batch)
        for name, value in block.items():
            times[name].append(value)
    callback.close()
    steps = args.rounds * block_steps
    # Each block's ratio compares steps that ran interleaved; the median over blocks drops bursts.
    ratios = sorted(a / b for a, b in zip(times["with"], times["without"]))
    median = ratios[len(ratios) // 2] if len(ratios) % 2 else 0.5 * sum(ratios[len(ratios) // 2 - 1 : len(ratios) // 2 + 1])
    print(f"model={args.model} batch={args.batch_size} max_len={args.max_len} logging_steps={args.logging_steps} "
          f"probe_size={args.probe_size} drift_every_steps={args.drift_every_steps} steps_each={steps} threads={args.threads} clock={args.clock}")
    print(f"step time without callback: {1000 * sum(times['without']) / steps:.2f} ms")
    print(f"step time with callback:    {1000 * sum(times['with']) / steps:.2f} ms")
    print(f"ratio of totals: {sum(times['with']) / sum(times['without']):.4f}; per-pair ratios {ratios[0]:.3f}..{ratios[-1]:.3f}")
    print(f"step-time ratio with/without ExpertLoadCallback (median of {len(ratios)} blocks):")
    print(f"{median:.4f}")


if __name__ == "__main__":
    main()
