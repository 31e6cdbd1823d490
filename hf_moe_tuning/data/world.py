"""The embedded task world: a small seeded lexicon and the facts every generator draws from.

Everything the pretraining corpus, the instruction mixture and the held-out tasks talk about comes
from here, so knowledge learned in one stage (say, "the cow says moo" from the corpus) can transfer to
another (a multiple-choice question about animal sounds). The vocabulary is deliberately small and
the sentences short: the tiny models read bytes (``ByT5Tokenizer``), so a fact costs ~20 tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES: tuple[str, ...] = (
    "Ann", "Bob", "Cal", "Dan", "Eve", "Fay", "Gus", "Hal", "Ida", "Jon",
    "Kim", "Lea", "Max", "Ned", "Oda", "Pam", "Rex", "Sue", "Tom", "Uma",
)
OBJECTS: tuple[str, ...] = ("cup", "hat", "ball", "book", "box", "key", "pen", "bag", "kite", "sock", "lamp", "bike")
COLORS: tuple[str, ...] = ("red", "blue", "green", "black", "white", "pink", "gray", "brown")
PLACES: tuple[str, ...] = ("park", "shop", "farm", "lake", "school", "zoo", "beach", "bank")
FOODS: tuple[str, ...] = ("apple", "bread", "cake", "rice", "egg", "soup", "plum", "corn")
#: animal -> (sound, size)
ANIMALS: dict[str, tuple[str, str]] = {
    "cow": ("moo", "big"),
    "dog": ("woof", "big"),
    "cat": ("meow", "small"),
    "duck": ("quack", "small"),
    "owl": ("hoot", "small"),
    "pig": ("oink", "big"),
    "sheep": ("baa", "big"),
    "bee": ("buzz", "small"),
    "lion": ("roar", "big"),
    "frog": ("croak", "small"),
    "mouse": ("squeak", "small"),
    "horse": ("neigh", "big"),
}
#: things with a fixed colour (world knowledge)
THING_COLORS: dict[str, str] = {
    "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "milk": "white",
    "blood": "red", "mud": "brown", "leaf": "green", "sea": "blue", "ash": "gray",
}
OPPOSITES: dict[str, str] = {
    "big": "small", "hot": "cold", "up": "down", "fast": "slow", "old": "new",
    "happy": "sad", "day": "night", "wet": "dry", "open": "shut", "light": "dark",
}
OPPOSITES.update({v: k for k, v in list(OPPOSITES.items())})
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)
CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": tuple(ANIMALS),
    "color": COLORS,
    "object": OBJECTS,
    "place": PLACES,
    "food": FOODS,
}
LIKES: tuple[str, ...] = ("likes", "loves", "enjoys")
DISLIKES: tuple[str, ...] = ("hates", "dislikes", "fears")


def category_of(word: str) -> str:
    """The category (``animal``/``color``/``object``/``place``/``food``) of a lexicon word."""
    for category, words in CATEGORIES.items():
        if word in words:
            return category
    raise KeyError(f"{word!r} is not in the embedded lexicon")


def plural(noun: str) -> str:
    """English plural of a lexicon noun (the lexicon only needs these rules)."""
    if noun in ("sheep",):
        return noun
    if noun == "mouse":
        return "mice"
    if noun.endswith(("x", "s", "sh", "ch")):
        return noun + "es"
    return noun + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Scene:
    """A few people, what they hold (colour + object), where they are and which animal they own."""

    people: tuple[str, ...]
    holds: dict[str, tuple[str, str]]  # name -> (color, object)
    at: dict[str, str]  # name -> place
    pets: dict[str, str]  # name -> animal

    def fact_sentences(self, kinds: tuple[str, ...] = ("holds", "at")) -> list[str]:
        """One sentence per fact of the requested kinds, in people order."""
        out = []
        for name in self.people:
            if "holds" in kinds and name in self.holds:
                color, obj = self.holds[name]
                out.append(f"{name} has a {color} {obj}.")
            if "at" in kinds and name in self.at:
                out.append(f"{name} is at the {self.at[name]}.")
            if "pets" in kinds and name in self.pets:
                animal = self.pets[name]
                out.append(f"{name} owns {article(animal)} {animal}.")
        return out


def sample_scene(rng: random.Random, n_people: int = 2) -> Scene:
    """A random :class:`Scene` with distinct people, objects and places."""
    people = tuple(rng.sample(NAMES, n_people))
    objects = rng.sample(OBJECTS, n_people)
    places = rng.sample(PLACES, n_people)
    animals = rng.sample(list(ANIMALS), n_people)
    holds = {p: (rng.choice(COLORS), o) for p, o in zip(people, objects)}
    return Scene(
        people=people,
        holds=holds,
        at=dict(zip(people, places)),
        pets=dict(zip(people, animals)),
    )
