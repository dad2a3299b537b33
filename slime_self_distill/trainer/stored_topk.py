"""Trainer-side glue of offline top-K distillation: each training batch gets its samples' stored teacher top-K.

The converter's ``StoredTopK`` payload (``rollout_data["prompt"]``) holds rows for the trained tokens only; the loss
reads one row per response token, in slime's context-parallel layout (``get_responses``). ``response_rows`` spreads
the stored rows over the response (a finite placeholder on the rows that are not trained: the loss mask leaves them
out), and the glue slices them as slime slices per-token values (``slice_log_prob_with_cp``).
"""

from __future__ import annotations

from typing import Callable

import torch

from slime_self_distill.core.sft_kd import placeholder_topk, teacher_log_probs
from slime_self_distill.teacher_view import (
    PAYLOAD_KEY,
    TEACHER_TOPK_INDICES_KEY,
    TEACHER_TOPK_LOG_PROBS_KEY,
    StoredTopK,
)


def response_rows(stored: StoredTopK, response_loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [R, K] int32, teacher log-probs [R, K] float32)`` over the R response tokens: the stored rows at the
    trained ones, in order; ``placeholder_topk`` rows elsewhere."""
    trained = response_loss_mask.bool().cpu()
    rows, k = stored.ids.shape
    if int(trained.sum()) != rows:
        raise ValueError(f"data row idx {stored.idx}: {int(trained.sum())} trained tokens in the training batch, "
                         f"{rows} stored teacher rows (the converter checked them: the loss mask changed on the way)")
    ids, log_probs = placeholder_topk(trained.numel(), k)
    # copies: Ray hands the arrays over read-only, which torch.from_numpy warns about
    ids[trained] = torch.tensor(stored.ids)
    log_probs[trained] = teacher_log_probs(torch.tensor(stored.values), stored.value_kind)
    return ids, log_probs


def add_stored_topk(batch: dict, slice_response: Callable) -> dict:
    """Replace the payload of a training batch by the teacher keys the loss reads, one ``[R_local, K]`` tensor per
    sample on the batch's device. ``slice_response(tensor, total_length, response_length)``: slime's CP slicing."""
    payload = batch.pop(PAYLOAD_KEY)
    if payload is None or any(not isinstance(item, StoredTopK) for item in payload):
        raise RuntimeError(
            f"the training batch's {PAYLOAD_KEY!r} payload is not the stored teacher top-K: offline top-K distillation "
            "needs the plugin's converter (--custom-convert-samples-to-train-data-path "
            "slime_self_distill.custom_convert.convert_samples_to_train_data)"
        )
    device = batch["tokens"].device
    ids_per_sample, log_probs_per_sample = [], []
    for stored, mask, total, response in zip(payload, batch["loss_masks"], batch["total_lengths"],
                                             batch["response_lengths"], strict=True):
        ids, log_probs = response_rows(stored, mask)
        ids_per_sample.append(slice_response(ids, total, response).to(device, non_blocking=True))
        log_probs_per_sample.append(slice_response(log_probs, total, response).to(device, non_blocking=True))
    batch[TEACHER_TOPK_INDICES_KEY] = ids_per_sample
    batch[TEACHER_TOPK_LOG_PROBS_KEY] = log_probs_per_sample
    return batch
