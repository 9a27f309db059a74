"""The KV page allocator (cdlm/page_allocator.py): the scheduler's memory budget, no torch."""

from __future__ import annotations

import pytest

from cdlm.page_allocator import OutOfPagesError, PageAllocator


def test_pages_for_rounds_up_to_whole_pages():
    pages = PageAllocator(num_pages=8, page_size=16)
    assert [pages.pages_for(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_allocate_and_free_track_usage():
    pages = PageAllocator(num_pages=4, page_size=4)
    first = pages.allocate(3)
    assert len(set(first)) == 3 and pages.num_free == 1 and pages.usage == 0.75
    assert not pages.can_allocate(2)
    with pytest.raises(OutOfPagesError):
        pages.allocate(2)
    pages.free(first)
    assert pages.num_free == 4 and pages.usage == 0.0


def test_a_page_freed_twice_is_an_error():
    pages = PageAllocator(num_pages=2, page_size=4)
    got = pages.allocate(1)
    pages.free(got)
    with pytest.raises(RuntimeError, match="twice"):
        pages.free(got)


def test_empty_pool_is_refused():
    with pytest.raises(ValueError):
        PageAllocator(num_pages=0, page_size=16)
