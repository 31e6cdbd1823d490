"""The benchmarks run end to end at ``--size tiny`` and end with their figures; the harness interleaves as documented.

These are smoke runs, not measurements: a tiny run's ratios are only checked to be positive numbers (the
expert-subset ratio, which is not a timing, against the trainable share). The README's figures come from the
``--size realistic`` commands it lists.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r"(\d+\.\d+) \[(\d+\.\d+), (\d+\.\d+)\]")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def _benchmark_module(name: str):
    """Import ``benchmarks/<name>.py`` (the scripts import ``_harness`` as a sibling, so the folder goes on the path)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _figures(line: str) -> list[tuple[float, float, float]]:
    return [tuple(map(float, m)) for m in FIGURE.findall(line)]


@pytest.mark.parametrize(
    "script, args",
    [
        ("monitoring_overhead.py", ["--model", "mixtral", "--logging-steps", "2", "--drift-every-steps", "4"]),
        ("freezing_memory.py", ["--model", "switch", "--steps", "2", "--memory-steps", "2", "--memory-repeats", "1"]),
    ],
)
def test_timing_benchmarks_run_at_tiny_size_and_print_median_range_and_noise_floor(script, args):
    done = _run(script, "--size", "tiny", "--repeats", "3", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith(script.removesuffix(".py")) and "size=tiny" in lines[0] and "repeats=3" in lines[0]
    assert lines[1] == f"  package: {ROOT}"  # the checkout's own package is the one measured
    assert all(float(x) > 0 for x in lines[-1].split())
    noise = next(line for line in lines if "noise floor" in line)
    (median, low, high), = _figures(noise)
    assert 0 < low <= median <= high
    summary = _figures(lines[-2])
    assert summary and all(0 < low <= median <= high for median, low, high in summary), lines[-2]
    balance = _routing_balance(done.stdout)
    assert len(balance) == 3 and all(cv >= 0 for cv in balance.values())  # every arm's routing is shown
    if script == "monitoring_overhead.py":  # the drift probe's part of the monitored arm's time
        probe = next(line for line in lines if line.startswith("  drift probe: "))
        calls, share = re.match(r"  drift probe: (\d+) forward\(s\) of 8 sequences .*, (\d+\.\d)% of", probe).groups()
        assert int(calls) == 3 and 0 < float(share) < 100  # steps 4, 8 and 12 of 2 warmup + 3 x 4 timed steps
        ops = next(line for line in lines if line.startswith("  aten ops in one non-logging step"))
        plain, monitored, ratio = re.search(r"plain (\d+), monitored (\d+) \((\d+\.\d+)x\)", ops).groups()
        assert int(monitored) > int(plain) > 0 and float(ratio) == pytest.approx(int(monitored) / int(plain), abs=1e-3)
    if script == "freezing_memory.py":  # where the step time goes: forward, backward, optimizer of both arms
        assert any(line.startswith("  phases (CPU ms per step): all ") and "non_moe/all: forward" in line
                   for line in lines)
        ops = next(line for line in lines if line.startswith("  aten ops in one step"))
        every, frozen = map(int, re.search(r"all (\d+), non_moe (\d+) ", ops).groups())
        assert 0 < frozen < every  # no weight gradients and no AdamW update for the frozen experts


def _routing_balance(stdout: str) -> dict[str, float]:
    line = next(line for line in stdout.splitlines() if "routing after the timed steps" in line)
    return {arm: float(cv) for arm, cv in re.findall(r"(\w+) (\d+\.\d+)", line.split(":", 1)[1])}


def test_lr_zero_keeps_every_arm_on_the_same_weights_and_routing():
    """``--lr 0``: the router loss cannot move the callback arm's routing away from the built-in arm's, so the
    ratio is the cost of the computation alone; the header says which learning rate ran."""
    done = _run("router_loss_overhead.py", "--size", "tiny", "--repeats", "3", "--model", "switch",
                "--logging-steps", "3", "--lr", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert " lr=0 " in done.stdout.splitlines()[0]
    balance = _routing_balance(done.stdout)
    assert set(balance) == {"builtin", "callback", "control"}
    assert len(set(balance.values())) == 1, balance
    with pytest.raises(SystemExit, match="the learning rate must be >= 0"):  # in-process: a script checks first
        _benchmark_module("router_loss_overhead").main(["--size", "tiny", "--lr", "-1"])


def test_monitoring_decompose_adds_a_router_loss_arm_that_trains_like_the_monitored_one():
    """``--decompose``: the ``router_loss`` arm has the monitored arm's objective, so after training its routing is
    the monitored arm's (expert-load logging does not change training); the ``plain_on_router_loss`` arm steps on
    the router_loss arm's weights, so it routes as that arm does; the extra ratios are printed."""
    done = _run("monitoring_overhead.py", "--size", "tiny", "--repeats", "3", "--model", "switch",
                "--logging-steps", "2", "--drift-every-steps", "4", "--decompose")
    assert done.returncode == 0, done.stderr[-3000:]
    balance = _routing_balance(done.stdout)
    assert set(balance) == {"plain", "monitored", "control", "router_loss", "plain_on_router_loss"}
    assert balance["router_loss"] == balance["monitored"] and balance["control"] == balance["plain"], balance
    assert balance["plain_on_router_loss"] == balance["router_loss"], balance
    for name in ("router_loss/plain", "monitored/router_loss", "of which the routing change, plain_on_router_loss/plain",
                 "and computing the router loss, router_loss/plain_on_router_loss",
                 "monitored/plain_on_router_loss (all the monitoring computes, at the monitored arm's routing)"):
        line = next(line for line in done.stdout.splitlines() if line.strip().startswith(name + ":"))
        (median, low, high), = _figures(line)
        assert 0 < low <= median <= high


def test_processes_pool_the_repeats_of_fresh_processes_and_show_each_process_median():
    """``--processes 2 --repeats 2``: the measurement runs twice in fresh processes (their output echoed), each
    process's median is printed, and the summary figure is the median [range] over all 2 x 2 repeats."""
    done = _run("router_loss_overhead.py", "--size", "tiny", "--repeats", "2", "--model", "switch",
                "--logging-steps", "3", "--processes", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert " processes=2 " in lines[0]
    assert [line for line in lines if line.startswith("process ")] == ["process 1/2:", "process 2/2:"]
    per_process = [_figures(line)[0] for line in lines if line.startswith("  |   callback/builtin:")]
    assert len(per_process) == 2
    medians = next(line for line in lines if "median of each process" in line)
    assert [float(x) for x in medians.split(":")[-1].split(",")] == [round(m, 3) for m, _, _ in per_process]
    assert "over 4 repeats in 2 processes" in lines[-2]
    (median, low, high), = _figures(lines[-2])
    assert low == min(lo for _, lo, _ in per_process) and high == max(hi for _, _, hi in per_process)
    assert low <= median <= high
    assert float(lines[-1]) == pytest.approx(median, abs=5e-4)  # 4 decimals against the 3 of the summary
    with pytest.raises(SystemExit, match="at least one process is needed"):
        _benchmark_module("router_loss_overhead").main(["--size", "tiny", "--processes", "0"])


def test_expert_subset_state_ratio_equals_the_trainable_share_once_every_expert_got_tokens(tmp_path):
    # run through reproduce.py, which reruns the README table's commands and collects their figures
    done = _run("reproduce.py", "--size", "tiny", "--only", "expert_subset", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    output = (tmp_path / "expert_subset.txt").read_text()
    summary = (tmp_path / "summary.md").read_text()
    assert summary in done.stdout + "\n"
    row = next(line for line in summary.splitlines() if "expert_subset_state.py" in line)
    assert row.startswith("| `python benchmarks/expert_subset_state.py --size tiny` | subset/full optimizer state | ")
    reproduce = _benchmark_module("reproduce")
    assert reproduce.figures_of(output)[1] == dict(zip(["mixtral", "switch"], re.findall(r"\d\.\d+ \[[^]]+\]", row)))
    lines = output.strip().splitlines()
    results = [line for line in lines if "optimizer state subset/full" in line]
    assert len(results) == 2  # mixtral (fused experts) and switch (per-expert modules)
    for line in results:
        (state, _, _), (trainable, _, _) = _figures(line)
        assert 0 < state < 0.2
        assert state == pytest.approx(trainable, abs=2e-3)  # at the physical limit, not below it
    assert all("every expert reached after" in line for line in lines if line.startswith("  subset:"))


def test_reproduce_runs_the_commands_of_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Benchmarks"):readme.index("## Recipes and studies")]
    listed = set(re.findall(r"`(python benchmarks/(?!reproduce)[^`]*)`", section))
    reproduce = _benchmark_module("reproduce")
    on_cpu = {command for command in listed if "--device cuda" not in command}
    assert on_cpu == {command.shown("realistic", "cpu") for command in reproduce.COMMANDS}
    # the GPU figures' commands: a table command at the realistic or gpu size, on CUDA, for both models or one
    on_gpu = {command.shown(size, "cuda") + model for command in reproduce.COMMANDS for size in ("realistic", "gpu")
              for model in ("", " --model mixtral", " --model switch")}
    assert listed - on_cpu <= on_gpu
    dry = _run("reproduce.py", "--dry-run", "--device", "cuda", "--only", "expert_subset", "freezing_training")
    assert dry.returncode == 0 and [line.split("  # ")[0] for line in dry.stdout.splitlines()] == [
        "python benchmarks/expert_subset_state.py --size realistic --device cuda",
        "python benchmarks/freezing_memory.py --size realistic --device cuda"]
    assert reproduce.figures_of("no figure here\n") is None
    assert reproduce.figures_of("x\nnon_moe/all, median [range] over 6 repeats in 2 processes: mixtral: net peak 0.603 "
                                "[0.602, 0.603], step time 0.739 [0.731, 0.774]; switch: net peak 0.594 [0.594, 0.595]\n0.59\n") == (
        "non_moe/all", {"mixtral": "net peak 0.603 [0.602, 0.603], step time 0.739 [0.731, 0.774]",
                        "switch": "net peak 0.594 [0.594, 0.595]"})


def test_reproduce_reports_a_command_that_failed(tmp_path):
    reproduce = _benchmark_module("reproduce")
    commands = [reproduce.Command("missing", "no_such_benchmark.py", (), "a script that is not there"),
                reproduce.BY_NAME["expert_subset"]]
    results = reproduce.run_all(commands[:1], "tiny", "cpu", 1, tmp_path)
    assert results["missing"][0] != 0
    results["expert_subset"] = (0, 1.0)
    (tmp_path / "expert_subset.txt").write_text("subset/full optimizer state, median [range] over repeats: "
                                                "mixtral 0.105 [0.105, 0.105]; switch 0.092 [0.092, 0.092]\n0.105\n")
    rows = reproduce.summary(commands, results, "tiny", "cpu", tmp_path).splitlines()[2:]
    assert rows[0].startswith(f"| `python benchmarks/no_such_benchmark.py --size tiny` | failed (exit status "
                              f"{results['missing'][0]}): see `{tmp_path / 'missing.txt'}`")
    assert "can't open file" in (tmp_path / "missing.txt").read_text()
    assert rows[1] == ("| `python benchmarks/expert_subset_state.py --size tiny` | subset/full optimizer state | "
                       "0.105 [0.105, 0.105] | 0.092 [0.092, 0.092] | 0.0 min |")


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux ``/proc``)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
def test_reproduce_stops_its_benchmarks_when_it_is_terminated(tmp_path):
    parent = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--size", "tiny", "--only",
                               "router_loss_training", "router_loss_same_weights", "--out", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 60
    while len(children := _children(parent.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(children) == 2, "both benchmarks should run at once (--jobs 2)"
    parent.terminate()
    assert parent.wait(timeout=60) == 128 + 15
    assert [pid for pid in children if Path(f"/proc/{pid}").exists()] == []
    summary = (tmp_path / "summary.md").read_text()  # written all the same, naming what was stopped
    assert summary.splitlines()[0].endswith(", interrupted")
    assert summary.count("stopped by the interruption") == 2


def test_reproduce_summary_names_finished_stopped_and_unstarted_commands(tmp_path):
    reproduce = _benchmark_module("reproduce")
    first, second, third = reproduce.COMMANDS[:3]
    for command in (first, second):
        (tmp_path / f"{command.name}.txt").write_text("x\nmonitored/plain step time, median [range] over repeats: "
                                                       "mixtral 1.010 [1.000, 1.020]\n1.01\n")
    table = reproduce.summary([first, second, third], {first.name: (0, 60.0), second.name: (None, 30.0)},
                              "tiny", "cpu", tmp_path).splitlines()
    assert "| 1.010 [1.000, 1.020] | – | 1.0 min |" in table[2]
    assert "stopped by the interruption" in table[3] and "1.010" not in table[3]
    assert table[4] == f"| `{third.shown('tiny', 'cpu')}` | not started (the run was interrupted) | | | |"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is absent")
@pytest.mark.parametrize("script", ["monitoring_overhead", "router_loss_overhead", "freezing_memory",
                                    "expert_subset_state"])
def test_cuda_variant_fails_clearly_without_a_gpu(script):
    # in-process (each script's main checks its options before it builds anything); reproduce.py below as a process
    with pytest.raises(SystemExit, match="CUDA is not available"):
        _benchmark_module(script).main(["--size", "tiny", "--device", "cuda"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is absent")
def test_reproduce_cuda_fails_clearly_without_a_gpu():
    done = _run("reproduce.py", "--size", "tiny", "--device", "cuda")
    assert done.returncode != 0
    assert "CUDA is not available" in done.stderr


def test_gpu_size_refuses_to_run_on_cpu():
    h = _benchmark_module("_harness")
    parser = argparse.ArgumentParser()
    h.add_common_args(parser)
    with pytest.raises(SystemExit, match=r"--size gpu is sized for a GPU .*add --device cuda"):
        h.setup(parser.parse_args(["--size", "gpu"]))  # what every benchmark script calls first
    done = _run("reproduce.py", "--size", "gpu")
    assert done.returncode != 0 and "--size gpu is sized for a GPU" in done.stderr and "--device cuda" in done.stderr


@pytest.mark.parametrize("size", ["realistic", "gpu"])
@pytest.mark.parametrize("model", ["mixtral", "switch"])
def test_realistic_and_gpu_sizes_keep_routed_experts_at_80_percent(size, model):
    h = _benchmark_module("_harness")
    with torch.device("meta"):  # shapes only: the gpu size holds 0.4-0.7 B parameters
        built = h.build(model, size, device="meta")
    assert h.expert_share(built) >= h.MIN_EXPERT_SHARE[size] == 0.80
    assert h.BATCH[size]["batch"] >= 4 and h.BATCH[size]["seq"] >= 256
    hidden = built.config.hidden_size if model == "mixtral" else built.config.d_model
    assert hidden >= (1024 if size == "gpu" else 256)


def test_count_ops_counts_every_dispatched_aten_operator_forward_and_backward():
    h = _benchmark_module("_harness")
    x = torch.ones(3, requires_grad=True)
    assert h.count_ops(lambda: (x * 2).sum()) == 2  # mul, sum
    assert h.count_ops(lambda: None) == 0
    assert h.count_ops(lambda: (x * 2).sum().backward()) > 2  # the backward's operators are counted too


def test_harness_interleaves_rotating_the_first_arm_and_reports_median_and_range():
    h = _benchmark_module("_harness")
    calls = []

    def arm(name, work):
        def step(batch):
            calls.append((name, batch))
            end = time.process_time() + work
            while time.process_time() < end:
                pass
        return step

    def refresh_b():
        calls.append(("refresh b", None))
        end = time.process_time() + 0.02  # untimed: must not show in b's time
        while time.process_time() < end:
            pass

    times = h.interleave({"a": arm("a", 0.002), "b": arm("b", 0.004)}, batches=[0, 1, 2], repeats=3, warmup=1,
                         refresh={"b": refresh_b})
    assert calls[:3] == [("a", 0), ("b", 0), ("refresh b", None)]  # warm-up
    refreshed = [calls[i - 1] for i, call in enumerate(calls) if call == ("refresh b", None)]
    assert len(refreshed) == 1 + 3 * 3 and all(name == "b" for name, _ in refreshed)  # right after every b step
    timed = [call for call in calls[3:] if call[0] != "refresh b"]
    assert len(timed) == 3 * 3 * 2
    assert [name for name, _ in timed[:6]] == ["a", "b", "b", "a", "a", "b"]  # the first arm rotates
    assert [batch for _, batch in timed[:6]] == [0, 0, 1, 1, 2, 2]  # both arms see every batch in turn
    assert len(times["a"]) == len(times["b"]) == 3
    figure = h.ratio(times, "b", "a")
    assert figure.low <= figure.median <= figure.high and 1.3 < figure.median < 3.0
    assert str(h.Figure.of([1.0, 3.0, 2.0])) == "2.000 [1.000, 3.000]"
    for repeats, processes in [(2, 1), (1, 2)]:  # 3 repeats in all are needed, over the processes
        opts = type("Opts", (), {"repeats": repeats, "processes": processes, "pool_child": False, "device": "cpu",
                                 "threads": 1, "lr": 0.0})()
        with pytest.raises(SystemExit, match="at least 3 repeats in all"):
            h.setup(opts)


def test_tensor_bytes_counts_params_grads_adamw_and_what_backward_keeps():
    """``freezing_memory.tensor_bytes``: exact bytes by kind; freezing a linear layer drops its gradient, its AdamW
    moments and its saved input (a frozen weight needs no input for its gradient), and parameters that autograd
    saves are not counted again as activations."""
    fm = _benchmark_module("freezing_memory")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            return type("Out", (), {"loss": self.second(torch.relu(self.first(x))).pow(2).mean()})()

    def count(freeze_first: bool) -> dict[str, int]:
        torch.manual_seed(0)
        net = Net()
        net.first.requires_grad_(not freeze_first)
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
        return fm.tensor_bytes(net, optimizer, {"x": torch.randn(5, 8)})

    full, frozen = count(False), count(True)
    f32 = 4
    first, second = (8 * 16 + 16) * f32, (16 * 4 + 4) * f32
    assert full["params"] == frozen["params"] == first + second
    assert full["grads"] == first + second and frozen["grads"] == second
    steps = 4 * f32  # AdamW keeps a one-element float32 step count per parameter
    assert full["adamw"] == 2 * (first + second) + steps and frozen["adamw"] == 2 * second + 2 * f32
    assert full["saved"] - frozen["saved"] == 5 * 8 * f32  # the first layer's input, kept only for its weight's grad
    assert frozen["saved"] > 0
    assert set(full) == set(fm.TENSOR_KINDS)


def test_memory_workers_fix_the_mmap_threshold_unless_it_is_set(monkeypatch):
    """glibc's dynamic mmap threshold made the peak RSS depend on the allocation history; the workers fix it."""
    fm = _benchmark_module("freezing_memory")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    env = fm.worker_env()
    assert env["MALLOC_MMAP_THRESHOLD_"] == "131072" and env["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fm.worker_env()["MALLOC_MMAP_THRESHOLD_"] == "65536"


def test_a_worker_peak_is_its_own_not_the_spawning_parents():
    """``ru_maxrss`` survives ``exec`` (a child spawned by a large parent reported the parent's RSS); the workers'
    ``peak_rss`` is the child's own high-water mark."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import freezing_memory as fm, resource; "
            "print(fm.peak_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    ballast = bytearray(400 * 2**20)  # the parent holds 400 MiB when it spawns the child
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    del ballast
    own, inherited = map(int, done.stdout.split())
    assert own < 300 * 2**20, own  # importing torch alone stays well below the parent's 400 MiB
    assert own <= inherited
    if sys.platform == "linux":
        assert inherited >= 400 * 2**20  # what ru_maxrss reported: the parent's RSS at the spawn


def test_train_step_times_its_phases_and_the_breakdown_shows_where_freezing_saves():
    """``train_step(..., phases)`` adds the CPU time of forward, backward and optimizer per step; with all but the
    last of six layers frozen, the backward (one layer deep: the input needs no gradient) and the optimizer (one
    layer's parameters) take less time, and the breakdown line gives every phase's ratio."""
    h = _benchmark_module("_harness")
    torch.manual_seed(0)
    full = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)])
    frozen = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)])
    frozen.load_state_dict(full.state_dict())
    for p in frozen[:-1].parameters():
        p.requires_grad_(False)

    class Out:
        def __init__(self, loss):
            self.loss = loss

    def wrap(net):
        return lambda x: Out(net(x).pow(2).mean())

    phases = {"all": {}, "frozen": {}}
    optimizers = {"all": torch.optim.AdamW(full.parameters()),
                  "frozen": torch.optim.AdamW([p for p in frozen.parameters() if p.requires_grad])}
    for _ in range(20):
        for name, net in [("all", full), ("frozen", frozen)]:
            h.train_step(wrap(net), optimizers[name], {"x": torch.randn(64, 256)}, phases[name])
    assert phases["all"]["steps"] == phases["frozen"]["steps"] == 20
    assert set(phases["all"]) == {*h.PHASES, "steps"} and all(phases["all"][p] > 0 for p in h.PHASES)
    assert phases["frozen"]["backward"] < phases["all"]["backward"]
    assert phases["frozen"]["optimizer"] < phases["all"]["optimizer"]
    assert full[-1].weight.grad is None and frozen[0].weight.grad is None  # zero_grad(set_to_none) ran
    line = h.phase_breakdown(phases, "frozen", "all")
    assert line.startswith("  phases (CPU ms per step): all ")
    ratios = dict(re.findall(r"(forward|backward|optimizer) (\d+\.\d{3})", line.split("frozen/all: ")[1]))
    assert set(ratios) == set(h.PHASES)
    assert float(ratios["backward"]) < 1 and float(ratios["optimizer"]) < 1


def test_a_benchmark_measures_its_own_checkout_not_another_installed_package(tmp_path):
    """A decoy ``hf_moe_tuning`` first on ``PYTHONPATH`` (as an editable install of another checkout would be) is
    not imported: the harness puts its own checkout first, and the header names it."""
    decoy = tmp_path / "hf_moe_tuning"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy package was imported')\n")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "router_loss_overhead.py"), "--size", "tiny",
                           "--repeats", "3", "--model", "switch", "--logging-steps", "2"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[1] == f"  package: {ROOT}"
