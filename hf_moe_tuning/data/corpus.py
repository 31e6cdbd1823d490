"""Pretraining text of the embedded world and T5 span corruption over byte tokens."""

from __future__ import annotations

import random
from collections.abc import Callable

from datasets import Dataset

from .world import (
    ANIMALS,
    CATEGORIES,
    DISLIKES,
    FOODS,
    LIKES,
    NUMBER_WORDS,
    OPPOSITES,
    THING_COLORS,
    article,
    plural,
    sample_scene,
)

#: First sentinel id of ``ByT5Tokenizer`` (``<extra_id_0>``); ``<extra_id_i>`` is ``259 + i``.
BYT5_FIRST_SENTINEL = 259
#: Byte ids of ``ByT5Tokenizer`` are ``byte + 3`` (0 pad, 1 eos, 2 unk).
BYT5_BYTE_OFFSET = 3


def _knowledge_sentence(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        animal = rng.choice(list(ANIMALS))
        return f"The {animal} says {ANIMALS[animal][0]}."
    if kind == 1:
        animal = rng.choice(list(ANIMALS))
        return f"{article(animal).capitalize()} {animal} is {ANIMALS[animal][1]}."
    if kind == 2:
        thing = rng.choice(list(THING_COLORS))
        return f"The {thing} is {THING_COLORS[thing]}."
    if kind == 3:
        word = rng.choice(list(OPPOSITES))
        return f"{word.capitalize()} is the opposite of {OPPOSITES[word]}."
    if kind == 4:
        a, b = rng.randrange(11), rng.randrange(10)
        return f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."
    if kind == 5:
        n = rng.randrange(20)
        return f"{NUMBER_WORDS[n + 1].capitalize()} comes after {NUMBER_WORDS[n]}."
    if kind == 6:
        category = rng.choice(list(CATEGORIES))
        word = rng.choice(CATEGORIES[category])
        return f"{word.capitalize()} is {article(category)} {category}."
    animal = rng.choice(list(ANIMALS))
    n = rng.randrange(2, 10)
    return f"There are {NUMBER_WORDS[n]} {plural(animal)}."


def _scene_sentences(rng: random.Random) -> list[str]:
    scene = sample_scene(rng, n_people=rng.choice((1, 2)))
    sentences = scene.fact_sentences(("holds", "at", "pets"))
    name = scene.people[0]
    verb = rng.choice(LIKES + DISLIKES)
    sentences.append(f"{name} {verb} {rng.choice(FOODS)}.")
    rng.shuffle(sentences)
    return sentences


def make_paragraph(rng: random.Random, max_chars: int = 120) -> str:
    """One paragraph of the world: scene facts mixed with general knowledge, at most ``max_chars``."""
    sentences = _scene_sentences(rng) + [_knowledge_sentence(rng) for _ in range(rng.randrange(1, 4))]
    rng.shuffle(sentences)
    text = ""
    for sentence in sentences:
        candidate = f"{text} {sentence}".strip()
        if len(candidate) > max_chars:
            break
        text = candidate
    return text or sentences[0][:max_chars]


def pretraining_corpus(num_paragraphs: int = 20_000, seed: int = 0, max_chars: int = 120) -> Dataset:
    """The span-corruption pretraining corpus: a ``Dataset`` with one column ``text``."""
    rng = random.Random(f"corpus-{seed}")
    return Dataset.from_dict({"text": [make_paragraph(rng, max_chars) for _ in range(num_paragraphs)]})


def random_spans_mask(length: int, rng: random.Random, noise_density: float = 0.15, mean_span: float = 3.0) -> list[bool]:
    """T5's random span noise mask: ``round(length * noise_density)`` noised tokens in spans of mean length ``mean_span``."""
    if length < 2:
        return [False] * length
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    num_clean = length - num_noise
    num_spans = min(num_spans, num_noise, num_clean)

    def segment(total: int, parts: int) -> list[int]:
        cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
        bounds = [0, *cuts, total]
        return [b - a for a, b in zip(bounds, bounds[1:])]

    noise_lengths, clean_lengths = segment(num_noise, num_spans), segment(num_clean, num_spans)
    mask: list[bool] = []
    for clean, noise in zip(clean_lengths, noise_lengths):
        mask += [False] * clean + [True] * noise
    return mask


def span_corrupt(
    ids: list[int],
    rng: random.Random,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
    first_sentinel: int = BYT5_FIRST_SENTINEL,
    eos_id: int = 1,
) -> tuple[list[int], list[int]]:
    """Apply T5 span corruption to ``ids`` and return ``(input_ids, labels)``, both ending with EOS.

    Each noised span is replaced by one sentinel in the input; the target lists the sentinels followed
    by the spans they hide. Sentinels count up from ``first_sentinel`` (``<extra_id_0>`` = 259 in ByT5).
    """
    mask = random_spans_mask(len(ids), rng, noise_density, mean_span)
    inputs: list[int] = []
    targets: list[int] = []
    sentinel = first_sentinel
    previous = False
    for token, noised in zip(ids, mask):
        if noised:
            if not previous:
                inputs.append(sentinel)
                targets.append(sentinel)
                sentinel += 1
            targets.append(token)
        else:
            inputs.append(token)
        previous = noised
    return inputs + [eos_id], targets + [eos_id]


def span_corruption_dataset(
    corpus: Dataset,
    encode: Callable[[str], list[int]],
    seed: int = 0,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
    first_sentinel: int = BYT5_FIRST_SENTINEL,
    eos_id: int = 1,
) -> Dataset:
    """Map a ``text`` corpus to span-corruption examples (``input_ids``, ``labels``), deterministically."""

    def corrupt(example: dict, idx: int) -> dict:
        rng = random.Random(f"{seed}-{idx}")
        input_ids, labels = span_corrupt(encode(example["text"]), rng, noise_density, mean_span, first_sentinel, eos_id)
        return {"input_ids": input_ids, "labels": labels}

    return corpus.map(corrupt, with_indices=True, remove_columns=corpus.column_names)
