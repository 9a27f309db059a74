"""Synthetic task families with exact answers: the small world the bundled model is trained on.

Both families are chains of dependent arithmetic steps written out as chain-of-thought, ending
with a GSM8K-style `#### N` line. Two properties make the world a test of CDLM:

1. **Dependencies.** Step i uses step i-1's result, so a token like the result of step 3 can
   only be written confidently once step 2's is known: decoding several tokens per step without
   distillation (the teacher cut to the student's step budget) commits to unresolved results.
2. **Several valid surface forms per step.** Every chain-of-thought line can be written in
   several ways (math: the two clauses "X has r" and "a op n = r" in either order, or a
   rephrasing; code: the assignment or the expression first), and the final line with or
   without optional words; the teacher's training data samples them (`Surface.weight`: the
   most frequent form is 50-60% of the data). So the
   teacher's distribution over a masked line is genuinely multi-modal: before a line's form is
   chosen no form-specific token reaches a confidence of 0.9, and the training-free threshold
   rule finalises about one choice per step; finalising tokens of different forms in one step
   (the k-tokens-per-step budget) writes incoherent lines. A form, once chosen, fixes every
   other token of its line: a choice is carried by many tokens, which is what lets a distilled
   student commit to the teacher's choice and finalise a whole line at once.

Every form of a family's line has the same number of tokens as the prompt clause it works on,
so line i starts at the same distance from prompt clause i whatever the forms before it and
whatever i: a model of four layers learns the copies (a name, an operand, the previous result)
at fixed relative distances. (Measured: with 11-token lines over 8-token clauses, a distance
that grows by 3 per line, the 0.9M-parameter teacher still copied the wrong names after 1200
steps, 23% / 14% accuracy; the previous world, one form and equal lengths, learned the copies in
a few hundred steps.)

Numbers are whole-word tokens in [0, MAX_VALUE]: arithmetic is then a lookup in a table of a
few hundred facts that a model of a few layers learns on CPU in minutes, and the difficulty is
the multi-step dependency, not digits. (Measured: with values up to 30, about a thousand facts,
the 0.9M-parameter teacher still computed only about half of the results right after 1500
steps, so every four-step chain failed; 12 keeps the table small.)

Splits are disjoint by construction: every problem's prompt text is hashed, and the hash
decides its split (1 in 8 to test, 1 in 8 to validation, the rest to train), so the same
problem can never be in two splits. Choices (threshold, recipe) are made on validation.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterator

MAX_VALUE = 12
FAMILIES: tuple[str, ...] = ("math", "code")
SPLITS: tuple[str, ...] = ("train", "val", "test")

NAMES = ("Ann", "Ben", "Cal", "Dan", "Eva", "Fay", "Gus", "Hal", "Ivy", "Joe", "Kim", "Lea")
ITEMS = ("apples", "pens", "cards", "coins", "books", "shells", "stamps", "marbles")
VARIABLES = ("a", "b", "c", "d", "e", "x", "y", "z")


@dataclass(frozen=True)
class Surface:
    """One way to write a line: a template over the step's fields and its share of the data."""
    template: str
    weight: float


# Fields: who (the name or variable the step defines), a (previous result), op, n, r (result).
# Every line form of a family has the length of the family's prompt clause (10 tokens for math,
# 8 for code): see "layout" below. Every form of a family also writes the result at the same
# offset (8 for math, 6 for code), where the next line copies it from. (Measured: with code
# forms that put it at offsets 6, 4 and 2, the teacher reached 83% on code after 4000 steps, its
# errors results off by a few, against 97% on math.) Forms differ at most other offsets, so a
# choice is carried by many tokens.
MATH_LINES: tuple[Surface, ...] = (
    Surface("{a} {op} {n} = {r} so {who} has {r} .", 0.5),
    Surface("{who} has {r} since {a} {op} {n} = {r} .", 0.3),
    Surface("so {who} has {a} {op} {n} which is {r} .", 0.2),
)
MATH_ENDINGS: tuple[Surface, ...] = (
    Surface("#### {r}", 0.6),
    Surface("the answer is {r} . #### {r}", 0.4),
)
CODE_LINES: tuple[Surface, ...] = (
    Surface("{who} = {a} {op} {n} = {r} ;", 0.6),
    Surface("{a} {op} {n} -> {who} = {r} ;", 0.4),
)
CODE_ENDINGS: tuple[Surface, ...] = (
    Surface("#### {r}", 0.6),
    Surface("return {r} ; #### {r}", 0.4),
)


@dataclass(frozen=True)
class Step:
    who: str   # the name / variable this step defines
    a: int     # its input: the previous step's result
    op: str    # + - * /
    n: int     # the literal operand
    r: int     # the exact result


@dataclass(frozen=True)
class Problem:
    family: str
    prompt: str      # the user message (no chat template)
    answer: str      # a chain-of-thought in sampled surface forms, ending with "#### N"
    canonical: str   # the same chain, every line in its family's most frequent form
    result: int      # the exact final answer

    def to_json(self) -> dict:
        return {"family": self.family, "prompt": self.prompt, "answer": self.answer,
                "canonical": self.canonical, "result": self.result}


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
    """'test', 'val' or 'train', decided by a hash of the prompt so that splits never overlap."""
    bucket = hashlib.sha256(prompt.encode()).digest()[0] % test_fraction_den
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def _in_range(v: int) -> bool:
    return 0 <= v <= MAX_VALUE


def _pick(rng: random.Random, forms: tuple[Surface, ...]) -> Surface:
    return rng.choices(forms, weights=[f.weight for f in forms])[0]


def most_frequent(forms: tuple[Surface, ...]) -> Surface:
    return max(forms, key=lambda f: f.weight)


def render(steps: list[Step], lines: tuple[Surface, ...], endings: tuple[Surface, ...],
           rng: random.Random | None) -> str:
    """The chain-of-thought: each line and the ending sampled by weight (rng), or each in its
    most frequent form (rng None: the canonical answer)."""
    choose = (lambda forms: _pick(rng, forms)) if rng is not None else most_frequent
    out = [choose(lines).template.format(**vars(s)) for s in steps]
    out.append(choose(endings).template.format(r=steps[-1].r))
    return " ".join(out)


# --- layout ----------------------------------------------------------------------------------
# Every prompt clause of a family has the length of every line form, so the prompt clause that
# line i copies from sits at one fixed distance from line i for every i.
STEPS = 4


# --- family (a): GSM8K-like word problems -----------------------------------------------------
# Clause (10 tokens): "Then Cal has 3 more books than Ann does ."
#                     "Then Cal has twice the books that Ann has ."
# Lines (10 tokens):  "5 + 3 = 8 so Cal has 8 ." / "Cal has 8 since 5 + 3 = 8 ." / ...

def _math_relation(rng: random.Random, prev: int) -> tuple[str, str, int, int] | None:
    """One relation on the previous person's count: (clause template, op, operand, value)."""
    kind = rng.choice(("more", "fewer", "twice", "half"))
    if kind == "more":
        n = rng.randint(1, 6)
        return f"has {n} more {{item}} than {{prev}} does", "+", n, prev + n
    if kind == "fewer":
        n = rng.randint(1, 6)
        return f"has {n} fewer {{item}} than {{prev}} does", "-", n, prev - n
    if kind == "twice":
        return "has twice the {item} that {prev} has", "*", 2, 2 * prev
    if prev % 2:
        return None
    return "has half the {item} that {prev} has", "/", 2, prev // 2


def make_math(rng: random.Random, steps: int = STEPS) -> tuple[str, list[Step]] | None:
    names = rng.sample(NAMES, steps + 1)
    item = rng.choice(ITEMS)
    start = rng.randint(1, 12)
    clauses = [f"{names[0]} has {start} {item} at the start ."]
    chain: list[Step] = []
    value = start
    for i in range(1, steps + 1):
        rel = _math_relation(rng, value)
        if rel is None:
            return None
        clause, op, n, new = rel
        if not _in_range(new):
            return None
        clauses.append(f"Then {names[i]} " + clause.format(item=item, prev=names[i - 1]) + " .")
        chain.append(Step(names[i], value, op, n, new))
        value = new
    question = f"How many {item} does {names[steps]} have ?"
    return " ".join(clauses + [question]), chain


# --- family (b): code-like program tracing ----------------------------------------------------
# Statement (8 tokens): "c = ( b * 2 ) ;"   Lines (8 tokens): "c = 7 * 2 = 14 ;" / "7 * 2 -> c = 14 ;"
# Each statement reads the variable the previous one wrote, so line i's left operand is line
# i-1's result; the right operand is a literal of the statement.

def make_code(rng: random.Random, steps: int = STEPS) -> tuple[str, list[Step]] | None:
    names = rng.sample(VARIABLES, steps + 1)
    value = rng.randint(1, 12)
    src = [f"{names[0]} = {value} ;"]
    chain: list[Step] = []
    for i in range(1, steps + 1):
        op = rng.choice(("+", "-", "*"))
        n = rng.randint(2, 3) if op == "*" else rng.randint(1, 6)
        new = {"+": value + n, "-": value - n, "*": value * n}[op]
        if not _in_range(new):
            return None
        src.append(f"{names[i]} = ( {names[i - 1]} {op} {n} ) ;")
        chain.append(Step(names[i], value, op, n, new))
        value = new
    return "trace : " + " ".join(src) + f" print {names[steps]}", chain


Maker = Callable[[random.Random, int], "tuple[str, list[Step]] | None"]
MAKERS: dict[str, tuple[Maker, tuple[Surface, ...], tuple[Surface, ...]]] = {
    "math": (make_math, MATH_LINES, MATH_ENDINGS),
    "code": (make_code, CODE_LINES, CODE_ENDINGS),
}


def generate(family: str, split: str, count: int, seed: int,
             min_steps: int = STEPS, max_steps: int = STEPS) -> list[Problem]:
    """`count` distinct problems of `family` that fall in `split`, deterministic in `seed`.
    Each problem's `answer` samples its surface forms from the same seeded stream."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    maker, lines, endings = MAKERS[family]
    rng = random.Random(f"{family}:{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    for prompt, chain in _stream(maker, rng, min_steps, max_steps):
        answer = render(chain, lines, endings, rng)   # drawn for every problem: stable stream
        if prompt in seen or split_of(prompt) != split:
            continue
        seen.add(prompt)
        out.append(Problem(family, prompt, answer, render(chain, lines, endings, None),
                           chain[-1].r))
        if len(out) == count:
            return out
    raise AssertionError("unreachable: the stream is infinite")


def _stream(maker: Maker, rng: random.Random, min_steps: int, max_steps: int
            ) -> Iterator[tuple[str, list[Step]]]:
    while True:
        made = maker(rng, rng.randint(min_steps, max_steps))
        if made is not None:
            yield made


def _line_pattern(template: str) -> re.Pattern:
    """A template as a regex; a field written twice must hold the same text both times."""
    seen: set[str] = set()

    def field(m: re.Match) -> str:
        name = m.group(1)
        if name in seen:
            return f"(?P={name})"
        seen.add(name)
        return f"(?P<{name}>[^ ]+)"
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("".join(field(re.match(r"\{(\w+)\}", p)) if p.startswith("{")
                              else re.escape(p) for p in parts if p))


def parse_answer(family: str, text: str) -> tuple[list[tuple[int, dict]], int | None] | None:
    """Split a chain-of-thought into lines of the family's forms: ([(form index, fields)], the
    ending's value), or None when some part is written in no valid form (e.g. tokens of two
    forms mixed in one line)."""
    _, lines, endings = MAKERS[family]
    patterns = [_line_pattern(f.template) for f in lines]
    ends = [_line_pattern(f.template) for f in endings]
    words, out = text.split(), []
    width = len(lines[0].template.split())
    while len(words) >= width:
        chunk = " ".join(words[:width])
        hit = next(((i, m) for i, m in enumerate(p.fullmatch(chunk) for p in patterns) if m),
                   None)
        if hit is None:
            break
        out.append((hit[0], hit[1].groupdict()))
        words = words[width:]
    rest = " ".join(words)
    end = next((m for m in (p.fullmatch(rest) for p in ends) if m), None)
    if end is None:
        return None
    return out, int(end.group("r")) if end.group("r").isdigit() else None


def vocabulary() -> list[str]:
    """Every word the world can produce (numbers included): the tokenizer's regular vocabulary."""
    words = set(NAMES) | set(ITEMS) | set(VARIABLES)
    words |= {str(i) for i in range(0, 2 * MAX_VALUE + 1)}
    words |= {".", ",", "?", ";", "=", "+", "-", "*", "/", "####", ":", "->", "(", ")"}
    words |= set("has more fewer than twice half the of at start Then How many does have "
                 "trace print so since which is answer return does that".split())
    return sorted(words)
