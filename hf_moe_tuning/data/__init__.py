"""The embedded task world: seeded generators returning ``datasets.Dataset`` objects, no downloads.

* :func:`pretraining_corpus` and :func:`span_corruption_dataset` – text for T5 span-corruption pretraining;
* :func:`instruction_mixture` – a Flan-style mixture of 29 task families, several templates each,
  zero-shot and few-shot forms;
* :func:`heldout_task` – four downstream tasks absent from the mixture (yes/no QA over a passage,
  entailment, lettered multiple choice, sentence fusion), with train/validation/test splits;
* :func:`~.fingerprint.content_fingerprint` – the content hash that keys shipped stages by their data.

Real counterparts (Flan collection, SuperGLUE) are loaded from the Hub by :mod:`.hub`.
"""

from .corpus import pretraining_corpus, random_spans_mask, span_corrupt, span_corruption_dataset
from .heldout import CLASSIFICATION, GENERATION, HELDOUT_TASKS, HeldoutTask, get_task, heldout_task
from .instructions import FAMILIES, FAMILY_NAMES, TaskFamily, instruction_mixture

__all__ = [
    "CLASSIFICATION",
    "FAMILIES",
    "FAMILY_NAMES",
    "GENERATION",
    "HELDOUT_TASKS",
    "HeldoutTask",
    "TaskFamily",
    "get_task",
    "heldout_task",
    "instruction_mixture",
    "pretraining_corpus",
    "random_spans_mask",
    "span_corrupt",
    "span_corruption_dataset",
]
