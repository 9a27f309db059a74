"""Continuous batching per decoding block (no torch: testable without a model).

Every engine step runs one denoising pass over the current block of every running request.
Requests join at any step (their first pass also commits the prompt to the cache) and leave the
moment they finish; a request whose block completes commits it in its next pass while the others
keep denoising theirs. Nothing moves in lockstep.

The contract with the model runner is `Sequence` (cdlm/sequence.py); the scheduler only decides
which sequences run, admits them against the page allocator and retires them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from cdlm.errors import ContextLengthError, InvalidRequestError, QueueFullError
from cdlm.page_allocator import PageAllocator
from cdlm.sequence import Sequence, SequenceStatus

__all__ = ["QueueFullError", "Scheduler", "SchedulerOutput", "StepUpdate"]


@dataclass
class SchedulerOutput:
    """What runs in this engine step: every running sequence, the new ones included."""

    seqs: list[Sequence]
    admitted: list[Sequence]


@dataclass
class StepUpdate:
    """What changed in a step, for the engine to report."""

    blocks_completed: list[tuple[Sequence, int]]  # (sequence, steps the block took)
    finished: list[Sequence]
    tokens_finalized: list[int]                   # per scheduled sequence


class Scheduler:
    def __init__(self, page_allocator: PageAllocator, max_num_seqs: int, max_queue: int,
                 max_prefill_tokens: int = 8192) -> None:
        self.page_allocator = page_allocator
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        # Bounds the prompt tokens admitted in one step, so a burst of long prompts does not
        # stall every running request for one giant pass.
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}

    # --- queue --------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.add_many([seq])

    def add_many(self, seqs: list[Sequence]) -> None:
        """Queue the sequences together, or none of them: the queue must hold them all (the n
        choices and prompts of one HTTP request are admitted as a group)."""
        ids = [s.seq_id for s in seqs]
        duplicate = next((i for i in ids if i in self._by_id), None)
        if duplicate is None and len(set(ids)) < len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
        if duplicate is not None:
            raise InvalidRequestError(f"duplicate request id {duplicate!r}")
        if len(self.waiting) + len(seqs) > self.max_queue:
            raise QueueFullError(
                f"the waiting queue is full ({len(self.waiting)} of {self.max_queue} requests "
                f"waiting, {len(seqs)} more asked)", waiting=len(self.waiting),
                limit=self.max_queue)
        capacity = self.page_allocator.num_pages * self.page_allocator.page_size
        for seq in seqs:
            if self.page_allocator.pages_for(seq.cache_tokens_needed()) > self.page_allocator.num_pages:
                raise ContextLengthError(
                    f"request needs {seq.cache_tokens_needed()} KV cache tokens, more than the "
                    f"whole cache ({capacity}); reduce the prompt or max_tokens")
        for seq in seqs:
            self.waiting.append(seq)
            self._by_id[seq.seq_id] = seq

    def abort(self, seq_id: str) -> Sequence | None:
        seq = self._by_id.get(seq_id)
        if seq is None or seq.is_finished:
            return None
        self._finish(seq, "abort")
        return seq

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        admitted: list[Sequence] = []
        prefill_budget = self.max_prefill_tokens
        now = time.monotonic()
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if admitted and seq.prompt_len > prefill_budget:
                break
            pages = self.page_allocator.pages_for(seq.cache_tokens_needed())
            if not self.page_allocator.can_allocate(pages):
                break  # FCFS: wait for memory rather than let later requests overtake
            self.waiting.popleft()
            seq.pages = self.page_allocator.allocate(pages)
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = now
            prefill_budget -= seq.prompt_len
            self.running.append(seq)
            admitted.append(seq)
        return SchedulerOutput(seqs=list(self.running), admitted=admitted)

    def update(self, seqs: list[Sequence], finalized: list[tuple[list[int], list[int]]]
               ) -> StepUpdate:
        """Apply the runner's finalised (positions, tokens) per sequence."""
        now = time.monotonic()
        update = StepUpdate(blocks_completed=[], finished=[], tokens_finalized=[])
        for seq, (positions, tokens) in zip(seqs, finalized):
            if seq.is_finished:  # aborted while the step ran
                update.tokens_finalized.append(0)
                continue
            update.tokens_finalized.append(seq.apply_step(positions, tokens))
            if not seq.block_complete:
                continue
            update.blocks_completed.append((seq, seq.block_steps))
            seq.first_block_time = seq.first_block_time or now
            seq.last_block_time = now
            reason = seq.complete_block()
            if reason is not None:
                self._finish(seq, reason)
                update.finished.append(seq)
        return update

    def finish(self, seq: Sequence, reason: str, output_len: int | None = None) -> None:
        """End a running sequence early (stop string, error), keeping `output_len` tokens."""
        if seq.is_finished:
            return
        if output_len is not None:
            if seq.block_steps > 0:   # the block cut short is the request's last block
                seq.num_blocks += 1
            seq.finished_tokens = seq.contiguous_output()[:output_len]
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finished_time = time.monotonic()
        seq.output_token_ids = list(seq.finished_tokens)
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        if seq.pages:
            self.page_allocator.free(seq.pages)
            seq.pages = []
        self._by_id.pop(seq.seq_id, None)
