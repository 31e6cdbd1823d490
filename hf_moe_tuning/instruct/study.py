"""The Flan-MoE four-arm comparison in decoder-only form, trained with TRL's ``SFTTrainer``.

Stages (each cached by configuration hash with :class:`~hf_moe_tuning.study.cache.StageCache`):

1. **pretrain** (tiny only): plain causal-LM training on the embedded corpus, so the models know the
   world the tasks talk about (without it neither arm can transfer anything);
2. **instruct**: SFT on the embedded instruction mixture in chat format (completion-only loss);
3. **finetune + evaluate**: SFT on each held-out task's 128 training examples, then rank
   classification / greedy generation on its test split in the same chat format.

Arms (``recipes/instruct_moe/tiny.yaml``): a dense Llama-style model and a Mixtral-style MoE with the
same active compute (top-2 of 4 experts of width ``I`` vs one MLP of width ``2·I``), each fine-tuned
directly or after instruction tuning. :func:`run_instruct_study` writes ``results.csv``,
``results.md`` (mean ± std over seeds and the Flan-MoE deltas) and ``plot.png`` with the study
package's writer, plus a section with the models' sizes and the routing statistics of the MoE stages.
"""

from __future__ import annotations

import datetime
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..anatomy import ParamGroup, describe_moe
from ..data import pretraining_corpus
from ..models import build_tiny_model
from ..study.cache import StageCache, config_hash
from ..study.config import ModelSpec
from ..study.report import StudyResult, environment_versions, write_results
from ..study.stages import instruction_mixture_for, load_task_splits
from .chat import ensure_chat_template, text_dataset, to_prompt_completion
from .config import InstructStudyConfig, load_instruct_config, lora_config
from .evaluation import evaluate_chat_task
from .sft import align_special_tokens, run_sft

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = "recipes/instruct_moe/tiny.yaml"
#: Routing statistics kept from the last log of each MoE training stage.
ROUTING_KEYS = ("moe/load_cv_mean", "moe/entropy_mean", "moe/max_violation_max", "moe/dead_experts_total", "router/aux_loss", "router/z_loss")


# ------------------------------------------------------------------------------------------ models
def load_tokenizer(config: InstructStudyConfig, spec: ModelSpec):
    """``ByT5Tokenizer()`` for ``tokenizer: byt5``, else the model's (or named) Hub tokenizer, with a chat template."""
    from transformers import AutoTokenizer, ByT5Tokenizer  # noqa: PLC0415

    if config.tokenizer == "byt5":
        tokenizer = ByT5Tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(spec.init if config.tokenizer == "auto" else config.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ensure_chat_template(tokenizer, config.chat_template)


def load_causal_lm(path: str, bf16: bool = False):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)


def model_kind(model) -> str:
    return "sparse" if describe_moe(model).is_moe else "dense"


def parameter_summary(model) -> dict[str, Any]:
    """Total parameters and parameters active per token (routed experts count ``top_k / num_experts``)."""
    anatomy = describe_moe(model)
    total = sum(p.numel() for p in model.parameters())
    params = dict(model.named_parameters())
    experts = sum(params[name].numel() for name in anatomy.params_in(ParamGroup.EXPERTS)) if anatomy.is_moe else 0
    active_share = (
        sum(layer.top_k / layer.num_experts for layer in anatomy.layers) / len(anatomy.layers) if anatomy.is_moe else 1.0
    )
    return {"total": total, "active": int(total - experts + experts * active_share), "kind": model_kind(model)}


def _routing_summary(outcome) -> dict[str, float]:
    out = {}
    for key in ROUTING_KEYS:
        record = outcome.last_log_with(key)
        if record is not None:
            out[key] = float(record[key])
    return out


def _peft(config: InstructStudyConfig, model):
    return lora_config(config.lora, sparse=model_kind(model) == "sparse") if config.lora else None


def _save(model, path: Path) -> None:
    if hasattr(model, "merge_and_unload"):  # LoRA: later stages start from the merged weights
        model = model.merge_and_unload()
    model.save_pretrained(path)


def _bf16(args: dict[str, Any]) -> bool:
    return bool(args.get("bf16", False))


def ensure_pretrained(config: InstructStudyConfig, spec: ModelSpec, cache: StageCache) -> tuple[str, str, dict]:
    """Path of the (causal-LM pretrained) start model of ``spec`` and its stage key; trains it if not cached."""
    stage = config.pretrain
    payload = {"stage": "pretrain-causal", "init": spec.init, "overrides": spec.overrides, "tokenizer": config.tokenizer}
    if stage.enabled and spec.is_tiny:
        payload.update(
            seed=stage.seed, corpus_size=config.data.get("corpus_size", 20_000), data_seed=config.data.get("seed", 0),
            args=stage.args, sparse_args=stage.sparse_args, dense_args=stage.dense_args, model_args=spec.args,
            sft=config.sft_options(),
        )
    key = config_hash(payload)
    if not spec.is_tiny:
        return spec.init, key, {"seconds": 0.0, "cached": True}
    path = cache.path("pretrain-causal" if stage.enabled else "init", spec.name, key)
    if cache.is_done(path):
        return str(path / "model"), key, {**cache.result(path), "cached": True}
    cache.prepare(path)
    tokenizer = load_tokenizer(config, spec)
    model = align_special_tokens(build_tiny_model(spec.init[5:], seed=stage.seed, **spec.overrides), tokenizer)
    result: dict[str, Any] = {"seconds": 0.0, "kind": model_kind(model), "params": parameter_summary(model)}
    if stage.enabled:
        logger.info("pretraining %s (causal LM) -> %s", spec.name, path)
        corpus = text_dataset(pretraining_corpus(config.data.get("corpus_size", 20_000), seed=config.data.get("seed", 0)))
        args = {**stage.args_for(result["kind"]), **spec.args}
        outcome = run_sft(model, tokenizer, corpus, args, str(path / "trainer"), stage.seed, config.sft_options())
        result.update(seconds=outcome.seconds, train_loss=outcome.metrics.get("train_loss"), routing=_routing_summary(outcome))
    model.save_pretrained(path / "model")
    cache.finish(path, payload, result)
    return str(path / "model"), key, {**result, "cached": False}


def instruction_dataset(config: InstructStudyConfig):
    """The instruction mixture (embedded, or a Hub Flan collection) in conversational prompt/completion form."""
    return to_prompt_completion(instruction_mixture_for(config.data), config.system)


def ensure_instructed(config: InstructStudyConfig, spec: ModelSpec, start: str, start_key: str, cache: StageCache) -> tuple[str, str, dict]:
    """Instruction-tune (SFT on the chat-format mixture) the model at ``start``; cached by config hash."""
    stage, data = config.instruct, config.data
    payload = {
        "stage": "instruct-sft", "upstream": start_key, "seed": stage.seed,
        "data": {k: data.get(k) for k in ("source", "mixture_size", "few_shot_fraction", "max_shots", "instruction_dataset", "instruction_config", "seed")},
        "args": stage.args, "sparse_args": stage.sparse_args, "dense_args": stage.dense_args, "model_args": spec.args,
        "sft": config.sft,
    }
    key = config_hash(payload)
    path = cache.path("instruct-sft", spec.name, key)
    if cache.is_done(path):
        return str(path / "model"), key, {**cache.result(path), "cached": True}
    cache.prepare(path)
    logger.info("instruction-tuning %s (SFT, chat format) -> %s", spec.name, path)
    tokenizer = load_tokenizer(config, spec)
    kind_args = stage.args_for(spec.kind or "sparse")
    model = align_special_tokens(load_causal_lm(start, _bf16({**kind_args, **spec.args})), tokenizer)
    kind = spec.kind or model_kind(model)
    args = {**stage.args_for(kind), **spec.args}
    outcome = run_sft(model, tokenizer, instruction_dataset(config), args, str(path / "trainer"), stage.seed,
                      config.sft_options(), _peft(config, model))
    _save(outcome.trainer.model, path / "model")
    result = {"seconds": outcome.seconds, "train_loss": outcome.metrics.get("train_loss"), "kind": kind, "routing": _routing_summary(outcome)}
    cache.finish(path, payload, result)
    return str(path / "model"), key, {**result, "cached": False}


def finetune_and_evaluate(
    config: InstructStudyConfig, arm_name: str, task: str, seed: int, start: str, start_key: str,
    splits, kind: str, metrics: tuple[str, ...], cache: StageCache,
) -> dict[str, Any]:
    """SFT the arm's start model on ``task`` with ``seed``, evaluate it in chat format; cached by config hash."""
    arm = config.arms[arm_name]
    spec = config.models[arm.model]
    ev = config.evaluate
    payload = {
        "stage": "finetune-sft", "upstream": start_key, "task": task, "seed": seed,
        "data": {k: config.data.get(k) for k in ("source", "task_dataset", "seed", "train_size", "validation_size", "test_size")},
        "args": config.finetune.args, "sparse_args": config.finetune.sparse_args, "dense_args": config.finetune.dense_args,
        "family_args": config.finetune.family_args, "model_args": spec.args, "arm_args": arm.args, "evaluate": ev, "sft": config.sft,
        "max_source_length": config.data.get("max_source_length", 192),
    }
    key = config_hash(payload)
    path = cache.path("finetune-sft", f"{arm_name}-{task}-s{seed}", key)
    if cache.is_done(path):
        return {**cache.result(path), "cached": True}
    cache.prepare(path)
    tokenizer = load_tokenizer(config, spec)
    model = align_special_tokens(load_causal_lm(start, _bf16({**config.finetune.args, **arm.args})), tokenizer)
    model_type = spec.kind or model_kind(model)
    args = {**config.finetune.args_for(model_type), **spec.args, **arm.args}
    train = to_prompt_completion(splits["train"], config.system)
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        outcome = run_sft(model, tokenizer, train, args, tmp, seed, config.sft_options(), _peft(config, model))
    model = outcome.trainer.model
    start_eval = time.perf_counter()
    scores = evaluate_chat_task(
        model, tokenizer, splits[ev.get("split", "test")], kind, metrics,
        batch_size=int(ev.get("batch_size", 64)), max_new_tokens=int(ev.get("max_new_tokens", 48)),
        max_prompt_length=int(config.data.get("max_source_length", 192)), system=config.system,
    )
    result = {
        "arm": arm_name, "task": task, "seed": seed, "kind": model_type, "metrics": scores,
        "primary_metric": metrics[0], "score": 100.0 * scores[metrics[0]],
        "train_loss": outcome.metrics.get("train_loss"), "train_seconds": outcome.seconds,
        "eval_seconds": time.perf_counter() - start_eval, "learning_rate": args.get("learning_rate"),
        "batch_size": args.get("per_device_train_batch_size"), "freeze_strategy": args.get("moe_freeze_strategy", "all"),
        "routing": _routing_summary(outcome),
    }
    cache.finish(path, payload, result)
    return {**result, "cached": False}


# ------------------------------------------------------------------------------------------ driver
def resolve_recipe(path: str | Path | None) -> Path:
    """``path`` if given, else the tiny recipe (cwd, then the repository root)."""
    candidate = Path(path or DEFAULT_RECIPE)
    if candidate.is_file() or path is not None:
        return candidate
    if (REPO_ROOT / candidate).is_file():
        return REPO_ROOT / candidate
    raise FileNotFoundError(f"no recipe given and {candidate} not found (run from a clone of the repository or pass CONFIG)")


def _fmt_num(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def render_extra_markdown(config: InstructStudyConfig, stages: dict[str, dict[str, dict]], records: list[dict]) -> str:
    """Sizes of the models (total / active per token) and routing statistics of the MoE training stages."""
    lines = ["", "## Models and routing", ""]
    lines += ["| model | init | kind | parameters | active per token |", "|---|---|---|---|---|"]
    for name, info in stages.get("pretrain", {}).items():
        params = info.get("params")
        if params:
            lines.append(f"| {name} | `{config.models[name].init}` {config.models[name].overrides or ''} | {params['kind']} | "
                         f"{_fmt_num(params['total'])} | {_fmt_num(params['active'])} |")
    rows = []
    for stage in ("pretrain", "instruct"):
        for name, info in stages.get(stage, {}).items():
            if info.get("routing"):
                rows.append((f"{stage}: {name}", info["routing"]))
    for r in records:
        if r.get("routing") and r["seed"] == min(x["seed"] for x in records):
            rows.append((f"finetune: {r['arm']} / {r['task']} (seed {r['seed']})", r["routing"]))
    if rows:
        lines += ["", "Routing at the last log of each MoE training stage (`ExpertLoadCallback`, `RouterLossCallback`):", ""]
        lines += ["| stage | " + " | ".join(f"`{k}`" for k in ROUTING_KEYS) + " |", "|---|" + "---|" * len(ROUTING_KEYS)]
        for label, routing in rows:
            lines.append(f"| {label} | " + " | ".join(f"{routing[k]:.3g}" if k in routing else "–" for k in ROUTING_KEYS) + " |")
    return "\n".join(lines) + "\n"


def run_instruct_config(
    config: InstructStudyConfig,
    seeds: list[int] | None = None,
    output_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
) -> StudyResult:
    """Run every arm of a validated ``instruct_moe`` config on every task and seed; write the results."""
    seeds = list(config.seeds if seeds is None else seeds)
    output_dir = Path(output_dir or config.output_dir)
    cache = StageCache(cache_dir or config.cache_dir)
    started, cpu_started = time.perf_counter(), time.process_time()
    stage_seconds = {"pretrain": 0.0, "instruct": 0.0, "finetune+eval": 0.0}
    stages: dict[str, dict[str, dict]] = {"pretrain": {}, "instruct": {}}
    pretrained, instructed, starts = {}, {}, {}
    for name in tqdm(list(dict.fromkeys(a.model for a in config.arms.values())), desc="pretrain", disable=not progress):
        path, key, info = ensure_pretrained(config, config.models[name], cache)
        stage_seconds["pretrain"] += info.get("seconds", 0.0)
        pretrained[name], stages["pretrain"][name] = (path, key), info
    for name in tqdm(list(dict.fromkeys(a.model for a in config.arms.values() if a.instruct)), desc="instruct", disable=not progress):
        path, key, info = ensure_instructed(config, config.models[name], *pretrained[name], cache)
        stage_seconds["instruct"] += info.get("seconds", 0.0)
        instructed[name], stages["instruct"][name] = (path, key), info
    for arm in config.arms.values():
        starts[arm.name] = instructed[arm.model] if arm.instruct else pretrained[arm.model]

    tasks = {task: load_task_splits(config, task) for task in config.data["tasks"]}
    jobs = [(seed, arm, task) for seed in seeds for arm in config.arms for task in tasks]
    records = []
    finetune_started = time.perf_counter()
    bar = tqdm(jobs, desc="instruct_moe: fine-tune + evaluate", disable=not progress)
    for seed, arm, task in bar:
        bar.set_postfix_str(f"seed={seed} arm={arm} task={task}")
        splits, kind, metrics = tasks[task]
        records.append(finetune_and_evaluate(config, arm, task, seed, *starts[arm], splits, kind, metrics, cache))
    stage_seconds["finetune+eval"] = time.perf_counter() - finetune_started
    result = StudyResult(
        config=config, records=records, seeds=seeds,
        meta={
            "command": command or " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
            "wall_seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started,
            "cached_runs": sum(1 for r in records if r.get("cached")),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "stage_seconds": stage_seconds,
            "versions": {**environment_versions(), **_extra_versions()},
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        },
    )
    paths = write_results(result, output_dir)
    with paths["md"].open("a") as f:
        f.write(render_extra_markdown(config, stages, records))
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return result


def _extra_versions() -> dict[str, str]:
    import importlib.metadata as md  # noqa: PLC0415

    out = {}
    for dist in ("trl", "peft"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def run_instruct_study(
    recipe: str | Path | None = None,
    num_seeds: int | None = None,
    overrides: dict[str, Any] | None = None,
    **kwargs: Any,
) -> StudyResult:
    """The decoder-only four-arm comparison (dense vs MoE, each with and without instruction tuning).

    Args:
        recipe: an ``instruct_moe`` recipe YAML (default ``recipes/instruct_moe/tiny.yaml``).
        num_seeds: fine-tuning seeds ``0..N-1`` (default: the recipe's ``seeds``).
        overrides: dotted-key overrides (``{"finetune.args.num_train_epochs": 2}``).
        **kwargs: ``output_dir``, ``cache_dir``, ``progress``, ``command`` of :func:`run_instruct_config`.

    Writes ``results.csv``, ``results.md`` and ``plot.png`` to ``output_dir`` (default ``results/instruct_moe``).
    """
    config = load_instruct_config(resolve_recipe(recipe), overrides)
    seeds = list(range(num_seeds)) if num_seeds is not None else None
    return run_instruct_config(config, seeds=seeds, **kwargs)
