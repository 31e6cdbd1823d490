"""Ship a trained pretrain or instruct stage of a tiny recipe model with the repository.

    python scripts/ship_stage.py recipes/flan_moe/tiny.yaml t5 --stage instruct [--cache runs/cache]

Runs the stage through the pipeline's own functions (:func:`~hf_moe_tuning.study.stages.ensure_pretrained`,
:func:`~hf_moe_tuning.study.stages.ensure_instructed`) with the given stage cache, so a stage already in the
cache is not trained again, then copies it (``DONE``, ``stage.json``, ``result.json``, ``model/``) into the
recipe's ``<stage>.shipped_dir`` under the name the pipeline looks it up by: ``<stage>/<model>-<configuration
key>``. Train with ``--threads 1`` as the committed studies do (``torch.set_num_threads(1)`` here).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from hf_moe_tuning.study.cache import StageCache, config_key
from hf_moe_tuning.study.config import load_study_config
from hf_moe_tuning.study.stages import (
    ensure_instructed,
    ensure_pretrained,
    instruct_key,
    instruct_shipped_key,
    pretrain_key,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("model", help="a key of the recipe's `models`")
    parser.add_argument("--stage", choices=("pretrain", "instruct"), default="pretrain")
    parser.add_argument("--cache", default="runs/cache", help="stage cache to train into / reuse")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = load_study_config(args.recipe)
    if args.model not in config.models:
        parser.error(f"model {args.model!r} is not in the recipe's models {sorted(config.models)}")
    spec = config.models[args.model]
    stage = config.pretrain if args.stage == "pretrain" else config.instruct
    target_root = stage.extra.get("shipped_dir")
    if not target_root:
        parser.error(f"the recipe has no {args.stage}.shipped_dir to ship into")
    cache = StageCache(args.cache)
    path, key, info = ensure_pretrained(config, spec, cache)
    payload = pretrain_key(config, spec)
    if args.stage == "instruct":
        payload = instruct_shipped_key(config, spec, instruct_key(config, spec, key))
        path, key, info = ensure_instructed(config, spec, path, key, cache)
    if info.get("shipped"):
        print(f"already shipped: {info['shipped']}")
        return
    source = Path(path).parent
    target = StageCache(target_root).path(args.stage, spec.name, config_key(payload))
    target.mkdir(parents=True, exist_ok=False)
    for name in ("DONE", "stage.json", "result.json"):
        shutil.copy2(source / name, target / name)
    shutil.copytree(source / "model", target / "model")
    print(f"shipped {source} -> {target}")


if __name__ == "__main__":
    main()
