"""LGD's objective: the student mimics the teacher's similarity distributions over VSB and TSB."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_temp: float, teacher_temp: float
) -> torch.Tensor:
    """``-(softmax(z_t/τ_t) * log_softmax(z_s/τ_s)).sum(1).mean()``; the teacher side carries no gradient."""
    target = F.softmax(teacher_logits.detach() / teacher_temp, dim=1)
    return -(target * F.log_softmax(student_logits / student_temp, dim=1)).sum(1).mean()


def lgd_loss(
    s: torch.Tensor,
    t: torch.Tensor,
    tsb: torch.Tensor,
    vsb: torch.Tensor,
    student_temp: float = 0.2,
    teacher_temp: float = 0.01,
    alpha: float = 0.5,
    t_tsb: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(loss, l_vis, l_tex)`` with ``loss = alpha * L_VIS + (1 - alpha) * L_TEX``.

    ``s``/``t``: L2-normalised student/teacher embeddings [B, D]; ``tsb``/``vsb``: banks [C, D].
    L_VIS compares the distributions over ``[self, VSB]`` (``s·t`` vs ``t·t``), L_TEX those over TSB.
    ``t_tsb`` lets the caller pass the ``t @ TSB.T`` it already computed for the LGKA assignment.
    Everything is computed in fp32: τ_t = 0.01 turns fp16 rounding into large logit errors.
    """
    s, t = s.float(), t.detach().float()
    tsb, vsb = tsb.float(), vsb.float()
    logits_s_vis = torch.cat([(s * t).sum(1, keepdim=True), s @ vsb.T], dim=1)
    logits_t_vis = torch.cat([(t * t).sum(1, keepdim=True), t @ vsb.T], dim=1)
    l_vis = soft_cross_entropy(logits_s_vis, logits_t_vis, student_temp, teacher_temp)
    if t_tsb is None:
        t_tsb = t @ tsb.T
    l_tex = soft_cross_entropy(s @ tsb.T, t_tsb.float(), student_temp, teacher_temp)
    return alpha * l_vis + (1 - alpha) * l_tex, l_vis, l_tex
