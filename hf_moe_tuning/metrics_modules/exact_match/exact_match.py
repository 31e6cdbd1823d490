"""Exact match of generated text after light normalisation (case, surrounding whitespace, repeated spaces)."""

import re

import datasets
import evaluate

_DESCRIPTION = "Fraction of generations equal to the reference after lower-casing and whitespace normalisation."
_KWARGS = """
Args:
    predictions (list of str): generated texts.
    references (list of str): reference texts.
Returns:
    exact_match (float): in [0, 1].
Examples:
    >>> metric = evaluate.load("hf_moe_tuning/metrics_modules/exact_match")
    >>> metric.compute(predictions=["Ann has a cup. "], references=["ann has a cup."])
    {'exact_match': 1.0}
"""


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("exact_match needs at least one reference")
        hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
        return {"exact_match": hits / len(references)}
