"""Crash safety (issue 17): killed runs resume with no manual step, broken checkpoints get clear errors, and bad
inputs get clear messages (the NaN policy is in test_nan_policy.py).

* resume: ``train(resume_from_checkpoint=True)`` skips a half-written newest checkpoint (warning naming it) and
  ends with the uninterrupted run's weights; ``expert_load.jsonl`` holds each step once; the drift reference
  survives truncation, an empty file and a kill before it is written; the heatmap covers the whole run; a
  checkpoint without ``optimizer.pt``/``scheduler.pt`` is refused; corrupted files are named with the fallback;
* a subprocess SIGKILLed in the middle of a seeded write resumes to the uninterrupted run's weights, logs and
  ``expert_load.jsonl`` (``tests/scripts/crash_train.py``);
* clear errors for an empty dataset, out-of-vocabulary ids, a missing model path, another model family,
  ``demo --max-steps -5``, and no empty output folder left behind.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from helpers import random_lm_dataset
from transformers import TrainerState

from hf_moe_tuning import MoETrainer, MoETrainingArguments
from hf_moe_tuning.callbacks import expert_load
from hf_moe_tuning.callbacks.expert_load import JSONL_NAME, REFERENCE_NAME
from hf_moe_tuning.crash_safety import (
    CheckpointError,
    atomic_torch_save,
    atomic_write_text,
    inspect_checkpoint,
)
from hf_moe_tuning.models import build_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
#: log keys that measure wall time, not training
TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss")



def _args(out, **kwargs) -> MoETrainingArguments:
    base = {
        "output_dir": str(out), "max_steps": STEPS, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
        "logging_steps": 1, "save_steps": 1, "report_to": [], "use_cpu": True, "seed": 0, "disable_tqdm": True,
        "moe_aux_loss_coef": 0.01, "moe_drift_probe_size": 4, "moe_drift_every_steps": 1,
        "moe_expert_load_heatmap": False,
    }
    return MoETrainingArguments(**{**base, **kwargs})


def _run(out, resume=None, model: str = "mixtral", dataset: Dataset | None = None, **kwargs) -> MoETrainer:
    trainer = MoETrainer(model=build_tiny_model(model, seed=0), args=_args(out, **kwargs),
                         train_dataset=dataset if dataset is not None else random_lm_dataset())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _rows(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8").read().splitlines()]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted 3-step run saving every step (router aux loss, expert load, drift every step)."""
    out = tmp_path_factory.mktemp("full") / "run"
    trainer = _run(out)
    return out, trainer


@pytest.fixture
def copy_of(full, tmp_path):
    """A copy of the uninterrupted run's folder, to break and resume."""
    out = tmp_path / "run"
    shutil.copytree(full[0], out)
    return out


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ------------------------------------------------------------------------------------- 1. complete checkpoints
def test_resume_true_skips_a_half_written_newest_checkpoint(full, copy_of, caplog):
    newest = copy_of / f"checkpoint-{STEPS}"
    (newest / "trainer_state.json").unlink()  # killed while saving: the Trainer writes trainer_state.json last
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        resumed = _run(copy_of, resume=True)
    assert _same_weights(resumed.model, full[1].model)
    assert f"skipping {newest}" in _warnings(caplog) and "trainer_state.json: missing" in _warnings(caplog)
    assert inspect_checkpoint(str(newest)).complete  # replaced by the resumed run, not merged into
    assert [r["step"] for r in _jsonl(copy_of / JSONL_NAME)] == [1, 2, 3]


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "file.json"
    atomic_write_text(str(path), "old")

    class Interrupted(Exception):
        pass

    def interrupted(f):
        f.write("half of the n")
        raise Interrupted

    from hf_moe_tuning.crash_safety import _atomic_write

    with pytest.raises(Interrupted):
        _atomic_write(str(path), interrupted, mode="w")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.json"]  # no temporary file left
    atomic_torch_save({"x": torch.arange(3)}, str(tmp_path / "t.pt"))
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["x"], torch.arange(3))


# ------------------------------------------------------------------------------------- 2. jsonl once per step
def test_expert_load_jsonl_has_each_step_once_after_a_resume(full, copy_of):
    with open(copy_of / JSONL_NAME, "a", encoding="utf-8") as f:
        f.write('{"split": "train", "step": 4, "lay')  # a line cut by the kill
    _run(copy_of, resume=str(copy_of / "checkpoint-1"))
    records = _jsonl(copy_of / JSONL_NAME)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records == _jsonl(full[0] / JSONL_NAME)


# ------------------------------------------------------------------------------------- 3. drift reference
def _drift(trainer: MoETrainer) -> list[float]:
    return [row["moe/routing_drift"] for row in trainer.state.log_history if "moe/routing_drift" in row]


@pytest.mark.parametrize("damage", ["truncated", "no_layers"])
def test_a_damaged_drift_reference_warns_and_drift_is_still_logged(copy_of, caplog, damage):
    reference = copy_of / "checkpoint-1" / REFERENCE_NAME
    if damage == "truncated":
        reference.write_bytes(reference.read_bytes()[:100])
    else:
        payload = torch.load(reference, weights_only=True)
        torch.save({**payload, "layers": {}}, reference)
    with caplog.at_level(logging.WARNING):
        resumed = _run(copy_of, resume=str(copy_of / "checkpoint-1"))
    expected = "truncated or corrupt" if damage == "truncated" else "holds no MoE layer"
    assert expected in _warnings(caplog) and "without the drift reference" in _warnings(caplog)
    assert len(_drift(resumed)) == STEPS  # steps 2 and 3 measured against the resumed model


def test_the_drift_reference_is_written_before_the_trainer_state(full, tmp_path, monkeypatch):
    """A kill between the two can no longer leave a complete-looking checkpoint without the reference."""
    seen, save_to_json = [], TrainerState.save_to_json

    def save(self, path):
        seen.append(os.path.isfile(os.path.join(os.path.dirname(path), REFERENCE_NAME)))
        if self.global_step == 2:
            raise KeyboardInterrupt("killed while writing trainer_state.json of step 2")
        save_to_json(self, path)

    monkeypatch.setattr(TrainerState, "save_to_json", save)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(out)
    assert seen == [True, True]
    monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)
    resumed = _run(out, resume=True)  # skips checkpoint-2, resumes from checkpoint-1 and its reference
    assert _drift(resumed) == _drift(full[1])
    assert _same_weights(resumed.model, full[1].model)


# ------------------------------------------------------------------------------------- 4. heatmap of the whole run
def test_heatmap_after_a_resume_covers_the_whole_run(copy_of, tmp_path, monkeypatch):
    drawn = {}

    def fake_heatmap(loads, path, title="Expert load"):
        drawn[os.path.basename(os.path.dirname(path))] = ([(x.tokens, list(x.counts)) for x in loads], title)
        return path

    monkeypatch.setattr(expert_load, "save_load_heatmap", fake_heatmap)
    _run(tmp_path / "fresh", moe_expert_load_heatmap=True, save_strategy="no")
    _run(copy_of, resume=str(copy_of / "checkpoint-1"), moe_expert_load_heatmap=True)
    assert drawn["run"] == drawn["fresh"]
    assert drawn["run"][1] == f"Expert load (train, steps 1-{STEPS})"


# ------------------------------------------------------------------------------------- 5. optimizer / scheduler
@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
def test_a_checkpoint_without_optimizer_or_scheduler_is_refused(full, copy_of, caplog, name):
    newest = copy_of / f"checkpoint-{STEPS}"
    (newest / name).unlink()
    with pytest.raises(CheckpointError, match=rf"{name}: missing.*Resume from .*checkpoint-{STEPS - 1}"):
        _run(copy_of, resume=str(newest))
    with caplog.at_level(logging.WARNING):  # resume=True resumes from the newest checkpoint that has them
        resumed = _run(copy_of, resume=True)
    assert f"skipping {newest}" in _warnings(caplog)
    assert _same_weights(resumed.model, full[1].model)
    (newest / name).unlink()  # (the resumed run wrote checkpoint-3 again, whole)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # checkpoints without optimizer state by choice: resumes, warning
        _run(copy_of, resume=str(newest), save_only_model=True, moe_drift_probe_size=0)
    assert f"{name}: missing" in _warnings(caplog) and "save_only_model=True" in _warnings(caplog)


# ------------------------------------------------------------------------------------- 6. corrupted files
def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("trainer_state.json", _truncate, "trainer_state.json: not valid JSON"),
        ("trainer_state.json", lambda p: p.write_text("{}"), "trainer_state.json: lacks the fields"),
        ("model.safetensors", _truncate, "model.safetensors: truncated"),
        ("optimizer.pt", _truncate, "optimizer.pt: truncated"),
    ],
)
def test_a_corrupted_file_is_named_with_the_checkpoint_to_fall_back_to(copy_of, name, damage, message):
    newest = copy_of / f"checkpoint-{STEPS}"
    damage(newest / name)
    with pytest.raises(CheckpointError, match=rf"{message}.*Resume from .*checkpoint-{STEPS - 1}'"):
        _run(copy_of, resume=str(newest))


def test_an_unreadable_optimizer_with_an_intact_zip_directory_is_named(copy_of):
    import zipfile

    newest = copy_of / f"checkpoint-{STEPS}"
    with zipfile.ZipFile(newest / "optimizer.pt", "w") as zf:
        zf.writestr("archive/data.pkl", b"not a pickle")
    with pytest.raises(CheckpointError, match=rf"reading optimizer.pt failed.*checkpoint-{STEPS - 1}"):
        _run(copy_of, resume=str(newest))


# ------------------------------------------------------------------------------------- SIGKILL mid-write
SCRIPT = os.path.join(ROOT, "tests", "scripts", "crash_train.py")


def _child(out, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, SCRIPT, str(out), *extra], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    proc = _child(folder / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


#: seeds of the kill points: 0 cuts an expert_load.jsonl line (step 4), 3 cuts trainer_state.json of checkpoint-2
#: (8 writes a step: the JSONL line, the drift reference, weights, training args, optimizer, scheduler, RNG state,
#: trainer state); HF_MOE_CRASH_TRIALS=N runs seeds 0..N-1 instead (a longer soak)
TRIALS = list(range(int(os.environ["HF_MOE_CRASH_TRIALS"]))) if os.environ.get("HF_MOE_CRASH_TRIALS") else [0, 3]


@pytest.mark.slow
@pytest.mark.parametrize("seed", TRIALS)
def test_sigkill_mid_write_then_resume_equals_the_uninterrupted_run(uninterrupted, tmp_path, seed):
    events = json.loads((uninterrupted / "events.json").read_text())
    rng = random.Random(seed)
    kill_at = rng.randint(1, events)
    frac = rng.choice([0.0, 0.3, 0.7])
    killed = _child(tmp_path / "run", "--kill-at", str(kill_at), "--frac", str(frac))
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL
    resumed = _child(tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    final = torch.load(tmp_path / "final_weights.pt", weights_only=True)
    reference = torch.load(uninterrupted / "final_weights.pt", weights_only=True)
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    history = json.loads((tmp_path / "log_history.json").read_text())
    assert _rows(history) == _rows(json.loads((uninterrupted / "log_history.json").read_text()))
    records = _jsonl(tmp_path / "run" / JSONL_NAME)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records == _jsonl(uninterrupted / "run" / JSONL_NAME)


# ------------------------------------------------------------------------------------- 13. clear errors
def test_empty_dataset(tmp_path):
    out = tmp_path / "nested" / "run"
    with pytest.raises(ValueError, match="train_dataset is empty"):
        _run(out, dataset=Dataset.from_dict({"input_ids": [], "labels": []}))
    assert not (tmp_path / "nested").exists()


def test_token_ids_outside_the_vocabulary_and_no_empty_output_dir(tmp_path):
    rows = random_lm_dataset(8).to_list()
    for row in rows[2:]:  # every batch fails, the first one included
        row["input_ids"][3] = 5000
    out = tmp_path / "nested" / "run"
    with pytest.raises(ValueError, match=r"training example 2 has token id 5000 in 'input_ids'.*embedding size 384"):
        _run(out, dataset=Dataset.from_list(rows), moe_drift_probe_size=0, save_strategy="no")
    assert not (tmp_path / "nested").exists()  # the failed run leaves no empty output folder


def test_describe_a_missing_path(capsys):
    from hf_moe_tuning.cli import main

    assert main(["describe", "./nope/model"]) == 2
    assert "no such model folder: './nope/model'" in capsys.readouterr().err


def test_demo_with_negative_max_steps(tmp_path, capsys):
    from hf_moe_tuning.cli import main

    assert main(["demo", "--max-steps", "-5", "--output-dir", str(tmp_path / "demo")]) == 2
    assert "max_steps must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_resuming_into_another_model_family(full):
    with pytest.raises(CheckpointError, match="holds a 'mixtral' model but this trainer trains a 'qwen2_moe' model"):
        MoETrainer(model=build_tiny_model("qwen2_moe", seed=0), args=_args(full[0] / "other"),
                   train_dataset=random_lm_dataset()).train(resume_from_checkpoint=str(full[0] / "checkpoint-1"))
