"""``MoECardMixin``: the MoE model card in ``Trainer.create_model_card``. ``AllowListPushMixin`` (a base of it):
``push_to_hub`` and the ``hub_strategy`` pushes on save upload the allow-list of :mod:`.push`, like
``hf-moe-tuning push``.

transformers' own ``Trainer.push_to_hub`` / ``_push_from_checkpoint`` (5.x) upload the whole ``output_dir``
(and, for ``hub_strategy="checkpoint"`` / ``"all_checkpoints"``, the whole checkpoint folder) with only
``_*`` and ``checkpoint-*`` ignored: ``training_args.bin`` (a pickle holding the raw ``hub_token``), hidden
files (``.env``, ``.git-credentials``), symlinks with the contents of files outside the folder, and the
optimizer / scheduler / RNG state all go. The overrides below keep transformers' sequence (``on_push_begin``,
``init_hf_repo``, ``save_model``, model tags, card, ``_finish_current_push``, ``PushInProgress``) and replace
only the upload by :func:`~.push.upload_allowed`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import HubStrategy, SaveStrategy
from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..adapters import is_peft_model
from .card import build_model_card, save_card
from .push import check_repo_id, upload_allowed
from .run_record import copy_moe_run_to_checkpoint
from .summary import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, save_run_state, summary_from_trainer

logger = logging.getLogger(__name__)


def _hub_api() -> Any:
    """transformers' shared ``HfApi`` (tagged with its library name), as ``Trainer`` uses it."""
    from transformers.utils import hf_api

    return hf_api()


def _copy_into(source: str, target: str) -> None:
    """Copy ``source`` to ``target``; a ``target`` symlink is replaced, never written through."""
    if os.path.islink(target):
        os.unlink(target)
    shutil.copyfile(source, target)


class AllowListPushMixin:
    """``Trainer`` mixin: ``push_to_hub`` and the ``hub_strategy`` pushes on save upload the allow-list only.

    Use before ``Trainer`` (or TRL's ``SFTTrainer``) in the bases. ``push_to_hub`` (and, with ``push_to_hub=True``,
    every push on save) uploads the files of ``output_dir`` (or of the checkpoint) that ``hf-moe-tuning push``
    would: weights, configs, tokenizer, the card, the heatmaps, ``expert_load.jsonl``, ``moe_run.json``,
    ``run_info.json``, ``trainer_state.json``; never ``training_args.bin``, optimizer / scheduler / RNG state,
    hidden files, sub-folders or symlinks out of the folder (:func:`~.push.upload_plan`). The repo id and (PEFT
    models) the adapter targets are checked before any Hub call.
    """

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token: str | None = None,
                    revision: str | None = None, private: bool | None = None, **kwargs: Any):
        """``Trainer.push_to_hub`` after checking the repo id and (PEFT models) the adapter targets, uploading the
        allow-list of :func:`~.push.upload_plan` only. Returns the ``CommitInfo`` (a ``Future`` with
        ``blocking=False``), ``None`` on other processes."""
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        check_repo_id(repo_id)
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            from ..adapters import validate_lora_targets

            for config in model.peft_config.values():
                validate_lora_targets(model.get_base_model(), config)
        # transformers 5.x Trainer.push_to_hub, with the upload restricted to the allow-list
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        model_name = kwargs.pop("model_name", None)
        if model_name is None and self.args.should_save:
            model_name = Path(self.args.output_dir).name if self.args.hub_model_id is None else self.args.hub_model_id.split("/")[-1]
        token = token if token is not None else self.args.hub_token
        if getattr(self, "hub_model_id", None) is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        model_tags = getattr(self.model, "model_tags", None)
        if model_tags is not None:
            tags = kwargs.get("tags") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            kwargs["tags"] = tags + [tag for tag in model_tags if tag not in tags]
        self.create_model_card(model_name=model_name, **kwargs)
        self._finish_current_push()
        return upload_allowed(
            _hub_api(),
            self.hub_model_id,
            self.args.output_dir,
            commit_message=commit_message,
            token=token,
            revision=revision if revision is not None else self.args.hub_revision,
            run_as_future=not blocking,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """``Trainer._push_from_checkpoint`` (``push_to_hub=True``, on every save), uploading the allow-list only.

        As in transformers, the model files of the checkpoint are copied into ``output_dir`` and ``output_dir`` is
        pushed; ``hub_strategy="checkpoint"`` / ``"all_checkpoints"`` also push the checkpoint folder (to
        ``last-checkpoint`` / ``checkpoint-N``), here without its optimizer, scheduler and RNG state, so a
        checkpoint downloaded from the Hub holds the weights and ``trainer_state.json`` but cannot resume exactly.
        ``training_args.bin`` is not re-saved into ``output_dir`` (transformers does it only to upload it).
        """
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        from transformers.utils.hub import PushInProgress

        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.args.output_dir
        modeling_files = [CONFIG_NAME, GENERATION_CONFIG_NAME, SAFE_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
        index_path = os.path.join(checkpoint_folder, SAFE_WEIGHTS_INDEX_NAME)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                shards = set(json.load(f).get("weight_map", {}).values())
            modeling_files += [SAFE_WEIGHTS_INDEX_NAME, *sorted(shards)]
        for name in modeling_files:
            source = os.path.join(checkpoint_folder, name)
            if os.path.isfile(source) and os.path.basename(name) == name:
                _copy_into(source, os.path.join(output_dir, name))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

        if self.args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch)}"
        api = _hub_api()
        common = {"token": self.args.hub_token, "revision": self.args.hub_revision, "run_as_future": True}
        jobs = [upload_allowed(api, self.hub_model_id, output_dir, commit_message=commit_message, **common)]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            if not getattr(self, "_moe_warned_checkpoint_push", False):
                self._moe_warned_checkpoint_push = True
                logger.warning(
                    "hub_strategy=%r: checkpoints are pushed without optimizer, scheduler and RNG state (never "
                    "uploaded, like training_args.bin); resume exactly from the local checkpoint folders.",
                    str(getattr(self.args.hub_strategy, "value", self.args.hub_strategy)),
                )
            copy_moe_run_to_checkpoint(self.args, self.state)  # on_save, which copies it too, runs after this push
            path_in_repo = "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else Path(checkpoint_folder).name
            jobs.append(upload_allowed(api, self.hub_model_id, checkpoint_folder, path_in_repo=path_in_repo,
                                       commit_message=commit_message + ", checkpoint", **common))
        jobs = [job for job in jobs if job is not None]
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)


class MoECardMixin(AllowListPushMixin):
    """``Trainer`` mixin: the MoE model card in ``create_model_card``; pushes as :class:`AllowListPushMixin`.

    Use before ``Trainer`` in the bases: ``class MoETrainer(MoECardMixin, Trainer)``. With
    ``MoETrainingArguments.moe_model_card=False`` the stock transformers card is written instead.
    """

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
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
