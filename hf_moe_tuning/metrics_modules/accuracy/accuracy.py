"""Accuracy: the fraction of predictions equal to their reference (labels compared as strings)."""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to the reference, for classification answers given as strings."
_KWARGS = """
Args:
    predictions (list of str): predicted labels.
    references (list of str): gold labels.
Returns:
    accuracy (float): in [0, 1].
Examples:
    >>> metric = evaluate.load("hf_moe_tuning/metrics_modules/accuracy")
    >>> metric.compute(predictions=["yes", "no"], references=["yes", "yes"])
    {'accuracy': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("accuracy needs at least one reference")
        correct = sum(str(p) == str(r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references)}
