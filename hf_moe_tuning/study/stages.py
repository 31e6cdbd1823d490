"""The pipeline's stages: pretrain → instruct (Flan-style mixture) → fine-tune to the best validation score + evaluate.

Every stage goes through the model's :class:`~.backends.Backend` (``MoETrainer`` for encoder-decoder
models, ``MoESFTTrainer`` for decoder-only ones), so the same recipe options mean the same on both.
Stage outputs are cached by :class:`~.cache.StageCache` under keys that cover the configuration, the
code, the library versions, the platform and the thread count.

Fine-tuning runs until the validation primary metric stops improving: every ``eval_every`` optimizer
steps the model is scored on the validation split (with the same scoring as the test split), the best
weights are kept, and training stops after ``patience`` evaluations without improvement (counted after
``min_steps``: binary tasks sit at chance for hundreds of steps before the tiny models learn them) or at
``max_steps``. The test split is scored once, with the best weights. Zero-shot arms (``finetune:
false``) are scored as they start.

Under ``accelerate launch -n N`` every stage trains with all N processes (DDP): rank 0 decides from the
cache whether a stage is done and writes it; the others train alongside and wait at the barriers of
:func:`run_cached`. Evaluation is sharded over the processes (:mod:`.evaluation`), so every rank gets
the same scores and the early-stopping decisions agree.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import TrainerCallback

from ..data import get_task, heldout_task, instruction_mixture, pretraining_corpus
from ..data.fingerprint import content_fingerprint
from ..data.heldout import CLASSIFICATION
from .backends import SEQ2SEQ, STAGE_DEFAULTS, Backend, backend_for, model_kind, parameter_summary
from .cache import StageCache, config_hash, config_key, process_state
from .config import ModelSpec, StudyConfig, global_batch
from .scoring import top_answer_share

logger = logging.getLogger(__name__)

#: Early-stopping defaults of the fine-tuning stage (``finetune.early_stopping`` in a recipe overrides them).
EARLY_STOPPING_DEFAULTS: dict[str, Any] = {"eval_every": 50, "patience": 4, "min_delta": 0.0, "min_steps": 0}
#: Instruction-mixture examples held out to report each model's mixture loss after instruction tuning.
MIXTURE_EVAL_SIZE = 256

__all__ = [
    "EARLY_STOPPING_DEFAULTS",
    "STAGE_DEFAULTS",
    "ValidationEarlyStopping",
    "ensure_instructed",
    "ensure_pretrained",
    "finetune_and_evaluate",
    "instruction_mixture_for",
    "load_task_splits",
    "mixture_fingerprint",
    "pretrain_key",
]


class ValidationEarlyStopping(TrainerCallback):
    """Score the validation split every ``eval_every`` optimizer steps; keep the best weights; stop on a plateau.

    ``score_fn(model) -> float`` is the validation primary metric (higher is better). Training stops
    after ``patience`` evaluations that do not beat the best by more than ``min_delta``, counted after step
    ``min_steps`` only (a plateau at chance that precedes learning does not end the run); the last step is
    always evaluated. :meth:`restore_best` loads the best weights back.
    """

    def __init__(self, score_fn, eval_every: int, patience: int, min_delta: float = 0.0, min_steps: int = 0):
        if eval_every < 1 or patience < 1:
            raise ValueError(f"eval_every and patience must be >= 1, got {eval_every} and {patience}")
        if min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {min_steps}")
        self.score_fn, self.eval_every, self.patience, self.min_delta = score_fn, eval_every, patience, min_delta
        self.min_steps = min_steps
        self.best_score, self.best_step, self.best_state = -float("inf"), 0, None
        self.history: list[tuple[int, float]] = []
        self._bad = 0

    def _evaluate(self, state, control, model) -> None:
        if self.history and self.history[-1][0] == state.global_step:
            return
        score = float(self.score_fn(model))
        model.train()
        self.history.append((state.global_step, score))
        if self.best_state is None or score > self.best_score + self.min_delta:
            self.best_score, self.best_step, self._bad = score, state.global_step, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif state.global_step > self.min_steps:
            self._bad += 1
            if self._bad >= self.patience:
                control.should_training_stop = True
        logger.info("step %d: validation %.4f (best %.4f at step %d)%s", state.global_step, score, self.best_score,
                    self.best_step, "; stopping" if control.should_training_stop else "")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.eval_every == 0 or state.global_step >= state.max_steps:
            self._evaluate(state, control, model)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0:
            self._evaluate(state, control, model)
        return control

    def restore_best(self, model) -> None:
        if self.best_state is None:
            raise RuntimeError("no validation evaluation ran: the fine-tuning stage trained for 0 steps")
        model.load_state_dict(self.best_state)


#: The ``data`` settings that determine the instruction mixture (part of the instruct stage's key).
MIXTURE_DATA_KEYS: tuple[str, ...] = ("source", "mixture_size", "few_shot_fraction", "max_shots", "instruction_dataset",
                                      "instruction_config", "instruction_split", "seed")


@functools.lru_cache(maxsize=8)
def _corpus_fingerprint(corpus_size: int, seed: int) -> str:
    return content_fingerprint(pretraining_corpus(corpus_size, seed=seed))


@functools.lru_cache(maxsize=8)
def _embedded_mixture_fingerprint(settings: tuple[tuple[str, Any], ...]) -> str:
    return content_fingerprint(instruction_mixture_for(dict(settings)), ("inputs", "targets"))


def mixture_fingerprint(data: dict[str, Any]) -> str | None:
    """:func:`~hf_moe_tuning.data.fingerprint.content_fingerprint` of the embedded instruction mixture a recipe's
    ``data`` names (``None`` for a Hub mixture: the dataset's name and split identify it)."""
    if data.get("source") == "hub":
        return None
    return _embedded_mixture_fingerprint(tuple((k, data[k]) for k in MIXTURE_DATA_KEYS if k in data))


def instruction_mixture_for(data: dict[str, Any]) -> Dataset:
    """The instruction mixture a recipe's ``data`` section names: embedded (default) or a Hub Flan collection."""
    if data.get("source") == "hub":
        from ..data.hub import flan_mixture

        return flan_mixture(
            data["instruction_dataset"], data.get("mixture_size", 20_000), data.get("instruction_split", "train"),
            data.get("instruction_config"), seed=data.get("seed", 0),
        )
    return instruction_mixture(
        data.get("mixture_size", 20_000), seed=data.get("seed", 0),
        few_shot_fraction=data.get("few_shot_fraction", 0.3), max_shots=data.get("max_shots", 2),
    )


def run_cached(cache: StageCache, path: Path, payload: dict, compute) -> dict[str, Any]:
    """Return the cached result of stage ``path`` or run ``compute(path) -> result`` under the stage lock.

    With several processes every rank runs ``compute`` (it trains collectively), but only rank 0 takes
    the lock, decides whether the stage is done, empties the folder and marks it done; the others wait
    for it at barriers and return rank 0's result.
    """
    state = process_state()
    if state is None:
        with cache.lock(path):
            if cache.is_done(path):
                return {**cache.result(path), "cached": True}
            cache.prepare(path)
            result = compute(path)
            cache.finish(path, payload, result)
        return {**result, "cached": False}

    from accelerate.utils import broadcast_object_list

    main = state.is_main_process
    with cache.lock(path) if main else contextlib.nullcontext():
        done = broadcast_object_list([cache.is_done(path) if main else None])[0]
        if done:
            result = broadcast_object_list([cache.result(path) if main else None])[0]
            return {**result, "cached": True}
        if main:
            cache.prepare(path)
        state.wait_for_everyone()  # the folder exists (and is empty) before any rank writes into it
        result = compute(path)
        if main:
            cache.finish(path, payload, result)
        result = broadcast_object_list([result if main else None])[0]
    state.wait_for_everyone()  # rank 0 released the lock; the stage's model is on disk for every rank
    return {**result, "cached": False}


def _backend_payload(backend: Backend) -> dict[str, Any]:
    # encoder-decoder keys stay as they were (shipped checkpoints are found by them)
    return {} if backend.name == SEQ2SEQ else {"backend": backend.name, "sft": backend.config.sft}


# ------------------------------------------------------------------------------------------ base models
def pretrain_key(config: StudyConfig, spec: ModelSpec) -> dict[str, Any]:
    """The configuration payload of the pretraining stage of ``spec``."""
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
            max_source_length=int(config.data.get("max_source_length", 192)),
        )
        # the corpus's content: a shipped stage is found by this key alone, not by the source hash
        payload["corpus"] = _corpus_fingerprint(payload["corpus_size"], payload["data_seed"])
    return {**payload, **_backend_payload(backend_for(config, spec))}


def _shipped(shipped_dir: str | None, stage: str, spec: ModelSpec, payload: dict[str, Any]) -> tuple[str, dict] | None:
    """``(model path, info)`` of the shipped, finished ``stage`` of ``spec`` under ``shipped_dir`` whose configuration
    key is that of ``payload`` (configuration only: shipped stages are inputs, like a Hub checkpoint), else ``None``."""
    if not shipped_dir:
        return None
    found = StageCache(shipped_dir).path(stage, spec.name, config_key(payload))
    if StageCache.is_done(found):
        logger.info("using the shipped %s stage of %s (%s)", stage, spec.name, found)
        return str(found / "model"), {**StageCache.result(found), "cached": True, "shipped": str(found)}
    logger.info("no shipped %s stage for %s with configuration key %s: training it", stage, spec.name, config_key(payload))
    return None


def instruct_key(config: StudyConfig, spec: ModelSpec, start_key: str) -> dict[str, Any]:
    """The configuration payload of the instruct stage of ``spec`` starting from the stage keyed ``start_key``."""
    stage, data = config.instruct, config.data
    return {
        "stage": "instruct",
        "upstream": start_key,
        "seed": stage.seed,
        "data": {k: data.get(k) for k in MIXTURE_DATA_KEYS},
        # the mixture's content: a shipped stage is found by this key alone, not by the source hash
        "mixture": mixture_fingerprint(data),
        "mixture_eval_size": MIXTURE_EVAL_SIZE,
        "args": stage.args,
        "sparse_args": stage.sparse_args if stage.family_args else {},
        "dense_args": stage.dense_args if stage.family_args else {},
        "model_args": spec.args,
        "max_source_length": int(data.get("max_source_length", 192)),
        "max_target_length": int(data.get("max_target_length", 48)),
        **_backend_payload(backend_for(config, spec)),
    }


def instruct_shipped_key(config: StudyConfig, spec: ModelSpec, payload: dict[str, Any]) -> dict[str, Any]:
    """The payload a shipped instruct stage is keyed by: ``payload`` with the upstream pretrain stage named by
    its configuration key (the cache's ``upstream`` also holds the code and platform of the run)."""
    return {**payload, "upstream": config_key(pretrain_key(config, spec))}


def ensure_pretrained(config: StudyConfig, spec: ModelSpec, cache: StageCache, progress: bool = False) -> tuple[str, str, dict]:
    """Path (or Hub id) of the pretrained model for ``spec`` and its stage key; trains it if not cached.

    Returns ``(path_or_id, key, info)``; ``info`` has ``seconds``, ``cached``, ``params`` (sizes) and, for a
    shipped checkpoint, ``shipped`` (its folder).
    """
    backend = backend_for(config, spec)
    payload = pretrain_key(config, spec)
    key = config_hash(payload)
    if not spec.is_tiny:
        return spec.init, key, {"seconds": 0.0, "cached": True}
    if config.pretrain.enabled and (found := _shipped(config.pretrain.extra.get("shipped_dir"), "pretrain", spec, payload)):
        return found[0], key, found[1]
    path = cache.path("pretrain" if config.pretrain.enabled else "init", spec.name, key)

    def pretrain(path: Path) -> dict:
        tokenizer = backend.tokenizer()
        model = backend.initial_model(tokenizer, config.pretrain.seed)
        kind = spec.kind or model_kind(model)
        result: dict[str, Any] = {"seconds": 0.0, "kind": kind, "params": parameter_summary(model)}
        if config.pretrain.enabled:
            logger.info("pretraining %s (%s) -> %s", spec.name, backend.name, path)
            args = {**config.pretrain.args_for(kind), **spec.args}
            outcome = backend.train(model, tokenizer, backend.pretraining_data(tokenizer), args, path / "trainer",
                                    seed=config.pretrain.seed, progress=progress)
            result.update(seconds=outcome.seconds, train_loss=outcome.metrics.get("train_loss"))
            backend.save(outcome.model, path / "model", trainer=outcome.trainer)
        else:
            backend.save(model, path / "model")
        return result

    return str(path / "model"), key, run_cached(cache, path, payload, pretrain)


def ensure_instructed(
    config: StudyConfig, spec: ModelSpec, start: str, start_key: str, cache: StageCache, progress: bool = False
) -> tuple[str, str, dict]:
    """Instruction-tune the model at ``start`` on the mixture; cached. ``info["mixture_eval_loss"]`` is its
    loss on :data:`MIXTURE_EVAL_SIZE` held-out mixture examples. A shipped stage (``instruct.shipped_dir``)
    with the same configuration is used instead of training, as for pretraining; ``info["shipped"]`` names it."""
    backend = backend_for(config, spec)
    stage, data = config.instruct, config.data
    payload = instruct_key(config, spec, start_key)
    key = config_hash(payload)
    if spec.is_tiny and (found := _shipped(stage.extra.get("shipped_dir"), "instruct", spec,
                                           instruct_shipped_key(config, spec, payload))):
        return found[0], key, found[1]
    path = cache.path("instruct", spec.name, key)

    def instruct(path: Path) -> dict:
        logger.info("instruction-tuning %s (%s) -> %s", spec.name, backend.name, path)
        tokenizer = backend.tokenizer()
        model = backend.load(start, tokenizer)
        kind = spec.kind or model_kind(model)
        mixture = instruction_mixture_for(data)
        held_out = min(MIXTURE_EVAL_SIZE, len(mixture) // 10)
        train = backend.pairs(mixture.select(range(len(mixture) - held_out)), tokenizer)
        evaluation = backend.pairs(mixture.select(range(len(mixture) - held_out, len(mixture))), tokenizer)
        args = {**stage.args_for(kind), **spec.args}
        outcome = backend.train(model, tokenizer, train, args, path / "trainer", seed=stage.seed, progress=progress,
                                eval_dataset=evaluation)
        backend.save(outcome.model, path / "model", trainer=outcome.trainer)
        return {
            "seconds": outcome.seconds, "train_loss": outcome.metrics.get("train_loss"), "kind": kind,
            "mixture_eval_loss": outcome.metrics.get("eval_lm_loss", outcome.metrics.get("eval_loss")),
            "mixture_examples": len(train),
        }

    return str(path / "model"), key, run_cached(cache, path, payload, instruct)


# ------------------------------------------------------------------------------------------ tasks
def load_task_splits(config: StudyConfig, task: str):
    """Train/validation/test splits and ``(kind, metrics)`` of a task of the recipe."""
    data = config.data
    if data.get("source") == "hub":
        from ..data.hub import superglue_task

        splits = superglue_task(task, data["task_dataset"], seed=data.get("seed", 0), train_size=data.get("train_size"),
                                validation_size=data.get("validation_size", 200))
        return splits, CLASSIFICATION, ("accuracy",)
    spec = get_task(task)
    splits = heldout_task(task, seed=data.get("seed", 0), train_size=data.get("train_size", 128),
                          validation_size=data.get("validation_size", 64), test_size=data.get("test_size", 200))
    return splits, spec.kind, spec.metrics


def early_stopping_settings(config: StudyConfig) -> dict[str, Any]:
    """The fine-tuning stage's early-stopping settings (recipe ``finetune.early_stopping`` over the defaults)."""
    return {**EARLY_STOPPING_DEFAULTS, **config.finetune.extra.get("early_stopping", {})}


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
    progress: bool = False,
) -> dict[str, Any]:
    """Fine-tune the arm's start model on ``task`` with ``seed`` (to the best validation score) and evaluate it.

    Zero-shot arms (``finetune: false``) are evaluated as they start, once for all seeds. Cached by key.
    """
    arm = config.arms[arm_name]
    spec = config.models[arm.model]
    backend = backend_for(config, spec)
    ev = config.evaluate
    split = ev.get("split", "test")
    stopping = early_stopping_settings(config)
    payload = {
        "stage": "finetune" if arm.finetune else "zero-shot",
        "upstream": start_key,
        "task": task,
        "seed": seed if arm.finetune else 0,
        "data": {k: config.data.get(k) for k in ("source", "task_dataset", "seed", "train_size", "validation_size", "test_size")},
        "evaluate": ev,
        "max_source_length": int(config.data.get("max_source_length", 192)),
        "max_target_length": int(config.data.get("max_target_length", 48)),
        **_backend_payload(backend),
    }
    if arm.finetune:
        payload.update(
            args=config.finetune.args,
            sparse_args=config.finetune.sparse_args if config.finetune.family_args else {},
            dense_args=config.finetune.dense_args if config.finetune.family_args else {},
            model_args=spec.args,
            arm_args=arm.args,
            kind=spec.kind,
            early_stopping=stopping,
        )
    key = config_hash(payload)
    path = cache.path(payload["stage"], f"{arm_name}-{task}-s{payload['seed']}", key)

    def finetune(path: Path) -> dict:
        tokenizer = backend.tokenizer()
        model = backend.load(start, tokenizer)
        model_type = spec.kind or model_kind(model)
        args = {**config.finetune.args_for(model_type), **spec.args, **arm.args}
        record: dict[str, Any] = {"optimizer_steps": 0, "train_tokens": 0, "best_step": 0, "train_seconds": 0.0}
        if arm.finetune:
            train = backend.pairs(splits["train"], tokenizer)
            stopper = ValidationEarlyStopping(
                lambda m: backend.evaluate(m, tokenizer, splits["validation"], kind, metrics[:1]).metrics[metrics[0]],
                int(stopping["eval_every"]), int(stopping["patience"]), float(stopping["min_delta"]),
                int(stopping["min_steps"]),
            )
            with tempfile.TemporaryDirectory(dir=path) as tmp:
                outcome = backend.train(model, tokenizer, train, args, tmp, seed=seed, callbacks=[stopper], progress=progress)
            model = outcome.model
            stopper.restore_best(model)
            record.update(
                optimizer_steps=outcome.optimizer_steps, train_tokens=outcome.train_tokens, best_step=stopper.best_step,
                validation_score=100.0 * stopper.best_score, validation_history=stopper.history,
                train_loss=outcome.metrics.get("train_loss"), train_seconds=outcome.seconds,
                learning_rate=args.get("learning_rate"), batch_size=global_batch(args),
            )
        start_eval = time.perf_counter()
        result = backend.evaluate(model, tokenizer, splits[split], kind, metrics)
        return {
            **record,
            "arm": arm_name,
            "task": task,
            "kind": model_type,
            "split": split,
            "metrics": result.metrics,
            "items": result.items,
            "primary_metric": metrics[0],
            "top_answer_share": top_answer_share(result.predictions) if kind == CLASSIFICATION else None,
            "eval_seconds": time.perf_counter() - start_eval,
            "freeze_strategy": args.get("moe_freeze_strategy", "all") if arm.finetune else "none",
        }

    result = run_cached(cache, path, payload, finetune)
    return {**result, "arm": arm_name, "seed": seed}
