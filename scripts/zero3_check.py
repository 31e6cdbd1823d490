#!/usr/bin/env python
"""DeepSpeed ZeRO-3 checks for MoE training against DDP on 2 processes (GPUs, or CPU with gloo); prints PASS/FAIL per check.

Runs the same checks as the FSDP2 test (``tests/test_fsdp2.py``) with ``MoETrainer`` under ZeRO-3 for real. The
same commands run on 2 GPUs and on a CPU-only machine, where DeepSpeed picks its CPU accelerator and gloo (on first
use it JIT-compiles its shared-memory collective op with the C++ compiler, then reuses it from
``~/.cache/torch_extensions``); ``tests/test_zero3.py`` runs them on 2 CPU processes when deepspeed is installed
(``pip install 'hf-moe-tuning[deepspeed]'``)::

    OUT=/tmp/zero3_check
    accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 scripts/zero3_check.py $OUT --mode ddp
    accelerate launch --config_file recipes/accelerate/deepspeed_zero3.yaml --num_processes 2 --mixed_precision no \\
        scripts/zero3_check.py $OUT --mode zero3
    python scripts/zero3_check.py $OUT --compare          # PASS/FAIL per check; exit status 1 on any FAIL

Each mode trains a tiny Mixtral (fp32, router aux + z loss, expert-load logging, weight decay 0.1, global batch 4 =
2 per process, sequences in order) from the same initial weights:

* ``non_moe``: 4 steps with ``moe_freeze_strategy="non_moe"``;
* ``all``: 4 steps, everything trains, a Trainer checkpoint at step 2 (ZeRO-3: DeepSpeed's partitioned checkpoint);
* ``resumed`` (ZeRO-3 only): a new trainer resumed from that checkpoint to step 4;
* ``subset`` (ZeRO-3 only): ``moe_experts="0,2"`` (expert subsets inside fused tensors), which must be refused
  with a clear error (supported with DDP and with the package's FSDP2 helper, not with ZeRO-3).

The models are built before any ``TrainingArguments``: under ZeRO-3 with ``zero3_init_flag`` a model built while
transformers' DeepSpeed config is alive is partitioned at construction (``deepspeed.zero.Init``: empty local
tensors), and the MoE anatomy, which reads parameter shapes, finds no MoE layers in it.

Checks (``--compare``): ZeRO-3 really partitioned the parameters (``ds_id``, local partitions smaller than the
tensors) and registered the MoE blocks as leaf modules; ``non_moe`` left experts and routers bitwise unchanged;
router losses and expert-load metrics equal the DDP run's within 1e-5; the resumed run's weights equal the
uninterrupted run's; the expert-subset request was refused naming ZeRO-3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

GLOBAL_BATCH, SEQ_LEN, STEPS = 4, 12, 4


def _full_weights(trainer: Any) -> dict[str, Any]:
    """Full fp32 weights of the trained model on CPU (ZeRO-3: gathered partition by partition, on every rank)."""

    model = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    module = getattr(model, "module", model)
    out = {}
    for name, param in module.named_parameters():
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                out[name] = param.detach().float().cpu().clone()
        else:
            out[name] = param.detach().float().cpu().clone()
    return out


def run(out: str, mode: str) -> None:
    """Train every phase of ``mode`` (``ddp`` or ``zero3``); rank 0 writes ``OUT/<mode>/`` and ``OUT/initial.pt``."""
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from torch.utils.data import SequentialSampler

    from hf_moe_tuning import MoETrainer, MoETrainingArguments
    from hf_moe_tuning.distributed import configure_distributed
    from hf_moe_tuning.models import build_tiny_model

    class InOrderTrainer(MoETrainer):
        """``MoETrainer`` taking the sequences in order (the same batches in every mode)."""

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Without GPUs: DDP trains the processes together only with use_cpu=True (else they are independent runs);
    # DeepSpeed needs use_cpu=False, and accelerate, finding no accelerator backend, takes each process for
    # process 0 of 1 (while DeepSpeed's gloo group has all of them) unless gloo is named as ddp_backend
    backend = {} if torch.cuda.is_available() else {"ddp_backend": "gloo", "use_cpu": mode == "ddp"}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 300, (SEQ_LEN,), generator=g).tolist()} for _ in range(GLOBAL_BATCH * STEPS)]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    folder = os.path.join(out, mode)
    os.makedirs(folder, exist_ok=True)
    phases = {"non_moe": {"moe_freeze_strategy": "non_moe"}, "all": {"save_strategy": "steps", "save_steps": 2}}
    if mode == "zero3":
        phases.update(resumed={}, subset={"moe_freeze_strategy": "moe", "moe_experts": "0,2"})
    # every model before any TrainingArguments: none built under deepspeed.zero.Init (see the module docstring)
    models = {phase: build_tiny_model("mixtral", seed=0) for phase in phases}
    initial = {n: p.detach().float().clone() for n, p in models["non_moe"].named_parameters()}  # before any training
    report = {}
    for phase, extra in phases.items():
        args = MoETrainingArguments(
            os.path.join(folder, "all" if phase == "resumed" else phase), per_device_train_batch_size=GLOBAL_BATCH // world,
            max_steps=STEPS, logging_steps=1, learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="constant",
            report_to=[], disable_tqdm=True, seed=0, moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001,
            moe_drift_probe_size=0, moe_expert_load_heatmap=False, moe_model_card=False,
            **{"save_strategy": "no", **backend, **extra},
        )
        trainer = InOrderTrainer(model=models.pop(phase), args=args, train_dataset=Dataset.from_list(rows))
        entry: dict = {}
        try:
            setup = configure_distributed(trainer)
            entry["setup"] = {"backend": setup.backend, "zero3_leaf": setup.zero3_leaf}
            trainer.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2") if phase == "resumed" else None)
        except ValueError as err:
            entry["refused"] = str(err)
            report[phase] = entry
            continue
        module = getattr(trainer.model_wrapped, "module", trainer.model_wrapped)
        partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
        entry.update(
            log=trainer.state.log_history,
            partitioned=len(partitioned), params=sum(1 for _ in module.parameters()),
            local_numel=sum(p.ds_tensor.numel() for p in partitioned), numel=sum(p.ds_numel for p in partitioned),
        )
        weights = _full_weights(trainer)
        if PartialState().is_main_process:
            torch.save(weights, os.path.join(folder, f"{phase}.pt"))
        report[phase] = entry
        PartialState().wait_for_everyone()
    if PartialState().is_main_process:
        torch.save(initial, os.path.join(out, "initial.pt"))
        with open(os.path.join(folder, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, default=str)


def compare(out: str) -> int:
    """Print PASS/FAIL per check from the two modes' reports and weights; 0 when all pass, else 1."""
    import torch

    from hf_moe_tuning.anatomy import ParamGroup, describe_moe
    from hf_moe_tuning.models import build_tiny_model

    ddp = json.load(open(os.path.join(out, "ddp", "report.json")))
    z3 = json.load(open(os.path.join(out, "zero3", "report.json")))
    initial = torch.load(os.path.join(out, "initial.pt"))

    def weights(mode: str, phase: str) -> dict[str, Any]:
        return torch.load(os.path.join(out, mode, f"{phase}.pt"))

    anatomy = describe_moe(build_tiny_model("mixtral", seed=0))
    checks = {}
    run = z3["non_moe"]
    checks["parameters partitioned by ZeRO-3"] = run["partitioned"] == run["params"] and run["local_numel"] < run["numel"]
    checks["MoE blocks registered as ZeRO-3 leaf modules"] = run["setup"] == {
        "backend": "deepspeed", "zero3_leaf": ["MixtralSparseMoeBlock"]}
    final = weights("zero3", "non_moe")
    frozen = anatomy.params_in(ParamGroup.EXPERTS, ParamGroup.ROUTER)
    checks["non_moe: experts and routers bitwise unchanged"] = all(torch.equal(final[n], initial[n]) for n in frozen) and any(
        not torch.equal(final[n], initial[n]) for n in anatomy.params_in(ParamGroup.ATTENTION))
    rows_ddp = [r for r in ddp["non_moe"]["log"] if "loss" in r]
    rows_z3 = [r for r in run["log"] if "loss" in r]
    keys = [k for k in rows_ddp[0] if k.startswith(("router/", "moe/"))] if rows_ddp else []
    checks["router losses and expert load equal DDP within 1e-5"] = bool(keys) and len(rows_ddp) == len(rows_z3) and all(
        abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])) for a, b in zip(rows_ddp, rows_z3) for k in keys)
    uninterrupted, resumed = weights("zero3", "all"), weights("zero3", "resumed")
    checks["checkpoint resumes to the uninterrupted weights"] = all(
        torch.allclose(resumed[n], v, rtol=0, atol=1e-6) for n, v in uninterrupted.items())
    checks["fused expert subsets refused with a clear error"] = "ZeRO-3" in z3["subset"].get("refused", "")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--mode", choices=["ddp", "zero3"])
    parser.add_argument("--compare", action="store_true")
    cli = parser.parse_args()
    if cli.compare:
        sys.exit(compare(cli.out))
    run(cli.out, cli.mode)
