"""The Flan-style instruction mixture of the embedded world.

Each :class:`TaskFamily` draws a seeded example (a dict of fields plus ``answer``) and renders it
through one of several natural-language templates. :func:`instruction_mixture` mixes every family
uniformly, in zero-shot and few-shot form (exemplars rendered with the same template, joined by a
blank line, as Flan's few-shot templates do).

None of the families is a question about whether a passage states something, an entailment judgement,
a lettered multiple-choice question or a sentence-fusion task: those tasks are kept for the held-out set
(:mod:`hf_moe_tuning.data.heldout`). The mixture does hold the answer *formats* the held-out tasks use, on
other content, as Flan does (its held-out tasks are new tasks, not new answer formats): three families answer
"yes" or "no", so that an instruction-tuned model has produced both answers before it meets the held-out yes/no
task zero-shot: about numbers (``is_larger``), animal sounds (``animal_makes``) and whether a passage's fact is
true (``fact_check``: "Is Ann at the park?", the place being Ann's or another person's of the passage). The
held-out ``passage_yesno`` asks something else: whether the passage states a kind of fact at all.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset

from .world import (
    ANIMALS,
    CATEGORIES,
    DISLIKES,
    FOODS,
    LIKES,
    NAMES,
    NUMBER_WORDS,
    OBJECTS,
    OPPOSITES,
    THING_COLORS,
    article,
    category_of,
    plural,
    sample_scene,
)

Sampler = Callable[[random.Random], dict]


@dataclass(frozen=True)
class TaskFamily:
    """A task family: a sampler of fields (with ``answer``) and its templates (``str.format`` strings)."""

    name: str
    sample: Sampler
    templates: tuple[str, ...]

    def render(self, fields: dict, template_idx: int) -> str:
        return self.templates[template_idx].format(**fields)


def _words(rng: random.Random, k: int) -> list[str]:
    pool = list(OBJECTS) + list(ANIMALS) + list(FOODS)
    return rng.sample(pool, k)


def _sentence(rng: random.Random) -> str:
    scene = sample_scene(rng, 1)
    return rng.choice(scene.fact_sentences(("holds", "at", "pets")))


def _who_has(rng):
    s = sample_scene(rng, 2)
    name = rng.choice(s.people)
    color, obj = s.holds[name]
    return dict(passage=" ".join(s.fact_sentences(("holds",))), color=color, obj=obj, answer=name)


def _what_color(rng):
    s = sample_scene(rng, 2)
    name = rng.choice(s.people)
    color, obj = s.holds[name]
    return dict(passage=" ".join(s.fact_sentences(("holds",))), name=name, obj=obj, answer=color)


def _where_is(rng):
    s = sample_scene(rng, 2)
    name = rng.choice(s.people)
    return dict(passage=" ".join(s.fact_sentences(("at",))), name=name, answer=s.at[name])


def _which_pet(rng):
    s = sample_scene(rng, 2)
    name = rng.choice(s.people)
    return dict(passage=" ".join(s.fact_sentences(("pets",))), name=name, answer=s.pets[name])


def _animal_sound(rng):
    animal = rng.choice(list(ANIMALS))
    return dict(animal=animal, answer=ANIMALS[animal][0])


def _animal_size(rng):
    animal = rng.choice(list(ANIMALS))
    return dict(animal=animal, answer=ANIMALS[animal][1])


def _thing_color(rng):
    thing = rng.choice(list(THING_COLORS))
    return dict(thing=thing, answer=THING_COLORS[thing])


def _opposite(rng):
    word = rng.choice(list(OPPOSITES))
    return dict(word=word, answer=OPPOSITES[word])


def _category(rng):
    category = rng.choice(list(CATEGORIES))
    word = rng.choice(CATEGORIES[category])
    return dict(word=word, options=", ".join(CATEGORIES), answer=category_of(word))


def _add(rng):
    a, b = rng.randrange(50), rng.randrange(50)
    return dict(a=a, b=b, answer=str(a + b))


def _subtract(rng):
    a, b = sorted((rng.randrange(50), rng.randrange(50)), reverse=True)
    return dict(a=a, b=b, answer=str(a - b))


def _number_word(rng):
    n = rng.randrange(len(NUMBER_WORDS))
    return dict(n=n, answer=NUMBER_WORDS[n])


def _next_number(rng):
    n = rng.randrange(len(NUMBER_WORDS) - 1)
    return dict(word=NUMBER_WORDS[n], answer=NUMBER_WORDS[n + 1])


def _larger(rng):
    a, b = rng.sample(range(100), 2)
    return dict(a=a, b=b, answer=str(max(a, b)))


def _is_larger(rng):
    a, b = rng.sample(range(100), 2)
    return dict(a=a, b=b, answer="yes" if a > b else "no")


def _animal_makes(rng):
    animal = rng.choice(list(ANIMALS))
    right = ANIMALS[animal][0]
    sound = right if rng.random() < 0.5 else rng.choice(sorted({s for s, _ in ANIMALS.values()} - {right}))
    return dict(animal=animal, sound=sound, answer="yes" if sound == right else "no")


def _fact_check(rng):
    s = sample_scene(rng, 2)
    name, other = rng.sample(s.people, 2)
    true = rng.random() < 0.5
    # a false question names the other person's place or pet, which the passage also states: only reading tells
    if rng.random() < 0.5:
        passage, question = s.fact_sentences(("at",)), f"Is {name} at the {s.at[name if true else other]}?"
    else:
        animal = s.pets[name if true else other]
        passage, question = s.fact_sentences(("pets",)), f"Does {name} own {article(animal)} {animal}?"
    return dict(passage=" ".join(passage), question=question, answer="yes" if true else "no")


def _largest_of_list(rng):
    values = rng.sample(range(100), rng.randrange(3, 6))
    return dict(values=", ".join(map(str, values)), answer=str(max(values)))


def _reverse(rng):
    word = rng.choice(_words(rng, 1))
    return dict(word=word, answer=word[::-1])


def _uppercase(rng):
    word = rng.choice(_words(rng, 1))
    return dict(word=word, answer=word.upper())


def _first_letter(rng):
    word = rng.choice(NAMES + tuple(_words(rng, 3)))
    return dict(word=word, answer=word[0].lower())


def _spell(rng):
    word = _words(rng, 1)[0]
    return dict(word=word, answer="-".join(word))


def _last_word(rng):
    sentence = _sentence(rng)
    return dict(sentence=sentence, answer=sentence.rstrip(".").split()[-1])


def _count_words(rng):
    sentence = _sentence(rng)
    return dict(sentence=sentence, answer=str(len(sentence.split())))


def _plural(rng):
    word = rng.choice(list(ANIMALS) + list(OBJECTS))
    return dict(word=word, answer=plural(word))


def _sort_words(rng):
    words = _words(rng, 3)
    return dict(words=" ".join(words), answer=" ".join(sorted(words)))


def _sentiment(rng):
    positive = rng.random() < 0.5
    verb = rng.choice(LIKES if positive else DISLIKES)
    return dict(
        sentence=f"{rng.choice(NAMES)} {verb} the {rng.choice(FOODS)}.",
        answer="positive" if positive else "negative",
    )


def _repeat(rng):
    sentence = _sentence(rng)
    return dict(sentence=sentence, answer=sentence)


def _count_people(rng):
    s = sample_scene(rng, rng.randrange(1, 4))
    return dict(passage=" ".join(s.fact_sentences(("at",))), answer=str(len(s.people)))


FAMILIES: tuple[TaskFamily, ...] = (
    TaskFamily("who_has", _who_has, (
        "{passage}\nWho has the {color} {obj}?",
        "Read: {passage} Question: who has the {color} {obj}?",
        "{passage} Whose is the {color} {obj}?",
    )),
    TaskFamily("what_color", _what_color, (
        "{passage}\nWhat color is the {obj} of {name}?",
        "Read: {passage} Question: which color is {name}'s {obj}?",
        "{passage} Name the color of the {obj}.",
    )),
    TaskFamily("where_is", _where_is, (
        "{passage}\nWhere is {name}?",
        "Read: {passage} Question: where is {name} now?",
        "{passage} Name the place of {name}.",
    )),
    TaskFamily("which_pet", _which_pet, (
        "{passage}\nWhich animal does {name} own?",
        "Read: {passage} Question: what pet has {name}?",
        "{passage} Name the animal of {name}.",
    )),
    TaskFamily("animal_sound", _animal_sound, (
        "What does a {animal} say?",
        "Which sound does the {animal} make?",
        "Animal: {animal}. Sound:",
    )),
    TaskFamily("animal_size", _animal_size, (
        "How big is a {animal}? OPTIONS: big, small",
        "Is a {animal} big or small?",
        "Size of the {animal} (big/small):",
    )),
    TaskFamily("thing_color", _thing_color, (
        "What color is the {thing}?",
        "Name the color of {thing}.",
        "Thing: {thing}. Color:",
    )),
    TaskFamily("opposite", _opposite, (
        "What is the opposite of {word}?",
        "Give the antonym of {word}.",
        "Opposite word: {word} ->",
    )),
    TaskFamily("category", _category, (
        "What kind of thing is {word}? OPTIONS: {options}",
        "Classify '{word}' as one of: {options}.",
        "{word} is a ... (choose from {options})",
    )),
    TaskFamily("add", _add, ("What is {a} plus {b}?", "Add {a} and {b}.", "{a} + {b} =")),
    TaskFamily("subtract", _subtract, ("What is {a} minus {b}?", "Subtract {b} from {a}.", "{a} - {b} =")),
    TaskFamily("number_word", _number_word, (
        "Write {n} in words.", "Spell out the number {n}.", "{n} in letters:",
    )),
    TaskFamily("next_number", _next_number, (
        "What number comes after {word}?", "Count on from {word} by one.", "{word}, then?",
    )),
    TaskFamily("larger", _larger, (
        "Which is larger, {a} or {b}?", "Pick the bigger number: {a}, {b}.", "max({a}, {b}) =",
    )),
    TaskFamily("is_larger", _is_larger, (
        "Is {a} larger than {b}?", "{a} > {b}? Answer yes or no.", "True or not: {a} is bigger than {b}. (yes/no)",
    )),
    TaskFamily("animal_makes", _animal_makes, (
        "Does a {animal} make the sound {sound}?", "A {animal} goes '{sound}'. Right? (yes/no)",
        "Animal: {animal}. Sound: {sound}. Correct?",
    )),
    TaskFamily("fact_check", _fact_check, (
        "{passage}\n{question}", "Read: {passage} Question: {question} Answer yes or no.", "{passage} {question} (yes/no)",
    )),
    TaskFamily("largest_of_list", _largest_of_list, (
        "What is the largest of {values}?", "Find the maximum: {values}.", "Numbers: {values}. Largest:",
    )),
    TaskFamily("reverse", _reverse, (
        "Reverse the word {word}.", "Write {word} backwards.", "{word} reversed is",
    )),
    TaskFamily("uppercase", _uppercase, (
        "Write {word} in capital letters.", "Uppercase: {word}", "Make {word} upper case.",
    )),
    TaskFamily("first_letter", _first_letter, (
        "What is the first letter of {word}?", "{word} starts with which letter?", "First letter: {word} ->",
    )),
    TaskFamily("spell", _spell, ("Spell {word} with dashes.", "Spell out: {word}", "{word} letter by letter:")),
    TaskFamily("last_word", _last_word, (
        "What is the last word of: {sentence}", "{sentence}\nWhich word ends the sentence?", "Last word? {sentence}",
    )),
    TaskFamily("count_words", _count_words, (
        "How many words are in: {sentence}", "{sentence}\nCount the words.", "Word count of '{sentence}':",
    )),
    TaskFamily("plural", _plural, ("What is the plural of {word}?", "One {word}, two ...", "Plural form: {word} ->")),
    TaskFamily("sort_words", _sort_words, (
        "Sort alphabetically: {words}", "Put in ABC order: {words}", "{words}\nSorted:",
    )),
    TaskFamily("sentiment", _sentiment, (
        "{sentence} Is this positive or negative?", "Sentiment of '{sentence}' OPTIONS: positive, negative",
        "{sentence}\nHow does it feel? (positive/negative)",
    )),
    TaskFamily("repeat", _repeat, ("Repeat: {sentence}", "Copy this sentence: {sentence}", "Say again: {sentence}")),
    TaskFamily("count_people", _count_people, (
        "{passage}\nHow many people are named?", "Read: {passage} Count the people.", "{passage} Number of people:",
    )),
)

FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)


def render_example(
    family: TaskFamily, rng: random.Random, num_shots: int = 0, max_chars: int = 160
) -> dict[str, object]:
    """One instruction example of ``family``: ``num_shots`` exemplars then the query, same template.

    Falls back to fewer shots when the few-shot input would exceed ``max_chars``.
    """
    template_idx = rng.randrange(len(family.templates))
    query = family.sample(rng)
    text = family.render(query, template_idx)
    shots = 0
    for _ in range(num_shots):
        shot = family.sample(rng)
        candidate = f"{family.render(shot, template_idx)}\n{shot['answer']}\n\n{text}"
        if len(candidate) > max_chars:
            break
        text, shots = candidate, shots + 1
    return {"inputs": text, "targets": query["answer"], "task": family.name, "template_idx": template_idx, "shots": shots}


def instruction_mixture(
    num_examples: int = 20_000,
    seed: int = 0,
    few_shot_fraction: float = 0.3,
    max_shots: int = 2,
    max_chars: int = 160,
    families: tuple[str, ...] | None = None,
) -> Dataset:
    """The instruction-tuning mixture: columns ``inputs``, ``targets``, ``task``, ``template_idx``, ``shots``.

    Families are mixed uniformly; ``few_shot_fraction`` of the examples get 1..``max_shots`` exemplars.
    """
    chosen = FAMILIES if families is None else tuple(f for f in FAMILIES if f.name in families)
    unknown = set(families or ()) - set(FAMILY_NAMES)
    if unknown:
        raise ValueError(f"unknown instruction families {sorted(unknown)}; known: {list(FAMILY_NAMES)}")
    rng = random.Random(f"mixture-{seed}")
    rows = []
    for i in range(num_examples):
        family = chosen[i % len(chosen)]
        shots = rng.randint(1, max_shots) if rng.random() < few_shot_fraction else 0
        rows.append(render_example(family, rng, shots, max_chars))
    rng.shuffle(rows)
    return Dataset.from_list(rows)
