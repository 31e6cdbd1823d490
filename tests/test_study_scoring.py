"""Scoring that measures the model: no length bias, baselines, per-item scores, bootstrap CIs and verdicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ByT5Tokenizer
from transformers.modeling_outputs import Seq2SeqLMOutput

from hf_moe_tuning.data.heldout import CLASSIFICATION, GENERATION, heldout_task
from hf_moe_tuning.models import build_tiny_model
from hf_moe_tuning.study.evaluation import evaluate_task, score_candidates
from hf_moe_tuning.study.scoring import (
    baseline_predictions,
    baselines_for,
    best_candidates,
    first_sentence,
    item_scores,
    score_predictions,
)
from hf_moe_tuning.study.statistics import delta_items, paired_bootstrap, verdict


class OracleSeq2Seq(torch.nn.Module):
    """A seq2seq "model that has learnt the task": per target token it gives ``p_right`` to the bytes of the
    correct answer (the input's last word, a lookup the test controls) and ``p_wrong`` to any other byte."""

    def __init__(self, tokenizer, answers: dict[str, str], p_right: float = 0.8, p_wrong: float = 0.3):
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers
        self.p_right, self.p_wrong = p_right, p_wrong
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, labels=None):
        vocab = len(self.tokenizer)
        logits = torch.full((*labels.shape, vocab), -30.0)
        for row in range(labels.shape[0]):
            source = self.tokenizer.decode(input_ids[row], skip_special_tokens=True)
            right = self.tokenizer(text_target=self.answers[source])["input_ids"]
            target = labels[row].clamp(min=0).tolist()
            same = target[: len(right)] == right and (len(target) == len(right) or labels[row, len(right)] == -100)
            p = self.p_right if same else self.p_wrong
            for t, token in enumerate(target):
                # probability p on the label token; the rest spread evenly over the vocabulary
                logits[row, t] = float(np.log((1 - p) / (vocab - 1)))
                logits[row, t, token] = float(np.log(p))
        return Seq2SeqLMOutput(logits=logits)


def test_label_length_does_not_change_the_predictions_of_a_model_that_knows_the_task():
    tokenizer = ByT5Tokenizer()
    inputs = [f"question {i}" for i in range(8)]
    truth = ["yes" if i % 2 else "no" for i in range(8)]
    for short, long in (("yes", "no"), ("y", "not_entailed_at_all")):
        # rename the labels: one short, one very long; the oracle still prefers the right one per token
        rename = {"yes": short, "no": long}
        answers = {text: rename[t] for text, t in zip(inputs, truth)}
        model = OracleSeq2Seq(tokenizer, answers)
        choices = [[short, long]] * len(inputs)
        best = score_candidates(model, tokenizer, inputs, choices, batch_size=3)
        assert [choices[i][b] for i, b in enumerate(best)] == [rename[t] for t in truth]


def test_the_sum_would_have_picked_the_short_answer():
    """Why the mean: with the summed log-likelihood the oracle above loses to the short label."""
    logliks = torch.tensor([3 * np.log(0.3), 20 * np.log(0.8)])  # short wrong answer, long right one
    lengths = torch.tensor([3.0, 20.0])
    assert logliks.argmax() == 0  # the sum favours the short, wrong answer
    assert best_candidates(logliks, lengths, [["no", "a_long_right_answer"]]) == [1]
    with pytest.raises(ValueError, match="target token"):
        best_candidates(logliks, torch.tensor([0.0, 2.0]), [["a", "b"]])


@pytest.mark.parametrize("task", ["passage_yesno", "entailment"])
def test_untrained_model_and_constant_answer_score_at_the_majority_baseline(task):
    splits = heldout_task(task, train_size=40, validation_size=8, test_size=40)
    test = splits["test"]
    choices = list(test["choices"])
    majority = baseline_predictions("majority", CLASSIFICATION, list(test["inputs"]), choices, list(splits["train"]["targets"]))
    majority_score = score_predictions(majority, list(test["targets"]), ["accuracy"])[0]["accuracy"]
    assert majority_score == pytest.approx(1 / len(choices[0]))  # balanced splits: majority = 1/K
    for answer in choices[0]:  # every constant answer scores exactly the majority baseline
        assert score_predictions([answer] * len(test), list(test["targets"]), ["accuracy"])[0]["accuracy"] == majority_score
    torch.manual_seed(0)
    model = build_tiny_model("t5", seed=0)  # untrained
    result = evaluate_task(model, ByT5Tokenizer(), test, CLASSIFICATION, ("accuracy",), batch_size=16)
    assert abs(result.metrics["accuracy"] - majority_score) <= 0.15
    assert len(result.items["accuracy"]) == len(test)


def test_multiple_choice_candidates_are_the_items_own_options():
    """Multiple choice ranks each item's four option texts: a constant position or an untrained model scores ~1/4."""
    splits = heldout_task("multiple_choice", train_size=40, validation_size=8, test_size=200)
    test = splits["test"]
    assert all(len(c) == 4 and t in c for c, t in zip(test["choices"], test["targets"]))
    first = [c[0] for c in test["choices"]]
    assert abs(score_predictions(first, list(test["targets"]), ["accuracy"])[0]["accuracy"] - 0.25) < 0.08
    model = build_tiny_model("t5", seed=0)
    result = evaluate_task(model, ByT5Tokenizer(), test, CLASSIFICATION, ("accuracy",), batch_size=32)
    assert abs(result.metrics["accuracy"] - 0.25) < 0.1


def test_baselines_and_per_item_scores():
    inputs = ["Combine into one sentence: Ann has a cup. The cup is red.", "Bo is here.\nSay it."]
    assert first_sentence(inputs[0]) == "Combine into one sentence: Ann has a cup."
    assert first_sentence(inputs[1]) == "Bo is here."
    assert baseline_predictions("copy_input", GENERATION, inputs, [[], []], ["x"]) == inputs
    assert baseline_predictions("majority", CLASSIFICATION, ["a", "b", "c"], [["yes", "no"]] * 3, ["no", "yes", "no"]) == ["no"] * 3
    first = baseline_predictions("random", CLASSIFICATION, ["a"] * 50, [["yes", "no"]] * 50, ["no"], seed=1)
    assert first == baseline_predictions("random", CLASSIFICATION, ["a"] * 50, [["yes", "no"]] * 50, ["no"], seed=1)
    assert set(first) == {"yes", "no"}
    assert baselines_for(CLASSIFICATION) == ("majority", "random")
    assert baselines_for(GENERATION) == ("majority", "copy_input", "copy_first_sentence")
    with pytest.raises(ValueError, match="candidates"):
        baseline_predictions("random", GENERATION, ["a"], [[]], ["x"])
    # per-item scores average to the evaluate module's value
    scores = item_scores("token_f1", ["Ann has a cup", "zzz"], ["Ann has a red cup.", "Bo"])
    assert scores[1] == 0.0 and scores[0] == pytest.approx(8 / 9)
    assert item_scores("exact_match", [" Ann  has a cup."], ["ann has a cup."]) == [1.0]


def test_fusion_copy_baselines_stay_low():
    """No copy shortcut: copying scores far below a correct answer (F1 100; a fine-tuned tiny T5 reached 83 on validation)."""
    splits = heldout_task("fusion", train_size=20, validation_size=8, test_size=300)
    test = splits["test"]
    for name in ("copy_input", "copy_first_sentence"):
        predictions = baseline_predictions(name, GENERATION, list(test["inputs"]), list(test["choices"]), [])
        assert score_predictions(predictions, list(test["targets"]), ["token_f1"])[0]["token_f1"] < 0.6


def test_paired_bootstrap_and_verdicts():
    rng = np.random.default_rng(0)
    clear = {"a": 5.0 + rng.normal(0, 1, size=(5, 400)), "b": 3.0 + rng.normal(0, 1, size=(5, 400))}
    estimates = paired_bootstrap(clear, replicates=500)
    assert estimates["average"].mean == pytest.approx(4.0, abs=0.1)
    assert estimates["average"].ci_low < 4.0 < estimates["average"].ci_high
    assert estimates["average"].half_width < 0.5
    assert verdict("+", estimates["average"].ci_low, estimates["average"].ci_high) == "reproduced"
    assert verdict("-", estimates["average"].ci_low, estimates["average"].ci_high) == "opposite"
    # the same records give the same interval
    assert paired_bootstrap(clear, replicates=500)["a"] == estimates["a"]
    # seed noise widens the interval: a seed effect as large as the mean makes it inconclusive
    noisy = {"a": np.array([[8.0] * 50, [-6.0] * 50, [7.0] * 50, [-5.0] * 50, [1.0] * 50])}
    wide = paired_bootstrap(noisy, replicates=500)["average"]
    assert verdict("+", wide.ci_low, wide.ci_high) == "inconclusive"
    # "no clear difference": reproduced only inside ±2 points; a small std no longer decides
    assert verdict("0", -1.5, 1.9) == "reproduced"
    assert verdict("0", -0.6 - 4.0, -0.6 + 4.0) == "inconclusive"  # -0.6 ± 4.0 was "reproduced" before
    assert verdict("0", 2.5, 6.0) == "different"
    assert verdict("+", float("nan"), 1.0) == "inconclusive"
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))})


def test_delta_items_pairs_arms_by_seed_and_item():
    items = {"x": {0: [1.0, 0.0], 1: [1.0, 1.0]}, "y": {0: [0.0, 0.0], 1: [1.0, 0.0]}}
    delta = delta_items({"x": 1.0, "y": -1.0}, items, [0, 1])
    assert delta.tolist() == [[100.0, 0.0], [0.0, 100.0]]
    with pytest.raises(KeyError, match="arm 'z'"):
        delta_items({"z": 1.0}, items, [0])


def test_report_lists_scores_equal_to_a_constant_answer():
    """The report names every non-baseline classification cell whose score equals the majority baseline's (on the
    label-balanced splits, the score of any constant answer); generation tasks and other scores are not listed."""
    from hf_moe_tuning.study.report import _Table, constant_answer_cells

    def row(arm, task, kind, seed, score):
        return {"arm": arm, "label": arm, "task": task, "task_kind": kind, "seed": str(seed), "metric": "accuracy",
                "primary": "1", "score": str(score), "finetuned": "0" if arm.startswith("baseline:") else "1",
                "freeze_strategy": "all"}

    rows = [row("baseline:majority", "yesno", "classification", s, 50.0) for s in (0, 1)]
    rows += [row("t5", "yesno", "classification", 0, 50.0), row("t5", "yesno", "classification", 1, 88.3)]
    rows += [row("moe", "yesno", "classification", s, 50.1) for s in (0, 1)]
    rows += [row("baseline:majority", "fusion", "generation", 0, 3.0), row("t5", "fusion", "generation", 0, 3.0)]
    assert constant_answer_cells(_Table(rows)) == [("t5", "yesno", ["0"])]


def test_top_answer_share():
    from hf_moe_tuning.study.scoring import top_answer_share

    assert top_answer_share(["no"] * 4) == 1.0
    assert top_answer_share(["yes", "no", "no", "maybe"]) == 0.5
    with pytest.raises(ValueError, match="no predictions"):
        top_answer_share([])


def test_constant_answers_are_read_from_the_answers_where_results_csv_records_them():
    """With ``top_answer_share`` in results.csv a constant answer is one answer to every item, not a score: a model at
    chance that lands exactly on the majority score with varied answers is named separately, with its answer share."""
    from hf_moe_tuning.study.report import _Table, one_answer_cells, records_answers, render_markdown

    def row(arm, seed, score, share):
        return {"arm": arm, "label": arm, "task": "yesno", "task_kind": "classification", "seed": str(seed),
                "metric": "accuracy", "primary": "1", "score": str(score), "top_answer_share": str(share),
                "finetuned": "0", "freeze_strategy": "all"}

    rows = [row("baseline:majority", s, 50.0, 100.0) for s in (0, 1)]
    rows += [row("t5", 0, 50.0, 66.0), row("t5", 1, 88.3, 51.0), row("moe", 0, 50.0, 100.0), row("moe", 1, 71.0, 80.0)]
    rows += [row("ffn", 0, 50.0, 100.0), row("ffn", 1, 50.0, 55.0)]  # one seed constant, the other at chance
    table = _Table(rows)
    assert records_answers(table)
    assert one_answer_cells(table) == [("moe", "yesno", ["0"]), ("ffn", "yesno", ["0"])]
    info = {"study": "flan_moe", "variant": "tiny", "command": "c", "recipe": "r", "seeds": [0, 1], "split": "test",
            "wall_seconds": 1.0, "machine": "m", "threads": 1}
    section = render_markdown(rows, [], info).split("## Constant answers", 1)[1].split("\n## ", 1)[0]
    assert "gave every item the same answer (`top_answer_share` 100 in `results.csv`): **2 arm–task cells**" in section
    assert "- moe, yesno: seed 0\n- ffn, yesno: seed 0\n" in section
    chance = section.split("although the answers vary", 1)[1]
    assert "**2 arm–task cells**" in chance and "- t5, yesno: seed 0 (most frequent answer on 66.0 % of items)" in chance
    assert "- ffn, yesno: seed 1 (most frequent answer on 55.0 % of items)" in chance
    # a results.csv without the column (written before it existed) falls back to the scores
    old = [{k: v for k, v in r.items() if k != "top_answer_share"} for r in rows]
    assert not records_answers(_Table(old))
    assert "label-balanced, so that is" in render_markdown(old, [], info)


@pytest.mark.parametrize("variant, says", [("tiny", "label-balanced, so that is"), ("real", "not label-balanced")])
def test_constant_answer_wording_follows_the_data(variant, says):
    """Embedded splits are label-balanced (the majority score is any constant answer's); Hub splits are not, and the
    report says that only the majority-constant answer is checked there."""
    from hf_moe_tuning.study.report import render_markdown

    rows = [{"arm": arm, "label": arm, "task": "yesno", "task_kind": "classification", "seed": "0",
             "metric": "accuracy", "primary": "1", "score": "50.0", "finetuned": "0",
             "freeze_strategy": "all"} for arm in ("baseline:majority", "t5")]
    info = {"study": "flan_moe", "variant": variant, "command": "c", "recipe": "r", "seeds": [0], "split": "test",
            "wall_seconds": 1.0, "machine": "m", "threads": 1}
    text = render_markdown(rows, [], info)
    section = text.split("## Constant answers", 1)[1]
    assert says in section and "**1 arm–task cell**" in section and "- t5, yesno: seed 0" in section


def test_results_csv_keeps_the_learning_rate_exact(tmp_path):
    """Scores are rounded to 4 decimals in results.csv; the learning rate is not (2.5e-4 must not read 0.0003)."""
    import csv

    from hf_moe_tuning.study.report import write_results_csv

    write_results_csv([{"arm": "t5", "score": 88.50517, "learning_rate": 2.5e-4}], tmp_path / "r.csv")
    row = next(csv.DictReader((tmp_path / "r.csv").open()))
    assert float(row["learning_rate"]) == 2.5e-4 and row["score"] == "88.5052"


def test_results_md_reports_each_models_losses():
    """The Models section shows every model's size and losses, with both models' held-out mixture loss where the
    study instruction-tunes (the issue: report both models' mixture loss)."""
    from hf_moe_tuning.study.report import render_markdown

    rows = [{"arm": "t5", "label": "T5", "task": "yesno", "task_kind": "classification", "seed": "0",
             "metric": "accuracy", "primary": "1", "score": "70.0", "finetuned": "0", "freeze_strategy": "all"}]
    info = {"study": "flan_moe", "variant": "tiny", "command": "c", "recipe": "r", "seeds": [0], "split": "test",
            "wall_seconds": 1.0, "machine": "m", "threads": 1,
            "models": {"t5": {"init": "tiny:t5", "kind": "dense", "total": 1000, "active": 1000, "experts_share": 0.0,
                              "pretrain_loss": 2.5, "mixture_train_loss": 1.62, "mixture_eval_loss": 0.98123},
                       "switch": {"init": "tiny:switch", "kind": "sparse", "total": 3000, "active": 1000,
                                  "experts_share": 0.64, "pretrain_loss": 2.49, "mixture_train_loss": 1.67,
                                  "mixture_eval_loss": 0.97}}}
    section = render_markdown(rows, [], info).split("## Models", 1)[1].split("## Scores", 1)[0]
    assert "| switch | `tiny:switch` | sparse | 3,000 | 1,000 | 64 % | 2.490 | 1.670 | 0.970 |" in section
    assert "| t5 | `tiny:t5` | dense | 1,000 | 1,000 | 0 % | 2.500 | 1.620 | 0.981 |" in section
    for model in info["models"].values():
        for key in ("mixture_train_loss", "mixture_eval_loss"):
            model.pop(key)
    section = render_markdown(rows, [], info).split("## Models", 1)[1].split("## Scores", 1)[0]
    assert "mixture" not in section and "| t5 | `tiny:t5` | dense | 1,000 | 1,000 | 0 % | 2.500 |" in section


def test_precision_line_names_the_findings_whose_ci_is_too_wide():
    """Each report says how many average CIs are within ±2.5 points on each side, and which are not."""
    from hf_moe_tuning.study.report import CI_HALF_WIDTH_TARGET, precision_line

    average = [
        {"delta": "a − b", "ci_low": "1.0", "ci_high": "5.0"},  # half-width 2.0
        {"delta": "c − d", "ci_low": "-4.0", "ci_high": "2.6"},  # 3.3
    ]
    assert CI_HALF_WIDTH_TARGET == 2.5
    assert precision_line(average) == (
        "Precision: CI half-widths on the average 2.0 to 3.3 points; 1 of 2 findings are within the target of ±2.5, "
        "not c − d (3.3)."
    )
    assert precision_line(average[:1]).endswith("1 of 1 findings are within the target of ±2.5.")
