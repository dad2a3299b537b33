"""Offline top-K distillation's per-token loss (``core.sft_kd.sft_kd_terms``) against a float64 brute force.

The brute force (``reference_terms``) is written from the definitions, one row and one category at a time in python:
the teacher's K stored probabilities plus one tail bucket (1 - their sum) or renormalized over the K ids, the
student's probabilities at the same ids from its full softmax (with its own tail bucket), the divergence summed
category by category, and the cross-entropy -log softmax(z)[y]. Its gradients come from autograd through those loops,
so they check the hand-written backward passes of the implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from slime_self_distill.core.sft_kd import sft_kd_terms, teacher_log_probs, teacher_target_prob
from slime_self_distill.teacher_view import StoredTopK
from slime_self_distill.trainer.stored_topk import response_rows
from tests.gloo_results import gather_from_ranks

DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("alpha_js", 0.3)]
TAILS = ["bucket", "renormalize"]
TOKEN_WEIGHTS = ["uniform", "teacher_target_prob"]
ROWS, VOCAB, K = 9, 12, 4
KD_WEIGHT = 1.7


# ---------------------------------------------------------------------- float64 brute force
def _kl(p: list, q: list) -> torch.Tensor:
    """KL(p || q) over explicit categories, 0 log 0 = 0."""
    total = torch.zeros((), dtype=torch.float64)
    for p_c, q_c in zip(p, q):
        if float(p_c.detach()) > 0:
            total = total + p_c * (torch.log(p_c) - torch.log(q_c))
    return total


def _divergence(teacher: list, student: list, kind: str, alpha: float) -> torch.Tensor:
    if kind == "forward_kl":
        return _kl(teacher, student)
    if kind == "reverse_kl":
        return _kl(student, teacher)
    mixture = [alpha * t + (1 - alpha) * s for t, s in zip(teacher, student)]
    return alpha * _kl(teacher, mixture) + (1 - alpha) * _kl(student, mixture)


def reference_row(logits_row: torch.Tensor, target: int, ids: list, teacher_log_probs_row: list, *, divergence: str,
                  alpha: float, tail: str, kd_weight: float, token_weight: str) -> tuple:
    """(term, cross-entropy, divergence, token weight) of one trained row: ``logits_row`` [V] float64 (already divided
    by any temperature), the teacher's K ids and log-probabilities there as python lists."""
    log_probs = logits_row - torch.logsumexp(logits_row, 0)  # the student's full log-softmax
    student_at = [torch.exp(log_probs[i]) for i in ids]
    teacher_at = [torch.tensor(math.exp(v), dtype=torch.float64) for v in teacher_log_probs_row]
    if tail == "bucket":
        student = student_at + [1 - sum(student_at)]
        teacher = teacher_at + [1 - sum(teacher_at)]
    else:
        student = [s / sum(student_at) for s in student_at]
        teacher = [t / sum(teacher_at) for t in teacher_at]
    kd = _divergence(teacher, student, divergence, alpha)
    cross_entropy = -log_probs[target]
    weight = 1.0
    if token_weight == "teacher_target_prob":
        weight = sum((math.exp(v) for i, v in zip(ids, teacher_log_probs_row) if i == target), 0.0)
    return cross_entropy + kd_weight * weight * kd, cross_entropy, kd, weight


def reference_terms(logits, targets, trained, ids, teacher, **settings) -> torch.Tensor:
    """Per row: the brute-force term on trained rows, 0 elsewhere (the untrained rows' inputs are never read)."""
    terms = []
    for row in range(logits.shape[0]):
        if not bool(trained[row]):
            terms.append(torch.zeros((), dtype=torch.float64))
            continue
        terms.append(reference_row(logits[row].double(), int(targets[row]), [int(i) for i in ids[row]],
                                   [float(v) for v in teacher[row]], **settings)[0])
    return torch.stack(terms)


# ---------------------------------------------------------------------- inputs
def make_inputs(seed: int = 0, rows: int = ROWS, vocab: int = VOCAB, k: int = K):
    """Student logits, a stored teacher top-K (ids by decreasing log-probability of a full-vocabulary teacher),
    targets inside and outside the top-K, and a loss mask with untrained rows at both ends and in the middle."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    full_teacher = torch.log_softmax(2 * torch.randn(rows, vocab, generator=g, dtype=torch.float64), -1)
    values, ids = full_teacher.topk(k, -1)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[1], targets[2] = ids[1, 0], ids[2, k - 1]  # inside the top-K, first and last
    targets[3] = next(v for v in range(vocab) if v not in ids[3].tolist())  # outside
    trained = torch.ones(rows, dtype=torch.bool)
    trained[[0, 4, rows - 1]] = False
    return logits, targets, trained, ids.to(torch.int32), values


def run_ours(logits, targets, trained, ids, teacher, *, divergence, alpha, tail, token_weight, tp_group=None,
             chunk_size=3):
    return sft_kd_terms(logits, targets, trained, ids, teacher, divergence=divergence, alpha=alpha, tail=tail,
                        kd_weight=KD_WEIGHT, token_weight=token_weight, tp_group=tp_group, chunk_size=chunk_size)


CASES = [(d, a, t, w) for d, a in DIVERGENCES for t in TAILS for w in TOKEN_WEIGHTS]
CASE_IDS = [f"{d}-{t}-{w}" for d, _, t, w in CASES]


# ---------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("divergence,alpha,tail,token_weight", CASES, ids=CASE_IDS)
def test_terms_and_logit_gradients_equal_brute_force(divergence, alpha, tail, token_weight):
    logits, targets, trained, ids, teacher = make_inputs()
    upstream = torch.rand(ROWS, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    ours_logits = logits.clone().requires_grad_(True)
    ours = run_ours(ours_logits, targets, trained, ids, teacher, divergence=divergence, alpha=alpha, tail=tail,
                    token_weight=token_weight)
    (ours.terms * upstream).sum().backward()

    reference_logits = logits.clone().requires_grad_(True)
    expected = reference_terms(reference_logits, targets, trained, ids, teacher, divergence=divergence, alpha=alpha,
                               tail=tail, kd_weight=KD_WEIGHT, token_weight=token_weight)
    (expected * upstream).sum().backward()

    torch.testing.assert_close(ours.terms, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_logits.grad, reference_logits.grad, rtol=1e-9, atol=1e-12)
    # the cross-entropy and the divergence are reported apart, 0 on the untrained rows
    for row in range(ROWS):
        if not trained[row]:
            assert ours.metrics["sft_loss"][row] == 0 and ours.metrics["kd_loss"][row] == 0
            continue
        _, cross_entropy, kd, weight = reference_row(
            logits[row], int(targets[row]), ids[row].tolist(), teacher[row].tolist(), divergence=divergence,
            alpha=alpha, tail=tail, kd_weight=KD_WEIGHT, token_weight=token_weight)
        assert float(ours.metrics["sft_loss"][row]) == pytest.approx(float(cross_entropy), rel=1e-10)
        assert float(ours.metrics["kd_loss"][row]) == pytest.approx(float(kd), rel=1e-9, abs=1e-12)
        assert float(ours.metrics["kd_token_weight"][row]) == pytest.approx(weight, rel=1e-6)


def test_float32_logits_stay_close_to_the_float64_brute_force():
    """slime hands the loss float32 logits: the terms are computed in float32 and stay close."""
    logits, targets, trained, ids, teacher = make_inputs(seed=3)
    ours = run_ours(logits.float(), targets, trained, ids, teacher.float(), divergence="forward_kl", alpha=0.5,
                    tail="bucket", token_weight="teacher_target_prob")
    assert ours.terms.dtype == torch.float32
    expected = reference_terms(logits, targets, trained, ids, teacher, divergence="forward_kl", alpha=0.5,
                               tail="bucket", kd_weight=KD_WEIGHT, token_weight="teacher_target_prob")
    torch.testing.assert_close(ours.terms.double(), expected, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("divergence,alpha", DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
@pytest.mark.parametrize("tail", TAILS)
def test_gradcheck_float64(divergence, alpha, tail):
    logits, targets, trained, ids, teacher = make_inputs(seed=11, rows=5, vocab=7, k=3)
    logits.requires_grad_(True)

    def terms(z):
        return run_ours(z, targets, trained, ids, teacher, divergence=divergence, alpha=alpha, tail=tail,
                        token_weight="teacher_target_prob", chunk_size=2).terms

    assert torch.autograd.gradcheck(terms, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------- untrained rows
@pytest.mark.parametrize("tail", TAILS)
def test_untrained_rows_give_nothing_and_get_no_gradient(tail):
    """Rows out of the loss mask: term 0 and a zero logit gradient, whatever their logits and placeholder teacher
    (including extreme logits and a placeholder whose K entries hold all the mass); the trained rows do not move."""
    logits, targets, trained, ids, teacher = make_inputs(seed=2)
    untrained = ~trained
    base = run_ours(logits, targets, trained, ids, teacher, divergence="alpha_js", alpha=0.4, tail=tail,
                    token_weight="teacher_target_prob").terms

    wild_logits = logits.clone()
    wild_logits[untrained] = torch.tensor([800.0, -800.0] * (VOCAB // 2), dtype=torch.float64)
    wild_teacher = teacher.clone()
    # one id holds all the mass (the others at the floor): no tail left
    wild_teacher[untrained] = torch.log(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)).clamp(min=-1e4)
    wild_logits.requires_grad_(True)
    out = run_ours(wild_logits, targets, trained, ids, wild_teacher, divergence="alpha_js", alpha=0.4, tail=tail,
                   token_weight="teacher_target_prob")
    out.terms.sum().backward()
    assert torch.equal(out.terms[untrained], torch.zeros(int(untrained.sum()), dtype=torch.float64))
    assert torch.equal(wild_logits.grad[untrained], torch.zeros_like(wild_logits.grad[untrained]))
    assert torch.isfinite(wild_logits.grad).all()
    torch.testing.assert_close(out.terms[trained].detach(), base[trained], rtol=0, atol=0)
    for values in out.metrics.values():
        assert torch.equal(values[untrained], torch.zeros_like(values[untrained]))


def test_all_rows_untrained_is_a_zero_loss_with_zero_gradient():
    logits, targets, _, ids, teacher = make_inputs(seed=4)
    logits.requires_grad_(True)
    out = run_ours(logits, targets, torch.zeros(ROWS, dtype=torch.bool), ids, teacher, divergence="forward_kl",
                   alpha=0.5, tail="bucket", token_weight="uniform")
    out.terms.sum().backward()
    assert not out.terms.any() and not logits.grad.any()


# ---------------------------------------------------------------------- teacher_target_prob weighting
def test_teacher_target_prob_weight_inside_and_outside_the_top_k():
    """w = T(y) when the target is one of the K stored ids (any position), else 0: then the term and its gradient are
    the cross-entropy's alone, softmax(z) - onehot(y)."""
    logits, targets, trained, ids, teacher = make_inputs(seed=6)
    logits.requires_grad_(True)
    out = run_ours(logits, targets, trained, ids, teacher, divergence="forward_kl", alpha=0.5, tail="bucket",
                   token_weight="teacher_target_prob")
    out.terms.sum().backward()
    probs = torch.softmax(logits.detach(), -1)
    inside = outside = 0
    for row in range(ROWS):
        if not trained[row]:
            continue
        stored = ids[row].tolist()
        cross_entropy = -math.log(float(probs[row, targets[row]]))
        if int(targets[row]) in stored:
            inside += 1
            expected_weight = math.exp(float(teacher[row, stored.index(int(targets[row]))]))
            assert float(out.metrics["kd_token_weight"][row]) == pytest.approx(expected_weight, rel=1e-6)
            assert float(out.terms[row]) > cross_entropy + 1e-6  # the teacher's KD counts here
        else:
            outside += 1
            assert float(out.metrics["kd_token_weight"][row]) == 0.0
            assert float(out.terms[row]) == pytest.approx(cross_entropy, rel=1e-12)
            onehot = torch.nn.functional.one_hot(targets[row], VOCAB).double()
            torch.testing.assert_close(logits.grad[row], probs[row] - onehot, rtol=1e-10, atol=1e-12)
        top1 = float(int(targets[row]) == stored[0])
        assert float(out.metrics["kd_teacher_top1_is_target"][row]) == top1
    assert inside >= 2 and outside >= 1  # make_inputs places targets both ways


def test_teacher_target_prob_helper():
    ids = torch.tensor([[5, 2, 9], [1, 3, 4]], dtype=torch.int32)
    log_probs = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.6, 0.3, 0.05]]))
    got = teacher_target_prob(log_probs, ids, torch.tensor([9, 7]))
    torch.testing.assert_close(got, torch.tensor([0.1, 0.0]))


def test_unknown_token_weight_is_refused():
    logits, targets, trained, ids, teacher = make_inputs()
    with pytest.raises(ValueError, match="teacher_target_prob"):
        run_ours(logits, targets, trained, ids, teacher, divergence="forward_kl", alpha=0.5, tail="bucket",
                 token_weight="target_prob")


# ---------------------------------------------------------------------- stored raw logits
def test_raw_logits_are_renormalized_over_the_k_ids():
    """A teacher stored as K raw logits: T over the K ids is their softmax (no tail), the renormalized divergence."""
    g = torch.Generator().manual_seed(8)
    raw = 3 * torch.randn(4, K, generator=g)
    got = teacher_log_probs(raw, "logits")
    for row in range(4):
        exps = [math.exp(float(v)) for v in raw[row]]
        for j in range(K):
            assert float(got[row, j]) == pytest.approx(math.log(exps[j] / sum(exps)), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(teacher_log_probs(raw, "logprobs"), raw)
    with pytest.raises(ValueError, match="logprobs or logits"):
        teacher_log_probs(raw, "probs")


# ---------------------------------------------------------------------- the stored rows over a response
@pytest.mark.parametrize("kind", ["logprobs", "logits"])
def test_response_rows_put_the_stored_rows_at_the_trained_tokens(kind):
    """The trainer's layout: stored row j at the j-th trained response token; the untrained tokens get a valid
    placeholder (distinct ids, finite log-probabilities of total mass below 1, so that a tail bucket exists)."""
    mask = torch.tensor([0, 1, 1, 0, 0, 1, 0], dtype=torch.int32)
    rng = np.random.default_rng(0)
    ids = rng.choice(50, size=(3, K), replace=False).astype(np.int32)
    values = rng.normal(size=(3, K)).astype(np.float32) - 3
    out_ids, out_log_probs = response_rows(StoredTopK(7, ids, values, kind), mask)
    assert out_ids.shape == out_log_probs.shape == (7, K)
    for row, position in enumerate([1, 2, 5]):
        assert out_ids[position].tolist() == ids[row].tolist()
        expected = values[row] if kind == "logprobs" else values[row] - np.log(np.exp(values[row]).sum())
        np.testing.assert_allclose(out_log_probs[position].numpy(), expected, rtol=1e-6, atol=1e-6)
    for position in (0, 3, 4, 6):
        assert len(set(out_ids[position].tolist())) == K
        mass = float(out_log_probs[position].exp().sum())
        assert torch.isfinite(out_log_probs[position]).all() and 0 < mass < 1
    with pytest.raises(ValueError, match="data row idx 7: 2 trained tokens .* 3 stored"):
        response_rows(StoredTopK(7, ids, values, kind), torch.tensor([0, 1, 0, 1], dtype=torch.int32))


# ---------------------------------------------------------------------- tensor parallel
def _tp_results(rank, world, group):
    logits, targets, trained, ids, teacher = make_inputs(seed=9)
    shard = VOCAB // world
    results = {}
    for divergence, alpha, tail, token_weight in CASES:
        local = logits[:, rank * shard:(rank + 1) * shard].clone().requires_grad_(True)
        out = run_ours(local, targets, trained, ids, teacher, divergence=divergence, alpha=alpha, tail=tail,
                       token_weight=token_weight, tp_group=group)
        weights = torch.arange(1, ROWS + 1, dtype=torch.float64)
        (out.terms * weights).sum().backward()
        grads = [torch.empty_like(local.grad) for _ in range(world)]
        dist.all_gather(grads, local.grad, group=group)
        results[(divergence, tail, token_weight)] = (out.terms.detach(), torch.cat(grads, -1), dict(out.metrics))
    return results


@pytest.mark.distributed
def test_vocabulary_sharded_over_two_ranks_equals_one_rank():
    logits, targets, trained, ids, teacher = make_inputs(seed=9)
    # the stored ids and targets fall in both shards, so that the shards' exchange matters
    assert (ids < VOCAB // 2).any() and (ids >= VOCAB // 2).any()
    assert (targets[trained] < VOCAB // 2).any() and (targets[trained] >= VOCAB // 2).any()
    outputs = gather_from_ranks(_tp_results, 2)
    for divergence, alpha, tail, token_weight in CASES:
        whole = logits.clone().requires_grad_(True)
        out = run_ours(whole, targets, trained, ids, teacher, divergence=divergence, alpha=alpha, tail=tail,
                       token_weight=token_weight)
        (out.terms * torch.arange(1, ROWS + 1, dtype=torch.float64)).sum().backward()
        for rank, results in outputs.items():
            terms, grad, metrics = results[(divergence, tail, token_weight)]
            where = f"rank {rank} {divergence} {tail} {token_weight}"
            torch.testing.assert_close(terms, out.terms.detach(), rtol=1e-12, atol=1e-13, msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(grad, whole.grad, rtol=1e-11, atol=1e-13, msg=lambda m: f"{where}: {m}")
            for name, value in out.metrics.items():
                torch.testing.assert_close(metrics[name], value, rtol=1e-12, atol=1e-13)
