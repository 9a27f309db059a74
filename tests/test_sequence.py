"""One request's diffusion state (cdlm/sequence.py): blocks, commits and stop rules, no torch."""

from __future__ import annotations

from cdlm.sampling_params import SamplingParams
from cdlm.sequence import Sequence

MASK, EOS = 99, 98


def make_sequence(seq_id: str, prompt_len: int = 5, max_tokens: int = 8, block: int = 4, **params) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=list(range(prompt_len)),
                    params=SamplingParams(max_tokens=max_tokens, **params), mode="cdlm",
                    block_size=block, mask_token_id=MASK, stop_token_ids=frozenset({EOS}),
                    threshold=0.9)


def test_block_completes_then_commits_in_the_next_pass():
    seq = make_sequence("a")
    assert seq.apply_step([0, 2], [10, 12]) == 2 and not seq.block_complete
    assert seq.num_cached == 5  # the prompt was committed by that first pass
    seq.apply_step([1, 3], [11, 13])
    assert seq.block_complete and seq.complete_block() is None
    assert seq.finished_tokens == [10, 11, 12, 13] and seq.block == [MASK] * 4
    assert seq.known_tokens[seq.num_cached:] == [10, 11, 12, 13]  # to commit next pass
    seq.apply_step([0], [20])
    assert seq.num_cached == 9 and seq.steps == 3 and seq.block_steps == 1


def test_early_stop_leaves_later_positions_undecoded():
    seq = make_sequence("a", max_tokens=16)
    seq.apply_step([1, 3], [EOS, 13])  # 3 comes after the end token: dropped
    assert seq.block == [MASK, EOS, MASK, MASK] and seq.block_limit == 2
    seq.apply_step([0], [10])
    assert seq.block_complete
    assert seq.complete_block() == "stop"
    assert seq.finished_tokens == [10, EOS]


def test_end_token_is_ignored_with_ignore_eos():
    seq = make_sequence("a", max_tokens=4, ignore_eos=True)
    seq.apply_step([0, 1, 2, 3], [EOS, 1, 2, 3])
    assert seq.complete_block() == "length" and seq.finished_tokens == [EOS, 1, 2, 3]


def test_max_tokens_mid_block():
    seq = make_sequence("a", max_tokens=6, block=4)
    seq.apply_step([0, 1, 2, 3], [1, 2, 3, 4])
    seq.complete_block()
    assert seq.block_limit == 2  # only 2 of the second block's 4 positions may be decoded
    seq.apply_step([0, 1, 3], [5, 6, 7])
    assert seq.complete_block() == "length" and seq.finished_tokens == [1, 2, 3, 4, 5, 6]


def test_cache_reservation_covers_prompt_and_every_block():
    assert make_sequence("a", prompt_len=5, max_tokens=9, block=4).cache_tokens_needed() == 5 + 3 * 4
