"""How one step's cached (`cdlm`) requests become one packed pass (no torch).

The pass's query tokens are a concatenation of *segments*, each at most one decoding block of
one request, with no padding between requests:
- prompt chunks (a request's first pass): they attend to the whole prompt;
- the block being committed (the pass after a block completed): it attends to everything up to
  its own end;
- the current block: it attends to everything up to its own end.
Each segment attends to its request's logical positions `[0, kv_end)` through the page table.
That is exactly the block-causal rule: no mask tensor, no copy of the cached prefix. Every
token's K/V is written to its request's pool slot before attention reads the pool, so the
committed tokens' K/V are final and the current block's are scratch that the committing pass
overwrites.

A step without admissions has a fixed shape: every segment is a full block (a committed block
is always full, since only a request's last block can be cut short, and that request ends).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class PackableSequence(Protocol):
    """What the layout reads from a scheduled request (cdlm.scheduler.Sequence has it)."""

    seq_id: str
    prompt_token_ids: list[int]
    finished_tokens: list[int]
    num_cached: int
    pages: list[int]
    block_limit: int
    block_steps: int

    @property
    def prompt_len(self) -> int: ...

    def pending_commit(self) -> list[int]: ...


@dataclass(frozen=True)
class SegmentLayout:
    row: int        # the request's index among the step's rows
    q_start: int    # its first query token in the packed pass
    q_len: int      # 1 .. block_size
    kv_end: int     # keys visible: the request's logical positions [0, kv_end)


@dataclass(frozen=True)
class RowLayout:
    """One request of the step."""

    state_slot: int      # its row in the device-resident request state
    block_start: int     # logical position of its current block's first token
    block_q_start: int   # packed index of the current block's first token
    prev_q_index: int    # packed index of the token right before the block; -1: not in this
                         # pass (Dream then predicts block position 0 from the saved state)
    block_limit: int     # only block positions < block_limit may be decoded
    reset_block: bool    # the block is new: the device block row becomes all masks first


@dataclass
class StepLayout:
    """Host-side description of one packed pass (plain ints)."""

    host_ids: list[int] = field(default_factory=list)     # [T] token id; -1: the device
                                                          # block's token (block_index)
    block_index: list[int] = field(default_factory=list)  # [T] state_slot*block + position, -1
    positions: list[int] = field(default_factory=list)    # [T] logical (RoPE) positions
    write_slots: list[int] = field(default_factory=list)  # [T] pool slot of each token's K/V
    segments: list[SegmentLayout] = field(default_factory=list)
    rows: list[RowLayout] = field(default_factory=list)
    has_admission: bool = False
    has_commit: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.positions)


def slot_of(pages: list[int], page_size: int, position: int) -> int:
    return pages[position // page_size] * page_size + position % page_size


def _pending_chunks(seq: PackableSequence, block_size: int) -> list[tuple[int, int, int]]:
    """(start, end, kv_end) of each segment of the tokens still to commit: chunks never cross
    the prompt's end or a generated block's end; a prompt chunk sees the whole prompt, a
    generated chunk sees up to the end of its block."""
    start, end = seq.num_cached, seq.prompt_len + len(seq.finished_tokens)
    chunks = []
    while start < end:
        if start < seq.prompt_len:
            stop = min(start + block_size, seq.prompt_len)
            kv_end = seq.prompt_len
        else:
            block_end = seq.prompt_len + ((start - seq.prompt_len) // block_size + 1) * block_size
            stop = min(start + block_size, block_end, end)
            kv_end = block_end
        chunks.append((start, stop, kv_end))
        start = stop
    return chunks


def pack_step(seqs: list[PackableSequence], state_slots: list[int], block_size: int,
              page_size: int) -> StepLayout:
    """The packed layout of one step over `seqs` (all in `cdlm` mode), in their order."""
    layout = StepLayout()
    for row, (seq, state_slot) in enumerate(zip(seqs, state_slots)):
        pending = seq.pending_commit()
        layout.has_admission |= seq.num_cached == 0
        layout.has_commit |= bool(pending) and seq.num_cached > 0
        for start, stop, kv_end in _pending_chunks(seq, block_size):
            layout.segments.append(SegmentLayout(row, layout.num_tokens, stop - start, kv_end))
            for pos in range(start, stop):
                layout.host_ids.append(pending[pos - seq.num_cached])
                layout.block_index.append(-1)
                layout.positions.append(pos)
                layout.write_slots.append(slot_of(seq.pages, page_size, pos))
        prev_q_index = layout.num_tokens - 1 if pending else -1
        block_start = seq.prompt_len + len(seq.finished_tokens)
        block_q_start = layout.num_tokens
        layout.segments.append(SegmentLayout(row, block_q_start, block_size,
                                             block_start + block_size))
        for offset in range(block_size):
            pos = block_start + offset
            layout.host_ids.append(-1)
            layout.block_index.append(state_slot * block_size + offset)
            layout.positions.append(pos)
            layout.write_slots.append(slot_of(seq.pages, page_size, pos))
        layout.rows.append(RowLayout(state_slot=state_slot, block_start=block_start,
                                     block_q_start=block_q_start, prev_q_index=prev_q_index,
                                     block_limit=seq.block_limit,
                                     reset_block=seq.block_steps == 0))
    return layout
