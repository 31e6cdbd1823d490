"""Memory and step time of ST-MoE freezing: ``non_moe`` (experts and routers frozen) vs ``all`` (full fine-tuning).

* **Step time**: arms ``all``, ``non_moe`` and ``control`` (``all`` again: the noise floor) train copies of one
  model in one process, interleaved step by step (``benchmarks/_harness.py``), AdamW (``--lr``, weight decay
  0.01) on the trainable parameters; the figure is the median [range] over repeats of ``non_moe / all``. After
  the timed steps one more step of each arm is counted in aten operators (``_harness.count_ops``): where a GPU is
  launch-bound, freezing saves step time in proportion to the operators it removes, not the arithmetic.
* **Peak memory**: a peak is a property of a whole process, so each (strategy, repeat) trains in a fresh
  subprocess (strategies alternating; ``--memory-repeats``, default ``--repeats``, per strategy), ``--memory-steps``
  steps after building the model. On CPU it reports
  the **raw** peak resident set size (``VmHWM``, see :func:`peak_rss`: everything, the interpreter and torch
  included) and the **net** peak (raw minus the RSS right before the model is built: parameters, gradients,
  optimizer state, activations, allocator slack). The workers run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed
  at 128 KiB (unless it is set already): by default glibc raises that threshold whenever a large block is
  freed, so later tensors may land on the heap, whose freed memory the process keeps; the peak RSS then
  depended on the allocation history, and the Switch's net ratio came out anywhere from 0.57 to 0.72 between
  runs. With the threshold fixed every tensor of 128 KiB or more is its own mapping, returned when freed, and
  two runs of a worker agree within 0.1 %. On CUDA (``--device cuda``) raw is
  ``torch.cuda.max_memory_allocated()`` and net subtracts what was allocated before the model was built.
  The figures are the median [range] over repeats of the per-repeat ratios ``non_moe / all``.
* **Tensor bytes**: after its memory steps each worker runs one more step and counts the bytes of the tensors
  a training step holds (unique storages): parameters, gradients, AdamW state, and the activations autograd
  saved for backward (``torch.autograd.graph.saved_tensors_hooks``, parameters excluded). Unlike a peak RSS
  this is exact and the same in every run of one command (it still depends on the routing: an expert that
  got no token has no gradient), and its parts show where the rest of the memory
  goes: freezing removes gradients and AdamW state of the frozen parameters, and the activations that only
  a frozen weight's gradient needed (a frozen linear layer does not keep its input).

Issue 18's targets at the realistic size: net peak <= 0.60x and step time <= 0.75x of ``all``. The last line
is ``<net peak ratio> <step-time ratio>`` of the last model measured.

    python benchmarks/freezing_memory.py --size tiny
    python benchmarks/freezing_memory.py --size realistic --model switch
    python benchmarks/freezing_memory.py --size realistic --device cuda
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from typing import NamedTuple

import _harness as h
import torch

STRATEGIES = ("all", "non_moe")


class FreezingFigures(NamedTuple):
    """``non_moe / all`` ratios of one model."""

    net: h.Figure
    raw: h.Figure
    step: h.Figure
    tensors: h.Figure


def _optimizer(model, report, opts: argparse.Namespace) -> torch.optim.Optimizer:
    optimizer = h.adamw([p for p in model.parameters() if p.requires_grad], opts)
    report.slice_freezer.attach(optimizer)
    return optimizer


# --------------------------------------------------------------------------------------------- memory worker
TENSOR_KINDS = ("params", "grads", "adamw", "saved")


def _storage_bytes(tensors, skip: frozenset[int] = frozenset()) -> int:
    """Bytes of the distinct storages under ``tensors`` (views share theirs), leaving out the ``skip`` data pointers."""
    sizes = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


def tensor_bytes(model, optimizer, batch: dict) -> dict[str, int]:
    """One training step on ``batch`` with its tensors counted (bytes of distinct storages), by kind:
    ``params``, ``grads`` and ``adamw`` (the optimizer's state) after the optimizer step, before ``zero_grad``;
    ``saved``: what autograd kept for backward during the forward, parameters (and views of them) excluded."""
    param_ptrs = frozenset(p.untyped_storage().data_ptr() for p in model.parameters())
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    saved_bytes = _storage_bytes(saved, skip=param_ptrs)
    saved.clear()
    loss.backward()
    optimizer.step()
    counts = {
        "params": _storage_bytes(model.parameters()),
        "grads": _storage_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "adamw": _storage_bytes(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)),
        "saved": saved_bytes,
    }
    optimizer.zero_grad(set_to_none=True)
    return counts


def peak_rss() -> int:
    """This process's peak resident set size in bytes, since its last ``exec``.

    Linux's ``VmHWM`` (``/proc/self/status``) belongs to the process's own address space. ``getrusage``'s
    ``ru_maxrss`` does not: it keeps the high-water mark of the address space the process had before ``exec``,
    which for a worker spawned by ``subprocess`` is the parent's, so a worker whose own peak is below the parent's
    RSS reported the parent's (the realistic Switch's ``non_moe`` worker: 1,110 MiB, its own peak 912).
    ``ru_maxrss`` is the fallback where ``/proc`` is absent (kilobytes, but bytes on macOS).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def worker(opts: argparse.Namespace) -> dict:
    """One (model, strategy) run in this fresh process: raw and net peak memory."""
    import psutil

    from hf_moe_tuning import apply_freezing

    torch.set_num_threads(opts.threads)
    batches = h.make_batches(opts.worker_model, opts.size, opts.memory_steps + 1, opts.device)
    if opts.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = psutil.Process().memory_info().rss
    model = h.build(opts.worker_model, opts.size, opts.device)
    report = apply_freezing(model, opts.strategy)
    optimizer = _optimizer(model, report, opts)
    for batch in batches[:-1]:
        h.train_step(model, optimizer, batch)
    if opts.device == "cuda":
        torch.cuda.synchronize()
        raw = torch.cuda.max_memory_allocated()
    else:
        raw = peak_rss()
    tensors = tensor_bytes(model, optimizer, batches[-1])  # after the peak was read: it cannot raise it
    return {"strategy": opts.strategy, "raw": raw, "net": raw - before, "trainable_frac": report.plan.trainable_frac,
            "tensors": tensors}


#: glibc's mmap threshold in the memory workers (bytes): fixed, so that the peak RSS does not depend on the
#: allocation history (see the module docstring); other C libraries ignore the variable
MMAP_THRESHOLD = 128 * 1024


def worker_env() -> dict[str, str]:
    """The environment of a memory worker: this one, quiet and offline, with the mmap threshold fixed."""
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    return env


def run_worker(opts: argparse.Namespace, model_name: str, strategy: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-model", model_name, "--strategy", strategy,
           "--size", opts.size, "--device", opts.device, "--threads", str(opts.threads),
           "--memory-steps", str(opts.memory_steps), "--lr", repr(opts.lr)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=worker_env())
    if done.returncode:
        raise RuntimeError(f"memory worker {model_name}/{strategy} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- step time
def step_times(model_name: str, opts: argparse.Namespace) -> dict[str, list[float]]:
    from hf_moe_tuning import apply_freezing

    base = h.build(model_name, opts.size, opts.device)
    models = h.copies(base, ["all", "non_moe", "control"])
    del base
    optimizers = {}
    for arm, model in models.items():
        report = apply_freezing(model, "all" if arm == "control" else arm)
        optimizers[arm] = _optimizer(model, report, opts)
    batches = h.make_batches(model_name, opts.size, opts.steps, opts.device)
    phases: dict[str, dict[str, float]] = {arm: {} for arm in models}
    on_cpu = opts.device == "cpu"  # a CUDA step's phases would need a synchronisation each: not timed
    steps = {arm: functools.partial(
        lambda arm, batch: h.train_step(models[arm], optimizers[arm], batch, phases[arm] if on_cpu else None), arm)
        for arm in models}
    times = h.interleave(steps, batches, opts.repeats, opts.device, warmup=opts.warmup)
    if on_cpu:
        print(h.phase_breakdown(phases, "non_moe", "all"))
    # one more step of every arm, counted (all arms alike, so they stay comparable): what a launch-bound GPU pays
    ops = {arm: h.count_ops(functools.partial(steps[arm], batches[0])) for arm in models}
    h.report_ops(ops, "all", "non_moe")
    h.print_routing_balance(models, batches[0])
    return times


def measure(model_name: str, opts: argparse.Namespace) -> FreezingFigures:
    model = h.build(model_name, opts.size)
    h.check_expert_share(model, opts.size)
    print(h.describe(model_name, model, opts.size))
    del model
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    for repeat in range(opts.memory_repeats):
        for strategy in STRATEGIES if repeat % 2 == 0 else reversed(STRATEGIES):
            runs[strategy].append(run_worker(opts, model_name, strategy))
    raw = h.Figure.of([n["raw"] / a["raw"] for n, a in zip(runs["non_moe"], runs["all"])])
    net = h.Figure.of([n["net"] / a["net"] for n, a in zip(runs["non_moe"], runs["all"])])
    tensors = h.Figure.of([sum(n["tensors"].values()) / sum(a["tensors"].values())
                           for n, a in zip(runs["non_moe"], runs["all"])])
    times = step_times(model_name, opts)
    step = h.ratio(times, "non_moe", "all")
    unit = "peak allocated (CUDA)" if opts.device == "cuda" else "peak RSS"
    for strategy in STRATEGIES:
        r = runs[strategy]
        print(f"  {strategy:<8} trainable {100 * r[0]['trainable_frac']:5.1f}%  raw {unit} "
              f"{h.statistics.median(x['raw'] for x in r) / 2**20:8.1f} MiB  net "
              f"{h.statistics.median(x['net'] for x in r) / 2**20:8.1f} MiB  step "
              f"{1000 * sum(times[strategy]) / (opts.repeats * opts.steps):8.1f} ms")
    for strategy in STRATEGIES:
        parts = runs[strategy][-1]["tensors"]
        print(f"  {strategy:<8} tensor MiB: " + ", ".join(f"{kind} {parts[kind] / 2**20:.1f}" for kind in TENSOR_KINDS)
              + f", total {sum(parts.values()) / 2**20:.1f}")
    print(f"  noise floor control/all step time: {h.ratio(times, 'control', 'all')}")
    print(f"  non_moe/all: net {unit} {net} | raw {unit} {raw} | step time {step} | tensor bytes {tensors}  "
          f"({opts.memory_repeats} memory run(s) per strategy of {opts.memory_steps} steps, "
          f"{opts.steps} timed steps per repeat, "
          f"{time.perf_counter() - started:.0f} s)")
    return FreezingFigures(net, raw, step, tensors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_common_args(parser)
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per repeat and arm (default 20: at 4, the noise floor of the realistic Mixtral"
                             " spanned 0.97-1.17)")
    parser.add_argument("--memory-steps", type=int, default=3, help="training steps in each memory subprocess")
    parser.add_argument("--memory-repeats", type=int, default=0,
                        help="memory subprocesses per strategy (default: --repeats; the peaks are deterministic "
                             "within 0.1 %%, so 1 gives the same figure faster)")
    parser.add_argument("--worker-model", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="all", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.memory_repeats < 0:
        parser.error(f"--memory-repeats {opts.memory_repeats}: 0 (as many as --repeats) or more")
    opts.memory_repeats = opts.memory_repeats or opts.repeats
    if opts.worker_model:
        print(json.dumps(worker(opts)))
        return
    figures = h.measure_models("freezing_memory", opts, measure, argv)
    print(f"non_moe/all, median [range] over {h.repeats_label(opts)}: " + "; ".join(
        f"{name}: net peak {net}, raw peak {raw}, step time {step}, tensor bytes {tensors}"
        for name, (net, raw, step, tensors) in figures.items()))
    net, _, step, _ = list(figures.values())[-1]
    print(f"{net.median:.4f} {step.median:.4f}")


if __name__ == "__main__":
    main()
