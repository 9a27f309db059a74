"""One request's diffusion state (no torch): its current block, commits and stop rules.

A `Sequence` is the contract between the scheduler and the model runner: the runner reads
`known_tokens`, `num_cached`, `block`, `block_limit`, `pages` and the mode, and reports back the
positions it finalised through `apply_step`. The scheduler decides only when it runs.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from cdlm.config import DECODING_MODES
from cdlm.sampling_params import SamplingParams

__all__ = ["Sequence", "SequenceStatus"]


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
