"""SQuAD-style token F1: harmonic mean of word-overlap precision and recall, averaged over examples."""

import collections
import re

import datasets
import evaluate

_DESCRIPTION = "Mean per-example F1 of the bag of lower-cased words (punctuation stripped) of prediction vs reference."
_KWARGS = """
Args:
    predictions (list of str): generated texts.
    references (list of str): reference texts.
Returns:
    token_f1 (float): in [0, 1].
Examples:
    >>> metric = evaluate.load("hf_moe_tuning/metrics_modules/token_f1")
    >>> metric.compute(predictions=["Ann has a cup"], references=["Ann has a red cup."])
    {'token_f1': 0.888...}
"""


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def f1_score(prediction: str, reference: str) -> float:
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class TokenF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("token_f1 needs at least one reference")
        scores = [f1_score(p, r) for p, r in zip(predictions, references)]
        return {"token_f1": sum(scores) / len(scores)}
