#!/usr/bin/env python
"""Single entry point of the recipes: run the study a YAML describes.

    python recipes/train.py recipes/flan_moe/tiny.yaml --seeds 1
    accelerate launch --config_file recipes/accelerate/single_cpu.yaml recipes/train.py recipes/flan_moe/tiny.yaml

Same options as ``hf-moe-tuning train`` (``--seeds``, ``--output-dir``, ``--cache-dir``, ``--set``,
``--threads``). A study runs its stages one after another in one process; launching several processes
is refused (each stage would be trained and cached by every rank).
"""

from __future__ import annotations

import argparse
import logging
import sys

from hf_moe_tuning.study.cli import add_run_arguments, run_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="recipe YAML (recipes/<study>/{tiny,real}.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from accelerate import PartialState

    if PartialState().num_processes > 1:
        parser.error("studies run in one process; use recipes/accelerate/single_cpu.yaml or a single-GPU config")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
