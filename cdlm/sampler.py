"""Confidence-threshold block decoding (Fast-dLLM "parallel" rule), as pure tensor functions.

Per step and per request, at every masked position of the block:
1. predict a token: the argmax when greedy, otherwise a draw from the tempered distribution
   after top-k / top-p / min-p filtering;
2. score it by its confidence under the model's *untempered* distribution (temperature decides
   which token is drawn, never how many are finalised);
3. finalise every eligible position whose confidence reaches the threshold, or the single most
   confident one if none does; with `tokens_per_step = k`, exactly the k most confident.

The confidence is kept in log-odds, `log p - log(1 - p) = l_c - logsumexp_{j != c} l_j`, which
is strictly monotone in `p` and is computed without ever forming `1 - tiny`: an fp32 softmax
saturates at exactly 1.0 for confident positions, so their order (the teacher's trajectory
order) would collapse into ties. Scores that remain exactly equal are broken towards the
leftmost position.

Sampling draws Gumbel noise from a counter-based hash of (request seed, request step, block
position, vocabulary index): no generator state, no per-row loop, the same draws whatever the
batch, and the same on CPU and CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cdlm.sampling_params import GREEDY_TEMPERATURE

# Logit rows processed at once by the fp32 scoring (bounds its temporary memory on large
# vocabularies: 2^24 elements = 64 MiB in fp32).
_SCORE_CHUNK_ELEMENTS = 1 << 24


def log_odds_threshold(threshold: float) -> float:
    """The log-odds of a probability threshold in (0, 1]; 1.0 maps to +inf (never reached)."""
    if threshold >= 1.0:
        return math.inf
    return math.log(threshold) - math.log1p(-threshold)


@dataclass
class SamplingTensors:
    """One step's per-request sampling settings, [rows] each, on the logits' device.

    `any_random` and `any_filter` are host-side facts that let an all-greedy step skip the
    sampling work entirely (and keep it out of a captured graph)."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_p: torch.Tensor        # float32; 1 = off
    top_k: torch.Tensor        # int64; 0 = off
    min_p: torch.Tensor        # float32; 0 = off
    noise_key: torch.Tensor    # int64; mix of the request's seed and step (see noise_keys)
    any_random: bool
    any_filter: bool

    @classmethod
    def greedy(cls, rows: int, device: torch.device | str) -> "SamplingTensors":
        zeros = torch.zeros(rows, device=device)
        return cls(temperature=zeros, top_p=torch.ones(rows, device=device),
                   top_k=torch.zeros(rows, dtype=torch.long, device=device), min_p=zeros,
                   noise_key=torch.zeros(rows, dtype=torch.long, device=device),
                   any_random=False, any_filter=False)


# --- counter-based random numbers ----------------------------------------------------------
_MASK64 = (1 << 64) - 1


def _as_signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


_GOLDEN = _as_signed(0x9E3779B97F4A7C15)
_MIX1 = _as_signed(0xBF58476D1CE4E5B9)
_MIX2 = _as_signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on negative values)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (two's-complement wraparound, as on both
    devices): a bijection whose outputs pass as independent uniform 64-bit words."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def splitmix64_int(x: int) -> int:
    """The same function on a Python int (host-side key mixing)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return _as_signed(z ^ (z >> 31))


def noise_key(seed: int, step: int) -> int:
    """The key of one request's draws in one of its steps (host side, one int per request)."""
    return splitmix64_int(splitmix64_int(seed) ^ step)


def gumbel_noise(keys: torch.Tensor, block: int, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise [rows, block, vocab] (float32), a pure function of the keys."""
    device = keys.device
    position = splitmix64(keys[:, None] + torch.arange(block, device=device)[None, :])
    words = splitmix64(position[:, :, None] * vocab
                       + torch.arange(vocab, device=device)[None, None, :])
    uniform = (_shift_right(words, 40).float() + 0.5) * (1.0 / (1 << 24))   # (0, 1)
    return -torch.log(-torch.log(uniform))


# --- scoring -------------------------------------------------------------------------------
def log_odds(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p - log(1 - p) of `tokens` under softmax(logits), in fp32.

    logits [rows, vocab] (any float dtype), tokens [rows] -> [rows]. Computed as
    `l_c - logsumexp_{j != c} l_j`, so a confident position keeps its distance from the next
    one instead of rounding to probability 1.0."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    chunk = max(1, _SCORE_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    for lo in range(0, logits.shape[0], chunk):
        x = logits[lo:lo + chunk].float()
        tok = tokens[lo:lo + chunk, None]
        chosen = x.gather(-1, tok)[:, 0]
        rest = torch.logsumexp(x.scatter(-1, tok, float("-inf")), dim=-1)
        out[lo:lo + chunk] = chosen - rest
    return out


# --- sampling ------------------------------------------------------------------------------
def filter_logits(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Tempered logits z [rows, vocab] with everything outside top-k, then the top-p nucleus,
    then min-p (relative to the most likely token) set to -inf. Settings are [rows]; 0 / 1 / 0
    switch each filter off. At least the most likely token always survives."""
    vocab = z.shape[-1]
    sorted_z, order = z.sort(dim=-1, descending=True)                     # [rows, vocab]
    rank = torch.arange(vocab, device=z.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    drop = rank >= k[:, None]
    probs = torch.softmax(sorted_z.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before > top_p[:, None]
    keep_log_ratio = torch.log(min_p.clamp(min=1e-30))[:, None]
    drop |= (min_p[:, None] > 0) & (sorted_z - sorted_z[:, :1] < keep_log_ratio)
    drop[:, 0] = False
    return z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))


def predict_tokens(logits: torch.Tensor, sampling: SamplingTensors
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted token and its log-odds confidence per position.

    logits [batch, block, vocab] -> (tokens [batch, block] long, score [batch, block] fp32)."""
    batch, block, vocab = logits.shape
    tokens = logits.argmax(dim=-1)                                         # [batch, block]
    if sampling.any_random:
        tokens = torch.where((sampling.temperature > 0)[:, None],
                             _sample(logits, sampling), tokens)
    score = log_odds(logits.reshape(-1, vocab), tokens.reshape(-1)).view(batch, block)
    return tokens, score


def _sample(logits: torch.Tensor, sampling: SamplingTensors) -> torch.Tensor:
    """Gumbel-max draws from the tempered, filtered distribution: [batch, block]."""
    batch, block, vocab = logits.shape
    temperature = sampling.temperature.clamp(min=GREEDY_TEMPERATURE)
    z = logits.float() / temperature[:, None, None]
    if sampling.any_filter:
        def per_position(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(block)
        z = filter_logits(z.reshape(-1, vocab), per_position(sampling.top_k),
                          per_position(sampling.top_p), per_position(sampling.min_p)
                          ).view(batch, block, vocab)
    return (z + gumbel_noise(sampling.noise_key, block, vocab)).argmax(dim=-1)


# --- selection -----------------------------------------------------------------------------
def select_positions(
    score: torch.Tensor,            # [batch, block] log-odds confidence
    eligible: torch.Tensor,         # [batch, block] bool: masked and decodable
    threshold: torch.Tensor,        # [batch] log-odds threshold (log_odds_threshold)
    tokens_per_step: torch.Tensor,  # [batch] long; 0 means "use the threshold rule"
) -> torch.Tensor:
    """Which positions to finalise this step: [batch, block] bool."""
    scored = score.masked_fill(~eligible, float("-inf"))
    # Rank 0 = most confident; stable, so exactly equal scores go to the leftmost position.
    order = scored.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1, stable=True)
    above = scored >= threshold[:, None]
    fallback = (rank == 0) & ~above.any(dim=-1, keepdim=True)
    by_threshold = above | fallback
    by_count = rank < tokens_per_step[:, None]
    chosen = torch.where(tokens_per_step[:, None] > 0, by_count, by_threshold)
    return chosen & eligible
