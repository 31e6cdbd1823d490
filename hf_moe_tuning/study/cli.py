"""Study subcommands of ``hf-moe-tuning``: ``compare``, ``ablate``, ``sweep-experts``, ``train``, ``validate``.

:func:`register` adds them to the project's argparse sub-parsers; ``recipes/train.py`` reuses
:func:`add_run_arguments` and :func:`run_from_args` so both entry points behave the same.

Examples::

    hf-moe-tuning compare --seeds 1                      # embedded four-arm comparison, one seed
    hf-moe-tuning ablate recipes/st_moe_freezing/tiny.yaml --seeds 3
    hf-moe-tuning train recipes/expert_count/tiny.yaml --set finetune.args.num_train_epochs=4
    hf-moe-tuning validate recipes/*/*.yaml --num-processes 8
    accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 -m hf_moe_tuning.cli compare recipes/flan_moe/smoke.yaml

Under ``accelerate launch -n N`` every stage runs on the N processes (see :mod:`.runner`); ``--jobs`` is
then refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from .cache import process_state
from .config import ConfigError, load_study_config, parse_overrides, validate_training_args
from .runner import DEFAULT_RECIPES, DRIVER_STUDIES, check_jobs, resolve_recipe, run_study

logger = logging.getLogger(__name__)


def _program(argv0: str) -> str:
    """How the recorded command names the program: ``hf-moe-tuning`` for the entry point and for
    ``python -m hf_moe_tuning.cli`` (whose ``argv[0]`` is the module's file path), the script path otherwise."""
    path = Path(argv0)
    if path.name == "hf-moe-tuning" or path.parts[-2:] == ("hf_moe_tuning", "cli.py"):
        return "hf-moe-tuning"
    return argv0


#: subcommand -> (driver of :data:`~.runner.DRIVER_STUDIES`, help)
DRIVERS: dict[str, tuple[str, str]] = {
    "compare": ("compare", "Flan-MoE: fine-tune T5, Flan-T5, MoE and Flan-MoE (or dense/MoE decoders) on held-out tasks"),
    "ablate": ("ablate", "ST-MoE: fine-tune with the five freezing strategies"),
    "sweep-experts": ("sweep_experts", "Switch: fine-tune Switch models with different numbers of experts"),
}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs a study."""
    parser.add_argument("--seeds", type=int, default=None, help="number of fine-tuning seeds (0..N-1); default: the recipe's")
    parser.add_argument("--output-dir", default=None, help="where results.csv/.md and plot.png go (default: the recipe's)")
    parser.add_argument("--cache-dir", default=None, help="stage cache (default: the recipe's cache_dir)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe value by dotted key, e.g. --set finetune.args.num_train_epochs=4 (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine; default with --jobs N: the cores divided by N)")
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="fine-tuning jobs run in parallel worker processes, each with --threads threads (results are the same); "
        "one-process runs only: under `accelerate launch -n N` every stage already uses the N processes",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _threads_per_job(jobs: int | None) -> int | None:
    """Default torch threads of each of ``jobs`` parallel fine-tuning workers: the CPU cores shared out (each worker
    would otherwise take every core, ``jobs`` times oversubscribing the machine); ``None`` for one job."""
    if not jobs or jobs <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // jobs)


def run_from_args(args: argparse.Namespace, driver: str | None = None) -> int:
    """Load (and check) the recipe named by ``args`` and run it; ``driver`` restricts the studies it accepts."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # every stage; without it the stages in this process take every core
    if driver is None:
        path = Path(args.config)
    else:
        default_study = getattr(args, "study", None) or DRIVER_STUDIES[driver][0]
        path = resolve_recipe(getattr(args, "config", None), default_study)
    config = load_study_config(path, parse_overrides(args.overrides))
    if driver is not None and config.study not in DRIVER_STUDIES[driver]:
        allowed = " or ".join(DRIVER_STUDIES[driver])
        raise ConfigError(path, "study", f"this command runs {allowed} recipes, the recipe is a '{config.study}' study")
    if args.jobs < 1:
        raise ConfigError(path, "--jobs", f"expected a positive number of worker processes, got {args.jobs}")
    try:
        check_jobs(args.jobs)
    except ValueError as err:
        raise ConfigError(path, "--jobs", str(err)) from None
    state = process_state()  # under accelerate launch: joins the process group before any stage
    validate_training_args(config, check_lora_targets=False, num_processes=state.num_processes if state else 1)
    seeds = list(range(args.seeds)) if args.seeds is not None else None
    command = " ".join(shlex.quote(a) for a in [_program(sys.argv[0]), *sys.argv[1:]])
    paths = run_study(
        config, seeds=seeds, output_dir=args.output_dir, cache_dir=args.cache_dir,
        progress=not args.no_progress, command=command, num_jobs=args.jobs,
        job_threads=args.threads or _threads_per_job(args.jobs),
    )
    if state is None or state.is_main_process:
        print(f"{config.study}: results in {paths['md']}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.configs:
        try:
            config = load_study_config(path, parse_overrides(args.overrides))
            checked = validate_training_args(config, num_processes=args.num_processes)
        except (ConfigError, OSError) as err:
            failed += 1
            print(f"FAIL {err}")
            continue
        print(f"OK   {path}: study={config.study} variant={config.variant} arms={list(config.arms)} "
              f"tasks={config.data['tasks']}; checked: {'; '.join(checked)}")
    return 1 if failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``compare``, ``ablate``, ``sweep-experts``, ``train`` and ``validate`` to ``subparsers``."""
    for name, (driver, help_text) in DRIVERS.items():
        studies = DRIVER_STUDIES[driver]
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", nargs="?", default=None, help=f"recipe YAML (default: {DEFAULT_RECIPES[studies[0]]})")
        add_run_arguments(p)
        if len(studies) > 1:
            p.add_argument(
                "--study", choices=list(studies), default=studies[0],
                help="the default recipe when no CONFIG is given: flan_moe (encoder-decoder T5/Switch, default) or "
                "instruct_moe (decoder-only Llama/Mixtral with TRL SFT)",
            )
        p.set_defaults(func=lambda a, _driver=driver: run_from_args(a, _driver))

    p = subparsers.add_parser("train", help="run any study recipe (same as recipes/train.py)")
    p.add_argument("config", help="recipe YAML")
    add_run_arguments(p)
    p.set_defaults(func=lambda a: run_from_args(a, None))

    p = subparsers.add_parser("validate", help="check recipe YAMLs offline (keys, arms, model ids, strategies)")
    p.add_argument("configs", nargs="+", help="recipe YAML files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--num-processes", type=int, default=1, metavar="N",
        help="check that every global batch splits evenly over N processes (accelerate launch -n N)",
    )
    p.set_defaults(func=_validate)
