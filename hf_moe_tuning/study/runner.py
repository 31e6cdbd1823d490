"""Drivers: run every arm of a study for N seeds and write ``results/<study>/``.

``run_study`` is the engine; :func:`compare`, :func:`ablate` and :func:`sweep_experts` are the three
studies of the papers (Flan-MoE's four arms, ST-MoE's five freezing arms, Switch's expert count),
each checking that the recipe is of the right study.
"""

from __future__ import annotations

import datetime
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .cache import StageCache
from .config import StudyConfig, load_study_config
from .report import StudyResult, environment_versions, write_results
from .stages import ensure_instructed, ensure_pretrained, finetune_and_evaluate, load_task_splits

logger = logging.getLogger(__name__)

#: Repository root (recipes/ lives there in a clone).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Default recipe of each driver.
DEFAULT_RECIPES: dict[str, str] = {
    "flan_moe": "recipes/flan_moe/tiny.yaml",
    "st_moe_freezing": "recipes/st_moe_freezing/tiny.yaml",
    "expert_count": "recipes/expert_count/tiny.yaml",
}


def resolve_recipe(path: str | Path | None, study: str) -> Path:
    """The recipe to run: ``path`` if given, else the study's default tiny recipe (cwd, then repo root)."""
    candidate = Path(path or DEFAULT_RECIPES[study])
    if candidate.is_file() or path is not None:
        return candidate
    in_repo = REPO_ROOT / candidate
    if in_repo.is_file():
        return in_repo
    raise FileNotFoundError(f"no recipe given and {candidate} not found (run from a clone of the repository or pass CONFIG)")


def _device() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


def run_study(
    config: StudyConfig,
    seeds: list[int] | None = None,
    output_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
) -> StudyResult:
    """Run every arm of ``config`` on every task for every seed; write and return the results.

    Stages are cached under ``cache_dir`` (default: the recipe's ``cache_dir``): rerunning only redoes
    what changed. Returns the :class:`StudyResult` whose files are in ``output_dir``.
    """
    seeds = list(config.seeds if seeds is None else seeds)
    output_dir = Path(output_dir or config.output_dir)
    cache = StageCache(cache_dir or config.cache_dir)
    started, cpu_started = time.perf_counter(), time.process_time()
    stage_seconds = {"pretrain": 0.0, "instruct": 0.0, "finetune+eval": 0.0}
    recorded = {"pretrain": 0.0, "instruct": 0.0, "finetune+eval": 0.0}  # including cached stages

    # 1-2. base models: pretrain every model an arm uses; instruction-tune those an instruct arm uses
    starts: dict[str, tuple[str, str]] = {}  # arm -> (path, key)
    pretrained: dict[str, tuple[str, str]] = {}
    instructed: dict[str, tuple[str, str]] = {}
    models_needed = list(dict.fromkeys(arm.model for arm in config.arms.values()))
    for name in tqdm(models_needed, desc="pretrain", disable=not progress):
        path, key, info = ensure_pretrained(config, config.models[name], cache)
        stage_seconds["pretrain"] += 0.0 if info.get("cached") else info.get("seconds", 0.0)
        recorded["pretrain"] += info.get("seconds", 0.0)
        pretrained[name] = (path, key)
    instruct_models = list(dict.fromkeys(arm.model for arm in config.arms.values() if arm.instruct))
    for name in tqdm(instruct_models, desc="instruct", disable=not progress or not instruct_models):
        path, key, info = ensure_instructed(config, config.models[name], *pretrained[name], cache)
        stage_seconds["instruct"] += 0.0 if info.get("cached") else info.get("seconds", 0.0)
        recorded["instruct"] += info.get("seconds", 0.0)
        instructed[name] = (path, key)
    for arm in config.arms.values():
        starts[arm.name] = instructed[arm.model] if arm.instruct else pretrained[arm.model]

    # 3-4. fine-tune every arm on every task, for every seed, and evaluate
    tasks = {task: load_task_splits(config, task) for task in config.data["tasks"]}
    jobs = [(seed, arm, task) for seed in seeds for arm in config.arms for task in tasks]
    records: list[dict[str, Any]] = []
    bar = tqdm(jobs, desc=f"{config.study}: fine-tune + evaluate", disable=not progress)
    finetune_started = time.perf_counter()
    for seed, arm, task in bar:
        bar.set_postfix_str(f"seed={seed} arm={arm} task={task}")
        splits, kind, metrics = tasks[task]
        record = finetune_and_evaluate(config, arm, task, seed, *starts[arm], splits, kind, metrics, cache)
        missing = [m for m in metrics if m not in record["metrics"]]
        if missing:
            raise RuntimeError(f"cached result of {arm}/{task}/seed {seed} lacks metrics {missing}; clear {cache.root}")
        # the primary score follows the task's current primary metric (every metric is stored)
        records.append({**record, "primary_metric": metrics[0], "score": 100.0 * record["metrics"][metrics[0]]})
    stage_seconds["finetune+eval"] = time.perf_counter() - finetune_started
    recorded["finetune+eval"] = sum(r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in records)

    result = StudyResult(
        config=config,
        records=records,
        seeds=seeds,
        meta={
            "command": command or " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
            "wall_seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started,
            "cached_runs": sum(bool(r.get("cached")) for r in records),
            "stage_seconds": stage_seconds,
            "recorded_stage_seconds": recorded,
            "versions": environment_versions(),
            "device": _device(),
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        },
    )
    paths = write_results(result, output_dir)
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return result


def _run_driver(study: str, recipe: str | Path | None, num_seeds: int | None, overrides: dict | None, **kwargs: Any) -> StudyResult:
    config = load_study_config(resolve_recipe(recipe, study), overrides)
    if config.study != study:
        raise ValueError(f"{config.path}: study: this driver runs '{study}' recipes, the recipe is a '{config.study}' study")
    seeds = list(range(num_seeds)) if num_seeds is not None else None
    return run_study(config, seeds=seeds, **kwargs)


def compare(recipe: str | Path | None = None, num_seeds: int | None = None, overrides: dict | None = None, **kwargs: Any) -> StudyResult:
    """Flan-MoE's comparison: T5, Flan-T5, MoE, Flan-MoE fine-tuned on held-out tasks."""
    return _run_driver("flan_moe", recipe, num_seeds, overrides, **kwargs)


def ablate(recipe: str | Path | None = None, num_seeds: int | None = None, overrides: dict | None = None, **kwargs: Any) -> StudyResult:
    """ST-MoE's five-arm freezing ablation (all, non_moe, moe, attention, ffn)."""
    return _run_driver("st_moe_freezing", recipe, num_seeds, overrides, **kwargs)


def sweep_experts(recipe: str | Path | None = None, num_seeds: int | None = None, overrides: dict | None = None, **kwargs: Any) -> StudyResult:
    """Switch Transformers' expert-count sweep: the same Switch with different numbers of experts."""
    return _run_driver("expert_count", recipe, num_seeds, overrides, **kwargs)
