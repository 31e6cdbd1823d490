"""The two training backends of the one study pipeline; the model decides which one runs.

=============  ===========================================  ==============================================
backend        models                                       trainer, data format, evaluation
=============  ===========================================  ==============================================
``seq2seq``    encoder-decoder (T5, Switch, NLLB-MoE ...)   :class:`~hf_moe_tuning.MoETrainer`; span corruption
                                                            pretraining, ``inputs → targets`` pairs;
                                                            :mod:`.evaluation` (rank classification / greedy)
``causal``     decoder-only (Llama, Mixtral, Qwen-MoE ...)  :class:`~hf_moe_tuning.sft.MoESFTTrainer` (TRL);
                                                            causal-LM pretraining, chat-format
                                                            prompt/completion; the same scoring in chat format
=============  ===========================================  ==============================================

Both trainers build their MoE callbacks with the same function
(:func:`hf_moe_tuning.trainer.build_moe_callbacks`), so a recipe's ``moe_*`` options mean the same on
either backend. Every stage of :mod:`.stages` goes through :class:`Backend`'s methods only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoConfig, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from ..anatomy import ParamGroup, describe_moe
from ..data import pretraining_corpus, span_corruption_dataset
from ..data.corpus import BYT5_FIRST_SENTINEL
from ..models import build_tiny_model, tiny_config
from .cache import is_main_process, num_processes
from .config import ModelSpec, StudyConfig, resolve_batch
from .evaluation import TaskEvaluation, evaluate_task

logger = logging.getLogger(__name__)

SEQ2SEQ, CAUSAL = "seq2seq", "causal"

#: Training-argument defaults of every stage (a recipe's ``args`` override them).
STAGE_DEFAULTS: dict[str, Any] = {
    "save_strategy": "no",
    "logging_strategy": "steps",
    "logging_steps": 50,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "dataloader_num_workers": 0,
    "moe_expert_load_jsonl": False,
    "moe_expert_load_heatmap": False,
    "moe_model_card": False,
    "dataloader_pin_memory": torch.cuda.is_available(),
}


@dataclass
class TrainOutcome:
    """What a training stage reports: final metrics, wall seconds, optimizer steps and source tokens seen."""

    metrics: dict[str, float]
    seconds: float
    optimizer_steps: int = 0
    train_tokens: int = 0
    #: the trained model as the trainer holds it (with LoRA: the PEFT model carrying the adapters)
    model: Any = None
    #: the trainer (saving a model sharded by FSDP / ZeRO-3 goes through it, on every rank)
    trainer: Any = None


def _sharded_by(trainer: Any) -> bool:
    return bool(trainer is not None and (getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)))


#: Hub id prefixes of encoder-decoder families, to decide the backend offline when a config cannot be read.
ENCODER_DECODER_HUB_PREFIXES: tuple[str, ...] = (
    "google/t5", "google/flan-t5", "google/switch-", "google/mt5", "google/umt5", "google/byt5", "t5-",
    "facebook/nllb-moe", "facebook/bart", "facebook/m2m100",
)


def backend_name(spec: ModelSpec, local_files_only: bool = False) -> str:
    """``seq2seq`` for an encoder-decoder model, ``causal`` otherwise.

    Read from the model's config (no weights); a Hub id whose config cannot be read (offline and not cached, or
    ``local_files_only=True`` and not cached) is decided by :data:`ENCODER_DECODER_HUB_PREFIXES`.
    ``local_files_only=True`` (recipe validation) never touches the network, so an offline machine does not wait
    through the Hub client's retries.
    """
    if spec.is_tiny:
        return SEQ2SEQ if tiny_config(spec.init[5:]).is_encoder_decoder else CAUSAL
    try:
        config = AutoConfig.from_pretrained(spec.init, local_files_only=local_files_only)
    except OSError:
        return SEQ2SEQ if spec.init.lower().startswith(ENCODER_DECODER_HUB_PREFIXES) else CAUSAL
    return SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else CAUSAL


def model_kind(model) -> str:
    """``"sparse"`` when the model has MoE layers, else ``"dense"``."""
    return "sparse" if describe_moe(model).is_moe else "dense"


def parameter_summary(model) -> dict[str, Any]:
    """Total parameters, parameters active per token, and the shares of the experts and of the dense FFNs."""
    anatomy = describe_moe(model)
    counts = anatomy.group_counts()
    total = anatomy.total_params
    experts = counts.get(ParamGroup.EXPERTS, 0)
    active_share = (
        sum(layer.top_k / layer.num_experts for layer in anatomy.layers) / len(anatomy.layers) if anatomy.is_moe else 1.0
    )
    return {
        "total": int(total),
        "active": int(total - experts + experts * active_share),
        "experts_share": experts / total,
        "dense_ffn_share": counts.get(ParamGroup.DENSE_FFN, 0) / total,
        "attention_share": counts.get(ParamGroup.ATTENTION, 0) / total,
        "kind": "sparse" if anatomy.is_moe else "dense",
    }


class _LogLastStep(TrainerCallback):
    """Log at the last optimizer step, so that ``train_loss`` is the mean over processes.

    transformers adds the loss accumulated since the last log to ``train_loss`` from this process alone
    (``Trainer._finalize_training``; the logged intervals are averaged over processes); logging at the last
    step leaves nothing to add. With one process the value is the same either way.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_training_stop or state.global_step >= state.max_steps:
            control.should_log = True
        return control


def _log_quietly(trainer) -> None:
    if not logger.isEnabledFor(logging.INFO):  # the driver shows progress bars; keep per-step log dicts off the console
        trainer.remove_callback(PrinterCallback)


def _stage_args(args: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Training arguments of a stage: defaults, then the recipe's, with its global batch split over the processes."""
    processes = num_processes()
    # several processes without a GPU: accelerate trains them together on gloo only with use_cpu=True
    device = {"use_cpu": True} if processes > 1 and not torch.cuda.is_available() else {}
    merged = {**STAGE_DEFAULTS, **device, "disable_tqdm": not progress, "include_num_input_tokens_seen": "non_padding", **args}
    return resolve_batch(merged, processes)


class Backend:
    """Interface of a backend (see the module docstring); one instance per (study, model)."""

    name: str

    def __init__(self, config: StudyConfig, spec: ModelSpec):
        self.config, self.spec = config, spec

    @property
    def max_source_length(self) -> int:
        return int(self.config.data.get("max_source_length", 192))

    def evaluate_settings(self) -> dict[str, int]:
        ev = self.config.evaluate
        return {"batch_size": int(ev.get("batch_size", 64)), "max_new_tokens": int(ev.get("max_new_tokens", 48))}


class Seq2SeqBackend(Backend):
    """Encoder-decoder models through :class:`~hf_moe_tuning.MoETrainer`."""

    name = SEQ2SEQ

    def tokenizer(self):
        from transformers import AutoTokenizer, ByT5Tokenizer

        if self.config.tokenizer == "byt5":
            return ByT5Tokenizer()
        return AutoTokenizer.from_pretrained(self.spec.init if self.config.tokenizer == "auto" else self.config.tokenizer)

    def initial_model(self, tokenizer, seed: int):
        if self.spec.is_tiny:
            return build_tiny_model(self.spec.init[5:], seed=seed, **self.spec.overrides)
        from ..models import load_model

        return load_model(self.spec.init)

    def load(self, path: str, tokenizer):
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM.from_pretrained(path)

    def save(self, model, path: Path, trainer: Any = None) -> None:
        """Save ``model`` to ``path``: by rank 0; a model sharded by FSDP / ZeRO-3 through ``trainer`` on every rank."""
        if _sharded_by(trainer):
            trainer.save_model(str(path))  # gathers the shards (a collective); rank 0 writes
        elif is_main_process():  # rank 0 owns the cache
            model.save_pretrained(path)

    def pretraining_data(self, tokenizer) -> Dataset:
        data, extra = self.config.data, self.config.pretrain.extra
        corpus = pretraining_corpus(data.get("corpus_size", 20_000), seed=data.get("seed", 0))
        return span_corruption_dataset(
            corpus,
            lambda text: tokenizer(text, add_special_tokens=False, max_length=self.max_source_length - 1, truncation=True)["input_ids"],
            seed=data.get("seed", 0),
            noise_density=float(extra.get("noise_density", 0.15)),
            mean_span=float(extra.get("mean_span", 3.0)),
            first_sentinel=BYT5_FIRST_SENTINEL,
            eos_id=tokenizer.eos_token_id,
        )

    def pairs(self, dataset: Dataset, tokenizer) -> Dataset:
        """Training data from ``inputs``/``targets`` text columns: ``input_ids``/``attention_mask``/``labels``."""
        max_target = int(self.config.data.get("max_target_length", 48))

        def encode(batch: dict) -> dict:
            enc = tokenizer(batch["inputs"], max_length=self.max_source_length, truncation=True)
            enc["labels"] = tokenizer(text_target=batch["targets"], max_length=max_target, truncation=True)["input_ids"]
            return enc

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names)

    def train(
        self, model, tokenizer, dataset: Dataset, args: dict[str, Any], output_dir: str | Path, seed: int,
        callbacks: list[TrainerCallback] | None = None, progress: bool = False, eval_dataset: Dataset | None = None,
    ) -> TrainOutcome:
        from transformers import DataCollatorForSeq2Seq

        from .. import MoETrainer, MoETrainingArguments

        training_args = MoETrainingArguments(
            output_dir=str(output_dir), seed=seed, data_seed=seed, report_to="none", **_stage_args(args, progress)
        )
        trainer = MoETrainer(  # trains per-batch-mean losses (T5, Switch) as a global token mean: loss_scaling
            model=model, args=training_args, train_dataset=dataset, eval_dataset=eval_dataset,
            data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100), callbacks=callbacks,
        )
        return _run(trainer, eval_dataset)

    def evaluate(self, model, tokenizer, dataset: Dataset, kind: str, metrics) -> TaskEvaluation:
        return evaluate_task(model, tokenizer, dataset, kind, metrics, max_source_length=self.max_source_length, **self.evaluate_settings())


class CausalBackend(Backend):
    """Decoder-only models through :class:`~hf_moe_tuning.sft.MoESFTTrainer` (TRL), in chat format."""

    name = CAUSAL

    @property
    def sft(self) -> dict[str, Any]:
        return self.config.sft

    def sft_options(self) -> dict[str, Any]:
        from .chat import OWN_SFT_KEYS

        return {k: v for k, v in self.sft.items() if k not in OWN_SFT_KEYS}

    def tokenizer(self):
        from transformers import AutoTokenizer, ByT5Tokenizer

        from .chat import ensure_chat_template

        if self.config.tokenizer == "byt5":
            tokenizer = ByT5Tokenizer()
        else:
            tokenizer = AutoTokenizer.from_pretrained(self.spec.init if self.config.tokenizer == "auto" else self.config.tokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return ensure_chat_template(tokenizer, self.sft.get("chat_template", "auto"))

    def initial_model(self, tokenizer, seed: int):
        from .chat import align_special_tokens

        if self.spec.is_tiny:
            return align_special_tokens(build_tiny_model(self.spec.init[5:], seed=seed, **self.spec.overrides), tokenizer)
        return self.load(self.spec.init, tokenizer)

    def load(self, path: str, tokenizer):
        from transformers import AutoModelForCausalLM

        from .chat import align_special_tokens

        bf16 = bool({**self.config.finetune.args, **self.spec.args}.get("bf16", False))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
        return align_special_tokens(model, tokenizer)

    def save(self, model, path: Path, trainer: Any = None) -> None:
        """Save ``model`` (LoRA merged) to ``path``: by rank 0; a model sharded by FSDP / ZeRO-3 through ``trainer``."""
        if _sharded_by(trainer) and not hasattr(model, "merge_and_unload"):
            trainer.save_model(str(path))  # gathers the shards (a collective); rank 0 writes
            return
        if not is_main_process():  # rank 0 owns the cache
            return
        if hasattr(model, "merge_and_unload"):  # LoRA: later stages start from the merged weights
            model = model.merge_and_unload()
        model.save_pretrained(path)

    def pretraining_data(self, tokenizer) -> Dataset:
        from .chat import text_dataset

        data = self.config.data
        return text_dataset(pretraining_corpus(data.get("corpus_size", 20_000), seed=data.get("seed", 0)))

    def pairs(self, dataset: Dataset, tokenizer) -> Dataset:
        """Training data from ``inputs``/``targets`` text columns: TRL's conversational prompt/completion."""
        from .chat import to_prompt_completion

        return to_prompt_completion(dataset, self.sft.get("system"))

    def train(
        self, model, tokenizer, dataset: Dataset, args: dict[str, Any], output_dir: str | Path, seed: int,
        callbacks: list[TrainerCallback] | None = None, progress: bool = False, eval_dataset: Dataset | None = None,
    ) -> TrainOutcome:
        from ..sft import MoESFTTrainer
        from .chat import lora_config, sft_config

        lora = self.sft.get("lora")
        peft_config = lora_config(lora, sparse=model_kind(model) == "sparse") if lora else None
        trainer = MoESFTTrainer(
            model=model,
            args=sft_config(_stage_args(args, progress), str(output_dir), seed, self.sft_options()),
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        return _run(trainer, eval_dataset)

    def evaluate(self, model, tokenizer, dataset: Dataset, kind: str, metrics) -> TaskEvaluation:
        from .evaluation import evaluate_chat_task

        return evaluate_chat_task(
            model, tokenizer, dataset, kind, metrics, max_prompt_length=self.max_source_length,
            system=self.sft.get("system"), **self.evaluate_settings(),
        )


def _run(trainer, eval_dataset) -> TrainOutcome:
    _log_quietly(trainer)
    trainer.add_callback(_LogLastStep())  # after the stage's own callbacks (early stopping decides first)
    start = time.perf_counter()
    result = trainer.train()
    metrics = dict(result.metrics)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    return TrainOutcome(
        metrics, time.perf_counter() - start, trainer.state.global_step, int(trainer.state.num_input_tokens_seen), trainer.model,
        trainer,
    )


def backend_for(config: StudyConfig, spec: ModelSpec) -> Backend:
    """The backend the model of ``spec`` trains with."""
    return (Seq2SeqBackend if backend_name(spec) == SEQ2SEQ else CausalBackend)(config, spec)


__all__ = [
    "CAUSAL",
    "SEQ2SEQ",
    "STAGE_DEFAULTS",
    "Backend",
    "CausalBackend",
    "Seq2SeqBackend",
    "TrainOutcome",
    "backend_for",
    "backend_name",
    "model_kind",
    "parameter_summary",
]
