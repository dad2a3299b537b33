"""Divergences against brute-force float64 references: values, gradients, gradcheck, numerics, TRL cross-check."""

import os

import pytest
import torch

from slime_self_distill.core.divergences import (
    full_vocab_divergence,
    sampled_token_divergence,
    topk_divergence,
    vocab_parallel_log_probs_at,
    vocab_parallel_log_softmax,
    vocab_parallel_topk,
)
from tests import divergence_reference as ref

# (divergence, alpha): alpha matters for alpha_js only; 0 and 1 are the forward/reverse special cases.
CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("alpha_js", 0.0), ("alpha_js", 0.3), ("alpha_js", 1.0)]


def make_inputs(n=7, v=13, seed=0, dtype=torch.float64, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = (spread * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    teacher = torch.log_softmax(spread * torch.randn(n, v, generator=g, dtype=torch.float64), -1)
    sampled = torch.randint(0, v, (n,), generator=g)
    return logits, teacher, sampled


def grad_of(values, logits, weights):
    (grad,) = torch.autograd.grad((values * weights).sum(), logits)
    return grad


@pytest.mark.parametrize("kind,alpha", CASES)
def test_full_vocab_matches_reference_value_and_gradient(kind, alpha):
    logits, teacher, sampled = make_inputs()
    weights = torch.rand(logits.shape[0], dtype=torch.float64) + 0.5
    result = full_vocab_divergence(logits, sampled, teacher, divergence=kind, alpha=alpha, chunk_size=3)
    expected = ref.full_vocab(logits, teacher, kind, alpha)
    torch.testing.assert_close(result.divergence, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_of(result.loss_terms, logits, weights), grad_of(expected, logits, weights),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.student_entropy, ref.entropy(logits).detach())
    torch.testing.assert_close(
        result.student_token_log_probs, torch.log(ref.softmax64(logits)).gather(-1, sampled[:, None]).squeeze(-1).detach()
    )


@pytest.mark.parametrize("clip", [0.05, 0.2])
def test_full_vocab_forward_kl_with_clamped_entries_matches_reference(clip):
    logits, teacher, sampled = make_inputs(n=9, v=17, seed=3)
    weights = torch.rand(logits.shape[0], dtype=torch.float64) + 0.5
    result = full_vocab_divergence(logits, sampled, teacher, divergence="forward_kl", alpha=0.0, chunk_size=4,
                                   term_clip=clip)
    expected = ref.clipped_forward_kl(logits, teacher, clip)
    torch.testing.assert_close(result.loss_terms.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_of(result.loss_terms, logits, weights), grad_of(expected, logits, weights),
                               rtol=1e-9, atol=1e-12)
    # the metric stays the unclamped KL; the clamp bites and can make a token's loss term negative
    torch.testing.assert_close(result.divergence, ref.full_vocab(logits, teacher, "forward_kl", 0.0).detach())
    assert (result.loss_terms < result.divergence - 1e-6).any()
    # the teacher's mode is the student's rarity (a large positive term, clamped) while the student's mode is the
    # teacher's rarity (a negative term, kept): the clamped "KL" is negative (OPSD's README warns of it)
    student = torch.tensor([[0.0, 6.0, 0.0, 0.0]], dtype=torch.float64)
    teacher_row = torch.log_softmax(torch.tensor([[4.0, 3.0, 0.0, 0.0]], dtype=torch.float64), -1)
    crafted = full_vocab_divergence(student, torch.tensor([1]), teacher_row, divergence="forward_kl", alpha=0.0,
                                    term_clip=clip)
    assert crafted.loss_terms.item() < 0 < crafted.divergence.item()
    assert torch.autograd.gradcheck(
        lambda z: full_vocab_divergence(z, sampled, teacher, divergence="forward_kl", alpha=0.0, chunk_size=4,
                                        term_clip=clip).loss_terms, (logits,))
    with pytest.raises(ValueError, match="term_clip clamps the entries of the forward KL"):
        full_vocab_divergence(logits, sampled, teacher, divergence="alpha_js", alpha=0.5, term_clip=clip)


@pytest.mark.parametrize("kind,alpha", CASES)
def test_topk_matches_reference_value_and_gradient(kind, alpha):
    logits, teacher, sampled = make_inputs()
    topk_values, topk_ids = teacher.topk(4, dim=-1)
    weights = torch.rand(logits.shape[0], dtype=torch.float64) + 0.5
    result = topk_divergence(logits, sampled, topk_values, topk_ids, divergence=kind, alpha=alpha, chunk_size=2)
    expected = ref.topk_plus_tail(logits, topk_values, topk_ids, kind, alpha)
    torch.testing.assert_close(result.divergence, expected.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_of(result.loss_terms, logits, weights), grad_of(expected, logits, weights),
                               rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(result.teacher_captured_mass, topk_values.exp().sum(-1))
    # Merging categories can only lower a divergence (data-processing inequality).
    assert torch.all(result.divergence <= ref.full_vocab(logits, teacher, kind, alpha).detach() + 1e-12)


TOPK_ONLY_CASES = [("mixed_kl", 0.0), ("mixed_kl", 0.5), ("mixed_kl", 0.8)]


@pytest.mark.parametrize("kind,alpha", CASES + TOPK_ONLY_CASES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_topk_tails_and_mixed_kl_match_reference_value_gradient_and_gradcheck(kind, alpha, tail):
    logits, teacher, sampled = make_inputs()
    topk_values, topk_ids = teacher.topk(4, dim=-1)
    weights = torch.rand(logits.shape[0], dtype=torch.float64) + 0.5
    result = topk_divergence(logits, sampled, topk_values, topk_ids, divergence=kind, alpha=alpha, tail=tail,
                             chunk_size=2)
    reference = ref.topk_plus_tail if tail == "bucket" else ref.topk_renormalized
    expected = reference(logits, topk_values, topk_ids, kind, alpha)
    torch.testing.assert_close(result.divergence, expected.detach(), rtol=1e-9, atol=1e-12)
    gradient = grad_of(result.loss_terms, logits, weights)
    torch.testing.assert_close(gradient, grad_of(expected, logits, weights), rtol=1e-8, atol=1e-12)
    if tail == "renormalize":  # the renormalized divergence depends on the K logits only
        outside = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, topk_ids, False)
        assert gradient[outside].abs().max() < 1e-12
    small_logits, small_teacher, small_sampled = make_inputs(n=3, v=7, seed=1)
    small_values, small_ids = small_teacher.topk(3, dim=-1)
    assert torch.autograd.gradcheck(
        lambda z: topk_divergence(z, small_sampled, small_values, small_ids, divergence=kind, alpha=alpha,
                                  tail=tail).loss_terms, (small_logits,))


def test_mixed_kl_is_refused_outside_the_topk_scope():
    logits, teacher, sampled = make_inputs(n=2, v=5)
    with pytest.raises(ValueError, match="mixed_kl is computed on the top-K support only"):
        full_vocab_divergence(logits, sampled, teacher, divergence="mixed_kl", alpha=0.5)
    with pytest.raises(ValueError, match="mixed_kl is computed on the top-K support only"):
        sampled_token_divergence(logits, sampled, teacher[:, 0], divergence="mixed_kl", alpha=0.5, ratio_cap=10.0)
    with pytest.raises(ValueError, match="unknown top-K tail"):
        topk_divergence(logits, sampled, *teacher.topk(2, -1), divergence="forward_kl", alpha=0.5, tail="drop")


@pytest.mark.parametrize("kind,alpha", CASES)
def test_gradcheck_full_vocab_and_topk(kind, alpha):
    logits, teacher, sampled = make_inputs(n=4, v=7)
    topk_values, topk_ids = teacher.topk(3, dim=-1)
    assert torch.autograd.gradcheck(
        lambda z: full_vocab_divergence(z, sampled, teacher, divergence=kind, alpha=alpha, chunk_size=3).loss_terms,
        (logits,),
    )
    assert torch.autograd.gradcheck(
        lambda z: topk_divergence(z, sampled, topk_values, topk_ids, divergence=kind, alpha=alpha).loss_terms,
        (logits,),
    )


def test_gradcheck_log_probs_at_and_log_softmax():
    logits, _, _ = make_inputs(n=5, v=9)
    ids = torch.randint(0, 9, (5, 3))
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_log_probs_at(z, ids, None, 2)[0], (logits,))
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_log_softmax(z, None, 2), (logits,))


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_chunking_does_not_change_results(chunk_size):
    logits, teacher, sampled = make_inputs(n=9, v=11)
    weights = torch.rand(9, dtype=torch.float64)
    baseline = full_vocab_divergence(logits, sampled, teacher, divergence="alpha_js", alpha=0.3, chunk_size=9)
    chunked = full_vocab_divergence(logits, sampled, teacher, divergence="alpha_js", alpha=0.3, chunk_size=chunk_size)
    torch.testing.assert_close(chunked.divergence, baseline.divergence, rtol=0, atol=0)
    torch.testing.assert_close(grad_of(chunked.loss_terms, logits, weights), grad_of(baseline.loss_terms, logits, weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scope", ["full_vocab", "topk", "sampled_token"])
def test_low_precision_logits_accumulate_in_fp32(dtype, scope):
    logits, teacher, sampled = make_inputs(n=6, v=50, dtype=dtype)
    teacher_stored = teacher.to(torch.float16)  # as the full-vocab store may keep it
    exact_logits = logits.detach().to(torch.float64)
    if scope == "full_vocab":
        out = full_vocab_divergence(logits, sampled, teacher_stored, divergence="alpha_js", alpha=0.3)
        expected = ref.full_vocab(exact_logits, teacher_stored.double(), "alpha_js", 0.3)
    elif scope == "topk":
        values, ids = teacher.topk(8, -1)
        out = topk_divergence(logits, sampled, values.float(), ids, divergence="forward_kl", alpha=0.5)
        expected = ref.topk_plus_tail(exact_logits, values.float().double(), ids, "forward_kl", 0.5)
    else:
        teacher_token = teacher.gather(-1, sampled[:, None]).squeeze(-1).float()
        out = sampled_token_divergence(logits, sampled, teacher_token, divergence="reverse_kl", alpha=0.5, ratio_cap=10)
        expected = torch.log(ref.softmax64(exact_logits)).gather(-1, sampled[:, None]).squeeze(-1) - teacher_token.double()
    assert out.divergence.dtype == torch.float32
    torch.testing.assert_close(out.divergence.double(), expected, rtol=1e-4, atol=1e-5)
    out.loss_terms.sum().backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("kind,alpha", CASES)
@pytest.mark.parametrize("scope", ["full_vocab", "topk", "sampled_token"])
def test_neg_inf_teacher_entries_give_finite_values_and_gradients(scope, kind, alpha):
    logits, teacher, sampled = make_inputs(n=5, v=12, dtype=torch.float32)
    teacher = teacher.float()
    teacher[:, :4] = float("-inf")  # e.g. a vocabulary the teacher masks out
    teacher = teacher - torch.logsumexp(teacher, -1, keepdim=True)
    sampled = torch.tensor([0, 1, 5, 7, 2])  # some sampled tokens have teacher probability 0
    if scope == "full_vocab":
        out = full_vocab_divergence(logits, sampled, teacher, divergence=kind, alpha=alpha)
    elif scope == "topk":
        values, ids = teacher.topk(10, -1)  # the top-10 includes -inf entries
        out = topk_divergence(logits, sampled, values, ids, divergence=kind, alpha=alpha)
    else:
        out = sampled_token_divergence(logits, sampled, teacher.gather(-1, sampled[:, None]).squeeze(-1),
                                       divergence=kind, alpha=alpha, ratio_cap=10)
    out.loss_terms.sum().backward()
    assert torch.isfinite(out.divergence).all() and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("scope", ["full_vocab", "topk", "sampled_token"])
def test_empty_input_gives_empty_outputs(scope):
    logits = torch.zeros(0, 8, requires_grad=True)
    sampled = torch.zeros(0, dtype=torch.long)
    if scope == "full_vocab":
        out = full_vocab_divergence(logits, sampled, torch.zeros(0, 8), divergence="forward_kl", alpha=0.5)
    elif scope == "topk":
        out = topk_divergence(logits, sampled, torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long),
                              divergence="forward_kl", alpha=0.5)
    else:
        out = sampled_token_divergence(logits, sampled, torch.zeros(0), divergence="reverse_kl", alpha=0.5, ratio_cap=2)
    assert out.loss_terms.shape == (0,)
    out.loss_terms.sum().backward()
    assert logits.grad.shape == logits.shape


def test_topk_helper_returns_global_top_values():
    values = torch.randn(6, 40, dtype=torch.float64)
    top_values, top_ids = vocab_parallel_topk(values, 5)
    torch.testing.assert_close(top_values, values.topk(5, -1).values)
    torch.testing.assert_close(values.gather(-1, top_ids), top_values)
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        vocab_parallel_topk(values, 41)


def test_bad_shapes_are_named():
    logits, teacher, sampled = make_inputs()
    with pytest.raises(ValueError, match="teacher.s log-probabilities have shape"):
        full_vocab_divergence(logits, sampled, teacher[:, :5], divergence="forward_kl", alpha=0.5)
    with pytest.raises(ValueError, match="must both be"):
        topk_divergence(logits, sampled, teacher[:, :3], teacher.topk(4).indices, divergence="forward_kl", alpha=0.5)
    with pytest.raises(ValueError, match="unknown divergence"):
        full_vocab_divergence(logits, sampled, teacher, divergence="kl", alpha=0.5)


# ---------------------------------------------------------------------- sampled-token surrogates (Monte Carlo)
@pytest.mark.parametrize("kind,alpha", [("reverse_kl", 0.5), ("alpha_js", 0.3), ("forward_kl", 0.5)])
def test_sampled_token_gradient_is_unbiased(kind, alpha):
    """E_{y~S}[grad surrogate] equals the exact full-vocabulary gradient (within Monte-Carlo error), and the
    reported estimate averages to the exact divergence."""
    rows, vocab, draws, batches = 3, 6, 4000, 10
    logits, teacher, _ = make_inputs(n=rows, v=vocab, seed=3, spread=1.0)
    exact_value = ref.full_vocab(logits, teacher, kind, alpha)
    exact_grad = grad_of(exact_value, logits, torch.ones(rows, dtype=torch.float64))
    g = torch.Generator().manual_seed(11)
    probs = ref.softmax64(logits).detach()
    batch_grads, batch_estimates = [], []
    for _ in range(batches):
        y = torch.multinomial(probs, draws, replacement=True, generator=g).T.reshape(-1)  # [draws * rows]
        repeated = logits.unsqueeze(0).expand(draws, rows, vocab).reshape(-1, vocab)
        teacher_token = teacher.repeat(draws, 1).gather(-1, y[:, None]).squeeze(-1)
        out = sampled_token_divergence(repeated, y, teacher_token, divergence=kind, alpha=alpha, ratio_cap=1e6)
        batch_grads.append(grad_of(out.loss_terms, logits, torch.ones_like(out.loss_terms)) / draws)
        batch_estimates.append(out.divergence.reshape(draws, rows).mean(0))
    grads, estimates = torch.stack(batch_grads), torch.stack(batch_estimates)
    grad_error = (grads.mean(0) - exact_grad).abs()
    grad_se = grads.std(0) / batches**0.5
    assert torch.all(grad_error <= 5 * grad_se + 2e-3), (grad_error.max(), grad_se.max())
    value_se = estimates.std(0) / batches**0.5
    assert torch.all((estimates.mean(0) - exact_value.detach()).abs() <= 5 * value_se + 2e-3)


def test_differentiating_the_log_ratio_has_zero_expected_gradient():
    """The "k1 as a loss" mistake: grad (log S - log T) averages to 0, far from the reverse-KL gradient that the
    surrogate recovers; this guards the test above against a surrogate that only looks right."""
    rows, vocab, draws = 2, 5, 20000
    logits, teacher, _ = make_inputs(n=rows, v=vocab, seed=5, spread=1.0)
    exact_grad = grad_of(ref.full_vocab(logits, teacher, "reverse_kl", 0.5), logits, torch.ones(rows, dtype=torch.float64))
    y = torch.multinomial(ref.softmax64(logits).detach(), draws, replacement=True,
                          generator=torch.Generator().manual_seed(2)).T.reshape(-1)
    repeated = logits.unsqueeze(0).expand(draws, rows, vocab).reshape(-1, vocab)
    log_s, _ = vocab_parallel_log_probs_at(repeated, y[:, None])
    k1_grad = grad_of(log_s.squeeze(-1) - teacher.repeat(draws, 1).gather(-1, y[:, None]).squeeze(-1),
                      logits, torch.ones(draws * rows, dtype=torch.float64)) / draws
    assert k1_grad.abs().max() < 0.05 < exact_grad.abs().max()


# ---------------------------------------------------------------------- TRL cross-check (same convention)
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_loss_utils = pytest.importorskip("trl.experimental.sdft.loss_utils", reason="TRL is not installed")


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_full_vocab_and_topk_agree_with_trl(alpha):
    logits, _, sampled = make_inputs(n=6, v=20, dtype=torch.float32)
    teacher_logits = torch.randn(6, 20)
    ours = full_vocab_divergence(logits, sampled, torch.log_softmax(teacher_logits, -1), divergence="alpha_js", alpha=alpha)
    theirs = trl_loss_utils.compute_full_logit_self_distillation_loss(logits, teacher_logits, distillation_alpha=alpha)
    torch.testing.assert_close(ours.divergence, theirs.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(ours.loss_terms, logits, torch.ones(6)), grad_of(theirs, logits, torch.ones(6)),
                               rtol=1e-4, atol=1e-6)
    # TRL's top-k uses the student's top-k support; give ours the same support and the teacher's log-probs there.
    support = logits.detach().topk(5, -1).indices
    teacher_on_support = torch.log_softmax(teacher_logits, -1).gather(-1, support)
    ours_topk = topk_divergence(logits, sampled, teacher_on_support, support, divergence="alpha_js", alpha=alpha)
    theirs_topk = trl_loss_utils.compute_topk_self_distillation_loss(
        logits, teacher_logits, distillation_topk=5, distillation_alpha=alpha, distillation_add_tail=True
    )
    torch.testing.assert_close(ours_topk.divergence, theirs_topk.detach(), rtol=1e-4, atol=1e-5)


def test_sampled_token_reverse_kl_gradient_agrees_with_trl():
    logits, _, sampled = make_inputs(n=6, v=20, dtype=torch.float32)
    teacher_logits = torch.randn(6, 20)
    teacher_token = torch.log_softmax(teacher_logits, -1).gather(-1, sampled[:, None]).squeeze(-1)
    ours = sampled_token_divergence(logits, sampled, teacher_token, divergence="reverse_kl", alpha=1.0, ratio_cap=10)
    theirs = trl_loss_utils.compute_sampled_token_self_distillation_loss(
        logits.unsqueeze(0), teacher_logits.unsqueeze(0), sampled.unsqueeze(0), distillation_alpha=1.0
    ).squeeze(0)
    torch.testing.assert_close(grad_of(ours.loss_terms, logits, torch.ones(6)), grad_of(theirs, logits, torch.ones(6)),
                               rtol=1e-5, atol=1e-6)

