"""The continuous-batching scheduler holds no torch: tested with no model at all."""

from __future__ import annotations

import pytest

from cdlm.page_allocator import PageAllocator
from cdlm.scheduler import QueueFullError, Scheduler
from test_sequence import EOS, make_sequence as _seq


def test_module_imports_no_torch():
    import ast
    import pathlib
    import cdlm.page_allocator
    import cdlm.scheduler
    import cdlm.sequence
    for module in (cdlm.scheduler, cdlm.sequence, cdlm.page_allocator):
        tree = ast.parse(pathlib.Path(module.__file__).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                 for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(str(n).startswith("torch") for n in names)


def test_admission_waits_for_pages_and_requests_join_mid_flight():
    manager = PageAllocator(num_pages=4, page_size=4)     # 16 token slots
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
    sched = Scheduler(PageAllocator(64, 4), max_num_seqs=8, max_queue=8)
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
    sched = Scheduler(PageAllocator(8, 4), max_num_seqs=1, max_queue=2)
    sched.add(_seq("a"))
    sched.add(_seq("b"))
    with pytest.raises(QueueFullError):
        sched.add(_seq("c"))


def test_request_larger_than_the_whole_cache_is_rejected():
    sched = Scheduler(PageAllocator(2, 4), max_num_seqs=1, max_queue=2)
    with pytest.raises(ValueError, match="more than the whole cache"):
        sched.add(_seq("a", prompt_len=20))


def test_abort_frees_pages_at_once():
    manager = PageAllocator(8, 4)
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
    sched = Scheduler(PageAllocator(8, 4), max_num_seqs=2, max_queue=2)
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
