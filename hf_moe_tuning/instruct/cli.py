"""``hf-moe-tuning instruct-compare`` / ``instruct-validate``: the decoder-only instruction-tuning study.

Registered in the main CLI by ``register(subparsers)``; also runnable alone::

    python -m hf_moe_tuning.instruct.cli instruct-compare recipes/instruct_moe/tiny.yaml --seeds 3
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import Sequence

from ..cli import run_command

logger = logging.getLogger(__name__)


def _overrides(items: list[str] | None) -> dict:
    from ..study.config import parse_overrides  # noqa: PLC0415

    return parse_overrides(items)


def _command(prog: str) -> str:
    """The exact command line of this run (with the thread-count environment that changes timings)."""
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ]
    return " ".join([*env, prog, *(shlex.quote(a) for a in sys.argv[1:])])


def _compare(args: argparse.Namespace) -> int:
    from .study import run_instruct_study  # noqa: PLC0415 - keep `--help` fast

    result = run_instruct_study(
        args.config,
        num_seeds=args.seeds,
        overrides=_overrides(args.set),
        output_dir=args.output_dir,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        command=_command(getattr(args, "prog", "hf-moe-tuning")),
    )
    out = args.output_dir or result.config.output_dir
    print(f"wrote {out}/results.csv, results.md, plot.png ({len(result.records)} fine-tuning runs)")
    for row in result.delta_table():
        mean, std = row["values"]["average"]
        verdict = {True: "holds", False: "does not hold", None: "n/a"}[row["holds"]]
        print(f"  {row['delta'].name}: {mean:+.1f} ± {std:.1f} points ({verdict})")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .config import load_instruct_config, validate_instruct_config  # noqa: PLC0415

    for path in args.configs:
        config = load_instruct_config(path, _overrides(args.set))
        checked = validate_instruct_config(config, check_lora_targets=not args.skip_lora)
        print(f"{path}: ok ({config.variant}, {len(config.arms)} arms, {len(config.models)} models)")
        for line in checked:
            print(f"  - {line}")
    return 0


def register(subparsers) -> None:
    """Add ``instruct-compare`` and ``instruct-validate`` to the ``hf-moe-tuning`` CLI."""
    p = subparsers.add_parser(
        "instruct-compare",
        help="decoder-only Flan-MoE comparison (dense vs MoE, with/without instruction tuning) with TRL SFTTrainer",
    )
    p.add_argument("config", nargs="?", default=None, help="instruct_moe recipe (default recipes/instruct_moe/tiny.yaml)")
    p.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds 0..N-1 (default: the recipe's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. finetune.args.num_train_epochs=2")
    p.add_argument("--output-dir", default=None, help="default: results/instruct_moe")
    p.add_argument("--cache-dir", default=None, help="stage cache (default: the recipe's cache_dir)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_compare)

    p = subparsers.add_parser("instruct-validate", help="validate instruct_moe recipes offline (incl. LoRA targets)")
    p.add_argument("configs", nargs="+")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--skip-lora", action="store_true", help="do not check LoRA targets on tiny stand-ins")
    p.set_defaults(func=_validate)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_moe_tuning.instruct.cli")
    parser.add_argument("-v", "--verbose", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    parser.set_defaults(prog="python -m hf_moe_tuning.instruct.cli")
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
