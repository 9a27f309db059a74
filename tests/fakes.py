"""Small stand-ins for scheduler state, for tests of the layout and attention ops alone."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from cdlm.step_layout import StepLayout, pack_step


@dataclass
class FakeSequence:
    """What cdlm.step_layout reads from a scheduled request."""

    seq_id: str
    prompt_token_ids: list[int]
    finished_tokens: list[int] = field(default_factory=list)
    num_cached: int = 0
    pages: list[int] = field(default_factory=list)
    block_limit: int = 4
    block_steps: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def pending_commit(self) -> list[int]:
        if self.num_cached >= self.prompt_len:
            return self.finished_tokens[self.num_cached - self.prompt_len:]
        return self.prompt_token_ids[self.num_cached:] + self.finished_tokens


def random_requests(rng: random.Random, count: int, block_size: int, page_size: int,
                    num_pages: int, max_prompt: int = 70) -> list[FakeSequence]:
    """Requests in every state a step can hold them in: new (prompt chunks), committing a
    block, or denoising a block, with pages scattered over the pool."""
    free = list(range(num_pages))
    rng.shuffle(free)
    seqs = []
    for i in range(count):
        prompt_len = rng.randint(1, max_prompt)
        blocks = rng.randint(0, 3)
        kind = rng.choice(["new", "commit", "plain"])
        finished = [rng.randrange(200) for _ in range(blocks * block_size)] if kind != "new" else []
        if kind == "new":
            cached = 0
        elif kind == "commit" and blocks:
            cached = prompt_len + (blocks - 1) * block_size
        else:
            cached = prompt_len + blocks * block_size
        need = -(-(prompt_len + len(finished) + block_size) // page_size)
        pages = [free.pop() for _ in range(need)]
        seqs.append(FakeSequence(f"r{i}", [rng.randrange(200) for _ in range(prompt_len)],
                                 finished, cached, pages, block_limit=block_size,
                                 block_steps=0 if cached < prompt_len + len(finished) else 1))
    return seqs


def random_paged_case(seed: int, block_size: int, page_size: int, heads: int, kv_heads: int,
                      head_dim: int, dtype: torch.dtype, count: int = 6,
                      device: str = "cpu"):
    """A packed step over random requests, with random pools and queries:
    (seqs, layout, page_table [count, pages] int32, pool_k, pool_v, q, scratch slot)."""
    rng = random.Random(seed)
    num_pages = 400
    seqs = random_requests(rng, count, block_size, page_size, num_pages)
    layout = pack_step(seqs, list(range(count)), block_size, page_size)
    width = max(len(s.pages) for s in seqs)
    table = torch.tensor([s.pages + [0] * (width - len(s.pages)) for s in seqs],
                         dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(seed)
    slots = (num_pages + 1) * page_size
    pool_k = torch.randn(slots, kv_heads, head_dim, generator=gen).to(device, dtype)
    pool_v = torch.randn(slots, kv_heads, head_dim, generator=gen).to(device, dtype)
    q = torch.randn(layout.num_tokens, heads, head_dim, generator=gen).to(device, dtype)
    return seqs, layout, table, pool_k, pool_v, q, num_pages * page_size


def attention_definition(seqs: list[FakeSequence], layout: StepLayout, pool_k: torch.Tensor,
                         pool_v: torch.Tensor, q: torch.Tensor, page_size: int) -> torch.Tensor:
    """Each query token of a segment attends to its request's positions [0, kv_end), read
    from the page table, one query and head at a time, in fp64."""
    pool_k, pool_v, q = pool_k.cpu(), pool_v.cpu(), q.cpu()
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // pool_k.shape[1]
    for seg in layout.segments:
        pages = seqs[seg.row].pages
        slots = [pages[p // page_size] * page_size + p % page_size for p in range(seg.kv_end)]
        keys, values = pool_k[slots].double(), pool_v[slots].double()
        for t in range(seg.q_start, seg.q_start + seg.q_len):
            for h in range(q.shape[1]):
                scores = keys[:, h // group] @ q[t, h].double() / math.sqrt(q.shape[2])
                out[t, h] = torch.softmax(scores, 0) @ values[:, h // group]
    return out
