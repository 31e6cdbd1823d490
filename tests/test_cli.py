"""``hf-moe-tuning describe`` and ``demo``."""

from __future__ import annotations

import argparse
import json

import torch
from transformers import SwitchTransformersConfig

from hf_moe_tuning.cli import main
from hf_moe_tuning.models import load_model


def test_describe_tiny_table(capsys) -> None:
    assert main(["describe", "switch"]) == 0
    out = capsys.readouterr().out
    for group in ("embeddings", "attention", "router", "experts", "dense_ffn", "norms", "total"):
        assert group in out
    assert "MoE layers: 4" in out and "8 experts, top-1" in out


def test_describe_json_counts_add_up(capsys) -> None:
    assert main(["describe", "mixtral", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    model = load_model("mixtral")
    assert sum(data["groups"].values()) == sum(p.numel() for p in model.parameters())
    assert [layer["num_experts"] for layer in data["layers"]] == [4, 4]
    assert all(axis == 0 for layer in data["layers"] for axis in layer["fused_experts"].values())


def test_describe_real_config_on_meta_device(tmp_path, capsys) -> None:
    """google/switch-base-8's shape, described from its config alone (no weights allocated)."""
    SwitchTransformersConfig(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12,
        num_experts=8, encoder_sparse_step=2, decoder_sparse_step=2,
    ).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), meta=True)
    assert all(p.device == torch.device("meta") for p in model.parameters())
    assert main(["describe", str(tmp_path), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    total = sum(groups.values())
    assert 600e6 < total < 640e6  # switch-base-8 has ~620M parameters
    assert 0.70 < groups["experts"] / total < 0.76  # experts hold ~73% (ST-MoE quotes ~80% for its models)


def test_describe_takes_the_recipes_tiny_spelling(capsys) -> None:
    """Recipes name embedded models ``tiny:<name>``; ``describe`` takes that spelling too."""
    assert main(["describe", "tiny:mixtral", "--json"]) == 0
    prefixed = json.loads(capsys.readouterr().out)
    assert main(["describe", "mixtral", "--json"]) == 0
    assert prefixed["groups"] == json.loads(capsys.readouterr().out)["groups"]
    assert prefixed["groups"]["experts"] > 0
    assert main(["describe", "tiny:nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown tiny model 'nope'" in err and "mixtral" in err


def test_describe_unknown_model_is_a_clear_error(capsys) -> None:
    assert main(["describe", "/no/such/model/dir"]) == 2
    assert "error:" in capsys.readouterr().err


def test_demo_trains_and_reports(tmp_path, capsys) -> None:
    assert main(["demo", "--strategy", "attention", "--max-steps", "6", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "MoE freezing strategy: attention" in out
    assert "final train loss:" in out


def test_recorded_command_names_the_entry_point_for_python_dash_m() -> None:
    from hf_moe_tuning.study.cli import _program

    assert _program("/usr/local/bin/hf-moe-tuning") == "hf-moe-tuning"
    assert _program("/work/run/hf_moe_tuning/cli.py") == "hf-moe-tuning"  # python -m hf_moe_tuning.cli
    assert _program("recipes/train.py") == "recipes/train.py"


def test_parallel_jobs_share_the_cores_by_default(monkeypatch) -> None:
    from hf_moe_tuning.study import cli as study_cli

    monkeypatch.setattr(study_cli.os, "cpu_count", lambda: 8)
    assert study_cli._threads_per_job(1) is None  # one job: torch's own default
    assert study_cli._threads_per_job(2) == 4
    assert study_cli._threads_per_job(16) == 1


def test_jobs_without_threads_share_the_cores_among_workers_only(monkeypatch, tmp_path) -> None:
    """``--jobs 2`` without ``--threads``: each worker gets the cores halved; the stages in the main process keep
    every core (they run while the workers are idle)."""
    from hf_moe_tuning.study import cli as study_cli

    seen = {}

    def fake_run_study(config, **kwargs):
        seen.update(kwargs, main_threads=torch.get_num_threads())
        return {"md": tmp_path / "results.md"}

    monkeypatch.setattr(study_cli, "run_study", fake_run_study)
    monkeypatch.setattr(study_cli.os, "cpu_count", lambda: 8)
    before = torch.get_num_threads()
    parser = argparse.ArgumentParser()
    study_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "recipes/flan_moe/smoke.yaml", "--seeds", "1", "--jobs", "2", "--no-progress"])
    assert study_cli.run_from_args(args, "compare") == 0
    assert seen["num_jobs"] == 2 and seen["job_threads"] == 4
    assert seen["main_threads"] == before == torch.get_num_threads()
