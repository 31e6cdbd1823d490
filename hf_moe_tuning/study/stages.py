"""The pipeline's stages: pretrain (span corruption) → instruct (Flan mixture) → fine-tune + evaluate.

Every training stage runs :class:`hf_moe_tuning.MoETrainer` with :class:`MoETrainingArguments`
built from the recipe (so freezing arms use ``moe_freeze_strategy`` and Switch models get the router
losses the recipe asks for). Stage outputs are cached by :class:`~.cache.StageCache`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, ByT5Tokenizer, DataCollatorForSeq2Seq
from transformers.trainer_callback import PrinterCallback

from ..anatomy import describe_moe
from ..config import MoETrainingArguments
from ..data import get_task, heldout_task, instruction_mixture, pretraining_corpus, span_corruption_dataset
from ..data.corpus import BYT5_FIRST_SENTINEL
from ..models import build_tiny_model, load_model
from ..trainer import MoETrainer
from .cache import StageCache, config_hash
from .config import ModelSpec, StudyConfig
from .evaluation import evaluate_task

logger = logging.getLogger(__name__)

#: Training-argument defaults of every stage (a recipe's ``args`` override them).
STAGE_DEFAULTS: dict[str, Any] = {
    "save_strategy": "no",
    "logging_strategy": "steps",
    "logging_steps": 50,
    "disable_tqdm": True,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "dataloader_num_workers": 0,
    "moe_expert_load_jsonl": False,
    "moe_expert_load_heatmap": False,
    "moe_model_card": False,
    "dataloader_pin_memory": torch.cuda.is_available(),
}


def instruction_mixture_for(data: dict[str, Any]) -> Dataset:
    """The instruction mixture a recipe's ``data`` section names: embedded (default) or a Hub Flan collection."""
    if data.get("source") == "hub":
        from ..data.hub import flan_mixture  # noqa: PLC0415

        return flan_mixture(
            data["instruction_dataset"], data.get("mixture_size", 20_000), data.get("instruction_split", "train"),
            data.get("instruction_config"), seed=data.get("seed", 0),
        )
    return instruction_mixture(
        data.get("mixture_size", 20_000), seed=data.get("seed", 0),
        few_shot_fraction=data.get("few_shot_fraction", 0.3), max_shots=data.get("max_shots", 2),
    )


def load_tokenizer(config: StudyConfig, model: ModelSpec):
    """``ByT5Tokenizer()`` (no files) for ``tokenizer: byt5``; else the model's (or named) Hub tokenizer."""
    if config.tokenizer == "byt5":
        return ByT5Tokenizer()
    name = model.init if config.tokenizer == "auto" else config.tokenizer
    return AutoTokenizer.from_pretrained(name)


def model_kind(model) -> str:
    """``"sparse"`` when the model has MoE layers, else ``"dense"``."""
    return "sparse" if describe_moe(model).is_moe else "dense"


def tokenize_pairs(dataset: Dataset, tokenizer, max_source_length: int, max_target_length: int) -> Dataset:
    """``inputs``/``targets`` text columns -> ``input_ids``/``attention_mask``/``labels``."""

    def encode(batch: dict) -> dict:
        enc = tokenizer(batch["inputs"], max_length=max_source_length, truncation=True)
        enc["labels"] = tokenizer(text_target=batch["targets"], max_length=max_target_length, truncation=True)["input_ids"]
        return enc

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


@dataclass
class TrainOutcome:
    metrics: dict[str, float]
    seconds: float


def train_model(model, tokenizer, dataset: Dataset, args: dict[str, Any], output_dir: str | Path, seed: int) -> TrainOutcome:
    """Train ``model`` in place on a tokenized dataset with ``MoETrainer``."""
    merged = {**STAGE_DEFAULTS, **args}
    training_args = MoETrainingArguments(output_dir=str(output_dir), seed=seed, data_seed=seed, report_to="none", **merged)
    trainer = MoETrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
    )
    if not logger.isEnabledFor(logging.INFO):  # the driver shows progress bars; keep per-step log dicts off the console
        trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    result = trainer.train()
    return TrainOutcome(dict(result.metrics), time.perf_counter() - start)


def _max_len(config: StudyConfig, key: str, default: int) -> int:
    return int(config.data.get(key, default))


def run_cached(cache: StageCache, path: Path, payload: dict, compute) -> dict[str, Any]:
    """Return the cached result of stage ``path`` or run ``compute(path) -> result`` under the stage lock."""
    with cache.lock(path):
        if cache.is_done(path):
            return {**cache.result(path), "cached": True}
        cache.prepare(path)
        result = compute(path)
        cache.finish(path, payload, result)
    return {**result, "cached": False}


# ------------------------------------------------------------------------------------------ base models
def initial_model(spec: ModelSpec, seed: int):
    """A fresh tiny model (``tiny:<name>``, seeded init) or a Hub / local checkpoint."""
    if spec.is_tiny:
        return build_tiny_model(spec.init[5:], seed=seed, **spec.overrides)
    return load_model(spec.init)


def pretrain_key(config: StudyConfig, spec: ModelSpec) -> dict[str, Any]:
    stage = config.pretrain
    payload = {"stage": "pretrain", "init": spec.init, "overrides": spec.overrides, "tokenizer": config.tokenizer}
    if stage.enabled:
        payload.update(
            seed=stage.seed,
            corpus_size=config.data.get("corpus_size", 20_000),
            data_seed=config.data.get("seed", 0),
            noise_density=stage.extra.get("noise_density", 0.15),
            mean_span=stage.extra.get("mean_span", 3.0),
            kind=spec.kind,
            args=stage.args,
            sparse_args=stage.sparse_args if stage.family_args else {},
            dense_args=stage.dense_args if stage.family_args else {},
            model_args=spec.args,
            max_source_length=_max_len(config, "max_source_length", 192),
        )
    return payload


def ensure_pretrained(config: StudyConfig, spec: ModelSpec, cache: StageCache) -> tuple[str, str, dict]:
    """Path (or Hub id) of the pretrained model for ``spec`` and its stage key; trains it if not cached.

    Returns ``(path_or_id, key, info)`` where ``info`` has ``seconds`` and ``cached``.
    """
    payload = pretrain_key(config, spec)
    key = config_hash(payload)
    if not (config.pretrain.enabled and spec.is_tiny):
        if spec.is_tiny:  # untrained tiny model: save its seeded init once so later stages can load it
            path = cache.path("init", spec.name, key)

            def save_init(path: Path) -> dict:
                initial_model(spec, config.pretrain.seed).save_pretrained(path / "model")
                return {"seconds": 0.0}

            run_cached(cache, path, payload, save_init)
            return str(path / "model"), key, {"seconds": 0.0, "cached": True}
        return spec.init, key, {"seconds": 0.0, "cached": True}
    path = cache.path("pretrain", spec.name, key)
    shipped_dir = config.pretrain.extra.get("shipped_dir")
    if shipped_dir:
        shipped = StageCache(shipped_dir).path("pretrain", spec.name, key)
        if StageCache.is_done(shipped):
            logger.info("using the shipped pretrained %s (%s)", spec.name, shipped)
            return str(shipped / "model"), key, {**StageCache.result(shipped), "cached": True, "shipped": True}
        logger.info("no shipped checkpoint for %s with key %s: pretraining", spec.name, key)

    def pretrain(path: Path) -> dict:
        logger.info("pretraining %s (span corruption) -> %s", spec.name, path)
        tokenizer = load_tokenizer(config, spec)
        model = initial_model(spec, config.pretrain.seed)
        kind = spec.kind or model_kind(model)
        corpus = pretraining_corpus(config.data.get("corpus_size", 20_000), seed=config.data.get("seed", 0))
        max_len = _max_len(config, "max_source_length", 192)
        dataset = span_corruption_dataset(
            corpus,
            lambda text: tokenizer(text, add_special_tokens=False, max_length=max_len - 1, truncation=True)["input_ids"],
            seed=config.data.get("seed", 0),
            noise_density=float(config.pretrain.extra.get("noise_density", 0.15)),
            mean_span=float(config.pretrain.extra.get("mean_span", 3.0)),
            first_sentinel=BYT5_FIRST_SENTINEL,
            eos_id=tokenizer.eos_token_id,
        )
        args = {**config.pretrain.args_for(kind), **spec.args}
        outcome = train_model(model, tokenizer, dataset, args, path / "trainer", seed=config.pretrain.seed)
        model.save_pretrained(path / "model")
        return {"seconds": outcome.seconds, "train_loss": outcome.metrics.get("train_loss"), "kind": kind}

    return str(path / "model"), key, run_cached(cache, path, payload, pretrain)


def ensure_instructed(config: StudyConfig, spec: ModelSpec, start: str, start_key: str, cache: StageCache) -> tuple[str, str, dict]:
    """Instruction-tune (Flan stage) the model at ``start``; cached by config hash."""
    stage = config.instruct
    data = config.data
    payload = {
        "stage": "instruct",
        "upstream": start_key,
        "seed": stage.seed,
        "source": data.get("source"),
        "mixture_size": data.get("mixture_size", 20_000),
        "few_shot_fraction": data.get("few_shot_fraction", 0.3),
        "max_shots": data.get("max_shots", 2),
        "instruction_dataset": data.get("instruction_dataset"),
        "instruction_config": data.get("instruction_config"),
        "data_seed": data.get("seed", 0),
        "args": stage.args,
        "sparse_args": stage.sparse_args if stage.family_args else {},
        "dense_args": stage.dense_args if stage.family_args else {},
        "model_args": spec.args,
        "max_source_length": _max_len(config, "max_source_length", 192),
        "max_target_length": _max_len(config, "max_target_length", 48),
    }
    key = config_hash(payload)
    path = cache.path("instruct", spec.name, key)

    def instruct(path: Path) -> dict:
        logger.info("instruction-tuning %s -> %s", spec.name, path)
        tokenizer = load_tokenizer(config, spec)
        model = AutoModelForSeq2SeqLM.from_pretrained(start)
        kind = spec.kind or model_kind(model)
        mixture = instruction_mixture_for(data)
        dataset = tokenize_pairs(mixture, tokenizer, payload["max_source_length"], payload["max_target_length"])
        args = {**stage.args_for(kind), **spec.args}
        outcome = train_model(model, tokenizer, dataset, args, path / "trainer", seed=stage.seed)
        model.save_pretrained(path / "model")
        return {"seconds": outcome.seconds, "train_loss": outcome.metrics.get("train_loss"), "kind": kind}

    return str(path / "model"), key, run_cached(cache, path, payload, instruct)


# ------------------------------------------------------------------------------------------ tasks
def load_task_splits(config: StudyConfig, task: str):
    """Train/validation/test splits and ``(kind, metrics)`` of a task of the recipe."""
    data = config.data
    if data.get("source") == "hub":
        from ..data.heldout import CLASSIFICATION  # noqa: PLC0415
        from ..data.hub import superglue_task  # noqa: PLC0415

        splits = superglue_task(task, data["task_dataset"], seed=data.get("seed", 0), train_size=data.get("train_size"),
                                validation_size=data.get("validation_size", 200))
        return splits, CLASSIFICATION, ("accuracy",)
    spec = get_task(task)
    splits = heldout_task(task, seed=data.get("seed", 0), train_size=data.get("train_size", 128),
                          validation_size=data.get("validation_size", 64), test_size=data.get("test_size", 200))
    return splits, spec.kind, spec.metrics


def finetune_and_evaluate(
    config: StudyConfig,
    arm_name: str,
    task: str,
    seed: int,
    start: str,
    start_key: str,
    splits,
    kind: str,
    metrics: tuple[str, ...],
    cache: StageCache,
) -> dict[str, Any]:
    """Fine-tune the arm's starting model on ``task`` with ``seed`` and evaluate it; cached by config hash."""
    arm = config.arms[arm_name]
    spec = config.models[arm.model]
    ev = config.evaluate
    payload = {
        "stage": "finetune",
        "upstream": start_key,
        "task": task,
        "seed": seed,
        "data": {k: config.data.get(k) for k in ("source", "task_dataset", "seed", "train_size", "validation_size", "test_size")},
        "args": config.finetune.args,
        "sparse_args": config.finetune.sparse_args if config.finetune.family_args else {},
        "dense_args": config.finetune.dense_args if config.finetune.family_args else {},
        "model_args": spec.args,
        "arm_args": arm.args,
        "kind": spec.kind,
        "evaluate": ev,
        "max_source_length": _max_len(config, "max_source_length", 192),
        "max_target_length": _max_len(config, "max_target_length", 48),
    }
    key = config_hash(payload)
    path = cache.path("finetune", f"{arm_name}-{task}-s{seed}", key)

    def finetune(path: Path) -> dict:
        tokenizer = load_tokenizer(config, spec)
        model = AutoModelForSeq2SeqLM.from_pretrained(start)
        model_type = spec.kind or model_kind(model)
        args = {**config.finetune.args_for(model_type), **spec.args, **arm.args}
        train = tokenize_pairs(splits["train"], tokenizer, payload["max_source_length"], payload["max_target_length"])
        with tempfile.TemporaryDirectory(dir=path) as tmp:
            outcome = train_model(model, tokenizer, train, args, tmp, seed=seed)
        start_eval = time.perf_counter()
        scores = evaluate_task(
            model, tokenizer, splits[ev.get("split", "test")], kind, metrics,
            batch_size=int(ev.get("batch_size", 64)), max_new_tokens=int(ev.get("max_new_tokens", 48)),
            max_source_length=payload["max_source_length"],
        )
        return {
            "arm": arm_name,
            "task": task,
            "seed": seed,
            "kind": model_type,
            "metrics": scores,
            "primary_metric": metrics[0],
            "score": 100.0 * scores[metrics[0]],
            "train_loss": outcome.metrics.get("train_loss"),
            "train_seconds": outcome.seconds,
            "eval_seconds": time.perf_counter() - start_eval,
            "learning_rate": args.get("learning_rate"),
            "batch_size": args.get("per_device_train_batch_size"),
            "freeze_strategy": args.get("moe_freeze_strategy", "all"),
        }

    return run_cached(cache, path, payload, finetune)
