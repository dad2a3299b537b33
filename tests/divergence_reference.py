"""Brute-force float64 references for the divergences, written from the definitions with no shared code.

Each reference works on explicit probability vectors, one position at a time, in float64. Gradients of the
references come from autograd through these definitions, so they check the hand-written backward passes.
"""

from __future__ import annotations

import torch


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v log(p_v / q_v), with 0 log 0 = 0; p, q probability vectors (last dim)."""
    safe_q = torch.where(p > 0, q, torch.ones_like(q))
    return torch.where(p > 0, p * (torch.log(torch.where(p > 0, p, torch.ones_like(p))) - torch.log(safe_q)), 0.0).sum(-1)


def divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """student, teacher: probability vectors. The convention of the project's math notes; mixed_kl is SD-Zero's
    weighted sum of the two KLs, alpha on the reverse one."""
    if kind == "mixed_kl":
        return (1 - alpha) * kl(teacher, student) + alpha * kl(student, teacher)
    if kind == "forward_kl" or (kind == "alpha_js" and alpha == 0.0):
        return kl(teacher, student)
    if kind == "reverse_kl" or (kind == "alpha_js" and alpha == 1.0):
        return kl(student, teacher)
    mixture = alpha * teacher + (1 - alpha) * student
    return alpha * kl(teacher, mixture) + (1 - alpha) * kl(student, mixture)


def softmax64(logits: torch.Tensor) -> torch.Tensor:
    z = logits.to(torch.float64)
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def full_vocab(logits, teacher_log_probs, kind, alpha):
    return divergence(softmax64(logits), torch.exp(teacher_log_probs.to(torch.float64)), kind, alpha)


def clipped_forward_kl(logits, teacher_log_probs, clip):
    """OPSD's clamped forward KL: sum_v min(T_v (log T_v - log S_v), clip), 0 log 0 = 0 (a clamped entry is
    constant, so autograd gives it no gradient)."""
    student = softmax64(logits)
    teacher = torch.exp(teacher_log_probs.to(torch.float64))
    safe = torch.where(teacher > 0, teacher, torch.ones_like(teacher))
    terms = torch.where(teacher > 0, teacher * (torch.log(safe) - torch.log(student)), 0.0)
    return torch.clamp(terms, max=clip).sum(-1)


def with_tail(probs_on_support: torch.Tensor) -> torch.Tensor:
    tail = (1 - probs_on_support.sum(-1, keepdim=True)).clamp(min=0)
    return torch.cat([probs_on_support, tail], -1)


def topk_plus_tail(logits, teacher_topk_log_probs, teacher_topk_indices, kind, alpha):
    student = softmax64(logits).gather(-1, teacher_topk_indices)
    teacher = torch.exp(teacher_topk_log_probs.to(torch.float64))
    return divergence(with_tail(student), with_tail(teacher), kind, alpha)


def topk_renormalized(logits, teacher_topk_log_probs, teacher_topk_indices, kind, alpha):
    """Both distributions restricted to the teacher's top-K tokens and renormalized there (no tail)."""
    student = softmax64(logits).gather(-1, teacher_topk_indices)
    teacher = torch.exp(teacher_topk_log_probs.to(torch.float64))
    return divergence(student / student.sum(-1, keepdim=True), teacher / teacher.sum(-1, keepdim=True), kind, alpha)


def entropy(logits):
    p = softmax64(logits)
    return -(torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), 0.0)).sum(-1)


def support_rows(student_logits, teacher_log_probs, support: str, k: int) -> list:
    """Per row, the set of vocabulary ids of a top-K ``support`` (teacher / student / union), from sorting."""
    rows = []
    for student_row, teacher_row in zip(student_logits.tolist(), teacher_log_probs.tolist()):
        by_teacher = sorted(range(len(teacher_row)), key=lambda v: -teacher_row[v])[:k]
        by_student = sorted(range(len(student_row)), key=lambda v: -student_row[v])[:k]
        rows.append({"teacher": set(by_teacher), "student": set(by_student),
                     "union": set(by_teacher) | set(by_student)}[support])
    return rows


def on_support(logits, teacher_log_probs, supports: list, kind, alpha, tail: str):
    """Per row, the divergence over the row's support set plus a tail bucket ('bucket') or renormalized over it."""
    student, teacher = softmax64(logits), torch.exp(teacher_log_probs.to(torch.float64))
    values = []
    for row, ids in enumerate(supports):
        index = torch.tensor(sorted(ids))
        s, t = student[row, index].unsqueeze(0), teacher[row, index].unsqueeze(0)
        if tail == "bucket":
            s, t = with_tail(s), with_tail(t)
        else:
            s, t = s / s.sum(-1, keepdim=True), t / t.sum(-1, keepdim=True)
        values.append(divergence(s, t, kind, alpha)[0])
    return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64)
