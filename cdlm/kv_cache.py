"""The paged KV pool: per layer one tensor of token slots, addressed through page tables.

Pages `0 .. num_pages-1` belong to the page allocator (cdlm.page_allocator). A few scratch pages
after them belong to no request: padding tokens of a fixed-shape (graph-captured) step write
their K/V there and padding segments read from there, so padding never touches a request.
"""

from __future__ import annotations

import torch

from cdlm.config import ModelConfig


class KVCachePool:
    def __init__(self, config: ModelConfig, num_pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device, block_size: int = 32) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        # Enough scratch for one padding segment of a whole block.
        self.num_scratch_pages = max(1, -(-block_size // page_size))
        slots = (num_pages + self.num_scratch_pages) * page_size
        shape = (slots, config.num_kv_heads, config.head_dim)   # [slots, kv_heads, head_dim]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @property
    def scratch_pages(self) -> list[int]:
        return list(range(self.num_pages, self.num_pages + self.num_scratch_pages))

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element
