"""Hot path (issue 18 points 1-5): no host sync in a training forward/backward, no second router matmul,
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


_ALL_MONITORING = dict(  # every monitoring option on, as a user gets it, plus a fused expert subset
    moe_experts=[0, 2], moe_drift_probe_size=8, moe_drift_every_steps=1, moe_expert_load_heatmap=True,
    moe_expert_load_jsonl=True, logging_steps=3,
)


@pytest.mark.parametrize(
    "nan_policy, extra",
    [("error", {}), ("skip", {}), ("error", _ALL_MONITORING)],
    ids=["error", "skip", "subset-drift-heatmap"],
)
def test_no_host_sync_in_a_training_forward_or_backward(tmp_path, nan_policy, extra):
    """Router losses + expert-load logging on, two micro-batches per step: the forwards and backwards of a
    non-logging step call no ``item`` / ``tolist`` / ``__bool__`` / ``int`` / ``float`` / ``torch.equal`` from
    package code; the whole optimizer step only reads flags once, before the update (the NaN policy). With every
    option on (a trainable expert subset inside the fused tensors, the drift probe, heatmaps), the same holds, and
    the drift measurement at the logging step reads the device once."""
    settings = dict(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-3, logging_steps=100, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, moe_aux_loss_coef=0.01, moe_z_loss_coef=1e-3, moe_log_expert_load=True,
        moe_drift_probe_size=0, moe_expert_load_heatmap=False, moe_nan_policy=nan_policy,
    )
    args = MoETrainingArguments(**{**settings, **extra})
    trainer = MoETrainer(model=build_tiny_model("mixtral", seed=0), args=args, train_dataset=_dataset())
    if extra:
        from hf_moe_tuning.routing.expert_subset import installed_expert_subsets

        assert installed_expert_subsets(trainer.model), "no expert subset was installed"
    counter = SyncCounter()
    phase = {"step": 0}
    in_step = {"forward_backward": Counter(), "optimizer_step": Counter(), "drift": Counter()}
    training_step = trainer.training_step

    def counted_training_step(*a, **kw):
        before = Counter(counter.calls)
        try:
            return training_step(*a, **kw)
        finally:
            in_step["forward_backward"] += counter.calls - before

    trainer.training_step = counted_training_step

    from transformers import TrainerCallback

    from hf_moe_tuning.callbacks.expert_load import ExpertLoadCallback

    load = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ExpertLoadCallback))
    drift_metrics = load._drift_metrics
    drift_logs: list[dict] = []

    def counted_drift(step):
        counter.active, before = True, Counter(counter.calls)
        try:
            out = drift_metrics(step)
            drift_logs.append(out)
            return out
        finally:
            in_step["drift"] += counter.calls - before
            counter.active = False

    load._drift_metrics = counted_drift

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
    if extra:
        drifts = [d for d in drift_logs if d]
        assert len(drifts) == 1 and "moe/routing_drift" in drifts[0], drift_logs  # measured at the step-3 log
        assert sum(in_step["drift"].values()) == 1, dict(in_step["drift"])  # one host read for all layers
        assert {fn for (_, _, _, fn) in in_step["drift"]} == {"_drift_metrics"}, dict(in_step["drift"])
        assert os.path.isfile(tmp_path / "expert_load_train.png")  # rendered off the step path, there at return


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


# ------------------------------------------------------------------ hot path 3: router losses stacked over layers
def _former_router_losses(items, specs, num_sequences, selected):
    """The former per-layer implementation (a float mask twice and an ``[N, E]`` one-hot per layer)."""
    from hf_moe_tuning.router_loss import router_probs, select_experts

    def weights_of(mask, logits):
        return torch.ones(logits.shape[0]) if mask is None else mask.to(torch.float32)

    def groups(x):
        return x.reshape(num_sequences, x.shape[0] // num_sequences, *x.shape[1:])

    layer_aux, layer_z = {}, {}
    for layer, logits, mask in items:
        spec = specs[layer.index]
        chosen = (selected or {}).get(layer.index)
        if chosen is not None and chosen.shape[0] != logits.shape[0]:
            chosen = None
        probs = router_probs(logits, spec.scoring)
        chosen = select_experts(logits, spec) if chosen is None else chosen
        weights = weights_of(mask, logits)
        assignments = torch.zeros_like(probs).scatter_(1, chosen, 1.0)
        denom = groups(weights).sum(dim=1).clamp_min(1.0)
        mean_prob = groups(probs * weights[:, None]).sum(dim=1) / denom[:, None]
        fraction = groups(assignments * weights[:, None]).sum(dim=1) / (spec.top_k * denom[:, None])
        layer_aux[layer.index] = spec.num_experts * (fraction * mean_prob).sum(dim=-1)
        z = torch.logsumexp(logits.float(), dim=-1) ** 2
        weights = weights_of(mask, logits)  # rebuilt, as before
        layer_z[layer.index] = groups(z * weights).sum(dim=1) / groups(weights).sum(dim=1).clamp_min(1.0)
    aux = torch.stack(list(layer_aux.values())).mean(dim=0)
    z = torch.stack(list(layer_z.values())).mean(dim=0)
    return aux, z, layer_aux, layer_z


@pytest.mark.parametrize(
    "family, batch, seq, overrides",
    [("mixtral", 3, 11, {}), ("qwen2_moe", 2, 16, {}), ("deepseek_v3", 4, 7, {}), ("olmoe", 1, 9, {}),
     ("switch", 3, 10, {}), ("switch", 2, 13, {"encoder_sparse_step": 1, "decoder_sparse_step": 1})],
)
def test_stacked_router_losses_equal_the_per_layer_implementation(family, batch, seq, overrides):
    """Values and gradients of the stacked computation equal the former per-layer loop within 1e-6, with padding
    and ignored labels masked, for routers that return their choice (Mixtral, Qwen2-MoE, DeepSeek-V3 with its
    sigmoid scores and correction bias, OLMoE) and bare linear routers whose choice is derived (Switch encoder and
    decoder stacks, whose masks differ)."""
    from hf_moe_tuning.anatomy import describe_moe
    from hf_moe_tuning.router_loss import compute_router_losses, routing_spec
    from hf_moe_tuning.routing.capture import RouterCapture

    model = build_tiny_model(family, seed=0, **overrides).train()
    with torch.no_grad():  # routers away from uniform, so every term matters
        for name, p in model.named_parameters():
            if "router" in name or ("gate" in name and p.dim() == 2 and p.shape[0] <= 64):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(3, 300, (batch, seq), generator=g)
    lengths = [seq - (i % 3) * (seq // 4) for i in range(batch)]
    mask = torch.tensor([[1] * n + [0] * (seq - n) for n in lengths])
    if family == "switch":
        labels = torch.randint(3, 300, (batch, seq // 2 + 1), generator=g)
        labels[0, -2:] = -100
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    else:
        labels = ids.masked_fill(mask == 0, -100)
        labels[-1, :2] = -100  # ignored labels on a real token
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    anatomy = describe_moe(model)
    specs = {layer.index: routing_spec(model, layer) for layer in anatomy.layers}
    capture = RouterCapture.acquire(model, anatomy)
    try:
        model(**inputs)
        items = list(capture.layer_items())
        assert len(items) == len(anatomy.layers) > 1
        new = compute_router_losses(items, specs, batch, selected=capture.indices)
        old_aux, old_z, old_layer_aux, old_layer_z = _former_router_losses(items, specs, batch, capture.indices)
        torch.testing.assert_close(new.aux, old_aux, rtol=0, atol=1e-6)
        torch.testing.assert_close(new.z, old_z, rtol=0, atol=1e-6 * max(1.0, float(old_z.detach().abs().max())))
        assert list(new.layer_aux) == list(old_layer_aux)
        for index in old_layer_aux:
            torch.testing.assert_close(new.layer_aux[index], old_layer_aux[index], rtol=0, atol=1e-6)
            torch.testing.assert_close(new.layer_z[index], old_layer_z[index], rtol=1e-6, atol=1e-6)
        logits = [logit for _, logit, _ in items]
        new_grads = torch.autograd.grad((new.aux + 0.1 * new.z).sum(), logits, retain_graph=True)
        old_grads = torch.autograd.grad((old_aux + 0.1 * old_z).sum(), logits)
        for a, b in zip(new_grads, old_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert float(old_aux.min()) > 0
    finally:
        capture.release()
