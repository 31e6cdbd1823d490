"""Hot path (issue 18 points 1, 2, 4): no host sync in a training forward/backward, no second router matmul,
capacity accounting memory flat in the number of experts."""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch
from datasets import Dataset

import hf_moe_tuning
from hf_moe_tuning import MoETrainer, MoETrainingArguments
from hf_moe_tuning.models import build_tiny_model

PACKAGE_DIR = os.path.dirname(os.path.abspath(hf_moe_tuning.__file__)) + os.sep


def _dataset(n: int = 16, length: int = 12) -> Dataset:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 300, (length,), generator=g).tolist()
        pad = i % 3
        rows.append({"input_ids": ids, "attention_mask": [1] * (length - pad) + [0] * pad,
                     "labels": ids[: length - pad] + [-100] * pad})
    return Dataset.from_list(rows)


class SyncCounter:
    """Count host-syncing tensor calls whose caller is a file of the package."""

    SYNCS = [(torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "__bool__"), (torch.Tensor, "__int__"),
             (torch.Tensor, "__float__"), (torch, "equal")]

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.active = False
        self._saved: list = []

    def _wrap(self, name, original):
        counter = self

        def wrapper(*args, **kwargs):
            if counter.active:
                caller = sys._getframe(1)
                if caller.f_code.co_filename.startswith(PACKAGE_DIR):
                    where = os.path.relpath(caller.f_code.co_filename, PACKAGE_DIR)
                    counter.calls[(name, where, caller.f_lineno, caller.f_code.co_name)] += 1
            return original(*args, **kwargs)

        return wrapper

    def __enter__(self):
        for owner, name in self.SYNCS:
            original = getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved = []


@pytest.mark.parametrize("nan_policy", ["error", "skip"])
def test_no_host_sync_in_a_training_forward_or_backward(tmp_path, nan_policy):
    """Router losses + expert-load logging on, two micro-batches per step: the forwards and backwards of a
    non-logging step call no ``item`` / ``tolist`` / ``__bool__`` / ``int`` / ``float`` / ``torch.equal`` from
    package code; the whole optimizer step only reads flags once, before the update (the NaN policy)."""
    args = MoETrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-3, logging_steps=100, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, moe_aux_loss_coef=0.01, moe_z_loss_coef=1e-3, moe_log_expert_load=True,
        moe_drift_probe_size=0, moe_expert_load_heatmap=False, moe_nan_policy=nan_policy,
    )
    trainer = MoETrainer(model=build_tiny_model("mixtral", seed=0), args=args, train_dataset=_dataset())
    counter = SyncCounter()
    phase = {"step": 0}
    in_step = {"forward_backward": Counter(), "optimizer_step": Counter()}
    training_step = trainer.training_step

    def counted_training_step(*a, **kw):
        before = Counter(counter.calls)
        try:
            return training_step(*a, **kw)
        finally:
            in_step["forward_backward"] += counter.calls - before

    trainer.training_step = counted_training_step

    from transformers import TrainerCallback

    class Window(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            phase["step"] = state.global_step + 1
            counter.active = phase["step"] == 2  # step 1 warms up (one-time checks); step 2 is measured
            if counter.active:
                counter.calls.clear()

        def on_step_end(self, args, state, control, **kwargs):
            if counter.active:
                in_step["optimizer_step"] = Counter(counter.calls)
            counter.active = False

    trainer.add_callback(Window())
    trainer.callback_handler.callbacks.insert(0, trainer.callback_handler.callbacks.pop())  # first and last
    with counter:
        trainer.train()
    assert phase["step"] == 3
    assert not in_step["forward_backward"], dict(in_step["forward_backward"])
    step_calls = in_step["optimizer_step"]
    # the NaN guards read their flags once per optimizer step, before the update (the counter does see them)
    assert {fn for (_, _, _, fn) in step_calls} <= {"on_pre_optimizer_step", "_apply_nan_policy"}, dict(step_calls)
    assert sum(step_calls.values()) <= 2, dict(step_calls)  # one read per guard, whatever the layers and micro-batches


# ------------------------------------------------------------------ hot path 4: capacity accounting memory
def _one_hot_capacity_overflow(top1: torch.Tensor, capacity: int, num_experts: int) -> torch.Tensor:
    """The former implementation: an int64 one-hot ``[..., S, E]`` and its cumulative sum."""
    one_hot = torch.nn.functional.one_hot(top1.long(), num_experts)
    priority = torch.cumsum(one_hot, dim=-2).gather(-1, top1.long().unsqueeze(-1))
    return (priority > capacity).squeeze(-1)


def test_capacity_overflow_equals_the_one_hot_implementation():
    from hf_moe_tuning.metrics.expert_load import capacity_overflow

    g = torch.Generator().manual_seed(0)
    cases = [((2, 5), 3, 2), ((3, 4, 10), 8, 2), ((4, 2, 64), 128, 1), ((1, 1, 1), 2, 0), ((5, 3, 17), 4, 3),
             ((2, 6, 33), 16, 5), ((0, 7), 4, 1)]
    for shape, experts, capacity in cases:
        for _ in range(3):
            top1 = torch.randint(0, experts, shape, generator=g)
            got = capacity_overflow(top1, capacity, experts)
            assert got.dtype == torch.bool and got.shape == top1.shape
            assert torch.equal(got, _one_hot_capacity_overflow(top1, capacity, experts)), (shape, experts, capacity)
    # skewed routing (most tokens on one expert), int32 indices
    top1 = torch.where(torch.rand(4, 3, 50, generator=g) < 0.8, 0, torch.randint(0, 32, (4, 3, 50), generator=g))
    assert torch.equal(capacity_overflow(top1.int(), 4, 32), _one_hot_capacity_overflow(top1, 4, 32))


def _largest_intermediate_bytes(fn, *args) -> int:
    """Bytes of the largest tensor any aten op creates while ``fn(*args)`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel() * t.element_size())
            return out

    with Largest():
        fn(*args)
    return Largest.largest


def test_capacity_accounting_memory_does_not_grow_with_the_number_of_experts():
    """At 4 layers x 8 sequences x 256 tokens, the largest temporary of the capacity accounting is the same at 8
    and at 128 experts, a few int64 values per token; the one-hot implementation grew 16-fold."""
    from hf_moe_tuning.metrics.expert_load import capacity_overflow

    g = torch.Generator().manual_seed(0)
    shape = (4, 8, 256)
    tokens = shape[0] * shape[1] * shape[2]
    new, old = {}, {}
    for experts in (8, 128):
        top1 = torch.randint(0, experts, shape, generator=g)
        new[experts] = _largest_intermediate_bytes(capacity_overflow, top1, 40, experts)
        old[experts] = _largest_intermediate_bytes(_one_hot_capacity_overflow, top1, 40, experts)
    assert new[8] == new[128] <= 8 * tokens, new  # one int64 per token at most
    assert old[128] == 16 * old[8] and old[8] == 8 * tokens * 8, old  # the witness: [tokens, E] int64


# ------------------------------------------------------------------ hot path 2: no second router matmul
_MATMULS = {"mm", "addmm", "bmm"}


def _matmuls_of_a_training_forward(model, batch) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in _MATMULS:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        model(**batch)
    return Count.n


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_monitoring_adds_no_matmul_to_a_forward(family):
    """Router losses + expert-load logging on: a training forward of a Mixtral-style model runs exactly the aten
    mm/addmm/bmm ops of the plain forward (the router logits are reused, not recomputed)."""
    from hf_moe_tuning.callbacks.expert_load import ExpertLoadCallback
    from hf_moe_tuning.callbacks.router_loss import RouterLossCallback

    model = build_tiny_model(family, seed=0).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 12), generator=g)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    plain = _matmuls_of_a_training_forward(model, batch)
    router_loss = RouterLossCallback(aux_coef=0.01, z_coef=1e-3)
    router_loss.attach(model)
    load = ExpertLoadCallback(probe_size=0, write_jsonl=False, write_heatmap=False, tensorboard=False)
    load.bind(model)
    try:
        monitored = _matmuls_of_a_training_forward(model, batch)
        assert router_loss.capture.logits, "the capture recorded nothing"
    finally:
        load.close()
        router_loss.detach()
    assert plain > 0 and monitored == plain, (plain, monitored)
