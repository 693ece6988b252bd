"""Needle in a haystack, in the manner of RULER (Hsieh et al., 2024): sentences "One of the
special magic numbers for KEY is: NNNNNNN." hidden at a chosen depth of a context of a chosen
length, then the question; the answer is read greedily and scored by exact match of its first run
of digits. Tasks:

- `single`: one needle in Shakespeare (RULER niah_single_2);
- `multikey`: the needle and `distractors` others with different keys (RULER niah_multikey_1);
- `passkey`: "The pass key is NNNNN. Remember it. NNNNN is the pass key." in repeated filler
  sentences (RULER's passkey).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ham_mlx.eval.haystack import NOISE, haystack_lines
from ham_mlx.eval.runner import Runner, greedy, progress_bar

TASKS = ("single", "multikey", "passkey")
WORDS = (
    "amber", "bright", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly",
    "keen", "lively", "misty", "noble", "odd", "plain", "quiet", "rapid", "silent", "tidy",
)  # fmt: skip
NOUNS = (
    "anchor", "bridge", "candle", "desk", "engine", "forest", "garden", "harbor", "island",
    "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pillow", "river", "saddle",
)  # fmt: skip
INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n"
)


def make_sample(
    task: str, length: int, depth: float, tokenizer, rng: np.random.Generator, distractors: int = 3,
    shortest: bool = False,
) -> tuple[str, str]:
    """(prompt text, the answer's digits): at most `length` tokens with BOS, the needle at
    `depth` of the lines. A length that cannot hold the task's own text is a ValueError, or,
    with shortest=True, gives the prompt with no filler."""
    if task not in TASKS:
        raise ValueError(f"niah task {task!r}: one of {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    if task == "passkey":
        value = str(rng.integers(10_000, 100_000))
        needle = f"The pass key is {value}. Remember it. {value} is the pass key."
        head, tail = PASSKEY_INTRO, "\nWhat is the pass key? The pass key is"
        others: list[str] = []
        filler = [NOISE] * 4096
    else:
        keys = _keys(rng, 1 + (distractors if task == "multikey" else 0))
        values = [str(v) for v in rng.integers(1_000_000, 10_000_000, len(keys))]
        key, value = keys[0], values[0]
        needle = f"One of the special magic numbers for {key} is: {value}."
        others = [f"One of the special magic numbers for {k} is: {v}." for k, v in
                  zip(keys[1:], values[1:])]  # fmt: skip
        head = INTRO
        asked = f"special magic number for {key} mentioned in the provided text"
        tail = f"\nWhat is the {asked}? The {asked} is"
        lines = haystack_lines()
        start = int(rng.integers(0, len(lines)))
        filler = [lines[(start + i) % len(lines)] for i in range(len(lines))]
    fixed = sum(_count(tokenizer, s) for s in [head, tail, needle, *others])
    budget, chosen = length - fixed, []
    for line in filler:  # whole lines while they fit
        budget -= _count(tokenizer, line) + 1  # and its newline
        if budget < 0:
            break
        chosen.append(line)
    where = rng.random(len(others))  # the other needles' depths

    def compose(filler: list[str]) -> str:
        body = list(filler)
        for other, at in zip(others, where):
            body.insert(int(at * (len(body) + 1)), other)
        body.insert(round(depth * len(body)), needle)
        return head + "\n".join(body) + tail

    prompt = compose(chosen)  # lines encode a little differently alone: drop any that overflow
    while chosen and len(tokenizer.encode(prompt, add_bos=True)) > length:
        chosen.pop()
        prompt = compose(chosen)
    least = len(tokenizer.encode(prompt, add_bos=True))
    if least > length and not shortest:
        raise ValueError(
            f"niah {task}: a context of {length} tokens cannot hold the task's own text "
            f"({least} tokens with no filler); use lengths of at least {least}"
        )
    return prompt, value


def needle_retrieval(
    runner: Runner,
    tokenizer,
    task: str = "single",
    lengths: tuple[int, ...] = (256, 512),
    depths: tuple[float, ...] = (0.0, 0.5, 1.0),
    samples: int = 4,
    seed: int = 0,
    chunk: int = 512,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy per context length and depth; every sample's record (prompt length, answer,
    generated text, KV fraction) in `samples`."""
    records = []
    bar = progress_bar(len(lengths) * len(depths) * samples, progress, f"niah {task}", "sample")
    for length in lengths:
        for depth in depths:
            for i in range(samples):
                rng = np.random.default_rng([seed, length, round(depth * 1000), i])
                prompt, value = make_sample(task, length, depth, tokenizer, rng)
                ids = tokenizer.encode(prompt, add_bos=True)
                cache = runner.make_cache(1, len(ids) + len(value) + 4)
                out = greedy(runner, ids, len(value) + 3, chunk, cache)
                text = tokenizer.decode(out)
                found = re.search(r"\d+", text)
                records.append({
                    "length": length, "depth": depth, "sample": i, "context_tokens": len(ids),
                    "answer": value, "generated": text,
                    "correct": found is not None and found.group() == value,
                    "kv_fraction": runner.kv_fraction(cache),
                })  # fmt: skip
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return {"task": task, "accuracy": accuracy_table(records), "samples": records}


def accuracy_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (length, depth) with its accuracy, then one per length (depth "all")."""
    rows = []
    lengths = sorted({r["length"] for r in records})
    for length in lengths:
        at = [r for r in records if r["length"] == length]
        for depth in sorted({r["depth"] for r in at}):
            hits = [r["correct"] for r in at if r["depth"] == depth]
            rows.append({"length": length, "depth": depth, "accuracy": float(np.mean(hits)),
                         "n": len(hits)})  # fmt: skip
        rows.append({"length": length, "depth": "all", "n": len(at),
                     "accuracy": float(np.mean([r["correct"] for r in at]))})  # fmt: skip
    return rows


def _keys(rng: np.random.Generator, n: int) -> list[str]:
    pairs = [f"{a}-{b}" for a in WORDS for b in NOUNS]
    return [pairs[i] for i in rng.choice(len(pairs), n, replace=False)]


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_bos=False))
