"""CUDA graphs of the packed step, one per bucket of (segments, rows, sampling kind).

A step without admissions has a fixed shape: every segment is one full block, so it is fully
described by its segment and row counts. Each bucket rounds those counts up; padding segments,
tokens and rows point at the pool's scratch pages and the dummy request-state row
(cdlm.step_inputs), so one captured graph serves every step that fits. Steps with admissions
(prompt chunks of any length) run eagerly.

Capture happens lazily, the first time a bucket is needed, from an all-padding input that only
touches the scratch pages and the dummy row. That first use then runs the step both eagerly and
from the graph (restoring the state rows in between) and compares the decisions: on any
difference or error the graphs are switched off for the engine's lifetime, with a log line, and
every step runs eagerly. CUDA only.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from cdlm.step_inputs import StepShape, StepTensors, flatten
from cdlm.step_layout import StepLayout

if TYPE_CHECKING:
    from cdlm.model_runner import ModelRunner

logger = logging.getLogger(__name__)

BUCKETS: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 56, 64, 80, 96, 112,
                            128, 160, 192, 224, 256)
MAX_GRAPHS = 64


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    inputs: StepTensors
    output: torch.Tensor       # [rows, block] int32 decisions, written by each replay
    verified: bool = False


def bucket(count: int) -> int | None:
    i = bisect.bisect_left(BUCKETS, count)
    return BUCKETS[i] if i < len(BUCKETS) else None


class StepGraphs:
    def __init__(self, runner: "ModelRunner") -> None:
        self.runner = runner
        self.enabled = True
        self._graphs: dict[tuple, CapturedStep] = {}
        self._memory_pool = torch.cuda.graph_pool_handle()
        self._staging: torch.Tensor | None = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def run(self, layout: StepLayout, keys: list[int], flags: tuple[bool, bool]) -> np.ndarray:
        """Decisions [rows, block] of a step without admissions, from a graph when possible."""
        runner = self.runner
        segments, rows = bucket(len(layout.segments)), bucket(len(layout.rows))
        key = (segments, rows, flags)
        if not self.enabled or segments is None or rows is None or (
                key not in self._graphs and len(self._graphs) >= MAX_GRAPHS):
            return runner._run_eager(layout, keys, flags)
        try:
            entry = self._graphs.get(key) or self._capture(key)
            if not entry.verified:
                return self._verify(entry, layout, keys, flags)
            return self._replay(entry, layout, keys)
        except Exception:
            logger.exception("CUDA graph capture or replay failed; running steps eagerly")
            self.enabled = False
            raise

    def _host_inputs(self, layout: StepLayout, keys: list[int], shape: StepShape) -> np.ndarray:
        runner = self.runner
        return flatten(layout, keys, shape, runner.block_size, runner.config.mask_token_id,
                       runner.scratch_slot, runner.states.dummy_slot)

    def _replay(self, entry: CapturedStep, layout: StepLayout, keys: list[int]) -> np.ndarray:
        host = torch.from_numpy(self._host_inputs(layout, keys, entry.inputs.shape))
        if self._staging is None or self._staging.numel() < host.numel():
            self._staging = torch.empty(max(host.numel(), 1 << 16), dtype=torch.long,
                                        pin_memory=True)
        staged = self._staging[:host.numel()]
        staged.copy_(host)
        entry.inputs.buffer.copy_(staged, non_blocking=True)
        entry.graph.replay()
        return self.runner.download(entry.output)[:len(layout.rows)]

    def _capture(self, key: tuple) -> CapturedStep:
        segments, rows, flags = key
        runner = self.runner
        shape = StepShape(segments * runner.block_size, segments, rows)
        buffer = torch.empty(shape.size, dtype=torch.long, device=runner.device)
        # An all-padding step: it writes only scratch pages and the dummy state row.
        buffer.copy_(torch.from_numpy(self._host_inputs(StepLayout(), [], shape)))
        inputs = StepTensors.views(buffer, shape)
        kv = runner.paged_kv(inputs, None)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):   # compile the kernels and settle the allocator before capture
                runner.packed_step(inputs, kv, flags)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory_pool):
            output = runner.packed_step(inputs, kv, flags)
        entry = CapturedStep(graph, inputs, output)
        self._graphs[key] = entry
        return entry

    def _verify(self, entry: CapturedStep, layout: StepLayout, keys: list[int],
                flags: tuple[bool, bool]) -> np.ndarray:
        """First use of a bucket: eager and graph on the same step must decide the same."""
        states = self.runner.states
        rows = torch.tensor([r.state_slot for r in layout.rows], device=self.runner.device)
        before = (states.block[rows].clone(), states.saved_hidden[rows].clone())
        eager = self.runner._run_eager(layout, keys, flags)
        after = (states.block[rows].clone(), states.saved_hidden[rows].clone())
        states.block[rows], states.saved_hidden[rows] = before
        replayed = self._replay(entry, layout, keys)
        same = (np.array_equal(eager, replayed)
                and torch.equal(states.block[rows], after[0])
                and torch.equal(states.saved_hidden[rows], after[1]))
        if not same:
            logger.error("CUDA graph of bucket %s decided differently from the eager step; "
                         "running steps eagerly from now on", entry.inputs.shape)
            self.enabled = False
            states.block[rows], states.saved_hidden[rows] = after
            return eager
        entry.verified = True
        return replayed
