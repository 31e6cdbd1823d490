"""What a card says about a run: :class:`RunSummary`, read from a run folder or from a live trainer.

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
                                options, base model, MoE layout, hyperparameters (written by the MoE
                                callbacks at train start, :mod:`hf_moe_tuning.hub.run_record`)
``expert_load.jsonl``           per-layer expert counts written by ``ExpertLoadCallback``
``expert_load_*.png``           heatmaps, embedded in the card and uploaded with it
``run_info.json``               base model, datasets, evaluation dataset, recipe/arm (convention below)
=============================  ==========================================================================

Everything is read from JSON and safetensors headers: ``training_args.bin`` is never read (it is a
pickle, and unpickling a file from a run folder can run arbitrary code), and no model is built to
describe a full fine-tune (the MoE layout comes from ``moe_run.json``). Only an adapter folder without
a recorded adapter report gets its base model's skeleton built on the meta device (no weights) to count
the adapter's scalars per parameter group.

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
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub.repocard import metadata_load
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from ..adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, is_peft_model
from .run_record import (
    adapter_record,
    anatomy_record,
    callback_settings,
    links_out_of,
    read_moe_run,
    recorded_training_args,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
RUN_INFO_NAME = "run_info.json"
EXPERT_LOAD_JSONL = "expert_load.jsonl"
TRAIN_HEATMAP = "expert_load_train.png"

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


class NoFinishedRunError(FileNotFoundError):
    """``OUTPUT_DIR`` holds no saved model or adapter (nothing to describe or push)."""


def write_run_info(output_dir: str, **fields: Any) -> str:
    """Write (merge into) ``output_dir/run_info.json``; see the module docstring for the keys.

    The file is written atomically; a ``run_info.json`` symlink is replaced by a regular file, never written
    through (and one that leads out of ``output_dir`` is not merged from: :func:`read_run_info`)."""
    for key, value in fields.items():
        expected = _RUN_INFO_TYPES.get(key)
        if expected is not None and value is not None and not isinstance(value, expected):
            raise TypeError(f"run_info {key!r} must be {getattr(expected, '__name__', expected)}, got {value!r}")
    info = read_run_info(output_dir)
    info.update({k: v for k, v in fields.items() if v is not None})
    return write_json_atomic(os.path.join(output_dir, RUN_INFO_NAME), info)


def read_run_info(output_dir: str) -> dict[str, Any]:
    """``output_dir/run_info.json`` as a dict (empty when absent, or a symlink out of ``output_dir``: its
    contents would end up in the card).

    Raises:
        ValueError: the file does not hold a JSON object.
    """
    path = os.path.join(output_dir, RUN_INFO_NAME)
    if links_out_of(output_dir, path):
        logger.warning("%s is a symlink out of %s: not read", path, output_dir)
        return {}
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return info


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
        """The last logged optimizer step (``None`` without a log history)."""
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
        """The last numeric value logged under ``key`` (``None`` if never logged)."""
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


def require_finished_run(output_dir: str) -> None:
    """Raise :class:`NoFinishedRunError` unless ``output_dir`` holds a saved model or adapter."""
    if not os.path.isdir(output_dir):
        raise NoFinishedRunError(f"{output_dir!r} is not a directory")
    if _has_weights(output_dir):
        return
    checkpoint = get_last_checkpoint(output_dir)
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
        checkpoint = get_last_checkpoint(output_dir)
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
        checkpoint = get_last_checkpoint(output_dir)
        record = read_moe_run(checkpoint) if checkpoint else None
    return record


def _card_base_model(output_dir: str) -> str | None:
    """``base_model`` of a card already in the folder (e.g. the one ``Trainer.create_model_card`` wrote)."""
    path = os.path.join(output_dir, CARD_NAME)
    if not os.path.isfile(path) or os.path.islink(path):
        return None
    try:
        base = (metadata_load(path) or {}).get("base_model")
    except Exception:
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


def _resolve_base(spec: str | None, run_info: dict[str, Any], *, meta: bool) -> Any:
    """The base model named by ``spec`` when that needs no download (local folder or ``tiny:<name>``).

    With ``meta=True`` only its skeleton is built, on the meta device (no weights), which is enough to
    describe its anatomy or check adapter targets.
    """
    import torch

    from ..models import TINY_MODELS, build_tiny_model, load_model

    if not spec:
        return None
    name = spec[len("tiny:"):] if spec.startswith("tiny:") else spec
    if name in TINY_MODELS:
        if meta:
            with torch.device("meta"):
                return build_tiny_model(name, seed=int(run_info.get("base_seed", 0)))
        return build_tiny_model(name, seed=int(run_info.get("base_seed", 0)))
    if os.path.isdir(spec):
        return load_model(spec, meta=meta)
    return None


def _adapter_summary(output_dir: str, run_info: dict[str, Any], record: dict[str, Any] | None) -> dict[str, Any]:
    """The adapter's LoRA settings (``adapter_config.json``) and scalars per parameter group: from the
    run's record (what ``apply_lora`` reported) or, without one, counted against the base model's
    skeleton built on the meta device (local folder or ``tiny:<name>`` bases only)."""
    from ..adapters import check_adapter_checkpoint, saved_adapter_groups
    from ..anatomy import describe_moe

    config = check_adapter_checkpoint(output_dir)
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
    recorded = (record or {}).get("adapter")
    if recorded:
        summary.update({k: recorded.get(k) for k in ("groups", "base_params", "strategy")})
        return summary
    base_spec = run_info.get("base_model") or config.get("base_model_name_or_path")
    try:
        base = _resolve_base(base_spec, run_info, meta=True)
        anatomy = describe_moe(base) if base is not None else None
    except (OSError, ValueError) as err:
        logger.info("base model %r not available offline (%s); adapter sizes are listed without groups", base_spec, err)
        anatomy = None
    if anatomy is not None:
        summary["groups"] = {
            group: {"total": total, **saved_adapter_groups(output_dir, anatomy).get(group, {"adapter": 0, "full": 0})}
            for group, total in ((g.value, n) for g, n in anatomy.group_counts().items())
        }
        summary["base_params"] = anatomy.total_params
        summary["strategy"] = _infer_strategy(summary["groups"])
        summary["model_type"] = anatomy.model_type
        summary["moe"] = anatomy_record(anatomy)
    return summary


def _infer_strategy(groups: dict[str, dict[str, int]]) -> str | None:
    """The freezing strategy whose groups are exactly those saved in full (``None`` if none fits)."""
    from ..freezing import STRATEGY_GROUPS

    present = {g for g, row in groups.items() if row["total"]}
    full = {g for g, row in groups.items() if row["full"]}
    if not full or any(groups[g]["full"] != groups[g]["total"] for g in full):
        return None
    for name, strategy_groups in STRATEGY_GROUPS.items():
        if {g.value for g in strategy_groups} & present == full:
            return name
    return None


def load_run(output_dir: str) -> RunSummary:
    """Read a finished run from ``output_dir``: JSON files and safetensors headers only, no pickle, no model
    built for a full fine-tune (raises :class:`NoFinishedRunError` when there is none)."""
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
    summary.model_type = (record or {}).get("model_type")
    summary.moe = (record or {}).get("moe")
    from ..adapters import is_adapter_dir

    if is_adapter_dir(output_dir):
        summary.is_adapter = True
        summary.adapter = _adapter_summary(output_dir, run_info, record)
        skeleton_type, skeleton_moe = summary.adapter.pop("model_type", None), summary.adapter.pop("moe", None)
        summary.model_type = summary.model_type or skeleton_type
        summary.moe = summary.moe or skeleton_moe
        summary.base_model = (
            run_info.get("base_model") or recorded_base or summary.adapter.get("base_model_name_or_path")
            or _card_base_model(output_dir) or None
        )
    else:
        with open(os.path.join(output_dir, CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
        summary.model_type = config.get("model_type")
        summary.architecture = (config.get("architectures") or [None])[0]
        summary.base_model = (
            run_info.get("base_model") or recorded_base or config.get("_name_or_path") or _card_base_model(output_dir) or None
        )
    summary.base_model_local = bool(
        record and record.get("base_model_local") and recorded_base and summary.base_model == recorded_base
    )
    return summary


def summary_from_trainer(trainer: Any) -> RunSummary:
    """The :class:`RunSummary` of a live ``Trainer`` (its output_dir files, state, args and callbacks)."""
    from ..anatomy import describe_moe
    from ..callbacks.freezing import MoEFreezingCallback

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
    base = model.get_base_model() if is_peft_model(model) else model
    config = getattr(base, "config", None)
    summary.model_type = getattr(config, "model_type", None)
    summary.architecture = type(base).__name__
    if is_peft_model(model):
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
        summary.adapter.update(adapter_record(model) or {})
    summary.base_model = run_info.get("base_model") or getattr(config, "_name_or_path", None) or None
    summary.base_model_local = bool(summary.base_model) and os.path.isdir(summary.base_model)
    summary.moe = anatomy_record(describe_moe(base)) if base is not None else None
    return summary


def save_run_state(trainer: Any) -> None:
    """Write ``trainer_state.json`` to ``output_dir`` with the callbacks' current exportable state.

    ``Trainer`` only records callback state in checkpoints; this makes the final folder self-describing
    (``hf-moe-tuning card OUTPUT_DIR`` then finds the freezing plan).
    """
    from transformers.trainer_callback import ExportableState

    if not trainer.is_world_process_zero():
        return
    for cb in trainer.callback_handler.callbacks + [trainer.control]:
        if isinstance(cb, ExportableState):
            trainer.state.stateful_callbacks[type(cb).__name__] = cb.state()
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    path = os.path.join(trainer.args.output_dir, TRAINER_STATE_NAME)
    if os.path.islink(path):  # replaced, never written through
        os.unlink(path)
    trainer.state.save_to_json(path)
