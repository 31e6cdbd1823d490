"""``MoEFreezingCallback``: ST-MoE freezing presets for any ``transformers.Trainer``.

Usage with a plain Trainer::

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[MoEFreezingCallback("non_moe")])

Freezing is applied in ``on_init_end``, i.e. at the end of ``Trainer.__init__`` and so before the
optimizer is built in ``train()``. The plan is part of the callback's exportable state (saved in every
checkpoint's ``trainer_state.json``); on resume the callback re-derives the plan from the same
arguments and checks it matches the checkpoint, so a resumed run trains exactly the same parameters.

========================== =============================================
key                        meaning
========================== =============================================
``freeze/trainable_params`` number of trainable scalars (fused expert slices counted per expert)
``freeze/trainable_frac``   trainable scalars / all scalars
========================== =============================================
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState, TrainerState

from ..adapters import is_peft_model
from ..anatomy import MoEAnatomy, anatomy_for
from ..freezing import ExpertSpec, FreezePlan, FreezeReport, apply_plan, plan_freezing
from ..hub.run_record import copy_moe_run_to_checkpoint, record_moe_run
from .base import MoEMetricsCallback, saved_callback_state

logger = logging.getLogger(__name__)

#: Resolves an ESFT spec such as ``"esft-gate:0.1"`` into ``{moe_layer: [experts]}`` given the model.
ExpertResolver = Callable[[Any, str], dict[int, list[int]]]


class MoEFreezingCallback(MoEMetricsCallback, ExportableState):
    """Apply an ST-MoE freezing strategy before the optimizer is built, log the trainable share.

    Args:
        strategy: ``all``, ``non_moe``, ``moe``, ``attention`` or ``ffn``.
        train_router: override whether routers train.
        experts: ``"all"``, expert indices for every MoE layer, ``{moe_layer: [indices]}`` or an ESFT spec
            (``"esft-gate:0.1"``) resolved by ``expert_resolver``.
        extra_trainable / extra_frozen: regexes on parameter names.
        expert_resolver: function ``(model, spec) -> {layer: [experts]}`` for ESFT specs.
        print_table: log the per-group table at train start (``logger.info``, main process only).
        anatomy: the trainer's anatomy of the model (computed when freezing if ``None``).
    """

    def __init__(
        self,
        strategy: str = "all",
        *,
        train_router: bool | None = None,
        experts: ExpertSpec = "all",
        extra_trainable: tuple[str, ...] | list[str] = (),
        extra_frozen: tuple[str, ...] | list[str] = (),
        expert_resolver: ExpertResolver | None = None,
        print_table: bool = True,
        anatomy: MoEAnatomy | None = None,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.train_router = train_router
        self.experts = experts
        # a single string is one regex, not one per character
        self.extra_trainable = [extra_trainable] if isinstance(extra_trainable, str) else list(extra_trainable)
        self.extra_frozen = [extra_frozen] if isinstance(extra_frozen, str) else list(extra_frozen)
        self.anatomy = anatomy
        self.expert_resolver = expert_resolver
        self.print_table = print_table
        self.report: FreezeReport | None = None

    @classmethod
    def from_args(
        cls, args: Any, expert_resolver: ExpertResolver | None = None, anatomy: MoEAnatomy | None = None
    ) -> MoEFreezingCallback:
        """Build from the MoE options of ``args`` (:class:`~hf_moe_tuning.configuration.MoEArguments`)."""
        return cls(
            args.moe_freeze_strategy,
            train_router=args.moe_train_router,
            experts=args.moe_experts,
            extra_trainable=args.moe_extra_trainable,
            extra_frozen=args.moe_extra_frozen,
            expert_resolver=expert_resolver,
            anatomy=anatomy,
        )

    # ------------------------------------------------------------------ applying
    @property
    def plan(self) -> FreezePlan | None:
        return self.report.plan if self.report is not None else None

    def freeze(self, model: Any) -> FreezeReport:
        """Validate and apply the freezing to ``model`` (idempotent for the same model).

        Raises:
            ValueError: ``model`` is a PEFT model. A freezing plan sets ``requires_grad`` on every base
                weight, which would undo the adapter's choice (even ``"all"`` would train every base
                weight next to the adapters); LoRA runs choose what trains in full with
                ``apply_lora(model, groups, strategy=...)``.
        """
        if is_peft_model(model):
            raise ValueError(
                f"MoEFreezingCallback(strategy={self.strategy!r}) on a PEFT model would overwrite which base weights "
                "train. Choose them when wrapping instead: hf_moe_tuning.apply_lora(model, groups, "
                f"strategy={self.strategy!r}), and leave the moe_freeze_strategy / moe_experts / moe_train_router / "
                "moe_extra_* arguments at their defaults."
            )
        experts = self.experts
        if isinstance(experts, str) and experts.startswith("esft-"):
            if self.expert_resolver is None:
                raise ValueError(
                    f"experts={experts!r} needs task data to score experts: use MoETrainer with a train_dataset, "
                    "or pass expert_resolver=... to MoEFreezingCallback"
                )
            experts = self.expert_resolver(model, experts)
            self.experts = experts
            logger.info("ESFT selected experts per MoE layer: %s", experts)
        if self.report is not None:  # merge back slices of an earlier call so they are planned as experts
            self.report.slice_freezer.uninstall()
        plan = plan_freezing(
            model,
            self.strategy,
            train_router=self.train_router,
            experts=experts,
            extra_trainable=self.extra_trainable,
            extra_frozen=self.extra_frozen,
            anatomy=anatomy_for(model, self.anatomy),
        )
        self.report = apply_plan(model, plan)
        return self.report

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("MoEFreezingCallback needs the Trainer's model")
        self.freeze(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.report is None:
            # callback added after Trainer.__init__ (trainer.add_callback): freeze now, but the optimizer
            # may already hold frozen parameters; say so instead of silently training them.
            self.freeze(model)
            if optimizer is not None:
                logger.warning(
                    "MoEFreezingCallback was added after the Trainer was built; pass it in callbacks=[...] so "
                    "freezing happens before the optimizer is created."
                )
        self._check_resumed_state(state)
        if optimizer is not None:
            self.report.slice_freezer.attach(optimizer)
        self._push(state)
        if self.print_table and state.is_world_process_zero:
            logger.info("%s", self.report.plan.format_table())  # logged, not printed on every run
        record_moe_run(args, state, self, model)  # moe_run.json: the plan the card reports

    def on_save(self, args, state, control, **kwargs):
        copy_moe_run_to_checkpoint(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log:
            self._push(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.report is not None:
            self.report.slice_freezer.remove()

    def _push(self, state) -> None:
        plan = self.report.plan
        self.push_metrics({"freeze/trainable_params": float(plan.trainable_params), "freeze/trainable_frac": plan.trainable_frac})

    # ------------------------------------------------------------------ resume
    def check_checkpoint(self, checkpoint_dir: str) -> None:
        """Raise if ``checkpoint_dir`` was trained with a different freezing plan than this callback's."""
        path = os.path.join(checkpoint_dir, TRAINER_STATE_NAME)
        if os.path.isfile(path):
            self._check_resumed_state(TrainerState.load_from_json(path))

    def _check_resumed_state(self, state) -> None:
        saved = saved_callback_state(state, self)
        if not saved or self.report is None:
            return
        attrs = saved.get("attributes", {})
        current = self.report.plan.to_dict()
        for key in ("strategy", "experts", "trainable_params"):
            if key in attrs and attrs[key] != current[key]:
                raise ValueError(
                    f"Resuming with a different freezing plan: checkpoint has {key}={attrs[key]!r}, "
                    f"this run has {current[key]!r}. Use the same moe_* arguments as the interrupted run."
                )

    def moe_run_settings(self) -> dict:
        """The settings and the applied plan, recorded in ``moe_run.json`` (read by the model card)."""
        saved = self.state()
        return {**saved["args"], "plan": saved["attributes"] or None}

    def state(self) -> dict:
        attributes = self.report.plan.to_dict() if self.report is not None else {}
        return {
            "args": {
                "strategy": self.strategy,
                "train_router": self.train_router,
                "experts": {str(k): v for k, v in self.experts.items()} if isinstance(self.experts, dict) else self.experts,
                "extra_trainable": self.extra_trainable,
                "extra_frozen": self.extra_frozen,
            },
            "attributes": attributes,
        }
