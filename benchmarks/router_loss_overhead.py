"""Step-time cost of ``RouterLossCallback`` against the model's own router loss (``output_router_logits=True``).

Arms (see ``benchmarks/_harness.py``: one process, interleaved step by step, median and range over repeats):

* ``builtin``: the model adds its own router loss (Mixtral: aux 0.01; Switch: aux 0.01 and z 0.001);
* ``callback``: ``RouterLossCallback(aux 0.01, z 0.001)`` instead (the built-in loss off; aux + z from the
  captured router logits, padding masked, split-invariant scaling, metrics every ``--logging-steps``), driven
  through the events a ``Trainer`` fires;
* ``control``: ``builtin`` again: ``control / builtin`` is the noise floor.

The last line is the largest median ratio callback / builtin over the models measured.

    python benchmarks/router_loss_overhead.py --size tiny
    python benchmarks/router_loss_overhead.py --size realistic
    python benchmarks/router_loss_overhead.py --size realistic --device cuda
"""

from __future__ import annotations

import argparse
import functools
import tempfile

import _harness as h
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_moe_tuning.callbacks.router_loss import RouterLossCallback


def measure(model_name: str, opts: argparse.Namespace) -> h.Figure:
    builtin = dict(output_router_logits=True, router_aux_loss_coef=opts.aux_coef)
    if model_name == "switch":
        builtin["router_z_loss_coef"] = opts.z_coef
    base = h.build(model_name, opts.size, opts.device, **builtin)
    h.check_expert_share(base, opts.size)
    print(h.describe(model_name, base, opts.size))
    models = h.copies(base, ["builtin", "callback", "control"])
    del base
    optimizers = {arm: h.adamw(m.parameters(), opts) for arm, m in models.items()}
    batches = h.make_batches(model_name, opts.size, opts.logging_steps, opts.device)

    targs = TrainingArguments(tempfile.mkdtemp(prefix="router_loss_bench_"), report_to=[],
                              use_cpu=opts.device == "cpu", logging_steps=opts.logging_steps)
    state, control = TrainerState(), TrainerControl()
    state.max_steps = 10**9
    callback = RouterLossCallback(aux_coef=opts.aux_coef, z_coef=opts.z_coef)
    callback.on_init_end(targs, state, control, model=models["callback"])
    callback.on_train_begin(targs, state, control, model=models["callback"])  # switches the built-in loss off
    logged: dict[str, float] = {}

    def step(arm: str, batch: dict) -> None:
        if arm != "callback":
            h.train_step(models[arm], optimizers[arm], batch)
        else:
            h.trainer_step(models[arm], optimizers[arm], batch, [callback], targs, state, control, logged)

    times = h.interleave({arm: functools.partial(step, arm) for arm in models}, batches, opts.repeats,
                         opts.device, warmup=opts.warmup)
    callback.on_train_end(targs, state, control)
    h.print_routing_balance(models, batches[0])
    if "router/aux_loss" not in logged or "router/z_loss" not in logged:
        raise RuntimeError(f"the callback arm logged no router losses: {sorted(logged)}")
    steps = opts.repeats * opts.logging_steps
    print(f"  {opts.logging_steps} steps per repeat; callback's last log: router/aux_loss="
          f"{logged['router/aux_loss']:.4f} router/z_loss={logged['router/z_loss']:.4f}")
    return h.report_arms(times, steps, "callback", "builtin")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 9 repeats of 10 steps: with 3, the realistic Switch's noise floor spanned 0.92-1.03 in one run and its median
    # moved 0.98-1.05 between runs
    h.add_common_args(parser, repeats=9)
    parser.add_argument("--logging-steps", type=int, default=10, help="steps per repeat; metrics logged once a repeat")
    parser.add_argument("--aux-coef", type=float, default=0.01)
    parser.add_argument("--z-coef", type=float, default=0.001)
    h.run("router_loss_overhead", parser.parse_args(argv), measure, "callback/builtin step time", argv=argv)


if __name__ == "__main__":
    main()
