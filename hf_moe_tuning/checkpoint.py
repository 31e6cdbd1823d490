"""Exact resume for fused-expert MoE models.

Since transformers 5, ``save_pretrained`` writes checkpoints in the *original* (Hub) layout: it reverses
the model's weight conversions, so a Mixtral-style model whose experts live in fused 3-D tensors
(``mlp.experts.gate_up_proj``) is saved per expert (``block_sparse_moe.experts.0.w1.weight`` ...).
``from_pretrained`` converts such checkpoints back, but ``Trainer._load_from_checkpoint`` (used by
``trainer.train(resume_from_checkpoint=...)``) and ``Trainer._load_best_model`` call
``model.load_state_dict(state_dict, strict=False)`` on the raw file. For fused-expert families the
router and expert keys then match nothing: the Trainer warns about missing/unexpected keys and trains
on with the **fresh model's router and expert weights**, losing every expert update made before the
interruption (measured on transformers 5.24: max weight difference 0.036 after resuming a tiny Mixtral,
Qwen2-MoE, OLMoE or DeepSeek-V3 at step 3 of 6; Switch, with per-expert modules, resumes exactly;
transformers issue #48805).

:func:`load_checkpoint_exact` loads a checkpoint directory into a model with transformers' own
conversion machinery (the same :class:`~transformers.core_model_loading.WeightConverter` rules that
``save_pretrained`` reversed), copying values *in place* so parameter identity, ``requires_grad`` flags
and hooks (freezing) survive, and raises when any model weight is left unloaded.

One trainer route, :class:`hf_moe_tuning.callbacks.resume.FusedResumeCallback` (it reloads the resumed – and,
with ``load_best_model_at_end``, the best – checkpoint exactly): ``MoETrainer`` / ``MoESFTTrainer`` add it
themselves (``moe_fix_fused_resume``, default on) and tell it the checkpoint; a plain ``Trainer`` / ``SFTTrainer``
gets it with ``callbacks=[FusedResumeCallback()]``. Or directly: ``load_checkpoint_exact(model, "out/checkpoint-500")``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from .adapters import is_peft_model

logger = logging.getLogger(__name__)



class CheckpointLoadError(RuntimeError):
    """A checkpoint could not be loaded exactly (keys left unloaded, unknown or with the wrong shape)."""


@dataclass
class CheckpointLoadReport:
    """What :func:`load_checkpoint_exact` did.

    Attributes:
        checkpoint_dir: the directory loaded.
        loaded: model state-dict keys whose values came from the checkpoint.
        converted: model keys produced by a weight converter (e.g. fused expert tensors built from
            per-expert checkpoint tensors).
        tied: model keys not in the checkpoint but tied to a loaded key (e.g. ``lm_head.weight``).
    """

    checkpoint_dir: str
    loaded: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- reading
def checkpoint_weight_files(checkpoint_dir: str) -> list[str]:
    """The full-model weight files of ``checkpoint_dir`` (one file, or the shards of an index).

    Raises:
        FileNotFoundError: the directory holds no ``model.safetensors``/``pytorch_model.bin`` (or index).
    """
    for single, index in ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        path = os.path.join(checkpoint_dir, single)
        if os.path.isfile(path):
            return [path]
        index_path = os.path.join(checkpoint_dir, index)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(checkpoint_dir, shard) for shard in shards]
    raise FileNotFoundError(
        f"no model weights ({SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME} or a sharded index) in {checkpoint_dir!r}"
    )


def has_full_model_weights(checkpoint_dir: str) -> bool:
    """Whether ``checkpoint_dir`` holds full-model weights (not only an adapter or an FSDP/DeepSpeed shard)."""
    try:
        checkpoint_weight_files(checkpoint_dir)
    except FileNotFoundError:
        return False
    return True


def read_checkpoint_state_dict(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of the full-model weight files of ``checkpoint_dir``, on the CPU."""
    from transformers.modeling_utils import load_state_dict

    state_dict: dict[str, torch.Tensor] = {}
    for path in checkpoint_weight_files(checkpoint_dir):
        state_dict.update(load_state_dict(path, map_location="cpu"))
    return state_dict


# ----------------------------------------------------------------------------------------- layout
def checkpoint_weight_conversions(model: nn.Module) -> list | None:
    """The weight transforms ``save_pretrained`` reverses when it writes ``model`` (``None`` if none).

    Mirrors :func:`transformers.core_model_loading.revert_weight_conversion`: the conversions recorded by
    ``from_pretrained`` (``model._weight_conversions``), else the registered mapping of the model type
    without legacy renamings and prefix changes.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import PrefixChange
        except ImportError:  # transformers < 5: checkpoints are saved in the in-memory layout
            return None
        if not hasattr(model, "config"):
            return None
        conversions = get_model_conversion_mapping(model, add_legacy=False)
        conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    return list(conversions) or None


def has_checkpoint_layout_conversion(model: nn.Module) -> bool:
    """Whether ``save_pretrained`` writes ``model`` in a layout other than its in-memory state dict.

    True for fused-expert families (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, ...): their checkpoints
    must be converted back when loaded, which ``Trainer``'s resume does not do.
    """
    return checkpoint_weight_conversions(model) is not None


def _shadow_model(model: nn.Module) -> nn.Module:
    """An empty (meta-device) model of the same class and config, to run the conversion into."""
    with torch.device("meta"):
        return type(model)._from_config(copy.deepcopy(model.config))


def convert_checkpoint_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], Any]:
    """Convert a checkpoint state dict to ``model``'s in-memory layout with transformers' converters.

    Runs :func:`transformers.core_model_loading.convert_and_load_state_dict_in_model` – what
    ``from_pretrained`` uses – into an empty meta-device copy of ``model`` (so ``model`` itself is not
    touched) and returns the materialised tensors by model key, plus transformers' loading info
    (missing / unexpected / mismatched keys, conversion errors).
    """
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    shadow = _shadow_model(model)
    load_config = LoadStateDictConfig(weight_mapping=checkpoint_weight_conversions(model))
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar for a resume
    try:
        info, _ = convert_and_load_state_dict_in_model(shadow, state_dict, load_config)
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    converted = {k: v for k, v in shadow.state_dict().items() if not v.is_meta}
    return converted, info


def _tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """State-dict key -> all keys sharing its storage (tied weights), for ``model``."""
    by_storage: dict[tuple, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta or tensor.numel() == 0:
            continue
        by_storage.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)), []).append(key)
    return {k: keys for keys in by_storage.values() for k in keys}


# ----------------------------------------------------------------------------------------- loading
def load_checkpoint_exact(model: nn.Module, checkpoint_dir: str) -> CheckpointLoadReport:
    """Load the full-model weights of ``checkpoint_dir`` into ``model`` exactly, in place.

    Checkpoint keys are converted to the model's layout with transformers' weight converters when the
    model has any (fused experts); values are then copied into the existing parameters and buffers
    (``Module.load_state_dict``), so optimizer references, ``requires_grad`` flags and gradient hooks
    (expert-slice freezing) are kept.

    Raises:
        FileNotFoundError: no full-model weights in ``checkpoint_dir``.
        CheckpointLoadError: a model weight was not in the checkpoint (and is not tied to one that is),
            a checkpoint tensor matched no model weight, a shape differed, or a conversion failed.
            Nothing on ``model`` has been changed in that case.
    """
    state_dict = read_checkpoint_state_dict(checkpoint_dir)
    if has_checkpoint_layout_conversion(model):
        values, info = convert_checkpoint_state_dict(model, state_dict)
        unexpected = set(info.unexpected_keys)
        mismatched = {k[0]: (tuple(k[1]), tuple(k[2])) for k in info.mismatched_keys}
        errors = dict(info.conversion_errors)
        renamed = {k for k in values if k not in state_dict}
    else:
        values, renamed, errors = state_dict, set(), {}
        target = model.state_dict()
        unexpected = {k for k in values if k not in target}
        mismatched = {
            k: (tuple(v.shape), tuple(target[k].shape))
            for k, v in values.items()
            if k in target and tuple(v.shape) != tuple(target[k].shape)
        }
        values = {k: v for k, v in values.items() if k in target and k not in mismatched}

    tied = _tied_groups(model)
    expected = list(model.state_dict().keys())
    missing, tied_keys = [], []
    for key in expected:
        if key in values:
            continue
        if any(alias in values for alias in tied.get(key, [])):
            tied_keys.append(key)
        else:
            missing.append(key)
    problems = []
    if missing:
        problems.append(f"model weights not in the checkpoint: {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"checkpoint tensors matching no model weight: {sorted(unexpected)[:8]}")
    if mismatched:
        problems.append(f"shape mismatches (checkpoint, model): {dict(sorted(mismatched.items())[:8])}")
    if errors:
        problems.append(f"conversion errors: {dict(sorted(errors.items())[:4])}")
    if problems:
        raise CheckpointLoadError(
            f"cannot load {checkpoint_dir!r} exactly into {type(model).__name__}: " + "; ".join(problems)
        )

    result = model.load_state_dict({k: v for k, v in values.items() if k in set(expected)}, strict=False)
    leftover = [k for k in result.missing_keys if k not in values and k not in tied_keys]
    if leftover or result.unexpected_keys:  # pragma: no cover - guarded by the checks above
        raise CheckpointLoadError(f"load_state_dict left {leftover} missing and {result.unexpected_keys} unexpected")
    report = CheckpointLoadReport(
        checkpoint_dir=checkpoint_dir,
        loaded=sorted(values),
        converted=sorted(renamed),
        tied=sorted(tied_keys),
    )
    logger.info(
        "loaded %s exactly: %d tensors (%d converted to the in-memory layout, %d tied)",
        checkpoint_dir,
        len(report.loaded),
        len(report.converted),
        len(report.tied),
    )
    return report


def is_sharded_model(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded by FSDP2 (DTensor), FSDP1 or DeepSpeed ZeRO-3."""
    for param in model.parameters():
        if hasattr(param, "ds_id") or type(param).__name__ == "DTensor" or type(param.data).__name__ == "DTensor":
            return True
        break
    return any(type(m).__name__ in ("FullyShardedDataParallel", "FSDPModule") for m in model.modules())


def needs_exact_load(model: nn.Module, checkpoint_dir: str | None) -> bool:
    """Whether the plain Trainer would load ``checkpoint_dir`` into ``model`` incorrectly.

    True when the model's checkpoints use another layout (fused experts), the directory holds full-model
    weights, and the model is neither sharded (FSDP/ZeRO-3 save and load their own, native layout) nor a
    PEFT model (adapters are loaded by PEFT).
    """
    return (
        checkpoint_dir is not None
        and has_checkpoint_layout_conversion(model)
        and not is_peft_model(model)
        and not is_sharded_model(model)
        and has_full_model_weights(checkpoint_dir)
    )
