"""ESFT expert selection: constructed routers, scoring on data, trainer wiring, bad input."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import ByT5Tokenizer, DataCollatorForSeq2Seq

from hf_moe_tuning import MoETrainer, MoETrainingArguments
from hf_moe_tuning.demo import reverse_task, tokenize_seq2seq
from hf_moe_tuning.models import build_tiny_model
from hf_moe_tuning.routing.esft import (
    ESFTError,
    ESFTResolver,
    parse_esft_spec,
    score_experts,
    select_experts,
    sequence_means,
    token_expert_values,
)


@pytest.fixture(scope="module")
def seq2seq_data():
    tok = ByT5Tokenizer()
    return tok, tokenize_seq2seq(reverse_task(48), tok)


def test_select_smallest_set_reaching_threshold() -> None:
    scores = {0: [0.05, 0.60, 0.30, 0.05], 1: [0.25, 0.25, 0.25, 0.25], 2: [0.0, 0.0, 0.1, 0.9]}
    assert select_experts(scores, 0.5) == {0: [1], 1: [0, 1], 2: [3]}
    assert select_experts(scores, 0.8) == {0: [1, 2], 1: [0, 1, 2, 3], 2: [3]}
    assert select_experts(scores, 0.91) == {0: [0, 1, 2], 1: [0, 1, 2, 3], 2: [2, 3]}
    assert select_experts(scores, 1.0)[2] == [2, 3]  # zero-score experts are never needed
    # unnormalised scores are normalised per layer
    assert select_experts({0: torch.tensor([2.0, 6.0, 2.0])}, 0.6) == {0: [1]}


def test_constructed_router_gate_and_token_scores() -> None:
    """Two sequences of a 4-expert top-2 router; expert 2 dominates the gates, expert 0 the token counts."""
    big, small = 4.0, 0.0
    # every token picks experts {0, 2}; expert 2 gets most probability
    logits = torch.tensor([[2.0, small, big, -5.0]] * 6)
    mask = torch.tensor([True, True, False, True, True, True])  # one padded token
    selected = torch.topk(logits, 2, dim=-1).indices
    gate = token_expert_values(logits, selected, "gate")
    token = token_expert_values(logits, selected, "token")
    g_sum, n = sequence_means(gate, mask, num_sequences=2)
    t_sum, _ = sequence_means(token, mask, num_sequences=2)
    assert n == 2
    assert torch.allclose(t_sum / n, torch.tensor([0.5, 0.0, 0.5, 0.0]))
    p = torch.softmax(logits[0], -1)
    assert torch.allclose(g_sum / n, torch.tensor([p[0], 0.0, p[2], 0.0]))
    assert select_experts({0: g_sum}, 0.1) == {0: [2]}
    assert select_experts({0: t_sum}, 0.6) == {0: [0, 2]}


def test_spec_parsing_defaults_and_bad_thresholds() -> None:
    assert parse_esft_spec("esft-gate").top_p == 0.1
    assert parse_esft_spec("esft-token").top_p == 0.2
    assert parse_esft_spec("esft-token:0.35").top_p == 0.35
    for bad in ("esft-gate:0", "esft-gate:1.5", "esft-gate:-0.1", "esft-gate:abc"):
        with pytest.raises(ESFTError, match=r"\(0, 1\]"):
            parse_esft_spec(bad)
    with pytest.raises(ESFTError, match="unknown ESFT method"):
        parse_esft_spec("esft-random:0.1")
    with pytest.raises(ESFTError, match=r"\(0, 1\]"):
        select_experts({0: [1.0, 2.0]}, 0.0)


def test_bad_scoring_data() -> None:
    model = build_tiny_model("mixtral")
    with pytest.raises(ESFTError, match="empty"):
        score_experts(model, Dataset.from_list([]), None)
    with pytest.raises(ESFTError, match="needs task data"):
        ESFTResolver(None)
    with pytest.raises(ESFTError, match=r"columns \['prompt'\].*'input_ids' column or a 'text' text column"):
        score_experts(model, Dataset.from_list([{"prompt": "hi"}]), None)
    with pytest.raises(ESFTError, match="tokenizer"):
        score_experts(model, Dataset.from_list([{"text": "hi"}]), None)


def test_score_experts_on_text_rows_with_collator_tokenizer() -> None:
    from transformers import DataCollatorForLanguageModeling

    tok = ByT5Tokenizer()
    model = build_tiny_model("qwen2_moe")
    rows = Dataset.from_list([{"text": f"sample number {i}"} for i in range(12)])
    scores = score_experts(model, rows, DataCollatorForLanguageModeling(tok, mlm=False), "token", num_samples=8)
    assert scores.num_sequences == 8 and set(scores.scores) == {0, 1}
    for values in scores.scores.values():
        assert values.shape == (4,) and abs(float(values.sum()) - 1) < 1e-9


def test_moe_trainer_esft_trains_only_selected_experts(tmp_path, seq2seq_data) -> None:
    tok, ds = seq2seq_data
    model = build_tiny_model("switch")
    args = MoETrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        moe_freeze_strategy="moe",
        moe_train_router=False,
        moe_experts="esft-gate:0.3",
        moe_esft_num_samples=32,
    )
    collator = DataCollatorForSeq2Seq(tok, model=model)
    trainer = MoETrainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    cb = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "MoEFreezingCallback")
    resolver = cb.expert_resolver
    expected = select_experts(score_experts(build_tiny_model("switch"), ds, collator, "gate", 32, seed=args.seed), 0.3)
    assert resolver.selection == expected
    assert cb.plan.to_dict()["experts"] == {str(k): v for k, v in expected.items()}
    assert resolver.summary()["selected"] == {str(k): v for k, v in expected.items()}
    anatomy_layers = cb.plan.anatomy.layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    allowed = {n for layer in anatomy_layers for n, j in layer.per_expert.items() if j in expected[layer.index]}
    assert trainable == allowed
    trainer.train()


def test_moe_trainer_rejects_bad_threshold(tmp_path, seq2seq_data) -> None:
    tok, ds = seq2seq_data
    args = MoETrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, moe_freeze_strategy="moe", moe_experts="esft-token:2")
    with pytest.raises(ESFTError, match=r"\(0, 1\]"):
        MoETrainer(model=build_tiny_model("switch"), args=args, train_dataset=ds)
