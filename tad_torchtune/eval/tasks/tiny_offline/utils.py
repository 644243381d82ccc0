"""Deterministic generated data for the tiny_offline tasks (lm-eval ``custom_dataset`` functions)."""

from __future__ import annotations

import random


def arith_dataset(n_test: int = 24, seed: int = 0, **kwargs):
    """One-digit additions with four numeric choices; ``train`` holds the few-shot examples."""
    import datasets

    rng = random.Random(seed)

    def row():
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        wrong = rng.sample([x for x in range(19) if x != a + b], 3)
        choices = [str(x) for x in wrong + [a + b]]
        rng.shuffle(choices)
        return {"a": a, "b": b, "choices": choices, "label": choices.index(str(a + b))}

    train = [row() for _ in range(8)]
    test = [row() for _ in range(int(n_test))]
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)})


def text_dataset(**kwargs):
    """A few plain sentences for rolling perplexity."""
    import datasets

    texts = [
        "The cat sat on the mat and looked at the rain.",
        "Two plus three is five, and five plus five is ten.",
        "Knowledge distillation trains a small student to match a large teacher.",
        "The tail of the teacher's distribution carries information about similar tokens.",
        "On a quiet morning the river ran slowly past the old mill.",
        "Numbers: 1 2 3 4 5 6 7 8 9 10.",
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": t} for t in texts])})
