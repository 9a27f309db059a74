"""The packed layout of a step (torch-free): segments, kv ends, slots, Dream's previous token."""

from __future__ import annotations

import pytest

from cdlm.step_layout import pack_step, slot_of
from fakes import FakeSequence as Seq


B, PAGE = 4, 2


def test_admission_chunks_the_prompt_and_every_chunk_sees_the_whole_prompt():
    seq = Seq("a", list(range(100, 110)), pages=[7, 3, 9, 1, 4, 8, 2])
    layout = pack_step([seq], [5], B, PAGE)
    assert [(s.q_start, s.q_len, s.kv_end) for s in layout.segments] == [
        (0, 4, 10), (4, 4, 10), (8, 2, 10), (10, 4, 14)]
    assert layout.has_admission and not layout.has_commit
    assert layout.host_ids[:10] == list(range(100, 110)) and layout.host_ids[10:] == [-1] * 4
    assert layout.block_index[10:] == [5 * B + i for i in range(B)]
    assert layout.positions == list(range(14))
    assert layout.write_slots == [slot_of(seq.pages, PAGE, p) for p in range(14)]
    row = layout.rows[0]
    assert (row.block_start, row.block_q_start, row.prev_q_index, row.reset_block) == (10, 10, 9, True)


def test_commit_segment_then_block_and_a_plain_row():
    committing = Seq("c", [1, 2, 3], finished_tokens=[5, 6, 7, 8], num_cached=3,
                     pages=[0, 1, 2, 3, 4, 9], block_steps=0)
    plain = Seq("p", [1, 2], finished_tokens=[9] * 4, num_cached=6, pages=[5, 6, 7, 8, 10],
                block_steps=2, block_limit=3)
    layout = pack_step([committing, plain], [0, 1], B, PAGE)
    assert [(s.row, s.q_start, s.q_len, s.kv_end) for s in layout.segments] == [
        (0, 0, 4, 7), (0, 4, 4, 11), (1, 8, 4, 10)]
    assert layout.host_ids[:4] == [5, 6, 7, 8] and not layout.has_admission and layout.has_commit
    c, p = layout.rows
    assert (c.block_start, c.block_q_start, c.prev_q_index, c.reset_block) == (7, 4, 3, True)
    assert (p.block_start, p.block_q_start, p.prev_q_index, p.reset_block) == (6, 8, -1, False)
    assert p.block_limit == 3
    # a step without admissions is segments x block tokens
    assert layout.num_tokens == len(layout.segments) * B


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 5, 8, 13])
def test_segments_tile_the_pass_and_never_exceed_a_block(prompt_len):
    seq = Seq("s", list(range(prompt_len)), pages=list(range(20)))
    layout = pack_step([seq], [0], B, PAGE)
    covered = []
    for s in layout.segments:
        assert 1 <= s.q_len <= B
        covered.extend(range(s.q_start, s.q_start + s.q_len))
    assert covered == list(range(layout.num_tokens))


def test_layout_imports_no_torch():
    import subprocess
    import sys
    code = ("import sys, cdlm.step_layout, cdlm.scheduler, cdlm.page_allocator; "
            "sys.exit(int('torch' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
