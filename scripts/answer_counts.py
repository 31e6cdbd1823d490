"""Count the answers of a recipe's zero-shot arm on its classification tasks (is a score a constant answer?).

    python scripts/answer_counts.py recipes/flan_moe/tiny.yaml flan_moe_0shot --threads 1

A zero-shot arm (``finetune: false``) is scored as it starts, so its answers can be recomputed from the start model
alone: the pretrain / instruct stage is taken from the recipe's shipped checkpoints or the stage cache (trained into
``--cache`` only if neither has it) and evaluated with the pipeline's own backend on ``--split``, exactly as the study
scores it. Prints, per classification task, the primary score, the share of items given the most frequent answer
(``top_answer_share``, the column ``results.csv`` records since it was added; 100 = one answer for every item) and the
answer counts against the reference counts. Fine-tuned arms are not stored, so they cannot be recounted here; their
``top_answer_share`` is in ``results.csv`` of runs made since the column exists.
"""

from __future__ import annotations

import argparse
import collections

import torch

from hf_moe_tuning.data.heldout import CLASSIFICATION
from hf_moe_tuning.study.backends import backend_for
from hf_moe_tuning.study.cache import StageCache
from hf_moe_tuning.study.config import load_study_config
from hf_moe_tuning.study.scoring import top_answer_share
from hf_moe_tuning.study.stages import ensure_instructed, ensure_pretrained, load_task_splits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("arm", help="a zero-shot arm of the recipe (finetune: false)")
    parser.add_argument("--split", default=None, help="split to score (default: the recipe's evaluate.split)")
    parser.add_argument("--cache", default="runs/cache", help="stage cache for a start model that is not shipped")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the committed studies use 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = load_study_config(args.recipe)
    if args.arm not in config.arms:
        parser.error(f"arm {args.arm!r} is not in the recipe's arms {sorted(config.arms)}")
    arm = config.arms[args.arm]
    if arm.finetune:
        parser.error(f"arm {args.arm!r} is fine-tuned; its weights are not stored, only zero-shot arms can be recounted")
    spec = config.models[arm.model]
    cache = StageCache(args.cache)
    path, key, info = ensure_pretrained(config, spec, cache)
    if arm.instruct:
        path, key, info = ensure_instructed(config, spec, path, key, cache)
    print(f"{args.arm}: start model {info.get('shipped') or path}")

    backend = backend_for(config, spec)
    tokenizer = backend.tokenizer()
    model = backend.load(path, tokenizer)
    split = args.split or config.evaluate.get("split", "test")
    for task in config.data["tasks"]:
        splits, kind, metrics = load_task_splits(config, task)
        if kind != CLASSIFICATION:
            continue
        data = splits[split]
        result = backend.evaluate(model, tokenizer, data, kind, metrics)
        answers = collections.Counter(result.predictions)
        references = collections.Counter(data["targets"])
        print(f"  {task} ({split}, {len(data)} items): {metrics[0]} {100 * result.metrics[metrics[0]]:.1f}, "
              f"top_answer_share {100 * top_answer_share(result.predictions):.1f}")
        print(f"    answers    {dict(answers.most_common())}")
        print(f"    references {dict(references.most_common())}")


if __name__ == "__main__":
    main()
