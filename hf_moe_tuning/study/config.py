"""Recipe YAML: loading, defaults + per-arm deltas, and validation with file- and key-named errors.

A recipe describes one study (``flan_moe``, ``st_moe_freezing``, ``expert_count`` or ``instruct_moe``)::

    extends: tiny.yaml                 # optional: start from another recipe (relative path), deep-merge the keys
                                       # below over it (`arms: !replace {...}` replaces a mapping instead)
    study: flan_moe
    variant: tiny                      # smoke (one-minute check) | tiny (embedded world) | real (Hub models and datasets)
    seeds: 3                           # fine-tuning seeds per arm (an int N means 0..N-1, or a list)
    data: {source: embedded, tasks: [passage_yesno, ...], train_size: 128, ...}
    models:                            # base models the arms start from
      t5: {init: "tiny:t5"}            # "tiny:<name>" (hf_moe_tuning.models) or a Hub id / local path
      switch: {init: "tiny:switch", args: {moe_aux_loss_coef: 0.01}}
    pretrain: {enabled: true, args: {...}, sparse_args: {...}, dense_args: {...}, shipped_dir: checkpoints}
    instruct: {args: {...}}
    finetune: {args: {...}, sparse_args: {...}, dense_args: {...}, family_args: true,
               early_stopping: {eval_every: 50, patience: 4, min_delta: 0.0, min_steps: 0}}
    evaluate: {split: test, batch_size: 64, max_new_tokens: 48}
    arms:                              # per-arm deltas over the defaults
      t5: {model: t5}
      flan_moe: {model: switch, instruct: true}
      moe_frozen: {model: switch, args: {moe_freeze_strategy: non_moe}}
      flan_moe_0shot: {model: switch, instruct: true, finetune: false}   # zero-shot: evaluated, not fine-tuned
    deltas:                            # the differences the papers talk about
      - {name: "T5 - MoE", expr: "t5 - moe", paper: "+", source: "Flan-MoE Sec. 4"}
    sft:                               # decoder-only models only (the model decides the backend)
      chat_template: byte              # auto | model | byte | chatml (hf_moe_tuning.study.chat)
      system: null                     # optional system message of every prompt
      max_length: 256                  # and any other TRL SFTConfig-only field
      lora: {r: 16, target_modules: [q_proj, v_proj], expert_parameters: [mlp.experts.gate_up_proj]}

Encoder-decoder models train with ``MoETrainer``, decoder-only ones with ``MoESFTTrainer`` in chat
format (:mod:`hf_moe_tuning.study.backends`); everything else is the same for both.

``pretrain.shipped_dir`` and ``instruct.shipped_dir`` (relative to the recipe file) hold stages shipped with
the repository (``pretrain/<model>-<key>/``, ``instruct/<model>-<key>/`` as the cache writes them); one is used
instead of training only when its key, the hash of the exact configuration of the stage (and, for instruct,
of the pretraining it starts from), matches.

Training arguments (``args``) are :class:`hf_moe_tuning.MoETrainingArguments` fields, merged in this
order: stage ``args`` → stage ``sparse_args`` / ``dense_args`` (by the model's kind, when
``family_args`` is true) → the model's ``args`` → the arm's ``args`` (fine-tuning only).

:func:`load_study_config` validates everything it can offline and raises :class:`ConfigError`
naming the file and the dotted key (``arms.flan_moe.args.moe_freeze_strategy``).

**Batch size.** A recipe states the *global* batch (examples per optimizer step, summed over processes
and gradient-accumulation steps), as the papers do, and it is the same for any number of processes:

* ``global_batch_size: 128`` (a pipeline key, allowed wherever ``args`` are) gives it explicitly; then
  ``per_device_train_batch_size``, if given, is the largest micro-batch one process may hold (memory), and
  ``gradient_accumulation_steps`` is derived (giving it too is an error);
* without it, the recipe is read as written for one process: global batch =
  ``per_device_train_batch_size × gradient_accumulation_steps``, and that micro-batch is the limit.

:func:`resolve_batch` turns this into ``per_device_train_batch_size`` and ``gradient_accumulation_steps``
for N processes (the fewest accumulation steps whose micro-batch fits the limit); a global batch that N
processes cannot split evenly is an error naming the key (``hf-moe-tuning validate --num-processes N``).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import FREEZE_STRATEGIES, MoETrainingArguments
from ..configuration import check_field_type, field_types
from ..data.heldout import HELDOUT_TASKS
from ..models import TINY_MODELS

logger = logging.getLogger(__name__)

STUDIES: tuple[str, ...] = ("flan_moe", "st_moe_freezing", "expert_count", "instruct_moe")
#: smoke: the tiny pipeline at a one-minute size; quick: the embedded miniature with a small fine-tuning budget (the
#: README's first command); tiny: the embedded miniature; real: Hub models and datasets.
VARIANTS: tuple[str, ...] = ("smoke", "quick", "tiny", "real")
KINDS: tuple[str, ...] = ("sparse", "dense")
DIRECTIONS: dict[str, str] = {"+": "positive", "-": "negative", "0": "no clear difference"}

#: Arguments the pipeline sets itself; a recipe may not override them.
_MANAGED_ARGS = frozenset({"output_dir", "seed", "data_seed", "do_train", "do_eval", "report_to"})
#: Pipeline keys allowed among training arguments (resolved by :func:`resolve_batch`, never passed to a trainer).
GLOBAL_BATCH_KEY = "global_batch_size"
_TRAINING_ARG_NAMES = frozenset(f.name for f in dataclasses.fields(MoETrainingArguments))

_TOP_KEYS = {
    "study", "variant", "description", "seeds", "tokenizer", "output_dir", "cache_dir",
    "data", "models", "pretrain", "instruct", "finetune", "evaluate", "arms", "deltas", "sft",
}
_DATA_KEYS = {
    "source", "tasks", "train_size", "validation_size", "test_size", "seed", "max_source_length",
    "max_target_length", "corpus_size", "mixture_size", "few_shot_fraction", "max_shots",
    "instruction_dataset", "instruction_config", "instruction_split", "task_dataset",
}
_MODEL_KEYS = {"init", "overrides", "kind", "args"}
_PRETRAIN_KEYS = {
    "enabled", "seed", "noise_density", "mean_span", "args", "sparse_args", "dense_args", "family_args", "shipped_dir",
}
_INSTRUCT_KEYS = {"enabled", "seed", "args", "sparse_args", "dense_args", "family_args", "shipped_dir"}
_FINETUNE_KEYS = {"args", "sparse_args", "dense_args", "family_args", "early_stopping"}
_EARLY_STOPPING_KEYS = {"eval_every", "patience", "min_delta", "min_steps"}
_EVALUATE_KEYS = {"split", "batch_size", "max_new_tokens"}
_ARM_KEYS = {"model", "instruct", "finetune", "args", "label"}
_DELTA_KEYS = {"name", "expr", "paper", "paper_value", "source"}


class ConfigError(ValueError):
    """A recipe is invalid; the message names the file and the dotted key."""

    def __init__(self, path: str | Path | None, key: str, message: str):
        self.path, self.key = str(path) if path else "<dict>", key
        super().__init__(f"{self.path}: {key}: {message}")


@dataclass
class StageConfig:
    """A training stage: ``args`` for every model, ``sparse_args``/``dense_args`` by kind."""

    enabled: bool = True
    seed: int = 0
    args: dict[str, Any] = field(default_factory=dict)
    sparse_args: dict[str, Any] = field(default_factory=dict)
    dense_args: dict[str, Any] = field(default_factory=dict)
    family_args: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def args_for(self, kind: str) -> dict[str, Any]:
        """Merged training arguments of this stage for a ``kind`` (``sparse``/``dense``) model."""
        merged = dict(self.args)
        if self.family_args:
            merged.update(self.sparse_args if kind == "sparse" else self.dense_args)
        return merged


@dataclass
class ModelSpec:
    name: str
    init: str
    overrides: dict[str, Any] = field(default_factory=dict)
    kind: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def is_tiny(self) -> bool:
        return self.init.startswith("tiny:")


@dataclass
class ArmSpec:
    name: str
    model: str
    instruct: bool = False
    args: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    #: ``False``: a zero-shot arm, evaluated as it starts (after pretraining / instruction tuning).
    finetune: bool = True


@dataclass
class DeltaSpec:
    name: str
    expr: str
    paper: str = "+"
    paper_value: float | None = None
    source: str = ""


@dataclass
class StudyConfig:
    """A validated recipe. ``raw`` keeps the loaded mapping (after overrides), ``path`` its file."""

    study: str
    variant: str
    path: str
    raw: dict[str, Any]
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    tokenizer: str = "byt5"
    output_dir: str = "results"
    cache_dir: str = "runs/cache"
    data: dict[str, Any] = field(default_factory=dict)
    models: dict[str, ModelSpec] = field(default_factory=dict)
    pretrain: StageConfig = field(default_factory=StageConfig)
    instruct: StageConfig = field(default_factory=StageConfig)
    finetune: StageConfig = field(default_factory=StageConfig)
    evaluate: dict[str, Any] = field(default_factory=dict)
    arms: dict[str, ArmSpec] = field(default_factory=dict)
    deltas: list[DeltaSpec] = field(default_factory=list)
    #: Decoder-only models' SFT settings (chat template, system prompt, ``SFTConfig``-only fields, LoRA).
    sft: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- helpers
def _expect_mapping(value: Any, path: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(path, key, f"expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(mapping: dict, allowed: set[str], path: Any, prefix: str) -> None:
    for key in mapping:
        if key not in allowed:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(path, where, f"unknown key; allowed here: {sorted(allowed)}")


#: Options with forms of their own (parsed by ``MoEArguments``' validator, not by their type hint).
_OWN_FORMS = frozenset({"moe_experts", "moe_extra_trainable", "moe_extra_frozen"})


def check_training_args(args: dict, path: Any, prefix: str) -> None:
    """Check that ``args`` only names ``MoETrainingArguments`` fields, of the field's type, and valid choices.

    Every value is checked against its field's type hint; a numeric string for a number field (YAML 1.1 reads
    ``1e-3`` as a string) is converted in ``args``, anything else of the wrong type raises naming the key.
    """
    hints = field_types(MoETrainingArguments)
    for key, value in args.items():
        where = f"{prefix}.{key}"
        if key == GLOBAL_BATCH_KEY:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(path, where, f"expected a positive int (examples per optimizer step), got {value!r}")
            continue
        if key in _MANAGED_ARGS:
            raise ConfigError(path, where, "is set by the pipeline and cannot be given in a recipe")
        if key not in _TRAINING_ARG_NAMES:
            raise ConfigError(path, where, "unknown key: not a MoETrainingArguments field")
        if key not in _OWN_FORMS:
            try:
                args[key] = check_field_type(key, value, hints[key], coerce_strings=True)
            except ValueError as err:
                raise ConfigError(path, where, str(err)) from None
        if key == "moe_freeze_strategy" and value not in FREEZE_STRATEGIES:
            raise ConfigError(path, where, f"unknown freezing strategy {value!r}; use one of {list(FREEZE_STRATEGIES)}")


def global_batch(args: dict[str, Any]) -> int:
    """The global batch ``args`` state: ``global_batch_size``, else per-device batch × accumulation (one process)."""
    if args.get(GLOBAL_BATCH_KEY) is not None:
        return int(args[GLOBAL_BATCH_KEY])
    return int(args.get("per_device_train_batch_size", 8)) * int(args.get("gradient_accumulation_steps", 1))


def resolve_batch(args: dict[str, Any], num_processes: int = 1) -> dict[str, Any]:
    """``args`` for ``num_processes`` processes: the recipe's global batch split into per-device batch × accumulation.

    See the module docstring. The result has no ``global_batch_size`` key and always has
    ``per_device_train_batch_size`` and ``gradient_accumulation_steps``; with one process and no
    ``global_batch_size`` it equals ``args`` (plus those two keys).

    Raises:
        ValueError: ``global_batch_size`` together with ``gradient_accumulation_steps``, or a global batch
            that ``num_processes`` processes cannot split evenly within the micro-batch limit.
    """
    out = dict(args)
    explicit = out.pop(GLOBAL_BATCH_KEY, None)
    if explicit is not None and "gradient_accumulation_steps" in args:
        raise ValueError(f"give {GLOBAL_BATCH_KEY} or gradient_accumulation_steps, not both (accumulation is derived)")
    total = global_batch(args)
    limit = int(args.get("per_device_train_batch_size", total if explicit is not None else 8))
    for accumulation in range(1, total + 1):
        per_step = num_processes * accumulation
        if total % per_step == 0 and total // per_step <= limit:
            out.update(per_device_train_batch_size=total // per_step, gradient_accumulation_steps=accumulation)
            return out
    raise ValueError(
        f"global batch {total} cannot be split evenly over {num_processes} processes with at most {limit} examples "
        f"per device and step; choose a global batch divisible by {num_processes}"
    )


def _stage(raw: Any, allowed: set[str], path: Any, key: str) -> StageConfig:
    raw = _expect_mapping(raw, path, key)
    _check_keys(raw, allowed, path, key)
    stage = StageConfig(
        enabled=bool(raw.get("enabled", True)),
        seed=int(raw.get("seed", 0)),
        args=dict(_expect_mapping(raw.get("args"), path, f"{key}.args")),
        sparse_args=dict(_expect_mapping(raw.get("sparse_args"), path, f"{key}.sparse_args")),
        dense_args=dict(_expect_mapping(raw.get("dense_args"), path, f"{key}.dense_args")),
        family_args=bool(raw.get("family_args", True)),
        extra={k: v for k, v in raw.items() if k not in {"enabled", "seed", "args", "sparse_args", "dense_args", "family_args"}},
    )
    for part in ("args", "sparse_args", "dense_args"):
        check_training_args(getattr(stage, part), path, f"{key}.{part}")
    return stage


def delta_arms(expr: str) -> set[str]:
    """The arm names used in a delta expression such as ``"(flan_moe - moe) - (flan_t5 - t5)"``."""
    tree = ast.parse(expr, mode="eval")
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.UnaryOp, ast.USub, ast.Load)):
            raise ValueError(f"only arm names, '+', '-' and parentheses are allowed, found {type(node).__name__}")
    return names


def evaluate_delta(expr: str, scores: dict[str, float]) -> float:
    """Value of a delta expression given a score per arm."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Name):
            return scores[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            left, right = walk(node.left), walk(node.right)
            return left + right if isinstance(node.op, ast.Add) else left - right
        raise ValueError(f"unsupported delta expression {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


def set_dotted(mapping: dict, dotted: str, value: Any) -> None:
    """Set ``mapping['a']['b']['c'] = value`` for ``dotted='a.b.c'``, creating mappings on the way."""
    keys = dotted.split(".")
    node = mapping
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ValueError(f"--set {dotted}: {key!r} is not a mapping")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Parse ``["finetune.args.max_steps=2", ...]`` into ``{dotted_key: yaml_value}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


# ---------------------------------------------------------------------------------------------- loading
def parse_study_config(raw: dict[str, Any], path: str | Path | None = None) -> StudyConfig:
    """Validate a recipe mapping and build a :class:`StudyConfig` (see the module docstring)."""
    raw = copy.deepcopy(_expect_mapping(raw, path, "<root>"))
    _check_keys(raw, _TOP_KEYS, path, "")
    for required in ("study", "variant", "models", "arms"):
        if required not in raw:
            raise ConfigError(path, required, "missing required key")
    study, variant = raw["study"], raw["variant"]
    if study not in STUDIES:
        raise ConfigError(path, "study", f"unknown study {study!r}; use one of {list(STUDIES)}")
    if variant not in VARIANTS:
        raise ConfigError(path, "variant", f"unknown variant {variant!r}; use one of {list(VARIANTS)}")

    seeds = raw.get("seeds", 3)
    if isinstance(seeds, int) and seeds > 0:
        seeds = list(range(seeds))
    elif not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)):
        raise ConfigError(path, "seeds", f"expected a positive int or a list of ints, got {seeds!r}")

    data = _expect_mapping(raw.get("data"), path, "data")
    _check_keys(data, _DATA_KEYS, path, "data")
    source = data.get("source", "embedded")
    if source not in ("embedded", "hub"):
        raise ConfigError(path, "data.source", f"unknown source {source!r}; use 'embedded' or 'hub'")
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(path, "data.tasks", "expected a non-empty list of task names")
    if source == "embedded":
        for i, task in enumerate(tasks):
            if task not in HELDOUT_TASKS:
                raise ConfigError(path, f"data.tasks[{i}]", f"unknown embedded task {task!r}; known: {sorted(HELDOUT_TASKS)}")
    else:
        from ..data.hub import SUPERGLUE_TASKS

        for i, task in enumerate(tasks):
            if task not in SUPERGLUE_TASKS:
                raise ConfigError(path, f"data.tasks[{i}]", f"unknown SuperGLUE task {task!r}; known: {sorted(SUPERGLUE_TASKS)}")
        for required in ("task_dataset",):
            if not data.get(required):
                raise ConfigError(path, f"data.{required}", "missing: a Hub dataset id is required with source: hub")

    models: dict[str, ModelSpec] = {}
    for name, spec in _expect_mapping(raw["models"], path, "models").items():
        spec = _expect_mapping(spec, path, f"models.{name}")
        _check_keys(spec, _MODEL_KEYS, path, f"models.{name}")
        init = spec.get("init")
        if not init or not isinstance(init, str):
            raise ConfigError(path, f"models.{name}.init", "missing model id (a 'tiny:<name>', Hub id or local path)")
        if init.startswith("tiny:") and init[5:] not in TINY_MODELS:
            raise ConfigError(path, f"models.{name}.init", f"unknown tiny model {init[5:]!r}; known: {sorted(TINY_MODELS)}")
        if not init.startswith("tiny:") and variant != "real":
            raise ConfigError(path, f"models.{name}.init", f"a {variant} recipe must use embedded models ('tiny:<name>')")
        kind = spec.get("kind")
        if kind is not None and kind not in KINDS:
            raise ConfigError(path, f"models.{name}.kind", f"unknown kind {kind!r}; use one of {list(KINDS)}")
        args = dict(_expect_mapping(spec.get("args"), path, f"models.{name}.args"))
        check_training_args(args, path, f"models.{name}.args")
        models[name] = ModelSpec(name, init, dict(_expect_mapping(spec.get("overrides"), path, f"models.{name}.overrides")), kind, args)
    if not models:
        raise ConfigError(path, "models", "at least one model is required")

    pretrain = _stage(raw.get("pretrain"), _PRETRAIN_KEYS, path, "pretrain")
    instruct = _stage(raw.get("instruct"), _INSTRUCT_KEYS, path, "instruct")
    for name, stage in (("pretrain", pretrain), ("instruct", instruct)):
        if stage.extra.get("shipped_dir"):
            shipped = Path(stage.extra["shipped_dir"])
            if not shipped.is_absolute() and path is not None:
                shipped = Path(path).parent / shipped
            if not shipped.is_dir():
                raise ConfigError(path, f"{name}.shipped_dir", f"no such directory: {shipped}")
            stage.extra["shipped_dir"] = str(shipped)
    finetune = _stage(raw.get("finetune"), _FINETUNE_KEYS, path, "finetune")
    stopping = _expect_mapping(finetune.extra.get("early_stopping"), path, "finetune.early_stopping")
    _check_keys(stopping, _EARLY_STOPPING_KEYS, path, "finetune.early_stopping")
    for key in ("eval_every", "patience"):
        if key in stopping and (isinstance(stopping[key], bool) or not isinstance(stopping[key], int) or stopping[key] < 1):
            raise ConfigError(path, f"finetune.early_stopping.{key}", f"expected a positive int, got {stopping[key]!r}")
    if "min_steps" in stopping and (isinstance(stopping["min_steps"], bool) or not isinstance(stopping["min_steps"], int)
                                    or stopping["min_steps"] < 0):
        raise ConfigError(path, "finetune.early_stopping.min_steps", f"expected an int >= 0, got {stopping['min_steps']!r}")
    if "min_delta" in stopping and (isinstance(stopping["min_delta"], bool) or not isinstance(stopping["min_delta"], (int, float))):
        raise ConfigError(path, "finetune.early_stopping.min_delta", f"expected a number, got {stopping['min_delta']!r}")
    if variant == "real" and pretrain.enabled and "pretrain" in raw:
        raise ConfigError(path, "pretrain.enabled", "real recipes start from Hub checkpoints; set enabled: false")
    if variant == "real":
        pretrain.enabled = False
    evaluate = _expect_mapping(raw.get("evaluate"), path, "evaluate")
    _check_keys(evaluate, _EVALUATE_KEYS, path, "evaluate")
    if evaluate.get("split", "test") not in ("test", "validation"):
        raise ConfigError(path, "evaluate.split", f"expected 'test' or 'validation', got {evaluate['split']!r}")

    arms: dict[str, ArmSpec] = {}
    for name, spec in _expect_mapping(raw["arms"], path, "arms").items():
        spec = _expect_mapping(spec, path, f"arms.{name}")
        _check_keys(spec, _ARM_KEYS, path, f"arms.{name}")
        model = spec.get("model")
        if model not in models:
            raise ConfigError(path, f"arms.{name}.model", f"unknown model {model!r}; defined models: {sorted(models)}")
        args = dict(_expect_mapping(spec.get("args"), path, f"arms.{name}.args"))
        check_training_args(args, path, f"arms.{name}.args")
        instruct_arm = bool(spec.get("instruct", False))
        if instruct_arm and not instruct.enabled:
            raise ConfigError(path, f"arms.{name}.instruct", "the instruct stage is disabled (instruct.enabled: false)")
        if instruct_arm and source == "hub" and not data.get("instruction_dataset"):
            raise ConfigError(path, "data.instruction_dataset", f"missing: arm {name!r} is instruction-tuned")
        finetune_arm = spec.get("finetune", True)
        if not isinstance(finetune_arm, bool):
            raise ConfigError(path, f"arms.{name}.finetune", f"expected true or false, got {finetune_arm!r}")
        if not finetune_arm and args:
            raise ConfigError(path, f"arms.{name}.args", "a zero-shot arm (finetune: false) trains nothing; remove its args")
        arms[name] = ArmSpec(name, model, instruct_arm, args, spec.get("label"), finetune_arm)
    if not arms:
        raise ConfigError(path, "arms", "at least one arm is required")

    deltas: list[DeltaSpec] = []
    raw_deltas = raw.get("deltas") or []
    if not isinstance(raw_deltas, list):
        raise ConfigError(path, "deltas", "expected a list of {name, expr, paper} mappings")
    for i, spec in enumerate(raw_deltas):
        spec = _expect_mapping(spec, path, f"deltas[{i}]")
        _check_keys(spec, _DELTA_KEYS, path, f"deltas[{i}]")
        if "expr" not in spec:
            raise ConfigError(path, f"deltas[{i}].expr", "missing delta expression")
        try:
            used = delta_arms(spec["expr"])
        except (SyntaxError, ValueError) as err:
            raise ConfigError(path, f"deltas[{i}].expr", f"invalid expression {spec['expr']!r}: {err}") from None
        unknown = used - set(arms)
        if unknown:
            raise ConfigError(path, f"deltas[{i}].expr", f"unknown arm(s) {sorted(unknown)}; arms: {sorted(arms)}")
        paper = str(spec.get("paper", "+"))
        if paper not in DIRECTIONS:
            raise ConfigError(path, f"deltas[{i}].paper", f"expected one of {list(DIRECTIONS)} (positive, negative, no clear difference)")
        deltas.append(DeltaSpec(str(spec.get("name", spec["expr"])), spec["expr"], paper, spec.get("paper_value"), str(spec.get("source", ""))))

    return StudyConfig(
        study=study,
        variant=variant,
        path=str(path) if path else "<dict>",
        raw=raw,
        description=str(raw.get("description", "")),
        seeds=seeds,
        tokenizer=str(raw.get("tokenizer", "byt5")),
        output_dir=str(raw.get("output_dir", f"results/{study}")),
        cache_dir=str(raw.get("cache_dir", "runs/cache")),
        data=dict(data, source=source),
        models=models,
        pretrain=pretrain,
        instruct=instruct,
        finetune=finetune,
        evaluate=dict(evaluate),
        arms=arms,
        deltas=deltas,
        sft=_check_sft(raw.get("sft"), path, Path(path).parent if path else Path(".")),
    )


class Replace(dict):
    """A mapping tagged ``!replace`` in an extending recipe: it replaces the base's mapping instead of merging."""


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads the ``!replace`` tag (:class:`Replace`)."""


def _construct_replace(loader: yaml.SafeLoader, node: yaml.Node) -> Replace:
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(None, None, "!replace tags a mapping", node.start_mark)
    return Replace(loader.construct_mapping(node, deep=True))


_RecipeLoader.add_constructor("!replace", _construct_replace)


def merge_recipes(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``child`` over ``base``: mappings merge key by key, unless tagged ``!replace``
    (:class:`Replace`); any other value (lists included) replaces. The result holds plain dicts only."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and not isinstance(value, Replace) and isinstance(out.get(key), dict):
            out[key] = merge_recipes(out[key], value)
        else:
            out[key] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """A deep copy of ``value`` with :class:`Replace` mappings turned into plain dicts."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def _read_yaml_mapping(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One recipe file as a mapping, its ``extends:`` chain resolved (relative to the file; cycles are errors)."""
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError(path, "<file>", f"no such recipe file{where}")
    if path.resolve() in chain:
        raise ConfigError(path, "extends", "recipes extend each other in a cycle: " + " -> ".join(map(str, chain)))
    try:
        raw = yaml.load(path.read_text(), Loader=_RecipeLoader) or {}  # a SafeLoader subclass: plain data only
    except yaml.YAMLError as err:
        raise ConfigError(path, "<yaml>", f"not valid YAML: {err}") from None
    raw = _expect_mapping(raw, path, "<root>")
    base = raw.pop("extends", None)
    if base is None:
        return _plain(raw)
    if not isinstance(base, str):
        raise ConfigError(path, "extends", f"expected the path of a recipe file, got {base!r}")
    return merge_recipes(_read_yaml_mapping(path.parent / base, (*chain, path.resolve())), raw)


def read_recipe_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a recipe YAML file, resolve ``extends:`` and apply dotted-key ``overrides``; errors name file and key.

    ``extends: tiny.yaml`` (relative to the file) starts from that recipe and deep-merges this file's keys over it
    (:func:`merge_recipes`; a mapping tagged ``!replace``, e.g. ``arms: !replace {...}``, replaces the base's).
    Relative paths in the result (``shipped_dir``, ``sft.accelerate``) are read relative to the file given here, so
    a recipe should extend one in its own directory.
    """
    path = Path(path)
    raw = _read_yaml_mapping(path)
    for key, value in (overrides or {}).items():
        try:
            set_dotted(raw, key, value)
        except ValueError as err:
            raise ConfigError(path, key, str(err)) from None
    return raw


def load_study_config(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read, override (dotted keys) and validate a recipe YAML file."""
    return parse_study_config(read_recipe_yaml(path, overrides), Path(path))


# ---------------------------------------------------------------------------------------------- decoder-only SFT
_LORA_KEYS = {
    "r", "lora_alpha", "lora_dropout", "bias", "target_modules", "dense_target_modules", "expert_parameters",
    "modules_to_save", "use_rslora",
}
#: ``SFTConfig`` fields the pipeline sets itself.
_MANAGED_SFT = {"output_dir", "seed", "data_seed", "report_to", "chat_template_path"}
_ACCELERATE_TYPES = {"NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED"}


def _sft_only_fields() -> frozenset[str]:
    from transformers import TrainingArguments
    from trl import SFTConfig

    return frozenset(f.name for f in dataclasses.fields(SFTConfig)) - frozenset(
        f.name for f in dataclasses.fields(TrainingArguments)
    )


def _check_sft(raw: Any, path: Any, base_dir: Path) -> dict[str, Any]:
    """The ``sft`` section: chat template mode, system prompt, ``SFTConfig``-only fields, LoRA, accelerate config."""
    from .chat import CHAT_TEMPLATE_MODES, OWN_SFT_KEYS

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(path, "sft", f"expected a mapping, got {type(raw).__name__}")
    own = sorted(OWN_SFT_KEYS)
    for key in raw:
        where = f"sft.{key}"
        if key in _MANAGED_SFT:
            raise ConfigError(path, where, "is set by the pipeline and cannot be given in a recipe")
        if key in OWN_SFT_KEYS:
            continue
        try:
            allowed = _sft_only_fields()
        except ImportError:
            raise ConfigError(path, where, "SFTConfig fields need TRL: pip install 'hf-moe-tuning[trl]'") from None
        if key not in allowed:
            raise ConfigError(path, where, f"unknown key: not an SFTConfig-only field nor one of {own}")
    mode = raw.get("chat_template", "auto")
    if mode not in CHAT_TEMPLATE_MODES:
        raise ConfigError(path, "sft.chat_template", f"unknown mode {mode!r}; use one of {list(CHAT_TEMPLATE_MODES)}")
    if raw.get("lora") is not None:
        _check_lora(raw["lora"], path)
    if raw.get("accelerate_config") is not None:
        _check_accelerate(raw["accelerate_config"], path, base_dir)
    return dict(raw)


def _check_lora(lora: Any, path: Any) -> None:
    from .chat import lora_config

    if not isinstance(lora, dict):
        raise ConfigError(path, "sft.lora", f"expected a mapping, got {type(lora).__name__}")
    for key in lora:
        if key not in _LORA_KEYS:
            raise ConfigError(path, f"sft.lora.{key}", f"unknown key; allowed: {sorted(_LORA_KEYS)}")
    if not lora.get("target_modules"):
        raise ConfigError(path, "sft.lora.target_modules", "missing: LoRA needs attention target modules")
    for key in ("target_modules", "dense_target_modules", "expert_parameters"):
        value = lora.get(key, [])
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ConfigError(path, f"sft.lora.{key}", f"expected a list of names, got {value!r}")
    try:
        lora_config(lora, sparse=True)
    except (TypeError, ValueError) as err:
        raise ConfigError(path, "sft.lora", f"invalid LoRA settings: {err}") from None


def _check_accelerate(value: Any, path: Any, base_dir: Path) -> None:
    candidates = [Path(value), base_dir / value]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise ConfigError(path, "sft.accelerate_config", f"no such file {value!r}")
    try:
        cfg = yaml.safe_load(found.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(path, "sft.accelerate_config", f"{found}: not valid YAML: {err}") from None
    kind = cfg.get("distributed_type")
    if kind not in _ACCELERATE_TYPES:
        raise ConfigError(path, "sft.accelerate_config", f"{found}: distributed_type {kind!r} not one of {sorted(_ACCELERATE_TYPES)}")


#: Embedded stand-ins of Hub models, used to check LoRA targets offline (same module names).
TINY_COUNTERPARTS: dict[str, str] = {
    "allenai/OLMo-1B-0724-hf": "olmo",
    "mistralai/Mistral-7B-v0.1": "mistral",
    "Qwen/Qwen1.5-1.8B": "qwen2",
}


def _check_lora_targets(config: StudyConfig) -> list[str]:
    from peft import get_peft_model

    from ..anatomy import describe_moe
    from ..models import HUB_IDS, build_from_config, build_tiny_model, tiny_config
    from .chat import lora_config

    counterparts = {**{hub: name for name, hub in HUB_IDS.items() if name in TINY_MODELS}, **TINY_COUNTERPARTS}
    checked = []
    for name, spec in config.models.items():
        tiny = spec.init[5:] if spec.is_tiny else counterparts.get(spec.init)
        if tiny is None:
            checked.append(f"models.{name}: no tiny stand-in for {spec.init}, LoRA targets not checked")
            continue
        model = build_tiny_model(tiny) if tiny in TINY_MODELS else build_from_config(tiny_config(tiny))
        sparse = describe_moe(model).is_moe
        try:
            peft_model = get_peft_model(model, lora_config(config.sft["lora"], sparse=sparse))
        except ValueError as err:
            raise ConfigError(config.path, "sft.lora", f"targets do not resolve on {spec.init} ({tiny} stand-in): {err}") from None
        trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        need = {"attention": ("self_attn",), **({"experts": ("experts",)} if sparse else {"MLP": ("mlp",)})}
        for what, markers in need.items():
            if not any(any(m in n for m in markers) for n in trained):
                raise ConfigError(config.path, "sft.lora", f"no LoRA adapter on the {what} of {spec.init} ({tiny} stand-in)")
        checked.append(f"models.{name}: LoRA on attention and {'experts' if sparse else 'MLP'} ({len(trained)} adapter tensors)")
    return checked


def validate_training_args(config: StudyConfig, check_lora_targets: bool = True, num_processes: int = 1) -> list[str]:
    """Build every stage's and arm's training config (``MoETrainingArguments`` for encoder-decoder models,
    ``MoESFTConfig`` for decoder-only ones) to catch value errors offline; with LoRA, check its targets.
    Every global batch is split for ``num_processes`` processes (:func:`resolve_batch`) first.

    Returns what was checked; raises :class:`ConfigError` naming the stage or arm.
    """
    import tempfile

    from .backends import SEQ2SEQ, backend_name

    checked = [f"training arguments of every stage and arm, global batches split over {num_processes} process(es)"]
    # offline by design: a Hub id's config is read only when cached, else its backend follows its name
    backends = {name: backend_name(spec, local_files_only=True) for name, spec in config.models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        combos: list[tuple[str, str, dict]] = []
        for arm in config.arms.values():
            model = config.models[arm.model]
            backend = backends[arm.model]
            kinds = [model.kind] if model.kind else list(KINDS)
            for kind in kinds:
                combos.append((backend, f"arms.{arm.name}", {**config.finetune.args_for(kind), **model.args, **arm.args}))
                for stage_name in ("pretrain", "instruct"):
                    stage: StageConfig = getattr(config, stage_name)
                    if stage.enabled:
                        combos.append((backend, stage_name, {**stage.args_for(kind), **model.args}))
        for backend, where, args in combos:
            # use_cpu / no bf16: judge the values, not this machine's hardware (bf16 recipes validate on a laptop)
            try:
                args = resolve_batch(args, num_processes)
            except ValueError as err:
                raise ConfigError(config.path, where, f"batch size: {err}") from None
            try:
                if backend == SEQ2SEQ:
                    MoETrainingArguments(output_dir=tmp, report_to="none", use_cpu=True, **args)
                else:
                    from .chat import OWN_SFT_KEYS, sft_config

                    options = {k: v for k, v in config.sft.items() if k not in OWN_SFT_KEYS}
                    sft_config({**args, "bf16": False, "use_cpu": True}, tmp, sft_options=options)
            except (ValueError, TypeError) as err:
                raise ConfigError(config.path, where, f"invalid training arguments: {err}") from None
    if config.sft.get("lora") and check_lora_targets:
        checked += _check_lora_targets(config)
    return checked
