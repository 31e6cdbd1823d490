"""Model cards and the Hub boundary (offline: HfApi calls are intercepted)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hub_constants
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from transformers import (
    AutoModelForSeq2SeqLM,
    ByT5Tokenizer,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)
from transformers.trainer import TRAINING_ARGS_NAME

from hf_moe_tuning import MoETrainer, MoETrainingArguments, RouterLossCallback
from hf_moe_tuning.cli import main
from hf_moe_tuning.demo import reverse_task, tokenize_seq2seq
from hf_moe_tuning.hub.card import TEMPLATE_PATH, CardValidationError, build_model_card, validate_card, write_model_card
from hf_moe_tuning.hub.mixin import MoECardMixin
from hf_moe_tuning.hub.push import files_to_upload, push_run, upload_plan
from hf_moe_tuning.hub.run_record import MOE_RUN_NAME, copy_moe_run_to_checkpoint, read_moe_run, record_moe_run
from hf_moe_tuning.hub.summary import NoFinishedRunError, load_run, read_run_info, write_run_info
from hf_moe_tuning.models import build_tiny_model

# What MoETrainer becomes once the mixin is in its bases (a subclass until then).
CardTrainer = MoETrainer if issubclass(MoETrainer, MoECardMixin) else type("CardTrainer", (MoECardMixin, MoETrainer), {})


def _add_missing_callbacks(trainer, args):
    """Router-loss and expert-load callbacks, unless MoETrainer already built them from ``args``."""
    from hf_moe_tuning.callbacks.expert_load import ExpertLoadCallback
    from hf_moe_tuning.callbacks.router_loss import RouterLossCallback

    present = {type(cb) for cb in trainer.callback_handler.callbacks}
    for cls in (RouterLossCallback, ExpertLoadCallback):
        if cls not in present:
            callback = cls.from_args(args)
            if callback is not None:
                trainer.add_callback(callback)


@pytest.fixture(scope="module")
def switch_run(tmp_path_factory):
    """A finished tiny Switch run: non_moe freezing, router losses, expert load, one evaluation."""
    out = str(tmp_path_factory.mktemp("runs") / "tiny-switch")
    tokenizer = ByT5Tokenizer()
    model = build_tiny_model("switch")
    args = MoETrainingArguments(
        out,
        moe_freeze_strategy="non_moe",
        moe_drift_probe_size=0,
        max_steps=4,
        per_device_train_batch_size=8,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=1e-3,
    )
    trainer = CardTrainer(
        model=model,
        args=args,
        train_dataset=tokenize_seq2seq(reverse_task(32), tokenizer),
        eval_dataset=tokenize_seq2seq(reverse_task(8, seed=1), tokenizer),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        # passed as a callback (not as MoETrainingArguments fields) so the card must find it in the run's record
        callbacks=[RouterLossCallback(aux_coef=0.01, z_coef=0.001, z_schedule="linear_warmup", warmup_steps=2)],
    )
    _add_missing_callbacks(trainer, args)
    write_run_info(out, base_model="tiny:switch", task="reverse", recipe="recipes/demo.yaml", arm="non_moe", seed=42)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    return out, trainer


def _records(out):
    with open(os.path.join(out, "expert_load.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_card_content_of_tiny_switch_run(switch_run):
    out, trainer = switch_run
    card = ModelCard.load(os.path.join(out, "README.md"))
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers"
    assert {"moe", "mixture-of-experts", "freeze-non-moe", "switch_transformers"} <= set(meta["tags"])
    assert "base_model" not in meta  # a tiny random-init base is not a Hub model
    # metrics: the final evaluation as model-index
    eval_loss = [row["eval_loss"] for row in trainer.state.log_history if "eval_loss" in row][-1]
    _, results = model_index_to_eval_results(meta["model-index"])
    assert [(r.metric_type, r.task_type, r.dataset_name) for r in results] == [("loss", "text2text-generation", "reverse")]
    assert results[0].metric_value == pytest.approx(eval_loss, abs=1e-6)
    text = card.text
    # strategy and trainable share per group, as the freezing callback planned it
    plan = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "MoEFreezingCallback").report.plan
    assert "Strategy **`non_moe`**" in text and "Routers train: **no**" in text
    for group, (trainable, total) in plan.group_table().items():
        if total:
            assert f"| `{group}` | {trainable:,} | {total:,} | {100 * trainable / total:.1f}% |" in text
    assert f"| **total** | {plan.trainable_params:,} | {plan.total_params:,} |" in text
    # router-loss coefficients and schedules
    assert "| load balancing (aux) | 0.01 | constant |" in text
    assert "| router z-loss | 0.001 | linear_warmup (warmup 2 steps) |" in text
    # expert-load table: tokens and busiest expert per layer, recomputed from the JSONL
    train = [r for r in _records(out) if r["split"] == "train"]
    assert train, "ExpertLoadCallback wrote no training record"
    for layer in range(len(train[0]["layers"])):
        counts = [sum(r["layers"][layer]["counts"][e] for r in train) for e in range(8)]
        tokens = sum(r["layers"][layer]["tokens"] for r in train)
        busiest = max(range(8), key=counts.__getitem__)
        path = train[0]["layers"][layer]["path"]
        row = f"| {layer} | `{path}` | 8 (top-1) | {tokens:,} |"
        assert row in text
        line = next(line for line in text.splitlines() if line.startswith(row))
        assert f"| {busiest} ({100 * counts[busiest] / sum(counts):.0f}%) |" in line
    # heatmap embedded and present next to the card
    assert "](expert_load_train.png)" in text and os.path.isfile(os.path.join(out, "expert_load_train.png"))
    assert "| recipe | `recipes/demo.yaml` |" in text and "| arm | non_moe |" in text
    assert f"| `loss` | {eval_loss:.4g} |" in text


def test_card_from_disk_equals_trainer_card(switch_run, tmp_path):
    out, _ = switch_run
    copy = str(tmp_path / "tiny-switch")
    shutil.copytree(out, copy)
    live = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert main(["card", copy]) == 0
    assert open(os.path.join(copy, "README.md"), encoding="utf-8").read() == live


def test_card_passes_local_hub_validation(switch_run):
    out, _ = switch_run
    card = build_model_card(load_run(out), base_model="google/switch-base-8", datasets=["org/reverse"], license="apache-2.0")
    meta = validate_card(card)
    assert meta["base_model"] == "google/switch-base-8" and meta["datasets"] == ["org/reverse"]
    assert metadata_load(os.path.join(out, "README.md")) == ModelCard.load(os.path.join(out, "README.md")).data.to_dict()
    name, results = model_index_to_eval_results(meta["model-index"])
    assert eval_results_to_model_index(name, results) == meta["model-index"]
    assert results[0].dataset_type == "org/reverse"
    bad = ModelCard(card.content.replace("base_model: google/switch-base-8", "base_model: not a repo"))
    with pytest.raises(CardValidationError, match="base_model"):
        validate_card(bad)


def sent_by_upload_folder(folder_path, allow_patterns=None, ignore_patterns=None, path_in_repo=None, **_):
    """What ``HfApi.upload_folder`` would send for these arguments: huggingface_hub's own file selection
    (``_prepare_upload_folder_additions``, with its default ignore patterns), minus the network YAML check."""
    api = HfApi()
    api._validate_yaml = lambda *a, **k: None
    ignore = ([ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])) + DEFAULT_IGNORE_PATTERNS
    ops = api._prepare_upload_folder_additions(folder_path, path_in_repo or "", allow_patterns=allow_patterns, ignore_patterns=ignore)
    return {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in ops}


@pytest.fixture
def hub(monkeypatch):
    """Intercept every HfApi call a push makes; record them (online mode, with a token, but no network)."""
    calls = []

    def record(name):
        def fn(self, *args, **kwargs):
            if name == "upload_folder":  # read what would be sent while the files still exist
                kwargs["sent"] = sent_by_upload_folder(**kwargs)
            calls.append((name, args, kwargs))
            info = type("Info", (), {"commit_url": "https://hf.co/me/x/commit/1", "repo_id": args[0] if args else None})()
            if kwargs.get("run_as_future"):  # the Trainer's checkpoint pushes: a finished Future
                future = Future()
                future.set_result(info)
                return future
            return info

        return fn

    for name in ("create_repo", "create_branch", "create_commit", "upload_folder", "upload_file"):
        monkeypatch.setattr(HfApi, name, record(name))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    return calls


def test_push_sends_model_card_and_heatmap(switch_run, tmp_path, hub):
    out, _ = switch_run
    run = str(tmp_path / "tiny-switch")
    shutil.copytree(out, run)
    os.makedirs(os.path.join(run, "checkpoint-2"))
    for junk in ("checkpoint-2/model.safetensors", "optimizer.pt", "rng_state.pth", "_scratch.txt"):
        open(os.path.join(run, junk), "wb").close()
    assert main(["push", run, "me/tiny-switch", "--private", "--revision", "exp1"]) == 0
    names = [c[0] for c in hub]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert hub[0][1] == ("me/tiny-switch",) and hub[0][2]["private"] is True
    assert hub[1][2]["branch"] == "exp1"
    commit = hub[2][2]
    assert commit["revision"] == "exp1" and commit["repo_id"] == "me/tiny-switch"
    sent = commit["sent"]
    assert {"README.md", "config.json", "model.safetensors", "expert_load_train.png", "expert_load.jsonl",
            "run_info.json", MOE_RUN_NAME, "trainer_state.json"} <= set(sent)
    assert not {"optimizer.pt", "rng_state.pth", "_scratch.txt", TRAINING_ARGS_NAME} & set(sent)
    assert not any(p.startswith("checkpoint-") for p in sent)
    card = sent["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["model-index"][0]["name"] == "tiny-switch" and "freeze-non-moe" in meta["tags"]
    assert "| router z-loss | 0.001 | linear_warmup (warmup 2 steps) |" in card
    assert sent["expert_load_train.png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_trainer_push_to_hub_includes_card_and_heatmap(switch_run, hub):
    _, trainer = switch_run
    trainer.args.hub_model_id = "me/tiny-switch"
    trainer.hub_model_id = None
    trainer.push_to_hub()
    upload = next(c for c in hub if c[0] == "upload_folder")[2]
    files = files_to_upload(upload["folder_path"])
    assert upload["repo_id"] == "me/tiny-switch"
    assert {"README.md", "expert_load_train.png", "model.safetensors"} <= set(files)
    card = open(os.path.join(upload["folder_path"], "README.md"), encoding="utf-8").read()
    assert "## MoE fine-tuning" in card and "](expert_load_train.png)" in card


def test_bad_push_inputs_fail_before_any_hub_call(switch_run, tmp_path, hub, capsys):
    out, trainer = switch_run
    with pytest.raises(ValueError, match="invalid repo id"):
        push_run(out, "not a/valid/id")
    empty = tmp_path / "empty"
    (empty / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(NoFinishedRunError, match="checkpoint-3"):
        push_run(str(empty), "me/x")
    assert main(["push", str(tmp_path / "missing"), "me/x"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["push", out, "me/x--y"]) == 2
    assert "invalid repo id" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds a full model"):
        push_run(out, "me/x", merge_adapter=True)
    trainer.args.hub_model_id, trainer.hub_model_id = "bad repo", None
    with pytest.raises(ValueError, match="invalid repo id"):
        trainer.push_to_hub()
    assert hub == []


def test_card_builds_no_model_and_renders_the_shipped_template(switch_run, tmp_path, monkeypatch):
    out, _ = switch_run
    run = str(tmp_path / "tiny-switch")
    shutil.copytree(out, run)
    live = Path(run, "README.md").read_text(encoding="utf-8")

    def no_model(self, *args, **kwargs):
        raise AssertionError("a model was built to write a card")

    monkeypatch.setattr(PreTrainedModel, "__init__", no_model)
    assert main(["card", run]) == 0
    text = Path(run, "README.md").read_text(encoding="utf-8")
    assert text == live  # same card as the trainer wrote, MoE layout from moe_run.json
    assert "`switch_transformers` with 4 MoE layers (8 experts, top-1 routing)" in text
    template = Path(TEMPLATE_PATH).read_text(encoding="utf-8")
    assert "{{ moe_section }}" in template and "## Framework versions" in text


def test_hub_package_exports_what_the_cli_and_trainers_use():
    import hf_moe_tuning
    from hf_moe_tuning import hub

    for name in ("MoECardMixin", "build_model_card", "push_run", "write_run_info", "check_repo_id", "load_run", "register"):
        assert callable(getattr(hub, name)), name
    assert hf_moe_tuning.push_run is hub.push_run and hf_moe_tuning.write_model_card is hub.write_model_card


def test_card_without_optional_files(tmp_path):
    model = build_tiny_model("switch")
    model.save_pretrained(tmp_path)
    path = write_model_card(str(tmp_path))
    text = open(path, encoding="utf-8").read()
    assert "No freezing plan was recorded" in text and "No expert-load log" in text
    assert "model-index" not in text
    validate_card(ModelCard.load(path))


# ---------------------------------------------------------------------------------------------- security


class _TouchOnUnpickle:
    """A crafted pickle payload: unpickling it opens (creates) ``path``, as a hostile training_args.bin could."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_card_and_dry_run_never_unpickle_training_args(switch_run, tmp_path, capsys):
    out, _ = switch_run
    checkpoint = str(tmp_path / "checkpoint-4")
    shutil.copytree(os.path.join(out, "checkpoint-4"), checkpoint)
    assert os.path.isfile(os.path.join(checkpoint, MOE_RUN_NAME))  # copied there by the callbacks' on_save
    marker = tmp_path / "pwned"
    torch.save(_TouchOnUnpickle(marker), os.path.join(checkpoint, TRAINING_ARGS_NAME))

    assert main(["card", checkpoint]) == 0
    assert main(["push", checkpoint, "me/tiny-switch", "--dry-run"]) == 0
    listed = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert not marker.exists()
    assert TRAINING_ARGS_NAME not in listed and "README.md" in listed
    # the card still says what trained, from the checkpoint's JSON
    text = Path(checkpoint, "README.md").read_text(encoding="utf-8")
    assert "| load balancing (aux) | 0.01 | constant |" in text
    assert "| router z-loss | 0.001 | linear_warmup (warmup 2 steps) |" in text
    assert "| `learning_rate` | 0.001 |" in text and "Strategy **`non_moe`**" in text
    # the payload is live: loading it the way the old code did creates the marker
    torch.load(os.path.join(checkpoint, TRAINING_ARGS_NAME), weights_only=False)
    assert marker.exists()


def _hostile_run(out, tmp_path):
    """A copy of ``out`` with files a push must never send."""
    run = tmp_path / "run"
    shutil.copytree(out, run)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "id_rsa").write_text("PRIVATE KEY")
    (outside / "dir").mkdir()
    (run / ".env").write_text("HF_TOKEN=hf_secret")
    (run / ".git-credentials").write_text("https://user:hf_secret@huggingface.co")
    for nested in ("last-checkpoint/optimizer.pt", "nested/scheduler.pt", "nested/config.json"):
        (run / nested).parent.mkdir(exist_ok=True)
        (run / nested).write_bytes(b"state")
    (run / "rng_state.pth").write_bytes(b"rng")
    (run / "pytorch_model.bin").write_bytes(b"pickle")
    # symlinks whose names are on the allow-list but whose targets are outside the run folder
    os.symlink(outside / "id_rsa", run / "model-00002-of-00002.safetensors")
    os.symlink(outside / "id_rsa", run / "leak.png")
    os.symlink(outside / "dir", run / "linked_dir")
    os.symlink(run / "expert_load_train.png", run / "alias.png")  # inside the folder: fine
    (outside / "bashrc").write_text("keep me")
    os.remove(run / "README.md")
    os.symlink(outside / "bashrc", run / "README.md")  # the card must replace the link, not write through it
    return run


BAD_FILES = {
    ".env", ".git-credentials", "last-checkpoint/optimizer.pt", "nested/scheduler.pt", "nested/config.json",
    "rng_state.pth", "pytorch_model.bin", TRAINING_ARGS_NAME, "model-00002-of-00002.safetensors", "leak.png",
    "linked_dir", "checkpoint-4/optimizer.pt", "checkpoint-4/model.safetensors",
}


def test_push_uploads_the_allow_list_only(switch_run, tmp_path, hub, capsys):
    out, _ = switch_run
    run = _hostile_run(out, tmp_path)
    assert main(["push", str(run), "me/tiny-switch", "--dry-run"]) == 0
    listed = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert hub == [] and os.path.islink(run / "README.md")  # no network, nothing written
    expected = {"README.md", "config.json", "generation_config.json", "model.safetensors", "expert_load.jsonl",
                "alias.png", MOE_RUN_NAME, "run_info.json", "trainer_state.json"}
    expected |= {n for n in os.listdir(run) if n.startswith(("tokenizer", "added_tokens", "special_tokens", "expert_load_"))}
    assert set(listed) == expected & (set(os.listdir(run)) | {"README.md"})
    assert {"README.md", "config.json", "model.safetensors", MOE_RUN_NAME} <= set(listed)
    assert not BAD_FILES & set(listed)
    skipped = upload_plan(str(run)).skipped
    assert skipped["model-00002-of-00002.safetensors"] == "symlink out of the folder"
    assert skipped["nested/"] == "folder" and skipped[".env"] == "not on the allow-list"
    assert skipped["README.md"] == "symlink out of the folder"  # until the push writes the card over the link

    # what a real push hands to upload_folder selects exactly the dry-run list (huggingface_hub's own matching)
    assert main(["push", str(run), "me/tiny-switch"]) == 0
    upload = next(c for c in hub if c[0] == "upload_folder")[2]
    sent = upload["sent"]
    assert sorted(sent) == sorted(listed)
    assert not any(b"PRIVATE KEY" in data or b"hf_secret" in data for data in sent.values())
    assert b"## MoE fine-tuning" in sent["README.md"] and not os.path.islink(run / "README.md")
    assert (tmp_path / "outside" / "bashrc").read_text() == "keep me"
    assert [c[0] for c in hub] == ["create_repo", "upload_folder"]


#: never sent by a push from the trainer, whatever the hub_strategy (basenames, at any depth)
NEVER_SENT = {".env", ".git-credentials", "leak.png", "merges.txt", TRAINING_ARGS_NAME, "optimizer.pt", "scheduler.pt",
              "rng_state.pth", "expert_load_drift_reference.pt"}


@pytest.mark.parametrize("hub_strategy", ["every_save", "checkpoint"])
def test_trainer_pushes_send_the_allow_list_only(tmp_path, hub, hub_strategy):
    """MoETrainer.push_to_hub and the per-save pushes of push_to_hub=True (transformers' own path sends the whole
    folder: training_args.bin with the hub_token, hidden files, outside symlinks, optimizer/RNG state)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("PRIVATE KEY")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".env").write_text("HF_TOKEN=hf_secret")
    (out / ".git-credentials").write_text("https://user:hf_secret@huggingface.co")
    (out / "optimizer.pt").write_bytes(b"optimizer state")
    os.symlink(outside / "secret.txt", out / "leak.png")  # names on the allow-list, contents from outside
    os.symlink(outside / "secret.txt", out / "merges.txt")
    tokenizer = ByT5Tokenizer()
    model = build_tiny_model("switch")
    args = MoETrainingArguments(
        str(out), push_to_hub=True, hub_model_id="me/tiny-push", hub_strategy=hub_strategy, hub_token="hf_args_token",
        max_steps=2, save_strategy="steps", save_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        disable_tqdm=True, moe_drift_probe_size=2,
    )
    trainer = MoETrainer(
        model=model, args=args, train_dataset=tokenize_seq2seq(reverse_task(8), tokenizer),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
    )
    trainer.train()
    checkpoint_uploads = [c[2] for c in hub if c[0] == "upload_folder"]
    trainer.push_to_hub()
    uploads = [c[2] for c in hub if c[0] == "upload_folder"]
    final = uploads[-1]
    per_save = 2 if hub_strategy == "checkpoint" else 1  # output_dir, and the checkpoint folder
    assert len(checkpoint_uploads) == 2 * per_save and len(uploads) == 2 * per_save + 1
    assert all(u["repo_id"] == "me/tiny-push" for u in uploads)

    # what must not go is there to be sent
    assert (out / TRAINING_ARGS_NAME).is_file() and (out / "checkpoint-2" / "optimizer.pt").is_file()
    assert (out / "checkpoint-2" / "rng_state.pth").is_file()
    for upload in uploads:
        sent = upload["sent"]
        assert sent, upload["folder_path"]
        assert not {Path(p).name for p in sent} & NEVER_SENT, sorted(sent)
        assert not any(b"PRIVATE KEY" in data or b"hf_secret" in data or b"hf_args_token" in data for data in sent.values())
        assert not any(p.startswith("checkpoint-") for p in sent)  # output_dir pushes: top-level files only
    assert {"config.json", "model.safetensors", MOE_RUN_NAME} <= set(checkpoint_uploads[0]["sent"])
    assert {"README.md", "config.json", "model.safetensors", MOE_RUN_NAME, "trainer_state.json",
            "expert_load.jsonl"} <= set(final["sent"])
    assert b"## MoE fine-tuning" in final["sent"]["README.md"]  # the card is still written and sent
    if hub_strategy == "checkpoint":
        pushed = [u for u in checkpoint_uploads if u.get("path_in_repo") == "last-checkpoint"]
        assert len(pushed) == 2
        assert {"last-checkpoint/model.safetensors", "last-checkpoint/trainer_state.json",
                f"last-checkpoint/{MOE_RUN_NAME}"} <= set(pushed[-1]["sent"])
    assert (outside / "secret.txt").read_text() == "PRIVATE KEY"

    # ExpertLoadCallback and NaNGuardCallback record their settings like the other MoE callbacks
    live = {type(cb).__name__: cb for cb in trainer.callback_handler.callbacks}
    for folder in (out, out / "checkpoint-1"):
        callbacks = read_moe_run(str(folder))["callbacks"]
        assert callbacks["ExpertLoadCallback"] == live["ExpertLoadCallback"].moe_run_settings()
        assert callbacks["ExpertLoadCallback"]["probe_size"] == 2 and callbacks["ExpertLoadCallback"]["write_jsonl"] is True
        assert callbacks["NaNGuardCallback"] == live["NaNGuardCallback"].moe_run_settings()
        assert callbacks["NaNGuardCallback"]["policy"] == "error"
    card = final["sent"]["README.md"].decode()
    assert "`ExpertLoadCallback`" not in card and "`NaNGuardCallback`" not in card  # not routing controls


def test_run_json_symlinks_are_replaced_not_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.json"
    secret.write_text('{"api_key": "hf_secret"}')
    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)

    os.symlink(secret, run / "run_info.json")
    assert read_run_info(str(run)) == {}  # not read: its keys would be listed in the card
    write_run_info(str(run), task="reverse")
    assert not os.path.islink(run / "run_info.json") and read_run_info(str(run)) == {"task": "reverse"}

    os.symlink(secret, run / MOE_RUN_NAME)
    assert read_moe_run(str(run)) is None
    args = SimpleNamespace(output_dir=str(run), learning_rate=1e-3)
    state = SimpleNamespace(is_world_process_zero=True, global_step=3)
    record_moe_run(args, state, RouterLossCallback(aux_coef=0.01))
    assert not os.path.islink(run / MOE_RUN_NAME) and "api_key" not in (run / MOE_RUN_NAME).read_text()

    os.symlink(secret, run / "checkpoint-3" / MOE_RUN_NAME)
    copy_moe_run_to_checkpoint(args, state)
    assert not os.path.islink(run / "checkpoint-3" / MOE_RUN_NAME)
    assert read_moe_run(str(run / "checkpoint-3"))["callbacks"]["RouterLossCallback"]["aux_coef"] == 0.01
    assert secret.read_text() == '{"api_key": "hf_secret"}'
    assert sorted(os.listdir(run / "checkpoint-3")) == [MOE_RUN_NAME]  # no temporary file left


def _no_network(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("a Hub call was made")

    for name in ("create_repo", "create_branch", "create_commit", "upload_folder", "whoami"):
        monkeypatch.setattr(HfApi, name, refuse)


def test_push_without_token_fails_in_one_line_before_any_hub_call(switch_run, tmp_path, monkeypatch, capsys):
    out, _ = switch_run
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"), raising=False)
    _no_network(monkeypatch)
    assert main(["push", out, "me/tiny-switch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Hugging Face token" in err and "Traceback" not in err
    # offline mode says so, also before any Hub call
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert main(["push", out, "me/tiny-switch", "--token", "hf_x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE" in err


def test_push_without_network_fails_in_one_line(switch_run, tmp_path, monkeypatch, capsys):
    out, _ = switch_run
    run = str(tmp_path / "run")
    shutil.copytree(out, run)
    with socket.socket() as s:  # a local port nothing listens on: the connection is refused, no real network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    assert main(["push", run, "me/tiny-switch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: push to me/tiny-switch at http://127.0.0.1") and "ConnectError" in err


# ---------------------------------------------------------------------------------------------- what trained


def test_plain_trainer_card_records_router_loss_and_local_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = "models/base"  # relative: it reads like a Hub id once the card is written from another folder
    build_tiny_model("switch").save_pretrained(base)
    model = AutoModelForSeq2SeqLM.from_pretrained(base)
    tokenizer = ByT5Tokenizer()
    out = tmp_path / "plain-run"
    args = TrainingArguments(
        str(out), max_steps=2, per_device_train_batch_size=4, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, learning_rate=5e-4,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=tokenize_seq2seq(reverse_task(8), tokenizer),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        callbacks=[RouterLossCallback(aux_coef=0.01, z_coef=0.001)],
    )
    trainer.train()
    trainer.save_model()
    record = read_moe_run(str(out))
    assert record["base_model"] == base and record["base_model_local"] is True
    assert record["training_args"]["learning_rate"] == 5e-4
    assert record["callbacks"]["RouterLossCallback"]["aux_coef"] == 0.01
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["card", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    assert "| load balancing (aux) | 0.01 | constant |" in card.text
    assert "| router z-loss | 0.001 | constant |" in card.text
    assert f"fine-tuned version of `{base}` (a local folder)" in card.text and "random init" not in card.text
    assert "base_model" not in card.data.to_dict()  # a local folder is no Hub model
    assert "| `learning_rate` | 0.0005 |" in card.text


def test_run_record_starts_fresh_per_train_call(tmp_path):
    class Setting:
        def __init__(self, **settings):
            self.settings = settings

        def moe_run_settings(self):
            return self.settings

    class Other(Setting):
        pass

    args = SimpleNamespace(output_dir=str(tmp_path), learning_rate=1e-3, hub_token="hf_secret")
    first = SimpleNamespace(is_world_process_zero=True)
    record_moe_run(args, first, Setting(a=1))
    record_moe_run(args, first, Other(b=(1, 2)))
    record = read_moe_run(str(tmp_path))
    assert record["callbacks"] == {"Setting": {"a": 1}, "Other": {"b": [1, 2]}}
    assert record["training_args"] == {"learning_rate": 1e-3} and "hf_secret" not in (tmp_path / MOE_RUN_NAME).read_text()
    second = SimpleNamespace(is_world_process_zero=True)  # a new train() call: the old record is replaced
    record_moe_run(args, second, Setting(a=2))
    assert read_moe_run(str(tmp_path))["callbacks"] == {"Setting": {"a": 2}}
    assert record_moe_run(args, SimpleNamespace(is_world_process_zero=False), Other(b=3)) is None
    assert read_moe_run(str(tmp_path))["callbacks"] == {"Setting": {"a": 2}}
    assert [n for n in os.listdir(tmp_path) if n != MOE_RUN_NAME] == []  # no temporary files left


def test_sft_trainer_push_sends_the_allow_list_only(tmp_path, hub):
    """MoESFTTrainer pushes through the same allow-list as MoETrainer (TRL's own push would send the whole folder)."""
    from datasets import Dataset

    from hf_moe_tuning.sft import MoESFTTrainer
    from hf_moe_tuning.study.chat import align_special_tokens, ensure_chat_template, sft_config

    out = tmp_path / "run"
    out.mkdir()
    (out / ".env").write_text("HF_TOKEN=hf_secret")
    (out / "optimizer.pt").write_bytes(b"optimizer state")
    tokenizer = ensure_chat_template(ByT5Tokenizer(), "byte")
    model = align_special_tokens(build_tiny_model("mixtral"), tokenizer)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"say {i}"}],
                               "completion": [{"role": "assistant", "content": str(i)}]} for i in range(8)])
    args = sft_config({"max_steps": 1, "per_device_train_batch_size": 4, "hub_model_id": "me/tiny-sft", "use_cpu": True,
                       "hub_token": "hf_args_token", "moe_drift_probe_size": 0, "disable_tqdm": True}, str(out))
    trainer = MoESFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.push_to_hub()
    uploads = [c[2] for c in hub if c[0] == "upload_folder"]
    assert uploads and uploads[-1]["sent"]
    sent = uploads[-1]["sent"]
    assert not {Path(p).name for p in sent} & NEVER_SENT, sorted(sent)
    assert not any(b"hf_secret" in data or b"hf_args_token" in data for data in sent.values())
