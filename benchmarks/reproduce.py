"""Rerun every command of the README's benchmark table and print their figures side by side.

    python benchmarks/reproduce.py                     # realistic size, CPU, two commands at a time (about 50 min, 2 cores)
    python benchmarks/reproduce.py --device cuda --jobs 1 --out gpu_figures     # the GPU figures, one command at a time
    python benchmarks/reproduce.py --size gpu --device cuda --jobs 1            # sized for a GPU to compute, not wait
    python benchmarks/reproduce.py --size tiny --only expert_subset             # a few seconds
    python benchmarks/reproduce.py --dry-run           # the commands it would run, with their names

Each command runs as its own process (``python benchmarks/<script> --size S --device D ...``) with its full output in
``OUT/<name>.txt``; ``--jobs`` of them run at a time (the README's figures were taken two at a time on a 2-core
machine; on one GPU run one at a time, or the commands share the GPU). When all have finished, the figure line each
benchmark prints last (``<figure>, median [range] over repeats: mixtral ...; switch ...``) is collected into one
Markdown table, printed and written to ``OUT/summary.md``, with every command's wall time. Compare it with the
README's table, whose cells list the earlier runs of the same commands (``tests/test_benchmarks.py`` checks that
the two name the same commands). The exit status is 1 when a command failed. Stopped early (a time limit's SIGTERM,
Ctrl-C), it stops the benchmarks still running and writes the summary all the same: the finished commands' figures,
the stopped and the unstarted commands named as such (a lease of GPU time ends mid-run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Command:
    """One row of the README's benchmark table: a benchmark script and its options besides size and device."""

    name: str
    script: str
    args: tuple[str, ...]
    what: str

    def options(self, size: str, device: str) -> list[str]:
        return ["--size", size, *self.args, *(["--device", device] if device != "cpu" else [])]

    def argv(self, size: str, device: str) -> list[str]:
        return [sys.executable, str(HERE / self.script), *self.options(size, device)]

    def shown(self, size: str, device: str) -> str:
        """The command as the README writes it."""
        return " ".join(["python", f"benchmarks/{self.script}", *self.options(size, device)])


#: the README's table, longest first so that ``--jobs 2`` finishes soonest
COMMANDS: tuple[Command, ...] = (
    Command("monitoring_training", "monitoring_overhead.py", (), "full monitoring / plain step, training"),
    Command("monitoring_same_weights", "monitoring_overhead.py", ("--lr", "0"), "full monitoring / plain step, same weights"),
    Command("monitoring_switch_decompose", "monitoring_overhead.py", ("--model", "switch", "--decompose"),
            "the Switch's training monitoring cost, split into routing change and computation"),
    Command("monitoring_switch_decompose_same_weights", "monitoring_overhead.py",
            ("--model", "switch", "--decompose", "--lr", "0"), "the same split with every arm on the initial weights"),
    Command("freezing_training", "freezing_memory.py", (), "non_moe / all: memory and step time, training"),
    Command("freezing_same_weights", "freezing_memory.py", ("--lr", "0"), "non_moe / all: memory and step time, same weights"),
    Command("router_loss_training", "router_loss_overhead.py", (), "RouterLossCallback / built-in router loss, training"),
    Command("router_loss_same_weights", "router_loss_overhead.py", ("--lr", "0"),
            "RouterLossCallback / built-in router loss, same weights"),
    Command("expert_subset", "expert_subset_state.py", (), "AdamW state of 1 of 8 experts / full fine-tuning"),
)
BY_NAME = {command.name: command for command in COMMANDS}
#: the summary line every benchmark prints second to last (see ``_harness.run`` and ``freezing_memory.py``)
SUMMARY = re.compile(r"^(?P<figure>.+?), median \[range\] over [^:]*: (?P<models>.+)$")


def figures_of(output: str) -> tuple[str, dict[str, str]] | None:
    """What a benchmark's last summary line reports: the figure's name and ``{model: figure text}``.

    ``None`` when the output has no summary line (the benchmark failed before reporting).
    """
    lines = [m for m in map(SUMMARY.match, output.splitlines()) if m]
    if not lines:
        return None
    per_model = {}
    for part in lines[-1]["models"].split("; "):
        model, _, figure = part.partition(" ")
        per_model[model.rstrip(":")] = figure.strip()
    return lines[-1]["figure"], per_model


def run_all(commands: list[Command], size: str, device: str, jobs: int, out: Path,
            done: dict[str, tuple[int | None, float]] | None = None) -> dict[str, tuple[int | None, float]]:
    """Run ``commands``, ``jobs`` at a time, each into ``out/<name>.txt``; ``{name: (exit status, wall seconds)}``.

    ``done`` (filled in place, also returned) holds what finished even when the run is interrupted; a command
    stopped by the interruption has the status ``None``, one that never started no entry.
    """
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    pending, running = list(commands), {}
    done = {} if done is None else done
    try:
        with tqdm(total=len(commands), desc="benchmark commands", unit="command") as bar:
            while pending or running:
                while pending and len(running) < jobs:
                    command = pending.pop(0)
                    log = open(out / f"{command.name}.txt", "w")  # closed when its process has ended
                    # a session of its own: stopping it below reaches the memory workers a benchmark spawns, too
                    process = subprocess.Popen(command.argv(size, device), stdout=log, stderr=subprocess.STDOUT,
                                               cwd=HERE.parent, start_new_session=os.name == "posix")
                    running[command.name] = (process, log, time.monotonic())
                    bar.set_postfix_str("running: " + ", ".join(running))
                time.sleep(0.5)
                for name, (process, log, start) in list(running.items()):
                    if process.poll() is not None:
                        log.close()
                        done[name] = (process.returncode, time.monotonic() - start)
                        del running[name]
                        bar.set_postfix_str("running: " + ", ".join(running), refresh=False)
                        bar.update(1)
    finally:  # interrupted (Ctrl-C, SIGTERM): stop the benchmarks still running rather than leave them behind
        for name, (process, log, start) in running.items():
            if os.name == "posix":
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
            else:
                process.terminate()
            process.wait()
            log.close()
            done[name] = (None, time.monotonic() - start)
    return done


def summary(commands: list[Command], results: dict[str, tuple[int | None, float]], size: str, device: str,
            out: Path) -> str:
    """The Markdown table of every command's figures (or why it has none: failed, stopped, not started)."""
    rows = ["| command | figure | mixtral | switch | wall time |", "|---|---|---|---|---|"]
    for command in commands:
        if command.name not in results:
            rows.append(f"| `{command.shown(size, device)}` | not started (the run was interrupted) | | | |")
            continue
        status, seconds = results[command.name]
        text = (out / f"{command.name}.txt").read_text()
        found = figures_of(text) if status == 0 else None
        if status is None:
            cells = [f"stopped by the interruption: see `{out / (command.name + '.txt')}`", "", ""]
        elif found is None:
            cells = [f"failed (exit status {status}): see `{out / (command.name + '.txt')}`", "", ""]
        else:
            figure, per_model = found
            cells = [figure, per_model.get("mixtral", "–"), per_model.get("switch", "–")]
        rows.append(f"| `{command.shown(size, device)}` | " + " | ".join(cells) + f" | {seconds / 60:.1f} min |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "realistic", "gpu"], default="realistic",
                        help="the benchmarks' model size (default realistic: the README's figures; gpu needs "
                             "--device cuda)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="passed to every benchmark")
    parser.add_argument("--jobs", type=int, default=2, help="commands run at a time (default 2; on one GPU use 1)")
    parser.add_argument("--out", type=Path, default=Path("benchmark_outputs"),
                        help="folder for each command's output and summary.md (default ./benchmark_outputs)")
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), metavar="NAME",
                        help="run only these commands: " + ", ".join(BY_NAME))
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    opts = parser.parse_args(argv)
    if opts.jobs < 1:
        parser.error(f"--jobs {opts.jobs}: at least one command must run at a time")
    commands = [BY_NAME[name] for name in opts.only] if opts.only else list(COMMANDS)
    if opts.dry_run:
        for command in commands:
            print(f"{command.shown(opts.size, opts.device)}  # {command.name}: {command.what}")
        return 0
    if opts.size == "gpu" and opts.device != "cuda":
        parser.error("--size gpu is sized for a GPU (a CPU step takes minutes): add --device cuda")
    if opts.device == "cuda":  # fail before starting anything, as each benchmark would
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so that run_all stops its benchmarks
    start, results, interrupted = time.monotonic(), {}, True
    try:
        run_all(commands, opts.size, opts.device, opts.jobs, opts.out, done=results)
        interrupted = False
    finally:  # interrupted too (a time limit's SIGTERM, Ctrl-C): what finished still gets its summary
        table = summary(commands, results, opts.size, opts.device, opts.out)
        header = (f"benchmark commands at size={opts.size} device={opts.device}, {opts.jobs} at a time, "
                  f"{(time.monotonic() - start) / 60:.1f} min on {os.cpu_count()} logical CPUs"
                  + (", interrupted" if interrupted else ""))
        (opts.out / "summary.md").write_text(header + "\n\n" + table + "\n")
        print(header, table, sep="\n\n")
    return int(any(status != 0 for status, _ in results.values()))


if __name__ == "__main__":
    sys.exit(main())
