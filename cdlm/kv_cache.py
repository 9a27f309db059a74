"""The paged KV pool: per layer one tensor of token slots, addressed through page tables."""

from __future__ import annotations

import torch

from cdlm.config import ModelConfig


class KVCachePool:
    def __init__(self, config: ModelConfig, num_pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        slots = num_pages * page_size
        shape = (slots, config.num_kv_heads, config.head_dim)   # [slots, kv_heads, head_dim]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element

    def slots(self, page_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pool slot of each position. page_table [batch, pages], positions [batch, n] -> [batch, n]."""
        page = torch.div(positions, self.page_size, rounding_mode="floor")
        return page_table.gather(1, page) * self.page_size + positions % self.page_size
