"""The small world: exact answers in several surface forms, disjoint splits, a standard tokenizer."""

from __future__ import annotations

import json
from collections import Counter

from cdlm.tokenizer import Tokenizer
from cdlm.training.world.tasks import (FAMILIES, MAKERS, MAX_VALUE, SPLITS, final_answer, generate,
                                  parse_answer, split_of)

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
       "/": lambda a, b: a // b if b and a % b == 0 else None}


def _check_chain(family: str, answer: str) -> int:
    """Parse every line into its form's fields and re-check it: each result exact and in range,
    each line's input the previous line's result; return the ending's value."""
    parsed = parse_answer(family, answer)
    assert parsed is not None, answer
    lines, ending = parsed
    assert len(lines) >= 3, answer               # several dependent steps
    prev = None
    for _, f in lines:
        a, n, r = int(f["a"]), int(f["n"]), int(f["r"])
        assert OPS[f["op"]](a, n) == r and 0 <= r <= MAX_VALUE, answer
        assert prev is None or a == prev, answer
        prev = r
    assert ending == prev == final_answer(answer), answer
    return ending


def test_answers_are_exact_in_every_surface_form():
    for family in FAMILIES:
        for p in generate(family, "train", 300, seed=1):
            assert _check_chain(family, p.answer) == p.result
            assert _check_chain(family, p.canonical) == p.result


def test_every_line_form_has_the_length_of_its_prompt_clause():
    """Equal lengths keep line i at one distance from prompt clause i (see the module doc)."""
    for family in FAMILIES:
        _, lines, _ = MAKERS[family]
        p = generate(family, "train", 1, seed=0)[0]
        clause = len(p.prompt.split(" . " if family == "math" else " ; ")[1].split()) + 1
        assert {len(f.template.split()) for f in lines} == {clause}, family


def test_the_data_samples_several_forms_by_weight():
    """The teacher's data is multi-modal: every form occurs, at about its weight, and the
    canonical answer is every line in the most frequent form."""
    for family in FAMILIES:
        _, lines, _ = MAKERS[family]
        counts: Counter = Counter()
        for p in generate(family, "train", 1000, seed=0):
            counts.update(form for form, _ in parse_answer(family, p.answer)[0])
            assert {form for form, _ in parse_answer(family, p.canonical)[0]} == {0}
        total = sum(counts.values())
        for i, form in enumerate(lines):
            assert abs(counts[i] / total - form.weight) < 0.05, (family, i, counts)


def test_parse_rejects_mixed_forms():
    good = "1 * 2 = 2 so Ben has 2 . Cal has 1 since 2 - 1 = 1 . #### 1"
    assert parse_answer("math", good) is not None
    # The first half of one form and the second half of another: no valid line.
    assert parse_answer("math", "1 * 2 = 2 so Ben has 2 . Cal has 1 since 2 - 1 which is 1 . "
                                "#### 1") is None
    assert parse_answer("code", "c = 1 * 2 = 2 -> c ; #### 2") is None


def test_splits_are_disjoint_and_deterministic():
    for family in FAMILIES:
        sets = {s: generate(family, s, 200 if s != "train" else 2000, seed=0) for s in SPLITS}
        prompts = {s: {p.prompt for p in ps} for s, ps in sets.items()}
        assert not prompts["train"] & prompts["test"]
        assert not prompts["train"] & prompts["val"]
        assert not prompts["val"] & prompts["test"]
        for s in ("val", "test"):
            assert all(split_of(p.prompt) == s for p in sets[s])
            assert len(prompts[s]) == len(sets[s])
        again = generate(family, "test", 200, seed=0)
        assert [(p.prompt, p.answer) for p in again] == [(p.prompt, p.answer) for p in sets["test"]]


def test_final_answer_parsing():
    assert final_answer("a = 3 ; #### 12") == 12
    assert final_answer("#### 4 #### 7") == 7
    assert final_answer("no answer") is None
    assert final_answer("#### x") is None


def test_tokenizer_files_and_chat_template(world_tokenizer_dir):
    config = json.loads((world_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["mask_token"] == "<|mdm_mask|>" and config["eos_token"] == "<|endoftext|>"
    assert config["pad_token"] == "<|pad|>"
    assert (world_tokenizer_dir / "special_tokens_map.json").exists()
    tok = Tokenizer.from_pretrained(world_tokenizer_dir)
    unk = tok.token_to_id("<|unk|>")
    for family in FAMILIES:
        for problem in generate(family, "train", 200, seed=3):
            # Every word of the world is in the vocabulary: encode/decode is lossless.
            assert tok.decode(tok.encode(problem.answer)) == problem.answer
            assert unk not in tok.encode(problem.prompt + " " + problem.answer)
    problem = generate("math", "test", 1, seed=0)[0]
    ids = tok.encode_chat([{"role": "user", "content": problem.prompt}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|startoftext|> <|start_header_id|> user <|end_header_id|>")
    assert text.endswith("<|eot_id|> <|start_header_id|> assistant <|end_header_id|>")
    assert tok.eot_token_id == tok.token_to_id("<|eot_id|>")
