#!/usr/bin/env python
"""Single entry point of the recipes: run the study a YAML describes, on one process or N.

    python recipes/train.py recipes/flan_moe/smoke.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 recipes/train.py recipes/flan_moe/smoke.yaml
    accelerate launch --config_file recipes/accelerate/fsdp_1x8.yaml recipes/train.py recipes/flan_moe/real.yaml

Same options as ``hf-moe-tuning train`` (``--seeds``, ``--output-dir``, ``--cache-dir``, ``--set``,
``--threads``, ``--jobs``). Under ``accelerate launch -n N`` every stage trains with all N processes:
rank 0 owns the stage cache, the results and the plots, the other ranks wait for it at barriers; the
evaluation is sharded over the processes; the recipe's global batch is split into per-device batch and
gradient accumulation for N (the same global batch for any N). ``--jobs`` (worker processes of one
process) is refused there. On a CPU-only machine ``accelerate launch --cpu --num_processes N`` starts a
single process (accelerate's ``--cpu`` selects its one-process launcher); ``--config_file
recipes/accelerate/ddp.yaml`` (or ``--multi_gpu``) starts N gloo processes.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hf_moe_tuning.study.cli import add_run_arguments, run_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="recipe YAML (recipes/<study>/{smoke,tiny,real}.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from hf_moe_tuning.study.cache import process_state

    process_state()  # joins the process group of a multi-process launch (nothing for one process)
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
