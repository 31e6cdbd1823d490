"""Held-out downstream tasks of the embedded world, of kinds absent from the instruction mixture.

=================  ==================================  ==================  ===========================
task               kind (real counterpart)             answers             metrics
=================  ==================================  ==================  ===========================
``passage_yesno``  yes/no QA over a passage (BoolQ)    ``yes`` / ``no``    accuracy
``entailment``     entailment (RTE)                    2 labels            accuracy
``multiple_choice``multiple choice (ARC, COPA-style)  one of 4 options    accuracy
``fusion``         short generation (sentence fusion)  free text           token_f1, exact_match
=================  ==================================  ==================  ===========================

The first metric of a task is its primary score. For ``fusion`` it is token F1: at the embedded
scale exact match stays at 0 for every arm, which would hide all differences.

Every task is answerable from a short passage or from world knowledge the instruction mixture and the
pretraining corpus also carry (animal sounds, colours, opposites, categories), in a format none of the
mixture's families uses. The passages are about one person, short enough for the tiny models to learn
the tasks within a fine-tuning budget that fits a CPU. Multiple choice is scored over the option texts
(each item's own four candidates), the way ARC and COPA are scored by rank classification.

Splits are disjoint in their ``inputs``; classification splits with fixed answers are label-balanced.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset, DatasetDict

from .world import (
    ANIMALS,
    CATEGORIES,
    COLORS,
    OBJECTS,
    OPPOSITES,
    PLACES,
    THING_COLORS,
    article,
    sample_scene,
)

CLASSIFICATION = "classification"
GENERATION = "generation"


@dataclass(frozen=True)
class HeldoutTask:
    """A downstream task: how to draw one example, its kind, answer candidates and metrics."""

    name: str
    kind: str
    #: draws ``(inputs, target)``, or ``(inputs, target, choices)`` for tasks whose candidates vary per item
    sample: Callable[[random.Random], tuple]
    choices: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("accuracy",)


#: what a yes/no question asks the passage to state, by kind of fact
_STATED_QUESTIONS = {"holds": "what {name} has", "at": "where {name} is", "pets": "which animal {name} owns"}


def _passage_yesno(rng: random.Random) -> tuple[str, str]:
    """Does the passage state a kind of fact about its person? (BoolQ-style: the answer is in the passage.)

    The passage states two of the person's three facts; the question names one kind. Neither the
    question nor the passage alone tells the answer: it is ``yes`` exactly when the asked kind is among
    the stated ones. (An earlier version asked "Does Ann have a red cup?", with the false items naming a
    random other colour or place; no tiny encoder-decoder learnt it within 3,000 steps, see the README.)
    """
    scene = sample_scene(rng, 1)
    name = scene.people[0]
    stated = rng.sample(tuple(_STATED_QUESTIONS), 2)
    facts = scene.fact_sentences(tuple(stated))
    rng.shuffle(facts)
    asked = rng.choice(tuple(_STATED_QUESTIONS))
    question = f"Does the passage say {_STATED_QUESTIONS[asked].format(name=name)}?"
    return f"{' '.join(facts)}\nQuestion: {question} Answer yes or no.", "yes" if asked in stated else "no"


def _entailment(rng: random.Random) -> tuple[str, str]:
    """Does the premise entail the hypothesis? (RTE-style, two labels.)

    Entailed and non-entailed hypotheses of a kind have the same form, so the hypothesis alone does not
    tell the label (an earlier version had two such cues, "Someone is at ..." and a colour word, which the
    models learnt instead of the task). Kinds 2 and 3 need world knowledge: an animal's size or sound.
    """
    scene = sample_scene(rng, 1)
    name = scene.people[0]
    entailed = rng.random() < 0.5
    kind = rng.randrange(4)
    # the premise states the facts the hypothesis is about plus one other kind of fact, to keep it short
    about = ("holds", "at", "pets", "pets")[kind]
    other = rng.choice([k for k in ("holds", "at", "pets") if k != about])
    premise = " ".join(scene.fact_sentences((about, other)))
    if kind == 0:
        obj = scene.holds[name][1]
        hypothesis = f"{name} has a {obj if entailed else rng.choice([o for o in OBJECTS if o != obj])}."
    elif kind == 1:
        place = scene.at[name]
        hypothesis = f"Someone is at the {place if entailed else rng.choice([p for p in PLACES if p != place])}."
    elif kind == 2:
        size = ANIMALS[scene.pets[name]][1]
        hypothesis = f"{name} owns a {size if entailed else OPPOSITES[size]} animal."
    else:
        sound = ANIMALS[scene.pets[name]][0]
        if not entailed:
            sound = rng.choice([s for s, _ in ANIMALS.values() if s != sound])
        hypothesis = f"{name} owns an animal that says {sound}."
    text = f"Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis?"
    return text, "entailment" if entailed else "not_entailment"


def _multiple_choice(rng: random.Random) -> tuple[str, str, list[str]]:
    kind = rng.randrange(4)
    if kind == 0:
        animal = rng.choice(list(ANIMALS))
        question, answer = f"Which animal says {ANIMALS[animal][0]}?", animal
        pool = list(ANIMALS)
    elif kind == 1:
        word = rng.choice(list(OPPOSITES))
        question, answer = f"What is the opposite of {word}?", OPPOSITES[word]
        pool = [w for w in OPPOSITES if w != word]
    elif kind == 2:
        thing = rng.choice(list(THING_COLORS))
        question, answer = f"What color is the {thing}?", THING_COLORS[thing]
        pool = list(COLORS)
    else:
        category = rng.choice(list(CATEGORIES))
        answer = rng.choice(CATEGORIES[category])
        question = f"Which one is {article(category)} {category}?"
        pool = [w for c, words in CATEGORIES.items() if c != category for w in words] + [answer]
    distractors = rng.sample([w for w in dict.fromkeys(pool) if w != answer], 3)
    options = distractors + [answer]
    rng.shuffle(options)
    return f"{question}\nOptions: {', '.join(options)}.\nAnswer:", answer, options


_FUSION_PAIRS = (("holds", "at"), ("holds", "pets"), ("at", "pets"))


def _fusion(rng: random.Random) -> tuple[str, str]:
    """Fuse the two facts the passage states about one person into one sentence.

    The passage states every fact of two people in shuffled order, so copying it (or its first sentence)
    scores far below a model that picks the right two facts and joins them.
    """
    scene = sample_scene(rng, 1)
    facts = scene.fact_sentences(("holds", "at", "pets"))
    rng.shuffle(facts)
    name = rng.choice(scene.people)
    first, second = rng.choice(_FUSION_PAIRS)
    color, obj = scene.holds[name]
    animal = scene.pets[name]
    place = scene.at[name]
    if (first, second) == ("holds", "at"):
        question, target = f"what {name} has and where {name} is", f"{name} has a {color} {obj} and is at the {place}."
    elif (first, second) == ("holds", "pets"):
        question, target = f"what {name} has and owns", f"{name} has a {color} {obj} and owns {article(animal)} {animal}."
    else:
        question, target = f"where {name} is and what {name} owns", f"{name} is at the {place} with {article(animal)} {animal}."
    return f"{' '.join(facts)}\nCombine into one sentence {question}.", target


HELDOUT_TASKS: dict[str, HeldoutTask] = {
    t.name: t
    for t in (
        HeldoutTask("passage_yesno", CLASSIFICATION, _passage_yesno, ("yes", "no")),
        HeldoutTask("entailment", CLASSIFICATION, _entailment, ("entailment", "not_entailment")),
        HeldoutTask("multiple_choice", CLASSIFICATION, _multiple_choice),
        HeldoutTask("fusion", GENERATION, _fusion, (), ("token_f1", "exact_match")),
    )
}


def get_task(name: str) -> HeldoutTask:
    """The held-out task called ``name`` (a clear error listing the known ones otherwise)."""
    try:
        return HELDOUT_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown held-out task {name!r}; known: {sorted(HELDOUT_TASKS)}") from None


def _quotas(task: HeldoutTask, size: int) -> dict[str | None, int]:
    """Examples per answer: classification splits are label-balanced (so majority = random = 1/K)."""
    if task.kind != CLASSIFICATION or not task.choices:
        return {None: size}
    k = len(task.choices)
    return {c: size // k + (i < size % k) for i, c in enumerate(task.choices)}


def heldout_task(
    name: str, seed: int = 0, train_size: int = 128, validation_size: int = 64, test_size: int = 200
) -> DatasetDict:
    """Train/validation/test splits of held-out task ``name`` (columns ``inputs``, ``targets``, ``choices``).

    Splits are disjoint in their ``inputs``; classification splits hold every answer equally often.
    """
    task = get_task(name)
    rng = random.Random(f"heldout-{name}-{seed}")
    seen: set[str] = set()
    splits: dict[str, Dataset] = {}
    for split, size in (("test", test_size), ("validation", validation_size), ("train", train_size)):
        quotas = _quotas(task, size)
        rows = []
        attempts = 0
        while len(rows) < size:
            attempts += 1
            if attempts > 200 * size + 1000:
                raise RuntimeError(f"{name}: could not draw {size} distinct {split} examples")
            inputs, target, *item_choices = task.sample(rng)
            key = target if None not in quotas else None
            if inputs in seen or quotas.get(key, 0) == 0:
                continue
            seen.add(inputs)
            quotas[key] -= 1
            rows.append({"inputs": inputs, "targets": target, "choices": list(item_choices[0] if item_choices else task.choices)})
        rng.shuffle(rows)
        splits[split] = Dataset.from_list(rows) if rows else Dataset.from_dict({"inputs": [], "targets": [], "choices": []})
    return DatasetDict(train=splits["train"], validation=splits["validation"], test=splits["test"])
