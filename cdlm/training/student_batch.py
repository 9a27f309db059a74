"""The distillation batch: (trajectory, block, y, y*) samples and the randomness they carry.

A global batch is drawn identically on every rank (same seeded generators, same draws), so
which rows a rank computes never changes what the batch is: a W-process run trains on exactly
the batches of a 1-process run. Each rank then takes its contiguous share of the rows.

One sample = one trajectory, one block b of it, and two states of that block taken from the
teacher's own decoding order:
  y   the block after the teacher's first s steps in it (at least one position still masked),
  y*  a more informed state: the block after s* > s steps, s* uniform up to the completion.
The paper's text names the completion as y*; we draw s* uniformly up to it (the completion
included) because with y* = completion the consistency term would have no still-masked
positions to act on. Context: the prompt and the teacher's finished blocks < b; later blocks
are dropped (block-causal attention cannot see them anyway).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from cdlm.training.losses import sample_mask_ratio
from cdlm.training.trajectories import Trajectory, TrajectoryPool


@dataclass
class BlockExample:
    """Inputs of one (trajectory, block, y, y*) sample, truncated after block b."""
    y: torch.Tensor             # [L] ids: prompt, finished blocks, block b at state y
    y_star: torch.Tensor        # [L] ids: same with block b at state y*
    prompt_len: int
    newly: torch.Tensor         # [L] bool: finalised between y and y* (distillation positions)
    still: torch.Tensor         # [L] bool: masked in y* (consistency positions)
    teacher_hidden: torch.Tensor  # [n_newly, D] in position order
    answer_ids: torch.Tensor    # reference answer (for the DLM loss)

    @property
    def dlm_len(self) -> int:
        """Length of the DLM loss's row: prompt + reference answer."""
        return self.prompt_len + self.answer_ids.shape[0]


@dataclass(frozen=True)
class LossNorm:
    """Denominators of the global batch. Every loss is a sum over the global batch divided by
    these, so ranks and micro-batches each add their part and the parts sum to the loss of
    the whole batch (what one process computes at once)."""
    newly: int   # distillation positions
    still: int   # consistency positions
    rows: int    # DLM rows (= samples)

    @classmethod
    def of(cls, examples: list[BlockExample]) -> "LossNorm":
        return cls(newly=int(sum(int(e.newly.sum()) for e in examples)),
                   still=int(sum(int(e.still.sum()) for e in examples)),
                   rows=len(examples))


@dataclass
class DLMNoise:
    """The DLM loss's random masking of the global batch: ratio t per row and one uniform per
    position of the widest row. Drawn once per batch, so any split of the rows masks each row
    the same way."""
    t: torch.Tensor   # [rows]
    u: torch.Tensor   # [rows, width]

    @classmethod
    def draw(cls, examples: list[BlockExample],
             generator: torch.Generator | None = None) -> "DLMNoise":
        width = max(e.dlm_len for e in examples)
        t = sample_mask_ratio(len(examples), generator)
        u = torch.rand((len(examples), width), generator=generator)
        return cls(t, u)

    def rows(self, index: list[int], width: int) -> "DLMNoise":
        return DLMNoise(self.t[index], self.u[index, :width])


@dataclass
class GlobalBatch:
    examples: list[BlockExample]
    norm: LossNorm
    dlm_noise: DLMNoise | None   # None when the DLM loss is off (weight 0)


def decoded_blocks(traj: Trajectory, block_size: int) -> list[int]:
    """Blocks with at least one finalised position (the ones a student state can come from)."""
    n = -(-traj.steps.shape[0] // block_size)
    return [b for b in range(n) if (traj.steps[b * block_size:(b + 1) * block_size] >= 0).any()]


def block_example(traj: Trajectory, block: int, block_size: int, mask_id: int,
                  rng: random.Random) -> BlockExample:
    """Draw y and y* inside `block` from the teacher's finalisation order (see module doc)."""
    lo, hi = block * block_size, min((block + 1) * block_size, traj.steps.shape[0])
    steps = traj.steps[lo:hi]
    decided = steps >= 0
    order = sorted(set(steps[decided].tolist()))           # the block's step ids, ascending
    s_idx = rng.randrange(len(order))                      # y: steps order[:s_idx] applied
    s_star_idx = rng.randint(s_idx + 1, len(order))        # y*: steps order[:s_star_idx] applied
    s = order[s_idx]
    s_star = order[s_star_idx] if s_star_idx < len(order) else math.inf
    tokens = traj.tokens[lo:hi]
    in_y = decided & (steps < s)
    in_y_star = decided & (steps < s_star)
    prefix = torch.cat([traj.prompt_ids, traj.tokens[:lo]])
    y_block = torch.where(in_y, tokens, torch.full_like(tokens, mask_id))
    y_star_block = torch.where(in_y_star, tokens, torch.full_like(tokens, mask_id))
    pad = torch.zeros(prefix.shape[0], dtype=torch.bool)
    newly_block = in_y_star & ~in_y
    still_block = decided & ~in_y_star
    return BlockExample(
        y=torch.cat([prefix, y_block]), y_star=torch.cat([prefix, y_star_block]),
        prompt_len=traj.prompt_ids.shape[0],
        newly=torch.cat([pad, newly_block]), still=torch.cat([pad, still_block]),
        teacher_hidden=traj.hidden[lo:hi][newly_block].float(), answer_ids=traj.answer_ids)


def draw_global_batch(pool: TrajectoryPool, rng: random.Random, batch_size: int,
                      block_size: int, mask_id: int, with_dlm: bool) -> GlobalBatch:
    """The whole batch of one optimizer step. Draw order (trajectories, then per sample its
    block and states, then the DLM noise from torch's generator) is fixed: it is part of what
    makes a resumed or multi-process run equal the uninterrupted 1-process one."""
    picks = [pool.draw(rng) for _ in range(batch_size)]
    examples = [block_example(t, rng.choice(decoded_blocks(t, block_size)), block_size,
                              mask_id, rng) for t in picks]
    noise = DLMNoise.draw(examples) if with_dlm else None
    return GlobalBatch(examples, LossNorm.of(examples), noise)
