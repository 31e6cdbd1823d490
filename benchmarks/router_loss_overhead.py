"""Step-time overhead of ``RouterLossCallback`` against transformers' own router aux loss.

Arms (same model init, same data, measured interleaved in one process):

* ``builtin``: plain ``Trainer`` with ``config.output_router_logits=True`` (the model adds its own aux loss);
* ``callback``: plain ``Trainer`` + ``RouterLossCallback(aux_coef, z_coef)`` (built-in loss off; aux + z-loss
  from captured router logits, masks, per-sequence split-invariant scaling, logging).

Each round trains ``--steps`` optimizer steps on one arm then the other (arm order alternates per round);
a timing callback measures every step from ``on_step_begin`` to ``on_step_end``; the first step of each
round is warmup and dropped. The figure is median(callback) / median(builtin), printed as the last line.

    python benchmarks/router_loss_overhead.py            # defaults: a small Mixtral on CPU
    python benchmarks/router_loss_overhead.py --hidden 512 --layers 8 --seq 512 --device cuda
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_moe_tuning.callbacks.router_loss import RouterLossCallback
from hf_moe_tuning.models import build_tiny_model


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (synchronised on CUDA)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def make_dataset(n: int, seq: int, vocab: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = seq - (i % 4) * (seq // 8)
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        pad = seq - length
        rows.append({"input_ids": ids + [0] * pad, "attention_mask": [1] * length + [0] * pad,
                     "labels": ids + [-100] * pad})
    return Dataset.from_list(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixtral")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per arm per round (first is warmup)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--aux-coef", type=float, default=0.01)
    parser.add_argument("--z-coef", type=float, default=0.001)
    opts = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    shape = dict(hidden_size=opts.hidden, intermediate_size=2 * opts.hidden, num_hidden_layers=opts.layers,
                 num_attention_heads=max(1, opts.hidden // 32), num_key_value_heads=max(1, opts.hidden // 64),
                 head_dim=32, num_local_experts=opts.experts, router_aux_loss_coef=opts.aux_coef)
    dataset = make_dataset(opts.batch * opts.steps * opts.rounds, opts.seq, 384)
    timers, trainers = {}, {}
    with tempfile.TemporaryDirectory() as out:
        for arm in ("builtin", "callback"):
            model = build_tiny_model(opts.model, seed=0, **shape, output_router_logits=arm == "builtin")
            timers[arm] = StepTimer()
            callbacks = [timers[arm]]
            if arm == "callback":
                callbacks.append(RouterLossCallback(aux_coef=opts.aux_coef, z_coef=opts.z_coef))
            args = TrainingArguments(
                f"{out}/{arm}", max_steps=opts.steps, per_device_train_batch_size=opts.batch, learning_rate=1e-4,
                logging_steps=opts.steps, save_strategy="no", report_to=[], disable_tqdm=True,
                use_cpu=opts.device == "cpu", dataloader_drop_last=True,
            )
            trainers[arm] = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
        medians: dict[str, list[float]] = {"builtin": [], "callback": []}
        for r in range(opts.rounds):
            order = ("builtin", "callback") if r % 2 == 0 else ("callback", "builtin")
            for arm in order:
                timers[arm].times.clear()
                trainers[arm].train()
                medians[arm].extend(timers[arm].times[1:])
    builtin = statistics.median(medians["builtin"])
    callback = statistics.median(medians["callback"])
    print(f"model={opts.model} hidden={opts.hidden} layers={opts.layers} experts={opts.experts} seq={opts.seq} "
          f"batch={opts.batch} device={opts.device} steps/arm={len(medians['builtin'])}")
    print(f"median step time: builtin (output_router_logits=True) {1000 * builtin:.1f} ms, "
          f"RouterLossCallback {1000 * callback:.1f} ms")
    print(f"{callback / builtin:.3f}")


if __name__ == "__main__":
    main()
