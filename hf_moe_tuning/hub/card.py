"""The model card of a run: :func:`build_model_card` renders a :class:`~hf_moe_tuning.hub.summary.RunSummary`.

The card is ``huggingface_hub.ModelCard.from_template`` with the template shipped in
``hf_moe_tuning/hub/templates/model_card.md``. Its YAML metadata holds ``base_model`` (when the run
started from a Hub model), ``library_name`` (``transformers``, or ``peft`` for adapters), tags (``moe``,
``mixture-of-experts``, ``hf-moe-tuning``, ``freeze-<strategy>``, ``lora`` for adapters), ``datasets``
and, where evaluation ran, the final evaluation metrics as ``model-index``. The body's *MoE fine-tuning*
section (:func:`moe_card_section`) gives the freezing strategy with the trainable share per parameter
group (or the LoRA table for adapters), the router-loss coefficients and schedules with their last
logged values, the other MoE callbacks' settings, the expert-load summary table with the heatmap image,
the training arguments that matter, and the recipe/arm that produced the run.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from huggingface_hub.utils import validate_repo_id

from .run_record import MOE_RUN_NAME, RECORDED_ARGS
from .summary import CARD_NAME, TRAIN_HEATMAP, RunSummary, load_run

PROJECT_URL = "https://github.com/hf-moe-tuning/hf_moe_tuning"
#: The Jinja template of the card (package data).
TEMPLATE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "model_card.md")

#: Training arguments shown in the card (when set), in this order.
CARD_ARGS: tuple[str, ...] = RECORDED_ARGS

_STRATEGY_TEXT = {
    "all": "every parameter trains",
    "non_moe": "everything but the routers and the routed experts trains",
    "moe": "only the routers and the routed experts train",
    "attention": "only attention trains",
    "ffn": "only the dense FFNs of non-MoE layers train",
}



class CardValidationError(ValueError):
    """The card's metadata would be rejected by the Hub."""


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
    from ..anatomy import ParamGroup

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
        guard = (summary.callbacks or {}).get("NaNGuardCallback") or {}
        policy = guard.get("policy") or settings.get("nan_policy", "error")
        text += ["", f"Last logged `lm_loss`: {_fmt(lm)}; non-finite policy: `{policy}`."]
    return "\n".join(text)


def _controls_section(summary: RunSummary) -> str:
    """Settings of the other recording MoE callbacks (expert dropout, capacity, jitter, bias balancing); the
    expert-load logger and the NaN guard record theirs too, but they control nothing in the routing."""
    shown = {"RouterLossCallback", "MoEFreezingCallback", "ExpertLoadCallback", "NaNGuardCallback"}
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
    from ..metrics.expert_load import LayerLoad

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
    from ..metrics.expert_load import layer_statistics

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


def _hub_model_id(value: str | None) -> str | None:
    """``value`` if it names a Hub model (not a local path, not a tiny name), else ``None``."""
    from ..models import TINY_MODELS

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
    """The card's tags: ``hf-moe-tuning``, ``moe``, ``mixture-of-experts``, ``freeze-<strategy>``, ``lora``, the model type, ``extra``."""
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
    license: str | None = None,
    language: str | Sequence[str] | None = None,
    tags: Iterable[str] = (),
    pipeline_tag: str | None = None,
) -> ModelCard:
    """The full card of a run: metadata + title + the MoE section + results + framework versions.

    Rendered with ``ModelCard.from_template`` from :data:`TEMPLATE_PATH` and validated locally
    (:func:`validate_card`) before it is returned. The keyword arguments override what the run
    recorded (``base_model``: a Hub id; ``datasets``: Hub dataset ids; ``tags``: added to the MoE tags).
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
    description = (
        f"This model is {kind} {origin}"
        + (f", trained on {', '.join(datasets)}" if datasets else "")
        + (f" for {summary.global_step:,} steps" if summary.global_step else "")
        + "."
    )
    metrics = summary.eval_metrics
    card = ModelCard.from_template(
        data,
        template_path=TEMPLATE_PATH,
        model_name=model_name,
        description=description,
        moe_section=moe_card_section(summary).rstrip(),
        evaluation=_table(("metric", "value"), [(f"`{k}`", _fmt(v)) for k, v in sorted(metrics.items())]) if metrics else "",
        versions=_versions(summary.is_adapter),
    )
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
