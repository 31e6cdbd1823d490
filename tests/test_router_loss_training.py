"""RouterLossCallback inside trainers: scaling under accumulation, built-in loss off, NaN policy, logging."""

from __future__ import annotations

import functools
import glob
import json

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hf_moe_tuning.anatomy import NoMoELayersError, describe_moe
from hf_moe_tuning.callbacks.router_loss import RouterLossCallback, accumulation_window
from hf_moe_tuning.config import MoETrainingArguments
from hf_moe_tuning.models import build_tiny_model
from hf_moe_tuning.router_loss import compute_router_losses, routing_spec
from hf_moe_tuning.routing.capture import RouterCapture
from hf_moe_tuning.trainer import MoETrainer, enable_moe_logging

AUX, Z = 0.5, 0.05


def _dataset(n: int = 8, seq: int = 10, seed: int = 0, seq2seq: bool = False) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = seq - (i % 4) * 2  # different padding per row
        ids = torch.randint(3, 384, (length,), generator=g).tolist()
        pad = seq - length
        row = {"input_ids": ids + [0] * pad, "attention_mask": [1] * length + [0] * pad}
        if seq2seq:  # decoder labels of their own length, with ignored positions
            row["labels"] = ids[:3] + [-100] * (i % 3) + [5] * (2 - i % 3) + [-100]
        else:
            row["labels"] = ids + [-100] * pad
        rows.append(row)
    return Dataset.from_list(rows)


def _args(tmp_path, cls=TrainingArguments, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", dataloader_drop_last=False, seed=0, disable_tqdm=True,
    )
    base.update(kw)
    return cls(**base)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train_once(tmp_path, name, batch, accumulation, router_loss, bind=False, accepts_loss_kwargs=None):
    model = build_tiny_model(name)
    if accepts_loss_kwargs is not None:
        model.accepts_loss_kwargs = accepts_loss_kwargs
    callbacks = [RouterLossCallback(aux_coef=AUX, z_coef=Z)] if router_loss else []
    args = _args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(seq2seq=name == "switch"), callbacks=callbacks)
    if bind and callbacks:
        callbacks[0].bind_trainer(trainer)
    before = _params(model)
    trainer.train()
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}  # = lr · grad with SGD, lr = 1


@functools.cache
def _expected_grad(name, with_lm: bool) -> dict[str, torch.Tensor]:
    """∇ (AUX · mean_s aux_s + Z · mean_s z_s [+ LM loss]) over the 8 sequences of the global batch, directly."""
    model = build_tiny_model(name).train()
    ds = _dataset(seq2seq=name == "switch")
    batch = {k: torch.tensor(ds[k]) for k in ds.column_names}
    anatomy = describe_moe(model)
    specs = {layer.index: routing_spec(model, layer) for layer in anatomy.layers}
    capture = RouterCapture.acquire(model, anatomy)
    lm_loss = model(**batch).loss
    losses = compute_router_losses(capture.layer_items(), specs, 8)
    capture.release()
    total = AUX * losses.aux.mean() + Z * losses.z.mean()
    (total + lm_loss if with_lm else total).backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def _assert_same(a, b, atol=2e-5):
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("bind", [False, True], ids=["hook", "bound"])
def test_gradient_same_for_1x8_and_4x2(tmp_path, bind):
    """A model that takes ``num_items_in_batch``: the whole update (LM + router) is the global-batch gradient."""
    expected = _expected_grad("mixtral", with_lm=True)
    router_only = _expected_grad("mixtral", with_lm=False)
    assert any(v.abs().max() > 1e-4 for n, v in router_only.items() if ".gate." in n)
    _assert_same(_train_once(tmp_path, "mixtral", 8, 1, True, bind=bind), expected)
    _assert_same(_train_once(tmp_path, "mixtral", 2, 4, True, bind=bind), expected)


@pytest.mark.parametrize(
    "name,accepts_loss_kwargs",
    [("mixtral", False), pytest.param("switch", None, marks=pytest.mark.slow)],
    ids=["trainer-divides-by-accumulation", "switch-encoder-decoder"],
)
def test_router_gradient_same_for_1x8_and_4x2(tmp_path, name, accepts_loss_kwargs):
    """Router part of the update (run with minus run without) equals the global-batch router gradient.

    Needed where the LM part itself is not accumulation-invariant: a model without loss kwargs (the Trainer
    divides each micro-batch mean by the accumulation steps) and Switch (T5's loss ignores num_items_in_batch).
    """
    kw = dict(accepts_loss_kwargs=accepts_loss_kwargs)
    expected = _expected_grad(name, with_lm=False)
    for batch, accumulation in ((8, 1), (2, 4)):
        on = _train_once(tmp_path, name, batch, accumulation, True, **kw)
        off = _train_once(tmp_path, name, batch, accumulation, False, **kw)
        _assert_same({n: on[n] - off[n] for n in on}, expected)


def test_accumulation_window_mirrors_trainer():
    assert [accumulation_window(s, 10, 4) for s in range(6)] == [4, 4, 2, 4, 4, 2]
    assert accumulation_window(7, None, 4) == 4
    assert accumulation_window(3, 9, 1) == 1


def test_builtin_loss_off_while_training_and_restored(tmp_path):
    model = build_tiny_model("mixtral", output_router_logits=True, router_aux_loss_coef=0.02)
    cb = RouterLossCallback(aux_coef=0.01, z_coef=0.0)
    seen = []
    model.register_forward_hook(lambda m, a, o: seen.append((m.config.output_router_logits, m.router_aux_loss_coef)))
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_dataset(), callbacks=[cb])
    trainer.train()
    assert seen and all(s == (False, 0.0) for s in seen)
    assert model.config.output_router_logits is True and model.router_aux_loss_coef == 0.02
    assert cb.capture is None and not hasattr(model, "_hf_moe_router_capture")  # hooks removed at train end
    assert not model._forward_hooks.keys() - {next(iter(model._forward_hooks))}  # only the test's own hook left
    assert not model._forward_pre_hooks


def test_explicit_output_router_logits_is_refused():
    model = build_tiny_model("mixtral").train()
    batch = {k: torch.tensor(v) for k, v in _dataset(n=2).to_dict().items()}
    cb = RouterLossCallback()
    cb.attach(model)
    try:
        with pytest.raises(ValueError, match="output_router_logits=True"):
            model(**batch, output_router_logits=True)
        model.eval()
        model(**batch, output_router_logits=True)  # evaluation may ask for the model's own router outputs
    finally:
        cb.detach()
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_logged_loss_is_lm_plus_weighted_router_losses(tmp_path):
    model = build_tiny_model("qwen2_moe")
    cb = RouterLossCallback(aux_coef=AUX, z_coef=Z)
    args = _args(tmp_path, max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                 learning_rate=1e-3, logging_steps=2)
    trainer = enable_moe_logging(Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[cb]))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["loss"] == pytest.approx(h["lm_loss"] + AUX * h["router/aux_loss"] + Z * h["router/z_loss"], rel=1e-4)
        assert h["router/aux_coef"] == AUX and h["router/z_coef"] == Z


def test_schedule_reaches_logs(tmp_path):
    args = _args(tmp_path, cls=MoETrainingArguments, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                 moe_aux_loss_coef=0.1, moe_aux_loss_schedule="linear_warmup", moe_router_loss_warmup_steps=2,
                 moe_z_loss_coef=0.01, moe_z_loss_schedule="off")
    cb = RouterLossCallback.from_args(args)
    assert cb is not None and not cb.z_on
    trainer = MoETrainer(model=build_tiny_model("mixtral"), args=args, train_dataset=_dataset(), callbacks=[cb])
    trainer.train()
    coefs = [h["router/aux_coef"] for h in trainer.state.log_history if "router/aux_coef" in h]
    assert coefs == pytest.approx([0.0, 0.05, 0.1, 0.1])
    assert all(h["router/z_coef"] == 0.0 for h in trainer.state.log_history if "router/z_coef" in h)


def test_from_args_none_when_off(tmp_path):
    assert RouterLossCallback.from_args(_args(tmp_path, cls=MoETrainingArguments)) is None
    off = _args(tmp_path, cls=MoETrainingArguments, moe_aux_loss_coef=0.1, moe_aux_loss_schedule="off")
    assert RouterLossCallback.from_args(off) is None


@pytest.mark.parametrize(
    "kwargs,match",
    [({"aux_coef": -1.0}, "moe_aux_loss_coef"), ({"z_coef": "big"}, "moe_z_loss_coef"),
     ({"aux_schedule": "step"}, "moe_aux_loss_schedule"), ({"nan_policy": "ignore"}, "moe_nan_policy"),
     ({"aux_coef": 0.0, "z_coef": 0.0}, "does nothing")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RouterLossCallback(**kwargs)


def test_dense_model_is_refused(tmp_path):
    with pytest.raises(NoMoELayersError, match="router loss"):
        Trainer(model=build_tiny_model("llama"), args=_args(tmp_path), train_dataset=_dataset(),
                callbacks=[RouterLossCallback()])


def _nan_router(model):
    layer = describe_moe(model).layers[1]
    with torch.no_grad():
        model.get_parameter(layer.router_weight)[0, 0] = float("nan")
    return layer


def test_nan_router_logits_error_names_layer_and_step(tmp_path):
    model = build_tiny_model("mixtral")
    layer = _nan_router(model)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[RouterLossCallback()])
    with pytest.raises(FloatingPointError, match=rf"MoE layer 1 \({layer.path}\) at optimizer step 1"):
        trainer.train()


def test_nan_router_logits_skip_policy(tmp_path):
    model = build_tiny_model("mixtral")
    _nan_router(model)
    before = _params(model)
    cb = RouterLossCallback(nan_policy="skip")
    trainer = enable_moe_logging(Trainer(model=model, args=_args(tmp_path, max_steps=2, learning_rate=1e-2),
                                         train_dataset=_dataset(), callbacks=[cb]))
    trainer.train()
    assert cb.skipped_steps == 2
    assert trainer.state.log_history[1]["router/skipped_steps"] == 2.0
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) or torch.isnan(before[n]).any(), n  # no update at all


def test_skipped_steps_keep_counting_after_a_resume(tmp_path):
    def run(resume=None):
        model = build_tiny_model("mixtral")
        _nan_router(model)  # every step is skipped
        cb = RouterLossCallback(nan_policy="skip")
        args = _args(tmp_path, max_steps=3, save_strategy="steps", save_steps=2)
        trainer = enable_moe_logging(Trainer(model=model, args=args, train_dataset=_dataset(4), callbacks=[cb]))
        trainer.train(resume_from_checkpoint=resume)
        return cb, trainer

    cb, _ = run()
    assert cb.skipped_steps == 3
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["RouterLossCallback"]["attributes"] == {"skipped_steps": 2}
    cb, trainer = run(resume=str(tmp_path / "checkpoint-2"))
    assert cb.skipped_steps == 3  # 2 from the checkpoint + the one step after it
    assert trainer.state.log_history[-2]["router/skipped_steps"] == 3.0


def test_unbound_sft_trainer_is_detected_and_bound_one_works(tmp_path):
    trl = pytest.importorskip("trl")
    ds = Dataset.from_list([{"prompt": "Q: 2+2?", "completion": " A: 4."}] * 8)
    from transformers import ByT5Tokenizer

    def make(bind):
        model = build_tiny_model("mixtral")
        tok = ByT5Tokenizer()
        args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, router_aux_loss_coef=0.0, logging_steps=1, save_strategy="no",
                             learning_rate=1e-3)
        cb = RouterLossCallback(aux_coef=AUX, z_coef=Z)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[cb])
        if bind:
            cb.bind_trainer(trainer)
            enable_moe_logging(trainer)
        return trainer

    with pytest.raises(RuntimeError, match="bind_trainer"):
        make(bind=False).train()
    trainer = make(bind=True)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("router/aux_loss" in h and "lm_loss" in h for h in logs)
    for h in logs:
        assert h["loss"] == pytest.approx(h["lm_loss"] + AUX * h["router/aux_loss"] + Z * h["router/z_loss"], rel=1e-4)


def test_tensorboard_has_the_five_keys_and_eval_reports_them(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = _args(tmp_path, cls=MoETrainingArguments, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                 report_to=["tensorboard"], output_dir=str(tmp_path / "tb"), eval_strategy="steps", eval_steps=2,
                 per_device_eval_batch_size=4)
    trainer = MoETrainer(model=build_tiny_model("mixtral"), args=args, train_dataset=_dataset(),
                         eval_dataset=_dataset(n=6, seed=1), callbacks=[RouterLossCallback(aux_coef=0.01, z_coef=0.001)])
    trainer.train()
    files = glob.glob(str(tmp_path / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    assert files
    tags = set()
    for f in files:
        acc = EventAccumulator(f)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    keys = ["lm_loss", "router/aux_loss", "router/z_loss", "router/aux_coef", "router/z_coef"]
    for key in keys:
        assert f"train/{key}" in tags, (key, sorted(tags))
        assert f"eval/{key}" in tags, (key, sorted(tags))
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert evals and evals[0]["eval_lm_loss"] == pytest.approx(evals[0]["eval_loss"], rel=1e-5)


def _moe_keys(metrics: dict) -> set[str]:
    return {k for k in metrics if k.startswith(("eval_router/", "eval_moe/")) or k == "eval_lm_loss"}


@pytest.mark.parametrize("plain", [False, True], ids=["MoETrainer", "Trainer+enable_moe_logging"])
def test_standalone_evaluate_reports_and_returns_every_moe_key(tmp_path, plain):
    """Issue 15 point 4: evaluate() before training, after it and eval-only reports eval_router/* and
    eval_lm_loss like eval_moe/*, and returns them (so eval_results.json / all_results.json hold them)."""
    from hf_moe_tuning.callbacks.expert_load import ExpertLoadCallback

    def make(out):
        model = build_tiny_model("mixtral")
        if plain:
            args = _args(tmp_path, output_dir=str(tmp_path / out), per_device_train_batch_size=4,
                         per_device_eval_batch_size=4, learning_rate=1e-3, max_steps=2)
            trainer = Trainer(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(n=6, seed=1),
                              callbacks=[RouterLossCallback(aux_coef=0.01, z_coef=0.001),
                                         ExpertLoadCallback(write_heatmap=False, probe_size=0)])
            return enable_moe_logging(trainer)
        args = _args(tmp_path, cls=MoETrainingArguments, output_dir=str(tmp_path / out), per_device_train_batch_size=4,
                     per_device_eval_batch_size=4, learning_rate=1e-3, max_steps=2, moe_aux_loss_coef=0.01,
                     moe_z_loss_coef=0.001, moe_expert_load_heatmap=False, moe_drift_probe_size=0)
        return MoETrainer(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(n=6, seed=1))

    expected = {"eval_lm_loss", "eval_router/aux_loss", "eval_router/z_loss", "eval_router/aux_coef",
                "eval_router/z_coef", "eval_moe/load_cv_mean"}
    trainer = make("run")
    before = trainer.evaluate()  # before training
    logged = [trainer.state.log_history[-1]]
    trainer.train()
    after = trainer.evaluate()  # after training
    logged.append(trainer.state.log_history[-1])
    eval_only = make("eval_only").evaluate()  # a trainer that never trains
    for metrics in (before, after, eval_only, *logged):
        assert expected <= _moe_keys(metrics), sorted(metrics)
        assert metrics["eval_lm_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert after["eval_lm_loss"] != pytest.approx(before["eval_lm_loss"])  # trained in between
