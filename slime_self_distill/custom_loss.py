"""The self-distillation loss for slime's ``--loss-type custom_loss``.

``--custom-loss-function-path slime_self_distill.custom_loss.self_distill_loss``

slime calls ``self_distill_loss(args, batch, logits, sum_of_sample_mean)`` once per micro-batch with the packed
``[1, T_local, V/TP]`` logits. Per sample, the response rows are the rows slime's own ``get_responses`` gives
(context-parallel layout, ``--rollout-temperature``; found by running it on the row numbers, and cut from the logits
by one split); the teacher inputs come from the batch keys of
``slime_self_distill.teacher_view`` in the same layout. The per-token loss is reduced with slime's
``sum_of_sample_mean``, so slime's rescaling gives the right gradient scale for any number of samples per
micro-batch and with ``--calculate-per-token-loss``.

The computation itself (``per_token_distillation``) needs no slime: the glue only slices slime's batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from slime_self_distill.config import ConfigError, SelfDistillConfig, config_of, flag_name
from slime_self_distill.core.divergences import (
    TeacherLogProbs,
    TokenDivergence,
    full_vocab_divergence,
    group_rank_and_size,
    sampled_token_divergence,
    topk_divergence,
)
from slime_self_distill.core.sft_kd import placeholder_topk, sft_kd_terms
from slime_self_distill.core.teacher_logits import TeacherHiddenStates, teacher_support
from slime_self_distill.core.token_filters import (
    entropy_quantile_threshold,
    keep_top_entropy,
    truncated_importance_weights,
)
from slime_self_distill.teacher_view import (
    LOSS_WEIGHTS_KEY,
    TEACHER_HIDDEN_STATES_KEY,
    TEACHER_OUTPUT_WEIGHT_KEY,
    TEACHER_TOKEN_LOG_PROBS_KEY,
    TEACHER_TOPK_INDICES_KEY,
    TEACHER_TOPK_LOG_PROBS_KEY,
)
from slime_self_distill.trainer.teacher_outputs import HOST_KEYS, TeacherOutputSpec, gather_tp_rows, tp_row_block


@dataclass
class SampleRows:
    """One sample's response rows on this rank (context-parallel local), row for row with its logits."""

    logits: torch.Tensor  # [R, V/TP], divided by the rollout temperature
    tokens: torch.Tensor  # [R] sampled token ids (global vocabulary ids)
    valid: torch.Tensor  # [R] bool: slime's loss mask
    weight: float  # sample weight; 0 leaves the sample out (no teacher)
    teacher_token_log_probs: torch.Tensor  # [R]
    # the teacher's own top-K, as the teacher pass stored it (the 'topk' scope, teacher support)
    teacher_topk_log_probs: Optional[torch.Tensor] = None  # [R, K]
    teacher_topk_indices: Optional[torch.Tensor] = None  # [R, K]
    # the teacher's whole distribution [R, V/TP] ('full_vocab', and 'topk' from hidden states): recomputed from its
    # hidden states chunk by chunk, or given as log-probabilities
    teacher_distribution: Union[TeacherHiddenStates, TeacherLogProbs, None] = None
    rollout_log_probs: Optional[torch.Tensor] = None  # [R]


@dataclass
class PerTokenLoss:
    """Flat ``[N]`` per-token tensors over the micro-batch's samples (concatenated in order)."""

    terms: torch.Tensor  # differentiable, already multiplied by filters, importance and sample weights
    metrics: dict  # name -> detached per-token tensor, each to be reduced like the loss


def _divergence_for(sample: SampleRows, config: SelfDistillConfig, tp_group) -> TokenDivergence:
    common = dict(divergence=config.divergence, alpha=config.alpha, tp_group=tp_group, chunk_size=config.chunk_size)
    if config.kl_scope == "full_vocab":
        return full_vocab_divergence(sample.logits, sample.tokens, sample.teacher_distribution,
                                     term_clip=config.vocab_term_clip, **common)
    if config.kl_scope == "topk":
        if sample.teacher_distribution is None:  # the stored teacher top-K: the teacher's support
            return topk_divergence(sample.logits, sample.tokens, sample.teacher_topk_log_probs,
                                   sample.teacher_topk_indices, tail=config.topk_tail, **common)
        support = teacher_support(sample.logits.detach(), sample.teacher_distribution, config.topk_support,
                                  config.topk, tp_group, config.chunk_size)
        return topk_divergence(sample.logits, sample.tokens, support.teacher_log_probs, support.ids,
                               present=support.present, tail=config.topk_tail, **common)
    return sampled_token_divergence(
        sample.logits, sample.tokens, sample.teacher_token_log_probs, ratio_cap=config.sampled_ratio_cap, **common
    )


def per_token_distillation(
    samples: Sequence[SampleRows],
    config: SelfDistillConfig,
    *,
    tp_group=None,
    data_parallel_group=None,
    context_parallel_group=None,
) -> PerTokenLoss:
    """The weighted per-token loss terms and per-token metrics of one micro-batch.

    ``data_parallel_group`` (data parallel with context parallel) pools the entropy threshold;
    ``context_parallel_group`` completes per-sequence importance weights. Both are collectives that every rank
    of the group runs once per micro-batch, whatever its samples.
    """
    results = [_divergence_for(s, config, tp_group) for s in samples]
    lengths = [s.tokens.shape[0] for s in samples]
    device = samples[0].logits.device if samples else torch.device("cpu")

    def cat(values, dtype=None):
        if not values:
            return torch.zeros(0, dtype=dtype or torch.float32, device=device)
        return torch.cat([v.reshape(-1) for v in values])

    terms = cat([r.loss_terms for r in results])
    divergence = cat([r.divergence for r in results])
    entropy = cat([r.student_entropy for r in results])
    student_token = cat([r.student_token_log_probs for r in results])
    teacher_token = cat([s.teacher_token_log_probs.to(student_token.dtype) for s in samples])
    valid = cat([s.valid.bool() for s in samples], torch.bool)
    sample_weight = cat(
        [torch.full((n,), float(s.weight), dtype=terms.dtype, device=device) for s, n in zip(samples, lengths)]
    )
    has_teacher = sample_weight > 0

    # The first --self-distill-num-loss-tokens-to-skip tokens are out of the loss mask already (the converter).
    threshold = entropy_quantile_threshold(entropy, valid & has_teacher, config.top_entropy_quantile,
                                           data_parallel_group)
    keep = keep_top_entropy(entropy, threshold)

    if config.importance_correction == "off":
        importance = torch.ones_like(terms.detach())
    else:
        if any(s.rollout_log_probs is None for s in samples):
            raise ConfigError(
                f"{flag_name('importance_correction')} {config.importance_correction} needs the rollout engine's "
                "log-probabilities, but slime sent no rollout_log_probs; make the rollout return log-probs or set "
                f"{flag_name('importance_correction')} off"
            )
        importance = truncated_importance_weights(
            student_token,
            cat([s.rollout_log_probs for s in samples]),
            mode=config.importance_correction,
            cap=config.importance_cap,
            valid=valid,
            sample_lengths=lengths,
            group=context_parallel_group,
        ).to(terms.dtype)

    token_weight = keep.to(terms.dtype) * importance * sample_weight
    # where(), not a product alone: a masked-out row must not turn a non-finite term into NaN.
    weighted = torch.where(token_weight > 0, terms * token_weight, torch.zeros_like(terms))
    # Metrics are reduced like the loss, so they average over the samples that have a teacher.
    present = sample_weight
    metrics = {
        f"self_distill_{config.kl_scope}_{config.divergence}": divergence * present,
        "self_distill_student_entropy": entropy * present,
        "self_distill_kept_fraction": keep.to(terms.dtype) * present,
        "self_distill_importance_weight": importance * present,
        "self_distill_teacher_minus_student_log_prob": (teacher_token - student_token) * present,
    }
    if config.kl_scope == "topk":
        metrics["self_distill_teacher_captured_mass"] = cat([r.teacher_captured_mass for r in results]) * present
    return PerTokenLoss(terms=weighted, metrics=metrics)


def reduce_per_token_loss(
    per_token: PerTokenLoss, sum_of_sample_mean: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """slime's reduction; a micro-batch without rows still returns a zero loss connected to ``logits``."""
    if per_token.terms.numel() == 0:
        loss = 0.0 * logits.sum()
        metrics = {name: loss.detach().clone() for name in per_token.metrics}
    else:
        loss = sum_of_sample_mean(per_token.terms)
        metrics = {name: sum_of_sample_mean(value.detach()).detach() for name, value in per_token.metrics.items()}
    return loss, {"loss": loss.detach().clone(), **metrics}


# ---------------------------------------------------------------------- slime glue
def _teacher_output_weight(batch: dict, vocab_local: int) -> torch.Tensor:
    weight = batch.get(TEACHER_OUTPUT_WEIGHT_KEY)
    if weight is None:
        raise KeyError(
            f"self-distillation loss: batch key {TEACHER_OUTPUT_WEIGHT_KEY!r} (the teacher's output-layer shard) is "
            "missing; the teacher pass installed by --custom-megatron-init-path slime_self_distill.megatron_hooks."
            "install keeps it with the hidden-state teacher store"
        )
    if weight.dim() != 2 or weight.shape[0] != vocab_local:
        raise ValueError(
            f"self-distillation loss: the teacher's output-layer shard has shape {tuple(weight.shape)}, expected "
            f"[{vocab_local}, H] (this rank's vocabulary shard of the student's logits)"
        )
    return weight


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ")"


def _checked_teacher_input(batch: dict, key: str, index: int, expected: tuple, device) -> torch.Tensor:
    """Sample ``index`` of batch key ``key``, checked against ``expected``: sizes, or names (any size) as "K"."""
    if key not in batch or batch[key] is None:
        raise KeyError(
            f"self-distillation loss: batch key {key!r} is missing (needed for every sample, expected shape "
            f"{_shape_text(expected)} for sample {index}); the teacher pass installed by --custom-megatron-init-path "
            "slime_self_distill.megatron_hooks.install produces it"
        )
    values = batch[key]
    if index >= len(values):
        raise ValueError(
            f"self-distillation loss: batch key {key!r} has {len(values)} entries, sample {index} has none"
        )
    value = values[index]
    shape = tuple(value.shape)
    if len(shape) != len(expected) or any(isinstance(e, int) and e != s for e, s in zip(expected, shape)):
        raise ValueError(
            f"self-distillation loss: batch key {key!r} of sample {index} has shape {shape}, expected "
            f"{_shape_text(expected)} (the student's response rows on this rank)"
        )
    return value.to(device, non_blocking=True)


def _parallel_groups():
    from megatron.core import mpu

    tp = mpu.get_tensor_model_parallel_group() if mpu.get_tensor_model_parallel_world_size() > 1 else None
    cp = mpu.get_context_parallel_group() if mpu.get_context_parallel_world_size() > 1 else None
    dp = mpu.get_data_parallel_group(with_context_parallel=True)
    return tp, dp, cp


def self_distill_loss(args, batch: dict, logits: torch.Tensor, sum_of_sample_mean) -> tuple[torch.Tensor, dict]:
    """slime's custom-loss entry point: ``(loss, metrics)`` for one micro-batch."""
    from slime.backends.megatron_utils.cp_utils import slice_log_prob_with_cp

    config = config_of(args)
    if config.offline:
        return offline_kd_loss(args, batch, logits, sum_of_sample_mean, config)
    spec = TeacherOutputSpec.from_args(args, config)
    tp_group, dp_group, cp_group = _parallel_groups()
    total_lengths, response_lengths = batch["total_lengths"], batch["response_lengths"]
    weights = batch.get(LOSS_WEIGHTS_KEY)
    rollout_log_probs = batch.get("rollout_log_probs")
    keys = spec.output_keys

    samples = []
    # slime's get_responses rows (temperature, CP layout), cut from the logits by one split
    scaled, layout = scaled_logits_and_layout(args, batch, logits)
    responses = zip(rows_by_sample(scaled, layout), (tokens.to(scaled.device) for _, tokens in layout))
    tp_rank, tp_size = group_rank_and_size(tp_group)
    for i, (rows, tokens) in enumerate(responses):
        r, v = rows.shape
        start, end = tp_row_block(r, tp_rank, tp_size)  # the host-kept tensors: this TP rank's block of the rows
        expected = {
            TEACHER_TOKEN_LOG_PROBS_KEY: (r,),
            TEACHER_TOPK_LOG_PROBS_KEY: (end - start, "K"),
            TEACHER_TOPK_INDICES_KEY: (end - start, "K"),
            TEACHER_HIDDEN_STATES_KEY: (end - start, "H"),
        }
        teacher = {k: _checked_teacher_input(batch, k, i, expected[k], rows.device) for k in keys}
        teacher.update({k: gather_tp_rows(value, r, tp_group) for k, value in teacher.items() if k in HOST_KEYS})
        output_weight = _teacher_output_weight(batch, v) if TEACHER_HIDDEN_STATES_KEY in teacher else None
        # the converter's weight: the mean over the samples (or, per token, the tokens) that have a teacher
        weight = 1.0 if weights is None else float(weights[i])
        valid = slice_log_prob_with_cp(batch["loss_masks"][i], total_lengths[i], response_lengths[i])
        samples.append(sample_rows(rows, tokens, valid.to(rows.device).bool(), weight, teacher, spec, output_weight,
                                   None if rollout_log_probs is None else rollout_log_probs[i].to(rows.device)))
    per_token = per_token_distillation(
        samples, config, tp_group=tp_group, data_parallel_group=dp_group, context_parallel_group=cp_group
    )
    distillation = reduce_per_token_loss(per_token, sum_of_sample_mean, logits)
    if config.rl_combination == "none":
        return distillation
    from slime.backends.megatron_utils.loss import policy_loss_function

    return combine_with_policy_loss(config, policy_loss_function(args, batch, logits, sum_of_sample_mean), distillation)


def sample_rows(rows: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, weight: float, teacher: dict,
                spec: TeacherOutputSpec, output_weight: Optional[torch.Tensor] = None,
                rollout_log_probs: Optional[torch.Tensor] = None) -> SampleRows:
    """One sample's ``SampleRows`` from its student rows and the teacher pass's outputs ``teacher`` (batch key ->
    tensor, as ``trainer.teacher_outputs.compute_teacher_outputs`` gives them; ``output_weight``: the teacher's
    output layer, needed with the hidden-state store). Shared by slime's loss and the single-process trainer."""
    distribution = None
    if TEACHER_HIDDEN_STATES_KEY in teacher:
        distribution = TeacherHiddenStates(teacher[TEACHER_HIDDEN_STATES_KEY], output_weight, spec.temperature)
    return SampleRows(
        logits=rows,
        tokens=tokens,
        valid=valid,
        weight=weight,
        teacher_token_log_probs=teacher[TEACHER_TOKEN_LOG_PROBS_KEY],
        teacher_topk_log_probs=teacher.get(TEACHER_TOPK_LOG_PROBS_KEY),
        teacher_topk_indices=teacher.get(TEACHER_TOPK_INDICES_KEY),
        teacher_distribution=distribution,
        rollout_log_probs=rollout_log_probs,
    )


def scaled_logits_and_layout(args, batch: dict, logits: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The micro-batch's logits rows ``[T, V/TP]`` divided by ``--rollout-temperature`` as slime's ``get_responses``
    divides them, and the ``(row indices, target tokens)`` of each sample's response among those rows, in slime's own
    layout (context-parallel zigzag included): ``get_responses`` run on the row numbers."""
    from slime.backends.megatron_utils.loss import get_responses

    scaled = logits[0] if args.rollout_temperature == 1.0 else logits[0].div(args.rollout_temperature)
    rows = scaled.shape[0]
    positions = torch.arange(rows, dtype=torch.float32, device=scaled.device).view(1, rows, 1)
    layout = [(found[:, 0].long(), tokens) for found, tokens in get_responses(
        positions, args=args, unconcat_tokens=batch["unconcat_tokens"], total_lengths=batch["total_lengths"],
        response_lengths=batch["response_lengths"], apply_temperature=False)]
    return scaled, layout


def rows_by_sample(rows: torch.Tensor, layout: list) -> list:
    """Each sample's rows of ``rows`` [T, ...] (``layout``: each sample's row indices, runs of consecutive rows), cut
    by one ``split``: its backward writes the gradient of all ``rows`` once, where a slice per sample writes a
    zero-filled gradient of all ``rows`` per sample."""
    runs = []  # (start, end, (sample, the run's place in the sample))
    for sample, (indices, _) in enumerate(layout):
        if indices.numel():
            cuts = (torch.nonzero(indices[1:] != indices[:-1] + 1).flatten() + 1).tolist()
            bounds = [0, *cuts, indices.numel()]
            runs += [(int(indices[a]), int(indices[b - 1]) + 1, (sample, place))
                     for place, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    runs.sort()
    sizes, owners, position = [], [], 0
    for start, end, owner in runs:
        if start > position:
            sizes.append(start - position)
            owners.append(None)
        sizes.append(end - start)
        owners.append(owner)
        position = end
    if position < rows.shape[0]:
        sizes.append(rows.shape[0] - position)
        owners.append(None)
    pieces: list = [{} for _ in layout]
    for piece, owner in zip(torch.split(rows, sizes), owners):
        if owner is not None:
            pieces[owner[0]][owner[1]] = piece
    return [torch.cat([parts[place] for place in range(len(parts))]) if len(parts) > 1
            else parts[0] if parts else rows[:0] for parts in pieces]


def offline_kd_loss(args, batch: dict, logits: torch.Tensor, sum_of_sample_mean,
                    config: SelfDistillConfig) -> tuple[torch.Tensor, dict]:
    """Offline top-K distillation (``--self-distill-offline-topk-path``): slime's SFT cross-entropy on the trained
    tokens + ``--self-distill-kd-weight`` x the top-K divergence to the stored teacher (``core.sft_kd``), reduced by
    slime's ``sum_of_sample_mean`` (per sample, or per token with ``--calculate-per-token-loss``, as ``sft_loss``).

    As slime's ``sft_loss``, it runs once over all the micro-batch's logits rows (rows outside every response are
    left out by their mask), so that the backward writes the logits' gradient once instead of once per sample."""
    from slime.backends.megatron_utils.cp_utils import slice_log_prob_with_cp

    tp_group, _, _ = _parallel_groups()
    scaled, layout = scaled_logits_and_layout(args, batch, logits)
    rows, device = scaled.shape[0], scaled.device
    parts = {"rows": [], "targets": [], "trained": [], "ids": [], "teacher": []}
    for i, (row_indices, tokens) in enumerate(layout):
        r = row_indices.shape[0]
        parts["rows"].append(row_indices)
        parts["targets"].append(tokens.to(device))
        parts["trained"].append(slice_log_prob_with_cp(batch["loss_masks"][i], batch["total_lengths"][i],
                                                       batch["response_lengths"][i]).to(device).bool())
        parts["ids"].append(_checked_teacher_input(batch, TEACHER_TOPK_INDICES_KEY, i, (r, "K"), device))
        parts["teacher"].append(_checked_teacher_input(batch, TEACHER_TOPK_LOG_PROBS_KEY, i, (r, "K"), device))
    if not layout:
        return reduce_per_token_loss(PerTokenLoss(torch.zeros(0, device=device), {}), sum_of_sample_mean, logits)
    index = torch.cat(parts["rows"])
    ids, teacher = torch.cat(parts["ids"]), torch.cat(parts["teacher"])
    vocab = scaled.shape[-1] * group_rank_and_size(tp_group)[1]
    if ids.numel() and int(ids.max()) >= vocab:
        raise ValueError(
            f"the stored teacher top-K holds token id {int(ids.max())}, beyond the student's vocabulary of {vocab} "
            "(padded): the teacher's vocabulary is larger than the student's; extract with a teacher of the "
            "student's tokenizer"
        )
    k = ids.shape[-1]
    all_ids, all_teacher = placeholder_topk(rows, k, device)
    all_ids[index], all_teacher[index] = ids.to(all_ids.dtype), teacher.to(all_teacher.dtype)
    all_targets = torch.zeros(rows, dtype=torch.long, device=device)
    all_targets[index] = torch.cat(parts["targets"]).long()
    all_trained = torch.zeros(rows, dtype=torch.bool, device=device)
    all_trained[index] = torch.cat(parts["trained"])
    result = sft_kd_terms(scaled, all_targets, all_trained, all_ids, all_teacher, divergence=config.divergence,
                          alpha=config.alpha, tail=config.topk_tail, kd_weight=config.kd_weight,
                          token_weight=config.kd_token_weight, tp_group=tp_group, chunk_size=config.chunk_size)
    per_token = PerTokenLoss(terms=result.terms[index],
                             metrics={f"self_distill_{name}": value[index] for name, value in result.metrics.items()})
    return reduce_per_token_loss(per_token, sum_of_sample_mean, logits)


def combine_with_policy_loss(config: SelfDistillConfig, policy: tuple,
                             distillation: tuple) -> tuple[torch.Tensor, dict]:
    """``--self-distill-rl-combination``: hybrid ``(1 - w) * P + w * D`` or additive ``P + w * D`` of slime's policy
    loss P and the distillation loss D, both ``(loss, metrics)`` reduced by slime's ``sum_of_sample_mean`` (so slime's
    rescaling applies to the sum). slime's metrics keep their names, ``loss`` is the combined loss, D is reported as
    ``self_distill_loss``."""
    (policy_loss, policy_metrics), (distillation_loss, distillation_metrics) = policy, distillation
    policy_scale = 1.0 - config.weight if config.rl_combination == "hybrid" else 1.0
    loss = policy_scale * policy_loss + config.weight * distillation_loss
    metrics = {**policy_metrics, **{name: value for name, value in distillation_metrics.items() if name != "loss"}}
    metrics["self_distill_loss"] = distillation_metrics["loss"]
    metrics["loss"] = loss.detach().clone()
    return loss, metrics
