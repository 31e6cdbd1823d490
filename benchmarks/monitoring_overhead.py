"""Step-time cost of full MoE monitoring: router losses + expert-load logging with its defaults, vs a plain step.

Arms (see ``benchmarks/_harness.py``: one process, interleaved step by step, median and range over repeats):

* ``plain``: what a plain ``Trainer`` does in a step with the model as configured (no router loss, the model's
  own ``output_router_logits`` off): forward, backward, AdamW step, ``zero_grad``;
* ``monitored``: the same plus ``RouterLossCallback(aux 0.01, z 0.001)`` and ``ExpertLoadCallback`` with the
  ``MoETrainingArguments`` defaults (JSONL, heatmap, drift probe of 8 examples every 50 steps), driven through
  the events a ``Trainer`` fires (``on_train_begin`` builds the drift probe and its reference; every step
  ``on_step_begin``, ``on_pre_optimizer_step``, ``on_step_end``; every ``--logging-steps`` the reductions, the
  metrics, the JSONL line, the drift probe when due, and the log merge);
* ``control``: ``plain`` again: ``control / plain`` is the noise floor;
* ``router_loss`` (only with ``--decompose``): ``plain`` plus the same ``RouterLossCallback`` and nothing else.
  It trains on the monitored arm's objective, so its routing drifts the way the monitored arm's does:
  ``router_loss / plain`` is the router loss together with what its balancing does to the model's expert work,
  and ``monitored / router_loss`` is the expert-load logging at matched training (see the harness docstring on
  same weights against training);
* ``plain_on_router_loss`` (only with ``--decompose``): a ``plain`` step on the ``router_loss`` arm's weights
  (copied in, untimed, after each of its steps, so at most one step old). It routes as the router-loss arm does but computes no
  router loss, so ``router_loss / plain`` splits into ``plain_on_router_loss / plain`` (what the routing change
  alone does to the model's own work) and ``router_loss / plain_on_router_loss`` (computing the router loss).

A repeat spans whole logging and drift intervals (``lcm(logging_steps, drift_every_steps)`` steps), so the
amortised work lands in every repeat alike. One-off work at train start (the anatomy, the drift reference,
matplotlib's import on the heatmap thread) and train end (the heatmap) is outside the timed steps. The last
line is the median ratio monitored / plain [range] (issue 18's target at the realistic size: <= 1.03). After the
timed steps the script counts the aten operators of one non-logging step of ``plain`` and ``monitored``
(:func:`_harness.count_ops`): where a GPU is launch-bound, the step time follows that count, not the arithmetic.

    python benchmarks/monitoring_overhead.py --size tiny                   # seconds
    python benchmarks/monitoring_overhead.py --size realistic --model mixtral
    python benchmarks/monitoring_overhead.py --size realistic --device cuda
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import tempfile
import time
from collections.abc import Callable

import _harness as h
import torch
from torch.utils.data import DataLoader
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_moe_tuning import MoETrainingArguments
from hf_moe_tuning.callbacks.expert_load import ExpertLoadCallback
from hf_moe_tuning.callbacks.router_loss import RouterLossCallback

DEFAULTS = {name: f.default for name, f in MoETrainingArguments.__dataclass_fields__.items()}


def _collate(rows: list[dict]) -> dict:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


class ProbeClock:
    """Process CPU time of an ``ExpertLoadCallback``'s drift-probe forwards, from the moment it is attached (the
    probe runs inside the monitored arm's timed steps, so this is a part of that arm's time; CPU only)."""

    def __init__(self, callback: ExpertLoadCallback) -> None:
        self.seconds, self.calls = 0.0, 0
        probe = callback._probe_routing

        def timed(model):
            start = time.process_time()
            try:
                return probe(model)
            finally:
                self.seconds += time.process_time() - start
                self.calls += 1

        callback._probe_routing = timed


def measure(model_name: str, opts: argparse.Namespace) -> h.Figure:
    base = h.build(model_name, opts.size, opts.device)
    share = h.check_expert_share(base, opts.size)
    print(h.describe(model_name, base, opts.size))
    arms = ["plain", "monitored", "control"] + (["router_loss", "plain_on_router_loss"] if opts.decompose else [])
    models = h.copies(base, arms)
    del base
    optimizers = {arm: h.adamw(m.parameters(), opts) for arm, m in models.items()}
    block = math.lcm(opts.logging_steps, opts.drift_every_steps if opts.probe_size else 1)
    batches = h.make_batches(model_name, opts.size, block, opts.device)
    rows = [{k: v[i].cpu() for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]
    loader = DataLoader(rows, batch_size=h.BATCH[opts.size]["batch"], collate_fn=_collate)  # the probe's source

    out = tempfile.mkdtemp(prefix="monitoring_bench_")
    targs = TrainingArguments(out, report_to=[], use_cpu=opts.device == "cpu", logging_steps=opts.logging_steps)
    load = ExpertLoadCallback(
        write_jsonl=DEFAULTS["moe_expert_load_jsonl"], write_heatmap=DEFAULTS["moe_expert_load_heatmap"],
        probe_size=opts.probe_size, drift_every_steps=opts.drift_every_steps, tensorboard=False,
    )
    callbacks = {"monitored": [RouterLossCallback(aux_coef=opts.aux_coef, z_coef=opts.z_coef), load]}
    if opts.decompose:
        callbacks["router_loss"] = [RouterLossCallback(aux_coef=opts.aux_coef, z_coef=opts.z_coef)]
    states = {arm: (TrainerState(max_steps=10**9), TrainerControl()) for arm in callbacks}
    for arm, arm_callbacks in callbacks.items():
        state, control = states[arm]
        for cb in arm_callbacks:
            cb.on_init_end(targs, state, control, model=models[arm])
        for cb in arm_callbacks:
            cb.on_train_begin(targs, state, control, model=models[arm], train_dataloader=loader)
    load.wait_for_heatmaps()  # one-off: matplotlib's import on the heatmap thread, not a per-step cost
    probe_clock = ProbeClock(load) if opts.device == "cpu" else None  # after the start reference was taken
    logged: dict[str, dict[str, float]] = {arm: {} for arm in callbacks}

    def step(arm: str, batch: dict) -> None:
        if arm not in callbacks:
            h.train_step(models[arm], optimizers[arm], batch)
        else:
            h.trainer_step(models[arm], optimizers[arm], batch, callbacks[arm], targs, *states[arm], logged[arm])

    refresh = {}
    if opts.decompose:
        shadow, source = models["plain_on_router_loss"], models["router_loss"]

        @torch.no_grad()
        def copy_router_loss_weights() -> None:
            for mine, theirs in zip(shadow.parameters(), source.parameters()):
                mine.copy_(theirs)

        refresh["plain_on_router_loss"] = copy_router_loss_weights
    times = h.interleave({arm: functools.partial(step, arm) for arm in models}, batches, opts.repeats,
                         opts.device, warmup=opts.warmup, refresh=refresh)
    ops = count_step_ops(step, list(models), states["monitored"][0], targs.logging_steps, batches[0])
    for copy_in in refresh.values():
        copy_in()  # the routing printed below is the router_loss arm's after its last step
    for arm, arm_callbacks in callbacks.items():
        for cb in arm_callbacks:
            cb.on_train_end(targs, *states[arm])
    load.close()
    h.print_routing_balance(models, batches[0])
    expected = {"monitored": ["router/aux_loss", "router/z_loss", "moe/load_cv_mean"],
                "router_loss": ["router/aux_loss", "router/z_loss"]}
    if opts.probe_size and states["monitored"][0].global_step >= opts.drift_every_steps:
        expected["monitored"].append("moe/routing_drift")
    missing = [f"{arm}: {key}" for arm in callbacks for key in expected[arm] if key not in logged[arm]]
    if missing or not os.path.isfile(os.path.join(out, "expert_load.jsonl")):
        raise RuntimeError(f"the arms did not log {missing} (or the monitored arm wrote no expert_load.jsonl)")

    steps = opts.repeats * block
    print(f"  routed experts {100 * share:.1f}%; {block} steps per repeat, logging every {opts.logging_steps}, "
          f"drift probe {opts.probe_size} every {opts.drift_every_steps}; {steps} timed steps per arm")
    figure = h.report_arms(times, steps, "monitored", "plain")
    h.report_ops(ops, "plain", "monitored", step="one non-logging step")
    if probe_clock is not None and probe_clock.calls:
        print(f"  drift probe: {probe_clock.calls} forward(s) of {opts.probe_size} sequences in the timed steps, "
              f"{1000 * probe_clock.seconds / probe_clock.calls:.0f} ms each, "
              f"{100 * probe_clock.seconds / sum(times['monitored']):.1f}% of the monitored arm's time")
    if opts.decompose:
        print(f"  router_loss/plain: {h.ratio(times, 'router_loss', 'plain')}")
        print(f"    of which the routing change, plain_on_router_loss/plain: "
              f"{h.ratio(times, 'plain_on_router_loss', 'plain')}")
        print(f"    and computing the router loss, router_loss/plain_on_router_loss: "
              f"{h.ratio(times, 'router_loss', 'plain_on_router_loss')}")
        print(f"  monitored/router_loss: {h.ratio(times, 'monitored', 'router_loss')}")
        print(f"  monitored/plain_on_router_loss (all the monitoring computes, at the monitored arm's routing): "
              f"{h.ratio(times, 'monitored', 'plain_on_router_loss')}")
    return figure


def count_step_ops(step: Callable[[str, dict], None], arms: list[str], state: TrainerState, logging_steps: int,
                   batch: dict) -> dict[str, int]:
    """Aten ops of one step of the plain and the monitored arm, after the timed steps, at a step that neither logs
    nor probes (an untimed step first where the next one would log). Every arm takes the same extra steps, so the
    arms that train alike (``--decompose``'s ``router_loss`` and ``monitored``) still end on the same weights."""
    if (state.global_step + 1) % logging_steps == 0:
        for arm in arms:
            step(arm, batch)
    counts = {}
    for arm in arms:
        if arm in ("plain", "monitored"):
            counts[arm] = h.count_ops(functools.partial(step, arm, batch))
        else:
            step(arm, batch)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_common_args(parser)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--probe-size", type=int, default=DEFAULTS["moe_drift_probe_size"])
    parser.add_argument("--drift-every-steps", type=int, default=DEFAULTS["moe_drift_every_steps"])
    parser.add_argument("--aux-coef", type=float, default=0.01)
    parser.add_argument("--z-coef", type=float, default=0.001)
    parser.add_argument("--decompose", action="store_true",
                        help="add a router_loss arm (RouterLossCallback alone) and a plain_on_router_loss arm (a "
                             "plain step on the router_loss arm's weights) and print router_loss/plain, split into "
                             "the routing change and the loss computation, and monitored/router_loss (the "
                             "expert-load logging at matched training)")
    h.run("monitoring_overhead", parser.parse_args(argv), measure, "monitored/plain step time", argv=argv)


if __name__ == "__main__":
    main()
