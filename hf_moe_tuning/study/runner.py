"""Drivers: run every arm of a study for N seeds and write ``results/<study>/``.

``run_study`` is the engine; :func:`compare`, :func:`ablate` and :func:`sweep_experts` are the three
studies of the papers (Flan-MoE's four arms, ST-MoE's five freezing arms, Switch's expert count),
each checking that the recipe is of the right study.

Under ``accelerate launch -n N`` (``recipes/train.py`` or the ``hf-moe-tuning`` drivers) every rank runs
:func:`run_study`: each stage trains with all N processes, rank 0 owns the cache and writes the results
and plots, the other ranks wait for it. The ``--jobs`` worker pool is for one process only.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from ..data.heldout import CLASSIFICATION
from .backends import backend_for, backend_name, parameter_summary
from .cache import StageCache, library_versions, process_state, source_hash
from .config import StudyConfig, delta_arms, evaluate_delta, load_study_config
from .report import AVERAGE, render, write_deltas_csv, write_items, write_results_csv, write_run_info
from .scoring import BASELINE_PREFIX, baseline_predictions, baselines_for, score_predictions, top_answer_share
from .stages import ensure_instructed, ensure_pretrained, finetune_and_evaluate, load_task_splits
from .statistics import delta_items, paired_bootstrap, verdict

logger = logging.getLogger(__name__)

#: Repository root (recipes/ lives there in a clone).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Default recipe of each driver.
DEFAULT_RECIPES: dict[str, str] = {
    # the README's first command: the study's recipe with a 500-step budget and one seed (the study is tiny.yaml)
    "flan_moe": "recipes/flan_moe/quick.yaml",
    "st_moe_freezing": "recipes/st_moe_freezing/tiny.yaml",
    "expert_count": "recipes/expert_count/tiny.yaml",
    "instruct_moe": "recipes/instruct_moe/tiny.yaml",
}
#: The studies each driver runs (``compare`` runs the encoder-decoder and the decoder-only comparison).
DRIVER_STUDIES: dict[str, tuple[str, ...]] = {
    "compare": ("flan_moe", "instruct_moe"),
    "ablate": ("st_moe_freezing",),
    "sweep_experts": ("expert_count",),
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


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} logical CPUs, device {device}"


def _sizes(config: StudyConfig, spec, path: str) -> dict[str, Any]:
    """Parameter counts of a model whose stage record has none (a shipped checkpoint); tiny models only."""
    if not spec.is_tiny:
        return {}
    backend = backend_for(config, spec)
    return parameter_summary(backend.load(path, backend.tokenizer()))


def delta_coefficients(expr: str, arms: list[str]) -> dict[str, float]:
    """The linear coefficient of every arm in a delta expression (``"(a - b) - (c - d)"`` -> ``{a: 1, b: -1, ...}``)."""
    coefficients = {arm: evaluate_delta(expr, {a: float(a == arm) for a in arms}) for arm in delta_arms(expr)}
    return {arm: c for arm, c in coefficients.items() if c != 0}


def _check_record(record: dict[str, Any], metrics, cache: StageCache) -> dict[str, Any]:
    missing = [m for m in metrics if m not in record["metrics"]]
    if missing:
        raise RuntimeError(f"cached result of {record['arm']}/{record['task']}/seed {record['seed']} lacks metrics {missing}; "
                           f"clear {cache.root}")
    return record


def _worker_job(config: StudyConfig, job: tuple[int, str, str], start: tuple[str, str], cache_root: str, threads: int):
    """One fine-tuning job in a worker process with ``threads`` torch threads (part of its cache key)."""
    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    seed, arm, task = job
    splits, kind, metrics = load_task_splits(config, task)
    return finetune_and_evaluate(config, arm, task, seed, *start, splits, kind, metrics, StageCache(cache_root))


def check_jobs(num_jobs: int) -> None:
    """Refuse the ``--jobs`` worker pool under a multi-process launch (each stage already uses every process)."""
    state = process_state()
    if num_jobs > 1 and state is not None:
        raise ValueError(
            f"--jobs {num_jobs} runs fine-tuning jobs in worker processes of one process; this run was launched with "
            f"{state.num_processes} processes (accelerate launch), which already train every stage together. "
            "Use --jobs 1 with a multi-process launch, or launch one process to use --jobs."
        )


def _run_jobs(config, jobs, starts, tasks, cache: StageCache, progress: bool, num_jobs: int,
              job_threads: int) -> list[dict[str, Any]]:
    """Fine-tune and evaluate every ``(seed, arm, task)`` job, in order; in ``num_jobs`` processes (each with
    ``job_threads`` torch threads) if > 1."""
    bar = tqdm(total=len(jobs), desc=f"{config.study}: fine-tune + evaluate", disable=not progress)
    if num_jobs <= 1:
        records = []
        for seed, arm, task in jobs:
            bar.set_postfix_str(f"seed={seed} arm={arm} task={task}")
            splits, kind, metrics = tasks[task]
            record = finetune_and_evaluate(config, arm, task, seed, *starts[arm], splits, kind, metrics, cache, progress=progress)
            records.append(_check_record(record, metrics, cache))
            bar.update()
        bar.close()
        return records
    import concurrent.futures
    import multiprocessing

    results: dict[int, dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=num_jobs, mp_context=context) as pool:
        futures = {
            pool.submit(_worker_job, config, job, starts[job[1]], str(cache.root), job_threads): i
            for i, job in enumerate(jobs)
        }
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            seed, arm, task = jobs[i]
            results[i] = _check_record(future.result(), tasks[task][2], cache)
            bar.set_postfix_str(f"done seed={seed} arm={arm} task={task}")
            bar.update()
    bar.close()
    return [results[i] for i in range(len(jobs))]


def _baseline_records(config: StudyConfig, tasks: dict, seeds: list[int]) -> list[dict[str, Any]]:
    split = config.evaluate.get("split", "test")
    records = []
    for task, (splits, kind, metrics) in tasks.items():
        data = splits[split]
        for name in baselines_for(kind):
            for seed in seeds:
                predictions = baseline_predictions(
                    name, kind, list(data["inputs"]), list(data["choices"]), list(splits["train"]["targets"]), seed
                )
                means, items = score_predictions(predictions, list(data["targets"]), metrics)
                records.append({
                    "arm": f"{BASELINE_PREFIX}{name}", "task": task, "seed": seed, "kind": "baseline", "split": split,
                    "metrics": means, "items": items, "primary_metric": metrics[0],
                    "top_answer_share": top_answer_share(predictions) if kind == CLASSIFICATION else None,
                })
    return records


def _result_rows(config: StudyConfig, records: list[dict[str, Any]], task_kinds: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        arm = config.arms.get(r["arm"])
        base = {
            "study": config.study, "arm": r["arm"], "label": (arm.label or arm.name) if arm else r["arm"],
            "task": r["task"], "task_kind": task_kinds[r["task"]], "seed": r["seed"], "split": r.get("split"),
            "finetuned": int(bool(arm and arm.finetune)), "instruct": int(bool(arm and arm.instruct)),
            "kind": r.get("kind"), "model": config.models[arm.model].init if arm else "",
            **{k: r.get(k) for k in ("freeze_strategy", "learning_rate", "batch_size", "optimizer_steps", "best_step",
                                     "train_tokens", "validation_score", "train_loss", "train_seconds", "eval_seconds")},
            "top_answer_share": None if r.get("top_answer_share") is None else 100.0 * r["top_answer_share"],
        }
        for metric in sorted(r["metrics"], key=lambda m: (m != r["primary_metric"], m)):  # primary first, then by name
            rows.append({**base, "metric": metric, "primary": int(metric == r["primary_metric"]), "score": 100.0 * r["metrics"][metric]})
    return rows


def _delta_rows(config: StudyConfig, records: list[dict[str, Any]], seeds: list[int], tasks: list[str]) -> list[dict[str, Any]]:
    items: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        items[r["task"]][r["arm"]][r["seed"]] = r["items"][r["primary_metric"]]
    rows: list[dict[str, Any]] = []
    for delta in config.deltas:
        coefficients = delta_coefficients(delta.expr, list(config.arms))
        per_task = {task: delta_items(coefficients, items[task], seeds) for task in tasks}
        estimates = paired_bootstrap(per_task)
        for task in [AVERAGE, *tasks]:
            e = estimates[task]
            rows.append({
                "delta": delta.name, "paper": delta.paper, "mean": e.mean, "ci_low": e.ci_low, "ci_high": e.ci_high,
                "verdict": verdict(delta.paper, e.ci_low, e.ci_high), "task": task, "expr": delta.expr,
                "paper_value": delta.paper_value, "source": delta.source,
            })
    return rows


def run_study(
    config: StudyConfig,
    seeds: list[int] | None = None,
    output_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
    num_jobs: int = 1,
    job_threads: int | None = None,
) -> dict[str, Path]:
    """Run every arm of ``config`` on every task for every seed; write the study's files; return their paths.

    Stages are cached under ``cache_dir`` (default: the recipe's ``cache_dir``): rerunning only redoes
    what changed (configuration, code, library versions, platform or thread count). ``num_jobs > 1`` runs
    the fine-tuning jobs in that many worker processes, each with ``job_threads`` torch threads (default: this
    process's count, so the results and cache keys equal a one-process run's); the pretraining and
    instruction-tuning stages run in this process with its own thread count.

    Under a multi-process launch every rank must call this: the stages train with all processes, rank 0
    writes the cache, the results and the plots (the paths returned exist once every rank has returned),
    and ``num_jobs > 1`` is refused.
    """
    check_jobs(num_jobs)
    if job_threads is not None and job_threads < 1:
        raise ValueError(f"job_threads must be >= 1, got {job_threads}")
    if num_jobs <= 1 and job_threads and job_threads != torch.get_num_threads():
        logger.warning("job_threads=%d is ignored with num_jobs=1: the jobs run in this process with its %d threads "
                       "(torch.set_num_threads sets them)", job_threads, torch.get_num_threads())
    job_threads = job_threads if num_jobs > 1 and job_threads else torch.get_num_threads()
    state = process_state()
    main = state is None or state.is_main_process
    progress = progress and main
    seeds = list(config.seeds if seeds is None else seeds)
    output_dir = Path(output_dir or config.output_dir)
    datasets.disable_progress_bars()  # per-map bars of every stage drown the stage bars
    cache = StageCache(cache_dir or config.cache_dir)
    started = time.perf_counter()
    stage_seconds = {"pretrain": 0.0, "instruct": 0.0, "finetune+eval": 0.0}
    shipped: list[str] = []

    # 1-2. base models: pretrain every model an arm uses; instruction-tune those an instruct arm uses
    pretrained: dict[str, tuple[str, str]] = {}
    instructed: dict[str, tuple[str, str]] = {}
    models_needed = list(dict.fromkeys(arm.model for arm in config.arms.values()))
    stage_start = time.perf_counter()
    models_info: dict[str, dict[str, Any]] = {}
    for name in tqdm(models_needed, desc="pretrain", disable=not progress):
        spec = config.models[name]
        path, key, info = ensure_pretrained(config, spec, cache, progress=progress)
        if info.get("shipped"):
            shipped.append(os.path.relpath(info["shipped"]))
        pretrained[name] = (path, key)
        models_info[name] = {"init": spec.init, "overrides": spec.overrides, "backend": backend_name(spec),
                             "pretrain_loss": info.get("train_loss"), **(info.get("params") or _sizes(config, spec, path))}
    stage_seconds["pretrain"] = time.perf_counter() - stage_start
    instruct_models = list(dict.fromkeys(arm.model for arm in config.arms.values() if arm.instruct))
    stage_start = time.perf_counter()
    for name in tqdm(instruct_models, desc="instruct", disable=not progress or not instruct_models):
        path, key, info = ensure_instructed(config, config.models[name], *pretrained[name], cache, progress=progress)
        if info.get("shipped"):
            shipped.append(os.path.relpath(info["shipped"]))
        instructed[name] = (path, key)
        models_info[name].update(mixture_eval_loss=info.get("mixture_eval_loss"), mixture_train_loss=info.get("train_loss"))
    stage_seconds["instruct"] = time.perf_counter() - stage_start
    starts = {arm.name: instructed[arm.model] if arm.instruct else pretrained[arm.model] for arm in config.arms.values()}

    # 3-4. fine-tune every arm on every task, for every seed, and evaluate; the trivial baselines
    tasks = {task: load_task_splits(config, task) for task in config.data["tasks"]}
    jobs = [(seed, arm, task) for seed in seeds for arm in config.arms for task in tasks]
    stage_start = time.perf_counter()
    records = _run_jobs(config, jobs, starts, tasks, cache, progress, num_jobs, job_threads)
    stage_seconds["finetune+eval"] = time.perf_counter() - stage_start
    trained_records = records
    records = _baseline_records(config, tasks, seeds) + trained_records

    task_kinds = {task: kind for task, (_splits, kind, _metrics) in tasks.items()}
    split = config.evaluate.get("split", "test")
    info = {
        "study": config.study,
        "variant": config.variant,
        "description": config.description,
        "command": command or " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "recipe": os.path.relpath(config.path) if config.path != "<dict>" else config.path,
        "seeds": seeds,
        "split": split,
        "items": {task: len(splits[split]) for task, (splits, _k, _m) in tasks.items()},
        "wall_seconds": time.perf_counter() - started,
        "stage_seconds": stage_seconds,
        "runs": len(trained_records),
        "cached_runs": sum(bool(r.get("cached")) for r in trained_records),
        # fine-tuning + scoring time of every run, cached ones included (a run resumed from a cache filled by an
        # earlier invocation has a wall time that covers only its own part)
        "job_seconds": sum(float(r.get("train_seconds") or 0) + float(r.get("eval_seconds") or 0) for r in trained_records),
        "machine": _machine(),
        "threads": job_threads,  # of every fine-tuning job
        **({"stage_threads": torch.get_num_threads()} if torch.get_num_threads() != job_threads else {}),
        "jobs": num_jobs,
        **({"processes": state.num_processes} if state is not None else {}),
        "versions": {"python": platform.python_version(), **library_versions()},
        "source_hash": source_hash(),
        "shipped": sorted(set(shipped)),
        "models": models_info,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    paths = {
        "csv": output_dir / "results.csv", "deltas": output_dir / "deltas.csv",
        "items": output_dir / "items.csv.gz", "run": output_dir / "run.json",
    }
    if not main:  # rank 0 writes the results and plots; wait until they exist
        state.wait_for_everyone()
        return {**paths, "md": output_dir / "results.md", "plot": output_dir / "plot.png"}
    output_dir.mkdir(parents=True, exist_ok=True)
    write_results_csv(_result_rows(config, records, task_kinds), paths["csv"])
    write_deltas_csv(_delta_rows(config, records, seeds, list(tasks)), paths["deltas"])
    write_items(
        ((r["arm"], r["task"], r["seed"], r["primary_metric"], i, v)
         for r in records for i, v in enumerate(r["items"][r["primary_metric"]])),
        paths["items"],
    )
    write_run_info(info, paths["run"])
    paths.update(render(output_dir))
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    if state is not None:
        state.wait_for_everyone()
    return paths


def _run_driver(driver: str, recipe: str | Path | None, num_seeds: int | None, overrides: dict | None, **kwargs: Any) -> dict[str, Path]:
    studies = DRIVER_STUDIES[driver]
    config = load_study_config(resolve_recipe(recipe, studies[0]), overrides)
    if config.study not in studies:
        raise ValueError(f"{config.path}: study: {driver} runs {' or '.join(studies)} recipes, the recipe is a '{config.study}' study")
    seeds = list(range(num_seeds)) if num_seeds is not None else None
    return run_study(config, seeds=seeds, **kwargs)


def compare(recipe: str | Path | None = None, num_seeds: int | None = None, overrides: dict | None = None, **kwargs: Any) -> dict[str, Path]:
    """Flan-MoE's comparison: T5, Flan-T5, MoE, Flan-MoE (or their decoder-only counterparts) on held-out tasks."""
    return _run_driver("compare", recipe, num_seeds, overrides, **kwargs)


def ablate(recipe: str | Path | None = None, num_seeds: int | None = None, overrides: dict | None = None, **kwargs: Any) -> dict[str, Path]:
    """ST-MoE's five-arm freezing ablation (all, non_moe, moe, attention, ffn)."""
    return _run_driver("ablate", recipe, num_seeds, overrides, **kwargs)


def sweep_experts(recipe: str | Path | None = None, num_seeds: int | None = None, overrides: dict | None = None, **kwargs: Any) -> dict[str, Path]:
    """Switch Transformers' expert-count sweep: the same Switch with different numbers of experts."""
    return _run_driver("sweep_experts", recipe, num_seeds, overrides, **kwargs)
