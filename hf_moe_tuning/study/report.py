"""A study's files: ``results.csv``, ``deltas.csv``, ``items.csv.gz``, ``run.json`` → ``results.md`` + ``plot.png``.

The pipeline writes the data files; :func:`render` turns them into ``results.md`` and ``plot.png``
and reads nothing else, so a committed report can always be re-rendered and compared (a test does).

``results.csv`` is long: one row per (arm, task, seed, metric)

==================  ================================================================================
column              meaning
==================  ================================================================================
``arm``             recipe arm, or ``baseline:<name>`` (majority, random, copy_input, copy_first_sentence)
``label``           display name
``task``            held-out task
``seed``            fine-tuning seed (for baselines: the seed of ``random``; the others repeat)
``metric``          metric name; ``primary`` is 1 on the task's primary metric
``score``           percent
``split``           the split scored (``test`` for committed results)
``finetuned``       1 if the arm was fine-tuned on the task, 0 for zero-shot arms and baselines
``instruct``        1 if the arm starts from the instruction-tuned model
``kind``            ``dense`` / ``sparse`` / ``baseline``
``learning_rate``   fine-tuning learning rate, ``batch_size`` per-device batch
``optimizer_steps`` optimizer steps run before early stopping; ``best_step`` the step whose weights were kept
``train_tokens``    non-padding source tokens seen in fine-tuning
``validation_score`` best validation primary score (percent)
``top_answer_share`` classification runs: percent of items given the most frequent answer (100: one answer to all)
==================  ================================================================================

``deltas.csv``: ``delta, paper, mean, ci_low, ci_high, verdict, task`` (task ``average`` first), see
:mod:`hf_moe_tuning.study.statistics`. ``items.csv.gz``: the per-item primary scores the bootstrap
resampled. ``run.json``: the command, recipe, seeds, wall time, machine and versions of the run.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .scoring import BASELINE_PREFIX

AVERAGE = "average"
STAGES = ("pretrain", "instruct", "finetune+eval")
#: How far every fully fine-tuned arm must beat the best trivial baseline of a task (points).
REQUIRED_MARGIN = {"classification": 10.0, "generation": 5.0}
#: the widest 95 % CI (half-width, points) on a finding's average over tasks that the studies aim for
CI_HALF_WIDTH_TARGET = 2.5

RESULT_FIELDS = (
    "study", "arm", "label", "task", "task_kind", "seed", "metric", "primary", "score", "split", "finetuned",
    "instruct", "kind", "model", "freeze_strategy", "learning_rate", "batch_size", "optimizer_steps", "best_step",
    "train_tokens", "validation_score", "train_loss", "train_seconds", "eval_seconds", "top_answer_share",
)
DELTA_FIELDS = ("delta", "paper", "mean", "ci_low", "ci_high", "verdict", "task", "expr", "paper_value", "source")
ITEM_FIELDS = ("arm", "task", "seed", "metric", "item", "score")
DATE_PREFIX = "- date: "


def _round(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else value


# ---------------------------------------------------------------------------------------------- writers
def write_results_csv(rows: Iterable[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            # the learning rate as given (4 decimals would turn 2.5e-4 into 0.0003)
            writer.writerow({k: row.get(k) if k == "learning_rate" else _round(row.get(k)) for k in RESULT_FIELDS})


def write_deltas_csv(rows: Iterable[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=DELTA_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _round(row.get(k), 3) for k in DELTA_FIELDS})


def write_items(rows: Iterable[tuple], path: Path) -> None:
    with gzip.open(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ITEM_FIELDS)
        for row in rows:
            writer.writerow([_round(v, 6) for v in row])


def write_run_info(info: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- reading
def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(mean: float, std: float | None = None) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


class _Table:
    """Primary scores of ``results.csv``: ``scores[arm][task][seed]``, with the tasks' kinds and the arms' rows."""

    def __init__(self, rows: list[dict[str, str]]):
        self.rows = rows
        primary = [r for r in rows if r["primary"] == "1"]
        self.arms = list(dict.fromkeys(r["arm"] for r in primary))
        self.tasks = list(dict.fromkeys(r["task"] for r in primary))
        self.labels = {r["arm"]: r["label"] for r in primary}
        self.task_kind = {r["task"]: r["task_kind"] for r in primary}
        self.metric = {r["task"]: r["metric"] for r in primary}
        self.scores: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        #: ``answer_share[arm][task][seed]``: percent of items given the most frequent answer (files written since
        #: the column was added; older ``results.csv`` files lack it)
        self.answer_share: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        self.first: dict[str, dict[str, str]] = {}
        for r in primary:
            self.scores[r["arm"]][r["task"]][r["seed"]] = float(r["score"])
            if r.get("top_answer_share"):
                self.answer_share[r["arm"]][r["task"]][r["seed"]] = float(r["top_answer_share"])
            self.first.setdefault(r["arm"], r)

    def cell(self, arm: str, task: str) -> tuple[float, float]:
        if task == AVERAGE:
            seeds = set.intersection(*(set(self.scores[arm][t]) for t in self.tasks))
            per_seed = [statistics.fmean(self.scores[arm][t][s] for t in self.tasks) for s in sorted(seeds)]
            return _mean_std(per_seed)
        return _mean_std(list(self.scores[arm][task].values()))

    def is_baseline(self, arm: str) -> bool:
        return arm.startswith(BASELINE_PREFIX)

    def fully_finetuned(self, arm: str) -> bool:
        row = self.first[arm]
        return row["finetuned"] == "1" and row["freeze_strategy"] in ("all", "")


def margin_rows(table: _Table) -> list[tuple[str, str, float, str, float, bool]]:
    """Per fully fine-tuned arm and task: ``(arm, task, margin, best baseline, required, ok)``."""
    out = []
    for task in table.tasks:
        baselines = [(table.cell(a, task)[0], a) for a in table.arms if table.is_baseline(a) and task in table.scores[a]]
        if not baselines:
            continue
        best, best_arm = max(baselines)
        required = REQUIRED_MARGIN.get(table.task_kind[task], 10.0)
        for arm in table.arms:
            if not table.is_baseline(arm) and table.fully_finetuned(arm) and task in table.scores[arm]:
                margin = table.cell(arm, task)[0] - best
                out.append((arm, task, margin, best_arm, required, margin >= required))
    return out


def constant_answer_cells(table: _Table) -> list[tuple[str, str, list[str]]]:
    """``(arm, task, seeds)`` of every non-baseline classification score equal to the ``baseline:majority`` score.

    The embedded classification splits are label-balanced, so answering every item with any one label scores what
    the majority baseline scores: an arm with that exact score most likely gives one answer to every item (or, far
    less often, lands there by chance). On Hub data (``variant: real``) the splits are not balanced and only the
    majority-constant answer is caught; ``results.md`` says which of the two it checked.
    """
    majority = f"{BASELINE_PREFIX}majority"
    out = []
    for task in table.tasks:
        constant = table.scores.get(majority, {}).get(task)
        if table.task_kind[task] != "classification" or not constant:
            continue
        values = set(constant.values())
        for arm in table.arms:
            if table.is_baseline(arm) or task not in table.scores[arm]:
                continue
            seeds = [seed for seed, score in table.scores[arm][task].items() if any(abs(score - v) < 1e-6 for v in values)]
            if seeds:
                out.append((arm, task, seeds))
    return out


def _classification_cells(table: _Table) -> list[tuple[str, str]]:
    return [(arm, task) for task in table.tasks if table.task_kind[task] == "classification"
            for arm in table.arms if not table.is_baseline(arm) and task in table.scores[arm]]


def records_answers(table: _Table) -> bool:
    """Whether ``results.csv`` has the ``top_answer_share`` of every non-baseline classification run."""
    cells = _classification_cells(table)
    return bool(cells) and all(set(table.answer_share[a][t]) == set(table.scores[a][t]) for a, t in cells)


def one_answer_cells(table: _Table) -> list[tuple[str, str, list[str]]]:
    """``(arm, task, seeds)`` of every non-baseline classification run that gave all items the same answer
    (``top_answer_share`` 100), read from the answers, not from the score (see :func:`constant_answer_cells`)."""
    out = []
    for arm, task in _classification_cells(table):
        seeds = [seed for seed, share in table.answer_share[arm][task].items() if share >= 100.0 - 1e-9]
        if seeds:
            out.append((arm, task, seeds))
    return out


def _constant_answer_lines(table: _Table, real: bool) -> list[str]:
    """The ``## Constant answers`` section: runs that answered every item alike, read from ``top_answer_share``
    where ``results.csv`` has it (also naming scores that equal a constant answer's by chance), else from the score."""
    def listed(cells: list[tuple[str, str, list[str]]], note=lambda arm, task, seeds: "") -> list[str]:
        return [f"- {table.labels[arm]}, {task}: seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}"
                f"{note(arm, task, seeds)}" for arm, task, seeds in cells]

    def count(cells: list) -> str:
        return "none." if not cells else f"**{len(cells)} arm–task cell{'' if len(cells) == 1 else 's'}**:"

    equal = constant_answer_cells(table)
    if not records_answers(table):
        lines = [
            "",
            "## Constant answers",
            "",
            (
                "Classification scores equal to the score of giving every item one answer (the embedded splits are "
                "label-balanced, so that is the majority baseline's score): "
                if not real
                else "Classification scores equal to the majority baseline's (every item given the training split's "
                "most frequent label; Hub splits are not label-balanced, so a constant minority answer scores less "
                "and is not listed): "
            )
            + count(equal),
        ]
        return lines + ([""] + listed(equal) if equal else [])
    constant = one_answer_cells(table)
    lines = ["", "## Constant answers", "",
             "Classification runs that gave every item the same answer (`top_answer_share` 100 in `results.csv`): "
             + count(constant)]
    lines += ([""] + listed(constant)) if constant else []
    # seeds whose score equals the majority baseline's while their answers vary (the constant ones are listed above)
    chance = [(arm, task, [s for s in seeds if table.answer_share[arm][task][s] < 100.0 - 1e-9]) for arm, task, seeds in equal]
    chance = [cell for cell in chance if cell[2]]
    if chance:
        lines += ["", "Scores equal to the majority baseline's although the answers vary (a model near chance can land "
                  "on it exactly): " + count(chance), ""]
        lines += listed(chance, lambda arm, task, seeds: " (most frequent answer on "
                        + ", ".join(f"{table.answer_share[arm][task][s]:.1f}" for s in seeds) + " % of items)")
    return lines


# ---------------------------------------------------------------------------------------------- render
def _loss(value: Any) -> str:
    return "–" if value is None else f"{float(value):.3f}"


def _model_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    """The ``## Models`` section: size, expert share and the losses of the pretrain and instruct stages per model."""
    if not models:
        return []
    instructed = any("mixture_eval_loss" in m for m in models.values())
    head = "| model | init | kind | parameters | active | experts | pretrain loss |"
    head += " instruct train loss | held-out mixture loss |" if instructed else ""
    lines = [
        "## Models",
        "",
        "Parameters in total and active per token; *experts*: the experts' share of the parameters. Losses: the "
        "pretrain stage's mean train loss"
        + (" and, for instruction-tuned models, the instruct stage's mean train loss and its loss on held-out "
           "mixture examples." if instructed else "."),
        "",
        head,
        "|---|---|---|---|---|---|---|" + ("---|---|" if instructed else ""),
    ]
    for name, m in sorted(models.items()):
        row = (f"| {name} | `{m.get('init', '')}` | {m.get('kind', '')} | {m.get('total', 0):,} | {m.get('active', 0):,} | "
               f"{100 * float(m.get('experts_share') or 0):.0f} % | {_loss(m.get('pretrain_loss'))} |")
        if instructed:
            row += f" {_loss(m.get('mixture_train_loss'))} | {_loss(m.get('mixture_eval_loss'))} |"
        lines.append(row)
    return [*lines, ""]


def render_markdown(results: list[dict[str, str]], deltas: list[dict[str, str]], info: dict[str, Any]) -> str:
    """``results.md`` from the rows of ``results.csv`` and ``deltas.csv`` and the run info."""
    table = _Table(results)
    tasks = [*table.tasks, AVERAGE]
    lines = [f"# {info['study']} ({info['variant']})", ""]
    if info.get("description"):
        lines += [info["description"].strip(), ""]
    versions = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
    lines += [
        f"- command: `{info['command']}`",
        f"- recipe: `{info['recipe']}`",
        f"- seeds: {', '.join(map(str, info['seeds']))} (fine-tuning seeds); scored split: {info['split']}; "
        f"items per task: " + ", ".join(f"{t} {n}" for t, n in info.get("items", {}).items()),
        f"- wall time: {info['wall_seconds'] / 60:.1f} min ("
        + ", ".join(f"{k} {info['stage_seconds'][k] / 60:.1f} min" for k in STAGES if k in info.get("stage_seconds", {}))
        + f"); {info.get('cached_runs', 0)} of {info.get('runs', 0)} fine-tuning runs came from the cache"
        + (f"; fine-tuning and scoring of all {info.get('runs', 0)} runs, cached ones included: "
           f"{info['job_seconds'] / 3600:.1f} job-hours" if "job_seconds" in info else ""),
        f"- machine: {info['machine']}; torch threads: {info['threads']}"
        + (f" in each of {info['jobs']} fine-tuning worker processes" if info.get("jobs", 1) > 1 else ""),
        f"- versions: {versions}; source hash {info.get('source_hash', '')}",
    ]
    if info.get("shipped"):
        lines.append("- shipped pretrained checkpoints used: " + ", ".join(f"`{p}`" for p in info["shipped"]))
    lines += [f"{DATE_PREFIX}{info.get('date', '')}", ""]
    lines += _model_lines(info.get("models") or {})

    metric_note = ", ".join(f"{t}: {table.metric[t]}" for t in table.tasks)
    lines += [
        "## Scores (percent, mean ± std over seeds)",
        "",
        f"Primary metric per task: {metric_note}. Classification answers are ranked by mean log-likelihood per "
        "token; generation is greedy. Rows named *baseline:* are the trivial baselines (majority answer of the "
        "training split, uniformly random answer, copying the input or its first sentence).",
        "",
        "| arm | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for arm in table.arms:
        lines.append(f"| {table.labels[arm]} | " + " | ".join(_fmt(*table.cell(arm, t)) for t in tasks) + " |")

    trained = [a for a in table.arms if table.first[a]["finetuned"] == "1"]
    if trained:
        lines += [
            "",
            "## Fine-tuning (means over tasks and seeds)",
            "",
            "Each run trains until the validation score stops improving and keeps its best weights.",
            "",
            "| arm | kind | freezing | learning rate | batch | optimizer steps | best step | train tokens | best validation |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for arm in trained:
            rows = [r for r in results if r["arm"] == arm and r["primary"] == "1"]
            first = rows[0]

            def avg(key: str, rows=rows) -> float:
                return statistics.fmean(float(r[key]) for r in rows if r[key] not in ("", None))

            lines.append(
                f"| {table.labels[arm]} | {first['kind']} | {first['freeze_strategy']} | {first['learning_rate']} | "
                f"{first['batch_size']} | {avg('optimizer_steps'):.0f} | {avg('best_step'):.0f} | "
                f"{avg('train_tokens'):,.0f} | {avg('validation_score'):.1f} |"
            )

    margins = margin_rows(table)
    if margins:
        failing = [m for m in margins if not m[5]]
        lines += [
            "",
            "## Do the fully fine-tuned arms beat the trivial baselines?",
            "",
            f"Required margin over the best baseline: {REQUIRED_MARGIN['classification']:g} points on classification, "
            f"{REQUIRED_MARGIN['generation']:g} on generation. "
            + (f"**{len(failing)} of {len(margins)} arm–task cells fall short.**" if failing else f"All {len(margins)} arm–task cells clear it."),
            "",
            "| arm | " + " | ".join(table.tasks) + " |",
            "|---|" + "---|" * len(table.tasks),
        ]
        by_arm: dict[str, dict[str, tuple]] = defaultdict(dict)
        for arm, task, margin, best_arm, _required, ok in margins:
            by_arm[arm][task] = (margin, best_arm, ok)
        for arm, cells in by_arm.items():
            row = []
            for task in table.tasks:
                if task not in cells:
                    row.append("–")
                    continue
                margin, best_arm, ok = cells[task]
                text = f"{margin:+.1f} vs {table.labels[best_arm].removeprefix(BASELINE_PREFIX)}"
                row.append(text if ok else f"**{text}**")
            lines.append(f"| {table.labels[arm]} | " + " | ".join(row) + " |")

    if any(table.task_kind[t] == "classification" for t in table.tasks):
        lines += _constant_answer_lines(table, real=info.get("variant") == "real")

    if deltas:
        average = [d for d in deltas if d["task"] == AVERAGE]
        per_task: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)
        for d in deltas:
            per_task[d["delta"]][d["task"]] = d
        lines += [
            "",
            "## Findings of the papers (points; mean and paired-bootstrap 95 % CI over seeds and test items)",
            "",
            "A directional finding is *reproduced* when the CI on the average over tasks excludes 0 in the paper's "
            "direction, *opposite* when it excludes 0 the other way, *inconclusive* otherwise. A 'no clear "
            "difference' finding is *reproduced* only when the whole CI lies within ±2 points, *different* when it "
            "excludes 0, *inconclusive* otherwise.",
            "",
            "| finding | paper | average [95 % CI] | verdict | " + " | ".join(table.tasks) + " |",
            "|---|---|---|---|" + "---|" * len(table.tasks),
        ]
        for d in average:
            paper = {"+": "positive", "-": "negative", "0": "no clear difference"}[d["paper"]]
            if d.get("paper_value"):
                paper += f" ({float(d['paper_value']):+g})"
            if d.get("source"):
                paper += f"; {d['source']}"
            cells = []
            for task in table.tasks:
                t = per_task[d["delta"]].get(task)
                cells.append(f"{float(t['mean']):+.1f} [{float(t['ci_low']):+.1f}, {float(t['ci_high']):+.1f}]" if t else "–")
            lines.append(
                f"| {d['delta']} | {paper} | {float(d['mean']):+.1f} [{float(d['ci_low']):+.1f}, {float(d['ci_high']):+.1f}] | "
                f"**{d['verdict']}** | " + " | ".join(cells) + " |"
            )
        if average:
            lines += ["", precision_line(average)]
    lines += ["", "![scores and findings](plot.png)", ""]
    return "\n".join(lines)


def precision_line(average: list[dict[str, str]]) -> str:
    """How many findings' average CIs are within :data:`CI_HALF_WIDTH_TARGET` points on each side, naming the others."""
    half = {d["delta"]: (float(d["ci_high"]) - float(d["ci_low"])) / 2 for d in average}
    wide = [f"{name} ({width:.1f})" for name, width in half.items() if width > CI_HALF_WIDTH_TARGET]
    text = (f"Precision: CI half-widths on the average {min(half.values()):.1f} to {max(half.values()):.1f} points; "
            f"{len(half) - len(wide)} of {len(half)} findings are within the target of ±{CI_HALF_WIDTH_TARGET:g}")
    return text + (f", not {', '.join(wide)}." if wide else ".")


def render_plot(results: list[dict[str, str]], deltas: list[dict[str, str]], info: dict[str, Any], path: Path) -> None:
    """``plot.png``: scores per task (baselines hatched) and each finding's CI on the average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = _Table(results)
    tasks = [*table.tasks, AVERAGE]
    average = [d for d in deltas if d["task"] == AVERAGE]
    ncols = 2 if average else 1
    fig, axes = plt.subplots(1, ncols, figsize=(1.7 * len(tasks) + 2 + (4 if average else 0), 4.0), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1.4][:ncols]})
    ax = axes[0][0]
    width = 0.8 / max(len(table.arms), 1)
    for i, arm in enumerate(table.arms):
        cells = [table.cell(arm, t) if (t == AVERAGE or t in table.scores[arm]) else (math.nan, math.nan) for t in tasks]
        xs = [j + (i - (len(table.arms) - 1) / 2) * width for j in range(len(tasks))]
        style = {"hatch": "//", "alpha": 0.45} if table.is_baseline(arm) else {}
        ax.bar(xs, [c[0] for c in cells], width, yerr=[c[1] for c in cells], capsize=2, label=table.labels[arm], **style)
    ax.set_xticks(range(len(tasks)), tasks, rotation=15)
    ax.set_ylabel("score (%)")
    ax.set_title(f"{info['study']} ({info['variant']}), {len(info['seeds'])} seed(s), {info['split']} split")
    ax.legend(fontsize=7, ncol=min(len(table.arms), 4), loc="lower center", bbox_to_anchor=(0.5, 1.1))
    if average:
        ax2 = axes[0][1]
        ys = list(range(len(average)))[::-1]
        means = [float(d["mean"]) for d in average]
        low = [float(d["mean"]) - float(d["ci_low"]) for d in average]
        high = [float(d["ci_high"]) - float(d["mean"]) for d in average]
        colors = {"reproduced": "tab:green", "opposite": "tab:red", "different": "tab:red"}
        for y, m, lo, hi, d in zip(ys, means, low, high, average):
            ax2.errorbar([m], [y], xerr=[[lo], [hi]], fmt="o", capsize=3, color=colors.get(d["verdict"], "tab:gray"))
        ax2.axvline(0, color="black", lw=0.8)
        ax2.set_yticks(ys, [d["delta"] for d in average], fontsize=7)
        ax2.set_xlabel("points (95 % CI, average over tasks)")
        ax2.set_title("findings", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(output_dir: str | Path) -> dict[str, Path]:
    """Render ``results.md`` and ``plot.png`` of ``output_dir`` from its ``results.csv``, ``deltas.csv`` and ``run.json``."""
    out = Path(output_dir)
    results = read_csv(out / "results.csv")
    deltas = read_csv(out / "deltas.csv") if (out / "deltas.csv").is_file() else []
    info = json.loads((out / "run.json").read_text())
    paths = {"md": out / "results.md", "plot": out / "plot.png"}
    paths["md"].write_text(render_markdown(results, deltas, info))
    render_plot(results, deltas, info, paths["plot"])
    return paths
