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
