"""Synthetic task families with exact answers: the small world the bundled model is trained on.

Both families are chains of dependent arithmetic steps written out as chain-of-thought, ending
with a GSM8K-style `#### N` line. The dependencies are the point: a token like the result of
step 3 can only be written confidently once step 2's result is on the page, so decoding several
tokens per step *without* distillation (the teacher cut to the student's step budget) commits
to unresolved results and loses accuracy, while a one-token-per-step teacher solves them.

Numbers are whole-word tokens in [0, MAX_VALUE]: arithmetic is then a lookup in a table of a
few hundred facts that a model of a few layers learns on CPU in minutes, and the difficulty is
the multi-step dependency, not digits. (Measured: with values up to 30, about a thousand facts,
the 0.9M-parameter teacher still computed only about half of the results right after 1500
steps, so every four-step chain failed; 12 keeps the table small.)

Splits are disjoint by construction: every problem's canonical prompt text is hashed, and the
hash decides its split (about 1 in 8 go to test), so the same problem can never be in both.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator

MAX_VALUE = 12
FAMILIES: tuple[str, ...] = ("math", "code")

NAMES = ("Ann", "Ben", "Cal", "Dan", "Eva", "Fay", "Gus", "Hal", "Ivy", "Joe", "Kim", "Lea")
ITEMS = ("apples", "pens", "cards", "coins", "books", "shells", "stamps", "marbles")
VARIABLES = ("a", "b", "c", "d", "e", "x", "y", "z")


@dataclass(frozen=True)
class Problem:
    family: str
    prompt: str      # the user message (no chat template)
    answer: str      # the chain-of-thought, ending with "#### N"
    result: int      # the exact final answer

    def to_json(self) -> dict:
        return {"family": self.family, "prompt": self.prompt, "answer": self.answer,
                "result": self.result}


def final_answer(text: str) -> int | None:
    """The integer after the last `####` in a generated answer, or None when there is none."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].split()
    if not tail:
        return None
    try:
        return int(tail[0])
    except ValueError:
        return None


def split_of(prompt: str, test_fraction_den: int = 8) -> str:
    """'test' or 'train', decided by a hash of the prompt so that splits never overlap."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return "test" if digest[0] % test_fraction_den == 0 else "train"


def _in_range(v: int) -> bool:
    return 0 <= v <= MAX_VALUE


# --- layout ----------------------------------------------------------------------------------
# Every prompt clause and every chain-of-thought line of a family has one fixed length, and a
# problem has a fixed number of steps, so the token that line i must copy (a name, an operand,
# the previous result) always sits at the same relative distance. A model of a few layers with
# rotary positions learns such copies in a few hundred steps; what remains hard, and what the
# step budget tests, is the chain: line i's result depends on line i-1's.
STEPS = 4


# --- family (a): GSM8K-like word problems -----------------------------------------------------
# Clause (8 tokens):  "Then Cal has 3 more books than Ann ."  /  "Then Cal has twice the books of Ann ."
# Line (8 tokens):    "Cal has 15 + 3 = 18 ."                 /  "Cal has 9 * 2 = 18 ."

def _math_relation(rng: random.Random, prev: int) -> tuple[str, str, int] | None:
    """One relation on the previous person's count: (clause template, CoT expression, value)."""
    kind = rng.choice(("more", "fewer", "twice", "half"))
    if kind == "more":
        n = rng.randint(1, 6)
        return f"has {n} more {{item}} than {{prev}}", f"{prev} + {n}", prev + n
    if kind == "fewer":
        n = rng.randint(1, 6)
        return f"has {n} fewer {{item}} than {{prev}}", f"{prev} - {n}", prev - n
    if kind == "twice":
        return "has twice the {item} of {prev}", f"{prev} * 2", 2 * prev
    if prev % 2:
        return None
    return "has half the {item} of {prev}", f"{prev} / 2", prev // 2


def make_math(rng: random.Random, steps: int = STEPS) -> Problem | None:
    names = rng.sample(NAMES, steps + 1)
    item = rng.choice(ITEMS)
    start = rng.randint(1, 12)
    clauses = [f"{names[0]} has {start} {item} at the start ."]
    lines = []
    value = start
    for i in range(1, steps + 1):
        rel = _math_relation(rng, value)
        if rel is None:
            return None
        clause, expr, new = rel
        if not _in_range(new):
            return None
        clauses.append(f"Then {names[i]} " + clause.format(item=item, prev=names[i - 1]) + " .")
        lines.append(f"{names[i]} has {expr} = {new} .")
        value = new
    question = f"How many {item} does {names[steps]} have ?"
    prompt = " ".join(clauses + [question])
    answer = " ".join(lines + [f"#### {value}"])
    return Problem("math", prompt, answer, value)


# --- family (b): code-like program tracing ----------------------------------------------------
# Statement (6 tokens): "c = b * 2 ;"      Line (6 tokens): "7 * 2 = 14 ;"
# Each statement reads the variable the previous one wrote, so line i's left operand is line
# i-1's result; the right operand is a literal of the statement.

def make_code(rng: random.Random, steps: int = STEPS) -> Problem | None:
    names = rng.sample(VARIABLES, steps + 1)
    value = rng.randint(1, 12)
    src = [f"{names[0]} = {value} ;"]
    cot: list[str] = []
    for i in range(1, steps + 1):
        op = rng.choice(("+", "-", "*"))
        n = rng.randint(2, 3) if op == "*" else rng.randint(1, 6)
        new = {"+": value + n, "-": value - n, "*": value * n}[op]
        if not _in_range(new):
            return None
        src.append(f"{names[i]} = {names[i - 1]} {op} {n} ;")
        cot.append(f"{value} {op} {n} = {new} ;")
        value = new
    prompt = "trace : " + " ".join(src) + f" print {names[steps]}"
    answer = " ".join(cot + [f"#### {value}"])
    return Problem("code", prompt, answer, value)


MAKERS: dict[str, Callable[[random.Random, int], Problem | None]] = {
    "math": make_math, "code": make_code}


def generate(family: str, split: str, count: int, seed: int,
             min_steps: int = STEPS, max_steps: int = STEPS) -> list[Problem]:
    """`count` distinct problems of `family` that fall in `split`, deterministic in `seed`."""
    maker = MAKERS[family]
    rng = random.Random(f"{family}:{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    for problem in _stream(maker, rng, min_steps, max_steps):
        if problem.prompt in seen or split_of(problem.prompt) != split:
            continue
        seen.add(problem.prompt)
        out.append(problem)
        if len(out) == count:
            return out
    raise AssertionError("unreachable: the stream is infinite")


def _stream(maker: Callable[[random.Random, int], Problem | None], rng: random.Random,
            min_steps: int, max_steps: int) -> Iterator[Problem]:
    while True:
        problem = maker(rng, rng.randint(min_steps, max_steps))
        if problem is not None:
            yield problem


def vocabulary() -> list[str]:
    """Every word the world can produce (numbers included): the tokenizer's regular vocabulary."""
    words = set(NAMES) | set(ITEMS) | set(VARIABLES)
    words |= {str(i) for i in range(0, 2 * MAX_VALUE + 1)}
    words |= {".", ",", "?", ";", "=", "+", "-", "*", "/", "####", ":"}
    words |= set("has more fewer than twice half the of at start Then How many does have "
                 "trace print".split())
    return sorted(words)
