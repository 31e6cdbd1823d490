"""``hf-moe-tuning`` command line.

Subcommands:

* ``describe MODEL`` – parameter-group table of a tiny model name, local path or Hub id (Hub models are
  built on the meta device from their config, so no weights are downloaded or allocated);
* ``demo`` – train a tiny Switch Transformer with a freezing preset on an embedded task and print the
  trainable-parameter table and the final loss;
* the study commands (``train``, ``compare``, ``ablate``, ``sweep-experts``, ``validate``) and the Hub
  commands (``card``, ``push``), registered by their modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

logger = logging.getLogger(__name__)



def _check_model_argument(name: str) -> None:
    """A model argument written as a path (``./x``, ``../x``, ``/x``, ``~/x``, ``C:\\x``) must exist."""
    from .models import TINY_MODELS

    if name in TINY_MODELS or os.path.exists(os.path.expanduser(name)):
        return
    looks_like_path = (
        name.startswith((".", "/", "~", "\\"))
        or os.path.isabs(name)
        or (os.sep != "/" and os.sep in name)
        or name.count("/") > 1
    )
    if looks_like_path:
        raise FileNotFoundError(
            f"no such model folder: {name!r} (a local path must exist; a Hub id looks like 'org/name')"
        )


def _describe(args: argparse.Namespace) -> int:
    from .anatomy import describe_moe
    from .models import load_model

    _check_model_argument(args.model)
    model = load_model(args.model, meta=not args.materialize)
    anatomy = describe_moe(model)
    if args.json:
        counts = {g.value: n for g, n in anatomy.group_counts().items()}
        layers = [
            {
                "index": layer.index,
                "path": layer.path,
                "num_experts": layer.num_experts,
                "top_k": layer.top_k,
                "router": layer.router_path,
                "fused_experts": layer.fused_experts,
                "num_per_expert_params": len(layer.per_expert),
                "stack": layer.stack,
            }
            for layer in anatomy.layers
        ]
        print(json.dumps({"model_type": anatomy.model_type, "groups": counts, "layers": layers}, indent=2))
    else:
        print(f"{args.model} (model_type={anatomy.model_type})")
        print(anatomy.format_table())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(
        strategy=args.strategy,
        model_name=args.model,
        max_steps=args.max_steps,
        output_dir=args.output_dir,
        seed=args.seed,
    )
    print(result.plan_table)  # the trainer only logs it
    print(f"final train loss: {result.final_loss:.4f} (first logged: {result.first_loss:.4f}) after {result.steps} steps")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moe-tuning", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("describe", help="print the parameter-group table of a model")
    p.add_argument("model", help="tiny model name (switch, t5, mixtral, ...), local path or Hub id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--materialize", action="store_true", help="allocate real weights instead of the meta device")
    p.set_defaults(func=_describe)

    p = sub.add_parser("demo", help="train a tiny Switch with a freezing preset and print the table and loss")
    p.add_argument("--strategy", default="non_moe", help="all, non_moe, moe, attention or ffn")
    p.add_argument("--model", default="switch", help="tiny model name")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    from .hub.cli import register as register_hub
    from .routing.upcycling import register as register_upcycle
    from .study.cli import register as register_studies

    register_studies(sub)  # train, compare, ablate, sweep-experts, validate
    register_hub(sub)  # card, push
    register_upcycle(sub)  # upcycle
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Set up logging (``-v``) and run the parsed subcommand; a bad request exits 2 with a one-line error."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
