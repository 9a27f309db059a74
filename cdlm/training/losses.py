"""The training objectives: LLaDA's masked-diffusion loss and CDLM's three distillation losses.

All are pure functions of tensors so they can be unit-tested in isolation (SPEC section 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# t is drawn from (EPS_T, 1]: the 1/t weight stays bounded.
EPS_T = 1e-3


def sample_mask_ratio(batch: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """t ~ U(EPS_T, 1] per sequence: [batch]."""
    u = torch.rand(batch, generator=generator, device=device)
    return EPS_T + (1.0 - EPS_T) * u


def random_answer_mask(answer_mask: torch.Tensor, t: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask every answer position independently with probability t (its row's ratio).

    The prompt is never masked (SFT): answer_mask [batch, seq] bool, t [batch].
    """
    u = torch.rand(answer_mask.shape, generator=generator, device=answer_mask.device)
    return answer_mask_from_noise(answer_mask, t, u)


def answer_mask_from_noise(answer_mask: torch.Tensor, t: torch.Tensor, u: torch.Tensor
                           ) -> torch.Tensor:
    """`random_answer_mask` with its uniforms u [batch, seq] drawn beforehand."""
    return (u.to(answer_mask.device) < t.to(answer_mask.device)[:, None]) & answer_mask


def masked_diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                          weights: torch.Tensor, answer_mask: torch.Tensor,
                          num_rows: int | None = None) -> torch.Tensor:
    """LLaDA's SFT loss: sum over masked positions of weight * CE, divided by each row's answer
    length, averaged over rows. weights [batch, seq] (1/t on randomly masked positions).
    `num_rows`: the rows of the whole batch when this is one part of it (the parts then sum
    to the whole batch's loss); default: these rows are the batch."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [b, s]
    return masked_diffusion_loss_from_ce(ce, masked, weights, answer_mask, num_rows)


def masked_diffusion_loss_from_ce(ce: torch.Tensor, masked: torch.Tensor, weights: torch.Tensor,
                                  answer_mask: torch.Tensor, num_rows: int | None = None
                                  ) -> torch.Tensor:
    per_row = (ce * weights * masked).sum(-1) / answer_mask.sum(-1).clamp(min=1)
    return per_row.mean() if num_rows is None else per_row.sum() / max(1, num_rows)


def forward_kl(target_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_target || p_student) per row of [n, vocab] logits: [n]. Zero iff equal distributions."""
    target_logp = F.log_softmax(target_logits.float(), dim=-1)
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    return (target_logp.exp() * (target_logp - student_logp)).sum(-1)


def _mean_over(values: torch.Tensor, count: int | None) -> torch.Tensor:
    """Mean of `values` [n], or their sum over `count` positions of a whole batch that these
    are a part of (the parts of a split batch then sum to the whole batch's mean)."""
    return values.mean() if count is None else values.sum() / max(1, count)


def distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                      count: int | None = None) -> torch.Tensor:
    """Mean forward KL from the teacher's distribution at finalisation to the student's
    prediction at the earlier state y, over the positions newly unmasked between y and y*."""
    if teacher_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    return _mean_over(forward_kl(teacher_logits.detach(), student_logits), count)


def consistency_loss(student_logits_y: torch.Tensor, student_logits_ystar: torch.Tensor,
                     count: int | None = None) -> torch.Tensor:
    """Mean KL from the student's own prediction at the more informed state y* (a stop-gradient
    target) to its prediction at y, over the positions still masked in y*."""
    if student_logits_y.shape[0] == 0:
        return student_logits_y.sum() * 0.0
    return _mean_over(forward_kl(student_logits_ystar.detach(), student_logits_y), count)
