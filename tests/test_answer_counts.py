"""``scripts/answer_counts.py``: a zero-shot arm's answers recounted from its shipped start model."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "flan_moe" / "tiny.yaml"


@pytest.fixture()
def script():
    spec = importlib.util.spec_from_file_location("answer_counts", ROOT / "scripts" / "answer_counts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_counts_a_zero_shot_arms_answers_from_the_shipped_model(script, tmp_path, capsys):
    threads = torch.get_num_threads()
    script.main([str(RECIPE), "flan_moe_0shot", "--split", "validation", "--cache", str(tmp_path / "cache"),
                 "--threads", str(threads)])
    out = capsys.readouterr().out
    assert re.search(r"start model \S*recipes/flan_moe/checkpoints/instruct/switch-", out)
    assert not (tmp_path / "cache").exists()  # the shipped checkpoint was used: nothing trained
    tasks = re.findall(r"  (\w+) \(validation, (\d+) items\): accuracy ([\d.]+), top_answer_share ([\d.]+)", out)
    assert [t[0] for t in tasks] == ["passage_yesno", "multiple_choice"]  # classification tasks only, not fusion
    answers = [ast.literal_eval(line.split("answers", 1)[1].strip()) for line in out.splitlines() if line.strip().startswith("answers")]
    for (_task, items, _score, share), counts in zip(tasks, answers):
        assert sum(counts.values()) == int(items) == 200
        assert float(share) == pytest.approx(100 * max(counts.values()) / 200, abs=0.05)


@pytest.mark.parametrize("arm, message", [("flan_moe", "is fine-tuned"), ("nope", "is not in the recipe's arms")])
def test_refuses_arms_it_cannot_recount(script, arm, message, capsys):
    with pytest.raises(SystemExit):
        script.main([str(RECIPE), arm])
    assert message in capsys.readouterr().err
