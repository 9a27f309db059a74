"""Block-wise decoding of a bidirectional teacher, batched, with hidden-state capture.

This is the engine's `bidirectional` mode (cdlm/model_runner.py) re-expressed as one batched
loop so that `collect` can record what the engine does not expose: the step at which each
position was finalised and the teacher's last hidden state at that moment. The selection rule
is the engine's own (`cdlm.sampler.select_positions`), and a test checks that tokens and steps
equal `LLM.generate(mode="bidirectional")` exactly.

Per row the input is prompt + the whole generation window (undecided positions hold the mask
token), full attention; each step decodes inside the current block only (semi-autoregressive).
The early-stop rule is the engine's: an end token finalised at block position p makes the
positions after p undecodable; the request ends when its block has no undecided position left
before that limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdlm.attention import block_causal_mask
from cdlm.models.transformer import DiffusionLM
from cdlm.sampler import SamplingTensors, log_odds_threshold, predict_tokens, select_positions


@dataclass
class DecodeResult:
    tokens: torch.Tensor   # [batch, gen_len] final tokens (mask id where never decided)
    steps: torch.Tensor    # [batch, gen_len] step at which each position was finalised, -1 never
    hidden: torch.Tensor | None  # [batch, gen_len, hidden] at finalisation (zeros if never)
    num_steps: torch.Tensor  # [batch] forward passes each row took part in


@torch.no_grad()
def decode_bidirectional(model: DiffusionLM, prompts: list[list[int]], gen_len: int,
                         block_size: int, stop_ids: set[int], tokens_per_step: int = 1,
                         threshold: float = 1.0, record_hidden: bool = False) -> DecodeResult:
    """Greedy block-wise decoding. tokens_per_step=k finalises the k most confident masked
    positions of the block per step; tokens_per_step=0 uses the threshold rule instead."""
    cfg = model.config
    device = next(model.parameters()).device
    batch = len(prompts)
    prompt_lens = torch.tensor([len(p) for p in prompts], device=device)
    num_blocks = -(-gen_len // block_size)
    window = num_blocks * block_size
    width = int(prompt_lens.max()) + window
    ids = torch.full((batch, width), cfg.mask_token_id, dtype=torch.long, device=device)
    valid = torch.zeros((batch, width), dtype=torch.bool, device=device)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = torch.tensor(p, device=device)
        valid[r, :len(p) + window] = True
    # Undecided positions are masks; the engine's bidirectional row is exactly this row.
    steps = torch.full((batch, gen_len), -1, dtype=torch.long, device=device)
    hidden_out = (torch.zeros(batch, gen_len, cfg.hidden_size, device=device)
                  if record_hidden else None)
    num_steps = torch.zeros(batch, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    zeros = torch.zeros_like(ids)
    mask_full = block_causal_mask(zeros, zeros, valid)   # one segment: full attention
    arange_b = torch.arange(block_size, device=device)
    for b in range(num_blocks):
        limit = torch.full((batch,), min(block_size, gen_len - b * block_size), device=device)
        starts = prompt_lens + b * block_size                                    # [batch]
        while True:
            cols = starts[:, None] + arange_b[None, :]                           # [batch, B]
            block = ids.gather(1, cols)
            eligible = (block == cfg.mask_token_id) & (arange_b[None, :] < limit[:, None])
            rows = (active & eligible.any(-1)).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                break
            h = model(ids[rows], attention_mask=mask_full[rows])                 # [n, width, d]
            index = (cols[rows] - cfg.prediction_shift)[:, :, None].expand(-1, -1, h.shape[-1])
            h_block = h.gather(1, index)                                         # [n, B, d]
            logits = model.logits(h_block)
            tok, conf = predict_tokens(logits, SamplingTensors.greedy(len(rows), device))
            chosen = select_positions(
                conf, eligible[rows],
                torch.full((len(rows),), log_odds_threshold(threshold), device=device),
                torch.full((len(rows),), tokens_per_step, device=device, dtype=torch.long))
            num_steps[rows] += 1
            _apply(ids, steps, hidden_out, limit, rows, cols, chosen, tok, h_block,
                   num_steps, b * block_size, stop_ids)
        # A row ends after this block if it stopped early or its window is used up.
        for r in range(batch):
            if not active[r]:
                continue
            lim = int(limit[r])
            last = int(ids[r, int(starts[r]) + lim - 1])
            if last in stop_ids or (b + 1) * block_size >= gen_len:
                active[r] = False
        if not active.any():
            break
    gen = torch.stack([ids[r, int(prompt_lens[r]):int(prompt_lens[r]) + gen_len]
                       for r in range(batch)])
    return DecodeResult(gen, steps, hidden_out, num_steps)


def _apply(ids: torch.Tensor, steps: torch.Tensor, hidden_out: torch.Tensor | None,
           limit: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, chosen: torch.Tensor,
           tok: torch.Tensor, h_block: torch.Tensor, num_steps: torch.Tensor, offset: int,
           stop_ids: set[int]) -> None:
    """Write the finalised tokens row by row, in ascending position order like the engine, so an
    end token cuts off the positions after it (even ones chosen in the same step)."""
    for i, r in enumerate(rows.tolist()):
        for pos in chosen[i].nonzero(as_tuple=True)[0].tolist():
            if pos >= int(limit[r]):
                continue
            t = int(tok[i, pos])
            ids[r, cols[r, pos]] = t
            steps[r, offset + pos] = num_steps[r] - 1
            if hidden_out is not None:
                hidden_out[r, offset + pos] = h_block[i, pos]
            if t in stop_ids and pos + 1 < int(limit[r]):
                limit[r] = pos + 1
