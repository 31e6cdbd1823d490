"""``MoECardMixin``: the MoE model card in ``Trainer.create_model_card``, checked inputs in ``push_to_hub``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .card import build_model_card, save_card
from .push import check_repo_id
from .summary import save_run_state, summary_from_trainer


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
            from ..adapters import validate_lora_targets  # noqa: PLC0415

            for config in model.peft_config.values():
                validate_lora_targets(model.get_base_model(), config)
        return super().push_to_hub(  # type: ignore[misc]
            commit_message=commit_message, blocking=blocking, token=token, revision=revision, private=private, **kwargs
        )
