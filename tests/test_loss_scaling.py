"""Per-batch-mean losses (T5, Switch) under gradient accumulation: ``MoETrainer`` trains the global token mean.

transformers skips the division by the accumulation steps (and multiplies by the number of processes) for every
model that takes ``**kwargs``; T5 and Switch do but average their loss per batch, so their gradients came out
``gradient_accumulation_steps`` (and N) times too large. :mod:`hf_moe_tuning.loss_scaling` fixes it inside
``MoETrainer``; a plain ``Trainer`` shows the bug, which is what makes the test able to fail.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import ByT5Tokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from hf_moe_tuning import MoETrainer, MoETrainingArguments
from hf_moe_tuning.loss_scaling import global_token_mean_loss, loss_uses_num_items
from hf_moe_tuning.models import build_tiny_model


def _pairs() -> Dataset:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):  # targets of different lengths: a per-batch mean and a token mean differ
        src = torch.randint(3, 250, (10,), generator=g).tolist()
        rows.append({"input_ids": src, "attention_mask": [1] * 10, "labels": src[: 2 + i]})
    return Dataset.from_list(rows)


def _one_step(trainer_cls, args_cls, tmp_path, name: str, batch: int, accumulation: int) -> dict[str, torch.Tensor]:
    model = build_tiny_model("switch", seed=0)
    args = args_cls(
        output_dir=str(tmp_path / name), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", report_to="none", save_strategy="no",
        use_cpu=True, dataloader_drop_last=False, seed=0, data_seed=0,
    )
    collator = DataCollatorForSeq2Seq(ByT5Tokenizer(), label_pad_token_id=-100)
    trainer = trainer_cls(model=model, args=args, train_dataset=_pairs(), data_collator=collator)
    trainer.get_train_dataloader = _in_order(trainer)
    trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _in_order(trainer):
    """The training batches in dataset order (one shuffle-free pass), so both runs see the same 8 examples."""
    loader = torch.utils.data.DataLoader(trainer.train_dataset, batch_size=trainer.args.per_device_train_batch_size,
                                         collate_fn=trainer.data_collator, shuffle=False)
    return lambda: loader


def _max_diff(a: dict, b: dict, reference: dict) -> float:
    """Largest difference of the two updates (each relative to the untrained ``reference``)."""
    return max(((a[k] - reference[k]) - (b[k] - reference[k])).abs().max().item() for k in reference)


def test_switch_loss_is_a_per_batch_mean_and_causal_lm_loss_is_not():
    assert not loss_uses_num_items(build_tiny_model("switch"))
    assert not loss_uses_num_items(build_tiny_model("t5"))
    assert loss_uses_num_items(build_tiny_model("mixtral"))


def test_accumulation_gives_the_update_of_one_large_batch(tmp_path):
    reference = {k: v.clone() for k, v in build_tiny_model("switch", seed=0).state_dict().items()}
    whole = _one_step(MoETrainer, MoETrainingArguments, tmp_path, "whole", batch=8, accumulation=1)
    accumulated = _one_step(MoETrainer, MoETrainingArguments, tmp_path, "acc", batch=2, accumulation=4)
    update = max((whole[k] - reference[k]).abs().max().item() for k in reference)
    assert update > 1e-3  # the step changed the weights
    assert _max_diff(whole, accumulated, reference) <= 1e-5 * max(update, 1.0)


def test_plain_trainer_shows_the_bug_that_moe_trainer_fixes(tmp_path):
    reference = {k: v.clone() for k, v in build_tiny_model("switch", seed=0).state_dict().items()}
    whole = _one_step(Trainer, TrainingArguments, tmp_path, "whole", batch=8, accumulation=1)
    accumulated = _one_step(Trainer, TrainingArguments, tmp_path, "acc", batch=2, accumulation=4)
    update = max((whole[k] - reference[k]).abs().max().item() for k in reference)
    assert _max_diff(whole, accumulated, reference) > 0.1 * update  # ~4x the step: transformers' scaling


def test_wrapper_is_removed_and_leaves_evaluation_unchanged():
    model = build_tiny_model("switch", seed=0).eval()
    batch = DataCollatorForSeq2Seq(ByT5Tokenizer(), label_pad_token_id=-100)(_pairs().select(range(3)).to_list())
    before = model(**batch).loss
    with global_token_mean_loss(model):
        same = model(**batch).loss  # no num_items_in_batch: the model's own loss
        tokens = int((batch["labels"] != -100).sum())
        summed = model(**batch, num_items_in_batch=torch.tensor(1)).loss
    assert "forward" not in model.__dict__
    assert torch.equal(before, same)
    assert summed.item() == pytest.approx(before.item() * tokens, rel=1e-4)  # the token sum over num_items (1)


def test_wrapper_rescales_the_models_loss_without_a_second_cross_entropy(monkeypatch):
    """The global token mean comes from the model's own mean times its token count: one cross-entropy per forward,
    and terms the model adds (Switch's own router losses, asked for with output_router_logits=True) are kept,
    weighted by the micro-batch's token share."""
    model = build_tiny_model("switch", seed=0).eval()
    model.router_z_loss_coef = model.router_aux_loss_coef = 0.1  # the tiny config has them at 0
    batch = DataCollatorForSeq2Seq(ByT5Tokenizer(), label_pad_token_id=-100)(_pairs().select(range(3)).to_list())
    tokens = int((batch["labels"] != -100).sum())
    calls = []
    original = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: calls.append(1) or original(*a, **k))
    own = model(**batch, output_router_logits=True)
    ce = original(own.logits.reshape(-1, own.logits.size(-1)), batch["labels"].reshape(-1), ignore_index=-100)
    assert own.loss.item() > ce.item()  # the model's own router losses are part of its loss
    calls.clear()
    with global_token_mean_loss(model):
        wrapped = model(**batch, output_router_logits=True, num_items_in_batch=torch.tensor(2 * tokens)).loss
    assert len(calls) == 1  # the model's own cross-entropy only
    assert wrapped.item() == pytest.approx(own.loss.item() / 2, rel=1e-5)  # token share 1/2 of the global batch


def test_wrapper_gives_zero_loss_and_gradient_for_a_batch_without_target_tokens():
    model = build_tiny_model("switch", seed=0).train()
    batch = DataCollatorForSeq2Seq(ByT5Tokenizer(), label_pad_token_id=-100)(_pairs().select(range(2)).to_list())
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with global_token_mean_loss(model):
        loss = model(**batch, num_items_in_batch=torch.tensor(5)).loss
    assert loss.item() == 0.0  # the model's own mean is NaN here
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
