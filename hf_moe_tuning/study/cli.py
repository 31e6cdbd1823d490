"""Study subcommands of ``hf-moe-tuning``: ``compare``, ``ablate``, ``sweep-experts``, ``train``, ``validate``.

:func:`register` adds them to the project's argparse sub-parsers; ``recipes/train.py`` reuses
:func:`add_run_arguments` and :func:`run_from_args` so both entry points behave the same.

Examples::

    hf-moe-tuning compare --seeds 1                      # embedded four-arm comparison, one seed
    hf-moe-tuning ablate recipes/st_moe_freezing/tiny.yaml --seeds 3
    hf-moe-tuning train recipes/expert_count/tiny.yaml --set finetune.args.num_train_epochs=4
    hf-moe-tuning validate recipes/*/*.yaml
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from .config import ConfigError, load_study_config, parse_overrides, validate_training_args
from .runner import DEFAULT_RECIPES, resolve_recipe, run_study

logger = logging.getLogger(__name__)

#: subcommand -> (study it runs, help)
DRIVERS: dict[str, tuple[str, str]] = {
    "compare": ("flan_moe", "Flan-MoE: fine-tune T5, Flan-T5, MoE and Flan-MoE on held-out tasks"),
    "ablate": ("st_moe_freezing", "ST-MoE: fine-tune with the five freezing strategies"),
    "sweep-experts": ("expert_count", "Switch: fine-tune Switch models with different numbers of experts"),
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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_from_args(args: argparse.Namespace, study: str | None = None) -> int:
    """Load (and check) the recipe named by ``args`` and run it."""
    if args.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    path = resolve_recipe(getattr(args, "config", None), study) if study else Path(args.config)
    config = load_study_config(path, parse_overrides(args.overrides))
    if study is not None and config.study != study:
        raise ConfigError(path, "study", f"this command runs '{study}' recipes, the recipe is a '{config.study}' study")
    validate_training_args(config)
    seeds = list(range(args.seeds)) if args.seeds is not None else None
    command = " ".join(shlex.quote(a) for a in ["hf-moe-tuning" if Path(sys.argv[0]).name == "hf-moe-tuning" else sys.argv[0], *sys.argv[1:]])
    result = run_study(
        config, seeds=seeds, output_dir=args.output_dir, cache_dir=args.cache_dir,
        progress=not args.no_progress, command=command,
    )
    out = Path(args.output_dir or config.output_dir)
    print(f"{config.study}: {len(result.records)} runs, {result.meta['wall_seconds']:.0f} s; results in {out}/results.md")
    return 0


def _run_instruct(args: argparse.Namespace) -> int:
    """``compare --study instruct_moe``: the decoder-only comparison of :mod:`hf_moe_tuning.instruct`."""
    from ..instruct.cli import _compare  # noqa: PLC0415 - imports TRL

    args.set = args.overrides
    return _compare(args)


def _recipe_study(path: str) -> str | None:
    import yaml  # noqa: PLC0415

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return None
    return data.get("study") if isinstance(data, dict) else None


def _validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.configs:
        if _recipe_study(path) == "instruct_moe":  # its own schema (models, SFT settings, LoRA targets)
            from ..instruct.config import load_instruct_config, validate_instruct_config  # noqa: PLC0415

            try:
                config = load_instruct_config(path, parse_overrides(args.overrides))
                validate_instruct_config(config)
            except (ConfigError, ValueError, OSError) as err:
                failed += 1
                print(f"FAIL {err}")
                continue
            print(f"OK   {path}: study=instruct_moe variant={config.variant} arms={list(config.arms)}")
            continue
        try:
            config = load_study_config(path, parse_overrides(args.overrides))
            validate_training_args(config)
        except (ConfigError, OSError) as err:
            failed += 1
            print(f"FAIL {err}")
            continue
        print(f"OK   {path}: study={config.study} variant={config.variant} arms={list(config.arms)} tasks={config.data['tasks']}")
    return 1 if failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``compare``, ``ablate``, ``sweep-experts``, ``train`` and ``validate`` to ``subparsers``."""
    for name, (study, help_text) in DRIVERS.items():
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", nargs="?", default=None, help=f"recipe YAML (default: {DEFAULT_RECIPES[study]})")
        add_run_arguments(p)
        p.set_defaults(func=lambda a, _study=study: run_from_args(a, _study))
        if name == "compare":
            p.add_argument(
                "--study", choices=["flan_moe", "instruct_moe"], default="flan_moe",
                help="flan_moe: encoder-decoder T5/Switch (default); instruct_moe: decoder-only Llama/Mixtral with TRL SFT",
            )
            p.set_defaults(func=lambda a: _run_instruct(a) if a.study == "instruct_moe" else run_from_args(a, "flan_moe"))

    p = subparsers.add_parser("train", help="run any study recipe (same as recipes/train.py)")
    p.add_argument("config", help="recipe YAML")
    add_run_arguments(p)
    p.set_defaults(func=lambda a: run_from_args(a, None))

    p = subparsers.add_parser("validate", help="check recipe YAMLs offline (keys, arms, model ids, strategies)")
    p.add_argument("configs", nargs="+", help="recipe YAML files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_validate)
