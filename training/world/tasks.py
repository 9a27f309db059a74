"""Synthetic task families with exact answers: the small world the bundled model is trained on.

Both families are chains of dependent arithmetic steps written out as chain-of-thought, ending
with a GSM8K-style `#### N` line. The dependencies are the point: a token like the result of
step 3 can only be written confidently once step 2's result is on the page, so decoding several
tokens per step *without* distillation (the teacher cut to the student's step budget) commits
to unresolved results and loses accuracy, while a one-token-per-step teacher solves them.

Numbers are whole-word tokens in [0, MAX_VALUE]: arithmetic is then a fact lookup a model of a
few layers learns quickly on CPU, and the difficulty is the multi-step dependency, not digits.

Splits are disjoint by construction: every problem's canonical prompt text is hashed, and the
hash decides its split (about 1 in 8 go to test), so the same problem can never be in both.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator

MAX_VALUE = 30
FAMILIES: tuple[str, ...] = ("math", "code")

NAMES = ("Ann", "Ben", "Cal", "Dan", "Eva", "Fay", "Gus", "Hal", "Ivy", "Joe", "Kim", "Lea")
ITEMS = ("apples", "pens", "cards", "coins", "books", "shells", "stamps", "marbles")
VARIABLES = ("a", "b", "c", "d", "x", "y", "z")


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


# --- family (a): GSM8K-like word problems -----------------------------------------------------

def _math_relation(rng: random.Random, prev: int) -> tuple[str, str, int] | None:
    """One relation on the previous person's count: (prompt clause, CoT expression, value)."""
    kind = rng.choice(("more", "fewer", "twice", "half", "gives"))
    if kind == "more":
        n = rng.randint(1, 12)
        return f"has {n} more {{item}} than {{prev}}", f"{prev} + {n}", prev + n
    if kind == "fewer":
        n = rng.randint(1, 12)
        return f"has {n} fewer {{item}} than {{prev}}", f"{prev} - {n}", prev - n
    if kind == "twice":
        return "has twice as many {item} as {prev}", f"2 * {prev}", 2 * prev
    if kind == "half":
        if prev % 2:
            return None
        return "has half as many {item} as {prev}", f"{prev} / 2", prev // 2
    n = rng.randint(2, 12)  # "gives": a total over the previous person and a gift
    return f"has the {{item}} of {{prev}} and {n} more", f"{prev} + {n}", prev + n


def make_math(rng: random.Random, steps: int) -> Problem | None:
    names = rng.sample(NAMES, steps + 1)
    item = rng.choice(ITEMS)
    start = rng.randint(1, 20)
    clauses = [f"{names[0]} has {start} {item} ."]
    lines = []
    value = start
    for i in range(1, steps + 1):
        rel = _math_relation(rng, value)
        if rel is None:
            return None
        clause, expr, new = rel
        if not _in_range(new):
            return None
        clauses.append(f"{names[i]} " + clause.format(item=item, prev=names[i - 1]) + " .")
        lines.append(f"{names[i]} has {expr} = {new} .")
        value = new
    if rng.random() < 0.5:
        # A final sum of two earlier counts: an answer that depends on two computed values.
        j = rng.randrange(0, steps)
        total = value + _counts_at(clauses, lines, start, j)
        if not _in_range(total):
            return None
        question = f"How many {item} do {names[j]} and {names[steps]} have together ?"
        lines.append(f"Together {_counts_at(clauses, lines, start, j)} + {value} = {total} .")
        value = total
    else:
        question = f"How many {item} does {names[steps]} have ?"
    prompt = " ".join(clauses + [question])
    answer = " ".join(lines + [f"#### {value}"])
    return Problem("math", prompt, answer, value)


def _counts_at(clauses: list[str], lines: list[str], start: int, j: int) -> int:
    """The count of person j (0 = the given start) read back from the CoT lines."""
    if j == 0:
        return start
    return int(lines[j - 1].split("=")[1].split()[0])


# --- family (b): code-like program tracing ----------------------------------------------------

def _code_statement(rng: random.Random, env: dict[str, int]) -> tuple[str, str, int, str] | None:
    """One assignment over defined variables: (source, CoT with values substituted, value, target)."""
    target = rng.choice(VARIABLES[:4])
    names = list(env)
    op = rng.choice(("+", "-", "*"))
    left = rng.choice(names)
    if rng.random() < 0.5 and len(names) > 1:
        right_name = rng.choice([n for n in names if n != left])
        right_src, right_val = right_name, env[right_name]
    else:
        right_val = rng.randint(1, 9) if op != "*" else rng.randint(2, 3)
        right_src = str(right_val)
    lv = env[left]
    value = {"+": lv + right_val, "-": lv - right_val, "*": lv * right_val}[op]
    if not _in_range(value):
        return None
    return (f"{target} = {left} {op} {right_src} ;", f"{target} = {lv} {op} {right_val} = {value} ;",
            value, target)


def make_code(rng: random.Random, steps: int) -> Problem | None:
    env: dict[str, int] = {}
    first = rng.choice(VARIABLES[:4])
    env[first] = rng.randint(1, 15)
    src = [f"{first} = {env[first]} ;"]
    cot: list[str] = []
    target = first
    for _ in range(steps):
        stmt = _code_statement(rng, env)
        if stmt is None:
            return None
        s, c, value, target = stmt
        src.append(s)
        cot.append(c)
        env[target] = value
    prompt = "trace : " + " ".join(src) + f" print {target}"
    answer = " ".join(cot + [f"#### {env[target]}"])
    return Problem("code", prompt, answer, env[target])


MAKERS: dict[str, Callable[[random.Random, int], Problem | None]] = {
    "math": make_math, "code": make_code}


def generate(family: str, split: str, count: int, seed: int,
             min_steps: int = 3, max_steps: int = 4) -> list[Problem]:
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
    words |= set("has more fewer than twice half as many the of and How does do have together "
                 "Together trace print".split())
    return sorted(words)
