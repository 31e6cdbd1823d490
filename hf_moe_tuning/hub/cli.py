"""``hf-moe-tuning card`` and ``hf-moe-tuning push``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .card import write_model_card
from .push import push_run


def _card_command(args: argparse.Namespace) -> int:
    path = write_model_card(
        args.output_dir,
        model_name=args.model_name,
        base_model=args.base_model,
        datasets=args.dataset or None,
        license=args.license,
        language=args.language,
        tags=args.tag or (),
    )
    if args.print:
        print(Path(path).read_text(encoding="utf-8"))
    else:
        print(f"wrote {path}")
    return 0


def _push_command(args: argparse.Namespace) -> int:
    result = push_run(
        args.output_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        merge_adapter=args.merge_adapter,
        commit_message=args.commit_message,
        token=args.token,
        license=args.license,
        dry_run=args.dry_run,
    )
    if args.dry_run:
        where = f"{args.repo_id}@{args.revision}" if args.revision else args.repo_id
        print(f"dry run: would upload {len(result.files)} files of {args.output_dir} to {where}:")
        for name in result.files:
            print(f"  {name}")
        if result.skipped:
            print(f"not uploaded ({len(result.skipped)}): " + ", ".join(f"{n} ({why})" for n, why in result.skipped.items()))
        return 0
    print(f"pushed {args.output_dir} to {getattr(result, 'commit_url', None) or args.repo_id}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``card`` and ``push`` to the ``hf-moe-tuning`` command line."""
    p = subparsers.add_parser("card", help="write the MoE model card (README.md) of a finished run")
    p.add_argument("output_dir", help="run folder with a saved model or adapter")
    p.add_argument("--model-name", default=None, help="card title (default: folder name)")
    p.add_argument("--base-model", default=None, help="Hub id of the base model (default: from run_info.json / config)")
    p.add_argument("--dataset", action="append", default=[], help="Hub dataset id trained on (repeatable)")
    p.add_argument("--license", default=None)
    p.add_argument("--language", default=None)
    p.add_argument("--tag", action="append", default=[], help="extra tag (repeatable)")
    p.add_argument("--print", action="store_true", help="print the card instead of the path")
    p.set_defaults(func=_card_command)

    p = subparsers.add_parser("push", help="write the card and upload a finished run to the Hub")
    p.add_argument("output_dir", help="run folder with a saved model or adapter")
    p.add_argument("repo_id", help="namespace/name on the Hub")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    p.add_argument("--merge-adapter", action="store_true", help="merge a LoRA adapter into its base model first")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--license", default=None)
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in token)")
    p.add_argument("--dry-run", action="store_true", help="print the files that would be uploaded; no network")
    p.set_defaults(func=_push_command)
