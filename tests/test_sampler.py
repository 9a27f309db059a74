"""The confidence-threshold rule as pure tensor functions."""

from __future__ import annotations

import torch

from cdlm.sampler import predict_tokens, select_positions, top_p_filter


def _select(conf, eligible=None, threshold=0.9, per_step=0):
    conf = torch.tensor(conf)
    eligible = torch.ones_like(conf, dtype=torch.bool) if eligible is None else torch.tensor(eligible)
    rows = conf.shape[0]
    return select_positions(conf, eligible, torch.full((rows,), threshold),
                            torch.full((rows,), per_step, dtype=torch.long)).tolist()


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


def test_ties_go_to_the_leftmost_position():
    assert _select([[0.5, 0.5, 0.5]]) == [[True, False, False]]


def test_rows_are_independent():
    got = select_positions(torch.tensor([[0.95, 0.1], [0.2, 0.3]]), torch.ones(2, 2, dtype=torch.bool),
                           torch.tensor([0.9, 0.9]), torch.tensor([0, 0]))
    assert got.tolist() == [[True, False], [False, True]]


def test_greedy_prediction_is_argmax_with_its_probability():
    logits = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]])
    tokens, conf = predict_tokens(logits, [0.0], [1.0], [None])
    probs = torch.softmax(logits, -1)
    assert tokens.tolist() == [[1, 0]]
    torch.testing.assert_close(conf, probs.max(-1).values)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(1, 16, 50, generator=torch.Generator().manual_seed(0))

    def sample(seed):
        return predict_tokens(logits, [1.0], [1.0], [torch.Generator().manual_seed(seed)])[0]

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = top_p_filter(probs, torch.tensor([0.7]))
    assert kept[0, 2:].sum() == 0 and torch.isclose(kept.sum(), torch.tensor(1.0))
    # Sampling under a tiny top_p is greedy.
    logits = torch.log(probs)[None]
    tokens, conf = predict_tokens(logits.expand(1, 8, 4).clone(), [1.0], [0.01],
                                  [torch.Generator().manual_seed(1)])
    assert tokens.unique().tolist() == [0] and torch.allclose(conf, torch.ones_like(conf))


def _sample_many(logits, rows=1, **kw):
    """Tokens drawn at 2000 positions sharing one distribution (one row, many positions)."""
    block = logits.expand(rows, 2000, logits.shape[-1]).clone()
    tokens, conf = predict_tokens(block, [1.0] * rows, [1.0] * rows,
                                  [torch.Generator().manual_seed(5)] * rows, **kw)
    return tokens, conf


def test_top_k_one_is_the_greedy_token_choice():
    logits = torch.randn(1, 16, 50, generator=torch.Generator().manual_seed(3))
    greedy, _ = predict_tokens(logits, [0.0], [1.0], [None])
    sampled, conf = predict_tokens(logits, [1.0], [1.0], [torch.Generator().manual_seed(9)],
                                   top_k=[1], min_p=[0.0])
    assert torch.equal(sampled, greedy)


def test_top_k_samples_only_among_the_k_most_likely():
    logits = torch.log(torch.tensor([[[0.4, 0.3, 0.2, 0.1]]]))
    tokens, conf = _sample_many(logits, top_k=[2], min_p=[0.0])
    assert set(tokens.unique().tolist()) == {0, 1}
    # renormalised over the two: 0.4/0.7 and 0.3/0.7
    share = (tokens == 0).float().mean().item()
    assert abs(share - 4 / 7) < 0.05
    assert torch.allclose(conf[tokens == 0], torch.tensor(4 / 7))
    # -1 and 0 mean no limit
    for off in (-1, 0):
        tokens, _ = _sample_many(logits, top_k=[off], min_p=[0.0])
        assert set(tokens.unique().tolist()) == {0, 1, 2, 3}


def test_min_p_is_relative_to_the_most_likely_token():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    # floor = 0.5 * 0.5 = 0.25: keeps 0.5 and 0.3, drops 0.15 and 0.05
    tokens, conf = _sample_many(logits, top_k=[-1], min_p=[0.5])
    assert set(tokens.unique().tolist()) == {0, 1}
    assert torch.allclose(conf[tokens == 1], torch.tensor(0.3 / 0.8))
    # floor = 0.2 * 0.5 = 0.1: keeps three
    tokens, _ = _sample_many(logits, top_k=[-1], min_p=[0.2])
    assert set(tokens.unique().tolist()) == {0, 1, 2}
    # min_p = 1 keeps only the most likely token (and its ties)
    tokens, _ = _sample_many(logits, top_k=[-1], min_p=[1.0])
    assert tokens.unique().tolist() == [0]


def test_filters_apply_per_row():
    logits = torch.log(torch.tensor([[[0.4, 0.3, 0.2, 0.1]]])).expand(2, 1, 4)
    block = logits.expand(2, 500, 4).clone()
    tokens, _ = predict_tokens(block, [1.0, 1.0], [1.0, 1.0],
                               [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)],
                               top_k=[1, -1], min_p=[0.0, 0.0])
    assert tokens[0].unique().tolist() == [0] and len(tokens[1].unique()) == 4


def test_sampling_params_validate_top_k_min_p_and_tiny_temperatures():
    import math

    import pytest

    from cdlm.sampling_params import SamplingParams
    assert SamplingParams(temperature=1e-9).greedy and SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    for bad in ({"top_k": -2}, {"top_k": 1.5}, {"min_p": 1.5}, {"min_p": -0.1},
                {"temperature": math.inf}, {"temperature": math.nan}, {"min_p": math.nan}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
