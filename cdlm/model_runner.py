"""Turns a scheduled step into tensors, runs the model once per decoding mode, samples.

Three ways to get the logits of each request's current block (see docs/ARCHITECTURE.md):
- `cdlm`: block-causal with the exact KV cache. The pass carries the tokens to commit (the
  prompt on a request's first pass, the just-completed block afterwards) followed by the current
  block; the committed tokens' K/V are written to the pool in that same pass.
- `reference`: block-causal, recomputing prompt + completed blocks + block every step.
- `bidirectional`: the teacher: prompt + the whole generation window, full attention.

Dream predicts position i from hidden state i-1, so block position 0 comes from the last
committed token. In `cdlm` mode that token is only in the pass that commits it; its logits are
kept per request for the block's later steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdlm.attention import CACHED_SEGMENT, block_causal_mask, sequence_segments
from cdlm.config import ModelConfig
from cdlm.kv_cache import KVCachePool
from cdlm.models.transformer import DiffusionLM, KVWrite
from cdlm.sampler import predict_tokens, select_positions
from cdlm.scheduler import Sequence

# Segment given to padding queries: they may look at every real key (their output is dropped),
# which keeps softmax rows from being empty.
_PAD_SEGMENT = 1 << 30


@dataclass
class BlockLogits:
    seqs: list[Sequence]
    logits: torch.Tensor  # [batch, block, vocab]


class ModelRunner:
    def __init__(self, model: DiffusionLM, pool: KVCachePool, block_size: int,
                 engine_seed: int = 0) -> None:
        self.model = model
        self.config: ModelConfig = model.config
        self.pool = pool
        self.block_size = block_size
        self.device = next(model.parameters()).device
        self._first_logits: dict[str, torch.Tensor] = {}     # Dream, cdlm mode: [vocab]
        self._generators: dict[str, torch.Generator] = {}
        self._seed_source = torch.Generator().manual_seed(engine_seed)

    # --- per-request state ------------------------------------------------------------------
    def release(self, seq_id: str) -> None:
        self._first_logits.pop(seq_id, None)
        self._generators.pop(seq_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.greedy:
            return None
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            seed = seq.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[seq.seq_id] = gen
        return gen

    # --- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, seqs: list[Sequence]) -> list[tuple[list[int], list[int]]]:
        """Run one denoising step for every sequence; returns the (positions, tokens) decided."""
        results: list[tuple[list[int], list[int]]] = [([], [])] * len(seqs)
        for indices in self._forward_groups(seqs):
            group = [seqs[i] for i in indices]
            logits = getattr(self, f"_logits_{group[0].mode}")(group)
            for i, decided in zip(indices, self._decide(group, logits)):
                results[i] = decided
        return results

    def _forward_groups(self, seqs: list[Sequence]) -> list[list[int]]:
        """Which sequences share a forward pass. Modes never mix. On a GPU one pass per mode
        (the step costs one read of the weights whatever the batch). On a CPU the cost is the
        tokens computed, so cached rows run in up to three passes by kind instead of padding
        everything to the widest: a block alone, a block after a committed block, and new
        requests (prompt + block, padded only among themselves)."""
        groups: dict[tuple[str, int], list[int]] = {}
        split_kinds = self.device.type == "cpu"
        for index, seq in enumerate(seqs):
            kind = 0
            if seq.mode == "cdlm" and split_kinds:
                pending = seq.num_pending_commit
                kind = 0 if pending == 0 else 1 if seq.num_cached >= seq.prompt_len else 2
            groups.setdefault((seq.mode, kind), []).append(index)
        return list(groups.values())

    def _decide(self, seqs: list[Sequence], logits: torch.Tensor
                ) -> list[tuple[list[int], list[int]]]:
        device = logits.device
        block = torch.tensor([s.block for s in seqs], device=device)               # [batch, block]
        limit = torch.tensor([s.block_limit for s in seqs], device=device)
        positions = torch.arange(self.block_size, device=device)
        eligible = (block == self.config.mask_token_id) & (positions[None, :] < limit[:, None])
        tokens, confidence = predict_tokens(
            logits, [s.params.temperature for s in seqs], [s.params.top_p for s in seqs],
            [self._generator(s) for s in seqs])
        threshold = torch.tensor([s.threshold for s in seqs], device=device)
        per_step = torch.tensor([s.params.tokens_per_step or 0 for s in seqs], device=device)
        chosen = select_positions(confidence, eligible, threshold, per_step)
        # The one host sync of the step: how many positions each row finalised, then which
        # (row-major, so each row's positions ascend) and to what.
        rows, cols = chosen.nonzero(as_tuple=True)
        batch, total = len(seqs), len(rows)
        flat = torch.cat((chosen.sum(dim=1), cols, tokens[rows, cols])).tolist()
        positions, picked = flat[batch:batch + total], flat[batch + total:]
        decided: list[tuple[list[int], list[int]]] = []
        start = 0
        for count in flat[:batch]:
            decided.append((positions[start:start + count], picked[start:start + count]))
            start += count
        return decided

    # --- cdlm: block-causal + exact KV cache --------------------------------------------------
    def _logits_cdlm(self, seqs: list[Sequence]) -> torch.Tensor:
        device, bsz = self.device, self.block_size
        commits = [s.pending_commit() for s in seqs]
        commit_len = torch.tensor([len(c) for c in commits], device=device)         # [batch]
        row_len = commit_len + bsz
        width = int(row_len.max())
        batch = len(seqs)
        pad = self.config.mask_token_id
        ids = torch.tensor([c + s.block + [pad] * (width - len(c) - bsz) for c, s in zip(commits, seqs)],
                           dtype=torch.long, device=device)                          # [batch, width]
        cached = torch.tensor([s.num_cached for s in seqs], device=device)          # [batch]
        offsets = torch.arange(width, device=device)[None, :]                       # [1, width]
        positions = cached[:, None] + offsets                                       # [batch, width]
        is_real = offsets < row_len[:, None]
        in_block = (offsets >= commit_len[:, None]) & is_real
        query_segments = torch.where(is_real, in_block.long(), torch.full_like(positions, _PAD_SEGMENT))

        page_table = self._page_table(seqs)
        # Keys of row r: its cached prefix (slots of positions < cached[r], padded to the
        # longest prefix), then its tokens of this pass. Padding reads slot 0, masked out.
        prefix_len = int(cached.max())
        prefix_pos = torch.arange(prefix_len, device=device)[None, :].expand(batch, -1)
        prefix_valid = prefix_pos < cached[:, None]
        safe_positions = torch.where(is_real, positions, cached[:, None])
        new_slots = self.pool.slots(page_table, safe_positions)                     # [batch, width]
        prefix_slots = self.pool.slots(page_table, torch.where(prefix_valid, prefix_pos, 0))
        key_slots = torch.cat((prefix_slots, new_slots), dim=1)                     # [batch, keys]
        key_segments = torch.cat((torch.full_like(prefix_pos, CACHED_SEGMENT), query_segments), 1)
        key_valid = torch.cat((prefix_valid, is_real), dim=1)
        mask = self._additive(block_causal_mask(query_segments, key_segments, key_valid))

        write_rows = is_real.reshape(-1).nonzero(as_tuple=True)[0]                  # [n]
        write_slots = new_slots.reshape(-1)[write_rows]
        kv = KVWrite(self.pool.k, self.pool.v, write_rows, write_slots, key_slots)
        hidden = self.model(ids, positions, mask, kv)                               # [batch, width, d]

        shift = self.config.prediction_shift
        gather = commit_len[:, None] - shift + torch.arange(bsz, device=device)[None, :]
        logits = self._gather_logits(hidden, gather.clamp(min=0))                   # [batch, bsz, vocab]
        if shift:
            for r, seq in enumerate(seqs):
                if commits[r]:
                    self._first_logits[seq.seq_id] = logits[r, 0].clone()
                else:
                    logits[r, 0] = self._first_logits[seq.seq_id]
        return logits

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        """Boolean mask -> additive bias in the model dtype, once per pass: the CPU attention
        kernels run markedly faster with it than with a boolean mask."""
        bias = torch.zeros(mask.shape, dtype=self.pool.k[0].dtype, device=mask.device)
        return bias.masked_fill_(~mask, float("-inf"))

    def _page_table(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(1, max(len(s.pages) for s in seqs))
        table = [s.pages + [0] * (width - len(s.pages)) for s in seqs]
        return torch.tensor(table, dtype=torch.long, device=self.device)

    def _gather_logits(self, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """lm_head only where a prediction is needed. index [batch, block] into the seq axis."""
        picked = hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return self.model.logits(picked)

    # --- reference: block-causal, no cache ------------------------------------------------------
    def _logits_reference(self, seqs: list[Sequence]) -> torch.Tensor:
        rows = [s.known_tokens + s.block for s in seqs]
        segments = [sequence_segments(s.prompt_len, len(r), self.block_size) for s, r in zip(seqs, rows)]
        starts = [len(s.known_tokens) for s in seqs]
        return self._full_sequence_logits(rows, segments, starts)

    # --- bidirectional teacher ------------------------------------------------------------------
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
        hidden = self.model(ids, positions, self._additive(block_causal_mask(seg, seg, valid)))
        starts = torch.tensor(block_starts, device=device)[:, None]
        index = starts - self.config.prediction_shift + torch.arange(self.block_size, device=device)[None, :]
        return self._gather_logits(hidden, index)
