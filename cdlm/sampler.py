"""Confidence-threshold block decoding (Fast-dLLM "parallel" rule), as pure tensor functions.

Per step and per request: at every masked position predict a token (argmax when greedy, a
sample after temperature/top-p otherwise) and take its probability as the confidence. Finalise
every eligible position whose confidence reaches the threshold; if none does, the single most
confident one. With `tokens_per_step = k` finalise exactly the k most confident instead.
Everything stays on the device; the caller syncs once to read what was finalised.
"""

from __future__ import annotations

import torch


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tail outside the nucleus and renormalise. probs [rows, vocab], top_p [rows]."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    outside = (cumulative - sorted_probs) > top_p[:, None]  # keeps at least the top token
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def predict_tokens(
    logits: torch.Tensor,                       # [batch, block, vocab]
    temperature: list[float],
    top_p: list[float],
    generators: list[torch.Generator | None],
    top_k: list[int] | None = None,             # per row; -1 or 0: no limit
    min_p: list[float] | None = None,           # per row; 0: off
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted token and its confidence per position: ([batch, block] long, [batch, block] float)."""
    probs = torch.softmax(logits.float(), dim=-1)
    confidence, tokens = probs.max(dim=-1)
    for row, temp in enumerate(temperature):
        if temp == 0.0:
            continue
        # One generator per request: what a seeded request samples does not depend on the batch.
        row_probs = torch.softmax(logits[row].float() / temp, dim=-1)       # [block, vocab]
        if top_k is not None and 0 < top_k[row] < row_probs.shape[-1]:
            kth = row_probs.topk(top_k[row], dim=-1).values[:, -1:]         # [block, 1]
            row_probs = row_probs.masked_fill(row_probs < kth, 0.0)
            row_probs = row_probs / row_probs.sum(dim=-1, keepdim=True)
        if top_p[row] < 1.0:
            row_probs = top_p_filter(row_probs, torch.full((row_probs.shape[0],), top_p[row],
                                                           device=row_probs.device))
        if min_p is not None and min_p[row] > 0.0:
            floor = min_p[row] * row_probs.max(dim=-1, keepdim=True).values  # [block, 1]
            row_probs = row_probs.masked_fill(row_probs < floor, 0.0)
            row_probs = row_probs / row_probs.sum(dim=-1, keepdim=True)
        sampled = torch.multinomial(row_probs, 1, generator=generators[row])  # [block, 1]
        tokens[row] = sampled[:, 0]
        confidence[row] = row_probs.gather(-1, sampled)[:, 0]
    return tokens, confidence


def select_positions(
    confidence: torch.Tensor,       # [batch, block]
    eligible: torch.Tensor,         # [batch, block] bool: masked and decodable
    threshold: torch.Tensor,        # [batch]
    tokens_per_step: torch.Tensor,  # [batch] long; 0 means "use the threshold rule"
) -> torch.Tensor:
    """Which positions to finalise this step: [batch, block] bool."""
    scored = confidence.masked_fill(~eligible, -1.0)
    # Rank 0 = most confident; stable so ties go to the leftmost position.
    order = scored.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1, stable=True)
    above = scored >= threshold[:, None]
    fallback = (rank == 0) & ~above.any(dim=-1, keepdim=True)
    by_threshold = above | fallback
    by_count = rank < tokens_per_step[:, None]
    chosen = torch.where(tokens_per_step[:, None] > 0, by_count, by_threshold)
    return chosen & eligible
