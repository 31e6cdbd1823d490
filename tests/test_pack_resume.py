"""``scripts/pack_resume.py``: the finished entries of an unfinished run's stage cache, packed for resuming."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pack_resume.py"
PROVENANCE = {"source": "abc", "versions": {"torch": "2.13.0+cpu", "trl": "absent"}, "python": "3.11.7",
              "platform": "Linux-x86_64", "device": "cpu", "threads": 1}


@pytest.fixture()
def pack(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("pack_resume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "REPO", tmp_path / "repo")
    return module


def _entry(cache: Path, stage: str, name: str, done: bool = True, provenance: dict = PROVENANCE) -> None:
    path = cache / stage / name
    path.mkdir(parents=True)
    (path / "stage.json").write_text(json.dumps({"config": {}, "provenance": provenance}))
    (path / "result.json").write_text("{}")
    if done:
        (path / "DONE").write_text("")


def _worktree(tmp_path: Path) -> Path:
    wt = tmp_path / "wt"
    (wt / "recipes" / "s").mkdir(parents=True)
    (wt / "recipes" / "s" / "tiny.yaml").write_text("study: flan_moe\n")
    (wt / ".gitignore").write_text("runs/\n")
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(wt), *cmd], check=True)
    return wt


def test_packs_only_finished_entries_and_writes_resume_instructions(pack, tmp_path):
    wt = _worktree(tmp_path)
    cache = wt / "runs" / "cache"
    _entry(cache, "finetune", "flan_t5-fusion-s0-aaa")
    _entry(cache, "finetune", "flan_t5-passage_yesno-s1-bbb")
    _entry(cache, "finetune", "moe-fusion-s0-ccc")
    _entry(cache, "finetune", "moe-fusion-s1-ddd", done=False)  # still training: not packed
    _entry(cache, "pretrain", "switch-eee")
    command = "compare recipes/s/tiny.yaml --seeds 5"
    assert pack.main([str(wt), "--recipe", "recipes/s/tiny.yaml", "--command", command]) == 0

    commit = subprocess.run(["git", "-C", str(wt), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    out = tmp_path / "repo" / "results" / "flan_moe" / "resume"
    with tarfile.open(out / f"stage_cache-{commit}.tar.gz") as tar:
        dirs = {Path(n).parent.as_posix() for n in tar.getnames() if n.endswith("DONE")}
    assert dirs == {"finetune/flan_t5-fusion-s0-aaa", "finetune/flan_t5-passage_yesno-s1-bbb",
                    "finetune/moe-fusion-s0-ccc", "pretrain/switch-eee"}
    resume = (out / "RESUME.md").read_text()
    assert f"python -m hf_moe_tuning.cli {command}" in resume and f"`{commit}`" in resume
    assert "3 fine-tuning runs (by seed: s0 2, s1 1; by arm: flan_t5 2, moe 1) and 1 pretrain stage(s)" in resume
    assert 'pip install "torch==2.13.0"\n' in resume  # no local version label; absent libraries are not pinned
    assert "python 3.11.7" in resume and "the thread count (1)" in resume and "source (hash `abc`)" in resume


def test_refuses_mixed_provenance_and_dirty_worktrees(pack, tmp_path):
    wt = _worktree(tmp_path)
    cache = wt / "runs" / "cache"
    _entry(cache, "finetune", "t5-fusion-s0-aaa")
    _entry(cache, "finetune", "t5-fusion-s1-bbb", provenance={**PROVENANCE, "source": "other"})
    with pytest.raises(ValueError, match="2 different provenances"):
        pack.main([str(wt), "--recipe", "recipes/s/tiny.yaml", "--command", "compare"])
    (wt / "recipes" / "s" / "tiny.yaml").write_text("study: flan_moe\nseeds: 1\n")
    with pytest.raises(SystemExit, match="uncommitted changes"):
        pack.main([str(wt), "--recipe", "recipes/s/tiny.yaml", "--command", "compare"])
