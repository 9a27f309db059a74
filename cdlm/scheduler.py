"""Continuous batching per decoding block (no torch: testable without a model).

Every engine step runs one denoising pass over the current block of every running request.
Requests join at any step (their first pass also commits the prompt to the cache) and leave the
moment they finish; a request whose block completes commits it in its next pass while the others
keep denoising theirs. Nothing moves in lockstep.

The contract with the model runner is `Sequence`: the runner reads `known_tokens`, `num_cached`,
`block`, `block_limit`, `pages` and the mode, and reports back the positions it finalised.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from cdlm.block_manager import BlockManager
from cdlm.config import DECODING_MODES
from cdlm.errors import ContextLengthError, InvalidRequestError, QueueFullError
from cdlm.sampling_params import SamplingParams

__all__ = ["QueueFullError", "Scheduler", "SchedulerOutput", "Sequence", "SequenceStatus",
           "StepUpdate"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    mode: str
    block_size: int
    mask_token_id: int
    stop_token_ids: frozenset[int]
    threshold: float
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0                      # leading tokens of known_tokens whose K/V are cached
    finished_tokens: list[int] = field(default_factory=list)  # tokens of completed blocks
    block: list[int] = field(default_factory=list)            # current block; mask id = undecided
    block_limit: int = 0                     # only positions < block_limit may be decoded
    masked_left: int = 0                     # undecided positions < block_limit
    steps: int = 0
    block_steps: int = 0
    num_blocks: int = 0
    finish_reason: str | None = None
    output_token_ids: list[int] = field(default_factory=list)  # final output once finished
    first_scheduled_time: float | None = None
    first_block_time: float | None = None
    last_block_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in DECODING_MODES:
            raise ValueError(f"unknown decoding mode {self.mode!r}")
        self._open_block()

    # --- views for the runner ---------------------------------------------------------------
    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def known_tokens(self) -> list[int]:
        """Prompt plus completed blocks: everything before the current block."""
        return self.prompt_token_ids + self.finished_tokens

    def pending_commit(self) -> list[int]:
        """Tokens before the current block whose K/V are not cached yet (the prompt on the
        first pass, the just-completed block afterwards)."""
        if self.num_cached >= self.prompt_len:
            return self.finished_tokens[self.num_cached - self.prompt_len:]
        return self.prompt_token_ids[self.num_cached:] + self.finished_tokens

    @property
    def num_pending_commit(self) -> int:
        return self.prompt_len + len(self.finished_tokens) - self.num_cached

    @property
    def num_window_blocks(self) -> int:
        return -(-self.params.max_tokens // self.block_size)

    @property
    def generated_len(self) -> int:
        return len(self.finished_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def cache_tokens_needed(self) -> int:
        """KV slots this request may ever use: the prompt and every block of its window (the
        current block's K/V are written as scratch in each pass)."""
        if self.mode != "cdlm":
            return 0
        return self.prompt_len + self.num_window_blocks * self.block_size

    # --- state changes ----------------------------------------------------------------------
    def _open_block(self) -> None:
        self.block = [self.mask_token_id] * self.block_size
        self.block_limit = min(self.block_size, self.params.max_tokens - len(self.finished_tokens))
        self.masked_left = self.block_limit
        self.block_steps = 0

    def apply_step(self, positions: list[int], tokens: list[int]) -> int:
        """Record one denoising pass; returns how many positions it decided."""
        self.steps += 1
        self.block_steps += 1
        if self.mode == "cdlm":
            self.num_cached = len(self.prompt_token_ids) + len(self.finished_tokens)
        limit = self.block_limit
        decided = 0
        # Positions arrive in ascending order, so an end token cuts off the ones after it.
        for pos, tok in zip(positions, tokens):
            if pos >= limit or self.block[pos] != self.mask_token_id:
                continue
            self.block[pos] = tok
            decided += 1
            if tok in self.stop_token_ids and not self.params.ignore_eos and pos + 1 < limit:
                limit = pos + 1   # early stop: nothing after an end token is ever decoded
        if limit != self.block_limit:
            self.block_limit = limit
            self.masked_left = self.block[:limit].count(self.mask_token_id)
        else:
            self.masked_left -= decided
        return decided

    @property
    def block_complete(self) -> bool:
        return self.masked_left == 0

    def complete_block(self) -> str | None:
        """Move a completed block into the output; returns the finish reason if done."""
        decided = self.block[:self.block_limit]
        self.finished_tokens.extend(decided)
        self.num_blocks += 1
        if not self.params.ignore_eos and decided and decided[-1] in self.stop_token_ids:
            return "stop"
        if len(self.finished_tokens) >= self.params.max_tokens:
            return "length"
        self._open_block()
        return None

    def contiguous_output(self) -> list[int]:
        """Finalised output tokens with no undecided position before them."""
        out = list(self.finished_tokens)
        for tok in self.block[:self.block_limit]:
            if tok == self.mask_token_id:
                break
            out.append(tok)
        return out


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
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_queue: int,
                 max_prefill_tokens: int = 8192) -> None:
        self.block_manager = block_manager
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
        capacity = self.block_manager.num_pages * self.block_manager.page_size
        for seq in seqs:
            if self.block_manager.pages_for(seq.cache_tokens_needed()) > self.block_manager.num_pages:
                raise ContextLengthError(
                    f"request needs {seq.cache_tokens_needed()} KV cache tokens, more than the "
                    f"whole cache ({capacity}); reduce the prompt or max_tokens")
        for seq in seqs:
            self.waiting.append(seq)
            self._by_id[seq.seq_id] = seq

    def get(self, seq_id: str) -> Sequence | None:
        return self._by_id.get(seq_id)

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
            pages = self.block_manager.pages_for(seq.cache_tokens_needed())
            if not self.block_manager.can_allocate(pages):
                break  # FCFS: wait for memory rather than let later requests overtake
            self.waiting.popleft()
            seq.pages = self.block_manager.allocate(pages)
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
            self.block_manager.free(seq.pages)
            seq.pages = []
        self._by_id.pop(seq.seq_id, None)
