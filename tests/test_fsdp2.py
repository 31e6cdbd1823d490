"""FSDP2 for real on 2 CPU gloo processes: ``MoETrainer`` sharded by :func:`hf_moe_tuning.distributed.fully_shard_trainer`.

accelerate enables FSDP only for GPU-type processes (on gloo an FSDP config trains with DDP, and
``trainer.is_fsdp_enabled`` stays False), so the package shards with ``torch.distributed.fsdp.fully_shard``
itself: one unit per MoE block and per decoder layer, found by the anatomy. ``tests/scripts/fsdp2_train.py``
runs six short trainings of a tiny Mixtral in one ``torchrun --nproc_per_node 2`` launch (see its docstring);
this module checks that

* the parameters really are sharded: every parameter a ``Shard(0)`` DTensor managed by FSDP2 modules, each
  process holding about half of the scalars, no DDP wrapper (the DDP reference run has one);
* ``non_moe`` freezing leaves the experts and routers bitwise unchanged (and trains the rest);
* an expert subset inside the fused expert tensors (``moe_experts="0,2"``) trains those experts only: the
  other experts' rows are bitwise unchanged despite weight decay 0.1;
* router losses and expert-load metrics equal the DDP run's within 1e-5 (so do the losses and the weights);
* a sharded checkpoint (model and optimizer, ``torch.distributed.checkpoint``) taken at step 2 and loaded
  into a new sharded model resumes to the uninterrupted run's weights at step 4.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from hf_moe_tuning.anatomy import ParamGroup, describe_moe
from hf_moe_tuning.distributed import fsdp2_unit_paths, moe_block_class_names
from hf_moe_tuning.models import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "fsdp2_train.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", str(SCRIPT), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    weights = {name: torch.load(out / f"{name}.pt") for name in ["initial", *report]}
    return report, weights


@pytest.fixture(scope="module")
def anatomy():
    return describe_moe(build_tiny_model("mixtral", seed=0))


def test_wrap_units_come_from_the_anatomy(anatomy):
    model = build_tiny_model("mixtral", seed=0)
    units = fsdp2_unit_paths(model)
    assert units[-1] == ""  # the root last, inner units first
    assert [layer.path for layer in anatomy.layers] == [u for u in units if u.endswith(".mlp")]
    assert {f"model.layers.{i}" for i in range(len(anatomy.layers))} <= set(units)
    assert units.index("model.layers.0.mlp") < units.index("model.layers.0")


@pytest.mark.slow
def test_parameters_are_sharded_not_replicated(runs):
    report, weights = runs
    numel = sum(t.numel() for t in weights["initial"].values())
    for phase, run in report.items():
        assert run["world"] == 2
        seen = run["seen"]
        if phase.startswith("fsdp2"):
            assert seen["plain"] == [] and len(seen["dtensor"]) == len(weights["initial"]), phase
            assert seen["shard0"] and seen["numel"] == numel
            assert seen["local_numel"] <= numel // 2 + 1024, (phase, seen["local_numel"], numel)  # half each
            assert seen["fsdp_modules"] >= len(fsdp2_unit_paths(build_tiny_model("mixtral")))
            assert run["wrapper"] != "DistributedDataParallel" and not run["is_fsdp_enabled"]
            assert run["setup"]["backend"] == "fsdp2"
            assert set(moe_block_class_names(build_tiny_model("mixtral"))) <= set(run["setup"]["fsdp_wrap"])
        else:  # the reference: accelerate's DDP, full replicas
            assert seen["dtensor"] == [] and seen["local_numel"] == numel
            assert run["wrapper"] == "DistributedDataParallel"


@pytest.mark.slow
def test_non_moe_leaves_experts_and_routers_bitwise_unchanged(runs, anatomy):
    _, weights = runs
    initial, final = weights["initial"], weights["fsdp2_non_moe"]
    frozen = anatomy.params_in(ParamGroup.EXPERTS, ParamGroup.ROUTER)
    assert frozen and all(torch.equal(final[n], initial[n]) for n in frozen)
    trained = anatomy.params_in(ParamGroup.ATTENTION)
    assert all(not torch.equal(final[n], initial[n]) for n in trained)


@pytest.mark.slow
def test_expert_subset_in_fused_tensors_trains_only_those_experts(runs, anatomy):
    report, weights = runs
    initial, final = weights["initial"], weights["fsdp2_subset"]
    assert report["fsdp2_subset"]["setup"]["expert_masks"]
    for layer in anatomy.layers:
        assert layer.fused_experts
        for name in layer.fused_experts:
            for expert in range(layer.num_experts):
                same = torch.equal(final[name][expert], initial[name][expert])
                assert same == (expert not in (0, 2)), (name, expert)
        assert not torch.equal(final[layer.router_weight], initial[layer.router_weight])  # "moe" trains routers
    for name in anatomy.params_in(ParamGroup.ATTENTION, ParamGroup.EMBEDDINGS, ParamGroup.NORMS):
        assert torch.equal(final[name], initial[name]), name


@pytest.mark.slow
def test_router_losses_and_expert_load_equal_the_ddp_run(runs):
    report, weights = runs

    def rows(phase):
        return [r for r in report[phase]["log"] if "loss" in r]

    ddp, fsdp = rows("ddp_non_moe"), rows("fsdp2_non_moe")
    assert len(ddp) == len(fsdp) == 4
    for r1, r2 in zip(ddp, fsdp):
        keys = [k for k in r1 if k.startswith(("router/", "moe/")) or k in ("loss", "lm_loss")]
        assert {"router/aux_loss", "router/z_loss", "moe/layer0/load_cv", "moe/load_cv_mean"} <= set(keys)
        assert set(keys) <= set(r2)
        for key in keys:
            assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-7), key
    for name, value in weights["ddp_non_moe"].items():
        assert torch.allclose(weights["fsdp2_non_moe"][name], value, rtol=1e-5, atol=1e-6), name


@pytest.mark.slow
def test_sharded_checkpoint_resumes_to_the_uninterrupted_weights(runs):
    _, weights = runs
    uninterrupted, first, resumed = weights["fsdp2_all"], weights["fsdp2_first"], weights["fsdp2_resumed"]
    assert any(not torch.equal(first[n], uninterrupted[n]) for n in uninterrupted)  # steps 3-4 changed something
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
