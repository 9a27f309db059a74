"""The continuous-batching scheduler holds no torch: tested with no model at all."""

from __future__ import annotations

import pytest

from cdlm.block_manager import BlockManager
from cdlm.sampling_params import SamplingParams
from cdlm.scheduler import QueueFullError, Scheduler, Sequence

MASK, EOS = 99, 98


def _seq(seq_id: str, prompt_len: int = 5, max_tokens: int = 8, block: int = 4, **params) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=list(range(prompt_len)),
                    params=SamplingParams(max_tokens=max_tokens, **params), mode="cdlm",
                    block_size=block, mask_token_id=MASK, stop_token_ids=frozenset({EOS}),
                    threshold=0.9)


def test_module_imports_no_torch():
    import ast
    import pathlib
    import cdlm.block_manager
    import cdlm.scheduler
    for module in (cdlm.scheduler, cdlm.block_manager):
        tree = ast.parse(pathlib.Path(module.__file__).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                 for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(str(n).startswith("torch") for n in names)


def test_block_completes_then_commits_in_the_next_pass():
    seq = _seq("a")
    assert seq.apply_step([0, 2], [10, 12]) == 2 and not seq.block_complete
    assert seq.num_cached == 5  # the prompt was committed by that first pass
    seq.apply_step([1, 3], [11, 13])
    assert seq.block_complete and seq.complete_block() is None
    assert seq.finished_tokens == [10, 11, 12, 13] and seq.block == [MASK] * 4
    assert seq.known_tokens[seq.num_cached:] == [10, 11, 12, 13]  # to commit next pass
    seq.apply_step([0], [20])
    assert seq.num_cached == 9 and seq.steps == 3 and seq.block_steps == 1


def test_early_stop_leaves_later_positions_undecoded():
    seq = _seq("a", max_tokens=16)
    seq.apply_step([1, 3], [EOS, 13])  # 3 comes after the end token: dropped
    assert seq.block == [MASK, EOS, MASK, MASK] and seq.block_limit == 2
    seq.apply_step([0], [10])
    assert seq.block_complete
    assert seq.complete_block() == "stop"
    assert seq.finished_tokens == [10, EOS]


def test_end_token_is_ignored_with_ignore_eos():
    seq = _seq("a", max_tokens=4, ignore_eos=True)
    seq.apply_step([0, 1, 2, 3], [EOS, 1, 2, 3])
    assert seq.complete_block() == "length" and seq.finished_tokens == [EOS, 1, 2, 3]


def test_max_tokens_mid_block():
    seq = _seq("a", max_tokens=6, block=4)
    seq.apply_step([0, 1, 2, 3], [1, 2, 3, 4])
    seq.complete_block()
    assert seq.block_limit == 2  # only 2 of the second block's 4 positions may be decoded
    seq.apply_step([0, 1, 3], [5, 6, 7])
    assert seq.complete_block() == "length" and seq.finished_tokens == [1, 2, 3, 4, 5, 6]


def test_cache_reservation_covers_prompt_and_every_block():
    assert _seq("a", prompt_len=5, max_tokens=9, block=4).cache_tokens_needed() == 5 + 3 * 4


def test_admission_waits_for_pages_and_requests_join_mid_flight():
    manager = BlockManager(num_pages=4, page_size=4)     # 16 token slots
    sched = Scheduler(manager, max_num_seqs=8, max_queue=8)
    a, b = _seq("a", prompt_len=5, max_tokens=8), _seq("b", prompt_len=5, max_tokens=8)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.admitted == [a] and sched.num_waiting == 1   # a holds all 4 pages, b needs 4
    sched.update([a], [([0, 1, 2, 3], [1, 2, 3, 4])])
    sched.update([a], [([0, 1, 2, 3], [1, 2, 3, EOS])])       # a finishes, frees its pages
    assert a.is_finished and a.finish_reason == "stop" and manager.num_free == 4
    assert sched.schedule().admitted == [b]


def test_running_requests_progress_independently():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_queue=8)
    a, b = _seq("a", max_tokens=8), _seq("b", max_tokens=8)
    sched.add(a)
    sched.schedule()
    sched.update([a], [([0, 1, 2, 3], [1, 2, 3, 4])])        # a completes its first block
    sched.add(b)                                              # b joins while a is mid-request
    seqs = sched.schedule().seqs
    assert seqs == [a, b] and a.num_blocks == 1 and b.num_blocks == 0
    update = sched.update(seqs, [([0], [5]), ([0, 1, 2, 3], [9, 9, 9, 9])])
    assert [s for s, _ in update.blocks_completed] == [b]
    assert update.tokens_finalized == [1, 4]


def test_queue_bound_raises_queue_full():
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=1, max_queue=2)
    sched.add(_seq("a"))
    sched.add(_seq("b"))
    with pytest.raises(QueueFullError):
        sched.add(_seq("c"))


def test_request_larger_than_the_whole_cache_is_rejected():
    sched = Scheduler(BlockManager(2, 4), max_num_seqs=1, max_queue=2)
    with pytest.raises(ValueError, match="more than the whole cache"):
        sched.add(_seq("a", prompt_len=20))


def test_abort_frees_pages_at_once():
    manager = BlockManager(8, 4)
    sched = Scheduler(manager, max_num_seqs=4, max_queue=4)
    sched.add(_seq("a"))
    sched.schedule()
    assert manager.num_free < 8
    assert sched.abort("a").finish_reason == "abort"
    assert manager.num_free == 8 and not sched.has_unfinished()
    assert sched.abort("a") is None


def test_a_block_cut_by_a_stop_string_counts_as_a_block():
    """A stop string found mid-block ends the request there; that block is reported among its
    blocks (usage.num_blocks was 0 when the stop string ended the first block)."""
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=2, max_queue=2)
    first, later = _seq("first"), _seq("later")
    sched.add(first)
    sched.add(later)
    seqs = sched.schedule().seqs
    sched.update(seqs, [([0, 1], [10, 11]), ([0, 1, 2, 3], [20, 21, 22, 23])])
    sched.finish(first, "stop", output_len=1)      # stop string inside the first block
    assert first.output_token_ids == [10] and first.num_blocks == 1
    sched.update([later], [([0], [24])])
    sched.finish(later, "stop", output_len=5)      # one full block, then the cut one
    assert later.output_token_ids == [20, 21, 22, 23, 24] and later.num_blocks == 2
