"""Every committed study result is exactly what the pipeline renders from its data files, and passes its own rules."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from hf_moe_tuning.study import load_study_config, render
from hf_moe_tuning.study.report import DATE_PREFIX, DELTA_FIELDS, read_csv
from hf_moe_tuning.study.statistics import verdict

ROOT = Path(__file__).resolve().parents[1]
STUDY_DIRS = sorted(p.parent for p in (ROOT / "results").glob("*/results.md"))


def test_every_results_folder_has_its_data_files():
    for folder in STUDY_DIRS:
        for name in ("results.csv", "deltas.csv", "items.csv.gz", "run.json", "plot.png"):
            assert (folder / name).is_file(), f"{folder.name}: {name} missing (results are written by the pipeline only)"


@pytest.mark.parametrize("folder", STUDY_DIRS, ids=lambda p: p.name)
def test_results_md_is_rendered_from_the_csvs(folder, tmp_path):
    for name in ("results.csv", "deltas.csv", "run.json"):
        shutil.copy(folder / name, tmp_path / name)
    render(tmp_path)

    def body(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith(DATE_PREFIX)]

    assert body((tmp_path / "results.md").read_text()) == body((folder / "results.md").read_text())


@pytest.mark.parametrize("folder", STUDY_DIRS, ids=lambda p: p.name)
def test_verdicts_follow_from_the_intervals(folder):
    rows = read_csv(folder / "deltas.csv")
    assert list(rows[0])[: len(DELTA_FIELDS)] == list(DELTA_FIELDS)
    for row in rows:
        assert float(row["ci_low"]) <= float(row["mean"]) <= float(row["ci_high"])
        assert row["verdict"] == verdict(row["paper"], float(row["ci_low"]), float(row["ci_high"]))


@pytest.mark.parametrize("folder", STUDY_DIRS, ids=lambda p: p.name)
def test_results_match_their_recipe_and_command(folder):
    info = json.loads((folder / "run.json").read_text())
    config = load_study_config(ROOT / info["recipe"])
    assert config.study == info["study"] == folder.name
    with (folder / "results.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["primary"] == "1"]
    assert {r["arm"] for r in rows if not r["arm"].startswith("baseline:")} == set(config.arms)
    assert {int(r["seed"]) for r in rows} == set(info["seeds"])
    assert info["command"] and info["wall_seconds"] > 0
