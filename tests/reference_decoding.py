"""A plainly written fp64 reference of the naive teacher policy (SPEC section 2-3), our own:
block-wise low-confidence remasking, one token per step, no cache, greedy.

The whole generation window starts as masks after the prompt; full (bidirectional) attention;
blocks are decoded left to right; inside the current block, each step finalises the single
masked position whose predicted token is most confident. Confidence is compared in fp64
log-odds, log p - log(1 - p) = l_c - logsumexp_{j != c} l_j: the same order as the true
probability (it is monotone in p) but it never rounds to a tie, even where an fp64 softmax
would already say 1.0. Exactly equal scores go to the leftmost position. An end token
finalised at block position i makes the positions after i undecodable; the request ends when
its block has no masked position before that limit and that block ended with an end token, or
when the window is used up.
"""

from __future__ import annotations

import torch


def log_odds_fp64(logits: torch.Tensor, token: int) -> float:
    row = logits.double()
    others = torch.cat((row[:token], row[token + 1:]))
    return float(row[token] - torch.logsumexp(others, dim=0))


@torch.no_grad()
def naive_decode(model, prompt: list[int], gen_len: int, block_size: int,
                 stop_ids: set[int]) -> list[tuple[int, int]]:
    """The (block position offset from the generation start, token) finalised at each step."""
    cfg = model.config
    device = next(model.parameters()).device
    num_blocks = -(-gen_len // block_size)
    seq = list(prompt) + [cfg.mask_token_id] * (num_blocks * block_size)
    start = len(prompt)
    trajectory: list[tuple[int, int]] = []
    for b in range(num_blocks):
        first = start + b * block_size
        limit = min(block_size, gen_len - b * block_size)
        while True:
            masked = [i for i in range(limit) if seq[first + i] == cfg.mask_token_id]
            if not masked:
                break
            ids = torch.tensor([seq], device=device)
            logits = model.logits(model(ids))[0]                      # [len, vocab], full attention
            best = None
            for i in masked:
                row = logits[first + i - cfg.prediction_shift]
                token = int(row.double().argmax())
                score = log_odds_fp64(row, token)
                if best is None or score > best[0]:                   # strict: leftmost wins ties
                    best = (score, i, token)
            _, i, token = best
            seq[first + i] = token
            trajectory.append((b * block_size + i, token))
            if token in stop_ids and i + 1 < limit:
                limit = i + 1
        if seq[first + limit - 1] in stop_ids:
            break
    return trajectory
