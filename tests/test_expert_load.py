"""Expert-load logging: counts against hand-made counts, statistics on constructed cases, files, bad input."""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch
from datasets import Dataset
from helpers import variable_length_rows
from transformers import ByT5Tokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from hf_moe_tuning import MoETrainingArguments
from hf_moe_tuning.anatomy import NoMoELayersError
from hf_moe_tuning.callbacks.expert_load import ExpertLoadCallback
from hf_moe_tuning.metrics import (
    ExpertLoadCounter,
    LayerLoad,
    capacity_overflow,
    coefficient_of_variation,
    dead_experts,
    expert_counts,
    js_divergence,
    layer_statistics,
    max_violation,
    normalized_entropy,
    select_experts,
    summarize_load,
    top1_change_fraction,
)
from hf_moe_tuning.models import build_tiny_model
from hf_moe_tuning.routing.capture import RouterCapture
from hf_moe_tuning.trainer import enable_moe_logging


# ---------------------------------------------------------------------------------------------- helpers
def make_trainer(model, model_name, out, callbacks, *, rows=None, eval_rows=None, **overrides) -> Trainer:
    kwargs = dict(
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        logging_steps=2,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    collator = DataCollatorForSeq2Seq(ByT5Tokenizer(), model=model if model_name == "switch" else None, padding=True)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(str(out), **kwargs),
        train_dataset=Dataset.from_list(rows or variable_length_rows(model_name)),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        data_collator=collator,
        callbacks=callbacks,
    )
    return enable_moe_logging(trainer)


def read_jsonl(out, split: str) -> list[dict]:
    with open(os.path.join(out, "expert_load.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


class HandCounter(TrainerCallback):
    """The test's own reference counts, from the captured router logits.

    Top-k by sorting each token's logits in Python, masks straight from the batch (attention mask for
    the encoder; labels != -100 for the decoder; both for decoder-only models), Switch capacity by
    walking each sequence in order. Listed before ExpertLoadCallback, so it reads every training
    forward before the drift probe runs.
    """

    def __init__(self, model, capacity: int | None = None) -> None:
        self.capture = RouterCapture.acquire(model)
        self.capacity = capacity
        self.snapshots: dict[str, list[dict]] = {"train": [], "eval": []}
        self.running = self._empty()

    def _empty(self) -> dict:
        return {
            layer.index: {"counts": [0] * layer.num_experts, "tokens": 0, "dropped": 0, "positions": 0}
            for layer in self.capture.anatomy.layers
        }

    def _mask(self, stack) -> torch.Tensor:
        batch = self.capture.batch
        if stack == "encoder":
            return batch["attention_mask"].bool()
        labels = batch["labels"] != -100
        return labels if stack == "decoder" else labels & batch["attention_mask"].bool()

    def _count(self) -> None:
        for layer in self.capture.anatomy.layers:
            logits = self.capture.logits[layer.index].detach()
            mask = self._mask(layer.stack)
            batch_size, seq = mask.shape
            rows = logits.view(batch_size, seq, layer.num_experts).tolist()
            acc = self.running[layer.index]
            acc["positions"] += batch_size * seq
            for b in range(batch_size):
                used = [0] * layer.num_experts
                for s in range(seq):
                    order = sorted(range(layer.num_experts), key=lambda e: -rows[b][s][e])[: layer.top_k]
                    used[order[0]] += 1  # padding takes part in Switch's routing order, as in the model
                    if not mask[b, s]:
                        continue
                    acc["tokens"] += 1
                    for e in order:
                        acc["counts"][e] += 1
                    if self.capacity is not None and used[order[0]] > self.capacity:
                        acc["dropped"] += 1

    def _snapshot(self, split: str) -> None:
        self.snapshots[split].append(self.running)
        self.running = self._empty()

    def on_substep_end(self, args, state, control, **kwargs):
        self._count()

    def on_step_end(self, args, state, control, **kwargs):
        self._count()
        if control.should_log:
            self._snapshot("train")

    def on_prediction_step(self, args, state, control, **kwargs):
        self._count()

    def on_evaluate(self, args, state, control, **kwargs):
        self._snapshot("eval")


def assert_same_counts(records: list[dict], snapshots: list[dict], capacity: bool) -> None:
    assert len(records) == len(snapshots) > 0
    for record, snap in zip(records, snapshots):
        for layer in record["layers"]:
            want = snap[layer["layer"]]
            assert layer["counts"] == want["counts"], (record["step"], layer["layer"])
            assert layer["tokens"] == want["tokens"]
            if capacity:
                assert sum(layer["dropped"]) == want["dropped"]
            else:
                assert "dropped" not in layer


# ---------------------------------------------------------------------------------------------- pure functions
def test_expert_counts_is_masked_bincount():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 6, (50, 2), generator=g)
    mask = torch.rand(50, generator=g) > 0.3
    want = torch.bincount(idx[mask].flatten(), minlength=6)
    assert expert_counts(idx, mask, 6).tolist() == want.tolist()
    assert expert_counts(idx, None, 6).sum() == 100


def test_statistics_on_balanced_and_collapsed_loads():
    assert coefficient_of_variation([5, 5, 5, 5]) == 0.0
    assert normalized_entropy([5, 5, 5, 5]) == pytest.approx(1.0)
    assert max_violation([5, 5, 5, 5]) == 0.0
    assert dead_experts([5, 5, 5, 5]) == 0
    # one expert takes everything: std/mean = sqrt(E-1), entropy 0, MaxVio = E-1
    assert coefficient_of_variation([12, 0, 0, 0]) == pytest.approx(math.sqrt(3))
    assert normalized_entropy([12, 0, 0, 0]) == 0.0
    assert max_violation([12, 0, 0, 0]) == pytest.approx(3.0)
    assert dead_experts([12, 0, 0, 0]) == 3
    # two of four experts used equally: H = log 2 / log 4
    assert normalized_entropy([3, 3, 0, 0]) == pytest.approx(0.5)
    for fn in (coefficient_of_variation, normalized_entropy, max_violation):
        assert fn([0, 0, 0]) is None


def test_js_divergence_and_top1_change():
    assert js_divergence([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence([5, 0], [0, 5]) == pytest.approx(1.0)
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    m = (p + q) / 2
    want = 0.5 * (p * (p / m).log2()).sum() + 0.5 * (q * (q / m).log2()).sum()
    assert js_divergence([5, 5], [9, 1]) == pytest.approx(float(want))
    ref, cur = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, 1])
    assert top1_change_fraction(ref, cur) == 0.5
    assert top1_change_fraction(ref, cur, torch.tensor([True, False, True, False])) == 0.0
    assert top1_change_fraction(ref, cur, torch.zeros(4, dtype=torch.bool)) is None


def test_capacity_overflow_follows_routing_order():
    top1 = torch.tensor([[0, 0, 0, 1, 0], [2, 2, 1, 1, 1]])
    want = [[False, False, True, False, True], [False, False, False, False, True]]
    assert capacity_overflow(top1, capacity=2, num_experts=3).tolist() == want


def test_layer_statistics_with_no_tokens_is_empty():
    load = LayerLoad(0, "m", 4, 1, tokens=0, counts=[0, 0, 0, 0], dropped=[0, 0, 0, 0])
    assert layer_statistics(load) == {}
    assert summarize_load([load]) == {}


def test_counter_reduces_and_resets():
    counter = ExpertLoadCounter([(0, "a", 3, 1, True), (1, "b", 3, 2, False)])
    counter.update(0, torch.tensor([[0], [1], [1]]), torch.tensor([True, True, False]), torch.tensor([0, 1, 0]).bool())
    loads = counter.reduce()
    assert loads[0].counts == [1, 1, 0] and loads[0].tokens == 2 and loads[0].dropped == [0, 1, 0]
    assert loads[1].tokens == 0 and loads[1].dropped is None
    assert counter.reduce()[0].counts == [0, 0, 0]


def test_counter_update_layers_equals_per_layer_bincounts():
    g = torch.Generator().manual_seed(0)
    num_layers, n, k, e = 3, 50, 2, 6
    indices = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(num_layers * n)]).view(num_layers, n, k)
    mask = torch.rand(n, generator=g) > 0.3
    dropped = torch.rand(num_layers, n, generator=g) > 0.7
    spec = [(5, "a", e, k, True), (7, "b", e, k, True), (9, "c", e, k, True), (11, "d", 4, 1, False)]
    stacked, single = ExpertLoadCounter(spec), ExpertLoadCounter(spec)
    stacked.update_layers([5, 7, 9], indices, mask, dropped)
    for row, index in enumerate([5, 7, 9]):
        single.update(index, indices[row], mask, dropped[row])
    got, want = stacked.reduce(), single.reduce()
    assert [x.to_dict() for x in got] == [x.to_dict() for x in want]
    for row, load in enumerate(got[:3]):
        assert load.counts == torch.bincount(indices[row][mask].flatten(), minlength=e).tolist()
        assert load.tokens == int(mask.sum())
        assert load.dropped == torch.bincount(indices[row, :, 0][mask & dropped[row]], minlength=e).tolist()
    assert got[3].tokens == 0 and got[3].dropped is None


def test_counter_dropped_false_means_measured_none_dropped_and_none_means_unknown():
    counter = ExpertLoadCounter([(0, "a", 3, 1, True), (1, "b", 3, 1, True)])
    idx, mask = torch.tensor([[[0], [2], [2]]]), torch.tensor([True, True, False])
    counter.update_layers([0], idx, mask, False)
    counter.update_layers([1], idx, mask, None)
    loads = counter.reduce()
    assert loads[0].dropped == [0, 0, 0] and loads[0].counts == [1, 0, 1]
    assert loads[1].dropped is None and loads[1].counts == [1, 0, 1]
    with pytest.raises(ValueError, match="one number of experts"):
        ExpertLoadCounter([(0, "a", 3, 1, False), (1, "b", 4, 1, False)]).update_layers(
            [0, 1], torch.zeros(2, 3, 1, dtype=torch.long), mask
        )
    with pytest.raises(KeyError, match="not among"):
        counter.update_layers([4], idx, mask)


def test_stacked_selection_and_capacity_equal_per_layer():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, 8, generator=g)
    bias = torch.randn(3, 8, generator=g)
    for kwargs in ({}, {"scoring": "sigmoid", "num_groups": 4, "topk_groups": 2}):
        stacked = select_experts(logits, 2, correction_bias=bias if kwargs else None, **kwargs)
        for row in range(3):
            alone = select_experts(logits[row], 2, correction_bias=bias[row] if kwargs else None, **kwargs)
            assert torch.equal(stacked[row], alone)
    top1 = select_experts(logits, 1)[..., 0].view(3, 4, 10)
    stacked = capacity_overflow(top1, 2, 8)
    assert torch.equal(stacked, torch.stack([capacity_overflow(t, 2, 8) for t in top1]))


def test_select_experts_matches_deepseek_router_with_bias_and_groups():
    model = build_tiny_model("deepseek_v3")
    router = model.model.layers[1].mlp.gate
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    hidden = torch.randn(64, router.hidden_dim)
    logits, _, model_idx = router(hidden)
    ours = select_experts(
        logits,
        router.top_k,
        scoring="sigmoid",
        correction_bias=router.e_score_correction_bias,
        num_groups=router.num_group,
        topk_groups=router.topk_group,
    )
    assert torch.equal(ours.sort(dim=-1).values, model_idx.sort(dim=-1).values)
    # without the group limit the choice differs for some tokens: the emulation matters
    plain = select_experts(logits, router.top_k)
    assert not torch.equal(plain.sort(dim=-1).values, model_idx.sort(dim=-1).values)


# ---------------------------------------------------------------------------------------------- in a Trainer
@pytest.mark.parametrize(
    "model_name, capacity",
    [("switch", 3), ("switch", 64), ("mixtral", None)],
    ids=["switch-capacity-binds", "switch-capacity-above-seq", "mixtral"],
)
def test_counts_match_hand_counts_with_padding(model_name, capacity, tmp_path):
    overrides = {"expert_capacity": capacity} if capacity else {}
    model = build_tiny_model(model_name, **overrides)
    hand = HandCounter(model, capacity)
    callback = ExpertLoadCallback(probe_size=4, drift_every_steps=1)
    trainer = make_trainer(model, model_name, tmp_path, [hand, callback], eval_rows=variable_length_rows(model_name, 6, seed=1))
    trainer.train()
    trainer.evaluate()

    assert_same_counts(read_jsonl(tmp_path, "train"), hand.snapshots["train"], capacity is not None)
    assert_same_counts(read_jsonl(tmp_path, "eval"), hand.snapshots["eval"], capacity is not None)
    # padding was present, and for Switch the capacity really dropped tokens
    for layer_index, snap in hand.snapshots["train"][0].items():
        assert 0 < snap["tokens"] < snap["positions"], layer_index
    dropped = sum(s[i]["dropped"] for s in hand.snapshots["train"] for i in s)
    if capacity == 3:
        assert dropped > 0
    elif capacity == 64:  # sequences shorter than the capacity: nothing dropped, and dropped_frac says 0
        assert dropped == 0

    logs = trainer.state.log_history
    train_log = next(h for h in logs if "loss" in h)
    eval_log = next(h for h in logs if "eval_loss" in h)
    for i in range(len(callback.capture.anatomy.layers)):
        for stat in ("load_cv", "entropy", "max_violation", "dead_experts"):
            assert f"moe/layer{i}/{stat}" in train_log
            assert f"eval_moe/layer{i}/{stat}" in eval_log
        assert (f"moe/layer{i}/dropped_frac" in train_log) == (capacity is not None)
        if capacity == 64:
            assert train_log[f"moe/layer{i}/dropped_frac"] == 0.0
    record = read_jsonl(tmp_path, "train")[0]
    stats0 = layer_statistics(LayerLoad(**{k if k != "layer" else "index": v for k, v in record["layers"][0].items()}))
    assert train_log["moe/layer0/load_cv"] == pytest.approx(stats0["load_cv"])
    assert "moe/load_cv_mean" in train_log and "moe/routing_drift" in train_log
    assert os.path.exists(tmp_path / "expert_load_train.png")
    assert os.path.exists(tmp_path / "expert_load_eval_step4.png")
    callback.close()


def test_router_biased_to_one_expert(tmp_path):
    model = build_tiny_model("switch", router_bias=True, expert_capacity=4)
    routers = [m for n, m in model.named_modules() if n.endswith("router.classifier")]
    with torch.no_grad():
        for router in routers:
            router.weight.zero_()
            router.bias.copy_(torch.tensor([10.0] + [0.0] * 7))
    rows = variable_length_rows("switch", 8)
    callback = ExpertLoadCallback(probe_size=0)
    trainer = make_trainer(model, "switch", tmp_path, [callback], rows=rows, max_steps=1, logging_steps=1,
                           gradient_accumulation_steps=1, per_device_train_batch_size=8, learning_rate=0.0)
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    enc_tokens = sum(len(r["input_ids"]) for r in rows)
    enc_dropped = sum(max(0, len(r["input_ids"]) - 4) for r in rows)  # right padding comes after real tokens
    for i in range(4):
        assert log[f"moe/layer{i}/dead_experts"] == 7
        assert log[f"moe/layer{i}/entropy"] == 0.0
        assert log[f"moe/layer{i}/max_violation"] == pytest.approx(7.0)
        assert log[f"moe/layer{i}/load_cv"] == pytest.approx(math.sqrt(7))
    assert log["moe/dead_experts_total"] == 28
    assert log["moe/layer0/dropped_frac"] == pytest.approx(enc_dropped / enc_tokens)
    assert "moe/routing_drift" not in log  # probe_size=0


class SwapExperts(TrainerCallback):
    """At ``at_step``, swap router rows 0 and 1 of the first MoE layer (a known routing change)."""

    def __init__(self, router, at_step: int) -> None:
        self.router, self.at_step = router, at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            with torch.no_grad():
                self.router.weight[[0, 1]] = self.router.weight[[1, 0]].clone()


def test_routing_drift_zero_for_unchanged_model_and_exact_after_swap(tmp_path):
    model = build_tiny_model("mixtral")
    router = model.model.layers[0].mlp.gate
    rows = variable_length_rows("mixtral", 8)
    callback = ExpertLoadCallback(probe_size=6, drift_every_steps=1)
    trainer = make_trainer(model, "mixtral", tmp_path, [SwapExperts(router, at_step=2), callback], rows=rows,
                           max_steps=2, logging_steps=1, gradient_accumulation_steps=1, learning_rate=0.0)
    # the test's own reference: top-1 and top-2 choices of layer 0 on the same probe, before training
    probe = trainer.data_collator(rows[:6])
    capture = RouterCapture.acquire(model)
    model.eval()
    with torch.no_grad():
        model(**probe)
    logits = capture.logits[0]
    mask = (probe["attention_mask"].bool() & (probe["labels"] != -100)).reshape(-1)
    top1 = logits.argmax(-1)[mask]
    top2 = logits.topk(2, dim=-1).indices[mask]
    ref_counts = torch.bincount(top2.flatten(), minlength=4)
    swapped_counts = ref_counts[[1, 0, 2, 3]]
    capture.release()
    model.train()

    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["moe/routing_drift"] == 0.0 and logs[0]["moe/routing_drift_js"] == 0.0
    assert logs[1]["moe/layer0/routing_drift"] == pytest.approx(float((top1 <= 1).float().mean()))
    assert logs[1]["moe/layer0/routing_drift_js"] == pytest.approx(js_divergence(ref_counts, swapped_counts))
    assert logs[1]["moe/layer0/routing_drift"] > 0


@pytest.mark.parametrize("model_name", ["mixtral", "switch"])
def test_drift_probe_computes_no_loss_and_counts_the_same_tokens(model_name):
    """The probe forward gets no labels (no loss); a causal LM computes only the last position's logits and an
    encoder-decoder gets the decoder inputs its labels imply. The routing it reads, with the labels' token mask,
    equals that of a plain forward of the whole batch, labels included."""
    model = build_tiny_model(model_name).eval()
    collator = DataCollatorForSeq2Seq(ByT5Tokenizer(), label_pad_token_id=-100)
    probe = dict(collator(variable_length_rows(model_name, 6)))
    assert (probe["labels"] == -100).any()
    callback = ExpertLoadCallback(probe_size=6, write_jsonl=False, write_heatmap=False, tensorboard=False)
    callback.bind(model)
    callback._probe = probe
    seen = {}
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        got = callback._probe_routing(model)
    finally:
        handle.remove()
    assert "labels" not in seen
    if model_name == "mixtral":
        assert seen["logits_to_keep"] == 1
    else:
        assert torch.equal(seen["decoder_input_ids"], model.prepare_decoder_input_ids_from_labels(labels=probe["labels"]))

    with torch.no_grad():
        model(**probe)  # the old probe: the batch as it is, loss and full logits included
    expected = {}
    for routings, indices, mask, _ in callback._routed(with_dropped=False, top1_first=True):
        for routing, layer_indices in zip(routings, indices):
            expected[routing.layer.index] = (layer_indices[:, 0], mask)
    assert set(got) == set(expected) and got
    for index, (top1, mask) in expected.items():
        assert torch.equal(got[index][0], top1) and torch.equal(got[index][1], mask)
        assert not bool(mask.all())  # the labels' -100 (and the padding) are left out in both
    callback.close()


# ---------------------------------------------------------------------------------------------- reporters
def test_tensorboard_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = build_tiny_model("mixtral")
    callback = ExpertLoadCallback(probe_size=0, write_heatmap=False)
    trainer = make_trainer(model, "mixtral", tmp_path, [callback], report_to=["tensorboard"])
    assert callback._tensorboard_on(trainer.args)
    trainer.train()
    callback.close()
    from transformers.integrations import TensorBoardCallback

    # one TensorBoard path: the histograms are in transformers' own event file, beside the scalars
    tensorboard = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback))
    assert [d for d in os.listdir(tmp_path / "runs")] == [os.path.basename(tensorboard.logging_dir)]
    events = EventAccumulator(tensorboard.logging_dir, size_guidance={"histograms": 0}).Reload()
    assert "train/loss" in events.Tags()["scalars"]
    tags = events.Tags()["histograms"]
    assert tags == ["moe/layer0/expert_load", "moe/layer1/expert_load"]
    first = events.Histograms("moe/layer0/expert_load")[0]
    record = read_jsonl(tmp_path, "train")[0]
    assert first.step == 2
    assert list(first.histogram_value.bucket) == record["layers"][0]["counts"]


def test_from_args():
    args = MoETrainingArguments("out", moe_drift_probe_size=3, moe_expert_load_jsonl=False, report_to=["tensorboard"])
    callback = ExpertLoadCallback.from_args(args)
    assert (callback.probe_size, callback.write_jsonl, callback.write_heatmap, callback.tensorboard) == (3, False, True, True)
    assert ExpertLoadCallback.from_args(MoETrainingArguments("out", moe_log_expert_load=False)) is None
    with pytest.raises(ValueError, match="probe_size"):
        ExpertLoadCallback(probe_size=-1)
    with pytest.raises(ValueError, match="drift_every_steps"):
        ExpertLoadCallback(drift_every_steps=0)


# ---------------------------------------------------------------------------------------------- bad input
def test_dense_model_is_a_clear_error(tmp_path):
    with pytest.raises(NoMoELayersError, match="Expert-load logging"):
        make_trainer(build_tiny_model("t5"), "switch", tmp_path, [ExpertLoadCallback()])


def test_interval_without_tokens_omits_metrics_and_warns_once(tmp_path, caplog):
    model = build_tiny_model("mixtral")
    callback = ExpertLoadCallback(probe_size=0)
    trainer = make_trainer(model, "mixtral", tmp_path, [callback], rows=variable_length_rows("mixtral", 8, ignore_all=True),
                           max_steps=2, logging_steps=1, gradient_accumulation_steps=1)
    with caplog.at_level(logging.WARNING, logger="hf_moe_tuning.callbacks.expert_load"):
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and not any(k.startswith("moe/") for h in logs for k in h)
    warnings = [r for r in caplog.records if "no unmasked token" in r.getMessage()]
    assert len(warnings) == 1
    assert all(layer["tokens"] == 0 for r in read_jsonl(tmp_path, "train") for layer in r["layers"])


# ---------------------------------------------------------------------------------------------- router's own choice
def test_counts_follow_the_routers_own_choice_where_emulation_would_not(tmp_path):
    """DeepSeek-V2's group-limited greedy routing (max per group, softmax): the counts are the router's choice."""
    model = build_tiny_model(
        "deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2, n_routed_experts=8,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    routers = {}
    for layer in RouterCapture(model).anatomy.layers:
        router = model.get_submodule(layer.router_path)
        with torch.no_grad():
            router.weight.normal_(std=0.5)
        routers[layer.index] = router
    seen: dict[int, torch.Tensor] = {}
    handles = [
        router.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[2].detach().clone()))
        for i, router in routers.items()
    ]
    callback = ExpertLoadCallback(probe_size=0, write_jsonl=False, write_heatmap=False)
    callback.bind(model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0)))
    logits = {i: callback.capture.logits[i].clone() for i in routers}
    callback._consume("train")
    loads = {load.index: load for load in callback._counters["train"].reduce()}
    callback.close()
    for handle in handles:
        handle.remove()
    differs = False
    for index, chosen in seen.items():
        assert loads[index].counts == torch.bincount(chosen.reshape(-1), minlength=8).tolist()
        emulated = select_experts(logits[index], 2, scoring="softmax", num_groups=4, topk_groups=2)
        differs |= not torch.equal(emulated.sort(-1).values, chosen.sort(-1).values)
    assert differs, "the test needs a case where deriving the choice from the logits would miscount"


def test_router_indices_out_of_range_are_not_used(caplog):
    model = build_tiny_model("mixtral")
    capture = RouterCapture(model)
    layer = capture.anatomy.layers[0]
    logits = torch.zeros(2, layer.num_experts)
    with caplog.at_level(logging.WARNING, logger="hf_moe_tuning.routing.capture"):
        capture._keep_router_choice(layer, (logits, logits, torch.tensor([[0, layer.num_experts]])))
    assert layer.index not in capture.indices
    assert "outside [0, 4)" in caplog.text
    capture._keep_router_choice(layer, (logits, logits, torch.tensor([[0, 1], [2, 3]])))
    assert layer.index not in capture.indices  # that router stays on the logits for good
    other = capture.anatomy.layers[1]
    capture._keep_router_choice(other, (logits, logits, torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)))
    assert capture.indices[other.index].dtype == torch.long


@pytest.mark.parametrize("runner", ["trainer", "moe_trainer"])
def test_drift_after_resume_is_against_the_runs_start(runner, tmp_path, caplog):
    """A run resumed from a checkpoint logs the same drift as the uninterrupted run (reference saved with it).

    ``trainer``: a plain Trainer whose script passes ``args.resume_from_checkpoint`` on (the HF examples'
    pattern); ``moe_trainer``: MoETrainer, which tells the callback the folder it resumes from.
    """
    from hf_moe_tuning import MoETrainer

    rows = variable_length_rows("switch", 16)
    common = dict(max_steps=4, logging_steps=1, gradient_accumulation_steps=1, learning_rate=5e-2,
                  save_strategy="steps", save_steps=2)

    def run(out, resume=None):
        model = build_tiny_model("switch")
        if runner == "trainer":
            callback = ExpertLoadCallback(probe_size=6, drift_every_steps=1, write_heatmap=False)
            trainer = make_trainer(model, "switch", out, [callback], rows=rows, resume_from_checkpoint=resume, **common)
        else:
            args = MoETrainingArguments(
                str(out), per_device_train_batch_size=4, use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
                moe_drift_probe_size=6, moe_drift_every_steps=1, moe_expert_load_heatmap=False, **common,
            )
            collator = DataCollatorForSeq2Seq(ByT5Tokenizer(), model=model, padding=True)
            trainer = MoETrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator)
        trainer.train(resume_from_checkpoint=resume)
        return {h["step"]: h["moe/routing_drift"] for h in trainer.state.log_history if "moe/routing_drift" in h}

    full = run(tmp_path / "full")
    assert full[4] > 0, "the run must move the routing for the test to mean anything"
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "expert_load_drift_reference.pt").is_file()
    resumed = run(tmp_path / "resumed", resume=str(checkpoint))  # another output_dir: found through the resume path
    assert resumed[3] == pytest.approx(full[3]) and resumed[4] == pytest.approx(full[4])

    os.remove(checkpoint / "expert_load_drift_reference.pt")
    with caplog.at_level(logging.WARNING, logger="hf_moe_tuning.callbacks.expert_load"):
        fallback = run(tmp_path / "fallback", resume=str(checkpoint))
    assert "without the drift reference" in caplog.text
    assert fallback[3] < full[3]  # measured against the resumed model: less drift than since the start
