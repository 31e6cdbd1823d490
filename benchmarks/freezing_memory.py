"""Memory and step time of ST-MoE freezing, and optimizer state of an expert subset, in one run.

Two models (built from configs, offline):

* ``switch``: a Switch Transformer (T5 shape, MoE every other layer, per-expert modules) whose routed
  experts hold >= 80% of the parameters;
* ``mixtral``: a fused-expert decoder MoE (experts in 3-D tensors).

Measured, side by side:

1. **peak memory** and **step time** of ``non_moe`` vs ``all`` (AdamW with weight decay, same batches).
   Each (model, strategy) runs in a fresh subprocess, interleaved over ``--repeats``:
   on CUDA the peak is ``torch.cuda.max_memory_allocated()``; on CPU it is the process's peak resident
   set size (``getrusage(RUSAGE_SELF).ru_maxrss``) minus its RSS right before the model is built
   (psutil), i.e. params + grads + optimizer state + activations + allocator slack. Step time is the
   median over the timed steps (after warm-up), then the median over repeats.
2. **optimizer-state bytes** of training a 10% expert subset (strategy ``moe``, router frozen, ESFT-style;
   inside fused tensors through :mod:`hf_moe_tuning.routing.expert_subset`) vs full fine-tuning
   (``all``): the bytes of every tensor in ``optimizer.state`` after one AdamW step.

Targets: non_moe peak <= 0.60x and step time <= 0.75x of all; subset optimizer state <= 0.15x of full.
The last line printed is the summary.

    python benchmarks/freezing_memory.py            # CPU, ~2-4 minutes on 2 cores
    python benchmarks/freezing_memory.py --device cuda --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

# Model shapes: experts dominate the parameter count, as in switch-base-* and Mixtral-like MoEs.
SWITCH = dict(d_model=128, d_kv=32, d_ff=512, num_heads=4, num_experts=20, expert_capacity=256)
MIXTRAL = dict(hidden_size=128, intermediate_size=512, num_local_experts=20, num_experts_per_tok=2, num_hidden_layers=4, head_dim=32)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {"switch": ("switch", SWITCH), "mixtral": ("mixtral", MIXTRAL)}
SUBSET_SHARE = 0.10


def build(model_key: str):
    from hf_moe_tuning.models import build_tiny_model

    name, overrides = MODELS[model_key]
    return build_tiny_model(name, seed=0, **overrides)


def batches(model_key: str, n: int, batch_size: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 300, (batch_size, seq_len), generator=g)
        labels = ids[:, : seq_len // 2].contiguous() if model_key == "switch" else ids
        out.append({"input_ids": ids, "labels": labels})
    return out


def subset_experts(model) -> dict[int, list[int]]:
    """The first ``SUBSET_SHARE`` of the experts (at least one) in every MoE layer."""
    from hf_moe_tuning.anatomy import describe_moe

    return {
        layer.index: list(range(max(1, round(SUBSET_SHARE * layer.num_experts)))) for layer in describe_moe(model).layers
    }


def expert_share(model) -> float:
    from hf_moe_tuning.anatomy import ParamGroup, describe_moe

    anatomy = describe_moe(model)
    return anatomy.group_counts()[ParamGroup.EXPERTS] / anatomy.total_params


# --------------------------------------------------------------------------------------------- worker
def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One (model, strategy) training run in this process; returns peak memory and step time."""
    from hf_moe_tuning import apply_freezing

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = batches(args.model, args.warmup + args.steps, args.batch_size, args.seq_len)
    baseline = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build(args.model).to(device)
    model.train()
    report = apply_freezing(model, args.strategy)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    report.slice_freezer.attach(optimizer)
    times = []
    for i, batch in enumerate(data):
        batch = {k: v.to(device) for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        method = "cuda_max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
        method = "peak_rss_minus_baseline"
    return {
        "model": args.model,
        "strategy": args.strategy,
        "peak_bytes": int(peak),
        "memory_method": method,
        "step_s": statistics.median(times),
        "trainable_frac": report.plan.trainable_frac,
    }


def run_worker(args: argparse.Namespace, model: str, strategy: str) -> dict[str, Any]:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", "--model", model, "--strategy", strategy,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
        "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--device", args.device,
    ]  # fmt: skip
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- optimizer state
def optimizer_state_bytes(model_key: str, subset: bool) -> tuple[int, float]:
    """Bytes of AdamW state after one step (subset: 10% experts, router frozen) and the trainable share."""
    from hf_moe_tuning import apply_freezing

    model = build(model_key)
    if subset:
        report = apply_freezing(model, "moe", train_router=False, experts=subset_experts(model))
    else:
        report = apply_freezing(model, "all")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    report.slice_freezer.attach(optimizer)
    model(**batches(model_key, 1, 2, 16)[0]).loss.backward()
    optimizer.step()
    nbytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return nbytes, report.plan.trainable_frac


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="switch", choices=sorted(MODELS))
    parser.add_argument("--strategy", default="all")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    summary = {}
    for model_key in MODELS:
        share = expert_share(build(model_key))
        runs: dict[str, list[dict[str, Any]]] = {"all": [], "non_moe": []}
        for _ in range(args.repeats):
            for strategy in ("all", "non_moe"):
                runs[strategy].append(run_worker(args, model_key, strategy))
        peak = {s: statistics.median(r["peak_bytes"] for r in rs) for s, rs in runs.items()}
        step = {s: statistics.median(r["step_s"] for r in rs) for s, rs in runs.items()}
        full_state, full_frac = optimizer_state_bytes(model_key, subset=False)
        subset_state, subset_frac = optimizer_state_bytes(model_key, subset=True)
        ratios = {
            "peak": peak["non_moe"] / peak["all"],
            "time": step["non_moe"] / step["all"],
            "opt_state": subset_state / full_state,
        }
        summary[model_key] = ratios
        method = runs["all"][0]["memory_method"]
        print(f"== {model_key}: routed experts hold {100 * share:.1f}% of the parameters ({method}, {args.device})")
        for strategy in ("all", "non_moe"):
            print(
                f"   {strategy:<8} peak {peak[strategy] / 2**20:8.1f} MiB   step {1000 * step[strategy]:8.1f} ms   "
                f"trainable {100 * runs[strategy][0]['trainable_frac']:5.1f}%"
            )
        print(
            f"   optimizer state: full {full_state / 2**20:.1f} MiB ({100 * full_frac:.0f}% trainable) vs "
            f"{int(100 * SUBSET_SHARE)}% expert subset {subset_state / 2**20:.2f} MiB ({100 * subset_frac:.1f}% trainable)"
        )
        print(
            f"   ratios: non_moe/all peak {ratios['peak']:.2f} (<= 0.60), step time {ratios['time']:.2f} (<= 0.75); "
            f"subset/full optimizer state {ratios['opt_state']:.3f} (<= 0.15)"
        )
    ok = all(r["peak"] <= 0.60 and r["time"] <= 0.75 and r["opt_state"] <= 0.15 for r in summary.values())
    parts = [
        f"{m}: peak {r['peak']:.2f}x time {r['time']:.2f}x opt-state {r['opt_state']:.3f}x" for m, r in summary.items()
    ]
    print(f"summary (non_moe/all peak, step time; subset/full optimizer state): {' | '.join(parts)} -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
