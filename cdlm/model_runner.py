"""Turns a scheduled step into device work, runs the model once per decoding mode, decides.

Three ways to get the logits of each request's current block (see docs/ARCHITECTURE.md):
- `cdlm`: block-causal with the exact KV cache, as one *packed* pass over every cached request
  (cdlm.step_layout): prompt chunks, blocks being committed and current blocks, no padding
  between requests, attention over the paged pool (cdlm.paged_attention). Per-request state
  lives on the device (cdlm.request_states); the host uploads the step's integers in one copy
  and reads back one tensor, the decisions. Steps without admissions have fixed shapes and are
  replayed from captured CUDA graphs where available (cdlm.cuda_graphs).
- `reference`: block-causal, recomputing prompt + completed blocks + block every step.
- `bidirectional`: the teacher: prompt + the whole generation window, full attention.
The reference and bidirectional modes run the same model with a dense mask.

Dream predicts position i from hidden state i-1, so block position 0 comes from the last
committed token: in `cdlm` mode its hidden state is kept per request on the device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from cdlm.attention import block_causal_mask, sequence_segments
from cdlm.config import ModelConfig
from cdlm.kv_cache import KVCachePool
from cdlm.models.transformer import DiffusionLM
from cdlm.paged_attention import PagedKV, SegmentTable, torch_groups
from cdlm.request_states import RequestStates, integer_settings
from cdlm.sampler import SamplingTensors, log_odds_threshold, noise_key, predict_tokens, \
    select_positions
from cdlm.sequence import Sequence
from cdlm.step_inputs import StepFlags, StepShape, StepTensors, flatten, upload
from cdlm.step_layout import StepLayout, pack_step

logger = logging.getLogger(__name__)

# Segment given to padding queries of a dense pass: they may look at every real key (their
# output is dropped), which keeps softmax rows from being empty.
_PAD_SEGMENT = 1 << 30

Decisions = list[tuple[list[int], list[int]]]   # per sequence: (positions, tokens) finalised


@dataclass
class PassStats:
    """What the last packed pass computed (host-side counts, for benchmarks and metrics)."""

    tokens: int = 0              # query tokens (no padding)
    segments: int = 0
    rows: int = 0
    attended_pairs: int = 0      # sum over segments of q_len * kv_end
    has_admission: bool = False
    has_commit: bool = False
    graph: bool = False          # replayed from a captured CUDA graph
    wait_s: float = 0.0          # time blocked on the step's one device-to-host transfer


def choose_attention_backend(requested: str, device: torch.device, head_dim: int) -> str:
    """`auto`: the Triton kernel on CUDA when Triton imports and the head size suits it, else
    plain torch. An explicit `triton` off CUDA is honoured only under the Triton interpreter
    (tests)."""
    if requested == "torch" or (requested == "auto" and device.type != "cuda"):
        return "torch"
    try:
        from cdlm.kernels import paged_attention as kernel
    except ImportError:
        if requested == "triton":
            raise
        logger.warning("triton is not importable: attention runs on the plain-torch path")
        return "torch"
    usable = kernel.supports(head_dim) and (device.type == "cuda" or kernel.interpreted())
    if requested == "triton" and not usable:
        raise ValueError(f"the Triton attention kernel cannot run here (device {device}, head "
                         f"size {head_dim}; off CUDA it needs TRITON_INTERPRET=1)")
    return "triton" if usable else "torch"


class ModelRunner:
    def __init__(self, model: DiffusionLM, pool: KVCachePool, block_size: int,
                 max_requests: int, max_pages_per_request: int, engine_seed: int = 0,
                 attention_backend: str = "auto", cuda_graphs: bool = True) -> None:
        self.model = model
        self.config: ModelConfig = model.config
        self.pool = pool
        self.block_size = block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.attention_backend = choose_attention_backend(attention_backend, self.device,
                                                          self.config.head_dim)
        self.scratch_slot = pool.scratch_pages[0] * pool.page_size
        self.states = RequestStates(max_requests, block_size, max_pages_per_request,
                                    self.config.hidden_size, self.config.mask_token_id,
                                    pool.scratch_pages, self.dtype, self.device)
        self._seeds: dict[str, int] = {}
        self._seed_source = torch.Generator().manual_seed(engine_seed)
        self._staging = (torch.empty(1 << 16, dtype=torch.long, pin_memory=True)
                         if self.device.type == "cuda" else None)
        # Tests set this to read the block logits of the last group run (step_logits()).
        self.keep_logits = False
        self._kept_logits: torch.Tensor | None = None
        self.last_pass = PassStats()
        self._host_pages: list[list[int]] = []
        self._block_offsets = torch.arange(block_size, device=self.device)
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda" and self.attention_backend == "triton":
            from cdlm.cuda_graphs import StepGraphs
            self.graphs = StepGraphs(self)

    # --- per-request state ------------------------------------------------------------------
    def release(self, seq_id: str) -> None:
        self._seeds.pop(seq_id, None)
        self.states.release(seq_id)

    def _seed(self, seq: Sequence) -> int:
        seed = self._seeds.get(seq.seq_id)
        if seed is None:
            seed = seq.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
            self._seeds[seq.seq_id] = seed
        return seed

    def _noise_key(self, seq: Sequence) -> int:
        return 0 if seq.params.greedy else noise_key(self._seed(seq), seq.steps)

    # --- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, seqs: list[Sequence]) -> Decisions:
        """Run one denoising step for every sequence; returns the (positions, tokens) decided."""
        results: Decisions = [([], [])] * len(seqs)
        by_mode: dict[str, list[int]] = {}
        for index, seq in enumerate(seqs):
            by_mode.setdefault(seq.mode, []).append(index)
        for mode, indices in by_mode.items():
            group = [seqs[i] for i in indices]
            run = self._dense_mode(mode) if mode != "cdlm" else self._execute_cdlm
            for i, decided in zip(indices, run(group)):
                results[i] = decided
        return results

    def _dense_mode(self, mode: str) -> Callable[[list[Sequence]], Decisions]:
        logits_of = {"reference": self._logits_reference,
                     "bidirectional": self._logits_bidirectional}[mode]
        return lambda seqs: self._decide_dense(seqs, logits_of(seqs))

    # --- cdlm: packed pass over the paged pool ------------------------------------------------
    def _execute_cdlm(self, seqs: list[Sequence]) -> Decisions:
        for seq in seqs:
            if seq.seq_id not in self.states:
                self.states.admit(seq.seq_id, seq.pages, seq.params, seq.threshold)
        slots = [self.states.slot(s.seq_id) for s in seqs]
        self._host_pages = [s.pages for s in seqs]   # the torch attention path's page tables
        layout = pack_step(seqs, slots, self.block_size, self.pool.page_size)
        keys = [self._noise_key(s) for s in seqs]
        flags = StepFlags(any_random=any(not s.params.greedy for s in seqs),
                          any_filter=any(_filters(s) for s in seqs),
                          any_reset=any(r.reset_block for r in layout.rows),
                          any_host_tokens=any(r.prev_q_index >= 0 for r in layout.rows))
        use_graph = (self.graphs is not None and self.graphs.enabled
                     and not layout.has_admission and not self.keep_logits)
        self.last_pass = PassStats(
            tokens=layout.num_tokens, segments=len(layout.segments), rows=len(layout.rows),
            attended_pairs=sum(s.q_len * s.kv_end for s in layout.segments),
            has_admission=layout.has_admission, has_commit=layout.has_commit, graph=use_graph)
        try:
            if use_graph:
                decided = self.graphs.run(layout, keys, flags.general())
            else:
                decided = self._run_eager(layout, keys, flags)
        except Exception:
            # The device may hold half of this step's updates: put the host's blocks back.
            for seq in seqs:
                self.states.restore_block(seq.seq_id, seq.block)
            raise
        return _to_lists(decided[:len(seqs)])

    def _run_eager(self, layout: StepLayout, keys: list[int], flags: StepFlags,
                   shape: StepShape | None = None) -> np.ndarray:
        """One packed step without a graph; `shape` pads it to a bucket's fixed shape (what
        a captured graph runs), else it runs at its exact size."""
        shape = shape or StepShape(layout.num_tokens, len(layout.segments), len(layout.rows))
        host = flatten(layout, keys, shape, self.block_size, self.config.mask_token_id,
                       self.scratch_slot, self.states.dummy_slot)
        inputs = StepTensors.views(upload(host, self.device, self._staging), shape)
        kv = self.paged_kv(inputs, layout)
        decided = self.packed_step(inputs, kv, flags)
        return self.download(decided)

    def download(self, decided: torch.Tensor) -> np.ndarray:
        """The step's one device-to-host transfer (and its one wait for the device)."""
        start = time.perf_counter()
        host = decided.cpu().numpy()
        self.last_pass.wait_s = time.perf_counter() - start
        return host

    def paged_kv(self, inputs: StepTensors, layout: StepLayout | None) -> PagedKV:
        """The pool access of one packed pass. The torch backend needs the host layout (it
        groups requests by length); the fused kernel reads only the device segment table."""
        kv = PagedKV(self.pool.k, self.pool.v, inputs.write_slots, self.pool.page_size,
                     self.attention_backend)
        if self.attention_backend == "triton":
            kv.segments = SegmentTable(
                q_start=inputs.seg_q_start, q_len=inputs.seg_q_len, kv_end=inputs.seg_kv_end,
                table_row=inputs.seg_state_slot, page_table=self.states.page_table,
                max_q_len=self.block_size)
        else:
            assert layout is not None
            kv.groups = torch_groups(layout, self._host_pages, self.pool.page_size,
                                     self.scratch_slot, self.dtype, self.device)
        return kv

    def packed_step(self, inputs: StepTensors, kv: PagedKV, flags: StepFlags) -> torch.Tensor:
        """Device work of one packed step (no host syncs; capturable). Returns the decisions
        [rows, block] int32: the finalised token, or -1 where nothing was finalised."""
        states, bsz = self.states, self.block_size
        mask_id = self.config.mask_token_id
        rows = inputs.state_slot                                                # [rows]
        block = states.block[rows]                                              # [rows, bsz]
        if flags.any_reset:                                                     # open blocks
            block = torch.where(inputs.reset_block[:, None] > 0, mask_id, block)
            states.block.index_copy_(0, rows, block)
        flat_block = states.block.view(-1)
        if flags.any_host_tokens:
            ids = torch.where(inputs.block_index >= 0,
                              flat_block[inputs.block_index.clamp(min=0)], inputs.host_ids)
        else:                                                                   # blocks only
            ids = flat_block[inputs.block_index]                                # [tokens]
        hidden = self.model(ids[None], inputs.positions[None], None, kv)[0]    # [tokens, d]
        offsets = self._block_offsets                                           # [bsz]
        if self.config.prediction_shift:
            # Position 0 comes from the token before the block: in this pass (a commit) or
            # the state saved by the pass that committed it.
            ext = torch.cat((hidden, states.saved_hidden))                      # [tokens+S, d]
            index = torch.cat((inputs.first_index[:, None],
                               inputs.block_q_start[:, None] + offsets[None, :-1]), dim=1)
            picked = ext[index]                                                 # [rows, bsz, d]
            states.saved_hidden.index_copy_(0, rows, ext[inputs.first_index])
        else:
            picked = hidden[inputs.block_q_start[:, None] + offsets[None, :]]
        logits = self.model.logits(picked)                                      # [rows, bsz, V]
        if self.keep_logits:
            self._kept_logits = logits
        eligible = (block == mask_id) & (offsets[None, :] < inputs.block_limit[:, None])
        floats, ints = states.float_settings[rows], states.int_settings[rows]
        sampling = SamplingTensors(
            temperature=floats[:, 0], top_p=floats[:, 1], top_k=ints[:, 0], min_p=floats[:, 2],
            noise_key=inputs.noise_key, any_random=flags.any_random,
            any_filter=flags.any_filter)
        tokens, score = predict_tokens(logits, sampling)
        chosen = select_positions(score, eligible, floats[:, 3], ints[:, 1])
        decided = torch.where(chosen, tokens, -1)
        states.block.index_copy_(0, rows, torch.where(chosen, decided, block))
        return decided.to(torch.int32)

    # --- dense modes: the same model with a mask, state from the host --------------------------
    def _decide_dense(self, seqs: list[Sequence], logits: torch.Tensor) -> Decisions:
        device = logits.device
        block = torch.tensor([s.block for s in seqs], device=device)               # [batch, block]
        limit = torch.tensor([s.block_limit for s in seqs], device=device)
        positions = torch.arange(self.block_size, device=device)
        eligible = (block == self.config.mask_token_id) & (positions[None, :] < limit[:, None])
        floats = torch.tensor([[0.0 if s.params.greedy else s.params.temperature,
                                s.params.top_p, s.params.min_p,
                                log_odds_threshold(s.threshold)] for s in seqs], device=device)
        ints = torch.tensor([integer_settings(s.params, self.block_size) + [self._noise_key(s)]
                             for s in seqs], device=device)
        sampling = SamplingTensors(
            temperature=floats[:, 0], top_p=floats[:, 1], top_k=ints[:, 0], min_p=floats[:, 2],
            noise_key=ints[:, 2], any_random=any(not s.params.greedy for s in seqs),
            any_filter=any(_filters(s) for s in seqs))
        tokens, score = predict_tokens(logits, sampling)
        chosen = select_positions(score, eligible, floats[:, 3], ints[:, 1])
        if self.keep_logits:
            self._kept_logits = logits
        return _to_lists(torch.where(chosen, tokens, -1).cpu().numpy())

    def _logits_reference(self, seqs: list[Sequence]) -> torch.Tensor:
        rows = [s.known_tokens + s.block for s in seqs]
        segments = [sequence_segments(s.prompt_len, len(r), self.block_size) for s, r in zip(seqs, rows)]
        starts = [len(s.known_tokens) for s in seqs]
        return self._full_sequence_logits(rows, segments, starts)

    def _logits_bidirectional(self, seqs: list[Sequence]) -> torch.Tensor:
        rows, segments, starts = [], [], []
        for seq in seqs:
            future = (seq.num_window_blocks * self.block_size - seq.generated_len - self.block_size)
            row = seq.known_tokens + seq.block + [self.config.mask_token_id] * future
            rows.append(row)
            segments.append(torch.zeros(len(row), dtype=torch.long))
            starts.append(len(seq.known_tokens))
        return self._full_sequence_logits(rows, segments, starts)

    def _full_sequence_logits(self, rows: list[list[int]], segments: list[torch.Tensor],
                              block_starts: list[int]) -> torch.Tensor:
        device = self.device
        width = max(len(r) for r in rows)
        batch = len(rows)
        ids = torch.full((batch, width), self.config.mask_token_id, dtype=torch.long)
        seg = torch.full((batch, width), _PAD_SEGMENT, dtype=torch.long)
        valid = torch.zeros((batch, width), dtype=torch.bool)
        for r, (row, row_seg) in enumerate(zip(rows, segments)):
            ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
            seg[r, :len(row)] = row_seg
            valid[r, :len(row)] = True
        ids, seg, valid = ids.to(device), seg.to(device), valid.to(device)
        positions = torch.arange(width, device=device)[None, :].expand(batch, -1)
        mask = block_causal_mask(seg, seg, valid)
        bias = torch.zeros(mask.shape, dtype=self.dtype, device=device).masked_fill_(
            ~mask, float("-inf"))   # CPU attention kernels run faster with an additive mask
        hidden = self.model(ids, positions, bias)
        starts = torch.tensor(block_starts, device=device)[:, None]
        index = starts - self.config.prediction_shift + torch.arange(self.block_size, device=device)[None, :]
        picked = hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return self.model.logits(picked)

    # --- test hook ----------------------------------------------------------------------------
    def step_logits(self) -> torch.Tensor:
        """[rows, block, vocab] logits of the last group run with `keep_logits` set."""
        assert self._kept_logits is not None, "set keep_logits before the step"
        return self._kept_logits


def _filters(seq: Sequence) -> bool:
    p = seq.params
    return not p.greedy and (p.top_p < 1.0 or p.top_k > 0 or p.min_p > 0.0)


def _to_lists(decided: np.ndarray) -> Decisions:
    """[rows, block] token-or-minus-one -> per row (ascending positions, tokens)."""
    rows, cols = np.nonzero(decided >= 0)          # row-major: each row's positions ascend
    tokens = decided[rows, cols].tolist()
    out: Decisions = [([], []) for _ in range(decided.shape[0])]
    for r, c, t in zip(rows.tolist(), cols.tolist(), tokens):
        out[r][0].append(c)
        out[r][1].append(t)
    return out
