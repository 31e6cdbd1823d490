"""Pack the finished stage-cache entries of an unfinished study run, so that a later session can resume it.

    python scripts/pack_resume.py /work/fm --recipe recipes/flan_moe/tiny.yaml \\
        --command "compare recipes/flan_moe/tiny.yaml --seeds 5 --threads 1 --jobs 2 --no-progress"

The run must have been started in a clean worktree of one commit (``git worktree add --detach WORKTREE REV``), with
``PYTHONPATH=WORKTREE python -m hf_moe_tuning.cli COMMAND`` from inside it. This writes, in this checkout,
``results/<study>/resume/stage_cache-<commit>.tar.gz`` (every entry of ``WORKTREE/runs/cache`` that has its ``DONE``
marker) and ``RESUME.md`` (the commit, the command, the library versions the entries were computed with, what is in
the archive and how to resume). The entries are cache entries, not results: the pipeline turns them into results when
the same command, rerun from a worktree of the same commit with the same versions, finishes the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tarfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def finished_entries(cache: Path) -> list[Path]:
    """Stage directories under ``cache`` that hold a ``DONE`` marker, relative to ``cache``, sorted."""
    return sorted(done.parent.relative_to(cache) for done in cache.rglob("DONE"))


def entry_provenance(cache: Path, entries: list[Path]) -> dict:
    """The one provenance record (source hash, versions, platform, threads) shared by ``entries``.

    Raises ``ValueError`` when the entries were computed under different provenances: such a cache cannot be resumed
    from one worktree.
    """
    seen = {json.dumps(json.loads((cache / e / "stage.json").read_text())["provenance"], sort_keys=True) for e in entries}
    if len(seen) != 1:
        raise ValueError(f"{len(seen)} different provenances among the finished entries; pack one run's cache only")
    return json.loads(seen.pop())


def describe_runs(entries: list[Path]) -> str:
    """``"14 fine-tuning runs (by seed: s0 12, s1 2; by arm: moe 3, t5 5, ...)"`` plus the other stages."""
    runs = [e.name.rsplit("-", 3) for e in entries if e.parts[0] == "finetune"]
    by_seed = Counter(seed for _, _, seed, _ in runs)
    by_arm = Counter(arm for arm, _, _, _ in runs)
    text = (f"{len(runs)} fine-tuning runs (by seed: {', '.join(f'{s} {n}' for s, n in sorted(by_seed.items()))}; "
            f"by arm: {', '.join(f'{a} {n}' for a, n in sorted(by_arm.items()))})")
    others = Counter(e.parts[0] for e in entries if e.parts[0] != "finetune")
    if others:
        text += " and " + ", ".join(f"{n} {stage} stage(s)" for stage, n in sorted(others.items()))
    return text


def _git(worktree: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(worktree), *args], check=True, capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("worktree", type=Path, help="the clean worktree the run was started in")
    parser.add_argument("--recipe", required=True, help="the recipe, relative to the worktree")
    parser.add_argument("--command", required=True, help="the hf-moe-tuning command, as run (without the program)")
    parser.add_argument("--started", default="", help="when the run was started (for RESUME.md), e.g. '2026-12-03 06:30 UTC'")
    args = parser.parse_args(argv)

    worktree = args.worktree.resolve()
    if _git(worktree, "status", "--porcelain", "--untracked-files=no"):
        raise SystemExit(f"{worktree} has uncommitted changes: its runs are not those of a commit")
    commit = _git(worktree, "rev-parse", "--short=7", "HEAD")
    study = yaml.safe_load((worktree / args.recipe).read_text())["study"]
    cache = worktree / "runs" / "cache"
    entries = finished_entries(cache)
    if not entries:
        raise SystemExit(f"no finished stage under {cache}")
    prov = entry_provenance(cache, entries)
    summary = describe_runs(entries)

    out = REPO / "results" / study / "resume"
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"stage_cache-{commit}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for entry in entries:
            tar.add(cache / entry, arcname=f"./{entry.as_posix()}")
    versions = dict(sorted({**prov["versions"], "python": prov["python"]}.items()))
    # pins without local version labels ("2.13.0+cpu" -> "2.13.0"): pip resolves those from the index or the disk
    pins = " ".join(f'"{name}=={v.split("+")[0]}"' for name, v in versions.items() if name != "python" and v != "absent")
    packed = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    run = f"cd {worktree} && PYTHONPATH={worktree} python -m hf_moe_tuning.cli {args.command}"
    started = f", started {args.started}" if args.started else ""
    (out / "RESUME.md").write_text(
        f"# Resuming the {study} run\n\n"
        f"`{archive.name}` holds the finished stage-cache entries of an unfinished run of\n\n    {run}\n\n"
        f"in a worktree of commit `{commit}` (`git worktree add --detach {worktree} {commit}`){started}, packed {packed} "
        f"by `python scripts/pack_resume.py`: {summary}.\n"
        f"These are cache entries, not results: the pipeline turns them into results when the run is finished. Stage keys "
        f"cover the package source (hash `{prov['source']}`), the library versions, the platform ({prov['platform']}, "
        f"{prov['device']}) and the thread count ({prov['threads']}), so an entry is reused only from a worktree of "
        f"`{commit}` with these versions: {', '.join(f'{k} {v}' for k, v in versions.items())}.\n\n"
        f"To resume (the finished runs come from the cache, the rest are trained):\n\n"
        f"    git worktree add --detach {worktree} {commit}\n"
        f"    mkdir -p {cache} && tar xzf results/{study}/resume/{archive.name} -C {cache}\n"
        f"    pip install {pins}\n"
        f"    {run}\n\n"
        f"Then copy `{worktree}/results/{study}/` over `results/{study}/`, re-render `results.md` with the current "
        f"`hf_moe_tuning.study.report.render`, delete this folder and commit with the command above.\n",
        encoding="utf-8",
    )
    print(f"packed {len(entries)} entries ({summary}) into {archive.relative_to(REPO)} "
          f"({archive.stat().st_size / 1e3:,.0f} kB) and wrote RESUME.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
