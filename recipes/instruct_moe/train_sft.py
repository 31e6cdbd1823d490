"""Instruction-tune one decoder model of an ``instruct_moe`` recipe with TRL's ``SFTTrainer`` + the MoE callbacks.

Runs the recipe's ``instruct`` stage for one model: the instruction mixture (embedded, or the Hub Flan
collection for ``real``) in chat format, completion-only loss, the freezing preset, router losses and
expert-load logging of the recipe, and LoRA when the recipe's ``sft.lora`` is set.

    python recipes/instruct_moe/train_sft.py recipes/instruct_moe/tiny.yaml --model moe --max-steps 50
    accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 \\
        recipes/instruct_moe/train_sft.py recipes/instruct_moe/tiny.yaml --model moe --max-steps 10
    accelerate launch --config_file recipes/instruct_moe/accelerate_fsdp.yaml \\
        recipes/instruct_moe/train_sft.py recipes/instruct_moe/real.yaml --model olmoe

On CPU the script sets ``use_cpu`` (and ``ddp_backend=gloo`` with several processes). Note that
``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's simple launcher); two
CPU processes need the DDP config above (accelerate switches it to gloo when no GPU is visible).

The last line printed is the last training log (JSON) with ``lm_loss``, ``router/*`` and ``moe/*`` keys;
the model (the adapter, for LoRA) and its chat-template tokenizer are saved to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
from accelerate import PartialState

from hf_moe_tuning.instruct.config import load_instruct_config, lora_config
from hf_moe_tuning.instruct.sft import align_special_tokens, build_sft_trainer
from hf_moe_tuning.instruct.study import instruction_dataset, load_causal_lm, load_tokenizer, model_kind
from hf_moe_tuning.models import build_tiny_model
from hf_moe_tuning.study.config import parse_overrides

logger = logging.getLogger("train_sft")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="instruct_moe recipe YAML (tiny.yaml or real.yaml)")
    p.add_argument("--model", default=None, help="model key of the recipe (default: the first MoE model)")
    p.add_argument("--start", default=None, help="start from this checkpoint instead of the model's init")
    p.add_argument("--max-steps", type=int, default=None, help="override instruct.args.max_steps")
    p.add_argument("--output-dir", default="runs/instruct_sft")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    overrides = parse_overrides(args.set)
    if args.max_steps is not None:
        overrides["instruct.args.max_steps"] = args.max_steps
    config = load_instruct_config(args.config, overrides)
    name = args.model or next(
        (n for n, s in config.models.items() if s.kind == "sparse" or s.args.get("moe_aux_loss_coef")), next(iter(config.models))
    )
    if name not in config.models:
        raise SystemExit(f"--model {name!r} is not a model of {args.config}: {sorted(config.models)}")
    spec = config.models[name]
    tokenizer = load_tokenizer(config, spec)
    stage_args = {**config.instruct.args_for(spec.kind or "sparse"), **spec.args}
    if args.start:
        model = load_causal_lm(args.start, bool(stage_args.get("bf16")))
    elif spec.is_tiny:
        model = build_tiny_model(spec.init[5:], seed=config.instruct.seed, **spec.overrides)
    else:
        model = load_causal_lm(spec.init, bool(stage_args.get("bf16")))
    model = align_special_tokens(model, tokenizer)
    kind = spec.kind or model_kind(model)
    stage_args = {**config.instruct.args_for(kind), **spec.args, "logging_steps": stage_args.get("logging_steps", 5)}
    if not torch.cuda.is_available():  # CPU: `accelerate launch` processes need use_cpu + gloo to form a DDP group
        stage_args.setdefault("use_cpu", True)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            stage_args.setdefault("ddp_backend", "gloo")
    peft = lora_config(config.lora, sparse=kind == "sparse") if config.lora else None
    trainer = build_sft_trainer(
        model, tokenizer, instruction_dataset(config), stage_args, args.output_dir, config.instruct.seed,
        config.sft_options(), peft,
    )
    logger.info("process %d of %d (%s)", trainer.args.process_index, trainer.args.world_size, trainer.args.parallel_mode.value)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    trainer.save_model(args.output_dir)  # every rank calls it (FSDP / ZeRO-3 gather); LoRA: the adapter
    if trainer.is_world_process_zero() and logs:
        print(json.dumps(logs[-1], sort_keys=True))
    PartialState().wait_for_everyone()
    PartialState().destroy_process_group()  # a clean exit for every launched process (gloo/NCCL threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
