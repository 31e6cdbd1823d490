"""``FusedResumeCallback``: exact resume of fused-expert MoE models for a plain ``Trainer``.

A plain ``transformers.Trainer`` (or TRL ``SFTTrainer``) resuming a fused-expert model (Mixtral,
Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, ...) loads the checkpoint without converting it back from the
per-expert layout ``save_pretrained`` writes, and silently keeps the fresh model's router and expert
weights (see :mod:`hf_moe_tuning.checkpoint`). This callback reloads the checkpoint exactly at train
begin – after the Trainer's own (partial) load and before the first step – and, with
``load_best_model_at_end``, reloads the best checkpoint exactly at train end::

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[FusedResumeCallback()])
    trainer.train(resume_from_checkpoint=True)

The Trainer still logs its missing/unexpected-key warnings while it loads; the callback then logs what
it restored. ``hf_moe_tuning.MoETrainer`` needs no callback (``moe_fix_fused_resume``).

Callbacks are not told which checkpoint the Trainer resumes from; the callback uses
``checkpoint_dir`` when given, else ``{output_dir}/checkpoint-{global_step}`` – the checkpoint the
resumed state came from whenever the checkpoint lies in the run's ``output_dir`` (always the case for
``resume_from_checkpoint=True``). If the model needs the conversion and that directory does not exist,
the callback raises instead of training on with stale experts.
"""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checkpoint import has_checkpoint_layout_conversion, load_checkpoint_exact, needs_exact_load

logger = logging.getLogger(__name__)


class FusedResumeCallback(TrainerCallback):
    """Reload resumed (and best) checkpoints of fused-expert models exactly.

    Args:
        checkpoint_dir: the checkpoint passed to ``train(resume_from_checkpoint=...)`` when it is not in
            ``output_dir``; by default ``{output_dir}/checkpoint-{global_step}``.
        load_best: also reload ``state.best_model_checkpoint`` exactly at train end when
            ``load_best_model_at_end`` is set.
    """

    def __init__(self, checkpoint_dir: str | None = None, load_best: bool = True) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.load_best = load_best
        self.restored_from: str | None = None

    def resolve_checkpoint(self, args, state) -> str:
        """The checkpoint directory the resumed ``state`` came from."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 or model is None or not has_checkpoint_layout_conversion(model):
            return
        checkpoint = self.resolve_checkpoint(args, state)
        state_file = os.path.join(checkpoint, TRAINER_STATE_NAME)
        if not os.path.isfile(state_file):
            raise FileNotFoundError(
                f"FusedResumeCallback: resumed at step {state.global_step} but {checkpoint!r} holds no "
                f"{TRAINER_STATE_NAME}; pass FusedResumeCallback(checkpoint_dir=...) with the checkpoint given to "
                "train(resume_from_checkpoint=...), or the fused expert weights would stay those of the fresh model"
            )
        saved_step = TrainerState.load_from_json(state_file).global_step
        if saved_step != state.global_step:
            raise ValueError(
                f"FusedResumeCallback: {checkpoint!r} is from step {saved_step}, but training resumed at step "
                f"{state.global_step}; pass checkpoint_dir= the checkpoint actually resumed from"
            )
        if needs_exact_load(model, checkpoint):
            load_checkpoint_exact(model, checkpoint)
            self.restored_from = checkpoint
            logger.info("FusedResumeCallback: restored %s with fused expert weights converted", checkpoint)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        best = state.best_model_checkpoint
        if not (self.load_best and args.load_best_model_at_end and best and model is not None):
            return
        if needs_exact_load(model, best):
            load_checkpoint_exact(model, best)
            logger.info("FusedResumeCallback: reloaded the best checkpoint %s exactly", best)
