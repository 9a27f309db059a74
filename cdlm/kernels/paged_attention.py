"""Paged block-causal attention as one Triton kernel.

One program per (segment, query head): it loads the segment's queries (at most one decoding
block) for that head, then streams the request's keys and values straight out of the paged pool,
positions `[0, kv_end)`, `BLOCK_KV` at a time, translating each position to its pool slot through
the page table, with an online softmax in fp32. No mask tensor, no gathered copy of the prefix;
grouped-query heads read their shared K/V head. The loop bound comes from device memory, so the
same launch is valid inside a captured CUDA graph whatever the requests' lengths.

Why Triton rather than FlexAttention or flashinfer: the rule "segment attends to its request's
`[0, kv_end)` through the page table" maps onto a flash-decoding loop directly, with the segment
table as the only metadata (FlexAttention would need a block mask over the whole pool rebuilt
every step, and a recompile whenever the packed length changes); flashinfer is not installable
or testable on the CPU machines, while this kernel runs under the Triton interpreter on CPU in
the tests (TRITON_INTERPRET=1) against the plain-torch op in cdlm.paged_attention.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from cdlm.paged_attention import SegmentTable


@triton.jit
def _paged_block_attention(
    q_ptr, k_ptr, v_ptr, out_ptr,
    seg_q_start, seg_q_len, seg_kv_end, seg_table_row, page_table_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_table,
    sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, PRECISION: tl.constexpr,
):
    seg = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    q_start = tl.load(seg_q_start + seg)
    q_len = tl.load(seg_q_len + seg)
    kv_end = tl.load(seg_kv_end + seg)
    table_row = tl.load(seg_table_row + seg).to(tl.int64)

    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + offs_q).to(tl.int64)
    q_valid = offs_q < q_len
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=q_valid[:, None], other=0.0)                       # [BLOCK_Q, HEAD_DIM]

    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634                            # exp via exp2
    for kv_start in range(0, kv_end, BLOCK_KV):
        pos = kv_start + tl.arange(0, BLOCK_KV)
        kv_valid = pos < kv_end
        page = tl.load(page_table_ptr + table_row * stride_table + pos // PAGE_SIZE,
                       mask=kv_valid, other=0).to(tl.int64)
        slot = page * PAGE_SIZE + pos % PAGE_SIZE                        # [BLOCK_KV]
        k = tl.load(k_ptr + slot[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=kv_valid[:, None], other=0.0)                  # [BLOCK_KV, HEAD_DIM]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale                      # [BLOCK_Q, BLOCK_KV]
        scores = tl.where(kv_valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + slot[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=kv_valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_valid[:, None])


def supports(head_dim: int) -> bool:
    """Shapes the kernel handles: a power-of-two head size of at least 16 (tensor-core tiles)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def paged_attention_triton(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
                           segments: SegmentTable, page_size: int) -> torch.Tensor:
    """q [tokens, heads, hd]; pools [slots, kv_heads, hd] -> [tokens, heads, hd]."""
    tokens, heads, head_dim = q.shape
    kv_heads = pool_k.shape[1]
    out = torch.empty_like(q)
    if tokens == 0:
        return out
    block_q = max(16, triton.next_power_of_2(segments.max_q_len))
    num_segments = segments.q_start.shape[0]
    table = segments.page_table
    _paged_block_attention[(num_segments, heads)](
        q, pool_k, pool_v, out,
        segments.q_start, segments.q_len, segments.kv_end, segments.table_row, table,
        q.stride(0), q.stride(1), pool_k.stride(0), pool_k.stride(1),
        out.stride(0), out.stride(1), table.stride(0),
        1.0 / math.sqrt(head_dim),
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_Q=block_q, BLOCK_KV=64,
        # fp32 pools (tests, exactness checks) get exact products, not TF32.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2)
    return out
