"""Attention of a packed pass over the paged KV pool (see cdlm.step_layout for the layout).

Every layer first writes all of the pass's K/V into the pool, then each segment attends to its
request's logical positions `[0, kv_end)` through the page table. Two implementations of that
one operation:
- `torch`: plain torch, the reference the tests hold everything to, and the CPU path. Queries
  are grouped per request (its segments are contiguous) and requests of equal query length run
  in one scaled-dot-product call over their gathered keys; the gather indices and masks are
  built once per pass and shared by every layer.
- `triton`: one fused kernel (cdlm.kernels.paged_attention) that reads keys straight from the
  pages, with no mask tensor and no gathered copy. CUDA, or the Triton interpreter in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cdlm.step_layout import StepLayout

BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


@dataclass
class TorchGroup:
    """Requests of one pass with the same number of query tokens, padded to shared widths."""

    query_index: torch.Tensor  # [rows, q_len] packed token of each query
    key_slots: torch.Tensor    # [rows, k_len] pool slot of each key position (padding: scratch)
    bias: torch.Tensor         # [rows, 1, q_len, k_len] additive mask: 0 visible, -inf not


@dataclass
class SegmentTable:
    """The pass's segments for the fused kernel, on the device (int32)."""

    q_start: torch.Tensor      # [segments]
    q_len: torch.Tensor        # [segments]
    kv_end: torch.Tensor       # [segments]
    table_row: torch.Tensor    # [segments] row of `page_table` holding the request's pages
    page_table: torch.Tensor   # [requests, max_pages] int32
    max_q_len: int             # host-known bound (kernel tile size)


@dataclass
class PagedKV:
    """What one packed forward pass needs to read and write the pool."""

    pool_k: list[torch.Tensor]   # per layer [slots, kv_heads, head_dim]
    pool_v: list[torch.Tensor]
    write_slots: torch.Tensor    # [tokens] pool slot of each token's K/V
    page_size: int
    backend: str                 # "torch" or "triton"
    groups: list[TorchGroup] | None = None      # torch backend
    segments: SegmentTable | None = None        # triton backend

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int
               ) -> torch.Tensor:
        """q [tokens, heads, hd], k/v [tokens, kv_heads, hd] of this pass -> [tokens, heads, hd]."""
        pool_k, pool_v = self.pool_k[layer], self.pool_v[layer]
        pool_k.index_copy_(0, self.write_slots, k.to(pool_k.dtype))
        pool_v.index_copy_(0, self.write_slots, v.to(pool_v.dtype))
        if self.backend == "triton":
            from cdlm.kernels.paged_attention import paged_attention_triton
            assert self.segments is not None
            return paged_attention_triton(q, pool_k, pool_v, self.segments, self.page_size)
        assert self.groups is not None
        return paged_attention_torch(q, pool_k, pool_v, self.groups)


def paged_attention_torch(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
                          groups: list[TorchGroup]) -> torch.Tensor:
    """The reference op. q [tokens, heads, hd]; pools [slots, kv_heads, hd]."""
    out = torch.empty_like(q)
    flat_k = pool_k.view(pool_k.shape[0], -1)   # index_select on 2-D views: fast on CPU
    flat_v = pool_v.view(pool_v.shape[0], -1)
    kv_heads, head_dim = pool_k.shape[1:]
    for group in groups:
        rows, q_len = group.query_index.shape
        k_len = group.key_slots.shape[1]
        slots = group.key_slots.reshape(-1)
        keys = flat_k.index_select(0, slots).view(rows, k_len, kv_heads, head_dim)
        values = flat_v.index_select(0, slots).view(rows, k_len, kv_heads, head_dim)
        queries = q[group.query_index]                              # [rows, q_len, heads, hd]
        attended = F.scaled_dot_product_attention(
            queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=group.bias.to(q.dtype), enable_gqa=q.shape[1] != kv_heads)
        out[group.query_index.reshape(-1)] = attended.transpose(1, 2).reshape(-1, *q.shape[1:])
    return out


# --- building the metadata of one pass -------------------------------------------------------
def torch_groups(layout: StepLayout, page_table: torch.Tensor, page_size: int,
                 scratch_slot: int, dtype: torch.dtype) -> list[TorchGroup]:
    """Group the pass's requests by query count. `page_table` [state rows, max_pages] is the
    device-resident table, indexed by each row's state slot. Padding keys point at a scratch
    slot and are masked out; every query sees at least key 0, so no softmax row is empty."""
    device = page_table.device
    spans: list[tuple[int, list[int]]] = [(0, []) for _ in layout.rows]   # (q_start, kv_ends)
    for seg in layout.segments:
        q_start, kv_ends = spans[seg.row]
        spans[seg.row] = (q_start if kv_ends else seg.q_start, kv_ends + [seg.kv_end] * seg.q_len)
    by_len: dict[int, list[int]] = {}
    for row, (_, kv_ends) in enumerate(spans):
        by_len.setdefault(len(kv_ends), []).append(row)
    groups = []
    for q_len, rows in by_len.items():
        k_len = max(max(spans[r][1]) for r in rows)
        q_start = torch.tensor([spans[r][0] for r in rows], device=device)          # [g]
        kv_end = torch.tensor([spans[r][1] for r in rows], device=device)           # [g, q_len]
        tables = page_table[torch.tensor([layout.rows[r].state_slot for r in rows],
                                         device=device)].long()                     # [g, pages]
        key_pos = torch.arange(k_len, device=device)                                # [k_len]
        in_row = key_pos[None, :] < kv_end.max(dim=1).values[:, None]               # [g, k_len]
        page = tables.gather(1, (key_pos // page_size).clamp(max=tables.shape[1] - 1)
                             .expand(len(rows), -1))
        key_slots = torch.where(in_row, page * page_size + key_pos % page_size, scratch_slot)
        visible = key_pos[None, None, :] < kv_end[:, :, None]                       # [g, q, k]
        bias = torch.zeros(visible.shape, dtype=dtype, device=device)
        bias.masked_fill_(~visible, float("-inf"))
        query_index = q_start[:, None] + torch.arange(q_len, device=device)[None, :]
        groups.append(TorchGroup(query_index=query_index, key_slots=key_slots,
                                 bias=bias[:, None]))
    return groups


def segment_table(layout: StepLayout, page_table: torch.Tensor) -> SegmentTable:
    """Segments of the pass for the fused kernel; `page_table` is the device-resident table,
    indexed by each segment's state slot."""
    columns = [(s.q_start, s.q_len, s.kv_end, layout.rows[s.row].state_slot)
               for s in layout.segments]
    table = torch.tensor(columns, dtype=torch.int32).t().contiguous().to(page_table.device)
    return SegmentTable(q_start=table[0], q_len=table[1], kv_end=table[2], table_row=table[3],
                        page_table=page_table, max_q_len=max(s.q_len for s in layout.segments))
