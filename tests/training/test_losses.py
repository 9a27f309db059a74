"""CDLM losses: zero at the target, gradients only into LoRA, stop-gradient consistency target,
and the training mask is the engine's mask."""

from __future__ import annotations

import random

import pytest
import torch

from cdlm.attention import block_causal_mask, sequence_segments, training_block_causal_mask
from cdlm.training.distill import (DistillConfig, block_example, make_student, student_losses,
                              _base)
from cdlm.training.losses import (consistency_loss, distillation_loss, forward_kl,
                             masked_diffusion_loss)
from cdlm.training.trajectories import Trajectory


def test_kl_losses_are_zero_when_student_equals_target():
    logits = torch.randn(7, 11)
    assert distillation_loss(logits, logits.clone()).abs() < 1e-6
    assert consistency_loss(logits, logits.clone()).abs() < 1e-6
    other = torch.randn(7, 11)
    assert distillation_loss(logits, other) > 1e-3
    assert (forward_kl(logits, other) >= -1e-6).all()


def test_masked_diffusion_loss_is_zero_for_a_perfect_predictor_and_ignores_unmasked():
    targets = torch.randint(0, 5, (2, 6))
    perfect = torch.nn.functional.one_hot(targets, 5).float() * 100
    masked = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    answer = torch.ones_like(masked)
    weights = torch.full((2, 6), 3.0)
    assert masked_diffusion_loss(perfect, targets, masked, weights, answer) < 1e-6
    wrong = perfect.clone()
    wrong[0, 0] = 0  # an unmasked position: not part of the loss
    assert masked_diffusion_loss(wrong, targets, masked, weights, answer) < 1e-6
    wrong[0, 2] = -perfect[0, 2]  # a masked one is
    assert masked_diffusion_loss(wrong, targets, masked, weights, answer) > 1.0


def _fake_trajectory(prompt_len: int, gen_len: int, hidden: int, vocab: int,
                     seed: int = 0) -> Trajectory:
    g = torch.Generator().manual_seed(seed)
    steps = torch.randperm(gen_len, generator=g)
    # Block-wise order: every position of block 0 before any of block 1, etc.
    steps = torch.cat([torch.randperm(8, generator=g) + 8 * b for b in range(gen_len // 8)])
    return Trajectory(prompt_ids=torch.randint(8, vocab, (prompt_len,), generator=g),
                      tokens=torch.randint(8, vocab, (gen_len,), generator=g), steps=steps,
                      hidden=torch.randn(gen_len, hidden, generator=g),
                      answer_ids=torch.randint(8, vocab, (gen_len,), generator=g), meta={})


@pytest.fixture(scope="module")
def student(tiny_teacher_dir):
    return make_student(tiny_teacher_dir, DistillConfig(lora_r=4, lora_alpha=8))


def _examples(student, n=3):
    base = _base(student)
    rng = random.Random(0)
    trajs = [_fake_trajectory(5 + i, 16, base.config.hidden_size, base.config.vocab_size, i)
             for i in range(n)]
    return [block_example(t, rng.randrange(2), 8, base.config.mask_token_id, rng) for t in trajs]


def test_gradients_reach_only_lora_parameters(student):
    # Make LoRA B non-zero so that every LoRA parameter (A too) gets a gradient.
    for name, p in student.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    losses = student_losses(student, _examples(student), 8, DistillConfig())
    student.zero_grad()
    losses["loss"].backward()
    lora = {n for n, p in student.named_parameters() if "lora_" in n}
    assert lora and all(student.get_parameter(n).grad is not None for n in lora)
    for name, p in student.named_parameters():
        if "lora_" not in name:
            assert not p.requires_grad and p.grad is None, name
    # The lm_head (LLaDA's top-level ff_out) is never adapted, the layers' ff_out are.
    assert not any(n.startswith("base_model.model.model.transformer.ff_out.lora") for n in lora)
    assert any(".blocks.0.ff_out.lora_A" in n for n in lora)
    assert any(".blocks.0.q_proj.lora_A" in n for n in lora)


def test_consistency_target_carries_no_gradient():
    y = torch.randn(4, 9, requires_grad=True)
    y_star = torch.randn(4, 9, requires_grad=True)
    consistency_loss(y, y_star).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert y_star.grad is None


def test_consistency_target_is_computed_without_graph(student):
    """In the real loss the y* pass runs under no_grad: only the y pass builds a graph."""
    cfg = DistillConfig(w_distill=0.0, w_dlm=0.0, w_cons=1.0)
    for name, p in student.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    losses = student_losses(student, _examples(student, 4), 8, cfg)
    assert losses["cons"].requires_grad
    grads = torch.autograd.grad(losses["loss"], [p for p in student.parameters() if p.requires_grad])
    assert any(g.abs().sum() > 0 for g in grads)


def test_training_mask_equals_engine_mask():
    prompt_lens = torch.tensor([5, 3])
    seq_len, block = 5 + 3 * 4, 4
    valid = torch.arange(seq_len)[None, :] < torch.tensor([[seq_len], [seq_len - 2]])
    mask = training_block_causal_mask(prompt_lens, seq_len, block, valid)
    for r, p in enumerate(prompt_lens.tolist()):
        seg = sequence_segments(p, seq_len, block)
        engine = block_causal_mask(seg[None], seg[None], valid[r][None])
        assert torch.equal(mask[r], engine[0])
        # Spelled out: prompt rows see the prompt; block b sees prompt, blocks < b, block b.
        for q in range(int(valid[r].sum())):
            for k in range(int(valid[r].sum())):
                qb = -1 if q < p else (q - p) // block
                kb = -1 if k < p else (k - p) // block
                assert bool(mask[r, 0, q, k]) == (kb <= qb)


def test_block_example_states(student):
    base = _base(student)
    traj = _fake_trajectory(5, 16, base.config.hidden_size, base.config.vocab_size)
    mask_id = base.config.mask_token_id
    for seed in range(20):
        ex = block_example(traj, 1, 8, mask_id, random.Random(seed))
        assert ex.y.shape[0] == 5 + 16                      # truncated after block 1
        assert torch.equal(ex.y[:13], torch.cat([traj.prompt_ids, traj.tokens[:8]]))
        y_masked = ex.y[13:] == mask_id
        star_masked = ex.y_star[13:] == mask_id
        assert y_masked.any()                               # y is not complete
        assert (star_masked <= y_masked).all() and star_masked.sum() < y_masked.sum()
        assert torch.equal(ex.newly[13:], y_masked & ~star_masked)
        assert torch.equal(ex.still[13:], star_masked)
        assert ex.teacher_hidden.shape[0] == int(ex.newly.sum())
