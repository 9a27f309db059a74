"""The confidence-threshold rule, the log-odds confidence and batched seeded sampling."""

from __future__ import annotations

import math

import pytest
import torch

from cdlm.sampler import (SamplingTensors, filter_logits, gumbel_noise, log_odds,
                          log_odds_threshold, noise_key, predict_tokens, select_positions,
                          splitmix64, splitmix64_int)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _select(conf, eligible=None, threshold=0.9, per_step=0):
    """conf given as probabilities, turned into the log-odds the rule compares."""
    score = torch.tensor([[_logit(p) for p in row] for row in conf])
    eligible = torch.ones_like(score, dtype=torch.bool) if eligible is None else torch.tensor(eligible)
    rows = score.shape[0]
    return select_positions(score, eligible, torch.full((rows,), log_odds_threshold(threshold)),
                            torch.full((rows,), per_step, dtype=torch.long)).tolist()


def _sampling(rows: int, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, keys=None):
    full = lambda v, dtype=torch.float32: torch.full((rows,), v, dtype=dtype)  # noqa: E731
    random = temperature > 0
    return SamplingTensors(
        temperature=full(temperature), top_p=full(top_p), top_k=full(top_k, torch.long),
        min_p=full(min_p), noise_key=(torch.tensor(keys) if keys is not None
                                      else torch.arange(rows, dtype=torch.long)),
        any_random=random, any_filter=random and (top_p < 1 or top_k > 0 or min_p > 0))


def test_threshold_finalises_every_confident_position():
    assert _select([[0.95, 0.2, 0.91, 0.9]]) == [[True, False, True, True]]


def test_fallback_finalises_the_single_most_confident():
    assert _select([[0.3, 0.6, 0.5, 0.1]]) == [[False, True, False, False]]


def test_ineligible_positions_are_never_chosen():
    # Position 0 is already decided (or past the end), even though it is the most confident.
    assert _select([[0.99, 0.4, 0.7]], eligible=[[False, True, True]]) == [[False, False, True]]
    assert _select([[0.99, 0.95]], eligible=[[False, False]]) == [[False, False]]


def test_tokens_per_step_takes_exactly_k_most_confident():
    assert _select([[0.1, 0.99, 0.5, 0.98]], per_step=2) == [[False, True, False, True]]
    # Fewer eligible than k: all of them.
    assert _select([[0.1, 0.99]], eligible=[[True, False]], per_step=3) == [[True, False]]


def test_exact_ties_go_to_the_leftmost_position():
    assert _select([[0.5, 0.5, 0.5]]) == [[True, False, False]]


def test_rows_are_independent():
    got = _select([[0.95, 0.1], [0.2, 0.3]])
    assert got == [[True, False], [False, True]]


def test_threshold_one_is_never_reached():
    assert _select([[0.999999, 0.5]], threshold=1.0) == [[True, False]]
    assert log_odds_threshold(1.0) == math.inf


def test_log_odds_matches_fp64_and_keeps_saturated_positions_apart():
    # Gaps of 20 and 30 nats: fp32 softmax rounds both top probabilities to exactly 1.0.
    logits = torch.tensor([[0.0, 20.0, -1.0], [30.0, 0.0, -2.0], [1.0, 1.2, 0.9]])
    probs32 = torch.softmax(logits, -1).max(-1).values
    assert probs32[0] == probs32[1] == 1.0
    tokens = logits.argmax(-1)
    got = log_odds(logits, tokens)
    l64 = logits.double()
    expected = [float(l64[r, t] - torch.logsumexp(torch.cat((l64[r, :t], l64[r, t + 1:])), 0))
                for r, t in enumerate(tokens.tolist())]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert got[1] > got[0]


def test_saturated_positions_are_ranked_by_true_confidence_not_position():
    # Position 1 is the more confident one although both saturate to 1.0 in fp32.
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 25.0
    logits[0, 1, 1] = 35.0
    logits[0, 2, 3] = 1.0
    tokens, score = predict_tokens(logits, _sampling(1))
    chosen = select_positions(score, torch.ones(1, 3, dtype=torch.bool),
                              torch.tensor([math.inf]), torch.tensor([1]))
    assert chosen.tolist() == [[False, True, False]]
    assert tokens.tolist() == [[2, 1, 3]]


def test_bf16_logits_score_like_their_fp32_values():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 8
    low = logits.bfloat16()
    tokens = low.argmax(-1)
    torch.testing.assert_close(log_odds(low, tokens), log_odds(low.float(), tokens))


def test_greedy_prediction_is_argmax_scored_by_its_log_odds():
    logits = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]])
    tokens, score = predict_tokens(logits, _sampling(1))
    probs = torch.softmax(logits, -1).max(-1).values
    assert tokens.tolist() == [[1, 0]]
    torch.testing.assert_close(score, torch.log(probs) - torch.log1p(-probs))


def test_confidence_is_untempered_so_temperature_does_not_change_the_count():
    logits = torch.randn(1, 16, 30, generator=torch.Generator().manual_seed(3)) * 3
    greedy_tokens, greedy_score = predict_tokens(logits, _sampling(1))
    # A tiny (but sampled) temperature draws the argmax; its score must be the greedy score,
    # not the near-certainty of the tempered distribution.
    tokens, score = predict_tokens(logits, _sampling(1, temperature=1e-4, keys=[9]))
    assert torch.equal(tokens, greedy_tokens)
    torch.testing.assert_close(score, greedy_score)


def test_seeded_sampling_is_reproducible_seed_dependent_and_batch_invariant():
    logits = torch.randn(3, 16, 50, generator=torch.Generator().manual_seed(0))

    def sample(rows, keys):
        return predict_tokens(logits[rows], _sampling(len(rows), temperature=1.0, keys=keys))[0]

    alone = sample([1], [77])
    assert torch.equal(alone, sample([1], [77]))
    assert not torch.equal(alone, sample([1], [78]))
    batched = sample([0, 1, 2], [5, 77, 6])
    assert torch.equal(batched[1:2], alone)


def test_gumbel_draws_follow_the_softmax():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = 20000
    noise = gumbel_noise(torch.arange(draws, dtype=torch.long) * 7919, 1, 4)[:, 0]
    picks = (torch.log(probs)[None, :] + noise).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / draws
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_noise_is_the_same_function_on_every_device_and_host():
    keys = torch.tensor([0, 1, -5, 2**62], dtype=torch.long)
    expected = [splitmix64_int(int(k)) for k in keys]
    assert splitmix64(keys).tolist() == expected
    assert noise_key(3, 4) != noise_key(3, 5) != noise_key(4, 4)


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(2, 8, 20, generator=torch.Generator().manual_seed(1)) * 2
    greedy = logits.argmax(-1)
    assert torch.equal(predict_tokens(logits, _sampling(2, temperature=1.0, top_k=1))[0], greedy)
    assert torch.equal(predict_tokens(logits, _sampling(2, temperature=1.0, top_p=1e-6))[0],
                       greedy)


def test_filters_keep_what_they_should():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_logits(  # noqa: E731
        z, torch.tensor([kw.get("top_k", 0)]), torch.tensor([kw.get("top_p", 1.0)]),
        torch.tensor([kw.get("min_p", 0.0)]))).tolist()[0]
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(min_p=0.5) == [True, True, False, False]      # p >= 0.25
    assert kept(min_p=0.2) == [True, True, True, False]       # p >= 0.1
    assert kept() == [True, True, True, True]


def test_sampling_with_filters_never_draws_outside_them():
    logits = torch.randn(4, 32, 40, generator=torch.Generator().manual_seed(2))
    top3 = logits.topk(3, dim=-1).indices
    tokens, _ = predict_tokens(logits, _sampling(4, temperature=2.0, top_k=3, keys=[1, 2, 3, 4]))
    assert (tokens[..., None] == top3).any(-1).all()
