"""Which completion tokens enter the distillation loss, and with what (detached) weight.

Pure torch plus an optional process group. Per-token tensors are flat ``[N]`` over the tokens of a micro-batch
(samples concatenated); ``sample_lengths`` splits them back into samples.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from slime_self_distill.core.divergences import group_rank_and_size

# exp() of a log-ratio beyond this overflows nothing and is far past any sensible cap.
_MAX_ABS_LOG_RATIO = 20.0


def mask_leading_tokens(loss_mask: Sequence[int], num_to_skip: int) -> list:
    """``loss_mask`` with its first ``num_to_skip`` completion tokens out of the loss: numerator and denominator
    (the official SDFT code's ``num_loss_tokens_to_skip``)."""
    return [0] * min(num_to_skip, len(loss_mask)) + list(loss_mask[num_to_skip:])


def _gather_variable_length(values: torch.Tensor, group) -> torch.Tensor:
    """Concatenate 1-D tensors of different lengths from every rank of ``group`` (same result on every rank)."""
    _, world = group_rank_and_size(group)
    if world == 1:
        return values
    length = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    longest = int(max(int(n) for n in lengths))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[: int(n)] for g, n in zip(gathered, lengths)])


def entropy_quantile_threshold(
    entropy: torch.Tensor, candidates: torch.Tensor, quantile: float, group=None
) -> Optional[torch.Tensor]:
    """The entropy of the ``ceil(quantile * n)``-th highest-entropy candidate token, pooled over ``group``:
    keeping tokens at or above it keeps the top ``quantile`` fraction (ties included).

    Every rank of ``group`` (the data-parallel group, context-parallel ranks included) gets the same threshold,
    so a token's fate does not depend on which rank it landed on. Collective: every rank must call it for every
    micro-batch. Returns None when ``quantile`` is 1 (keep everything, no communication) or no rank has a
    candidate token.
    """
    if quantile >= 1.0:
        return None
    pooled = _gather_variable_length(entropy.detach()[candidates], group)
    if pooled.numel() == 0:
        return None
    num_kept = math.ceil(quantile * pooled.numel())
    return pooled.kthvalue(pooled.numel() - num_kept + 1).values  # the num_kept-th largest


def keep_top_entropy(entropy: torch.Tensor, threshold: Optional[torch.Tensor]) -> torch.Tensor:
    if threshold is None:
        return torch.ones_like(entropy, dtype=torch.bool)
    return entropy >= threshold


def truncated_importance_weights(
    train_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    *,
    mode: str,
    cap: float,
    valid: torch.Tensor,
    sample_lengths: Sequence[int],
    group=None,
) -> torch.Tensor:
    """Detached ``min(exp(log p_train - log p_rollout), cap)`` per token, or per sequence as the mean over the
    sequence's valid tokens of that clipped ratio (each token clipped, then averaged: the official SDFT code's
    sequence weight; an outlier token cannot lift the whole sequence past the cap).

    ``group`` (sequence mode): the context-parallel group, whose ranks each hold part of every sequence.
    Tokens outside ``valid`` are left out of sequence mode's mean and keep their own (unused) token weight.
    """
    if mode not in ("token", "sequence"):
        raise ValueError(f"importance correction mode must be 'token' or 'sequence', got {mode!r}")
    dtype = torch.promote_types(train_log_probs.dtype, torch.float32)
    log_ratio = (train_log_probs.detach().to(dtype) - rollout_log_probs.detach().to(dtype)).clamp(
        -_MAX_ABS_LOG_RATIO, _MAX_ABS_LOG_RATIO
    )
    ratio = log_ratio.exp().clamp(max=cap)
    if mode == "token":
        return ratio
    lengths = torch.tensor(list(sample_lengths), dtype=torch.long, device=ratio.device)
    sample_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=ratio.device), lengths)
    valid_ratio = torch.where(valid, ratio, torch.zeros_like(ratio))
    per_sample = ratio.new_zeros(len(lengths), 2).index_add_(
        0, sample_of_token, torch.stack([valid_ratio, valid.to(ratio.dtype)], -1)
    )
    if group_rank_and_size(group)[1] > 1:
        dist.all_reduce(per_sample, group=group)
    sequence_weight = per_sample[:, 0] / per_sample[:, 1].clamp(min=1.0)
    return sequence_weight[sample_of_token]
