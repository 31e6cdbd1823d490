"""One route each (issue 15, point 10): the MoE metrics reach the logs only through ``MoELoggingMixin.log``,
and fused-expert checkpoints are reloaded exactly only by ``FusedResumeCallback``."""

from __future__ import annotations

import logging

from helpers import random_lm_dataset
from transformers import Trainer, TrainingArguments

from hf_moe_tuning import ExpertLoadCallback, MoETrainer, MoETrainingArguments, enable_moe_logging
from hf_moe_tuning.callbacks.resume import FusedResumeCallback
from hf_moe_tuning.models import build_tiny_model
from hf_moe_tuning.trainer import MoELoggingMixin, build_moe_callbacks


def _args(out) -> dict:
    return dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to=[],
                use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)


def _plain(out) -> Trainer:
    model = build_tiny_model("mixtral", seed=0)
    callback = ExpertLoadCallback(probe_size=0, write_jsonl=False, write_heatmap=False)
    return Trainer(model=model, args=TrainingArguments(**_args(out)), train_dataset=random_lm_dataset(),
                   callbacks=[callback])


def test_the_trainers_and_enable_moe_logging_share_one_log_method(tmp_path):
    trainer = enable_moe_logging(_plain(tmp_path / "plain"))
    assert type(trainer).log is MoELoggingMixin.log is MoETrainer.log
    assert type(trainer).evaluate is MoELoggingMixin.evaluate is MoETrainer.evaluate
    assert isinstance(trainer, Trainer) and type(trainer).__name__ == "Trainer"
    assert enable_moe_logging(trainer) is trainer and type(trainer).__mro__.count(MoELoggingMixin) == 1
    trainer.train()
    assert all("moe/load_cv_mean" in row for row in trainer.state.log_history if "loss" in row)


def test_without_the_route_the_metrics_reach_no_log_and_the_callback_says_so(tmp_path, caplog):
    trainer = _plain(tmp_path / "plain")
    with caplog.at_level(logging.WARNING, logger="hf_moe_tuning"):
        trainer.train()
    assert not any(key.startswith("moe/") for row in trainer.state.log_history for key in row)  # no side route
    warnings = [r.getMessage() for r in caplog.records if "reach no log" in r.getMessage()]
    assert len(warnings) == 1 and "enable_moe_logging" in warnings[0]


def test_fused_resume_has_one_mechanism(tmp_path):
    model = build_tiny_model("mixtral", seed=0)
    args = MoETrainingArguments(**_args(tmp_path))
    assert sum(isinstance(cb, FusedResumeCallback) for cb in build_moe_callbacks(args, model)) == 1
    off = MoETrainingArguments(**_args(tmp_path), moe_fix_fused_resume=False)
    assert not any(isinstance(cb, FusedResumeCallback) for cb in build_moe_callbacks(off, model))
    switch = build_tiny_model("switch", seed=0)  # per-expert modules: nothing to convert, no callback
    assert not any(isinstance(cb, FusedResumeCallback) for cb in build_moe_callbacks(args, switch))
    mine = FusedResumeCallback()
    trainer = MoETrainer(model=model, args=args, train_dataset=random_lm_dataset(), callbacks=[mine])
    assert [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FusedResumeCallback)] == [mine]
    assert not any(name.startswith("_load_") for cls in type(trainer).__mro__[:3] for name in vars(cls))
