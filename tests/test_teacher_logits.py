"""The teacher recomputed from its final hidden states (``TeacherHiddenStates``) and the top-K supports built on it
(``teacher_support``), against brute-force float64 references written here from the definitions.

No package helper builds an expected value: the teacher's log_softmax(h W^T / tau) is computed whole, supports are
picked per row with Python sorting and sets, and every divergence is summed over explicit categories (the support
entries plus the tail bucket, or both sides renormalized) with autograd giving the reference gradients. Real gloo
groups at TP=2 and TP=4 must reproduce TP=1; bad arguments raise named ValueErrors."""

import math

import pytest
import torch

from slime_self_distill.core.divergences import full_vocab_divergence, topk_divergence
from slime_self_distill.core.teacher_logits import TeacherHiddenStates, TopKSupport, teacher_support
from tests.gloo_results import gather_from_ranks

SUPPORTS = ["teacher", "student", "union"]
TAILS = ["bucket", "renormalize"]
FULL_CASES = [("forward_kl", 0.0), ("reverse_kl", 0.0), ("alpha_js", 0.3), ("alpha_js", 0.5)]
TOPK_CASES = [("forward_kl", 0.0), ("reverse_kl", 0.0), ("alpha_js", 0.5), ("mixed_kl", 0.3)]
CLIP = 0.05
F64 = torch.float64


# ---------------------------------------------------------------------- brute-force float64 references
def ref_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax in float64, written out (differentiable)."""
    z = logits.to(F64)
    row_max = z.max(-1, keepdim=True).values.detach()
    return z - row_max - torch.log(torch.exp(z - row_max).sum(-1, keepdim=True))


def ref_teacher_log_probs(hidden, weight, temperature) -> torch.Tensor:
    """The whole teacher: log_softmax(h W^T / tau) of the (upcast) inputs, in float64."""
    return ref_log_softmax(hidden.detach().to(F64) @ weight.detach().to(F64).T / temperature)


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the categories of a 1-D vector, 0 log 0 = 0."""
    positive = p > 0
    safe_p = torch.where(positive, p, torch.ones_like(p))
    safe_q = torch.where(positive, q, torch.ones_like(q))
    return torch.where(positive, p * (torch.log(safe_p) - torch.log(safe_q)), torch.zeros_like(p)).sum()


def ref_divergence(s: torch.Tensor, t: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """s, t: the student's and the teacher's probabilities over the same explicit categories."""
    if kind == "forward_kl":
        return ref_kl(t, s)
    if kind == "reverse_kl":
        return ref_kl(s, t)
    if kind == "mixed_kl":
        return (1 - alpha) * ref_kl(t, s) + alpha * ref_kl(s, t)
    mixture = alpha * t + (1 - alpha) * s
    return alpha * ref_kl(t, mixture) + (1 - alpha) * ref_kl(s, mixture)


def ref_full_vocab(logits, teacher_log_probs, kind, alpha, clip=None) -> torch.Tensor:
    """[N] per-row divergence over the whole vocabulary (with ``clip``: forward KL's entries clamped, then summed)."""
    student = ref_log_softmax(logits)
    rows = []
    for row in range(student.shape[0]):
        s, t = student[row].exp(), teacher_log_probs[row].exp()
        if clip is None:
            rows.append(ref_divergence(s, t, kind, alpha))
        else:
            terms = torch.where(t > 0, t * (teacher_log_probs[row] - student[row]), torch.zeros_like(t))
            rows.append(torch.clamp(terms, max=clip).sum())
    return torch.stack(rows)


def ref_top_ids(row_values, k: int) -> list:
    """The k largest entries of one row (a list of floats), largest first, by plain sorting."""
    return sorted(range(len(row_values)), key=lambda v: -row_values[v])[:k]


def ref_support_ids(student_row, teacher_row, support: str, k: int) -> list:
    """The distinct ids of one row's support: teacher's top-K, student's top-K, or their union."""
    teacher_ids, student_ids = ref_top_ids(teacher_row, k), ref_top_ids(student_row, k)
    if support == "teacher":
        return teacher_ids
    if support == "student":
        return student_ids
    return teacher_ids + [i for i in student_ids if i not in set(teacher_ids)]


def ref_topk_row(student_log_probs_row, teacher_log_probs_row, ids: list, tail: str, kind: str, alpha: float):
    """One row's divergence over the categories ``ids`` (distinct) plus the tail bucket, or renormalized on them."""
    index = torch.tensor(ids, dtype=torch.long)
    s, t = student_log_probs_row[index].exp(), teacher_log_probs_row[index].exp()
    if tail == "bucket":
        s = torch.cat([s, (1 - s.sum()).clamp(min=0).reshape(1)])
        t = torch.cat([t, (1 - t.sum()).clamp(min=0).reshape(1)])
    else:
        s, t = s / s.sum(), t / t.sum()
    return ref_divergence(s, t, kind, alpha)


def ref_topk(logits, teacher_log_probs, row_ids: list, tail: str, kind: str, alpha: float) -> torch.Tensor:
    student = ref_log_softmax(logits)
    return torch.stack([ref_topk_row(student[r], teacher_log_probs[r], ids, tail, kind, alpha)
                        for r, ids in enumerate(row_ids)])


def ref_entropy(logits) -> torch.Tensor:
    log_p = ref_log_softmax(logits.detach())
    return -(log_p.exp() * log_p).sum(-1)


# ---------------------------------------------------------------------- inputs
def make_case(n=8, v=16, h=6, seed=0, scale=3.0, temperature=1.0, special_rows=True):
    """Student logits and teacher hidden states / output weights whose logits are both ~``scale`` wide, so that
    the two top-K sets differ. With ``special_rows``: row 0's student is a monotone map of its teacher (identical
    top-K sets), row 1's is its negation (disjoint top-K sets while 2K <= V)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64)
    weight = scale / math.sqrt(h) * torch.randn(v, h, generator=g, dtype=F64)
    logits = scale * torch.randn(n, v, generator=g, dtype=F64)
    if special_rows:
        teacher_logits = hidden @ weight.T / temperature
        logits[0] = 1.5 * teacher_logits[0] + 0.25
        logits[1] = -teacher_logits[1]
    sampled = torch.randint(0, v, (n,), generator=g)
    row_weights = torch.rand(n, generator=g, dtype=F64) + 0.5
    return logits.requires_grad_(True), hidden, weight, sampled, row_weights


def grad_of(values, logits, row_weights):
    (grad,) = torch.autograd.grad((values * row_weights).sum(), logits, retain_graph=True)
    return grad


def brute_support_rows(logits, teacher_log_probs, support, k):
    return [ref_support_ids(logits[r].tolist(), teacher_log_probs[r].tolist(), support, k)
            for r in range(logits.shape[0])]


# ---------------------------------------------------------------------- 1. TeacherHiddenStates.log_probs
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_log_probs_match_brute_force_for_every_chunking_and_dtype(temperature):
    n, v, h = 7, 40, 64
    _, hidden, weight, _, _ = make_case(n=n, v=v, h=h, seed=1, special_rows=False)
    expected64 = ref_teacher_log_probs(hidden, weight, temperature)
    h32, w32 = hidden.float(), weight.float()
    expected32 = ref_teacher_log_probs(h32, w32, temperature)
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    expected16 = ref_teacher_log_probs(h16, w16, temperature)  # from the same bf16 values, upcast
    # The bf16 output layer rounds each logit to bf16 (relative 2^-8 at most) before the fp32 softmax; a log-prob
    # moves by at most twice the largest logit error.
    bf16_tolerance = 2 * 2.0**-8 * (h16.double() @ w16.double().T).abs().max().item() / temperature
    for chunk_size in (1, 3, n, n + 5):
        got64 = TeacherHiddenStates(hidden, weight, temperature).log_probs(chunk_size=chunk_size, dtype=F64)
        assert got64.dtype == F64 and got64.shape == (n, v)
        torch.testing.assert_close(got64, expected64, rtol=0, atol=1e-12)
        got32 = TeacherHiddenStates(h32, w32, temperature).log_probs(chunk_size=chunk_size)
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32.double(), expected32, rtol=0, atol=2e-5)
        got16 = TeacherHiddenStates(h16, w16, temperature).log_probs(chunk_size=chunk_size)
        assert got16.dtype == torch.float32
        error = (got16.double() - expected16).abs().max().item()
        assert error <= bf16_tolerance, (error, bf16_tolerance)
        torch.testing.assert_close(got16.double().exp().sum(-1), torch.ones(n, dtype=F64), rtol=0, atol=1e-5)
    if temperature != 1.0:  # the temperature really divides
        assert (TeacherHiddenStates(hidden, weight).log_probs(dtype=F64) - expected64).abs().max() > 0.1
    assert TeacherHiddenStates(hidden, weight, temperature).shape == (n, v)


def test_float32_hidden_with_bf16_weight_computes_in_the_weight_dtype():
    """The output layer's dtype decides the matmul: fp32 hidden states are cast to the bf16 weights'."""
    _, hidden, weight, _, _ = make_case(n=5, v=24, h=32, seed=2, special_rows=False)
    w16 = weight.bfloat16()
    got = TeacherHiddenStates(hidden.float(), w16, 0.9).log_probs(chunk_size=2)
    expected = ref_teacher_log_probs(hidden.bfloat16(), w16, 0.9)
    tolerance = 2 * 2.0**-8 * (hidden.bfloat16().double() @ w16.double().T).abs().max().item() / 0.9
    assert (got.double() - expected).abs().max().item() <= tolerance


# ---------------------------------------------------------------------- 2. full vocabulary, hidden-state teacher
@pytest.mark.parametrize("kind,alpha,clip", [case + (None,) for case in FULL_CASES] + [("forward_kl", 0.0, CLIP)])
def test_full_vocab_with_hidden_state_teacher_matches_brute_force(kind, alpha, clip):
    temperature = 0.7
    logits, hidden, weight, sampled, row_weights = make_case(n=9, v=17, h=6, seed=3, temperature=temperature)
    teacher = TeacherHiddenStates(hidden, weight, temperature)
    result = full_vocab_divergence(logits, sampled, teacher, divergence=kind, alpha=alpha, chunk_size=4,
                                   term_clip=clip)
    teacher_log_probs = ref_teacher_log_probs(hidden, weight, temperature)
    expected = ref_full_vocab(logits, teacher_log_probs, kind, alpha, clip)
    torch.testing.assert_close(result.loss_terms.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_of(result.loss_terms, logits, row_weights),
                               grad_of(expected, logits, row_weights), rtol=1e-9, atol=1e-12)
    unclamped = ref_full_vocab(logits, teacher_log_probs, kind, alpha).detach()
    torch.testing.assert_close(result.divergence, unclamped, rtol=1e-10, atol=1e-12)
    if clip is not None:  # the clamp bites on some rows
        assert (result.loss_terms.detach() < result.divergence - 1e-6).any()
    torch.testing.assert_close(result.student_entropy, ref_entropy(logits), rtol=1e-10, atol=1e-12)
    token = ref_log_softmax(logits.detach()).gather(-1, sampled[:, None]).squeeze(-1)
    torch.testing.assert_close(result.student_token_log_probs, token, rtol=1e-10, atol=1e-12)
    # the hidden-state teacher and its precomputed log-probabilities are the same teacher
    precomputed = full_vocab_divergence(logits, sampled, teacher_log_probs, divergence=kind, alpha=alpha,
                                        chunk_size=4, term_clip=clip)
    torch.testing.assert_close(result.loss_terms, precomputed.loss_terms, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind,alpha,clip", [case + (None,) for case in FULL_CASES] + [("forward_kl", 0.0, 0.1)])
def test_gradcheck_full_vocab_with_hidden_state_teacher(kind, alpha, clip):
    logits, hidden, weight, sampled, _ = make_case(n=4, v=7, h=5, seed=4, temperature=1.3)
    teacher = TeacherHiddenStates(hidden, weight, 1.3)
    assert torch.autograd.gradcheck(
        lambda z: full_vocab_divergence(z, sampled, teacher, divergence=kind, alpha=alpha, chunk_size=3,
                                        term_clip=clip).loss_terms, (logits,))


def test_full_vocab_with_bf16_student_and_bf16_teacher_is_close_to_brute_force():
    """The production dtypes: bf16 student logits, bf16 hidden states and output weights."""
    logits, hidden, weight, sampled, _ = make_case(n=6, v=48, h=32, seed=5, special_rows=False)
    student = logits.detach().bfloat16().requires_grad_(True)
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    result = full_vocab_divergence(student, sampled, TeacherHiddenStates(h16, w16), divergence="alpha_js", alpha=0.5,
                                   chunk_size=4)
    assert result.divergence.dtype == torch.float32
    expected = ref_full_vocab(student.detach().double(), ref_teacher_log_probs(h16, w16, 1.0), "alpha_js", 0.5)
    torch.testing.assert_close(result.divergence.double(), expected, rtol=0.05, atol=5e-3)
    result.loss_terms.sum().backward()
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad.float()).all()


# ---------------------------------------------------------------------- 3. top-K supports
def test_supports_match_brute_force_ids_order_and_presence():
    k = 4
    logits, hidden, weight, _, _ = make_case(seed=6, temperature=1.3)
    teacher = TeacherHiddenStates(hidden, weight, 1.3)
    teacher_log_probs = ref_teacher_log_probs(hidden, weight, 1.3)
    for chunk_size in (1, 3, 100):
        supports = {name: teacher_support(logits.detach(), teacher, name, k, chunk_size=chunk_size)
                    for name in SUPPORTS}
        for row in range(logits.shape[0]):
            teacher_ids = ref_top_ids(teacher_log_probs[row].tolist(), k)
            student_ids = ref_top_ids(logits[row].tolist(), k)
            assert supports["teacher"].ids[row].tolist() == teacher_ids
            assert supports["student"].ids[row].tolist() == student_ids
            assert supports["union"].ids[row].tolist() == teacher_ids + student_ids
            assert supports["union"].present[row].tolist() == [True] * k + [i not in teacher_ids for i in student_ids]
        for name, support in supports.items():
            assert support.ids.dtype == torch.int64 and support.teacher_log_probs.dtype == F64
            assert (support.present is None) == (name != "union")
            torch.testing.assert_close(support.teacher_log_probs, teacher_log_probs.gather(-1, support.ids),
                                       rtol=0, atol=1e-12)
    union_sizes = supports["union"].present.sum(-1).tolist()
    assert union_sizes[0] == k and union_sizes[1] == 2 * k  # identical and disjoint top-K sets
    assert any(k < size < 2 * k for size in union_sizes[2:])  # and partial overlaps


@pytest.mark.parametrize("kind,alpha", TOPK_CASES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("support_name", SUPPORTS)
def test_topk_on_each_support_matches_brute_force(support_name, tail, kind, alpha):
    k = 4
    logits, hidden, weight, sampled, row_weights = make_case(seed=7, temperature=0.7)
    teacher = TeacherHiddenStates(hidden, weight, 0.7)
    support = teacher_support(logits.detach(), teacher, support_name, k, chunk_size=3)
    result = topk_divergence(logits, sampled, support.teacher_log_probs, support.ids, divergence=kind, alpha=alpha,
                             chunk_size=3, tail=tail, present=support.present)
    teacher_log_probs = ref_teacher_log_probs(hidden, weight, 0.7)
    row_ids = brute_support_rows(logits.detach(), teacher_log_probs, support_name, k)
    expected = ref_topk(logits, teacher_log_probs, row_ids, tail, kind, alpha)
    torch.testing.assert_close(result.divergence, expected.detach(), rtol=1e-9, atol=1e-12)
    gradient = grad_of(result.loss_terms, logits, row_weights)
    torch.testing.assert_close(gradient, grad_of(expected, logits, row_weights), rtol=1e-8, atol=1e-12)
    outside = torch.ones_like(gradient, dtype=torch.bool)
    for row, ids in enumerate(row_ids):
        outside[row, ids] = False
    if tail == "renormalize":  # only the support's logits matter
        assert gradient[outside].abs().max() < 1e-12
    else:  # the tail bucket reaches every logit
        assert (gradient[outside] != 0).all()
    mass = torch.stack([teacher_log_probs[r, ids].exp().sum() for r, ids in enumerate(row_ids)])
    torch.testing.assert_close(result.teacher_captured_mass, mass, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.student_entropy, ref_entropy(logits), rtol=1e-10, atol=1e-12)
    token = ref_log_softmax(logits.detach()).gather(-1, sampled[:, None]).squeeze(-1)
    torch.testing.assert_close(result.student_token_log_probs, token, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("support_name,tail,kind,alpha", [
    ("union", "bucket", "alpha_js", 0.5),
    ("union", "renormalize", "mixed_kl", 0.3),
    ("student", "bucket", "reverse_kl", 0.0),
    ("teacher", "renormalize", "forward_kl", 0.0),
])
def test_gradcheck_topk_on_supports(support_name, tail, kind, alpha):
    logits, hidden, weight, sampled, _ = make_case(n=4, v=9, h=5, seed=8)
    support = teacher_support(logits.detach(), TeacherHiddenStates(hidden, weight), support_name, 3)
    assert support_name != "union" or not support.present.all()  # absent entries are exercised
    assert torch.autograd.gradcheck(
        lambda z: topk_divergence(z, sampled, support.teacher_log_probs, support.ids, divergence=kind, alpha=alpha,
                                  tail=tail, present=support.present, chunk_size=3).loss_terms, (logits,))


@pytest.mark.parametrize("support_name", SUPPORTS)
def test_support_of_the_whole_vocabulary_is_the_full_vocab_divergence(support_name):
    """K = V: the bucket form (a tail of ~0 mass on each side, clamped) and the renormalized form both equal the
    full-vocabulary divergence, in value and gradient."""
    logits, hidden, weight, sampled, row_weights = make_case(n=6, v=10, h=5, seed=9)
    v = logits.shape[1]
    teacher = TeacherHiddenStates(hidden, weight, 1.0)
    support = teacher_support(logits.detach(), teacher, support_name, v, chunk_size=4)
    for row in range(logits.shape[0]):
        assert sorted(support.ids[row, :v].tolist()) == list(range(v))
    if support_name == "union":
        assert support.present.sum(-1).tolist() == [v] * logits.shape[0]
    teacher_log_probs = ref_teacher_log_probs(hidden, weight, 1.0)
    for kind, alpha in TOPK_CASES:
        expected = ref_full_vocab(logits, teacher_log_probs, kind, alpha) if kind != "mixed_kl" else (
            (1 - alpha) * ref_full_vocab(logits, teacher_log_probs, "forward_kl", 0.0)
            + alpha * ref_full_vocab(logits, teacher_log_probs, "reverse_kl", 0.0))
        for tail in TAILS:
            result = topk_divergence(logits, sampled, support.teacher_log_probs, support.ids, divergence=kind,
                                     alpha=alpha, tail=tail, present=support.present)
            torch.testing.assert_close(result.divergence, expected.detach(), rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(grad_of(result.loss_terms, logits, row_weights),
                                       grad_of(expected, logits, row_weights), rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(result.teacher_captured_mass, torch.ones(logits.shape[0], dtype=F64))
            if kind != "mixed_kl":
                full = full_vocab_divergence(logits, sampled, teacher, divergence=kind, alpha=alpha)
                torch.testing.assert_close(result.divergence, full.divergence, rtol=1e-9, atol=1e-10)


def _check_tied_support(logits, teacher_log_probs, support, name, k):
    """A valid top-K under ties: the values at the chosen ids are the K largest values, the ids are distinct, and
    the union marks exactly the student's ids already among the teacher's."""
    for row in range(logits.shape[0]):
        ids = support.ids[row].tolist()
        parts = {"teacher": [(ids, teacher_log_probs[row])], "student": [(ids, logits[row])],
                 "union": [(ids[:k], teacher_log_probs[row]), (ids[k:], logits[row])]}[name]
        for part_ids, values in parts:
            assert len(set(part_ids)) == k
            assert values[part_ids].tolist() == sorted(values.tolist(), reverse=True)[:k]
        if name == "union":
            assert support.present[row].tolist() == [True] * k + [i not in set(ids[:k]) for i in ids[k:]]


def make_tied_case(n=6, v=12, h=4, seed=10):
    """Integer-valued hidden states, weights and student logits: exact ties everywhere (whatever the summation
    order), including across the K-th place; row 0's student logits are all equal."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-1, 2, (n, h), generator=g).to(F64)
    weight = torch.randint(-1, 2, (v, h), generator=g).to(F64)
    logits = torch.randint(-2, 3, (n, v), generator=g).to(F64)
    logits[0] = 1.0
    sampled = torch.randint(0, v, (n,), generator=g)
    return logits, hidden, weight, sampled


def test_ties_are_handled_deterministically():
    """The choice among tied ids is the implementation's, but it is repeatable, a valid top-K, and the divergence
    on it equals the brute force on the same ids."""
    n, k = 6, 4
    logits, hidden, weight, sampled = make_tied_case(n=n)
    logits.requires_grad_(True)
    teacher = TeacherHiddenStates(hidden, weight, 1.0)
    teacher_log_probs = ref_teacher_log_probs(hidden, weight, 1.0)
    for name in SUPPORTS:
        support = teacher_support(logits.detach(), teacher, name, k, chunk_size=4)
        again = teacher_support(logits.detach(), teacher, name, k, chunk_size=4)
        assert torch.equal(support.ids, again.ids)
        _check_tied_support(logits.detach(), teacher_log_probs, support, name, k)
        row_ids = [list(dict.fromkeys(row)) for row in support.ids.tolist()]  # the distinct ids, in order
        for tail in TAILS:
            result = topk_divergence(logits, sampled, support.teacher_log_probs, support.ids, divergence="alpha_js",
                                     alpha=0.5, tail=tail, present=support.present)
            expected = ref_topk(logits, teacher_log_probs, row_ids, tail, "alpha_js", 0.5)
            torch.testing.assert_close(result.divergence, expected.detach(), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(grad_of(result.loss_terms, logits, torch.ones(n, dtype=F64)),
                                       grad_of(expected, logits, torch.ones(n, dtype=F64)), rtol=1e-8, atol=1e-12)


def test_supports_of_an_empty_batch_are_empty():
    teacher = TeacherHiddenStates(torch.zeros(0, 3), torch.randn(8, 3))
    for name in SUPPORTS:
        support = teacher_support(torch.zeros(0, 8), teacher, name, 2)
        assert support.ids.shape == support.teacher_log_probs.shape == (0, 4 if name == "union" else 2)
    assert teacher.log_probs().shape == (0, 8)


def test_teacher_sharing_the_students_trainable_output_layer_gets_no_gradient():
    """Self-distillation's teacher is the student's own model: its output weight is a parameter that requires grad.
    The loss paths treat the teacher as a constant."""
    logits, hidden, weight, sampled, _ = make_case(n=5, v=9, h=4, seed=11)
    parameter = torch.nn.Parameter(weight.clone())
    teacher = TeacherHiddenStates(hidden, parameter, 1.0)
    support = teacher_support(logits.detach(), teacher, "union", 3)
    full = full_vocab_divergence(logits, sampled, teacher, divergence="forward_kl", alpha=0.0)
    top = topk_divergence(logits, sampled, support.teacher_log_probs, support.ids, divergence="forward_kl", alpha=0.0,
                          present=support.present)
    (full.loss_terms.sum() + top.loss_terms.sum()).backward()
    assert parameter.grad is None and logits.grad is not None
    expected = ref_full_vocab(logits.detach(), ref_teacher_log_probs(hidden, weight, 1.0), "forward_kl", 0.0)
    torch.testing.assert_close(full.divergence, expected, rtol=1e-10, atol=1e-12)


def test_log_probs_of_a_teacher_with_a_trainable_output_layer():
    _, hidden, weight, _, _ = make_case(n=3, v=6, h=4, seed=12)
    got = TeacherHiddenStates(hidden, torch.nn.Parameter(weight.clone())).log_probs(dtype=F64)
    torch.testing.assert_close(got.detach(), ref_teacher_log_probs(hidden, weight, 1.0))


# ---------------------------------------------------------------------- 5. errors
def test_bad_arguments_raise_named_value_errors():
    logits, hidden, weight, sampled, _ = make_case(n=4, v=8, h=5, seed=13)
    with pytest.raises(ValueError, match="must share H"):
        TeacherHiddenStates(hidden, weight[:, :4])
    with pytest.raises(ValueError, match="must share H"):
        TeacherHiddenStates(hidden[0], weight)
    for temperature in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            TeacherHiddenStates(hidden, weight, temperature)
    narrow = TeacherHiddenStates(hidden, weight[:7])  # V_local 7 against the student's 8
    with pytest.raises(ValueError, match="teacher.s log-probabilities have shape"):
        full_vocab_divergence(logits, sampled, narrow, divergence="forward_kl", alpha=0.0)
    with pytest.raises(ValueError, match="must have the same shape"):
        teacher_support(logits.detach(), narrow, "teacher", 2)
    with pytest.raises(ValueError, match="must have the same shape"):  # rows differ
        teacher_support(logits.detach()[:3], TeacherHiddenStates(hidden, weight), "teacher", 2)
    teacher = TeacherHiddenStates(hidden, weight)
    with pytest.raises(ValueError, match="unknown top-K support 'both'"):
        teacher_support(logits.detach(), teacher, "both", 2)
    for name in SUPPORTS:
        with pytest.raises(ValueError, match="K=9 exceeds the vocabulary size 8"):
            teacher_support(logits.detach(), teacher, name, 9)


# ---------------------------------------------------------------------- 4. tensor parallel (real gloo groups)
TP_ROWS, TP_VOCAB, TP_HIDDEN, TP_K, TP_CHUNK = 10, 24, 6, 8, 3  # K > V_local at TP=4 (6 columns a rank)


def _sharded_results(rank: int, world: int, group) -> dict:
    """Everything at this rank's vocabulary shard (the whole vocabulary at TP=1): replicated values, supports, and
    this rank's gradient shard."""
    logits, hidden, weight, sampled, row_weights = make_case(n=TP_ROWS, v=TP_VOCAB, h=TP_HIDDEN, seed=14,
                                                             temperature=0.8)
    shard = TP_VOCAB // world
    columns = slice(rank * shard, (rank + 1) * shard)
    teacher = TeacherHiddenStates(hidden, weight[columns], 0.8)
    student = logits.detach()[:, columns]
    results = {"log_probs": teacher.log_probs(group, TP_CHUNK, F64)}
    for kind, alpha in FULL_CASES + [("forward_kl_clip", 0.0)]:
        local = student.clone().requires_grad_(True)
        out = full_vocab_divergence(local, sampled, teacher, divergence=kind.replace("_clip", ""), alpha=alpha,
                                    tp_group=group, chunk_size=TP_CHUNK, term_clip=CLIP if "clip" in kind else None)
        (out.loss_terms * row_weights).sum().backward()
        results[("full", kind, alpha)] = (out.loss_terms.detach(), out.divergence, out.student_entropy,
                                          out.student_token_log_probs, local.grad)
    for name in SUPPORTS:
        for k in (TP_K, TP_VOCAB):
            support = teacher_support(student, teacher, name, k, group, TP_CHUNK)
            results[("support", name, k)] = (support.ids, support.teacher_log_probs, support.present)
        support = teacher_support(student, teacher, name, TP_K, group, TP_CHUNK)
        for tail in TAILS:
            for kind, alpha in TOPK_CASES:
                local = student.clone().requires_grad_(True)
                out = topk_divergence(local, sampled, support.teacher_log_probs, support.ids, divergence=kind,
                                      alpha=alpha, tp_group=group, chunk_size=TP_CHUNK, tail=tail,
                                      present=support.present)
                (out.loss_terms * row_weights).sum().backward()
                results[("topk", name, tail, kind)] = (out.divergence, out.student_entropy,
                                                       out.student_token_log_probs, out.teacher_captured_mass,
                                                       local.grad)
    tied_logits, tied_hidden, tied_weight, _ = make_tied_case(v=TP_VOCAB)
    tied_teacher = TeacherHiddenStates(tied_hidden, tied_weight[columns])
    for name in SUPPORTS:  # ties may resolve differently from TP=1, but identically on every rank
        support = teacher_support(tied_logits[:, columns], tied_teacher, name, TP_K, group, TP_CHUNK)
        results[("ties", name)] = (support.ids, support.teacher_log_probs, support.present)
    return results


def _shard_of(key, value, rank: int, world: int):
    """The TP=1 counterpart of a rank's result: gradients [N, V] and log-probs are cut to the rank's columns."""
    shard = TP_VOCAB // world
    columns = slice(rank * shard, (rank + 1) * shard)
    if key == "log_probs":
        return value[:, columns]
    if key[0] in ("full", "topk"):
        return value[:-1] + (value[-1][:, columns],)
    return value


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_vocabulary_sharded_hidden_state_teacher_equals_single_rank(world):
    expected = _sharded_results(0, 1, None)
    # TP=1 itself is the brute force: the teacher and the supports
    teacher_log_probs = expected["log_probs"]
    logits, hidden, weight, _, _ = make_case(n=TP_ROWS, v=TP_VOCAB, h=TP_HIDDEN, seed=14, temperature=0.8)
    torch.testing.assert_close(teacher_log_probs, ref_teacher_log_probs(hidden, weight, 0.8), rtol=0, atol=1e-12)
    for row in range(TP_ROWS):
        teacher_ids = ref_top_ids(teacher_log_probs[row].tolist(), TP_K)
        student_ids = ref_top_ids(logits[row].tolist(), TP_K)
        for name, ids in [("teacher", teacher_ids), ("student", student_ids), ("union", teacher_ids + student_ids)]:
            assert expected[("support", name, TP_K)][0][row].tolist() == ids
    outputs = gather_from_ranks(_sharded_results, world)
    tied_logits, tied_hidden, tied_weight, _ = make_tied_case(v=TP_VOCAB)
    tied_teacher_log_probs = ref_teacher_log_probs(tied_hidden, tied_weight, 1.0)
    for name in SUPPORTS:
        first = outputs[0][("ties", name)]
        _check_tied_support(tied_logits, tied_teacher_log_probs, TopKSupport(*first), name, TP_K)
        torch.testing.assert_close(first[1], tied_teacher_log_probs.gather(-1, first[0]), rtol=0, atol=1e-12)
        for rank, results in outputs.items():
            for got, want in zip(results[("ties", name)], first):
                assert (got is None and want is None) or torch.equal(got, want), f"rank {rank} ties {name}"
    for rank, results in outputs.items():
        assert results.keys() == expected.keys()
        for key, value in expected.items():
            if key[0] == "ties":
                continue
            want = _shard_of(key, value, rank, world)
            got = results[key]
            for g, e in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                if e is None or e.dtype in (torch.int64, torch.bool):  # ids and presence: exactly TP=1's
                    assert (g is None and e is None) or torch.equal(g, e), f"rank {rank} {key}"
                else:
                    torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"rank {rank} {key}: {m}")
