"""The one harness of the benchmarks: models and batches at three sizes, arms interleaved step by step, reporting.

* **Sizes.** ``tiny`` (seconds; what ``tests/test_benchmarks.py`` runs) and ``realistic`` (hidden 256, sequence
  256, batch 4, routed experts >= 80 % of the parameters): a Mixtral-style decoder (fused experts, 8 experts,
  top-2) and a Switch-style encoder-decoder (per-expert modules, 8 experts, top-1, MoE every other layer).
  On a GPU the realistic size is launch-bound (an H200 runs a realistic Mixtral step in about 27 ms, most of
  it the host issuing some 1,300–1,600 small operators), so a ratio there counts kernels rather than arithmetic. ``gpu``
  (CUDA only) is sized for a GPU to compute rather than wait: hidden 1024, sequence 1024, batch 8, a 0.42 B
  Mixtral (8 layers) and a 0.65 B Switch (d_ff 8192), routed experts again >= 80 %.
  Batches are right-padded (lengths 1, 7/8, 6/8, 5/8 of the sequence) with ``-100`` labels on the padding,
  so the masks are exercised.
* **Interleaving.** Every arm trains its own copy of one model on the same batches in the same process, one
  step each in turn, the order rotating every step, so that machine noise (other jobs, frequency changes,
  cache pressure) hits every arm alike. A *repeat* is one block of steps spanning whole logging / drift
  intervals; the ratio of two arms is taken per repeat, and the report gives the median and the range
  ``[min, max]`` over repeats. A ``control`` arm identical to the baseline prints the noise floor.
* **Same weights or training.** Every arm steps AdamW at ``--lr`` (default 1e-4): the arms' weights drift apart,
  and with them their routing. A per-expert-module model (the Switch) runs one expert matmul per expert that got
  tokens, so a balancing loss that spreads the tokens makes it run more, smaller matmuls: different work, not the
  cost of computing the loss. ``--lr 0`` keeps every arm on the initial weights (AdamW still runs all its
  arithmetic), so the routing and the expert work stay identical and a ratio is the cost of the arm's own extra
  computation. After the timed steps every script prints each arm's routing balance (:func:`routing_balance`:
  the coefficient of variation of the expert load, mean over layers, on the first batch), so a drift shows.
* **Processes.** One process's repeats share its memory layout, allocator state and the machine's load at
  the time, so a rerun can land outside their range. ``--processes P`` runs the whole measurement in ``P``
  fresh processes one after another (each with its own warmup and ``--repeats``), echoes each one's output,
  prints every process's median, and reports the median and range over all ``P x repeats`` per-repeat ratios
  pooled: a range that includes the spread between processes. ``--processes 3 --repeats 1`` costs what
  ``--repeats 3`` does, plus three model builds and warmups.
* **Clocks.** On CPU: process CPU time (``time.process_time``, all threads of the process) with one torch
  thread by default, robust on a machine shared with other jobs. On CUDA (``--device cuda``): CUDA events
  around every step, summed per repeat after one synchronisation; memory from ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

#: the checkout these scripts belong to: its package is the one measured, whatever else is installed (imported
#: after ``_harness``, which every script imports first; the header prints the package's location)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VOCAB = 384
T = TypeVar("T")

#: model shapes per size; "realistic" and "gpu" keep the routed experts >= 80 % of the parameters
SHAPES: dict[str, dict[str, dict]] = {
    "tiny": {
        "mixtral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=32, num_local_experts=8, num_experts_per_tok=2),
        "switch": dict(d_model=64, d_kv=16, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
                       num_experts=8, expert_capacity=64, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1),
    },
    "realistic": {
        "mixtral": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=32, num_local_experts=8, num_experts_per_tok=2),
        "switch": dict(d_model=256, d_kv=32, d_ff=2048, num_layers=4, num_decoder_layers=4, num_heads=8,
                       num_experts=8, expert_capacity=256, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2),
    },
    "gpu": {
        "mixtral": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=16,
                        num_key_value_heads=4, head_dim=64, num_local_experts=8, num_experts_per_tok=2),
        "switch": dict(d_model=1024, d_kv=64, d_ff=8192, num_layers=4, num_decoder_layers=4, num_heads=16,
                       num_experts=8, expert_capacity=1024, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2),
    },
}
#: batch size and (encoder / decoder-only) sequence length per size; Switch targets are half as long
BATCH = {"tiny": dict(batch=4, seq=32), "realistic": dict(batch=4, seq=256), "gpu": dict(batch=8, seq=1024)}
MIN_EXPERT_SHARE = {"tiny": 0.0, "realistic": 0.80, "gpu": 0.80}
#: sizes that only run with ``--device cuda`` (on CPU one step of them takes minutes)
CUDA_ONLY_SIZES = ("gpu",)


# --------------------------------------------------------------------------------------------- options
def add_common_args(parser: argparse.ArgumentParser, repeats: int = 3) -> None:
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny", help="model and batch size (default tiny)")
    parser.add_argument("--model", choices=["mixtral", "switch", "both"], default="both")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: CUDA events and torch.cuda.max_memory_allocated (fails clearly without a GPU)")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="repeats per process (>= 3 in all over --processes: median and range)")
    parser.add_argument("--processes", type=int, default=1,
                        help="run the measurement in this many fresh processes, one after another, and pool their "
                             "repeats (default 1; see the harness docstring)")
    parser.add_argument("--pool-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription noise)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of every arm before the first repeat")
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="AdamW learning rate of every arm (default 1e-4); 0 keeps all arms on the same weights, "
                             "so their routing and expert work stay identical (see the module docstring)")


def setup(opts: argparse.Namespace) -> None:
    """Check the options, the device and the thread count; quiet transformers."""
    if opts.processes < 1:
        raise SystemExit(f"--processes {opts.processes}: at least one process is needed")
    if opts.repeats < 1 or (opts.repeats * opts.processes < 3 and not opts.pool_child):
        raise SystemExit(f"--repeats {opts.repeats} x --processes {opts.processes}: at least 3 repeats in all are "
                         "needed for a median and a range")
    if opts.lr < 0:
        raise SystemExit(f"--lr {opts.lr}: the learning rate must be >= 0")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False); "
            "run the CPU variant (--device cpu) or run on a machine with a GPU"
        )
    if opts.size in CUDA_ONLY_SIZES and opts.device != "cuda":
        raise SystemExit(f"--size {opts.size} is sized for a GPU (a CPU step takes minutes): add --device cuda, "
                         "or use --size realistic on CPU")
    torch.set_num_threads(opts.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def models_of(opts: argparse.Namespace) -> list[str]:
    return ["mixtral", "switch"] if opts.model == "both" else [opts.model]


# --------------------------------------------------------------------------------------------- models, batches
def build(model: str, size: str, device: str = "cpu", seed: int = 0, **extra):
    """The ``model`` ("mixtral" / "switch") at ``size``, in train mode on ``device``."""
    from hf_moe_tuning.models import build_tiny_model

    return build_tiny_model(model, seed=seed, vocab_size=VOCAB, **SHAPES[size][model], **extra).to(device).train()


def expert_share(model) -> float:
    """Share of the parameters in routed experts (the anatomy's ``experts`` group)."""
    from hf_moe_tuning.anatomy import ParamGroup, describe_moe

    anatomy = describe_moe(model)
    return anatomy.group_counts()[ParamGroup.EXPERTS] / anatomy.total_params


def check_expert_share(model, size: str) -> float:
    share = expert_share(model)
    if share < MIN_EXPERT_SHARE[size]:
        raise SystemExit(f"routed experts hold {100 * share:.1f}% of the parameters, below {MIN_EXPERT_SHARE[size]:.0%}")
    return share


def make_batches(model: str, size: str, n: int, device: str = "cpu", seed: int = 0) -> list[dict]:
    """``n`` right-padded batches (lengths seq, 7/8, 6/8, 5/8 of it), ``-100`` labels on padding."""
    batch, seq = BATCH[size]["batch"], BATCH[size]["seq"]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        lengths = torch.tensor([seq - (i % 4) * (seq // 8) for i in range(batch)])
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids * mask
        if model == "switch":
            target = seq // 2
            labels = torch.randint(3, VOCAB, (batch, target), generator=g)
            tmask = torch.arange(target)[None, :] < (lengths[:, None] // 2)
            labels = labels.masked_fill(~tmask, -100)
        else:
            labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)})
    return out


def describe(model_name: str, model, size: str) -> str:
    b = BATCH[size]
    params = sum(p.numel() for p in model.parameters())
    target = f", targets {b['seq'] // 2}" if model_name == "switch" else ""
    return (f"{model_name} ({size}): {params / 1e6:.1f}M parameters, routed experts {100 * expert_share(model):.1f}%, "
            f"batch {b['batch']} x sequence {b['seq']}{target}")


def copies(model, names: Sequence[str]) -> dict:
    """Independent deep copies of ``model`` (same weights), one per arm."""
    return {name: copy.deepcopy(model) for name in names}


def adamw(params, opts: argparse.Namespace) -> torch.optim.AdamW:
    """The optimizer of every arm: AdamW at ``opts.lr``, weight decay 0.01."""
    return torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.01)


@torch.no_grad()
def routing_balance(models: dict, batch: dict) -> dict[str, float]:
    """``{arm: load CV}``: the package's ``moe/load_cv_mean`` (the coefficient of variation of the tokens per
    expert, padding and ignored labels not counted, mean over MoE layers) of one eval-mode forward of each arm's
    model on ``batch`` (0 = perfectly balanced; the model's train/eval mode is restored).

    Untimed. It counts the router's own choice where the router returns one, else the experts
    ``ExpertLoadCallback`` derives from the logits (``select_routed``: the family's scoring, correction bias and
    group limits), through the package's router capture and expert-load functions, so it measures what the
    monitoring logs.
    """
    from hf_moe_tuning.callbacks.expert_load import LayerRouting, select_routed
    from hf_moe_tuning.metrics.expert_load import LayerLoad, expert_counts, summarize_load
    from hf_moe_tuning.routing.capture import RouterCapture

    out: dict[str, float] = {}
    for arm, model in models.items():
        capture = RouterCapture.acquire(model)
        training = model.training
        model.eval()  # no dropout or router jitter: the routing of the weights, the same for equal weights
        try:
            model(**batch)
            loads = []
            for layer, logits, mask in capture.layer_items():
                chosen = capture.choice(layer)
                if chosen is None:
                    routing = LayerRouting(layer, model.get_submodule(layer.router_path))
                    chosen = select_routed([routing], logits.unsqueeze(0))[0]
                counts = expert_counts(chosen, mask, layer.num_experts)
                loads.append(LayerLoad(layer.index, layer.path, layer.num_experts, layer.top_k,
                                       int(mask.sum()), counts.tolist()))
        finally:
            model.train(training)
            capture.release()
        out[arm] = summarize_load(loads).get("moe/load_cv_mean", float("nan"))
    return out


def print_routing_balance(models: dict, batch: dict) -> dict[str, float]:
    """Print :func:`routing_balance` after the timed steps (one line) and return it."""
    balance = routing_balance(models, batch)
    print("  routing after the timed steps, expert-load CV (mean over layers; 0 = balanced): "
          + ", ".join(f"{arm} {cv:.3f}" for arm, cv in balance.items()))
    return balance


#: the phases of a training step that :func:`train_step` can time separately
PHASES = ("forward", "backward", "optimizer")


def train_step(model, optimizer, batch: dict, phases: dict[str, float] | None = None) -> None:
    """One plain training step: forward, backward, optimizer step, ``zero_grad``.

    With ``phases`` (CPU only: CUDA kernels run asynchronously), the process CPU time of each of :data:`PHASES`
    is added to ``phases[phase]`` and ``phases["steps"]`` counts the steps, so a breakdown shows which part of a
    step an arm changes. The clock is read four times in every step, timed or not: negligible against a step.
    """
    t0 = time.process_time()
    loss = model(**batch).loss
    t1 = time.process_time()
    loss.backward()
    t2 = time.process_time()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.process_time()
    if phases is None:
        return
    for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2)):
        phases[phase] = phases.get(phase, 0.0) + seconds
    phases["steps"] = phases.get("steps", 0) + 1


def phase_breakdown(phases: dict[str, dict[str, float]], arm: str, baseline: str) -> str:
    """One line: the mean CPU ms per step of each phase of ``arm`` and ``baseline`` and their ratio per phase
    (from :func:`train_step`'s ``phases``; every step run, warmup included)."""

    def per_step(name: str) -> dict[str, float]:
        return {phase: 1000 * phases[name][phase] / phases[name]["steps"] for phase in PHASES}

    a, b = per_step(arm), per_step(baseline)
    share = ", ".join(f"{phase} {100 * b[phase] / sum(b.values()):.0f}%" for phase in PHASES)
    return (f"  phases (CPU ms per step): {baseline} " + " / ".join(f"{b[p]:.1f}" for p in PHASES)
            + f", {arm} " + " / ".join(f"{a[p]:.1f}" for p in PHASES) + f" (forward / backward / optimizer); "
            f"{arm}/{baseline}: " + ", ".join(f"{p} {a[p] / b[p]:.3f}" for p in PHASES)
            + f"; {baseline}'s step: {share}")


def trainer_step(model, optimizer, batch: dict, callbacks: Sequence, args, state, control, logged: dict) -> None:
    """:func:`train_step` with ``callbacks`` driven through the events a ``Trainer`` fires around it
    (``on_step_begin``, ``on_pre_optimizer_step``, ``on_step_end``); every ``args.logging_steps`` their train
    metrics are popped into ``logged`` (what ``Trainer.log`` merges)."""
    for cb in callbacks:
        cb.on_step_begin(args, state, control)
    model(**batch).loss.backward()  # a RouterLossCallback's forward hook added its losses
    for cb in callbacks:
        cb.on_pre_optimizer_step(args, state, control, model=model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    control.should_log = state.global_step % args.logging_steps == 0
    for cb in callbacks:
        cb.on_step_end(args, state, control)
    if control.should_log:
        for cb in callbacks:
            logged.update(cb.pop_metrics("train"))
        control.should_log = False


def count_ops(fn: Callable[[], None]) -> int:
    """How many aten operators ``fn`` dispatches (forward, backward and optimizer alike, views included).

    Deterministic for a device and a routing; on a GPU each non-view operator is a kernel the host must issue, so
    where a step is launch-bound (the realistic size on an H200) the step time follows this count. The optimizer's
    share depends on the device: :func:`adamw` loops over the parameters on CPU and runs for-each kernels on CUDA.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with _Counter():
        fn()
    return _Counter.calls


# --------------------------------------------------------------------------------------------- timing
class StepClock:
    """Times one step: process CPU time on CPU, a pair of CUDA events on CUDA (read at :meth:`collect`)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self._pending: list[tuple[str, object, object]] = []

    def time(self, name: str, fn: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self._pending.append((name, start, end))
            return 0.0
        t0 = time.process_time()
        fn()
        return time.process_time() - t0

    def collect(self) -> dict[str, float]:
        """Seconds per arm of the CUDA steps since the last call (one synchronisation)."""
        out: dict[str, float] = {}
        if self._pending:
            torch.cuda.synchronize()
            for name, start, end in self._pending:
                out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1000.0
            self._pending = []
        return out


def interleave(
    steps: dict[str, Callable[[object], None]],
    batches: Sequence[object],
    repeats: int,
    device: str = "cpu",
    warmup: int = 0,
    refresh: dict[str, Callable[[], None]] | None = None,
) -> dict[str, list[float]]:
    """``{arm: [seconds of each repeat]}``: ``repeats`` blocks of ``len(batches)`` steps of every arm, interleaved.

    Every arm sees the same batches; within a block the arm that goes first rotates every step.
    ``refresh[arm]``, where given, runs untimed right after each of that arm's steps (e.g. copying another arm's
    current weights in for its next step). After, not before: work run right before a timed step (a copy of
    every weight) leaves that step's caches in a state the other arms' steps do not start from; between an arm's
    refresh and its next step the other arms take their steps, so the next step starts like theirs.
    """
    names = list(steps)
    refresh = refresh or {}
    for batch in list(batches)[:warmup]:
        for name in names:
            steps[name](batch)
            if name in refresh:
                refresh[name]()
    clock = StepClock(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        block = dict.fromkeys(names, 0.0)
        for i, batch in enumerate(batches):
            for j in range(len(names)):
                name = names[(i + j) % len(names)]
                block[name] += clock.time(name, functools.partial(steps[name], batch))
                if name in refresh:
                    refresh[name]()
        for name, value in clock.collect().items():
            block[name] += value
        for name, value in block.items():
            times[name].append(value)
    return times


# --------------------------------------------------------------------------------------------- reporting
@dataclass
class Figure:
    """Median and range over repeats of a ratio (``values``: the per-repeat ratios)."""

    median: float
    low: float
    high: float
    values: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def of(cls, ratios: Sequence[float]) -> Figure:
        ratios = tuple(ratios)
        return cls(statistics.median(ratios), min(ratios), max(ratios), ratios)

    @classmethod
    def pool(cls, figures: Sequence[Figure]) -> Figure:
        """One figure over the repeats of all ``figures`` (e.g. the same figure from several processes)."""
        return cls.of([value for figure in figures for value in figure.values])

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.low:.3f}, {self.high:.3f}]"


def ratio(times: dict[str, list[float]], a: str, b: str) -> Figure:
    """``times[a] / times[b]`` per repeat: median and range."""
    return Figure.of([x / y for x, y in zip(times[a], times[b])])


def clock_name(device: str) -> str:
    return "CUDA events" if device == "cuda" else "process CPU time"


def header(script: str, opts: argparse.Namespace, extra: str = "") -> None:
    import hf_moe_tuning

    processes = f" processes={opts.processes}" if opts.processes > 1 else ""
    print(f"{script}: size={opts.size} device={opts.device} repeats={opts.repeats}{processes} threads={opts.threads} "
          f"lr={opts.lr:g} clock={clock_name(opts.device)} torch={torch.__version__} {extra}".rstrip())
    print(f"  package: {os.path.dirname(os.path.dirname(os.path.abspath(hf_moe_tuning.__file__)))}")
    sys.stdout.flush()


def repeats_label(opts: argparse.Namespace) -> str:
    """How many repeats a pooled figure spans: ``repeats`` or ``N repeats in P processes``."""
    if opts.processes > 1:
        return f"{opts.processes * opts.repeats} repeats in {opts.processes} processes"
    return "repeats"


def report_arms(times: dict[str, list[float]], steps: int, arm: str, baseline: str) -> Figure:
    """Print the mean step time of every arm over ``steps`` timed steps, the noise floor ``control / baseline``
    and ``arm / baseline``; return the latter."""
    print("  step time: " + ", ".join(f"{name} {1000 * sum(t) / steps:.1f} ms" for name, t in times.items()))
    print(f"  noise floor control/{baseline}: {ratio(times, 'control', baseline)}")
    figure = ratio(times, arm, baseline)
    print(f"  {arm}/{baseline}: {figure}")
    return figure


def report_ops(ops: dict[str, int], baseline: str, arm: str, step: str = "one step") -> None:
    """Print the :func:`count_ops` of ``baseline`` and ``arm`` in ``step`` and their ratio."""
    print(f"  aten ops in {step} (forward, backward, AdamW; on a GPU, kernels the host issues): "
          f"{baseline} {ops[baseline]}, {arm} {ops[arm]} ({ops[arm] / ops[baseline]:.3f}x)")


# --------------------------------------------------------------------------------------------- driving a script
#: what :func:`measure_models` pools across processes: a Figure, or a named tuple of them (field name -> Figure)
Measured = Figure | tuple
_POOL_MARK = "@pool-figures "


def _figures_of(result: Measured) -> dict[str, Figure]:
    if isinstance(result, Figure):
        return {"": result}
    if not hasattr(result, "_fields"):
        raise TypeError(f"a measurement pooled across processes is a Figure or a named tuple of them, not {result!r}")
    return dict(zip(result._fields, result))


def _rebuild(figures: dict[str, Figure]) -> Measured:
    return figures[""] if list(figures) == [""] else tuple(figures.values())


def _measure_in_processes(opts: argparse.Namespace, script_file: str, argv: Sequence[str]) -> dict[str, Measured]:
    """Run the script ``opts.processes`` times in fresh processes, echo their output indented, and pool."""
    per_process: list[dict[str, dict[str, Figure]]] = []
    cmd = [sys.executable, script_file, *argv, "--processes", "1", "--pool-child"]
    for k in range(opts.processes):
        print(f"process {k + 1}/{opts.processes}:", flush=True)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as child:
            marked = None
            for line in child.stdout:
                if line.startswith(_POOL_MARK):
                    marked = json.loads(line[len(_POOL_MARK):])
                else:
                    print("  | " + line.rstrip("\n"), flush=True)
        if child.returncode or marked is None:
            raise SystemExit(f"process {k + 1}/{opts.processes} failed (exit {child.returncode}); its output is above")
        per_process.append({model: {name: Figure.of(values) for name, values in figures.items()}
                            for model, figures in marked.items()})
    pooled: dict[str, Measured] = {}
    for model in per_process[0]:
        names = per_process[0][model]
        medians = "; ".join(f"{name + ' ' if name else ''}" + ", ".join(f"{run[model][name].median:.3f}" for run in per_process)
                            for name in names)
        print(f"  {model}: median of each process: {medians}")
        pooled[model] = _rebuild({name: Figure.pool([run[model][name] for run in per_process]) for name in names})
    return pooled


def measure_models(
    script: str,
    opts: argparse.Namespace,
    measure: Callable[[str, argparse.Namespace], T],
    argv: Sequence[str] | None = None,
) -> dict[str, T]:
    """Check the options (:func:`setup`), print the header and ``{model: measure(model, opts)}`` of every model asked for.

    With ``--processes P > 1`` the measurement runs in ``P`` fresh processes of the script (``argv``: its
    arguments, default ``sys.argv[1:]``) and every figure is pooled over their repeats; ``measure`` must then
    return a :class:`Figure` or a named tuple of them.
    """
    setup(opts)
    header(script, opts)
    if opts.processes > 1:
        return _measure_in_processes(opts, os.path.abspath(inspect.getfile(measure)),
                                     list(sys.argv[1:] if argv is None else argv))
    results = {name: measure(name, opts) for name in models_of(opts)}
    if opts.pool_child:
        marked = {model: {name: list(f.values) for name, f in _figures_of(r).items()} for model, r in results.items()}
        print(_POOL_MARK + json.dumps(marked), flush=True)
    return results


def run(
    script: str,
    opts: argparse.Namespace,
    measure: Callable[[str, argparse.Namespace], Figure],
    label: str,
    digits: int = 4,
    argv: Sequence[str] | None = None,
) -> dict[str, Figure]:
    """A benchmark whose figure per model is one :class:`Figure`: measure every model (:func:`measure_models`),
    then print the line ``<label>, median [range] over repeats: <model> <figure>; ...`` and, last, the largest
    median with ``digits`` decimals."""
    figures = measure_models(script, opts, measure, argv)
    print(f"{label}, median [range] over {repeats_label(opts)}: "
          + "; ".join(f"{name} {figure}" for name, figure in figures.items()))
    print(f"{max(f.median for f in figures.values()):.{digits}f}")
    return figures
