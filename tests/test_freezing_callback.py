"""MoEFreezingCallback in a plain Trainer and in MoETrainer: before the optimizer, logged, resumable."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from transformers import ByT5Tokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from hf_moe_tuning import MoEFreezingCallback, MoETrainer, MoETrainingArguments, enable_moe_logging
from hf_moe_tuning.anatomy import NoMoELayersError
from hf_moe_tuning.demo import reverse_task, tokenize_seq2seq
from hf_moe_tuning.models import build_tiny_model


@pytest.fixture(scope="module")
def data():
    tok = ByT5Tokenizer()
    return tok, tokenize_seq2seq(reverse_task(64), tok)


def _args(tmp_path, **kw) -> dict:
    base = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        weight_decay=0.1,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    base.update(kw)
    return base


def test_plain_trainer_freezes_before_optimizer(tmp_path, data) -> None:
    tok, ds = data
    model = build_tiny_model("switch")
    cb = MoEFreezingCallback("non_moe", print_table=False)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**_args(tmp_path)),
        train_dataset=ds,
        data_collator=DataCollatorForSeq2Seq(tok, model=model),
        callbacks=[cb],
    )
    enable_moe_logging(trainer)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen_before and all(".router." in n or ".experts." in n for n in frozen_before)
    trainer.train()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name])
    logged = [row for row in trainer.state.log_history if "freeze/trainable_frac" in row]
    assert logged and logged[0]["freeze/trainable_frac"] == pytest.approx(cb.plan.trainable_frac)
    assert 0 < cb.plan.trainable_frac < 1


def test_moe_trainer_wires_freezing_and_logs(tmp_path, data, capsys, caplog) -> None:
    tok, ds = data
    model = build_tiny_model("switch")
    args = MoETrainingArguments(**_args(tmp_path), moe_freeze_strategy="moe", moe_experts="0,1")
    trainer = MoETrainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorForSeq2Seq(tok, model=model))
    with caplog.at_level(logging.INFO, logger="hf_moe_tuning.callbacks.freezing"):
        trainer.train()
    assert "MoE freezing strategy: moe" in caplog.text and "experts" in caplog.text
    assert "MoE freezing strategy" not in capsys.readouterr().out  # logged, not printed (issue 15 point 13)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n or ".expert_0." in n or ".expert_1." in n for n in trainable)
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert all("freeze/trainable_params" in r for r in rows)


def test_moe_trainer_rejects_moe_options_on_dense(tmp_path, data) -> None:
    tok, ds = data
    args = MoETrainingArguments(**_args(tmp_path), moe_z_loss_coef=1e-3)
    with pytest.raises(NoMoELayersError, match="moe_z_loss_coef"):
        MoETrainer(model=build_tiny_model("t5"), args=args, train_dataset=ds)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("moe_freeze_strategy", "nonmoe", "not one of"),
        ("moe_aux_loss_coef", -0.1, ">= 0"),
        ("moe_z_loss_coef", float("nan"), "finite"),
        ("moe_aux_loss_schedule", "exp", "not one of"),
        ("moe_expert_dropout", 1.0, r"\[0, 1\)"),
        ("moe_experts", "a,b", "moe_experts"),
    ],
)
def test_arguments_validate(tmp_path, field, value, match) -> None:
    with pytest.raises(ValueError, match=match):
        MoETrainingArguments(output_dir=str(tmp_path), **{field: value})


def test_freezing_survives_resume(tmp_path, data) -> None:
    """Interrupted at step 4 and resumed to step 8 == uninterrupted 8 steps, with the same frozen set."""
    tok, ds = data

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                control.should_training_stop = True

    def run(out, stop=False, resume=None):
        model = build_tiny_model("switch", seed=1)
        args = MoETrainingArguments(
            **_args(out, max_steps=8, save_strategy="steps", save_steps=4, data_seed=0, seed=0),
            moe_freeze_strategy="non_moe",
            moe_log_expert_load=False,  # expert-load logging has its own resume tests
        )
        trainer = MoETrainer(
            model=model,
            args=args,
            train_dataset=ds,
            data_collator=DataCollatorForSeq2Seq(tok, model=model),
            callbacks=[StopAt()] if stop else None,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    full_trainer, full = run(tmp_path / "full")
    run(tmp_path / "part", stop=True)
    ckpt = tmp_path / "part" / "checkpoint-4"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["MoEFreezingCallback"]
    assert saved["attributes"]["strategy"] == "non_moe"
    # the interrupted run stops at 4; resume it to 8
    resumed_trainer, resumed = run(tmp_path / "part", resume=str(ckpt))
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == {
        n for n, p in full.named_parameters() if p.requires_grad
    }
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert os.path.isdir(tmp_path / "part" / "checkpoint-8")


def test_resume_with_different_plan_is_refused(tmp_path, data) -> None:
    tok, ds = data
    model = build_tiny_model("switch", seed=1)
    args = MoETrainingArguments(**_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2), moe_freeze_strategy="moe", moe_log_expert_load=False)
    MoETrainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorForSeq2Seq(tok, model=model)).train()
    model = build_tiny_model("switch", seed=1)
    args = MoETrainingArguments(**_args(tmp_path, max_steps=4), moe_freeze_strategy="attention", moe_log_expert_load=False)
    trainer = MoETrainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorForSeq2Seq(tok, model=model))
    with pytest.raises(ValueError, match="different freezing plan"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
