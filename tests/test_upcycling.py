"""Sparse upcycling: dense T5 -> Switch with copied experts; function-preserving at initialization."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from hf_moe_tuning import describe_moe
from hf_moe_tuning.cli import main
from hf_moe_tuning.models import build_tiny_model
from hf_moe_tuning.routing.upcycling import UpcycleOptions, UpcyclingError, upcycle_t5

TOLERANCE = 1e-5  # float rounding of E * (1/E) in the rescaled experts


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(3, 300, (2, 20), generator=g), "decoder_input_ids": torch.randint(3, 300, (2, 9), generator=g)}


@pytest.mark.parametrize("num_experts, moe_every", [(8, 2), (6, 1)])
def test_upcycled_outputs_equal_dense_at_init(num_experts: int, moe_every: int) -> None:
    dense = build_tiny_model("t5").eval()
    switch = upcycle_t5(dense, UpcycleOptions(num_experts=num_experts, moe_every=moe_every)).eval()
    anatomy = describe_moe(switch)
    assert anatomy.is_moe and all(layer.num_experts == num_experts for layer in anatomy.layers)
    assert len(anatomy.layers) == 2 * (4 // moe_every)
    with torch.no_grad():
        a, b = dense(**_batch()).logits, switch(**_batch()).logits
    assert torch.allclose(a, b, atol=TOLERANCE, rtol=0), (a - b).abs().max()
    layer = anatomy.layers[0]
    wi = [n for n in layer.per_expert if n.endswith("wi.weight")]
    values = [switch.get_parameter(n) for n in wi]
    assert all(torch.equal(values[0], v) for v in values)  # experts are copies of the dense FFN


def test_plain_copies_and_saved_model_reload(tmp_path) -> None:
    dense = build_tiny_model("t5").eval()
    switch = upcycle_t5(dense, UpcycleOptions(rescale_experts=False, router_std=0.02, seed=1)).eval()
    dense_wo = dense.encoder.block[1].layer[1].DenseReluDense.wo.weight
    assert torch.equal(switch.encoder.block[1].layer[1].mlp.experts.expert_3.wo.weight, dense_wo)
    switch.save_pretrained(tmp_path)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(switch(**_batch()).logits, reloaded(**_batch()).logits)


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("mixtral", {}, r"model_type='mixtral' \(it is already a Mixture-of-Experts model\).*dense T5"),
        ("llama", {}, "model_type='llama'.*dense T5"),
        ("t5", {"feed_forward_proj": "gated-gelu"}, "gated FFN.*non-gated"),
    ],
)
def test_unsupported_sources(name, overrides, match) -> None:
    with pytest.raises(UpcyclingError, match=match):
        upcycle_t5(build_tiny_model(name, **overrides))


def test_bad_options() -> None:
    with pytest.raises(UpcyclingError, match="num_experts"):
        upcycle_t5(build_tiny_model("t5"), UpcycleOptions(num_experts=1))
    with pytest.raises(UpcyclingError, match="moe_every"):
        upcycle_t5(build_tiny_model("t5"), UpcycleOptions(moe_every=9))


def test_cli_upcycle(tmp_path, capsys) -> None:
    assert main(["upcycle", "t5", str(tmp_path / "up"), "--num-experts", "4"]) == 0
    out = capsys.readouterr().out
    assert "switch_transformers" in out and "4 experts" in out
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "up")
    assert model.config.model_type == "switch_transformers" and model.config.num_experts == 4
    assert main(["upcycle", "mixtral", str(tmp_path / "bad")]) == 2
    assert "dense T5" in capsys.readouterr().err
