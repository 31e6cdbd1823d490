"""Model cards for MoE fine-tuning runs, and pushing finished runs to the Hub.

The card is a ``huggingface_hub.ModelCard``. Its YAML metadata holds ``base_model`` (when the run
started from a Hub model), ``library_name`` (``transformers``, or ``peft`` for adapters), tags (``moe``,
``mixture-of-experts``, ``hf-moe-tuning``, ``freeze-<strategy>``, ``lora`` for adapters), ``datasets``
and, where evaluation ran, the final evaluation metrics as ``model-index``. The body's *MoE fine-tuning*
section (:func:`moe_card_section`) gives the freezing strategy with the trainable share per parameter
group (or the LoRA table for adapters), the router-loss coefficients and schedules with their last
logged values, the expert-load summary table with the heatmap image, the training arguments that
matter, and the recipe/arm that produced the run.

Where the information comes from (all optional except the model itself):

=============================  ==========================================================================
file in ``OUTPUT_DIR``          used for
=============================  ==========================================================================
``config.json`` + weights       model type, architecture (a finished full fine-tune: ``save_pretrained``)
``adapter_config.json`` +       LoRA rank, targets, adapter scalars per group (a finished adapter run)
``adapter_model.safetensors``
``trainer_state.json``          log history (metrics, router losses) and the freezing plan
                                (``stateful_callbacks.MoEFreezingCallback.attributes``); the newest
                                ``checkpoint-*/trainer_state.json`` when the folder has none
``moe_run.json``                what trained: router-loss coefficients/schedules, freezing plan, expert
                                options, base model, hyperparameters (written by the MoE callbacks at
                                train start, :mod:`hf_moe_tuning.hub.run_record`)
``expert_load.jsonl``           per-layer expert counts written by ``ExpertLoadCallback``
``expert_load_*.png``           heatmaps, embedded in the card and uploaded with it
``run_info.json``               base model, datasets, evaluation dataset, recipe/arm (convention below)
=============================  ==========================================================================

``training_args.bin`` is never read: it is a pickle, and unpickling a file from a run folder can run
arbitrary code. Nor is it uploaded (it holds the raw ``hub_token``).

``run_info.json`` convention (written by :func:`write_run_info`; every key optional, extra keys are
listed in the card's recipe table)::

    {
      "base_model": "google/switch-base-8",   # Hub id, local path or "tiny:<name>" the run started from
      "base_seed": 0,                          # seed of a "tiny:<name>" base (random init)
      "datasets": ["org/dataset"],             # Hub dataset ids trained on (card metadata `datasets`)
      "eval_dataset": {"type": "org/dataset", "name": "Dataset", "split": "validation"},  # model-index
      "pipeline_tag": "text2text-generation",  # overrides the tag derived from the architecture
      "recipe": "recipes/flan_moe/tiny.yaml", "study": "flan_moe", "variant": "tiny",
      "arm": "flan_moe", "stage": "finetune", "task": "entailment", "seed": 0,
      "command": "hf-moe-tuning compare recipes/flan_moe/tiny.yaml"
    }

Commands::

    hf-moe-tuning card OUTPUT_DIR                      # writes OUTPUT_DIR/README.md
    hf-moe-tuning push OUTPUT_DIR user/repo [--private] [--revision BRANCH] [--merge-adapter] [--dry-run]

A push uploads an allow-list of top-level files only (:data:`UPLOAD_ALLOW_PATTERNS`: safetensors
weights and their index, configs, tokenizer files, the card, the adapter, this package's JSON files and
PNG plots); hidden files, folders, pickles (``*.bin``, ``*.pt``, ``*.pth``) and symlinks that point out of
the folder never go. ``--dry-run`` prints that list and touches no network.

In Python, ``MoETrainer`` (with :class:`MoECardMixin`) writes the card in ``create_model_card`` and
``push_to_hub`` uploads it with the heatmaps; :func:`push_run` pushes any finished run.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

import huggingface_hub
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from huggingface_hub.utils import validate_repo_id
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.utils import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from .adapters import is_peft_model
from .hub.run_record import MOE_RUN_NAME, RECORDED_ARGS, callback_settings, read_moe_run, recorded_training_args

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
RUN_INFO_NAME = "run_info.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
EXPERT_LOAD_JSONL = "expert_load.jsonl"
TRAIN_HEATMAP = "expert_load_train.png"
PROJECT_URL = "https://github.com/hf-moe-tuning/hf_moe_tuning"

#: The only files a push uploads: fnmatch patterns on top-level file names (nothing in sub-folders).
UPLOAD_ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors",  # model.safetensors, model-0000i-of-0000n.safetensors, adapter_model.safetensors
    "*.safetensors.index.json",
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    ADAPTER_CONFIG_NAME,
    # tokenizer / processor files
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    # the card and this package's own files
    CARD_NAME,
    MOE_RUN_NAME,
    RUN_INFO_NAME,
    EXPERT_LOAD_JSONL,
    TRAINER_STATE_NAME,
    "*.png",
)

#: Never uploaded even where an allow pattern matches (defence in depth; also passed to ``upload_folder``):
#: hidden and private files, anything in a sub-folder, pickles, optimizer/scheduler/RNG state.
UPLOAD_IGNORE_PATTERNS: tuple[str, ...] = (
    ".*",
    "_*",
    "*/*",
    TRAINING_ARGS_NAME,
    "*.bin",
    "*.pt",
    "*.pth",
    "*.pkl",
    "*.pickle",
    "*.lock",
)

#: Training arguments shown in the card (when set), in this order.
CARD_ARGS: tuple[str, ...] = RECORDED_ARGS

_RUN_INFO_TYPES: dict[str, type | tuple[type, ...]] = {
    "base_model": str,
    "base_seed": int,
    "datasets": list,
    "eval_dataset": dict,
    "pipeline_tag": str,
    "recipe": str,
    "study": str,
    "variant": str,
    "arm": str,
    "stage": str,
    "task": str,
    "seed": int,
    "command": str,
}
_EVAL_SKIP = ("runtime", "samples_per_second", "steps_per_second", "epoch", "step")
_STRATEGY_TEXT = {
    "all": "every parameter trains",
    "non_moe": "everything but the routers and the routed experts trains",
    "moe": "only the routers and the routed experts train",
    "attention": "only attention trains",
    "ffn": "only the dense FFNs of non-MoE layers train",
}


class NoFinishedRunError(FileNotFoundError):
    """``OUTPUT_DIR`` holds no saved model or adapter (nothing to describe or push)."""


class CardValidationError(ValueError):
    """The card's metadata would be rejected by the Hub."""


class HubPushError(OSError):
    """A push could not start or failed at the Hub (no token, offline mode, no connection, refused); one-line message."""


# --------------------------------------------------------------------------------------------- run info


def write_run_info(output_dir: str, **fields: Any) -> str:
    """Write (merge into) ``output_dir/run_info.json``; see the module docstring for the keys."""
    for key, value in fields.items():
        expected = _RUN_INFO_TYPES.get(key)
        if expected is not None and value is not None and not isinstance(value, expected):
            raise TypeError(f"run_info {key!r} must be {getattr(expected, '__name__', expected)}, got {value!r}")
    info = read_run_info(output_dir)
    info.update({k: v for k, v in fields.items() if v is not None})
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_INFO_NAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def read_run_info(output_dir: str) -> dict[str, Any]:
    path = os.path.join(output_dir, RUN_INFO_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return info


# --------------------------------------------------------------------------------------------- run summary


@dataclass
class RunSummary:
    """Everything a card says about one run (read from disk by :func:`load_run` or a live trainer)."""

    output_dir: str
    model_type: str | None = None
    architecture: str | None = None
    base_model: str | None = None
    #: ``base_model`` is a local folder (recorded at train start), never a Hub id
    base_model_local: bool = False
    is_adapter: bool = False
    adapter: dict[str, Any] | None = None
    freeze: dict[str, Any] | None = None
    args: dict[str, Any] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    expert_load: list[dict[str, Any]] = field(default_factory=list)
    heatmaps: list[str] = field(default_factory=list)
    run_info: dict[str, Any] = field(default_factory=dict)
    moe: dict[str, Any] | None = None
    #: settings per MoE callback class that trained (``moe_run.json`` "callbacks"); ``None``: not recorded
    callbacks: dict[str, dict[str, Any]] | None = None

    @property
    def global_step(self) -> int | None:
        steps = [row["step"] for row in self.log_history if "step" in row]
        return max(steps) if steps else None

    @property
    def eval_metrics(self) -> dict[str, float]:
        """The last evaluation's metrics (``eval_`` prefix dropped), MoE diagnostics excluded."""
        for row in reversed(self.log_history):
            if any(k.startswith("eval_") for k in row):
                return {
                    k[len("eval_"):]: float(v)
                    for k, v in row.items()
                    if k.startswith("eval_")
                    and isinstance(v, (int, float))
                    and not k.endswith(_EVAL_SKIP)
                    and "/" not in k
                    and k != "eval_lm_loss"
                }
        return {}

    def last_logged(self, key: str) -> float | None:
        for row in reversed(self.log_history):
            if key in row and isinstance(row[key], (int, float)):
                return float(row[key])
        return None


def _has_weights(path: str) -> bool:
    names = set(os.listdir(path))
    full = CONFIG_NAME in names and bool(
        {SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME} & names
    )
    adapter = ADAPTER_CONFIG_NAME in names and ADAPTER_WEIGHTS_NAME in names
    return full or adapter


def _latest_checkpoint(output_dir: str) -> str | None:
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), name))
    return os.path.join(output_dir, max(found)[1]) if found else None


def require_finished_run(output_dir: str) -> None:
    """Raise :class:`NoFinishedRunError` unless ``output_dir`` holds a saved model or adapter."""
    if not os.path.isdir(output_dir):
        raise NoFinishedRunError(f"{output_dir!r} is not a directory")
    if _has_weights(output_dir):
        return
    checkpoint = _latest_checkpoint(output_dir)
    hint = (
        f"; the run has checkpoints but no final model: pass {checkpoint!r} or call trainer.save_model()"
        if checkpoint
        else "; train to the end (Trainer.save_model / save_pretrained writes them)"
    )
    raise NoFinishedRunError(
        f"no finished run in {output_dir!r}: expected config.json + model.safetensors (full fine-tune) or "
        f"adapter_config.json + adapter_model.safetensors (PEFT adapter), found {sorted(os.listdir(output_dir))}{hint}"
    )


def _load_trainer_state(output_dir: str) -> dict[str, Any]:
    path = os.path.join(output_dir, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        checkpoint = _latest_checkpoint(output_dir)
        path = os.path.join(checkpoint, TRAINER_STATE_NAME) if checkpoint else path
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _freeze_from_state(state: dict[str, Any]) -> dict[str, Any] | None:
    saved = (state.get("stateful_callbacks") or {}).get("MoEFreezingCallback")
    if isinstance(saved, list):
        saved = saved[-1] if saved else None
    attributes = (saved or {}).get("attributes") or {}
    return attributes or None


def _load_moe_run(output_dir: str) -> dict[str, Any] | None:
    """``moe_run.json`` of the folder, else of its newest checkpoint (``None`` when the run recorded none)."""
    record = read_moe_run(output_dir)
    if record is None:
        checkpoint = _latest_checkpoint(output_dir)
        record = read_moe_run(checkpoint) if checkpoint else None
    return record


def _card_base_model(output_dir: str) -> str | None:
    """``base_model`` of a card already in the folder (e.g. the one ``Trainer.create_model_card`` wrote)."""
    path = os.path.join(output_dir, CARD_NAME)
    if not os.path.isfile(path) or os.path.islink(path):
        return None
    try:
        base = (metadata_load(path) or {}).get("base_model")
    except Exception:  # noqa: BLE001 - a malformed old card only loses this fallback
        return None
    return base if isinstance(base, str) and base else None


def read_expert_load(output_dir: str) -> list[dict[str, Any]]:
    """Records of ``output_dir/expert_load.jsonl`` (empty when absent; malformed lines are skipped with a warning)."""
    path = os.path.join(output_dir, EXPERT_LOAD_JSONL)
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d is not JSON; skipped", path, number)
                continue
            if isinstance(record, dict) and isinstance(record.get("layers"), list):
                records.append(record)
    return records


def _heatmaps(output_dir: str) -> list[str]:
    names = sorted(n for n in os.listdir(output_dir) if n.startswith("expert_load") and n.endswith(".png"))
    return sorted(names, key=lambda n: (n != TRAIN_HEATMAP, n))


def _anatomy_summary(anatomy: Any) -> dict[str, Any] | None:
    if anatomy is None or not anatomy.layers:
        return None
    experts = sorted({layer.num_experts for layer in anatomy.layers})
    top_k = sorted({layer.top_k for layer in anatomy.layers})
    return {"moe_layers": len(anatomy.layers), "num_experts": experts, "top_k": top_k, "total_params": anatomy.total_params}


def _resolve_base(spec: str | None, run_info: dict[str, Any], *, meta: bool) -> Any:
    """Build the base model named by ``spec`` when that needs no download (local folder or ``tiny:<name>``)."""
    from .models import TINY_MODELS, build_tiny_model, load_model  # noqa: PLC0415

    if not spec:
        return None
    name = spec[len("tiny:"):] if spec.startswith("tiny:") else spec
    if name in TINY_MODELS:
        return build_tiny_model(name, seed=int(run_info.get("base_seed", 0)))
    if os.path.isdir(spec):
        return load_model(spec, meta=meta)
    return None


def _adapter_summary(output_dir: str, run_info: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    from .adapters import check_adapter_checkpoint, saved_adapter_groups  # noqa: PLC0415
    from .anatomy import describe_moe  # noqa: PLC0415

    config = check_adapter_checkpoint(output_dir)
    base_spec = run_info.get("base_model") or config.get("base_model_name_or_path")
    anatomy = None
    try:
        base = _resolve_base(base_spec, run_info, meta=True)
        anatomy = describe_moe(base) if base is not None else None
    except (OSError, ValueError) as err:
        logger.info("base model %r not available offline (%s); adapter sizes are listed without groups", base_spec, err)
    summary = {
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "lora_dropout": config.get("lora_dropout"),
        "task_type": config.get("task_type"),
        "target_modules": config.get("target_modules") or [],
        "target_parameters": config.get("target_parameters") or [],
        "modules_to_save": config.get("modules_to_save") or [],
        "base_model_name_or_path": config.get("base_model_name_or_path"),
    }
    if anatomy is not None:
        summary["groups"] = {
            group: {"total": total, **saved_adapter_groups(output_dir, anatomy).get(group, {"adapter": 0, "full": 0})}
            for group, total in ((g.value, n) for g, n in anatomy.group_counts().items())
        }
        summary["base_params"] = anatomy.total_params
        summary["strategy"] = _infer_strategy(summary["groups"])
    return summary, anatomy


def _infer_strategy(groups: dict[str, dict[str, int]]) -> str | None:
    """The freezing strategy whose groups are exactly those saved in full (``None`` if none fits)."""
    from .freezing import STRATEGY_GROUPS  # noqa: PLC0415

    present = {g for g, row in groups.items() if row["total"]}
    full = {g for g, row in groups.items() if row["full"]}
    if not full or any(groups[g]["full"] != groups[g]["total"] for g in full):
        return None
    for name, strategy_groups in STRATEGY_GROUPS.items():
        if {g.value for g in strategy_groups} & present == full:
            return name
    return None


def load_run(output_dir: str) -> RunSummary:
    """Read a finished run from ``output_dir`` (raises :class:`NoFinishedRunError` when there is none)."""
    require_finished_run(output_dir)
    run_info = read_run_info(output_dir)
    state = _load_trainer_state(output_dir)
    record = _load_moe_run(output_dir)
    callbacks = dict(record["callbacks"]) if record is not None else None
    freeze = _freeze_from_state(state)
    if freeze is None and callbacks:
        freeze = (callbacks.get("MoEFreezingCallback") or {}).get("plan") or None
    summary = RunSummary(
        output_dir=output_dir,
        args=dict(record["training_args"]) if record is not None else {},
        log_history=list(state.get("log_history") or []),
        freeze=freeze,
        expert_load=read_expert_load(output_dir),
        heatmaps=_heatmaps(output_dir),
        run_info=run_info,
        callbacks=callbacks,
    )
    recorded_base = (record or {}).get("base_model") or None
    anatomy = None
    from .adapters import is_adapter_dir  # noqa: PLC0415

    if is_adapter_dir(output_dir):
        summary.is_adapter = True
        summary.adapter, anatomy = _adapter_summary(output_dir, run_info)
        summary.base_model = (
            run_info.get("base_model") or recorded_base or summary.adapter.get("base_model_name_or_path")
            or _card_base_model(output_dir) or None
        )
        if anatomy is not None:
            summary.model_type = anatomy.model_type
    else:
        with open(os.path.join(output_dir, CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
        summary.model_type = config.get("model_type")
        summary.architecture = (config.get("architectures") or [None])[0]
        summary.base_model = (
            run_info.get("base_model") or recorded_base or config.get("_name_or_path") or _card_base_model(output_dir) or None
        )
        try:
            from .anatomy import describe_moe  # noqa: PLC0415
            from .models import load_model  # noqa: PLC0415

            anatomy = describe_moe(load_model(output_dir, meta=True))
        except (OSError, ValueError) as err:
            logger.info("could not describe the model in %s (%s)", output_dir, err)
    summary.base_model_local = bool(
        record and record.get("base_model_local") and recorded_base and summary.base_model == recorded_base
    )
    summary.moe = _anatomy_summary(anatomy)
    return summary


def summary_from_trainer(trainer: Any) -> RunSummary:
    """The :class:`RunSummary` of a live ``Trainer`` (its output_dir files, state, args and callbacks)."""
    from .anatomy import describe_moe  # noqa: PLC0415
    from .callbacks.freezing import MoEFreezingCallback  # noqa: PLC0415

    output_dir = trainer.args.output_dir
    run_info = read_run_info(output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    summary = RunSummary(
        output_dir=output_dir,
        args=recorded_training_args(trainer.args),
        log_history=list(trainer.state.log_history),
        expert_load=read_expert_load(output_dir) if os.path.isdir(output_dir) else [],
        heatmaps=_heatmaps(output_dir) if os.path.isdir(output_dir) else [],
        run_info=run_info,
        callbacks={
            type(cb).__name__: callback_settings(cb)
            for cb in trainer.callback_handler.callbacks
            if hasattr(cb, "moe_run_settings")
        },
    )
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, MoEFreezingCallback) and cb.report is not None:
            summary.freeze = cb.report.plan.to_dict()
    report = getattr(model, "moe_adapter_report", None)
    base = model.get_base_model() if is_peft_model(model) else model
    config = getattr(base, "config", None)
    summary.model_type = getattr(config, "model_type", None)
    summary.architecture = type(base).__name__
    if hasattr(model, "peft_config"):
        peft_config = model.peft_config[getattr(model, "active_adapter", "default")]
        summary.is_adapter = True
        summary.adapter = {
            "r": peft_config.r,
            "lora_alpha": peft_config.lora_alpha,
            "lora_dropout": peft_config.lora_dropout,
            "task_type": str(peft_config.task_type) if peft_config.task_type else None,
            "target_modules": sorted(peft_config.target_modules or []),
            "target_parameters": list(peft_config.target_parameters or []),
            "modules_to_save": list(peft_config.modules_to_save or []),
            "base_model_name_or_path": peft_config.base_model_name_or_path,
        }
        if report is not None:
            summary.adapter["groups"] = {
                g: {"total": row["total"], "adapter": row["adapter"], "full": row["full"]} for g, row in report.groups.items()
            }
            summary.adapter["base_params"] = report.base_params
            summary.adapter["strategy"] = report.strategy
    summary.base_model = run_info.get("base_model") or getattr(config, "_name_or_path", None) or None
    summary.base_model_local = bool(summary.base_model) and os.path.isdir(summary.base_model)
    summary.moe = _anatomy_summary(describe_moe(base)) if base is not None else None
    return summary


def save_run_state(trainer: Any) -> None:
    """Write ``trainer_state.json`` to ``output_dir`` with the callbacks' current exportable state.

    ``Trainer`` only records callback state in checkpoints; this makes the final folder self-describing
    (``hf-moe-tuning card OUTPUT_DIR`` then finds the freezing plan).
    """
    from transformers.trainer_callback import ExportableState  # noqa: PLC0415

    if not trainer.is_world_process_zero():
        return
    for cb in trainer.callback_handler.callbacks + [trainer.control]:
        if isinstance(cb, ExportableState):
            trainer.state.stateful_callbacks[type(cb).__name__] = cb.state()
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    trainer.state.save_to_json(os.path.join(trainer.args.output_dir, TRAINER_STATE_NAME))


# --------------------------------------------------------------------------------------------- card content


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _group_order(groups: dict[str, Any]) -> list[str]:
    """Group names in :class:`~hf_moe_tuning.anatomy.ParamGroup` order (saved JSON may be key-sorted)."""
    from .anatomy import ParamGroup  # noqa: PLC0415

    order = [g.value for g in ParamGroup]
    return sorted(groups, key=lambda g: (order.index(g) if g in order else len(order), g))


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


def _freeze_section(summary: RunSummary) -> str:
    freeze = summary.freeze
    if summary.is_adapter:
        return _adapter_section(summary)
    if not freeze:
        return "### Freezing\n\nNo freezing plan was recorded for this run (every parameter trained, or the run did not use `MoEFreezingCallback`)."
    strategy = freeze.get("strategy", "all")
    experts = freeze.get("experts", "all")
    rows = [
        (f"`{group}`", counts["trainable"], counts["total"], _pct(counts["trainable"], counts["total"]))
        for group, counts in ((g, freeze["groups"][g]) for g in _group_order(freeze.get("groups", {})))
        if counts.get("total")
    ]
    rows.append(("**total**", freeze.get("trainable_params", 0), freeze.get("total_params", 0), _pct(freeze.get("trainable_params", 0), freeze.get("total_params", 0))))
    return "\n".join(
        [
            "### Freezing",
            "",
            f"Strategy **`{strategy}`** (ST-MoE fine-tuning set): {_STRATEGY_TEXT.get(strategy, strategy)}. "
            f"Routers train: **{'yes' if freeze.get('train_router') else 'no'}**. "
            f"Trainable experts: **{experts if experts == 'all' else json.dumps(experts)}**.",
            "",
            _table(("group", "trainable", "total", "share"), rows),
        ]
    )


def _adapter_section(summary: RunSummary) -> str:
    adapter = summary.adapter or {}
    lines = [
        "### LoRA adapter",
        "",
        f"PEFT LoRA with r = **{adapter.get('r')}**, alpha = **{adapter.get('lora_alpha')}**, dropout = "
        f"{adapter.get('lora_dropout')}: {len(adapter.get('target_modules') or [])} linear modules "
        f"(`target_modules`) and {len(adapter.get('target_parameters') or [])} fused 3-D expert tensors "
        f"(`target_parameters`, one adapter per expert) are adapted; "
        f"{len(adapter.get('modules_to_save') or [])} modules train in full (`modules_to_save`"
        + (f", freezing strategy `{adapter['strategy']}`" if adapter.get("strategy") else "")
        + ").",
    ]
    groups = adapter.get("groups")
    if groups:
        rows = [
            (f"`{g}`", row["total"], row["full"], row["adapter"], _pct(row["full"] + row["adapter"], row["total"]))
            for g, row in ((g, groups[g]) for g in _group_order(groups))
            if row["total"]
        ]
        base = adapter.get("base_params") or sum(r["total"] for r in groups.values())
        full = sum(r["full"] for r in groups.values())
        lora = sum(r["adapter"] for r in groups.values())
        rows.append(("**total**", base, full, lora, _pct(full + lora, base)))
        lines += ["", _table(("group", "base params", "trained in full", "adapter params", "trainable / base"), rows)]
    return "\n".join(lines)


def _router_section(summary: RunSummary) -> str:
    settings = (summary.callbacks or {}).get("RouterLossCallback")
    if settings is None:
        if summary.callbacks is None:
            return f"### Router losses\n\nNot recorded (no `{MOE_RUN_NAME}` in the run folder)."
        return "### Router losses\n\nNone added by hf_moe_tuning (the run had no `RouterLossCallback`)."
    warmup = settings.get("warmup_steps", 0)

    def schedule(name: str) -> str:
        value = settings.get(name, "constant")
        return f"{value} (warmup {warmup} steps)" if value in ("linear_warmup", "cosine") and warmup else str(value)

    def last(key: str) -> str:
        value = summary.last_logged(key)
        return _fmt(value) if value is not None else "–"

    rows = [
        ("load balancing (aux)", settings.get("aux_coef", 0.0), schedule("aux_schedule"), last("router/aux_loss")),
        ("router z-loss", settings.get("z_coef", 0.0), schedule("z_schedule"), last("router/z_loss")),
    ]
    text = [
        "### Router losses",
        "",
        "`total = lm_loss + aux_coef(step) · aux_loss + z_coef(step) · z_loss` (hf_moe_tuning `RouterLossCallback`).",
        "",
        _table(("term", "coefficient", "schedule", "last logged value"), rows),
    ]
    lm = summary.last_logged("lm_loss")
    if lm is not None:
        text += ["", f"Last logged `lm_loss`: {_fmt(lm)}; non-finite policy: `{settings.get('nan_policy', 'error')}`."]
    return "\n".join(text)


def _controls_section(summary: RunSummary) -> str:
    """Settings of the other recording MoE callbacks (expert dropout, capacity, jitter, bias balancing)."""
    shown = {"RouterLossCallback", "MoEFreezingCallback"}
    rows = [
        (f"`{name}`", ", ".join(f"`{k}` = {_fmt(v)}" for k, v in sorted(settings.items())) or "–")
        for name, settings in sorted((summary.callbacks or {}).items())
        if name not in shown
    ]
    if not rows:
        return ""
    return "### Expert-level controls\n\n" + _table(("callback", "settings"), rows)


def _summed_loads(records: Sequence[dict[str, Any]]) -> list[Any]:
    """Per-layer :class:`LayerLoad` with the counts of ``records`` added up."""
    from .metrics.expert_load import LayerLoad  # noqa: PLC0415

    totals: dict[int, LayerLoad] = {}
    for record in records:
        for layer in record["layers"]:
            index = int(layer["layer"])
            if index not in totals:
                e = int(layer["num_experts"])
                totals[index] = LayerLoad(index, layer["path"], e, int(layer["top_k"]), 0, [0] * e, None)
            total = totals[index]
            total.tokens += int(layer.get("tokens", 0))
            total.counts = [a + int(b) for a, b in zip(total.counts, layer["counts"])]
            if layer.get("dropped") is not None:
                total.dropped = [a + int(b) for a, b in zip(total.dropped or [0] * total.num_experts, layer["dropped"])]
    return [totals[i] for i in sorted(totals)]


def expert_load_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-layer summary of summed counts: tokens, load CV, entropy, max violation, dead experts, dropped share."""
    from .metrics.expert_load import layer_statistics  # noqa: PLC0415

    rows = []
    for load in _summed_loads(records):
        stats = layer_statistics(load)
        busiest = max(range(load.num_experts), key=lambda e: load.counts[e]) if load.counts else None
        rows.append(
            {
                "layer": load.index,
                "path": load.path,
                "num_experts": load.num_experts,
                "top_k": load.top_k,
                "tokens": load.tokens,
                "busiest_expert": busiest,
                "busiest_share": load.counts[busiest] / sum(load.counts) if busiest is not None and sum(load.counts) else None,
                **stats,
            }
        )
    return rows


def _load_table(rows: Sequence[dict[str, Any]]) -> str:
    dropped = any("dropped_frac" in r for r in rows)
    header = ["MoE layer", "module", "experts (top-k)", "tokens", "load CV", "entropy", "max violation", "dead experts", "busiest expert"]
    if dropped:
        header.append("dropped")
    body = []
    for r in rows:
        row = [
            str(r["layer"]),
            f"`{r['path']}`",
            f"{r['num_experts']} (top-{r['top_k']})",
            r["tokens"],
            r.get("load_cv", "–"),
            r.get("entropy", "–"),
            r.get("max_violation", "–"),
            int(r["dead_experts"]) if "dead_experts" in r else "–",
            f"{r['busiest_expert']} ({100 * r['busiest_share']:.0f}%)" if r.get("busiest_share") is not None else "–",
        ]
        if dropped:
            row.append(f"{100 * r['dropped_frac']:.2f}%" if "dropped_frac" in r else "–")
        body.append(row)
    return _table(header, body)


def _expert_load_section(summary: RunSummary) -> str:
    lines = ["### Expert load", ""]
    train = [r for r in summary.expert_load if r.get("split") == "train"]
    evals = [r for r in summary.expert_load if str(r.get("split", "")).startswith("eval")]
    if not train and not evals:
        lines.append("No expert-load log in the run folder (`expert_load.jsonl` from `ExpertLoadCallback`).")
    if TRAIN_HEATMAP in summary.heatmaps:
        lines += [f"![Expert load over training: load / mean load per layer and expert, 1 = balanced]({TRAIN_HEATMAP})", ""]
    if train:
        steps = [r.get("step") for r in train if r.get("step") is not None]
        span = f"{len(train)} logging intervals up to step {max(steps)}" if steps else f"{len(train)} logging intervals"
        lines += [
            f"Training routing, summed over {span} (load CV = std/mean of tokens per expert, 0 = balanced; entropy "
            "normalised, 1 = balanced; max violation = max/mean − 1):",
            "",
            _load_table(expert_load_rows(train)),
        ]
    if evals:
        last = evals[-1]
        lines += ["", f"Last evaluation (`{last.get('split')}`, step {last.get('step')}):", "", _load_table(expert_load_rows([last]))]
    others = [h for h in summary.heatmaps if h != TRAIN_HEATMAP]
    if others:
        lines += ["", "Evaluation heatmaps: " + ", ".join(f"[{h}]({h})" for h in others)]
    return "\n".join(lines)


def _args_section(summary: RunSummary) -> str:
    args = dict(summary.args)
    if (args.get("max_steps") or 0) > 0:
        args.pop("num_train_epochs", None)  # max_steps wins
    rows = [(f"`{k}`", _fmt(args[k])) for k in CARD_ARGS if k in args and args[k] not in (None, [], "")]
    if not rows:
        return ""
    return "### Training arguments\n\n" + _table(("argument", "value"), rows)


def _recipe_section(summary: RunSummary) -> str:
    info = {k: v for k, v in summary.run_info.items() if k not in ("datasets", "eval_dataset", "base_seed", "pipeline_tag")}
    if not info:
        return ""
    order = ["recipe", "study", "variant", "arm", "stage", "task", "seed", "base_model", "command"]
    keys = [k for k in order if k in info] + sorted(k for k in info if k not in order)
    return "### Recipe\n\n" + _table(("key", "value"), [(k, f"`{info[k]}`" if k in ("recipe", "command") else _fmt(info[k])) for k in keys])


def moe_card_section(summary: RunSummary) -> str:
    """The *MoE fine-tuning* section of the card (Markdown)."""
    parts = ["## MoE fine-tuning", ""]
    if summary.moe:
        moe = summary.moe
        parts += [
            f"`{summary.model_type}` with {moe['moe_layers']} MoE layers "
            f"({'/'.join(map(str, moe['num_experts']))} experts, top-{'/'.join(map(str, moe['top_k']))} routing), "
            f"{moe['total_params']:,} parameters; fine-tuned with [hf_moe_tuning]({PROJECT_URL}).",
            "",
        ]
    for section in (_freeze_section, _router_section, _controls_section, _expert_load_section, _args_section, _recipe_section):
        text = section(summary)
        if text:
            parts += [text, ""]
    return "\n".join(parts).rstrip() + "\n"


# --------------------------------------------------------------------------------------------- metadata


def _hub_model_id(value: str | None) -> str | None:
    """``value`` if it names a Hub model (not a local path, not a tiny name), else ``None``."""
    from .models import TINY_MODELS  # noqa: PLC0415

    if not value or value.startswith("tiny:") or value in TINY_MODELS or os.path.exists(value) or "/" not in value:
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _pipeline_tag(summary: RunSummary) -> str | None:
    if summary.run_info.get("pipeline_tag"):
        return summary.run_info["pipeline_tag"]
    task = (summary.adapter or {}).get("task_type") or ""
    arch = summary.architecture or ""
    if "SEQ_2_SEQ" in str(task) or "ConditionalGeneration" in arch or "Seq2Seq" in arch:
        return "text2text-generation"
    if "CAUSAL" in str(task) or "CausalLM" in arch:
        return "text-generation"
    return None


def _eval_results(summary: RunSummary, pipeline_tag: str | None, datasets: Sequence[str] | None) -> list[EvalResult]:
    """The final evaluation as ``EvalResult``s; the dataset is ``run_info["eval_dataset"]``, else the first
    training dataset, else ``custom`` named after ``run_info["task"]``."""
    metrics = summary.eval_metrics
    if not metrics:
        return []
    info = summary.run_info
    dataset = info.get("eval_dataset") or {}
    datasets = list(datasets or [])
    dataset_type = dataset.get("type") or (datasets[0] if datasets else "custom")
    dataset_name = dataset.get("name") or info.get("task") or dataset_type
    return [
        EvalResult(
            task_type=pipeline_tag or "text-generation",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=dataset.get("split"),
            dataset_config=dataset.get("config"),
            metric_type=name,
            metric_name=name.replace("_", " "),
            metric_value=round(value, 6),
        )
        for name, value in sorted(metrics.items())
    ]


def card_tags(summary: RunSummary, extra: Iterable[str] = ()) -> list[str]:
    tags = ["hf-moe-tuning", "moe", "mixture-of-experts"]
    strategy = (summary.adapter or {}).get("strategy") if summary.is_adapter else (summary.freeze or {}).get("strategy")
    if strategy:
        tags.append(f"freeze-{strategy.replace('_', '-')}")
    if summary.is_adapter:
        tags.append("lora")
    if summary.model_type:
        tags.append(summary.model_type)
    tags += [t for t in extra if t]
    return list(dict.fromkeys(tags))


def build_model_card(
    summary: RunSummary,
    *,
    model_name: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | str | None = None,
    license: str | None = None,  # noqa: A002 - the Hub's field name
    language: str | Sequence[str] | None = None,
    tags: Iterable[str] = (),
    pipeline_tag: str | None = None,
) -> ModelCard:
    """The full card of a run: metadata + title + the MoE section + results + framework versions.

    Validated locally (:func:`validate_card`) before it is returned.
    """
    model_name = model_name or Path(os.path.abspath(summary.output_dir)).name
    base_spec = base_model or summary.base_model
    local_base = base_model is None and summary.base_model_local
    hub_base = None if local_base else _hub_model_id(base_spec)
    if isinstance(datasets, str):
        datasets = [datasets]
    datasets = list(datasets or summary.run_info.get("datasets") or []) or None
    pipeline_tag = pipeline_tag or _pipeline_tag(summary)
    results = _eval_results(summary, pipeline_tag, datasets)
    data = ModelCardData(
        base_model=hub_base,
        datasets=datasets,
        language=list(language) if isinstance(language, (list, tuple)) else language,
        license=license,
        library_name="peft" if summary.is_adapter else "transformers",
        pipeline_tag=pipeline_tag,
        tags=card_tags(summary, tags),
        model_name=model_name,
        eval_results=results or None,
    )
    kind = "a LoRA adapter for" if summary.is_adapter else "a fine-tuned version of"
    if hub_base:
        origin = f"[{hub_base}](https://huggingface.co/{hub_base})"
    elif base_spec:
        origin = f"`{base_spec}`" + (
            " (a tiny random-init model built by hf_moe_tuning)" if str(base_spec).startswith("tiny:")
            else " (a local folder)" if local_base or os.path.isdir(str(base_spec))
            else ""
        )
    else:
        origin = f"a `{summary.model_type or 'MoE'}` model built from its config (random init)"
    body = [
        f"# {model_name}",
        "",
        f"This model is {kind} {origin}"
        + (f", trained on {', '.join(datasets)}" if datasets else "")
        + (f" for {summary.global_step:,} steps" if summary.global_step else "")
        + ".",
        "",
        moe_card_section(summary).rstrip(),
        "",
    ]
    metrics = summary.eval_metrics
    if metrics:
        body += ["## Evaluation", "", _table(("metric", "value"), [(f"`{k}`", _fmt(v)) for k, v in sorted(metrics.items())]), ""]
    body += ["## Framework versions", ""] + [f"- {pkg} {ver}" for pkg, ver in _versions(summary.is_adapter)] + [""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    validate_card(card)
    return card


def _versions(with_peft: bool) -> list[tuple[str, str]]:
    names = ["hf_moe_tuning", "transformers", "torch", "huggingface_hub"] + (["peft"] if with_peft else [])
    out = []
    for name in names:
        try:
            out.append((name, importlib_metadata.version(name)))
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def validate_card(card: ModelCard) -> dict[str, Any]:
    """The local parts of the Hub's metadata validation; returns the metadata dict.

    ``ModelCard.validate`` needs the network, so this checks what can be checked offline: the YAML
    block parses back (``metadata_load``) to the same data, ``ModelCardData`` accepts it, the
    ``model-index`` survives ``model_index_to_eval_results`` / ``eval_results_to_model_index``, and
    ``base_model`` is a valid repo id.

    Raises:
        CardValidationError: with the reason.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, CARD_NAME)
        card.save(path)
        loaded = metadata_load(path)
    if loaded is None:
        raise CardValidationError("the card has no YAML metadata block")
    if loaded != card.data.to_dict():
        raise CardValidationError(f"metadata does not round-trip through YAML: {loaded} != {card.data.to_dict()}")
    try:
        ModelCardData(**loaded)
    except (ValueError, TypeError) as err:
        raise CardValidationError(f"ModelCardData rejects the metadata: {err}") from err
    if "model-index" in loaded:
        name, results = model_index_to_eval_results(loaded["model-index"])
        if eval_results_to_model_index(name, results) != loaded["model-index"]:
            raise CardValidationError("model-index does not round-trip through EvalResult")
    base = loaded.get("base_model")
    for value in [base] if isinstance(base, str) else base or []:
        try:
            validate_repo_id(value)
        except HFValidationError as err:
            raise CardValidationError(f"base_model {value!r} is not a Hub model id: {err}") from err
    for key in ("tags", "datasets"):
        if key in loaded and not all(isinstance(t, str) and t for t in loaded[key]):
            raise CardValidationError(f"{key} must be non-empty strings: {loaded[key]}")
    return loaded


def save_card(card: ModelCard, folder: str) -> str:
    """Write ``card`` to ``folder/README.md`` as a regular file; a ``README.md`` symlink is replaced, never written through."""
    path = os.path.join(folder, CARD_NAME)
    if os.path.islink(path):
        os.unlink(path)
    card.save(path)
    return path


def write_model_card(output_dir: str, **card_kwargs: Any) -> str:
    """Build the card of the finished run in ``output_dir`` and write ``output_dir/README.md``."""
    return save_card(build_model_card(load_run(output_dir), **card_kwargs), output_dir)


# --------------------------------------------------------------------------------------------- push


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is a valid Hub repo id, else raise ``ValueError`` naming the rule it breaks."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"invalid repo id {repo_id!r}: {err}") from err
    return repo_id


@dataclass
class UploadPlan:
    """What a push of ``folder`` sends (``files``, top-level names) and what it leaves out (``skipped``: name -> reason)."""

    folder: str
    files: list[str]
    skipped: dict[str, str] = field(default_factory=dict)


def _allowed_name(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in UPLOAD_ALLOW_PATTERNS) and not any(
        fnmatch.fnmatchcase(name, p) for p in UPLOAD_IGNORE_PATTERNS
    )


def upload_plan(folder: str) -> UploadPlan:
    """The files of ``folder`` a push uploads: top-level regular files whose name matches
    :data:`UPLOAD_ALLOW_PATTERNS` and no :data:`UPLOAD_IGNORE_PATTERNS`; a symlink only when it resolves
    to a regular file inside ``folder``. Sub-folders are never entered."""
    root = os.path.realpath(folder)
    files, skipped = [], {}
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name
            if entry.is_dir(follow_symlinks=False):
                skipped[name + "/"] = "folder"
            elif not _allowed_name(name):
                skipped[name] = "not on the allow-list"
            elif entry.is_symlink():
                target = os.path.realpath(entry.path)
                if os.path.commonpath([root, target]) != root:
                    skipped[name] = "symlink out of the folder"
                elif not os.path.isfile(target):
                    skipped[name] = "symlink to a non-file"
                else:
                    files.append(name)
            elif not entry.is_file(follow_symlinks=False):
                skipped[name] = "not a regular file"
            else:
                files.append(name)
    return UploadPlan(folder=folder, files=files, skipped=skipped)


def files_to_upload(folder: str) -> list[str]:
    """Names (sorted) of the files a push of ``folder`` uploads; see :func:`upload_plan`."""
    return upload_plan(folder).files


_MODEL_FILES = re.compile(r"(model.*\.safetensors(\.index\.json)?|adapter_model\.safetensors|adapter_config\.json|config\.json)")


def _merge_into(output_dir: str, staging: str, run_info: dict[str, Any]) -> None:
    """Merge the adapter in ``output_dir`` into its base model and save the result (and the run files) in ``staging``."""
    from peft import PeftConfig  # noqa: PLC0415

    from .adapters import load_lora_model, merge_adapter  # noqa: PLC0415

    spec = run_info.get("base_model") or PeftConfig.from_pretrained(output_dir).base_model_name_or_path
    base = _resolve_base(spec, run_info, meta=False)
    if base is None:
        raise ValueError(
            f"--merge-adapter needs the base model offline; {spec!r} is neither a local folder nor 'tiny:<name>' "
            f"(set base_model in {RUN_INFO_NAME})"
        )
    merged = merge_adapter(load_lora_model(base, output_dir))
    merged.save_pretrained(staging)
    for name in files_to_upload(output_dir):
        if name == CARD_NAME or _MODEL_FILES.fullmatch(name):
            continue
        shutil.copyfile(os.path.join(output_dir, name), os.path.join(staging, name))


def _hub_error_types() -> tuple[type[BaseException], ...]:
    """Errors of a failed Hub call: ``OSError`` (``HfHubHTTPError``, ``OfflineModeIsEnabled``, ``ConnectionError``)
    and the base error of the HTTP client ``huggingface_hub`` uses (``httpx`` / ``httpx2`` transport errors)."""
    types: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        error = getattr(module, "HTTPError", None) if module is not None else None
        if isinstance(error, type) and issubclass(error, BaseException):
            types.append(error)
    return tuple(types)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n")[0].split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _require_hub_access(token: str | None) -> str:
    """The token to push with; raises :class:`HubPushError` in offline mode or when there is no token (no network used)."""
    if hub_constants.is_offline_mode():
        raise HubPushError("HF_HUB_OFFLINE is set: pushing needs the Hub; unset it, or use --dry-run to list the files")
    if token:
        return token
    try:
        token = huggingface_hub.get_token()
    except Exception as err:  # e.g. a failed OIDC exchange or token refresh
        raise HubPushError(f"could not get a Hugging Face token ({_one_line(err)})") from err
    if not token:
        raise HubPushError(
            "no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token (nothing was uploaded)"
        )
    return token


def push_run(
    output_dir: str,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    merge_adapter: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
    dry_run: bool = False,
    **card_kwargs: Any,
) -> Any:
    """Write the card of the finished run in ``output_dir`` and upload the run to ``repo_id``.

    Everything is checked before the first Hub call: the repo id, that the folder holds a finished
    run, (adapters) that every adapter target has saved weights and exists in the base model when
    that is available offline, offline mode, and that there is a token. ``merge_adapter`` uploads the
    base model with the adapter merged in (``merge_and_unload``) instead of the adapter. Only the
    files of :func:`upload_plan` are sent, through ``HfApi.upload_folder`` with exactly those names as
    ``allow_patterns``.

    Args:
        dry_run: build and validate the card without writing it, and return the :class:`UploadPlan`
            (``README.md`` included) without any network call.

    Returns:
        The ``CommitInfo`` of ``upload_folder``, or the :class:`UploadPlan` with ``dry_run``.

    Raises:
        ValueError: a bad repo id or request; :class:`NoFinishedRunError`: nothing to push;
        :class:`HubPushError`: no token, offline mode, or the Hub could not be reached / refused the push.
    """
    from .adapters import check_adapter_checkpoint, is_adapter_dir  # noqa: PLC0415

    check_repo_id(repo_id)
    require_finished_run(output_dir)
    adapter = is_adapter_dir(output_dir)
    run_info = read_run_info(output_dir)
    if adapter:
        spec = run_info.get("base_model") or check_adapter_checkpoint(output_dir).get("base_model_name_or_path")
        check_adapter_checkpoint(output_dir, base_model=_resolve_base(spec, run_info, meta=True))
    elif merge_adapter:
        raise ValueError(f"--merge-adapter was given, but {output_dir!r} holds a full model, not an adapter")
    if not dry_run:
        token = _require_hub_access(token)
    card_kwargs.setdefault("model_name", repo_id.split("/")[-1])
    with tempfile.TemporaryDirectory() as staging:
        folder = output_dir
        if merge_adapter:
            _merge_into(output_dir, staging, run_info)
            summary = load_run(staging)
            summary.base_model = run_info.get("base_model") or summary.base_model
            card = build_model_card(summary, **card_kwargs)
            card.text += "\nThe LoRA adapter of this run was merged into the base weights (`merge_and_unload`) before upload.\n"
            folder = staging
        else:
            card = build_model_card(load_run(output_dir), **card_kwargs)
        if dry_run:
            plan = upload_plan(folder)
            plan.files = sorted(set(plan.files) | {CARD_NAME})  # the push writes the card first
            plan.skipped.pop(CARD_NAME, None)
            plan.folder = output_dir
            return plan
        save_card(card, folder)
        plan = upload_plan(folder)
        if CARD_NAME not in plan.files:
            raise OSError(f"the card {os.path.join(folder, CARD_NAME)} was not written as a regular file")
        logger.info("pushing %d files of %s to %s%s: %s", len(plan.files), folder, repo_id,
                    f"@{revision}" if revision else "", ", ".join(plan.files))
        api = api or HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                allow_patterns=[glob.escape(name) for name in plan.files],
                ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),
                commit_message=commit_message or f"Upload MoE fine-tuning run {Path(os.path.abspath(output_dir)).name}",
                revision=revision,
            )
        except _hub_error_types() as err:
            raise HubPushError(
                f"push to {repo_id} at {getattr(api, 'endpoint', None) or hub_constants.ENDPOINT} failed: {_one_line(err)}"
            ) from err


# --------------------------------------------------------------------------------------------- trainer mixin


class MoECardMixin:
    """``Trainer`` mixin: the MoE model card in ``create_model_card``, checked inputs in ``push_to_hub``.

    Use as the first base: ``class MoETrainer(MoECardMixin, Trainer)``. With
    ``MoETrainingArguments.moe_model_card=False`` the stock transformers card is written instead.
    ``push_to_hub`` uploads ``output_dir`` as ``Trainer.push_to_hub`` does, so the heatmaps,
    ``expert_load.jsonl`` and ``run_info.json`` go with the card.
    """

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,  # noqa: A002
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        if not getattr(self.args, "moe_model_card", True):
            return super().create_model_card(  # type: ignore[misc]
                language=language, license=license, tags=tags, model_name=model_name, finetuned_from=finetuned_from,
                tasks=tasks, dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args,
            )
        if not self.is_world_process_zero():
            return None
        save_run_state(self)
        summary = summary_from_trainer(self)
        datasets = dataset_tags or dataset
        card = build_model_card(
            summary,
            model_name=model_name,
            base_model=finetuned_from,
            datasets=[datasets] if isinstance(datasets, str) else datasets,
            license=license,
            language=language,
            tags=[tags] if isinstance(tags, str) else (tags or []),
            pipeline_tag=tasks if isinstance(tasks, str) else None,
        )
        save_card(card, self.args.output_dir)
        return None

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token: str | None = None,
                    revision: str | None = None, private: bool | None = None, **kwargs: Any):
        """``Trainer.push_to_hub`` after checking the repo id and (PEFT models) the adapter targets."""
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        check_repo_id(repo_id)
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "peft_config"):
            from .adapters import validate_lora_targets  # noqa: PLC0415

            for config in model.peft_config.values():
                validate_lora_targets(model.get_base_model(), config)
        return super().push_to_hub(  # type: ignore[misc]
            commit_message=commit_message, blocking=blocking, token=token, revision=revision, private=private, **kwargs
        )


# --------------------------------------------------------------------------------------------- CLI


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
