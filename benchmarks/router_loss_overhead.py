"""Step-time overhead of ``RouterLossCallback`` against transformers' own router aux loss.

Copies of one model (same init, same batches) train side by side in one process, one step each in turn
(see ``benchmarks/_interleave.py``):

* ``builtin``: ``config.output_router_logits=True``, the model adds its own aux loss;
* ``callback``: ``RouterLossCallback(aux_coef, z_coef)`` (built-in loss off; aux + z-loss from the
  captured router logits and masks, per-sequence split-invariant scaling, metrics every
  ``--logging-steps``), driven through the events a ``Trainer`` fires (``on_train_begin``,
  ``on_step_begin``, ``on_pre_optimizer_step``, ``on_step_end``, the log);
* ``control``: ``builtin`` again; ``control / builtin`` is the noise floor of the run.

On CPU the clock is process CPU time with one torch thread (``--clock process``, ``--threads 1``), far
steadier than wall time on a shared machine; on CUDA it is synchronised wall time. The last line is the
median over blocks of callback / builtin (target <= 1.03).

    python benchmarks/router_loss_overhead.py            # defaults: a small Mixtral on CPU
    python benchmarks/router_loss_overhead.py --hidden 512 --layers 8 --seq 512 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import tempfile
import time

import torch
from _interleave import CLOCKS, interleaved_block_times, median_ratio
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_moe_tuning.callbacks.router_loss import RouterLossCallback
from hf_moe_tuning.models import build_tiny_model


def make_batches(n: int, batch: int, seq: int, vocab: int, device: str, seed: int = 0) -> list[dict]:
    """``n`` batches of right-padded sequences (lengths seq, 7/8, 6/8, 5/8 of it) with -100 on padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        lengths = torch.tensor([seq - (i % 4) * (seq // 8) for i in range(batch)])
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({
            "input_ids": (ids * mask).to(device),
            "attention_mask": mask.to(device),
            "labels": ids.masked_fill(mask == 0, -100).to(device),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixtral")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--logging-steps", type=int, default=10, help="steps per block; metrics are logged once a block")
    parser.add_argument("--rounds", type=int, default=4, help="blocks")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--aux-coef", type=float, default=0.01)
    parser.add_argument("--z-coef", type=float, default=0.001)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription noise)")
    parser.add_argument(
        "--clock", choices=["process", "wall"], default=None,
        help="process CPU time (default on CPU) or wall time (default, and the only sensible choice, on CUDA)",
    )
    opts = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(opts.threads)
    clock_name = opts.clock or ("wall" if opts.device == "cuda" else "process")
    clock = CLOCKS[clock_name]
    if opts.device == "cuda":
        def clock() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

    shape = dict(hidden_size=opts.hidden, intermediate_size=2 * opts.hidden, num_hidden_layers=opts.layers,
                 num_attention_heads=max(1, opts.hidden // 32), num_key_value_heads=max(1, opts.hidden // 64),
                 head_dim=32, num_local_experts=opts.experts, router_aux_loss_coef=opts.aux_coef)
    base = build_tiny_model(opts.model, seed=0, **shape, output_router_logits=True).to(opts.device).train()
    models = {"builtin": base, "callback": copy.deepcopy(base), "control": copy.deepcopy(base)}
    optimizers = {arm: torch.optim.AdamW(m.parameters(), lr=1e-4) for arm, m in models.items()}
    batches = make_batches(opts.logging_steps, opts.batch, opts.seq, 384, opts.device)

    out = tempfile.mkdtemp(prefix="router_loss_bench_")
    targs = TrainingArguments(out, report_to=[], use_cpu=opts.device == "cpu", logging_steps=opts.logging_steps)
    state, control = TrainerState(), TrainerControl()
    state.max_steps = 10**9
    callback = RouterLossCallback(aux_coef=opts.aux_coef, z_coef=opts.z_coef)
    callback.on_init_end(targs, state, control, model=models["callback"])
    callback.on_train_begin(targs, state, control, model=models["callback"])  # switches the built-in loss off

    logged: dict[str, float] = {}

    def step(arm: str, batch: dict) -> None:
        model, optimizer = models[arm], optimizers[arm]
        if arm != "callback":
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return
        callback.on_step_begin(targs, state, control)
        model(**batch).loss.backward()  # the callback's forward hook added aux + z to the loss
        callback.on_pre_optimizer_step(targs, state, control, model=model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        control.should_log = state.global_step % opts.logging_steps == 0
        callback.on_step_end(targs, state, control)
        if control.should_log:
            logged.update(callback.pop_metrics("train"))  # what Trainer.log does with the pushed metrics
            control.should_log = False

    times = interleaved_block_times(
        {arm: functools.partial(step, arm) for arm in models}, batches, opts.rounds, clock=clock, warmup=2
    )
    callback.on_train_end(targs, state, control)
    if "router/aux_loss" not in logged or "router/z_loss" not in logged:
        raise RuntimeError(f"the callback arm logged no router losses: {sorted(logged)}")
    steps = opts.rounds * opts.logging_steps
    print(f"model={opts.model} hidden={opts.hidden} layers={opts.layers} experts={opts.experts} seq={opts.seq} "
          f"batch={opts.batch} device={opts.device} steps/arm={steps} threads={opts.threads} clock={clock_name}")
    print(f"callback arm's last log: router/aux_loss={logged['router/aux_loss']:.4f} router/z_loss={logged['router/z_loss']:.4f}")
    print("step time: " + ", ".join(f"{arm} {1000 * sum(t) / steps:.1f} ms" for arm, t in times.items()))
    null, null_lo, null_hi = median_ratio(times, "control", "builtin")
    print(f"noise floor, identical arms control/builtin: {null:.4f} (blocks {null_lo:.3f}..{null_hi:.3f})")
    median, lo, hi = median_ratio(times, "callback", "builtin")
    print(f"callback/builtin blocks {lo:.3f}..{hi:.3f}; median of {opts.rounds} blocks:")
    print(f"{median:.4f}")


if __name__ == "__main__":
    main()
