"""Small stand-ins for scheduler state, for tests of the layout and attention ops alone."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


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
