"""Optimizer state of expert-subset training vs full fine-tuning, taken after every expert has received tokens.

Two copies of one model train on the same batches with AdamW (``--lr``, weight decay 0.01):

* ``full``: strategy ``all`` (everything trains);
* ``subset``: strategy ``moe`` with the router frozen and ``--subset-share`` of the experts of every MoE layer
  trainable (ESFT-style; inside fused expert tensors through :mod:`hf_moe_tuning.routing.expert_subset`).

AdamW creates the state of a parameter at its first gradient, and an expert that no token reached has none, so
the ratio is read only once **every expert of every MoE layer has received tokens** in the ``full`` copy (counted
from the router's own choice, padding masked) and every trainable parameter of both copies holds state; a batch
that leaves an expert unreached is followed by more. The physical limit of the ratio is the trainable-parameter
share ``subset / full``, printed beside it. Each repeat draws other batches; the figure is the median [range].

    python benchmarks/expert_subset_state.py --size tiny
    python benchmarks/expert_subset_state.py --size realistic
"""

from __future__ import annotations

import argparse

import _harness as h
import torch

from hf_moe_tuning import apply_freezing
from hf_moe_tuning.anatomy import describe_moe
from hf_moe_tuning.metrics.expert_load import expert_counts, select_experts
from hf_moe_tuning.routing.capture import RouterCapture


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)  # moments, not the 0-d step counters


def _subset(model, share: float) -> dict[int, list[int]]:
    return {layer.index: list(range(max(1, round(share * layer.num_experts)))) for layer in describe_moe(model).layers}


def one_repeat(model_name: str, opts: argparse.Namespace, seed: int) -> tuple[float, float, int]:
    """``(state ratio, trainable ratio, steps taken)`` of one repeat."""
    arms = {}
    for arm in ("full", "subset"):
        model = h.build(model_name, opts.size, opts.device)
        if arm == "full":
            report = apply_freezing(model, "all")
        else:
            report = apply_freezing(model, "moe", train_router=False, experts=_subset(model, opts.subset_share))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = h.adamw(params, opts)
        report.slice_freezer.attach(optimizer)
        arms[arm] = (model, params, optimizer)
    capture = RouterCapture.acquire(arms["full"][0])
    counts = {layer.index: torch.zeros(layer.num_experts, dtype=torch.long) for layer in capture.anatomy.layers}
    steps = 0
    try:
        for batch in h.make_batches(model_name, opts.size, opts.max_steps, opts.device, seed=seed):
            for arm, (model, _, optimizer) in arms.items():
                model(**batch).loss.backward()
                if arm == "full":
                    for layer, logits, mask in capture.layer_items():
                        chosen = capture.choice(layer)
                        chosen = select_experts(logits.detach(), layer.top_k) if chosen is None else chosen
                        counts[layer.index] += expert_counts(chosen, mask, layer.num_experts).cpu()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            steps += 1
            reached = all(bool((c > 0).all()) for c in counts.values())
            stated = all(p in opt.state for _, params, opt in arms.values() for p in params)
            if reached and stated:
                break
        else:
            unreached = {i: int((c == 0).sum()) for i, c in counts.items() if (c == 0).any()}
            raise RuntimeError(f"after {opts.max_steps} steps some experts never received a token ({unreached}) or "
                               "some parameter has no optimizer state; raise --max-steps")
    finally:
        capture.release()
    full_bytes, subset_bytes = _state_bytes(arms["full"][2]), _state_bytes(arms["subset"][2])
    trainable = sum(p.numel() for p in arms["subset"][1]) / sum(p.numel() for p in arms["full"][1])
    return subset_bytes / full_bytes, trainable, steps


def measure(model_name: str, opts: argparse.Namespace) -> h.Figure:
    model = h.build(model_name, opts.size)
    h.check_expert_share(model, opts.size)
    print(h.describe(model_name, model, opts.size))
    results = [one_repeat(model_name, opts, seed) for seed in range(opts.repeats)]
    figure = h.Figure.of([r[0] for r in results])
    trainable = h.Figure.of([r[1] for r in results])
    experts = describe_moe(model).layers[0].num_experts
    print(f"  subset: {max(1, round(opts.subset_share * experts))} of {experts} experts per layer, router frozen; every expert "
          f"reached after {', '.join(str(r[2]) for r in results)} step(s)")
    print(f"  optimizer state subset/full: {figure}; trainable parameters subset/full (the limit): {trainable}")
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_common_args(parser)
    parser.add_argument("--subset-share", type=float, default=0.10, help="trainable experts per layer (at least 1)")
    parser.add_argument("--max-steps", type=int, default=50, help="give up when an expert is still unreached")
    h.run("expert_subset_state", parser.parse_args(argv), measure, "subset/full optimizer state", digits=5, argv=argv)


if __name__ == "__main__":
    main()
