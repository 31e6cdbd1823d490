"""A one-minute demo: fine-tune a tiny Switch Transformer with an ST-MoE freezing preset.

The task is generated here (copy a random lower-case word and reverse it), tokenised with
``ByT5Tokenizer()`` (no files needed), and trained with :class:`~hf_moe_tuning.MoETrainer`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset
from transformers import ByT5Tokenizer, DataCollatorForSeq2Seq

from .models import build_tiny_model
from .trainer import MoETrainer, MoETrainingArguments


@dataclass
class DemoResult:
    plan_table: str
    first_loss: float
    final_loss: float
    steps: int


def reverse_task(n: int, seed: int = 0) -> Dataset:
    """``n`` examples of ``"reverse: word" -> "drow"`` with random lower-case words of length 3–8."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        rows.append({"source": f"reverse: {word}", "target": word[::-1]})
    return Dataset.from_list(rows)


def tokenize_seq2seq(ds: Dataset, tokenizer, max_length: int = 64) -> Dataset:
    """Tokenise ``source``/``target`` columns into ``input_ids``/``labels``."""

    def fn(batch):
        enc = tokenizer(batch["source"], truncation=True, max_length=max_length)
        enc["labels"] = tokenizer(text_target=batch["target"], truncation=True, max_length=max_length)["input_ids"]
        return enc

    return ds.map(fn, batched=True, remove_columns=ds.column_names)


def run_demo(
    strategy: str = "non_moe",
    model_name: str = "switch",
    max_steps: int = 60,
    output_dir: str = "runs/demo",
    seed: int = 0,
    **extra_args,
) -> DemoResult:
    """Train ``model_name`` for ``max_steps`` with ``strategy`` and return the table and losses."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive number of optimizer steps, got {max_steps!r}")
    tokenizer = ByT5Tokenizer()
    model = build_tiny_model(model_name, seed=seed)
    train = tokenize_seq2seq(reverse_task(512, seed=seed), tokenizer)
    args = MoETrainingArguments(
        output_dir=output_dir,
        moe_freeze_strategy=strategy,
        max_steps=max_steps,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        logging_steps=max(1, max_steps // 6),
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=True,
        disable_tqdm=False,
        **extra_args,
    )
    trainer = MoETrainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
    )
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    table = next(cb for cb in trainer.moe_callbacks() if hasattr(cb, "plan")).plan.format_table()
    return DemoResult(plan_table=table, first_loss=losses[0], final_loss=losses[-1], steps=trainer.state.global_step)
