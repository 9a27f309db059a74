"""One step's inputs on the device: every per-step integer in one buffer, one host-to-device copy.

The layout (cdlm.step_layout) is flattened into a single int64 array, optionally padded to a
bucket's fixed sizes (a step without admissions is `segments x block` tokens), so that a
captured CUDA graph can read it from a static buffer. Padding tokens write to the pool's
scratch slots, padding segments read the scratch pages through the dummy request-state row, and
padding rows point at that row, whose block limit is 0: nothing in it is ever decided.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cdlm.step_layout import StepLayout

TOKEN_FIELDS = ("host_ids", "block_index", "positions", "write_slots")
SEGMENT_FIELDS = ("seg_q_start", "seg_q_len", "seg_kv_end", "seg_state_slot")
ROW_FIELDS = ("state_slot", "block_q_start", "first_index", "prev_q_index", "block_limit",
              "reset_block", "noise_key")


@dataclass(frozen=True)
class StepShape:
    tokens: int
    segments: int
    rows: int

    @property
    def size(self) -> int:
        return (len(TOKEN_FIELDS) * self.tokens + len(SEGMENT_FIELDS) * self.segments
                + len(ROW_FIELDS) * self.rows)


@dataclass
class StepTensors:
    """Views into one int64 device buffer: [tokens], [segments] or [rows] each."""

    shape: StepShape
    buffer: torch.Tensor
    host_ids: torch.Tensor
    block_index: torch.Tensor
    positions: torch.Tensor
    write_slots: torch.Tensor
    seg_q_start: torch.Tensor
    seg_q_len: torch.Tensor
    seg_kv_end: torch.Tensor
    seg_state_slot: torch.Tensor
    state_slot: torch.Tensor
    block_q_start: torch.Tensor
    first_index: torch.Tensor    # Dream: row of [hidden; saved_hidden] predicting position 0
    prev_q_index: torch.Tensor
    block_limit: torch.Tensor
    reset_block: torch.Tensor
    noise_key: torch.Tensor

    @classmethod
    def views(cls, buffer: torch.Tensor, shape: StepShape) -> "StepTensors":
        fields: dict[str, torch.Tensor] = {}
        offset = 0
        for names, count in ((TOKEN_FIELDS, shape.tokens), (SEGMENT_FIELDS, shape.segments),
                             (ROW_FIELDS, shape.rows)):
            for name in names:
                fields[name] = buffer[offset:offset + count]
                offset += count
        return cls(shape=shape, buffer=buffer, **fields)


def flatten(layout: StepLayout, noise_keys: list[int], shape: StepShape, block_size: int,
            pad_token_id: int, scratch_slot: int, dummy_slot: int) -> np.ndarray:
    """The step's int64 buffer, padded to `shape` (which must hold the layout)."""
    tokens, segments, rows = layout.num_tokens, len(layout.segments), len(layout.rows)
    if tokens > shape.tokens or segments > shape.segments or rows > shape.rows:
        raise ValueError(f"layout ({tokens}, {segments}, {rows}) does not fit {shape}")
    pad_tokens = shape.tokens - tokens
    if pad_tokens and pad_tokens != (shape.segments - segments) * block_size:
        raise ValueError("padding tokens must fill whole padding segments")
    out = np.empty(shape.size, dtype=np.int64)
    offset = 0

    def put(values: list[int], count: int, fill: int | list[int]) -> None:
        nonlocal offset
        out[offset:offset + len(values)] = values
        out[offset + len(values):offset + count] = fill
        offset += count

    scratch = [scratch_slot + i for i in range(block_size)] * (shape.segments - segments)
    put(layout.host_ids, shape.tokens, pad_token_id)
    put(layout.block_index, shape.tokens, -1)
    put(layout.positions, shape.tokens, list(range(block_size)) * (shape.segments - segments)
        if pad_tokens else 0)
    put(layout.write_slots, shape.tokens, scratch if pad_tokens else scratch_slot)
    pad_segments = shape.segments - segments
    put([s.q_start for s in layout.segments], shape.segments,
        [tokens + i * block_size for i in range(pad_segments)])
    put([s.q_len for s in layout.segments], shape.segments, block_size)
    put([s.kv_end for s in layout.segments], shape.segments, block_size)
    put([layout.rows[s.row].state_slot for s in layout.segments], shape.segments, dummy_slot)
    put([r.state_slot for r in layout.rows], shape.rows, dummy_slot)
    put([r.block_q_start for r in layout.rows], shape.rows, 0)
    put([r.prev_q_index if r.prev_q_index >= 0 else shape.tokens + r.state_slot
         for r in layout.rows], shape.rows, shape.tokens + dummy_slot)
    put([r.prev_q_index for r in layout.rows], shape.rows, -1)
    put([r.block_limit for r in layout.rows], shape.rows, 0)
    put([int(r.reset_block) for r in layout.rows], shape.rows, 0)
    put(noise_keys, shape.rows, 0)
    return out


def upload(host: np.ndarray, device: torch.device, staging: torch.Tensor | None = None,
           into: torch.Tensor | None = None) -> torch.Tensor:
    """Copy the step buffer to the device in one transfer (through pinned memory on CUDA)."""
    source = torch.from_numpy(host)
    if device.type != "cuda":
        if into is not None:
            into.copy_(source)
            return into
        return source.to(device)
    if staging is not None and staging.numel() >= source.numel():
        staged = staging[:source.numel()]
        staged.copy_(source)
        source = staged
    target = into if into is not None else torch.empty(source.shape, dtype=torch.long,
                                                       device=device)
    target.copy_(source, non_blocking=True)
    return target
