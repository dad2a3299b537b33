"""Per-token divergences between a student and a teacher distribution, vocabulary-parallel and chunked.

Pure torch (plus an optional tensor-parallel process group); nothing here imports slime.

Conventions (``docs``: the project's math notes):

* ``logits`` are the student's ``[N, V_local]`` rows of this tensor-parallel rank's vocabulary shard, already
  divided by the rollout temperature. Column ``j`` on TP rank ``r`` is global vocabulary id ``r * V_local + j``
  (Megatron's layout). Any float dtype comes in; all arithmetic runs in fp32 (fp64 when the logits are fp64, so
  that ``torch.autograd.gradcheck`` applies).
* ``forward_kl`` = KL(T || S), ``reverse_kl`` = KL(S || T), ``alpha_js`` = alpha KL(T || M) + (1 - alpha) KL(S || M)
  with M = alpha T + (1 - alpha) S; alpha 0 and 1 are forward and reverse KL (the GKD/TRL special cases).
* Every returned per-token value is replicated on all TP ranks. Gradients follow Megatron's convention for a
  replicated loss: each rank receives d(loss)/d(its own shard), coupled to the other shards through the global
  log-sum-exp.

The full-vocabulary and log-prob gathers are custom autograd functions that walk the rows in chunks: the only
buffer of the logits' size they allocate is the gradient itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "alpha_js", "mixed_kl")
TOPK_TAILS = ("bucket", "renormalize")

# Rows per chunk. Small enough that a chunk's fp32 temporaries (rows x V_local) stay a small fraction of the
# logits, large enough to amortize the per-chunk collectives (benchmarks/bench_loss.py measures the trade-off).
DEFAULT_CHUNK_SIZE = 256

# Teacher log-probabilities are floored here wherever the divergence needs log T at a token the student can
# sample (reverse KL): a probability of e^-10000 is zero for every practical purpose, and the floor turns a
# masked (-inf) teacher entry into a large finite penalty instead of inf/NaN.
TEACHER_LOG_PROB_FLOOR = -1.0e4


# ---------------------------------------------------------------------- small helpers
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def group_rank_and_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(this rank, group size); ``None`` is a group of one."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, tp_group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(t, op=op, group=tp_group)
    return t


def resolve_divergence(divergence: str, alpha: float) -> tuple[str, float]:
    """alpha_js and mixed_kl at alpha 0 / 1 *are* forward / reverse KL (the mixture formula would tend to 0 there)."""
    if divergence not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCE_KINDS)}")
    if divergence in ("alpha_js", "mixed_kl"):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{divergence} needs alpha in [0, 1], got {alpha}")
        if alpha == 0.0:
            return "forward_kl", 0.0
        if alpha == 1.0:
            return "reverse_kl", 1.0
    return divergence, alpha


def local_vocab_columns(global_ids: torch.Tensor, vocab_local: int, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """(local column, mask of ids in this rank's shard); the column is 0 outside the shard."""
    rank, _ = group_rank_and_size(tp_group)
    local = global_ids - rank * vocab_local
    in_shard = (local >= 0) & (local < vocab_local)
    return torch.where(in_shard, local, torch.zeros_like(local)), in_shard


class _ChunkWorkspace:
    """Named scratch buffers of ``[chunk_size, V_local]`` in the compute dtype, created on first use and reused by
    every chunk of one call: a fresh large buffer per chunk would cost a page-faulting allocation each time (on
    the CPU) or allocator churn (on the GPU)."""

    def __init__(self, logits: torch.Tensor, chunk_size: int):
        self._shape = (min(chunk_size, logits.shape[0]), logits.shape[-1])
        self._dtype = _compute_dtype(logits)
        self._device = logits.device
        self._buffers: dict = {}

    def get(self, name: str, rows: int) -> torch.Tensor:
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self._shape, dtype=self._dtype, device=self._device)
        return self._buffers[name][:rows]

    def as_compute(self, values: torch.Tensor, name: str) -> torch.Tensor:
        """``values`` in the compute dtype: itself when it already is, else converted into buffer ``name``."""
        if values.dtype == self._dtype:
            return values
        return self.get(name, values.shape[0]).copy_(values)


def _row_log_normalizer(z: torch.Tensor, tp_group, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(global row max, exp(z - max) written into ``out``) for rows ``z`` sharded over the TP group."""
    row_max = z.max(dim=-1).values
    _all_reduce(row_max, tp_group, dist.ReduceOp.MAX)
    # A row of all -inf would make exp(-inf - -inf) = NaN; shift by 0 instead (its log-sum-exp stays -inf).
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return row_max, torch.sub(z, row_max.unsqueeze(-1), out=out).exp_()


def _row_dot_and_repaired_rows(weights: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_v weights_v * values_v per row with 0 * (+-inf) = 0, mask of the rows that met 0 * inf).

    A batched matrix product reads both operands once and allocates nothing of their size; only rows where it
    meets 0 * inf (NaN) are redone elementwise.
    """
    dot = torch.bmm(weights.unsqueeze(-2), values.unsqueeze(-1)).reshape(weights.shape[0])
    bad = torch.isnan(dot)
    if bad.any():
        w, v = weights[bad], values[bad]
        dot[bad] = torch.where(w != 0, w * v, torch.zeros_like(v)).sum(-1)
    return dot, bad


def _row_dot(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return _row_dot_and_repaired_rows(weights, values)[0]


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


# ---------------------------------------------------------------------- log-softmax / top-k helpers
class _VocabParallelLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tp_group, chunk_size):
        cd = _compute_dtype(logits)
        lse = torch.empty(logits.shape[0], dtype=cd, device=logits.device)
        work = _ChunkWorkspace(logits, chunk_size)
        for rows in _chunks(logits.shape[0], chunk_size):
            z = work.as_compute(logits[rows], "logits")
            row_max, shifted_exp = _row_log_normalizer(z, tp_group, work.get("exp", z.shape[0]))
            sum_exp = _all_reduce(shifted_exp.sum(-1), tp_group)
            lse[rows] = row_max + torch.log(sum_exp)
        ctx.save_for_backward(logits, lse)
        ctx.chunk_size = chunk_size
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        logits, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in _chunks(logits.shape[0], ctx.chunk_size):
            p = torch.exp(logits[rows].to(lse.dtype) - lse[rows].unsqueeze(-1))
            grad[rows] = (p * grad_lse[rows].unsqueeze(-1)).to(grad.dtype)
        return grad, None, None


def vocab_parallel_log_softmax(
    logits: torch.Tensor, tp_group=None, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """log-softmax over the whole (sharded) vocabulary: ``[N, V_local]`` fp32, differentiable across shards."""
    lse = _VocabParallelLogSumExp.apply(logits, tp_group, chunk_size)
    return logits.to(lse.dtype) - lse.unsqueeze(-1)


@torch.no_grad()
def vocab_parallel_topk(values: torch.Tensor, k: int, tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k over the sharded last dimension: ``(values [N, k], global ids [N, k] int64)``, identical on
    every TP rank (all ranks select from the same gathered candidates)."""
    rank, world = group_rank_and_size(tp_group)
    vocab_local = values.shape[-1]
    if k > vocab_local * world:
        raise ValueError(f"top-k with k={k} exceeds the vocabulary size {vocab_local * world}")
    local_k = min(k, vocab_local)
    local_values, local_ids = values.topk(local_k, dim=-1)
    local_ids = local_ids + rank * vocab_local
    if world > 1:
        gathered_values = [torch.empty_like(local_values) for _ in range(world)]
        gathered_ids = [torch.empty_like(local_ids) for _ in range(world)]
        dist.all_gather(gathered_values, local_values.contiguous(), group=tp_group)
        dist.all_gather(gathered_ids, local_ids.contiguous(), group=tp_group)
        local_values, local_ids = torch.cat(gathered_values, -1), torch.cat(gathered_ids, -1)
    top_values, position = local_values.topk(k, dim=-1)
    return top_values, local_ids.gather(-1, position)


# ---------------------------------------------------------------------- teachers of the full-vocabulary kernel
class TeacherLogProbs:
    """A teacher given as its log-probabilities ``[N, V_local]`` (this rank's shard; any float dtype, ``-inf``
    allowed). ``core.teacher_logits.TeacherHiddenStates`` is the other kind: the same ``chunk`` method, recomputing
    the log-probabilities from the teacher's final hidden states."""

    def __init__(self, log_probs: torch.Tensor):
        self.log_probs = log_probs

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.log_probs.shape)

    def chunk(self, rows: slice, work: "_ChunkWorkspace", tp_group) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(log-probabilities of ``rows`` in the compute dtype, their exponential if already at hand, else None)."""
        return work.as_compute(self.log_probs[rows], "teacher"), None


# ---------------------------------------------------------------------- results
@dataclass
class TokenDivergence:
    """Per-token results, ``[N]`` each, replicated over the TP group."""

    # Differentiable w.r.t. the logits; its gradient is the exact divergence gradient (for sampled_token: the
    # score-function surrogate, whose *value* is not a divergence).
    loss_terms: torch.Tensor
    # Detached divergence value (sampled_token: an unbiased single-sample estimate); the metric.
    divergence: torch.Tensor
    student_entropy: torch.Tensor
    # Detached log p_student(sampled token).
    student_token_log_probs: torch.Tensor
    # topk: detached teacher probability mass inside the top-K support; None for the other scopes.
    teacher_captured_mass: Optional[torch.Tensor] = None
    # topk: differentiable log p_student(sampled token), from the same pass over the logits as the divergence (the
    # cross-entropy of offline SFT + KD); None for the other scopes.
    target_log_probs: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------- full vocabulary
def _full_vocab_chunk(z, t, t_exp, sampled_local, sampled_in_shard, kind, alpha, term_clip, tp_group, grad_out,
                      scratch):
    """One chunk of rows (``t_exp``: exp(t) when the teacher already computed it, else None): returns (loss value,
    divergence, entropy, student token log-prob, gradient scale); writes
    the gradient of the loss value w.r.t. ``z``, divided by that scale, into ``grad_out`` when given. The loss value
    is the divergence, or with ``term_clip`` (forward KL only) the sum over the vocabulary of each entry's term
    clamped at ``term_clip``. ``scratch``: the call's ``_ChunkWorkspace``. Everything is computed in place: this loop
    is memory-bound."""
    rows = z.shape[0]
    p, teacher_p, score = (scratch.get(name, rows) for name in ("p", "teacher_p", "score"))

    def teacher_probs():
        return t_exp if t_exp is not None else torch.exp(t, out=teacher_p)

    row_max, p = _row_log_normalizer(z, tp_group, p)  # p holds exp(z - max) until normalized below
    token_logit = torch.where(sampled_in_shard, z.gather(-1, sampled_local.unsqueeze(-1)).squeeze(-1), 0.0)
    # NaN-repaired rows are those with a -inf logit (exp(-inf) = 0): their gradient needs the same care below.
    exp_dot_logit, student_has_neg_inf = _row_dot_and_repaired_rows(p, z)
    normalizer_local_sum = p.sum(-1)
    normalizer = torch.stack([normalizer_local_sum, exp_dot_logit, token_logit], -1)
    _all_reduce(normalizer, tp_group)
    sum_exp, sum_exp_logit, token_logit = normalizer.unbind(-1)
    lse = row_max + torch.log(sum_exp)
    entropy = lse - sum_exp_logit / sum_exp
    p.div_(sum_exp.unsqueeze(-1))

    if kind == "forward_kl" and term_clip is not None:
        teacher_p = teacher_probs()
        # per entry T_v (t_v - log p_v), 0 where T_v = 0 (t_v = -inf); clamped at term_clip before the sum
        term = torch.sub(t, z, out=score).add_(lse.unsqueeze(-1)).mul_(teacher_p).masked_fill_(teacher_p == 0, 0.0)
        kept = term <= term_clip  # a clamped entry gives no gradient
        reduced = torch.stack([term.sum(-1), term.clamp_(max=term_clip).sum(-1),
                               _row_dot(teacher_p, kept.to(teacher_p.dtype))], -1)
        _all_reduce(reduced, tp_group)
        divergence, value, kept_mass = reduced.unbind(-1)
        if grad_out is not None:  # d/dz_u of -sum_{v kept} T_v log p_v = p_u * T(kept) - T_u [u kept]
            torch.mul(p, kept_mass.unsqueeze(-1), out=grad_out).sub_(teacher_p.mul_(kept))
        return value, divergence, entropy, token_logit - lse, 1.0

    if kind == "forward_kl":
        teacher_p = teacher_probs()
        # sum_v T_v (t_v - log p_v) with log p_v = z_v - lse, without materializing log p
        teacher_mass = teacher_p.sum(-1)
        cross = _row_dot(teacher_p, t) - _row_dot(teacher_p, z)
        reduced = torch.stack([cross, teacher_mass], -1)
        _all_reduce(reduced, tp_group)
        cross, teacher_mass = reduced.unbind(-1)
        if grad_out is not None:  # d/dz of -sum_v T_v log p_v = p * sum(T) - T
            torch.mul(p, teacher_mass.unsqueeze(-1), out=grad_out).sub_(teacher_p)
        value = cross + lse * teacher_mass
        return value, value, entropy, token_logit - lse, 1.0

    if kind == "reverse_kl":
        floored_teacher = torch.clamp(t, min=TEACHER_LOG_PROB_FLOOR, out=teacher_p)
        score = torch.sub(z, lse.unsqueeze(-1), out=score)
        score.sub_(floored_teacher)  # d KL(S||T) / d S_v, up to a constant
        value = _all_reduce(_row_dot(p, score), tp_group)
        mean_score = value  # sum_v p_v score_v is the divergence itself
        score_scale = 1.0
    else:
        teacher_p = teacher_probs()
        # M = alpha T + (1 - alpha) p, floored at the smallest normal float where both probabilities have
        # underflowed (every term they weight is zero anyway).
        log_mix = torch.lerp(p, teacher_p, alpha, out=score).clamp_(min=torch.finfo(p.dtype).tiny).log_()
        teacher_part = _row_dot(teacher_p, t) - _row_dot(teacher_p, log_mix)
        # d JSD / d S_v = (1 - alpha)(log p - log M) = (1 - alpha)(score - lse) with score = z - log M
        score = torch.sub(z, log_mix, out=log_mix)
        local_mass = normalizer_local_sum / sum_exp  # this shard's share of the student's probability
        reduced = torch.stack([teacher_part, _row_dot(p, score) - lse * local_mass], -1)
        _all_reduce(reduced, tp_group)
        teacher_part, mean_log_ratio = reduced.unbind(-1)
        value = alpha * teacher_part + (1.0 - alpha) * mean_log_ratio
        mean_score = lse + mean_log_ratio  # so that score - mean_score = (log p - log M) - mean
        score_scale = 1.0 - alpha
    if grad_out is not None:  # softmax chain rule: dL/dz_u = p_u (score_u - sum_v p_v score_v), / score_scale
        torch.mul(p, score.sub_(mean_score.unsqueeze(-1)), out=grad_out)
        if student_has_neg_inf.any():  # 0 * (-inf) at logits that are -inf: their gradient is 0
            grad_out[student_has_neg_inf] = torch.nan_to_num(grad_out[student_has_neg_inf], nan=0.0)
    return value, value, entropy, token_logit - lse, score_scale


class _FullVocabDivergence(torch.autograd.Function):
    """Forward computes the value and, chunk by chunk, the exact per-row gradient (one logits-sized buffer, so
    nothing is recomputed); backward scales it by the incoming per-row gradient."""

    @staticmethod
    def forward(ctx, logits, teacher, sampled_tokens, kind, alpha, term_clip, tp_group, chunk_size):
        cd = _compute_dtype(logits)
        n = logits.shape[0]
        need_grad = ctx.needs_input_grad[0]
        value = torch.empty(n, dtype=cd, device=logits.device)
        divergence = torch.empty_like(value)
        entropy = torch.empty_like(value)
        token_log_probs = torch.empty_like(value)
        grad = torch.empty_like(logits) if need_grad else None
        sampled_local, sampled_in_shard = local_vocab_columns(sampled_tokens, logits.shape[-1], tp_group)
        work = _ChunkWorkspace(logits, chunk_size)
        gradient_scale = 1.0
        for rows in _chunks(n, chunk_size):
            grad_rows = None
            if need_grad:
                grad_rows = grad[rows] if grad.dtype == cd else work.get("grad", rows.stop - rows.start)
            t, t_exp = teacher.chunk(rows, work, tp_group)
            value[rows], divergence[rows], entropy[rows], token_log_probs[rows], gradient_scale = _full_vocab_chunk(
                work.as_compute(logits[rows], "logits"), t, t_exp,
                sampled_local[rows], sampled_in_shard[rows], kind, alpha, term_clip, tp_group, grad_rows, work,
            )
            if need_grad and grad_rows.dtype != grad.dtype:
                grad[rows] = grad_rows
        ctx.gradient_scale = gradient_scale
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(divergence, entropy, token_log_probs)
        return value, divergence, entropy, token_log_probs

    @staticmethod
    def backward(ctx, grad_value, _grad_divergence, _grad_entropy, _grad_token_log_probs):
        (grad,) = ctx.saved_tensors
        row_scale = (grad_value * ctx.gradient_scale).unsqueeze(-1).to(grad.dtype)
        return grad * row_scale, None, None, None, None, None, None, None


def full_vocab_divergence(
    logits: torch.Tensor,
    sampled_tokens: torch.Tensor,
    teacher,
    *,
    divergence: str,
    alpha: float,
    tp_group=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    term_clip: Optional[float] = None,
) -> TokenDivergence:
    """Exact divergence over the whole vocabulary. ``teacher``: this shard of the teacher's log-softmax
    ``[N, V_local]`` (a tensor of any float dtype, ``-inf`` allowed, or a ``TeacherLogProbs``), or a
    ``core.teacher_logits.TeacherHiddenStates``, whose logits are recomputed one chunk of rows at a time.

    ``term_clip`` (forward KL only; OPSD's ``jsd_token_clip``): the loss terms are ``sum_v min(T_v (log T_v - log
    S_v), term_clip)``, whose clamped entries give no gradient; ``divergence`` stays the unclamped KL."""
    kind, alpha = resolve_divergence(divergence, alpha)
    if kind == "mixed_kl":
        raise ValueError("mixed_kl is computed on the top-K support only (kl_scope topk)")
    if term_clip is not None and kind != "forward_kl":
        raise ValueError(f"term_clip clamps the entries of the forward KL; got divergence {divergence!r}")
    if isinstance(teacher, torch.Tensor):
        teacher = TeacherLogProbs(teacher)
    if tuple(teacher.shape) != tuple(logits.shape):
        raise ValueError(f"the teacher's log-probabilities have shape {tuple(teacher.shape)}, expected the student's "
                         f"{tuple(logits.shape)} (rows x this rank's vocabulary shard)")
    value, kl, entropy, token_log_probs = _FullVocabDivergence.apply(
        logits, teacher, sampled_tokens, kind, alpha, term_clip, tp_group, chunk_size
    )
    return TokenDivergence(
        loss_terms=value,
        divergence=kl,
        student_entropy=entropy,
        student_token_log_probs=token_log_probs,
    )


# ---------------------------------------------------------------------- log-probs at chosen tokens
class _VocabParallelLogProbsAt(torch.autograd.Function):
    """log p(ids) for ``ids [N, K]`` global vocabulary ids, plus the (detached) entropy of each row."""

    @staticmethod
    def forward(ctx, logits, ids, tp_group, chunk_size, with_entropy):
        cd = _compute_dtype(logits)
        n = logits.shape[0]
        local, in_shard = local_vocab_columns(ids, logits.shape[-1], tp_group)
        log_probs = torch.empty(ids.shape, dtype=cd, device=logits.device)
        entropy = torch.empty(n, dtype=cd, device=logits.device)
        lse = torch.empty(n, dtype=cd, device=logits.device)
        work = _ChunkWorkspace(logits, chunk_size)
        for rows in _chunks(n, chunk_size):
            z = work.as_compute(logits[rows], "logits")
            row_max, shifted_exp = _row_log_normalizer(z, tp_group, work.get("exp", z.shape[0]))
            exp_times_logit = _row_dot(shifted_exp, z) if with_entropy else torch.zeros_like(row_max)
            picked = torch.where(in_shard[rows], z.gather(-1, local[rows]), 0.0)
            reduced = torch.cat([shifted_exp.sum(-1, keepdim=True), exp_times_logit.unsqueeze(-1), picked], -1)
            _all_reduce(reduced, tp_group)
            lse[rows] = row_max + torch.log(reduced[:, 0])
            entropy[rows] = lse[rows] - reduced[:, 1] / reduced[:, 0]
            log_probs[rows] = reduced[:, 2:] - lse[rows].unsqueeze(-1)
        ctx.save_for_backward(logits, lse, local, in_shard)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy):
        logits, lse, local, in_shard = ctx.saved_tensors
        grad = torch.empty_like(logits)
        work = _ChunkWorkspace(logits, ctx.chunk_size)
        for rows in _chunks(logits.shape[0], ctx.chunk_size):
            g = grad_log_probs[rows].to(lse.dtype)
            # d log p_k / dz = onehot_k - p, built in place in the gradient buffer when the dtypes allow
            chunk_grad = grad[rows] if grad.dtype == lse.dtype else work.get("grad", rows.stop - rows.start)
            torch.sub(logits[rows].to(lse.dtype), lse[rows].unsqueeze(-1), out=chunk_grad).exp_()
            chunk_grad.mul_(-g.sum(-1, keepdim=True))
            chunk_grad.scatter_add_(-1, local[rows], torch.where(in_shard[rows], g, 0.0))
            if chunk_grad.dtype != grad.dtype:
                grad[rows] = chunk_grad
        return grad, None, None, None, None


def vocab_parallel_log_probs_at(logits, ids, tp_group=None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                                with_entropy: bool = True):
    """``(log p(ids) [N, K] differentiable, entropy [N] detached)`` over the sharded vocabulary; without
    ``with_entropy`` the entropy is not computed (one pass over the logits less) and is returned as NaN."""
    log_probs, entropy = _VocabParallelLogProbsAt.apply(logits, ids, tp_group, chunk_size, with_entropy)
    return log_probs, entropy if with_entropy else torch.full_like(entropy, math.nan)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, clamped so that a top-K holding (numerically) all the mass gives a finite tail."""
    tiny = torch.finfo(x.dtype).tiny
    return torch.log(torch.clamp(-torch.expm1(torch.clamp(x, max=0.0)), min=tiny))


def _categorical_divergence(student_log_probs, teacher_log_probs, kind, alpha, present=None):
    """Divergence between two distributions given on the same (small) categorical support, last dim. ``present``
    (bool, same shape, or None for all): the categories that exist; the others contribute nothing and get no
    gradient (they are read as probability 0 without ever forming an infinity, which would poison the backward)."""
    if present is None:
        student_p, teacher_p = student_log_probs.exp(), teacher_log_probs.exp()
    else:
        student_log_probs = torch.where(present, student_log_probs, 0.0)
        teacher_log_probs = torch.where(present, teacher_log_probs, 0.0)
        student_p = torch.where(present, student_log_probs.exp(), 0.0)
        teacher_p = torch.where(present, teacher_log_probs.exp(), 0.0)
    if kind == "forward_kl":
        return torch.where(teacher_p > 0, teacher_p * (teacher_log_probs - student_log_probs), 0.0).sum(-1)
    if kind == "reverse_kl":
        floored = teacher_log_probs.clamp(min=TEACHER_LOG_PROB_FLOOR)
        return torch.where(student_p > 0, student_p * (student_log_probs - floored), 0.0).sum(-1)
    if kind == "mixed_kl":
        return ((1.0 - alpha) * _categorical_divergence(student_log_probs, teacher_log_probs, "forward_kl", alpha,
                                                        present)
                + alpha * _categorical_divergence(student_log_probs, teacher_log_probs, "reverse_kl", alpha, present))
    log_mix = torch.logaddexp(teacher_log_probs + math.log(alpha), student_log_probs + math.log1p(-alpha))
    teacher_part = torch.where(teacher_p > 0, teacher_p * (teacher_log_probs - log_mix), 0.0).sum(-1)
    student_part = torch.where(student_p > 0, student_p * (student_log_probs - log_mix), 0.0).sum(-1)
    return alpha * teacher_part + (1.0 - alpha) * student_part


def _masked_logsumexp(log_probs: torch.Tensor, present: Optional[torch.Tensor]) -> torch.Tensor:
    if present is not None:
        log_probs = log_probs.masked_fill(~present, -math.inf)
    return torch.logsumexp(log_probs, -1, keepdim=True)


def topk_divergence(
    logits: torch.Tensor,
    sampled_tokens: torch.Tensor,
    teacher_support_log_probs: torch.Tensor,
    support_ids: torch.Tensor,
    *,
    divergence: str,
    alpha: float,
    tp_group=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    tail: str = "bucket",
    present: Optional[torch.Tensor] = None,
    with_entropy: bool = True,
) -> TokenDivergence:
    """The divergence on a support of K tokens per row (``support_ids`` [N, K], global vocabulary ids, with the
    teacher's log-probabilities there, ``teacher_support_log_probs`` [N, K]) plus, with ``tail="bucket"``, one tail
    bucket holding the remaining mass of each side; with ``tail="renormalize"``, both sides renormalized over the
    support (no tail). ``present`` [N, K] bool (None: all): which entries belong to the support (a union of two
    top-K sets pads each row with repeated ids, marked absent). Without ``with_entropy`` the student's entropy is not
    computed (NaN).

    Merging categories can only lower a KL, so the bucket form is a lower bound of the full-vocabulary value. The
    student's log-probabilities come from its full sharded log-softmax, so the bucket form's gradient reaches every
    logit; the renormalized form depends on the K logits only (their own log-softmax), as SD-Zero's official loss.
    """
    kind, alpha = resolve_divergence(divergence, alpha)
    if tail not in TOPK_TAILS:
        raise ValueError(f"unknown top-K tail {tail!r}; choose one of {', '.join(TOPK_TAILS)}")
    n = logits.shape[0]
    if teacher_support_log_probs.shape != support_ids.shape or teacher_support_log_probs.shape[:1] != (n,):
        raise ValueError(
            f"teacher_support_log_probs {tuple(teacher_support_log_probs.shape)} and support_ids "
            f"{tuple(support_ids.shape)} must both be [{n}, K]"
        )
    if present is not None and present.shape != support_ids.shape:
        raise ValueError(f"present {tuple(present.shape)} must have the support's shape {tuple(support_ids.shape)}")
    ids = torch.cat([support_ids.long(), sampled_tokens.long().unsqueeze(-1)], -1)
    log_probs, entropy = vocab_parallel_log_probs_at(logits, ids, tp_group, chunk_size, with_entropy)
    student_support, student_token = log_probs[:, :-1], log_probs[:, -1]
    teacher_support = teacher_support_log_probs.to(log_probs.dtype)
    if tail == "bucket":
        teacher_tail = _log1mexp(_masked_logsumexp(teacher_support, present))
        student_tail = _log1mexp(_masked_logsumexp(student_support, present))
        with_tail = None if present is None else torch.cat([present, present.new_ones(n, 1)], -1)
        value = _categorical_divergence(torch.cat([student_support, student_tail], -1),
                                        torch.cat([teacher_support, teacher_tail], -1), kind, alpha, with_tail)
    else:
        value = _categorical_divergence(student_support - _masked_logsumexp(student_support, present),
                                        teacher_support - _masked_logsumexp(teacher_support, present),
                                        kind, alpha, present)
    teacher_mass = teacher_support.exp()
    if present is not None:
        teacher_mass = torch.where(present, teacher_mass, 0.0)
    return TokenDivergence(
        loss_terms=value,
        divergence=value.detach(),
        student_entropy=entropy,
        student_token_log_probs=student_token.detach(),
        teacher_captured_mass=teacher_mass.sum(-1),
        target_log_probs=student_token,
    )


# ---------------------------------------------------------------------- sampled token
def sampled_token_divergence(
    logits: torch.Tensor,
    sampled_tokens: torch.Tensor,
    teacher_token_log_probs: torch.Tensor,
    *,
    divergence: str,
    alpha: float,
    ratio_cap: float,
    tp_group=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> TokenDivergence:
    """Score-function surrogates that use only log S(y) and log T(y) at the student's own sampled token y ~ S.

    With r = T(y) / S(y) and sg = stop-gradient, E_{y~S}[grad loss_terms] is the exact gradient of:
    reverse_kl: ``sg(log S - log T) * log S``; alpha_js: ``(1 - alpha) sg(log S - log M) * log S`` with
    ``log M = logaddexp(log alpha + log T, log(1 - alpha) + log S)``; forward_kl: ``-sg(min(r, ratio_cap)) * log S``
    (exact only while r <= ratio_cap: the cap trades bias for variance).
    Reported ``divergence`` (unbiased single-sample estimates, detached): reverse ``log S - log T``; forward
    ``r log r - (r - 1)``; alpha_js ``alpha r (log T - log M) + (1 - alpha)(log S - log M)``.
    """
    kind, alpha = resolve_divergence(divergence, alpha)
    if teacher_token_log_probs.shape != sampled_tokens.shape:
        raise ValueError(f"teacher_token_log_probs has shape {tuple(teacher_token_log_probs.shape)}, expected "
                         f"{tuple(sampled_tokens.shape)} (one per sampled token)")
    if ratio_cap <= 0:
        raise ValueError(f"ratio_cap must be > 0, got {ratio_cap}")
    if kind == "mixed_kl":
        raise ValueError("mixed_kl is computed on the top-K support only (kl_scope topk)")
    log_probs, entropy = vocab_parallel_log_probs_at(logits, sampled_tokens.long().unsqueeze(-1), tp_group, chunk_size)
    student = log_probs.squeeze(-1)
    s = student.detach()
    t = teacher_token_log_probs.to(s.dtype).clamp(min=TEACHER_LOG_PROB_FLOOR)
    log_ratio = t - s
    if kind == "reverse_kl":
        estimate = -log_ratio
        loss_terms = estimate * student
    elif kind == "forward_kl":
        ratio = log_ratio.exp()
        estimate = ratio * log_ratio - (ratio - 1.0)
        loss_terms = -ratio.clamp(max=ratio_cap) * student
    else:
        log_mix = torch.logaddexp(t + math.log(alpha), s + math.log1p(-alpha))
        estimate = alpha * log_ratio.exp() * (t - log_mix) + (1.0 - alpha) * (s - log_mix)
        loss_terms = (1.0 - alpha) * (s - log_mix) * student
    return TokenDivergence(
        loss_terms=loss_terms,
        divergence=estimate,
        student_entropy=entropy,
        student_token_log_probs=s,
    )
