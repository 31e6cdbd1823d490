"""Stop at step k, resume from the checkpoint: final weights and every logged metric equal the uninterrupted run.

Covers the fused-expert trap of transformers 5 (a plain ``Trainer`` resumes Mixtral/Qwen2-MoE with the
fresh model's router and expert weights), its one fix (``FusedResumeCallback``: passed to a plain ``Trainer``,
added by ``MoETrainer`` itself), and a full MoE run – router aux + z losses with scheduled
coefficients, expert-load logging, each freezing strategy, expert subsets inside fused tensors and ESFT
selection – on a Qwen2-MoE with a dense first layer (fused experts, a shared expert and a dense FFN, so
every strategy applies). Routing drift is off here; its reference across a resume is tested in
test_expert_load.py (test_drift_after_resume_is_against_the_runs_start).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_lm_dataset
from transformers import Trainer, TrainingArguments

from hf_moe_tuning import MoETrainer, MoETrainingArguments
from hf_moe_tuning.callbacks.expert_load import ExpertLoadCallback
from hf_moe_tuning.callbacks.nan_guard import NaNGuardCallback
from hf_moe_tuning.callbacks.resume import FusedResumeCallback
from hf_moe_tuning.callbacks.router_loss import RouterLossCallback
from hf_moe_tuning.checkpoint import CheckpointLoadError, load_checkpoint_exact
from hf_moe_tuning.models import build_tiny_model
from hf_moe_tuning.trainer import build_moe_callbacks

MAX_STEPS, STOP_AT = 2, 1
#: log keys that measure wall time, not training
TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss")




def _common(out) -> dict:
    return dict(
        output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_steps=STOP_AT, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )


def _checkpoint(out) -> str:
    """The step-``STOP_AT`` checkpoint of a run in ``out`` (what an interrupted run leaves behind)."""
    return str(out / f"checkpoint-{STOP_AT}")


def _plain_run(out, name: str, *, resume: str | None = None, fix: bool = True) -> Trainer:
    """Train ``MAX_STEPS`` steps in ``out`` (saving at ``STOP_AT``), or resume from checkpoint ``resume``."""
    model = build_tiny_model(name, seed=0)
    callbacks = [FusedResumeCallback()] if fix else []
    trainer = Trainer(model=model, args=TrainingArguments(**_common(out)), train_dataset=random_lm_dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def _rows(trainer: Trainer) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in trainer.state.log_history]


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------- plain Trainer
def test_plain_trainer_loses_fused_expert_updates_and_the_callback_restores_them(tmp_path):
    full = _plain_run(tmp_path, "mixtral")
    full_rows = _rows(full)
    broken = _plain_run(tmp_path, "mixtral", resume=_checkpoint(tmp_path), fix=False)
    assert _max_diff(full.model, broken.model) > 1e-3  # the transformers trap this module guards against
    resumed = _plain_run(tmp_path, "mixtral", resume=_checkpoint(tmp_path))
    assert _max_diff(full.model, resumed.model) == 0.0
    assert _rows(resumed) == full_rows
    callback = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, FusedResumeCallback)][0]
    assert callback.restored_from == _checkpoint(tmp_path)


def test_fused_resume_callback_with_a_checkpoint_outside_output_dir(tmp_path):
    full = _plain_run(tmp_path / "first", "qwen2_moe")
    checkpoint = _checkpoint(tmp_path / "first")

    def resume(callback):
        model = build_tiny_model("qwen2_moe", seed=0)
        args = TrainingArguments(**_common(tmp_path / "elsewhere"))
        trainer = Trainer(model=model, args=args, train_dataset=random_lm_dataset(), callbacks=[callback])
        trainer.train(resume_from_checkpoint=checkpoint)
        return trainer

    with pytest.raises(FileNotFoundError, match="checkpoint_dir"):  # never trains on with stale experts
        resume(FusedResumeCallback())
    assert _max_diff(full.model, resume(FusedResumeCallback(checkpoint_dir=checkpoint)).model) == 0.0


def test_load_checkpoint_exact_refuses_a_foreign_checkpoint(tmp_path):
    build_tiny_model("qwen2_moe").save_pretrained(tmp_path / "qwen")
    model = build_tiny_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointLoadError, match="not in the checkpoint"):
        load_checkpoint_exact(model, str(tmp_path / "qwen"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


# ------------------------------------------------------------------------------------------- MoETrainer
def _moe_run(out, name: str, resume: str | None = None, model_kwargs: dict | None = None, **moe) -> Trainer:
    model = build_tiny_model(name, seed=0, **(model_kwargs or {}))
    args = MoETrainingArguments(
        **_common(out),
        moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001,
        moe_aux_loss_schedule="linear_warmup", moe_z_loss_schedule="cosine", moe_router_loss_warmup_steps=3,
        moe_nan_policy="skip", moe_drift_probe_size=0, moe_expert_load_heatmap=False, **moe,
    )
    dataset = random_lm_dataset()
    wanted = [RouterLossCallback.from_args(args), ExpertLoadCallback.from_args(args), NaNGuardCallback.from_args(args)]
    present = {type(cb) for cb in build_moe_callbacks(args, model, train_dataset=dataset)}
    extra = [cb for cb in wanted if cb is not None and type(cb) not in present]
    trainer = MoETrainer(model=model, args=args, train_dataset=dataset, callbacks=extra)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


#: Qwen2-MoE with a dense first layer: fused routed experts, a shared expert and a dense FFN, so every strategy applies
FAMILY = ("qwen2_moe", {"mlp_only_layers": [0]})
CASES = {
    "all": dict(moe_freeze_strategy="all"),
    "non_moe": dict(moe_freeze_strategy="non_moe"),
    "moe": dict(moe_freeze_strategy="moe"),
    "attention": dict(moe_freeze_strategy="attention"),
    "ffn": dict(moe_freeze_strategy="ffn"),
    "expert_subset": dict(moe_freeze_strategy="moe", moe_experts="0,2"),
    "esft": dict(moe_freeze_strategy="moe", moe_train_router=False, moe_experts="esft-gate:0.5", moe_esft_num_samples=8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_moe_trainer_resumes_exactly(tmp_path, case):
    moe = CASES[case]
    name, model_kwargs = FAMILY
    full = _moe_run(tmp_path / "full", name, model_kwargs=model_kwargs, **moe)
    rows_full = _rows(full)
    checkpoint = _checkpoint(tmp_path / "full")
    resumed = _moe_run(tmp_path / "cut", name, resume=checkpoint, model_kwargs=model_kwargs, **moe)

    assert _max_diff(full.model, resumed.model) == 0.0
    rows_resumed = _rows(resumed)
    assert rows_resumed == rows_full
    logged = set().union(*rows_full)
    assert {"router/aux_loss", "router/z_loss", "router/aux_coef", "router/z_coef", "lm_loss", "moe/load_cv_mean",
            "freeze/trainable_params"} <= logged
    coefs = [row["router/aux_coef"] for row in rows_full if "router/aux_coef" in row]
    assert len(set(coefs)) > 1  # the schedule moves across the interruption
    # expert-load counts of the resumed steps equal the uninterrupted run's
    resumed_records = _jsonl(tmp_path / "cut" / "expert_load.jsonl")
    assert [r["step"] for r in resumed_records] == list(range(STOP_AT + 1, MAX_STEPS + 1))
    assert resumed_records == _jsonl(tmp_path / "full" / "expert_load.jsonl")[STOP_AT:]
    freeze_full = [cb for cb in full.moe_callbacks() if hasattr(cb, "plan")][0].plan.to_dict()
    freeze_resumed = [cb for cb in resumed.moe_callbacks() if hasattr(cb, "plan")][0].plan.to_dict()
    assert freeze_resumed == freeze_full
    if case == "all":  # moe_fix_fused_resume=False gives the Trainer's lossy resume back
        broken = _moe_run(tmp_path / "off", name, resume=checkpoint, model_kwargs=model_kwargs,
                          moe_fix_fused_resume=False, **moe)
        assert _max_diff(full.model, broken.model) > 1e-3


def test_load_best_model_at_end_is_exact(tmp_path):
    model = build_tiny_model("mixtral", seed=0)
    args = MoETrainingArguments(
        **_common(tmp_path), eval_strategy="steps", eval_steps=STOP_AT,
        load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,  # best: the first
        moe_drift_probe_size=0, moe_expert_load_heatmap=False,
    )
    trainer = MoETrainer(model=model, args=args, train_dataset=random_lm_dataset(), eval_dataset=random_lm_dataset(8))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best == _checkpoint(tmp_path)
    reference = build_tiny_model("mixtral", seed=1)
    load_checkpoint_exact(reference, best)
    assert _max_diff(trainer.model, reference) == 0.0
