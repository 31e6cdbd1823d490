"""``moe_run.json``: what a run actually trained with, written by the MoE callbacks themselves.

Model cards must describe a run from the run's own JSON, never by unpickling ``training_args.bin``
(a pickle from an untrusted folder can run code). The MoE callbacks call :func:`record_moe_run` in
``on_train_begin`` (so a plain ``Trainer`` with ``RouterLossCallback(aux_coef=0.01, z_coef=0.001)``
records those coefficients too) and :func:`copy_moe_run_to_checkpoint` in ``on_save`` (so every
``checkpoint-N`` folder describes itself). Only the main process writes; every write is atomic
(temporary file + ``os.replace``). The first callback of a ``train()`` call starts the file afresh,
the others merge their section into it::

    {
      "format": 1,
      "hf_moe_tuning_version": "0.1.0",
      "base_model": "google/switch-base-8",         # model.config._name_or_path at train start (null: built from a config)
      "base_model_local": false,                     # true: base_model was a local folder at train start, not a Hub id
      "model_type": "switch_transformers",
      "moe": {"moe_layers": 4, "num_experts": [8], "top_k": [1], "total_params": 814592},   # MoE layout
      "adapter": {"groups": {"experts": {"total": ..., "adapter": ..., "full": 0}, ...},   # apply_lora report
                  "base_params": ..., "strategy": "non_moe"},                               # (PEFT runs only)
      "training_args": {"learning_rate": 0.001, "max_steps": 40, ...},   # RECORDED_ARGS that the args have
      "callbacks": {                                 # one section per recording callback class
        "RouterLossCallback": {"aux_coef": 0.01, "z_coef": 0.001, "aux_schedule": "constant", ...},
        "MoEFreezingCallback": {"strategy": "non_moe", ..., "plan": {...}}
      }
    }
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from importlib import metadata as importlib_metadata
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

MOE_RUN_NAME = "moe_run.json"
FORMAT_VERSION = 1

#: Training arguments recorded in ``moe_run.json`` (and shown in the card when set), in this order.
RECORDED_ARGS: tuple[str, ...] = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "optim",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "max_grad_norm",
    "seed",
    "bf16",
    "fp16",
    "moe_freeze_strategy",
    "moe_train_router",
    "moe_experts",
    "moe_extra_trainable",
    "moe_extra_frozen",
    "moe_expert_dropout",
    "moe_capacity_factor_train",
    "moe_capacity_factor_eval",
    "moe_router_jitter",
    "moe_bias_balancing",
    "moe_hparam_preset",
)

# Attribute set on the TrainerState of the current ``train()`` call once its record was started.
_SESSION_ATTR = "_hf_moe_tuning_run_session"


def _json_safe(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, dict keys strings, unknown objects ``str``)."""
    return json.loads(json.dumps(value, default=str))


def recorded_training_args(args: Any) -> dict[str, Any]:
    """The :data:`RECORDED_ARGS` that ``args`` (any ``TrainingArguments``) has, JSON-safe; tokens are never read."""
    if args is None:
        return {}
    values = {name: getattr(args, name) for name in RECORDED_ARGS if hasattr(args, name)}
    return _json_safe(values)


def base_model_of(model: Any) -> str | None:
    """Where ``model`` was loaded from: ``config._name_or_path`` of the (PEFT base) model, ``None`` when built from a config."""
    if model is None:
        return None
    model = _unwrap(model)
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def base_model_fields(model: Any) -> dict[str, Any]:
    """``base_model`` (:func:`base_model_of`) and ``base_model_local`` (it names a local folder) of ``model``."""
    name = base_model_of(model)
    return {"base_model": name, "base_model_local": bool(name) and os.path.isdir(name)}


def _unwrap(model: Any) -> Any:
    """``model`` without DDP / accelerate wrappers and, for a PEFT model, its base model."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def anatomy_record(anatomy: Any) -> dict[str, Any] | None:
    """The MoE layout a card reports (MoE layers, experts, top-k, parameters) of a ``MoEAnatomy``; ``None`` for dense models."""
    if anatomy is None or not anatomy.layers:
        return None
    return {
        "moe_layers": len(anatomy.layers),
        "num_experts": sorted({layer.num_experts for layer in anatomy.layers}),
        "top_k": sorted({layer.top_k for layer in anatomy.layers}),
        "total_params": anatomy.total_params,
    }


def model_anatomy_record(model: Any, anatomy: Any = None) -> dict[str, Any] | None:
    """:func:`anatomy_record` of ``model`` (its PEFT base model); ``None`` when it cannot be described.

    ``anatomy`` is the trainer's (computed once, shared by the MoE callbacks): used when it describes that model.
    """
    if model is None:
        return None
    from ..anatomy import anatomy_for

    try:
        return anatomy_record(anatomy_for(_unwrap(model), anatomy))
    except (ValueError, TypeError, RuntimeError) as err:
        logger.info("MoE layout not recorded: %s", err)
        return None


def adapter_record(model: Any) -> dict[str, Any] | None:
    """What ``apply_lora`` reported about a PEFT model (scalars per group, base size, strategy); ``None`` otherwise."""
    report = getattr(getattr(model, "module", model), "moe_adapter_report", None)
    if report is None:
        return None
    return _json_safe(
        {
            "groups": {g: {"total": row["total"], "adapter": row["adapter"], "full": row["full"]} for g, row in report.groups.items()},
            "base_params": report.base_params,
            "strategy": report.strategy,
        }
    )


def callback_settings(callback: Any) -> dict[str, Any]:
    """The settings ``callback`` trains with (its ``moe_run_settings()``), JSON-safe."""
    return _json_safe(callback.moe_run_settings())


def _version() -> str | None:
    try:
        return importlib_metadata.version("hf-moe-tuning")
    except importlib_metadata.PackageNotFoundError:
        return None


def new_record(args: Any = None, model: Any = None, anatomy: Any = None) -> dict[str, Any]:
    """A fresh record: format, version, base model, model type, MoE layout and adapter report of ``model``,
    and the recorded training arguments."""
    config = getattr(_unwrap(model), "config", None) if model is not None else None
    return {
        "format": FORMAT_VERSION,
        "hf_moe_tuning_version": _version(),
        **base_model_fields(model),
        "model_type": getattr(config, "model_type", None),
        "moe": model_anatomy_record(model, anatomy),
        "adapter": adapter_record(model),
        "training_args": recorded_training_args(args),
        "callbacks": {},
    }


def links_out_of(folder: str, path: str) -> bool:
    """``path`` is a symlink that resolves outside ``folder`` (its contents are not the run's own)."""
    if not os.path.islink(path):
        return False
    root = os.path.realpath(folder)
    return os.path.commonpath([root, os.path.realpath(path)]) != root


def read_moe_run(folder: str) -> dict[str, Any] | None:
    """``folder/moe_run.json`` as a dict; ``None`` when the file is absent or a symlink out of ``folder``
    (never read: its contents would end up in the card and the upload).

    Raises:
        ValueError: the file is not a JSON object.
    """
    path = os.path.join(folder, MOE_RUN_NAME)
    if links_out_of(folder, path):
        logger.warning("%s is a symlink out of %s: not read (a new record replaces the link)", path, folder)
        return None
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path} must hold a JSON object")
    record.setdefault("callbacks", {})
    record.setdefault("training_args", {})
    return record


def write_json_atomic(path: str, data: Any) -> str:
    """Write ``data`` as JSON to ``path`` atomically (a hidden temporary file in the same folder, then ``os.replace``).

    A ``path`` symlink is replaced by the new file, never written through."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def record_moe_run(args: Any, state: Any, callback: Any, model: Any = None) -> str | None:
    """Merge ``callback``'s settings into ``args.output_dir/moe_run.json`` (main process only).

    Called by the MoE callbacks in ``on_train_begin``. The first call of a ``train()`` (a new
    ``TrainerState``) starts a fresh record with the base model and the training arguments, so a
    record left in the folder by an earlier run is replaced, not mixed in. Returns the path written,
    or ``None`` on other processes.
    """
    if not getattr(state, "is_world_process_zero", True):
        return None
    output_dir = args.output_dir
    record = read_moe_run(output_dir) if getattr(state, _SESSION_ATTR, None) else None
    if record is None:
        record = new_record(args, model, getattr(callback, "anatomy", None))
        setattr(state, _SESSION_ATTR, uuid.uuid4().hex)
    if model is not None and record.get("base_model") is None:
        record.update(base_model_fields(model))
    if model is not None and record.get("moe") is None:
        record["moe"] = model_anatomy_record(model, getattr(callback, "anatomy", None))
    record["callbacks"][type(callback).__name__] = callback_settings(callback)
    return write_json_atomic(os.path.join(output_dir, MOE_RUN_NAME), record)


def copy_moe_run_to_checkpoint(args: Any, state: Any) -> str | None:
    """Copy ``output_dir/moe_run.json`` into the checkpoint ``Trainer`` just saved (``on_save``, main process only)."""
    if not getattr(state, "is_world_process_zero", True):
        return None
    source = os.path.join(args.output_dir, MOE_RUN_NAME)
    checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
    if not os.path.isfile(source) or not os.path.isdir(checkpoint):
        return None
    target = os.path.join(checkpoint, MOE_RUN_NAME)
    fd, tmp = tempfile.mkstemp(prefix=f".{MOE_RUN_NAME}.", suffix=".tmp", dir=checkpoint)  # a new file: no link
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)  # replaces a target symlink, never writes through it
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
