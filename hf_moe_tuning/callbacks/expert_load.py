"""``ExpertLoadCallback``: per-layer routing statistics in the Trainer logs, a JSONL file, heatmaps, TensorBoard.

Usage with a plain Trainer (``MoETrainer`` adds it from ``MoETrainingArguments.moe_log_expert_load``)::

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ExpertLoadCallback()])
    enable_moe_logging(trainer)   # so TensorBoard / W&B see the moe/* keys
    trainer.train()

After every forward (``on_substep_end`` / ``on_step_end`` in training, ``on_prediction_step`` in
evaluation) the experts each token went to are added to per-expert counters on the device; padding and
ignored labels are masked. The experts are the router's own choice where the router returns it (the
``(logits, weights, indices)`` routers of transformers 5: Mixtral, Qwen-MoE, OLMoE, DeepSeek, GPT-OSS
and most others, recorded by the shared :class:`~hf_moe_tuning.routing.capture.RouterCapture`), so
group limits, correction biases and hash routing count exactly as the model routed. Where the router is
a bare linear layer (Switch, NLLB-MoE, JetMoE, DBRX) they are derived from its logits (top-k; Switch
capacity drops from the routing order of each sequence). Layers that route alike are counted together
in one scatter-add. When the Trainer is about to log, the counters are summed over the processes the
Trainer's accelerator trains with (one reduction, :mod:`hf_moe_tuning.reduction`; never over independent runs
that merely share a process group), reduced to the metrics below and pushed into the log. Evaluation keeps its own
counters; its metrics carry the ``eval_`` prefix. Product-key layers (Doge) have no per-expert logits
and are not counted.

Routing drift is measured on a fixed probe batch (the first ``probe_size`` training examples, collated
by the train dataloader's collator, run in eval mode without gradients) against the routing of the
model at train start, at the first log at or after every ``drift_every_steps`` optimizer steps. One
forward of the probe per measurement costs about ``probe_size / (3 * batch_size * drift_every_steps)``
of the training time (0.7% for 8 examples, batch 8, every 50 steps). The same probe tokens are routed
at start and later, so a small probe measures drift without sampling noise.
The reference is saved with every checkpoint (``expert_load_drift_reference.pt``, the probe's top-1
choices and loads, a few bytes per probe token and layer), so a run resumed from that checkpoint keeps
measuring drift against the model as it was when the run first started; without a usable file (a
checkpoint written by something else, a truncated file, a reference of other layers) the resumed model
becomes the reference, and the callback says so. The file is written atomically; ``MoETrainer`` writes
it before ``trainer_state.json`` (:meth:`ExpertLoadCallback.save_checkpoint_files`), so a checkpoint
that the resume treats as complete always has it (a plain ``Trainer`` writes it in ``on_save``, after).

On resume, ``expert_load.jsonl`` is cut back to the records up to the resumed step (rewritten
atomically, unreadable half-written lines dropped), so every step appears once, and the train-end
heatmap sums the whole file, i.e. the whole run.

=================================  ============================================================================
key                                meaning (``c_e``: tokens routed to expert ``e`` of the layer in the interval)
=================================  ============================================================================
``moe/layer{i}/load_cv``           coefficient of variation ``std(c) / mean(c)``; 0 = balanced
``moe/layer{i}/entropy``           normalized entropy ``-sum p_e log p_e / log E``, ``p = c / sum(c)``; 1 = balanced
``moe/layer{i}/max_violation``     MaxVio ``max(c) / mean(c) - 1``; 0 = balanced, ``E - 1`` = collapsed
``moe/layer{i}/dead_experts``      experts that received no token in the interval
``moe/layer{i}/dropped_frac``      tokens dropped past ``expert_capacity`` / tokens (Switch only)
``moe/layer{i}/routing_drift``     share of probe tokens whose top-1 expert (the chosen expert with the highest
                                   router logit) changed since train start (*)
``moe/layer{i}/routing_drift_js``  Jensen-Shannon divergence (base 2) of the probe load vs train start (*)
``moe/load_cv_mean``               mean of ``load_cv`` over MoE layers
``moe/entropy_mean``               mean of ``entropy`` over MoE layers
``moe/max_violation_max``          largest ``max_violation`` of any MoE layer
``moe/dead_experts_total``         sum of ``dead_experts`` over MoE layers
``moe/dropped_frac_mean``          mean of ``dropped_frac`` over capacity layers (Switch only)
``moe/routing_drift``              mean of ``routing_drift`` over MoE layers (*)
``moe/routing_drift_js``           mean of ``routing_drift_js`` over MoE layers (*)
=================================  ============================================================================

(*) train logs only, on the logs where drift is measured (see ``drift_every_steps``).

``i`` is the MoE-layer index of :func:`~hf_moe_tuning.anatomy.describe_moe` (module order; encoder
layers before decoder layers). Files, written by the main process: ``output_dir/expert_load.jsonl``
(one record per log with the per-layer, per-expert counts), ``output_dir/expert_load_train.png`` (the
whole run's load at train end) and ``output_dir/expert_load_{eval prefix}_step{N}.png`` at each
evaluation (inside ``train`` they render on a background thread, off the step path, with matplotlib
imported there at train start; ``on_train_end`` waits for them, so all are written when ``train`` returns;
each is written atomically); with ``"tensorboard"`` in ``report_to``, histograms of the per-expert load (x = expert
index, height = tokens), written by transformers' own ``TensorBoardCallback`` writer next to the scalars
(found when the trainer binds its callbacks: ``MoETrainer``, ``MoESFTTrainer`` or ``enable_moe_logging``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..anatomy import MoEAnatomy, MoELayer, anatomy_for, require_moe
from ..crash_safety import atomic_torch_save, atomic_write_text
from ..hub.run_record import copy_moe_run_to_checkpoint, record_moe_run
from ..metrics.expert_load import (
    ExpertLoadCounter,
    LayerLoad,
    capacity_overflow,
    drift_statistics,
    expert_counts,
    save_load_heatmap,
    select_experts,
    summarize_load,
)
from ..reduction import warn_if_independent_runs
from ..routing.capture import RouterCapture
from .base import EVAL, TRAIN, MoEMetricsCallback, log_kind, real_eval_samples

logger = logging.getLogger(__name__)

#: model_types whose capacity rule :func:`~hf_moe_tuning.metrics.expert_load.capacity_overflow` reproduces.
CAPACITY_RULES: dict[str, str] = {"switch_transformers": "per-sequence top-1, priority > expert_capacity"}

JSONL_NAME = "expert_load.jsonl"
#: File in each checkpoint folder holding the routing-drift reference of the run's start.
REFERENCE_NAME = "expert_load_drift_reference.pt"


@dataclass
class LayerRouting:
    """How one MoE layer turns router logits into expert choices, read live from the model.

    The correction bias and the capacity are looked up at every use, so in-place changes (a
    bias-balancing update of ``e_score_correction_bias``, a capacity factor switched between train and
    eval) are followed. Layers with the same :attr:`key` route alike and are counted together.
    """

    layer: MoELayer
    router: nn.Module
    capacity_owner: nn.Module | None = None

    def __post_init__(self) -> None:
        groups = getattr(self.router, "num_group", None) or getattr(self.router, "n_group", None)
        self.num_groups = groups if isinstance(groups, int) else None
        topk_groups = getattr(self.router, "topk_group", None)
        self.topk_groups = topk_groups if isinstance(topk_groups, int) else None
        has_bias = self.correction_bias() is not None
        #: layers with equal keys see the same tokens and choose experts by the same rule
        self.key = (
            self.layer.stack, self.layer.num_experts, self.layer.top_k, self.layer.scoring, has_bias,
            self.num_groups, self.topk_groups, self.measures_dropped,
        )

    def correction_bias(self) -> torch.Tensor | None:
        bias = getattr(self.router, "e_score_correction_bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    @property
    def measures_dropped(self) -> bool:
        return self.capacity_owner is not None

    def capacity(self) -> int | None:
        value = getattr(self.capacity_owner, "expert_capacity", None)
        return int(value) if isinstance(value, (int, float)) else None


def select_routed(routings: list[LayerRouting], logits: torch.Tensor) -> torch.Tensor:
    """Top-k experts ``[L, N, k]`` for the stacked logits ``[L, N, E]`` of ``L`` layers with one :attr:`~LayerRouting.key`."""
    first = routings[0]
    bias = None
    if first.correction_bias() is not None:
        bias = torch.stack([routing.correction_bias() for routing in routings])
    return select_experts(
        logits,
        first.layer.top_k,
        scoring=first.layer.scoring,
        correction_bias=bias,
        num_groups=first.num_groups,
        topk_groups=first.topk_groups,
    )


def _capacity_owner(model: nn.Module, layer: MoELayer) -> nn.Module | None:
    """The module holding ``expert_capacity`` for ``layer`` (Switch: the router around the classifier)."""
    candidates = [layer.router_path, layer.router_path.rpartition(".")[0], f"{layer.path}.router", layer.path]
    for path in candidates:
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        if isinstance(getattr(module, "expert_capacity", None), (int, float)):
            return module
    return None


def _fits_int16(values: torch.Tensor) -> bool:
    return values.numel() == 0 or int(values.max()) <= torch.iinfo(torch.int16).max


def probe_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor | None]:
    """The drift probe's forward inputs and its labels, kept apart: the probe needs the routing, not a loss.

    Without ``labels`` the model computes no loss; an encoder-decoder gets the ``decoder_input_ids`` its labels
    would have produced (``prepare_decoder_input_ids_from_labels``), and a causal LM whose forward takes
    ``logits_to_keep`` computes the logits of the last position only, so the probe never holds
    ``[probe_size, seq, vocab]`` logits (10 GB in float32 at 8 x 2,048 tokens of a 151k vocabulary). The labels
    come back separately: they still mark which tokens count (:meth:`RouterCapture.set_token_labels`). Where
    neither applies (an encoder-decoder without that method), the batch is passed as it is.
    """
    inputs = dict(batch)
    labels = inputs.pop("labels", None)
    if labels is None:
        return inputs, None
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        if "decoder_input_ids" not in inputs:
            prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
            if prepare is None:
                return dict(batch), None
            inputs["decoder_input_ids"] = prepare(labels=labels)
    elif "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = 1
    return inputs, labels


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def read_jsonl_records(path: str) -> tuple[list[dict], int]:
    """The records of an ``expert_load.jsonl`` and the number of unreadable lines (e.g. one cut by a kill)."""
    records, bad = [], 0
    if not os.path.isfile(path):
        return records, bad
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            else:
                bad += 1
    return records, bad


def truncate_jsonl(path: str, step: int) -> int:
    """Keep the records of ``path`` up to ``step`` (what a run resumed at ``step`` had written); returns lines dropped.

    Records past ``step`` were written after the checkpoint the run resumes from and will be written again;
    unreadable lines are dropped too. The file is rewritten atomically, and only when something is dropped.
    """
    records, bad = read_jsonl_records(path)
    kept = [r for r in records if r["step"] <= step]
    dropped = len(records) - len(kept) + bad
    if dropped:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return dropped


def train_totals_from_records(records: list[dict]) -> tuple[list[LayerLoad] | None, int | None]:
    """Per-layer totals of the ``"train"`` records and the first step they cover (``(None, None)`` without any)."""
    totals: dict[int, LayerLoad] = {}
    first = None
    for record in records:
        if record.get("split") != "train":
            continue
        first = record["step"] if first is None else min(first, record["step"])
        for layer in record.get("layers", []):
            index = int(layer["layer"])
            total = totals.get(index)
            if total is None:
                total = totals[index] = LayerLoad(index, layer["path"], int(layer["num_experts"]), int(layer["top_k"]),
                                                  0, [0] * int(layer["num_experts"]), None)
            total.tokens += int(layer["tokens"])
            total.counts = [a + b for a, b in zip(total.counts, layer["counts"])]
            if layer.get("dropped") is not None:
                total.dropped = [a + b for a, b in zip(total.dropped or [0] * total.num_experts, layer["dropped"])]
    return ([totals[i] for i in sorted(totals)] or None), first


def _import_matplotlib() -> None:
    for module in ("matplotlib.backends.backend_agg", "matplotlib.colors", "matplotlib.figure"):
        importlib.import_module(module)


def _render_heatmap(loads: list[LayerLoad], path: str, title: str) -> None:
    """Render to a hidden temporary file in the same folder, then rename it to ``path`` (atomic)."""
    folder, name = os.path.split(path)
    # a unique name: the background thread and the train-end render may write the same file at once
    handle, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    os.close(handle)
    try:
        save_load_heatmap(loads, tmp, title)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("expert load heatmap saved to %s", path)


def _eval_prefix(metrics: dict | None) -> str:
    """``"eval"`` or e.g. ``"eval_data1"`` from an evaluation's metric keys (``<prefix>_runtime``)."""
    for key in metrics or {}:
        if str(key).endswith("_runtime"):
            return str(key)[: -len("_runtime")]
    return "eval"


class ExpertLoadCallback(MoEMetricsCallback):
    """Log per-layer expert-load statistics and routing drift (key table in the module docstring).

    Args:
        write_jsonl: append per-layer, per-expert counts to ``output_dir/expert_load.jsonl`` at each log.
        write_heatmap: save layer x expert heatmaps at train end and at each evaluation.
        probe_size: examples in the fixed probe batch for routing drift; 0 disables drift.
        drift_every_steps: measure drift at the first log at or after every this many optimizer steps.
        tensorboard: write per-expert load histograms to the Trainer's TensorBoard writer; ``None`` = when
            ``"tensorboard"`` is in ``report_to``.
        anatomy: the trainer's anatomy of the model (computed when binding if ``None``).
    """

    def __init__(
        self,
        *,
        write_jsonl: bool = True,
        write_heatmap: bool = True,
        probe_size: int = 8,
        drift_every_steps: int = 50,
        tensorboard: bool | None = None,
        anatomy: MoEAnatomy | None = None,
    ) -> None:
        super().__init__()
        if probe_size < 0:
            raise ValueError(f"probe_size must be >= 0, got {probe_size}")
        if drift_every_steps < 1:
            raise ValueError(f"drift_every_steps must be >= 1, got {drift_every_steps}")
        self.drift_every_steps = drift_every_steps
        self._next_drift_step = drift_every_steps
        self.write_jsonl = write_jsonl
        self.write_heatmap = write_heatmap
        self.probe_size = probe_size
        self.tensorboard = tensorboard
        self.anatomy = anatomy
        self.model: nn.Module | None = None
        self.capture: RouterCapture | None = None
        self.routing: dict[int, LayerRouting] = {}
        self._counters: dict[str, ExpertLoadCounter] = {}
        self._dirty = {TRAIN: False, EVAL: False}
        self._seen_forward = 0
        self._device = torch.device("cpu")
        self._train_totals: list[LayerLoad] | None = None
        self._eval_loads: list[LayerLoad] | None = None
        self._eval_metrics: dict[str, float] = {}
        self._probe: dict[str, Any] | None = None
        self._reference: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._tensorboard_callback: Any = None  # transformers' TensorBoardCallback, found by bind_trainer
        self._warned: set[str] = set()
        self._heatmap_renderer: ThreadPoolExecutor | None = None  # while training: PNGs render off the step path
        self._heatmap_jobs: list[Future] = []
        self._start_step = 0
        self._reference_saved_to: str | None = None
        #: the checkpoint folder ``train()`` resumes from, when known (``MoETrainer`` sets it); otherwise the
        #: drift reference is looked up in ``args.resume_from_checkpoint`` and ``output_dir/checkpoint-<step>``
        self.resume_checkpoint: str | None = None

    @classmethod
    def from_args(cls, args: Any, anatomy: MoEAnatomy | None = None) -> ExpertLoadCallback | None:
        """Build from :class:`~hf_moe_tuning.MoETrainingArguments`; ``None`` when ``moe_log_expert_load`` is off."""
        if not getattr(args, "moe_log_expert_load", True):
            return None
        return cls(
            write_jsonl=args.moe_expert_load_jsonl,
            write_heatmap=args.moe_expert_load_heatmap,
            probe_size=args.moe_drift_probe_size,
            drift_every_steps=getattr(args, "moe_drift_every_steps", 50),
            tensorboard="tensorboard" in (args.report_to or []),
            anatomy=anatomy,
        )

    # ------------------------------------------------------------------ binding
    def bind(self, model: nn.Module) -> None:
        """Attach to ``model``'s router capture (raises :class:`NoMoELayersError` for a model without routers)."""
        if self.model is model and self.capture is not None and self.capture.attached:
            return
        if self.capture is not None:
            self.capture.release()
        anatomy = anatomy_for(model, self.anatomy)
        require_moe(anatomy, "Expert-load logging (ExpertLoadCallback, moe_log_expert_load=True)")
        self.model = model
        self.capture = RouterCapture.acquire(model, anatomy)
        self._seen_forward = self.capture.forward_count
        self._device = _model_device(model)
        self.routing = {}
        skipped = [layer.path for layer in self.capture.anatomy.layers if layer.scoring == "product_key"]
        if skipped:
            self._warn_once(
                "product_key",
                "expert load: %d MoE layer(s) route by product keys (e.g. %s) and give no per-expert router "
                "logits; they are not counted.%s",
                len(skipped),
                skipped[0],
                " No layer is left, so no moe/* metric will be logged." if len(skipped) == len(anatomy.layers) else "",
            )
        for layer in self.capture.anatomy.layers:
            if layer.scoring == "product_key":
                continue
            owner = None
            if layer.capacity:
                rule = CAPACITY_RULES.get(anatomy.model_type or "")
                owner = _capacity_owner(model, layer) if rule else None
                if owner is None:
                    self._warn_once(
                        f"capacity:{anatomy.model_type}",
                        "expert load: model_type=%r routes with an expert capacity, but dropped_frac is only "
                        "measured for %s; it is not logged for this model.",
                        anatomy.model_type,
                        sorted(CAPACITY_RULES),
                    )
            self.routing[layer.index] = LayerRouting(layer, model.get_submodule(layer.router_path), owner)
        spec = [
            (r.layer.index, r.layer.path, r.layer.num_experts, r.layer.top_k, r.measures_dropped)
            for r in self.routing.values()
        ]
        self._counters = {TRAIN: ExpertLoadCounter(spec), EVAL: ExpertLoadCounter(spec)}

    def close(self) -> None:
        """Release the router hooks."""
        if self.capture is not None:
            self.capture.release()
            self.capture = None
        self.model = None

    def bind_trainer(self, trainer: Any) -> None:
        """Find the trainer's ``TensorBoardCallback``: the load histograms go to its writer, beside the scalars
        (``MoETrainer``, ``MoESFTTrainer`` and ``enable_moe_logging`` call this)."""
        from transformers.integrations import TensorBoardCallback

        self._tensorboard_callback = next(
            (cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)), None
        )

    # ------------------------------------------------------------------ counting
    def _routed(self, with_dropped: bool = True, top1_first: bool = False):
        """Yield ``(routings, indices [L, N, k], mask [N], dropped)`` for the last forward (``dropped``: see :meth:`_dropped`).

        The experts are the router's own choice where the router returns it
        (:attr:`RouterCapture.indices <hf_moe_tuning.routing.capture.RouterCapture>`), else derived from the
        logits as the family routes (:func:`select_routed`). Layers that route alike (same
        :attr:`LayerRouting.key`, source, token count and capacity) are stacked and go through top-k, the
        capacity rule and the counter together: a handful of small kernels per forward instead of a
        handful per layer. With ``top1_first``, column 0 is the chosen expert with the highest router
        logit (router-chosen columns come in no particular order).
        """
        capture = self.capture
        buckets: dict[tuple, list[tuple[LayerRouting, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for layer, logits, mask in capture.layer_items():
            routing = self.routing[layer.index]
            chosen = capture.choice(layer)
            capacity = routing.capacity() if routing.measures_dropped else None
            source = logits if chosen is None else chosen
            key = (routing.key, chosen is not None, tuple(source.shape), source.device, capacity)
            buckets.setdefault(key, []).append((routing, source, logits, mask))
        for (_, from_router, _, _, capacity), items in buckets.items():
            routings = [routing for routing, *_ in items]
            with torch.no_grad():  # the logits may carry autograd history (router losses); counting needs none
                stacked = items[0][1].unsqueeze(0) if len(items) == 1 else torch.stack([x[1] for x in items])
                if not from_router:
                    indices = select_routed(routings, stacked)
                else:
                    indices = stacked if stacked.dtype == torch.long else stacked.long()
                    if top1_first:
                        logits = torch.stack([x[2] for x in items]).gather(-1, indices)
                        indices = indices.gather(-1, logits.argsort(dim=-1, descending=True))
            dropped = None
            if with_dropped and routings[0].measures_dropped:
                dropped = self._dropped(routings, capacity, indices[..., 0])
            yield routings, indices, items[0][3], dropped

    def _consume(self, kind: str) -> None:
        """Add the routing of the last forward (if not counted yet) to the ``kind`` counters."""
        capture = self.capture
        if capture is None or capture.forward_count == self._seen_forward:
            return
        if capture.forward_count - self._seen_forward > 1:
            self._warn_once(
                "skipped",
                "expert load: %d model forwards ran since the last training/prediction step; only the last one "
                "is counted (extra forwards inside a step are not seen).",
                capture.forward_count - self._seen_forward,
                level=logging.DEBUG,
            )
        self._seen_forward = capture.forward_count
        counter = self._counters[kind]
        batch_size = next((v.shape[0] for v in (capture.batch or {}).values() if v.dim() >= 1), None)
        real = real_eval_samples(batch_size) if kind == EVAL and batch_size else batch_size
        for routings, indices, mask, dropped in self._routed():
            if real is not None and real < batch_size:  # accelerate's padded duplicates: counted once
                if mask.shape[0] % batch_size:
                    self._warn_once("duplicates", "expert load: could not drop the padded duplicate samples of the "
                                    "last evaluation batch (unknown [batch, seq] layout); they are counted.")
                else:
                    mask = mask.reshape(batch_size, -1).clone()
                    mask[real:] = False
                    mask = mask.reshape(-1)
            counter.update_layers([routing.layer.index for routing in routings], indices, mask, dropped)
        self._dirty[kind] = True

    def _dropped(
        self, routings: list[LayerRouting], capacity: int | None, top1: torch.Tensor
    ) -> torch.Tensor | bool | None:
        """Tokens of the last forward dropped past capacity ``[L, N]``, from the routing order of each sequence.

        ``False`` when no token can have been dropped, ``None`` when it cannot be told (see
        :meth:`ExpertLoadCounter.update_layers`).
        """
        batch = self.capture.batch if self.capture is not None else {}
        batch_size = next((v.shape[0] for v in batch.values() if v.dim() >= 1), None)
        if capacity is None or not batch_size or top1.shape[-1] % batch_size:
            self._warn_once(
                "layout",
                "expert load: could not recover the [batch, seq] layout (or expert_capacity) of %s; dropped_frac "
                "is omitted for that interval.",
                ", ".join(routing.layer.path for routing in routings),
            )
            return None
        if top1.shape[-1] // batch_size <= capacity:
            return False  # a sequence no longer than the capacity cannot overflow it: nothing dropped
        overflow = capacity_overflow(top1.reshape(top1.shape[0], batch_size, -1), capacity, routings[0].layer.num_experts)
        return overflow.reshape(top1.shape)

    # ------------------------------------------------------------------ drift
    def _build_probe(self, dataloader: Any) -> dict[str, Any] | None:
        """Collate the first ``probe_size`` examples of the train dataset with the dataloader's collator."""
        dataset = getattr(dataloader, "dataset", None)
        collate = getattr(dataloader, "collate_fn", None)
        if dataset is None or collate is None:
            self._warn_once("probe", "expert load: no train dataset/collator to build the drift probe; drift is off.")
            return None
        try:
            examples = [dataset[i] for i in range(min(self.probe_size, len(dataset)))]
        except (TypeError, NotImplementedError):
            examples = list(islice(iter(dataset), self.probe_size))
        if not examples:
            return None
        batch = collate(examples)
        return {k: v for k, v in dict(batch).items() if isinstance(v, torch.Tensor)}

    def _probe_routing(self, model: nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Top-1 choice, mask and top-k counts per layer on the probe batch (eval mode, no grad)."""
        device = _model_device(model)
        batch = {k: v.to(device) for k, v in self._probe.items()}
        was_training = model.training
        model.eval()
        inputs, labels = probe_inputs(model, batch)
        self.capture.probing = True  # not an evaluation batch: the router-loss callback leaves it alone
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            self.capture.probing = False
            model.train(was_training)
        if labels is not None:
            self.capture.set_token_labels(labels)
        out = {}
        for routings, indices, mask, _ in self._routed(with_dropped=False, top1_first=True):
            for routing, layer_indices in zip(routings, indices):
                num_experts = routing.layer.num_experts
                out[routing.layer.index] = (layer_indices[:, 0], mask, expert_counts(layer_indices, mask, num_experts))
        self._seen_forward = self.capture.forward_count
        return out

    def _drift_metrics(self, step: int) -> dict[str, float]:
        # Every process holds the same weights and the same probe, so no reduction is needed; every process
        # still runs the probe forward (sharded models need all ranks in the forward).
        if self._probe is None or not self._reference or self.model is None or step < self._next_drift_step:
            return {}
        self._next_drift_step = (step // self.drift_every_steps + 1) * self.drift_every_steps
        current = self._probe_routing(self.model)
        indices = [index for index in self._reference if index in current]
        if not indices:
            return {}
        # every layer's numbers in one device vector, read with one host copy (was 4 syncs per layer)
        parts, widths = [], []
        for index in indices:
            ref_top1, ref_mask, ref_count = self._reference[index]
            cur_top1, _, cur_count = current[index]
            ref_top1, ref_mask, ref_count = (t.to(cur_top1.device) for t in (ref_top1, ref_mask, ref_count))
            parts += [((ref_top1 != cur_top1) & ref_mask).sum().reshape(1), ref_mask.sum().reshape(1),
                      ref_count.reshape(-1).long(), cur_count.reshape(-1).long()]
            widths.append(ref_count.numel())
        flat = torch.cat(parts).tolist()
        changed, tokens, ref_counts, cur_counts, pos = [], [], [], [], 0
        for width in widths:
            changed.append(flat[pos])
            tokens.append(flat[pos + 1])
            ref_counts.append(flat[pos + 2 : pos + 2 + width])
            cur_counts.append(flat[pos + 2 + width : pos + 2 + 2 * width])
            pos += 2 + 2 * width
        return drift_statistics(changed, tokens, ref_counts, cur_counts, indices)

    # ------------------------------------------------------------------ emitting
    def _reduce(self, kind: str) -> list[LayerLoad]:
        self._dirty[kind] = False
        return self._counters[kind].reduce(self._device)

    def _metrics(self, loads: list[LayerLoad], kind: str) -> dict[str, float]:
        for load in loads:
            if load.tokens == 0:
                self._warn_once(
                    f"empty:{kind}",
                    "expert load: no unmasked token reached MoE layer %d (%s) in this %s interval (all padding or "
                    "ignored labels?); its moe/* metrics are omitted. Said once.",
                    load.index,
                    load.path,
                    kind,
                )
        return summarize_load(loads)

    def _flush_train(self, args: Any, state: Any) -> None:
        loads = self._reduce(TRAIN)
        metrics = self._metrics(loads, TRAIN)
        metrics.update(self._drift_metrics(state.global_step))
        self._add_to_totals(loads)
        if metrics:
            self.push_metrics(metrics, TRAIN)
        if state.is_world_process_zero:
            self._write_jsonl(args, state, "train", loads, metrics)
            self._write_tensorboard(args, state, "train", loads)

    def _finalize_eval(self) -> None:
        """Reduce the evaluation counters and queue their metrics (collective: runs on every process)."""
        self._eval_loads = self._reduce(EVAL)
        self._eval_metrics = self._metrics(self._eval_loads, EVAL)
        if self._eval_metrics:
            self.push_metrics(self._eval_metrics, EVAL)

    def _add_to_totals(self, loads: list[LayerLoad]) -> None:
        if self._train_totals is None:
            self._train_totals = [
                LayerLoad(x.index, x.path, x.num_experts, x.top_k, 0, [0] * x.num_experts, None) for x in loads
            ]
        for total, load in zip(self._train_totals, loads):
            total.tokens += load.tokens
            total.counts = [a + b for a, b in zip(total.counts, load.counts)]
            if load.dropped is not None:
                total.dropped = [a + b for a, b in zip(total.dropped or [0] * load.num_experts, load.dropped)]

    def _write_jsonl(self, args: Any, state: Any, split: str, loads: list[LayerLoad], metrics: dict) -> None:
        if not self.write_jsonl:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        record = {
            "split": split,
            "step": state.global_step,
            "epoch": state.epoch,
            "layers": [load.to_dict() for load in loads],
            "metrics": metrics,
        }
        with open(os.path.join(args.output_dir, JSONL_NAME), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _save_heatmap(self, args: Any, loads: list[LayerLoad] | None, name: str, title: str) -> None:
        """Render a heatmap PNG: on the background renderer while training (evaluations inside ``train``),
        else here. Written atomically, so nobody reads half a file."""
        if not self.write_heatmap or not loads or not any(load.tokens for load in loads):
            return
        os.makedirs(args.output_dir, exist_ok=True)
        loads = [replace(load, counts=list(load.counts), dropped=None) for load in loads]  # a snapshot
        path = os.path.join(args.output_dir, name)
        if self._heatmap_renderer is not None:
            self._heatmap_jobs.append(self._heatmap_renderer.submit(_render_heatmap, loads, path, title))
        else:
            _render_heatmap(loads, path, title)

    def _start_heatmap_renderer(self) -> None:
        """Start the background renderer and import matplotlib on it now, off the step path (the import is
        most of the first heatmap's cost)."""
        self.wait_for_heatmaps()
        self._heatmap_renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-heatmap")
        self._heatmap_jobs.append(self._heatmap_renderer.submit(_import_matplotlib))

    def wait_for_heatmaps(self) -> None:
        """Wait until every heatmap submitted so far is written (``on_train_end`` does); re-raises a render error."""
        jobs, self._heatmap_jobs = self._heatmap_jobs, []
        renderer, self._heatmap_renderer = self._heatmap_renderer, None
        try:
            for job in jobs:
                job.result()
        finally:
            if renderer is not None:
                renderer.shutdown(wait=True)

    def _tensorboard_on(self, args: Any) -> bool:
        if self.tensorboard is not None:
            return self.tensorboard
        return "tensorboard" in (getattr(args, "report_to", None) or [])

    def _write_tensorboard(self, args: Any, state: Any, split: str, loads: list[LayerLoad]) -> None:
        if not self._tensorboard_on(args):
            return
        writer = getattr(self._tensorboard_callback, "tb_writer", None)
        if writer is None:
            self._warn_once(
                "tensorboard",
                "ExpertLoadCallback: no TensorBoard writer of the Trainer to add the expert-load histograms to "
                "(no 'tensorboard' in report_to, or the callback was not bound to the trainer: use MoETrainer or "
                "hf_moe_tuning.enable_moe_logging(trainer)); histograms are skipped",
            )
            return
        prefix = "" if split == "train" else f"{split}/"
        for load in loads:
            total = sum(load.counts)
            if total == 0:
                continue
            used = [e for e, c in enumerate(load.counts) if c]
            writer.add_histogram_raw(
                f"{prefix}moe/layer{load.index}/expert_load",
                min=float(min(used)),
                max=float(max(used)),
                num=total,
                sum=float(sum(e * c for e, c in enumerate(load.counts))),
                sum_squares=float(sum(e * e * c for e, c in enumerate(load.counts))),
                bucket_limits=[e + 0.5 for e in range(load.num_experts)],
                bucket_counts=load.counts,
                global_step=state.global_step,
            )
        writer.flush()

    def _warn_once(self, key: str, msg: str, *args: Any, level: int = logging.WARNING) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.log(level, msg, *args)

    # ------------------------------------------------------------------ consumer side
    def pop_metrics(self, kind: str = TRAIN) -> dict[str, float]:
        """As the base class; evaluation counters are reduced here, right before the evaluation is logged."""
        if kind == EVAL and self._dirty[EVAL]:
            self._finalize_eval()
        return super().pop_metrics(kind)

    # ------------------------------------------------------------------ trainer events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.bind(model)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is not None:
            self.bind(model)
        if self.capture is None:
            raise ValueError("ExpertLoadCallback needs the model; the Trainer passed none to on_train_begin")
        self._counters[TRAIN].reset()
        self._dirty[TRAIN] = False
        self._train_totals = None
        self._start_step = state.global_step
        self._reference_saved_to = None
        warn_if_independent_runs(args.output_dir)  # N runs launched without a distributed accelerator
        if state.is_world_process_zero and self.write_jsonl:
            path = os.path.join(args.output_dir, JSONL_NAME)
            if state.global_step == 0:
                if os.path.exists(path):
                    os.remove(path)  # a fresh run
            elif dropped := truncate_jsonl(path, state.global_step):  # resumed: each step once
                logger.info("expert load: resumed at step %d, dropped %d later or unreadable line(s) of %s",
                            state.global_step, dropped, path)
        if self.write_heatmap and state.is_world_process_zero:
            self._start_heatmap_renderer()
        self._probe, self._reference = None, {}
        self._next_drift_step = (state.global_step // self.drift_every_steps + 1) * self.drift_every_steps
        if self.probe_size > 0 and train_dataloader is not None:
            self._probe = self._build_probe(train_dataloader)
            if self._probe is not None:
                saved = self._load_reference(args, state) if state.global_step > 0 else None
                self._reference = saved if saved is not None else self._probe_routing(self.model)
        record_moe_run(args, state, self, model)  # moe_run.json: the settings the card reports

    def moe_run_settings(self) -> dict[str, Any]:
        """The settings recorded in ``moe_run.json``."""
        return {
            "write_jsonl": self.write_jsonl,
            "write_heatmap": self.write_heatmap,
            "probe_size": self.probe_size,
            "drift_every_steps": self.drift_every_steps,
            "tensorboard": self.tensorboard,
        }

    # ------------------------------------------------------------------ drift reference in checkpoints
    def _reference_payload(self) -> dict[str, Any]:
        return {
            "probe_input_ids": self._probe.get("input_ids") if self._probe else None,
            "layers": {
                index: {"top1": top1.to("cpu", torch.int16 if _fits_int16(top1) else torch.int32), "mask": mask.cpu(),
                        "counts": counts.cpu()}
                for index, (top1, mask, counts) in self._reference.items()
            },
        }

    def _load_reference(self, args: Any, state: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
        """The train-start reference saved with the checkpoint this run resumed from, if it matches the probe."""
        folders = [
            self.resume_checkpoint,  # set by MoETrainer.train
            getattr(args, "resume_from_checkpoint", None),  # scripts that pass args.resume_from_checkpoint on
            os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"),  # resume_from_checkpoint=True
        ]
        path = next(
            (os.path.join(f, REFERENCE_NAME) for f in folders if isinstance(f, str) and os.path.isfile(os.path.join(f, REFERENCE_NAME))),
            None,
        )
        reference, why = self._read_reference(path) if path else (None, f"no {REFERENCE_NAME} in the checkpoint")
        if reference is None:
            self._warn_once(
                "resume-reference",
                "expert load: resumed at step %d without the drift reference of the run's start (%s); routing drift "
                "is measured against the resumed model from here on.",
                state.global_step,
                why,
            )
        return reference

    def _read_reference(self, path: str) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None, str]:
        """The reference saved in ``path``, or ``None`` and why it cannot be used."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            layers = payload["layers"]
            saved_ids = payload.get("probe_input_ids")
            reference = {
                int(index): (layer["top1"].to(self._device, torch.long), layer["mask"].to(self._device),
                             layer["counts"].to(self._device))
                for index, layer in layers.items()
            }
        except Exception as err:
            return None, f"{path} is unreadable, truncated or corrupt ({type(err).__name__}: {err})"
        probe_ids = self._probe.get("input_ids") if self._probe else None
        if probe_ids is None or saved_ids is None or not torch.equal(saved_ids, probe_ids.cpu()):
            return None, "the probe batch differs"
        if not reference:
            return None, f"{path} holds no MoE layer"
        unknown = sorted(set(reference) - set(self.routing))
        if unknown or any(reference[i][0].shape != reference[i][1].shape for i in reference):
            return None, f"{path} is for other MoE layers ({sorted(reference)}, this model routes {sorted(self.routing)})"
        return reference, ""

    def save_checkpoint_files(self, folder: str, state: Any) -> None:
        """Write the drift reference into the checkpoint ``folder`` (``MoETrainer`` calls it before ``trainer_state.json``)."""
        if not self._reference or not state.is_world_process_zero:
            return
        atomic_torch_save(self._reference_payload(), os.path.join(folder, REFERENCE_NAME))
        self._reference_saved_to = os.path.abspath(folder)

    def on_save(self, args, state, control, **kwargs):
        copy_moe_run_to_checkpoint(args, state)
        if not self._reference or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder) and self._reference_saved_to != os.path.abspath(folder):
            self.save_checkpoint_files(folder, state)  # a plain Trainer: after trainer_state.json

    def on_substep_end(self, args, state, control, **kwargs):
        self._consume(TRAIN)

    def on_step_end(self, args, state, control, **kwargs):
        self._consume(TRAIN)
        if control.should_log:
            self._flush_train(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_log and self._dirty[TRAIN]:
            self._flush_train(args, state)

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        if self.capture is None and model is not None:
            self.bind(model)
            self._warn_once("late", "expert load: attached during evaluation; the first evaluation batch is not counted.")
            return
        self._consume(EVAL)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if log_kind(logs or {}) == EVAL and self._dirty[EVAL]:
            self._finalize_eval()
        return super().on_log(args, state, control, logs=logs, **kwargs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._dirty[EVAL]:  # the evaluation was not logged through Trainer.log
            self._finalize_eval()
            self._pending[EVAL] = {}
        loads, self._eval_loads = self._eval_loads, None
        if loads is None or not state.is_world_process_zero:
            return
        prefix = _eval_prefix(metrics)
        self._write_jsonl(args, state, prefix, loads, self._eval_metrics)
        self._write_tensorboard(args, state, prefix, loads)
        self._save_heatmap(args, loads, f"expert_load_{prefix}_step{state.global_step}.png",
                           f"Expert load ({prefix}, step {state.global_step})")

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        # Trainer.predict does not log; its routing is not reported.
        if EVAL in self._counters:
            self._counters[EVAL].reset()
        self._dirty[EVAL] = False

    def on_train_end(self, args, state, control, **kwargs):
        self._consume(TRAIN)
        if self._dirty[TRAIN]:  # steps after the last log
            loads = self._reduce(TRAIN)
            self._add_to_totals(loads)
            if state.is_world_process_zero:
                self._write_jsonl(args, state, "train", loads, self._metrics(loads, TRAIN))
        if state.is_world_process_zero:
            totals, first = self._train_totals, self._start_step + 1
            if self.write_jsonl and self._start_step > 0:  # resumed: the whole run is in the file
                records, _ = read_jsonl_records(os.path.join(args.output_dir, JSONL_NAME))
                from_file, first_in_file = train_totals_from_records(records)
                if from_file is not None:
                    totals, first = from_file, 1 if first_in_file <= self._start_step else self._start_step + 1
            self._save_heatmap(args, totals, "expert_load_train.png",
                               f"Expert load (train, steps {first}-{state.global_step})")
        self.wait_for_heatmaps()  # the evaluations' and this one: all written when train() returns
