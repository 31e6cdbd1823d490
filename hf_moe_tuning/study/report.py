"""Aggregate fine-tuning records into ``results.csv``, ``results.md`` and ``plot.png``.

Scores are the task's primary metric in percent (accuracy; token F1 for the generation task). The
Markdown report gives mean ± sample std over seeds per arm and task, the average over tasks, and the
deltas the papers talk about, each next to the paper's direction with a plain "holds" / "does not
hold" verdict on the task average.
"""

from __future__ import annotations

import csv
import math
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DIRECTIONS, StudyConfig, evaluate_delta

AVERAGE = "average"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(mean: float, std: float, signed: bool = False) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:+.1f} ± {std:.1f}" if signed else f"{mean:.1f} ± {std:.1f}"


@dataclass
class StudyResult:
    """Records of a study run plus its metadata (versions, seeds, wall time, command)."""

    config: StudyConfig
    records: list[dict[str, Any]]
    seeds: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def arms(self) -> list[str]:
        return list(self.config.arms)

    @property
    def tasks(self) -> list[str]:
        return list(self.config.data["tasks"])

    def scores(self) -> dict[str, dict[str, dict[int, float]]]:
        """``scores[arm][task][seed]`` (percent), with ``task == "average"`` over tasks."""
        out: dict[str, dict[str, dict[int, float]]] = {a: {t: {} for t in [*self.tasks, AVERAGE]} for a in self.arms}
        for r in self.records:
            out[r["arm"]][r["task"]][r["seed"]] = float(r["score"])
        for arm in self.arms:
            for seed in self.seeds:
                per_task = [out[arm][t].get(seed) for t in self.tasks]
                if all(v is not None for v in per_task):
                    out[arm][AVERAGE][seed] = statistics.fmean(per_task)
        return out

    def arm_table(self) -> dict[str, dict[str, tuple[float, float]]]:
        scores = self.scores()
        return {a: {t: mean_std(list(scores[a][t].values())) for t in scores[a]} for a in self.arms}

    def delta_table(self) -> list[dict[str, Any]]:
        """Per delta: ``{"name", "expr", "paper", "values": {task: (mean, std)}, "holds": bool | None}``."""
        scores = self.scores()
        rows = []
        for delta in self.config.deltas:
            values: dict[str, tuple[float, float]] = {}
            for task in [*self.tasks, AVERAGE]:
                per_seed = []
                for seed in self.seeds:
                    arm_scores = {a: scores[a][task].get(seed) for a in self.arms}
                    if all(v is not None for v in arm_scores.values()):
                        per_seed.append(evaluate_delta(delta.expr, arm_scores))
                values[task] = mean_std(per_seed)
            rows.append({"delta": delta, "values": values, "holds": direction_holds(delta.paper, *values[AVERAGE])})
        return rows


def direction_holds(paper: str, mean: float, std: float) -> bool | None:
    """Does a measured delta agree with the paper's direction?

    ``+``/``-``: the mean has that sign. ``0`` (no clear difference in the paper): ``|mean|`` is at most
    ``max(1 point, std over seeds)``.
    """
    if math.isnan(mean):
        return None
    if paper == "+":
        return mean > 0
    if paper == "-":
        return mean < 0
    return abs(mean) <= max(1.0, std)


def verdict(paper: str, mean: float, std: float) -> str:
    """Plain-words verdict: does the measured delta follow the paper's direction, beyond the noise?

    The noise threshold is ``max(1 point, std over seeds)``; a delta below it is "within noise".
    """
    if math.isnan(mean):
        return "–"
    small = abs(mean) <= max(1.0, std)
    if paper == "0":
        return "yes" if small else "**no**"
    same_sign = direction_holds(paper, mean, std)
    if small:
        return "within noise"
    return "yes" if same_sign else "**no** (opposite)"


# ---------------------------------------------------------------------------------------------- writers
CSV_FIELDS = (
    "study", "arm", "model", "instruct", "kind", "task", "seed", "primary_metric", "score",
    "accuracy", "exact_match", "token_f1", "train_loss", "learning_rate", "batch_size",
    "freeze_strategy", "train_seconds", "eval_seconds", "cached",
)


def write_csv(result: StudyResult, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in result.records:
            arm = result.config.arms[r["arm"]]
            row = {k: r.get(k) for k in CSV_FIELDS}
            row.update(study=result.config.study, model=result.config.models[arm.model].init, instruct=arm.instruct)
            for name, value in r["metrics"].items():
                if name in CSV_FIELDS:
                    row[name] = round(value, 6)
            for key in ("score", "train_loss", "train_seconds", "eval_seconds"):
                if isinstance(row.get(key), float):
                    row[key] = round(row[key], 4)
            writer.writerow(row)


def _label(result: StudyResult, arm: str) -> str:
    return result.config.arms[arm].label or arm


def render_markdown(result: StudyResult) -> str:
    cfg, meta = result.config, result.meta
    tasks = [*result.tasks, AVERAGE]
    lines = [f"# {cfg.study} ({cfg.variant})", ""]
    if cfg.description:
        lines += [cfg.description.strip(), ""]
    lines += [
        f"- command: `{meta.get('command', '')}`",
        f"- recipe: `{cfg.path}`",
        f"- seeds: {', '.join(map(str, result.seeds))} (fine-tuning seeds; pretraining and instruction tuning use their recipe seeds)",
        f"- wall time: {meta.get('wall_seconds', 0):.0f} s total ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in meta.get("stage_seconds", {}).items())
        + f"); process CPU time {meta.get('cpu_seconds', 0):.0f} s; "
        f"{meta.get('cached_runs', 0)} of {len(result.records)} fine-tuning runs (and stages reported as 0 s) came from the cache",
        "- stage times as recorded when each stage was computed (cached ones included): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in meta.get("recorded_stage_seconds", {}).items()),
        f"- device: {meta.get('device', '')}, torch threads: {meta.get('threads', '')}, "
        f"1-min load average at the end: {meta.get('load_average') or 0:.1f}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta.get('versions', {}).items())}",
        f"- date: {meta.get('date', '')}",
        "",
        "## Scores (mean ± std over seeds, percent)",
        "",
        "Primary metric per task: " + ", ".join(
            f"{t} {m}" for t, m in dict.fromkeys((r["task"], r["primary_metric"]) for r in result.records)
        ) + ". Classification answers are picked by candidate log-likelihood; generation is greedy.",
        "",
        "| arm | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    table = result.arm_table()
    for arm in result.arms:
        lines.append(f"| {_label(result, arm)} | " + " | ".join(fmt(*table[arm][t]) for t in tasks) + " |")
    deltas = result.delta_table()
    if deltas:
        lines += [
            "",
            "## Deltas the papers talk about (points, mean ± std over seeds)",
            "",
            "Verdict on the average: *yes* = the paper's direction, by more than the noise threshold "
            "max(1 point, std over seeds) (with one seed there is no std, so only the 1-point threshold applies); "
            "*within noise* = smaller than that threshold; *no* = the opposite direction (or, for a "
            "'no clear difference' finding, a difference beyond the threshold).",
            "",
            "| delta | paper | " + " | ".join(tasks) + " | direction holds (average)? |",
            "|---|---|" + "---|" * len(tasks) + "---|",
        ]
        for row in deltas:
            d = row["delta"]
            paper = DIRECTIONS[d.paper] + (f" ({d.paper_value:+g})" if d.paper_value is not None else "")
            if d.source:
                paper += f", {d.source}"
            word = verdict(d.paper, *row["values"][AVERAGE])
            lines.append(
                f"| {d.name} | {paper} | " + " | ".join(fmt(*row["values"][t], signed=True) for t in tasks) + f" | {word} |"
            )
    lines += ["", "![scores](plot.png)", ""]
    return "\n".join(lines)


def write_plot(result: StudyResult, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    tasks = [*result.tasks, AVERAGE]
    table = result.arm_table()
    width = 0.8 / max(len(result.arms), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 3.6))
    for i, arm in enumerate(result.arms):
        means = [table[arm][t][0] for t in tasks]
        stds = [table[arm][t][1] for t in tasks]
        xs = [j + (i - (len(result.arms) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=_label(result, arm))
    ax.set_xticks(range(len(tasks)), tasks, rotation=15)
    ax.set_ylabel("score (%)")
    ax.set_title(f"{result.config.study} ({result.config.variant}), {len(result.seeds)} seed(s)")
    ax.legend(fontsize=8, ncol=min(len(result.arms), 5), loc="lower center", bbox_to_anchor=(0.5, 1.08))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(result: StudyResult, output_dir: str | Path) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and ``plot.png`` into ``output_dir``; returns their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "md": out / "results.md", "plot": out / "plot.png"}
    write_csv(result, paths["csv"])
    paths["md"].write_text(render_markdown(result))
    write_plot(result, paths["plot"])
    return paths


def environment_versions() -> dict[str, str]:
    """Versions of Python and the libraries that determine the numbers."""
    import importlib.metadata as md  # noqa: PLC0415

    versions = {"python": platform.python_version()}
    for dist in ("hf-moe-tuning", "torch", "transformers", "accelerate", "datasets", "evaluate"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions
