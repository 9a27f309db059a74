"""The small world: exact answers, disjoint deterministic splits, a standard tokenizer."""

from __future__ import annotations

import json
import re

from cdlm.tokenizer import Tokenizer
from training.world.tasks import FAMILIES, MAX_VALUE, final_answer, generate, split_of


def _check_cot(answer: str) -> int:
    """Re-evaluate every `a op b = c` in the chain of thought; return the final answer."""
    for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", answer):
        a, b, c = int(a), int(b), int(c)
        if op == "/":
            assert b and a % b == 0 and a // b == c, answer
        else:
            assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, answer
        assert 0 <= c <= MAX_VALUE
    return final_answer(answer)


def test_answers_are_exact_and_chains_have_several_steps():
    for family in FAMILIES:
        for p in generate(family, "train", 300, seed=1):
            assert _check_cot(p.answer) == p.result
            assert p.answer.count("=") >= 3, p.answer   # several dependent steps


def test_splits_are_disjoint_and_deterministic():
    for family in FAMILIES:
        train = generate(family, "train", 2000, seed=0)
        test = generate(family, "test", 200, seed=0)
        assert not {p.prompt for p in train} & {p.prompt for p in test}
        assert all(split_of(p.prompt) == "test" for p in test)
        assert [p.prompt for p in generate(family, "test", 200, seed=0)] == [p.prompt for p in test]
        assert len({p.prompt for p in test}) == len(test)


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
    problem = generate("math", "test", 1, seed=0)[0]
    # Every word of the world is in the vocabulary: encode/decode is lossless.
    assert tok.decode(tok.encode(problem.answer)) == problem.answer
    assert tok.token_to_id("<|unk|>") not in tok.encode(problem.prompt + " " + problem.answer)
    ids = tok.encode_chat([{"role": "user", "content": problem.prompt}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|startoftext|> <|start_header_id|> user <|end_header_id|>")
    assert text.endswith("<|eot_id|> <|start_header_id|> assistant <|end_header_id|>")
    assert tok.eot_token_id == tok.token_to_id("<|eot_id|>")
