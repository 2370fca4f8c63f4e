"""Made-up documents for end-to-end tests: varied, deterministic text of a given size, so that no
test reads the project's own files and two tests' prompts share no prefix unless they mean to."""

from __future__ import annotations

import random

SUBJECTS = ("The harbour office", "A courier", "The night clerk", "Our surveyor", "The mill", "A ferry pilot")
VERBS = ("recorded", "delivered", "inspected", "repaired", "counted", "measured", "reported")
OBJECTS = ("seven crates of tin", "the north bridge", "a broken lantern", "twelve sacks of barley",
           "the tide tables", "a sealed letter", "the eastern dock")  # fmt: skip
WHEN = ("on Monday", "at dawn", "before the storm", "in the afternoon", "after the fair", "last winter")


def report(sentences: int, seed: int) -> str:
    """`sentences` sentences of a made-up harbour log (about 11 tokens each), numbered by paragraph."""
    rng = random.Random(seed)
    lines = []
    for i in range(sentences):
        line = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(WHEN)}."
        lines.append(line if i % 8 else f"\n\nEntry {i // 8 + 1}. {line}")
    return " ".join(lines).strip()
