"""The embedded task world: determinism, coverage of the mixture, held-out splits, span corruption, metrics."""

from __future__ import annotations

import random

import pytest

from hf_moe_tuning.data import (
    FAMILIES,
    HELDOUT_TASKS,
    heldout_task,
    instruction_mixture,
    pretraining_corpus,
    random_spans_mask,
    span_corrupt,
    span_corruption_dataset,
)
from hf_moe_tuning.data.corpus import BYT5_FIRST_SENTINEL
from hf_moe_tuning.metrics_modules import METRICS, load_metric


def test_corpus_is_seeded_and_bounded():
    a, b = pretraining_corpus(50, seed=1), pretraining_corpus(50, seed=1)
    assert a["text"] == b["text"]
    assert a["text"] != pretraining_corpus(50, seed=2)["text"]
    assert all(0 < len(t) <= 120 for t in a["text"])


def test_span_mask_density_and_spans():
    rng = random.Random(0)
    mask = random_spans_mask(100, rng, noise_density=0.15, mean_span=3.0)
    assert len(mask) == 100 and sum(mask) == 15
    assert not mask[0]  # T5 layout starts with a clean segment


def test_span_corruption_round_trip():
    """Filling each sentinel of the input with the span after it in the target restores the text."""
    ids = list(range(10, 70))
    inputs, labels = span_corrupt(ids, random.Random(3), noise_density=0.2, mean_span=3.0)
    assert inputs[-1] == 1 and labels[-1] == 1
    spans: dict[int, list[int]] = {}
    current = None
    for token in labels[:-1]:
        if token >= BYT5_FIRST_SENTINEL:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    restored = [t for token in inputs[:-1] for t in (spans[token] if token >= BYT5_FIRST_SENTINEL else [token])]
    assert restored == ids
    assert sorted(spans) == list(range(BYT5_FIRST_SENTINEL, BYT5_FIRST_SENTINEL + len(spans)))


def test_span_corruption_dataset_columns():
    ds = span_corruption_dataset(pretraining_corpus(8), lambda t: [b + 3 for b in t.encode()])
    assert ds.column_names == ["input_ids", "labels"]
    assert all(any(t >= BYT5_FIRST_SENTINEL for t in row) for row in ds["input_ids"])


def test_mixture_covers_twenty_families_with_templates_and_shots():
    assert len(FAMILIES) >= 20
    assert all(len(f.templates) >= 3 for f in FAMILIES)
    ds = instruction_mixture(26 * 12, seed=0)
    assert set(ds["task"]) == {f.name for f in FAMILIES}
    assert set(ds.column_names) == {"inputs", "targets", "task", "template_idx", "shots"}
    assert 0 in ds["shots"] and max(ds["shots"]) >= 1
    assert len(set(zip(ds["task"], ds["template_idx"]))) >= 2 * len(FAMILIES)
    assert all(len(x) <= 160 for x in ds["inputs"])
    assert instruction_mixture(30, seed=4)["inputs"] == instruction_mixture(30, seed=4)["inputs"]


def test_mixture_has_no_heldout_tasks():
    """No entailment labels, answer letters or questions about what a passage states in the mixture (those tasks
    are held out). Yes/no answers come only from the three yes/no families (numbers, animal sounds, checking a
    passage's fact), balanced, so that an instruction-tuned model has produced both answers before the held-out yes/no task."""
    mixture = instruction_mixture(4000, seed=0)
    assert not set(mixture["targets"]) & {"entailment", "not_entailment", "A", "B", "C", "D"}
    assert not any("passage" in text.lower() for text in mixture["inputs"])
    yes_no_families = {"is_larger", "animal_makes", "fact_check"}
    yes_no = [(task, target) for task, target in zip(mixture["task"], mixture["targets"]) if target in ("yes", "no")]
    assert {task for task, _ in yes_no} == yes_no_families
    assert all(target in ("yes", "no") for task, target in zip(mixture["task"], mixture["targets"])
               if task in yes_no_families)
    answers = [target for _, target in yes_no]
    assert abs(answers.count("yes") - answers.count("no")) < 0.1 * len(answers)


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown instruction families"):
        instruction_mixture(10, families=("who_has", "nope"))


@pytest.mark.parametrize("name", sorted(HELDOUT_TASKS))
def test_heldout_splits(name):
    task = HELDOUT_TASKS[name]
    splits = heldout_task(name, seed=0, train_size=32, validation_size=16, test_size=40)
    assert {k: len(v) for k, v in splits.items()} == {"train": 32, "validation": 16, "test": 40}
    inputs = [set(splits[s]["inputs"]) for s in ("train", "validation", "test")]
    assert not (inputs[0] & inputs[1] or inputs[0] & inputs[2] or inputs[1] & inputs[2])
    if task.choices:
        assert all(t in task.choices for t in splits["test"]["targets"])
        assert len(set(splits["test"]["targets"])) == len(task.choices)  # every label occurs
    assert heldout_task(name, seed=0, train_size=32, validation_size=16, test_size=40)["test"]["inputs"] == splits["test"]["inputs"]


def _template(text: str) -> str:
    """``text`` with every lexicon word replaced by its category (what a rule that ignores the facts sees)."""
    from hf_moe_tuning.data.world import ANIMALS, COLORS, NAMES, OBJECTS, OPPOSITES, PLACES

    tags = {**{w: "NAME" for w in NAMES}, **{w: "OBJECT" for w in OBJECTS}, **{w: "COLOR" for w in COLORS},
            **{w: "PLACE" for w in PLACES}, **{w: "ANIMAL" for w in ANIMALS}, **{w: "SIZE" for w in OPPOSITES},
            **{s: "SOUND" for s, _ in ANIMALS.values()}}
    return " ".join(tags.get(w.strip(".?,"), w) for w in text.split())


@pytest.mark.parametrize(
    "name, part",
    [("entailment", lambda x: x.split("\n")[1]),  # the hypothesis alone
     ("passage_yesno", lambda x: x.split("\n")[1]),  # the question alone
     ("passage_yesno", lambda x: x.split("\n")[0])],  # the passage alone
)
def test_binary_tasks_have_no_one_sided_cue(name, part):
    """A rule that learns the majority label of each template of one side (hypothesis, question or passage, facts
    abstracted to their categories) on the training split scores chance on the test split: the label needs both."""
    splits = heldout_task(name, seed=0, train_size=2000, validation_size=10, test_size=1000)
    votes: dict[str, dict[str, int]] = {}
    for inputs, target in zip(splits["train"]["inputs"], splits["train"]["targets"]):
        counts = votes.setdefault(_template(part(inputs)), {})
        counts[target] = counts.get(target, 0) + 1
    fallback = {HELDOUT_TASKS[name].choices[0]: 1}  # templates unseen in training get a fixed answer
    hits = [max(counts, key=counts.get) == t for x, t in zip(splits["test"]["inputs"], splits["test"]["targets"])
            for counts in [votes.get(_template(part(x)), fallback)]]
    assert len(votes) < 200  # the templates do abstract the facts away
    assert 0.4 < sum(hits) / len(hits) < 0.6


def test_heldout_unknown_task():
    with pytest.raises(KeyError, match="unknown held-out task"):
        heldout_task("squad")


def test_metric_modules_load_offline():
    assert set(METRICS) == {"accuracy", "exact_match", "token_f1"}
    assert load_metric("accuracy").compute(predictions=["yes", "no"], references=["yes", "yes"]) == {"accuracy": 0.5}
    assert load_metric("exact_match").compute(predictions=[" Ann  has a cup."], references=["ann has a cup."]) == {"exact_match": 1.0}
    f1 = load_metric("token_f1").compute(predictions=["Ann has a cup"], references=["Ann has a red cup."])["token_f1"]
    assert f1 == pytest.approx(2 * 1.0 * 0.8 / 1.8)
    with pytest.raises(KeyError, match="unknown metric"):
        load_metric("bleu")
