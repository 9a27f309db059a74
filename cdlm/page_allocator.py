"""KV page allocator (no torch): the memory budget the scheduler admits requests against.

The pool holds `num_pages` pages of `page_size` token slots. A request reserves, on admission,
every page it can ever fill (its prompt plus every block of its generation window),
so a running request never waits for memory and nothing needs preempting.
"""

from __future__ import annotations

from collections import deque


class OutOfPagesError(RuntimeError):
    pass


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError("num_pages and page_size must be positive")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(num_pages))

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_pages

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int]:
        if not self.can_allocate(num_pages):
            raise OutOfPagesError(f"asked for {num_pages} pages, {len(self._free)} free")
        return [self._free.popleft() for _ in range(num_pages)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)
        if len(self._free) > self.num_pages:
            raise RuntimeError("a page was freed twice")
