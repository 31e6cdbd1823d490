"""NaN policy (issue 17 points 7-9, 13): non-finite gradient norms count, ``skip`` has limits, skipped steps never
pull the logged loss down, and the messages number steps as the logs do and name the layer and the cause.

* ``learning_rate=1e3`` (router aux + z losses on, as in the issue) is stopped under ``error`` at its first
  ``grad_norm=inf`` and by the skip limits under ``skip`` (both policies used to finish the run);
* ``skip`` stops after 3 consecutive skipped steps or more than 10 % of the steps so far (configurable);
* a skipped step logs no ``loss`` (was 0.0) and is left out of ``train_loss``;
* the router NaN message says "optimizer step 1" for the first step (was "step 0"), and with the router
  losses off the NaN guard still names the layer; a batch whose labels are all -100 is named as the cause.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from helpers import random_lm_dataset

from hf_moe_tuning import MoETrainer, MoETrainingArguments
from hf_moe_tuning.models import build_tiny_model


def _args(out, **kwargs) -> MoETrainingArguments:
    base = {
        "output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
        "logging_steps": 1, "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": 0, "disable_tqdm": True,
        "moe_drift_probe_size": 0, "moe_expert_load_heatmap": False,
    }
    return MoETrainingArguments(**{**base, **kwargs})


def _run(out, dataset: Dataset | None = None, **kwargs) -> MoETrainer:
    trainer = MoETrainer(model=build_tiny_model("mixtral", seed=0), args=_args(out, **kwargs),
                         train_dataset=dataset if dataset is not None else random_lm_dataset())
    trainer.train()
    return trainer


#: the issue's run: router aux + z losses, learning_rate=1e3 (loss 1e11 at step 2, then grad_norm=inf from step 3;
#: without the guard both policies finished the run)
EXPLODING = {"learning_rate": 1e3, "max_steps": 6, "moe_aux_loss_coef": 0.01, "moe_z_loss_coef": 1e-3}


def test_exploding_learning_rate_stops_under_error(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite gradient norm \(NaN/inf\) at optimizer step \d"):
        _run(tmp_path / "run", **EXPLODING)


def test_exploding_learning_rate_is_stopped_by_the_skip_limits(tmp_path):
    with pytest.raises(FloatingPointError, match=r"(\d of the \d optimizer steps so far|consecutive optimizer steps) .*skipped"):
        _run(tmp_path / "run", moe_nan_policy="skip", **EXPLODING)


def _poisoned_head(trainer_model: torch.nn.Module) -> None:
    with torch.no_grad():
        trainer_model.lm_head.weight[5, 0] = float("nan")


@pytest.mark.parametrize(
    "limits, message",
    [
        ({}, r"2 of the 2 optimizer steps so far were skipped.*moe_nan_max_skip_fraction=0.1"),
        ({"moe_nan_max_skip_fraction": 1.0}, r"3 consecutive optimizer steps skipped \(steps 1-3\)"),
    ],
)
def test_skip_stops_at_its_limits(tmp_path, limits, message):
    model = build_tiny_model("mixtral", seed=0)
    _poisoned_head(model)
    args = _args(tmp_path / "run", max_steps=6, moe_nan_policy="skip", **limits)
    trainer = MoETrainer(model=model, args=args, train_dataset=random_lm_dataset())
    with pytest.raises(FloatingPointError, match=message):
        trainer.train()


class _NaNAtForward:
    """Forward hook making the loss of the given training forwards NaN (a bad batch)."""

    def __init__(self, bad: set[int]) -> None:
        self.bad, self.count = bad, 0

    def __call__(self, module, args, output):
        if not module.training:
            return None
        self.count += 1
        if self.count in self.bad:
            output["loss"] = output["loss"] * float("nan")
        return output


def test_a_skipped_step_never_pulls_the_logged_loss_down(tmp_path):
    def run(out, logging_steps):  # the loss of step 2 is NaN: skipped
        model = build_tiny_model("mixtral", seed=0)
        model.register_forward_hook(_NaNAtForward({2}))
        args = _args(out, moe_nan_policy="skip", moe_nan_max_skip_fraction=1.0, logging_steps=logging_steps)
        trainer = MoETrainer(model=model, args=args, train_dataset=random_lm_dataset())
        output = trainer.train()
        return [row for row in trainer.state.log_history if "learning_rate" in row], output

    rows, output = run(tmp_path / "every", 1)
    assert [row["step"] for row in rows] == [1, 2, 3] and "loss" not in rows[1]  # was loss=0.0
    kept = [rows[0]["loss"], rows[2]["loss"]]
    assert min(kept) > 1.0
    assert output.metrics["train_loss"] == output.training_loss == pytest.approx(sum(kept) / 2)
    rows, output = run(tmp_path / "once", 3)
    assert [row["step"] for row in rows] == [3]
    assert rows[0]["loss"] == pytest.approx(sum(kept) / 2)  # the mean over the two steps that trained
    assert output.training_loss == pytest.approx(sum(kept) / 2)


def test_router_skips_log_no_zero_loss(tmp_path):
    model = build_tiny_model("mixtral", seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight[0, 0] = float("nan")
    args = _args(tmp_path / "run", max_steps=2, moe_aux_loss_coef=0.01, moe_nan_policy="skip",
                 moe_nan_max_skip_fraction=1.0)
    trainer = MoETrainer(model=model, args=args, train_dataset=random_lm_dataset())
    output = trainer.train()
    rows = [row for row in trainer.state.log_history if "router/skipped_steps" in row]
    assert [row["router/skipped_steps"] for row in rows] == [1.0, 2.0]
    assert all("loss" not in row for row in rows)  # was loss=0.0
    assert math.isnan(output.training_loss)


@pytest.mark.parametrize("router_loss", [True, False])
def test_router_nan_message_numbers_the_step_as_the_logs_and_names_the_layer(tmp_path, router_loss):
    model = build_tiny_model("mixtral", seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight[0, 0] = float("nan")
    args = _args(tmp_path / "run", moe_aux_loss_coef=0.01 if router_loss else 0.0)
    trainer = MoETrainer(model=model, args=args, train_dataset=random_lm_dataset())
    layer = r"MoE layer 1 \(model.layers.1.mlp\)"
    message = (rf"non-finite router logits in {layer} at optimizer step 1" if router_loss
               else rf"non-finite training loss .* at optimizer step 1; the router logits of {layer} are non-finite")
    with pytest.raises(FloatingPointError, match=message):
        trainer.train()


def test_all_labels_ignored(tmp_path):
    rows = random_lm_dataset(8).to_list()
    for row in rows:
        row["labels"] = [-100] * len(row["labels"])
    with pytest.raises(FloatingPointError, match="no labelled token \\(every label is -100\\)"):
        _run(tmp_path / "run", dataset=Dataset.from_list(rows))


def test_unbound_guard_reads_the_local_shard_of_dtensor_gradients(tmp_path):
    """Without a bound trainer the guard takes the norm of the gradients itself; FSDP2 gradients are DTensors,
    whose local shard it checks (the flag is reduced over the processes afterwards)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    from hf_moe_tuning.callbacks.nan_guard import NaNGuardCallback

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        layer = torch.nn.Linear(4, 4)
        layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
        layer.weight.grad = distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)])
        guard = NaNGuardCallback()
        flag = guard._grad_norm_flag(layer, torch.device("cpu"))
        assert type(flag) is torch.Tensor  # a plain tensor: it is stacked with the loss flags and reduced
        assert not flag.item()
        layer.weight.grad = distribute_tensor(torch.full((4, 4), float("nan")), mesh, [Shard(0)])
        assert guard._grad_norm_flag(layer, torch.device("cpu")).item()
    finally:
        dist.destroy_process_group()
