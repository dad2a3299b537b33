"""Offline top-K distillation's per-token loss: cross-entropy on the data's tokens + lambda x KD to a stored teacher.

    term_t = -log S(y_t) + lambda * w_t * D(T_t || S_t)   on the trained tokens (0 elsewhere)

``D`` is the top-K divergence (``divergences.topk_divergence``) on the teacher's stored K ids, with a tail bucket or
renormalized; the cross-entropy is read from the same pass over the logits. ``w_t`` is 1, or with
``teacher_target_prob`` the teacher's (detached) probability of the target token y_t: where the teacher does not back
the data's token, the data's cross-entropy alone drives the update. A teacher stored as raw logits has no tail mass:
its K values are renormalized (``teacher_log_probs``), which needs the renormalized form of D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slime_self_distill.core.divergences import DEFAULT_CHUNK_SIZE, topk_divergence

TOKEN_WEIGHTS = ("uniform", "teacher_target_prob")


@dataclass
class SftKdTerms:
    terms: torch.Tensor  # [R] differentiable, 0 on the rows that are not trained
    metrics: dict  # name -> [R] detached, 0 on the rows that are not trained


def placeholder_topk(rows: int, k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher rows for the rows that are not trained: ids 0..K-1 at probability 1/(2K) each (finite, distinct ids and
    a non-empty tail, so that the divergence of a row the mask leaves out is finite and its gradient 0)."""
    ids = torch.arange(k, dtype=torch.int32, device=device).repeat(rows, 1)
    return ids, torch.full((rows, k), math.log(0.5 / k), dtype=torch.float32, device=device)


def teacher_log_probs(values: torch.Tensor, value_kind: str) -> torch.Tensor:
    """The teacher's log-probabilities at its K ids: stored as such, or the log-softmax of K raw logits."""
    if value_kind == "logprobs":
        return values.float()
    if value_kind == "logits":
        return torch.log_softmax(values.float(), dim=-1)
    raise ValueError(f"unknown teacher value kind {value_kind!r}; expected logprobs or logits")


def teacher_target_prob(log_probs: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """T(y) from the K stored entries: the entry whose id is the target, 0 when the target is not among them."""
    hit = ids.long() == targets.long().unsqueeze(-1)
    return torch.where(hit, log_probs.exp(), 0.0).sum(-1)


def sft_kd_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    trained: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs_at_ids: torch.Tensor,
    *,
    divergence: str,
    alpha: float,
    tail: str,
    kd_weight: float,
    token_weight: str = "uniform",
    tp_group=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SftKdTerms:
    """Per-token terms of one sample's rows: ``logits`` [R, V/TP] (this rank's vocabulary shard), ``targets`` [R]
    (global ids), ``trained`` [R] bool, the teacher's ``teacher_ids`` [R, K] and its log-probabilities there
    ``teacher_log_probs_at_ids`` [R, K] (rows that are not trained hold any finite placeholder with distinct ids)."""
    if token_weight not in TOKEN_WEIGHTS:
        raise ValueError(f"unknown KD token weight {token_weight!r}; choose one of {', '.join(TOKEN_WEIGHTS)}")
    kd = topk_divergence(logits, targets, teacher_log_probs_at_ids, teacher_ids, divergence=divergence, alpha=alpha,
                         tp_group=tp_group, chunk_size=chunk_size, tail=tail, with_entropy=False)
    target_prob = teacher_target_prob(teacher_log_probs_at_ids, teacher_ids, targets).to(kd.loss_terms.dtype)
    weight = target_prob if token_weight == "teacher_target_prob" else torch.ones_like(target_prob)
    cross_entropy = -kd.target_log_probs
    terms = torch.where(trained, cross_entropy + kd_weight * weight * kd.loss_terms, 0.0)

    def shown(value: torch.Tensor) -> torch.Tensor:
        return torch.where(trained, value.detach().to(terms.dtype), 0.0)

    top1 = (teacher_ids[:, 0].long() == targets.long()).to(terms.dtype)
    return SftKdTerms(terms, {
        "sft_loss": shown(cross_entropy),
        "kd_loss": shown(kd.divergence),
        "kd_token_weight": shown(weight),
        "kd_teacher_target_prob": shown(target_prob),
        "kd_teacher_top1_is_target": shown(top1),
        "kd_teacher_captured_mass": shown(kd.teacher_captured_mass),
    })
