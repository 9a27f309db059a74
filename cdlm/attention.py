"""Block-causal attention: the one mask rule shared by the engine, the reference path and training.

Every token carries a *segment id*: the prompt is segment 0, generated block b is segment b+1.
A query sees a key iff the key's segment is <= the query's segment (and the key is real, not
padding). Inside a segment attention is bidirectional; across segments it is causal. Keys that
come from the KV cache belong to earlier segments, so they are visible to every query.
A bidirectional teacher is the special case where every token has the same segment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Segment id given to cached prefix keys: smaller than any live segment, so always visible.
CACHED_SEGMENT = -1


def block_causal_mask(
    query_segments: torch.Tensor,  # [batch, q_len] int
    key_segments: torch.Tensor,    # [batch, k_len] int
    key_valid: torch.Tensor,       # [batch, k_len] bool
) -> torch.Tensor:
    """Boolean attention mask [batch, 1, q_len, k_len]; True means "may attend"."""
    visible = key_segments[:, None, :] <= query_segments[:, :, None]
    return (visible & key_valid[:, None, :]).unsqueeze(1)


def sequence_segments(prompt_len: int, total_len: int, block_size: int,
                      device: torch.device | None = None) -> torch.Tensor:
    """Segment ids [total_len] of a prompt followed by generated blocks of `block_size`."""
    positions = torch.arange(total_len, device=device)
    generated = (positions - prompt_len).clamp(min=0)
    segments = torch.div(generated, block_size, rounding_mode="floor") + 1
    return torch.where(positions < prompt_len, torch.zeros_like(segments), segments)


def training_block_causal_mask(prompt_lens: torch.Tensor, seq_len: int, block_size: int,
                               valid: torch.Tensor | None = None) -> torch.Tensor:
    """The block-causal mask for a padded training batch: [batch, 1, seq_len, seq_len].

    prompt_lens: [batch]; valid: [batch, seq_len] (False on right padding) or None.
    """
    segments = torch.stack([sequence_segments(int(p), seq_len, block_size, prompt_lens.device)
                            for p in prompt_lens.tolist()])
    if valid is None:
        valid = torch.ones_like(segments, dtype=torch.bool)
    return block_causal_mask(segments, segments, valid)


def attend(
    q: torch.Tensor,           # [batch, heads, q_len, head_dim]
    k: torch.Tensor,           # [batch, kv_heads, k_len, head_dim]
    v: torch.Tensor,           # [batch, kv_heads, k_len, head_dim]
    mask: torch.Tensor | None,  # [batch, 1, q_len, k_len] bool, or None for full attention
) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads: [batch, heads, q_len, head_dim]."""
    grouped = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)
