"""The loss entry point: filters, weights and slime's reduction against a brute-force float64 reference, and
through slime's real loss_function / get_responses / get_sum_of_sample_mean on CPU when slime is importable."""

import dataclasses
import math
from argparse import Namespace

import pytest
import torch

from slime_self_distill.config import ConfigError, SelfDistillConfig
from slime_self_distill.core.teacher_logits import TeacherHiddenStates
from slime_self_distill.core.token_filters import mask_leading_tokens
from slime_self_distill.custom_loss import SampleRows, per_token_distillation, reduce_per_token_loss
from tests import divergence_reference as ref
from tests.slime_support import SKIP_REASON, SLIME_AVAILABLE

VOCAB = 16
HIDDEN = 5


def teacher_log_probs(sample: SampleRows) -> torch.Tensor:
    """The teacher's full log-softmax, float64, from its hidden states and output weights."""
    teacher = getattr(sample, "reference_teacher", sample.teacher_distribution)
    return torch.log_softmax(teacher.hidden.double() @ teacher.weight.double().t() / teacher.temperature, -1)


def make_sample(seed, length, *, weight=1.0, topk=4):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(length, VOCAB, generator=g, dtype=torch.float64)).requires_grad_(True)
    hidden_teacher = TeacherHiddenStates(torch.randn(length, HIDDEN, generator=g, dtype=torch.float64),
                                         torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64), 0.8)
    teacher = torch.log_softmax(hidden_teacher.hidden @ hidden_teacher.weight.t() / 0.8, -1)
    tokens = torch.randint(0, VOCAB, (length,), generator=g)
    values, ids = teacher.topk(topk, -1)
    return SampleRows(
        logits=logits,
        tokens=tokens,
        valid=torch.rand(length, generator=g) > 0.25,
        weight=weight,
        teacher_token_log_probs=teacher.gather(-1, tokens[:, None]).squeeze(-1),
        teacher_topk_log_probs=values,
        teacher_topk_indices=ids,
        teacher_distribution=hidden_teacher,
        rollout_log_probs=torch.log_softmax(logits.detach(), -1).gather(-1, tokens[:, None]).squeeze(-1)
        + 0.4 * torch.randn(length, generator=g, dtype=torch.float64),
    )


def per_sample_mean(lengths, masks):
    """slime's per-sample-mean reducer, written out (sum over samples of each sample's masked mean)."""

    def reduce(x):
        total, start = 0.0, 0
        for n, m in zip(lengths, masks):
            total = total + (x[start:start + n] * m).sum() / max(int(m.sum()), 1)
            start += n
        return total

    return reduce


def brute_force_loss(samples, config):
    """float64 loop over samples and tokens, from the definitions: filters, importance weights, sample weights."""
    entropies = [ref.entropy(s.logits) for s in samples]
    candidates = [e for s, ent in zip(samples, entropies) if s.weight > 0
                  for e, v in zip(ent.tolist(), s.valid.tolist()) if v]
    threshold = -math.inf
    if config.top_entropy_quantile < 1 and candidates:
        threshold = sorted(candidates, reverse=True)[math.ceil(config.top_entropy_quantile * len(candidates)) - 1]
    total = 0.0
    for s, ent in zip(samples, entropies):
        if config.kl_scope == "full_vocab":
            d = ref.full_vocab(s.logits, teacher_log_probs(s), config.divergence, config.alpha)
        else:
            supports = ref.support_rows(s.logits.detach(), teacher_log_probs(s), config.topk_support, config.topk)
            d = ref.on_support(s.logits, teacher_log_probs(s), supports, config.divergence, config.alpha,
                               config.topk_tail)
        student_token = torch.log(ref.softmax64(s.logits.detach())).gather(-1, s.tokens[:, None]).squeeze(-1)
        ratios = [math.exp(a - b) for a, b in zip(student_token.tolist(), s.rollout_log_probs.tolist())]
        clipped = [min(r, config.importance_cap) for r, v in zip(ratios, s.valid.tolist()) if v]
        sequence_weight = sum(clipped) / max(len(clipped), 1)
        numerator = 0.0
        for t in range(len(s.tokens)):
            if not s.valid[t] or ent[t] < threshold:
                continue
            w = {"off": 1.0, "token": min(ratios[t], config.importance_cap), "sequence": sequence_weight}[
                config.importance_correction]
            numerator = numerator + w * d[t]
        total = total + s.weight * numerator / max(int(s.valid.sum()), 1)
    return total


CONFIGS = [
    SelfDistillConfig(kl_scope="full_vocab", divergence="forward_kl", importance_correction="sequence",
                      importance_cap=1.2),
    SelfDistillConfig(kl_scope="full_vocab", divergence="alpha_js", alpha=0.3, top_entropy_quantile=0.5),
    SelfDistillConfig(kl_scope="topk", topk=4, divergence="reverse_kl", importance_correction="token",
                      importance_cap=1.3),
    SelfDistillConfig(kl_scope="topk", topk=4, divergence="alpha_js", alpha=0.5, top_entropy_quantile=0.3),
    SelfDistillConfig(kl_scope="topk", topk_support="student", topk=5, divergence="alpha_js", alpha=0.5,
                      importance_correction="token"),
    SelfDistillConfig(kl_scope="topk", topk_support="union", topk=3, divergence="mixed_kl", alpha=0.3,
                      topk_tail="renormalize"),
]


def stored_topk_only(sample: SampleRows) -> SampleRows:
    """The sample as the teacher pass keeps it for the teacher's own top-K: the K values and ids, no distribution."""
    stored = dataclasses.replace(sample, teacher_distribution=None)
    stored.reference_teacher = sample.teacher_distribution  # for the brute force only
    return stored


# the teacher's own top-K may come from the store instead of being recomputed from hidden states: the same loss
CASES = [(config, False) for config in CONFIGS] + [
    (config, True) for config in CONFIGS if config.kl_scope == "topk" and config.topk_support == "teacher"]


@pytest.mark.parametrize("config, stored_topk", CASES,
                         ids=lambda c: f"{c.kl_scope}-{c.topk_support}-{c.divergence}" if hasattr(c, "kl_scope")
                         else ("stored" if c else "recomputed"))
def test_micro_batch_loss_matches_brute_force(config, stored_topk):
    samples = [make_sample(1, 9, weight=1.5), make_sample(2, 5, weight=0.0), make_sample(3, 12, weight=1.5),
               make_sample(4, 1, weight=1.5)]
    if stored_topk:
        samples = [stored_topk_only(s) for s in samples]
    lengths = [len(s.tokens) for s in samples]
    reducer = per_sample_mean(lengths, [s.valid.double() for s in samples])
    any_logits = samples[0].logits
    loss, metrics = reduce_per_token_loss(per_token_distillation(samples, config), reducer, any_logits)
    expected = brute_force_loss(samples, config)
    torch.testing.assert_close(loss, expected.detach() if torch.is_tensor(expected) else torch.tensor(expected))
    for s in samples:
        got = torch.autograd.grad(loss, s.logits, retain_graph=True, allow_unused=True)[0]
        want = torch.autograd.grad(expected, s.logits, retain_graph=True, allow_unused=True)[0]
        want = torch.zeros_like(s.logits) if want is None else want  # every token of the sample filtered out
        if s.weight == 0:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
    assert set(metrics) >= {"loss", "self_distill_student_entropy", "self_distill_kept_fraction",
                            "self_distill_importance_weight", "self_distill_teacher_minus_student_log_prob",
                            f"self_distill_{config.kl_scope}_{config.divergence}"}
    assert ("self_distill_teacher_captured_mass" in metrics) == (config.kl_scope == "topk")
    assert all(not v.requires_grad and torch.isfinite(v) for v in metrics.values())


def test_sample_without_teacher_changes_nothing():
    config = CONFIGS[0]
    with_teacher = [make_sample(1, 9, weight=2.0), make_sample(3, 7, weight=2.0)]
    lengths = [9, 7]
    reducer = per_sample_mean(lengths, [s.valid.double() for s in with_teacher])
    base, _ = reduce_per_token_loss(per_token_distillation(with_teacher, config), reducer, with_teacher[0].logits)
    excluded = make_sample(9, 6, weight=0.0)
    teacher = excluded.teacher_distribution
    excluded.teacher_distribution = TeacherHiddenStates(torch.full_like(teacher.hidden, math.nan), teacher.weight)
    samples = [with_teacher[0], excluded, with_teacher[1]]
    reducer = per_sample_mean([9, 6, 7], [s.valid.double() for s in samples])
    loss, _ = reduce_per_token_loss(per_token_distillation(samples, config), reducer, samples[0].logits)
    torch.testing.assert_close(loss, base)


def test_empty_micro_batch_gives_a_zero_loss_connected_to_logits():
    logits = torch.randn(1, 0, VOCAB, requires_grad=True)
    loss, metrics = reduce_per_token_loss(per_token_distillation([], SelfDistillConfig()), lambda x: x.sum(), logits)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None and metrics["loss"].item() == 0.0
    sample = make_sample(5, 0)
    loss, _ = reduce_per_token_loss(per_token_distillation([sample], SelfDistillConfig()), lambda x: x.sum(),
                                    sample.logits)
    assert loss.item() == 0.0


def test_importance_correction_without_rollout_log_probs_is_an_error():
    sample = make_sample(1, 4)
    sample.rollout_log_probs = None
    with pytest.raises(ConfigError, match="--self-distill-importance-correction"):
        per_token_distillation([sample], SelfDistillConfig(importance_correction="token"))


# ---------------------------------------------------------------------- through slime's real loss_function
TEMPERATURE = 0.8


def _slime_case(per_token: bool, config: SelfDistillConfig, hidden_size_arg: int = HIDDEN):
    """Three samples packed in one micro-batch, the middle one without a teacher. ``hidden_size_arg``: slime's
    --hidden-size, which decides whether the teacher's own top-K is stored (large) or recomputed (small)."""
    g = torch.Generator().manual_seed(21)
    prompts, responses = [3, 5, 2], [6, 4, 7]
    weights = [1.5, 0.0, 1.5]
    output_weight = 2 * torch.randn(VOCAB, HIDDEN, generator=g)
    rows, unconcat, masks, hidden, teacher_full, teacher_token, topk_values, topk_ids = ([] for _ in range(8))
    for p, r in zip(prompts, responses):
        tokens = torch.randint(0, VOCAB, (p + r,), generator=g)
        unconcat.append(tokens)
        rows.append(torch.randn(p + r, VOCAB, generator=g))
        masks.append((torch.rand(r, generator=g) > 0.2).int())
        hidden.append(torch.randn(r, HIDDEN, generator=g))
        t = torch.log_softmax(hidden[-1].double() @ output_weight.double().t() / TEMPERATURE, -1)
        teacher_full.append(t)
        teacher_token.append(t.gather(-1, tokens[-r:, None]).squeeze(-1).float())
        v, i = t.topk(min(config.topk, VOCAB), -1)
        topk_values.append(v.float())
        topk_ids.append(i.int())
    logits = torch.cat(rows).unsqueeze(0).requires_grad_(True)
    args = Namespace(
        loss_type="custom_loss", custom_loss_function_path="slime_self_distill.custom_loss.self_distill_loss",
        calculate_per_token_loss=per_token, recompute_loss_function=False, allgather_cp=False,
        rollout_temperature=TEMPERATURE, hidden_size=hidden_size_arg, **config.to_args_dict(),
    )
    batch = {
        "unconcat_tokens": unconcat, "total_lengths": [p + r for p, r in zip(prompts, responses)],
        "response_lengths": responses, "loss_masks": masks, "rollout_mask_sums": None,
        "teacher_log_probs": teacher_token, "teacher_hidden_states": hidden,
        "self_distill_teacher_output_weight": output_weight,
        "teacher_topk_log_probs": topk_values, "teacher_topk_indices": topk_ids,
        "self_distill_loss_weights": weights,
    }
    return args, batch, logits, prompts, responses, weights, teacher_full


def test_the_loss_reads_the_settings_of_the_args_it_is_given():
    from slime_self_distill.config import config_of as _config

    # A freed args object's id() is often reused by the next one: the settings must follow the object.
    for scope in ("topk", "full_vocab", "sampled_token", "topk") * 5:
        args = Namespace(**SelfDistillConfig(kl_scope=scope).to_args_dict())
        assert _config(args).kl_scope == scope
        del args
    args = Namespace(**SelfDistillConfig(kl_scope="topk").to_args_dict())
    assert _config(args) is _config(args)  # parsed once per args object


SLIME_CASES = {
    "full_vocab": (dict(kl_scope="full_vocab"), HIDDEN),
    "topk-teacher-stored": (dict(kl_scope="topk", topk=5), 4096),
    "topk-teacher-recomputed": (dict(kl_scope="topk", topk=5), HIDDEN),
    "topk-student": (dict(kl_scope="topk", topk=5, topk_support="student"), HIDDEN),
    "topk-union": (dict(kl_scope="topk", topk=3, topk_support="union", topk_tail="renormalize"), HIDDEN),
}


@pytest.mark.slime
@pytest.mark.skipif(not SLIME_AVAILABLE, reason=SKIP_REASON)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("case", list(SLIME_CASES))
def test_through_slime_loss_function(slime_megatron, per_token, case):
    settings, hidden_size_arg = SLIME_CASES[case]
    config = SelfDistillConfig(divergence="alpha_js", alpha=0.3, num_loss_tokens_to_skip=1, **settings)
    args, batch, logits, prompts, responses, weights, teacher_full = _slime_case(per_token, config, hidden_size_arg)
    if case == "topk-teacher-stored":  # the loss must read the stored top-K: the hidden states would give no signal
        batch["teacher_hidden_states"] = [torch.full_like(h, math.nan) for h in batch["teacher_hidden_states"]]
    # the converter takes the first skipped token out of every loss mask (numerator and denominators)
    batch["loss_masks"] = [torch.tensor(mask_leading_tokens(m.tolist(), 1), dtype=torch.int)
                           for m in batch["loss_masks"]]
    num_microbatches, step_global_batch_size = 2, 6
    loss, normalizer, log = slime_megatron.loss.loss_function(args, batch, num_microbatches, step_global_batch_size,
                                                              logits)
    (grad,) = torch.autograd.grad(loss, logits)

    exact = logits.detach().double().requires_grad_(True)
    expected, start, token_count = 0.0, 0, 0
    for i, (p, r) in enumerate(zip(prompts, responses)):
        student_rows = exact[0, start + p - 1:start + p + r - 1] / args.rollout_temperature
        if config.kl_scope == "full_vocab":
            d = ref.full_vocab(student_rows, teacher_full[i], "alpha_js", 0.3)
        else:
            supports = ref.support_rows(student_rows.detach(), teacher_full[i], config.topk_support, config.topk)
            d = ref.on_support(student_rows, teacher_full[i], supports, "alpha_js", 0.3, config.topk_tail)
        mask = batch["loss_masks"][i].double()
        assert mask[0] == 0
        numerator = (d * mask).sum()
        if per_token:  # the weight is the converter's per-token factor (custom_convert.with_per_token_loss_weights)
            expected = expected + weights[i] * numerator
        else:
            expected = expected + weights[i] * numerator / max(int(batch["loss_masks"][i].sum()), 1)
        token_count += max(int(batch["loss_masks"][i].sum()), 1)
        start += p + r
    if not per_token:
        expected = expected * num_microbatches / step_global_batch_size  # slime's scale (dp size 1)
    (expected_grad,) = torch.autograd.grad(expected, exact)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)
    if per_token:
        assert int(normalizer) == token_count
    assert "self_distill_student_entropy" in log["keys"]


@pytest.mark.slime
@pytest.mark.skipif(not SLIME_AVAILABLE, reason=SKIP_REASON)
def test_missing_or_misshaped_teacher_input_names_key_and_sample(slime_megatron):
    config = SelfDistillConfig(kl_scope="full_vocab")
    args, batch, logits, *_ = _slime_case(False, config)
    batch_without = {k: v for k, v in batch.items() if k != "teacher_hidden_states"}
    with pytest.raises(KeyError, match="teacher_hidden_states"):
        slime_megatron.loss.loss_function(args, batch_without, 1, 3, logits)
    batch_without = {k: v for k, v in batch.items() if k != "self_distill_teacher_output_weight"}
    with pytest.raises(KeyError, match="the teacher's output-layer shard"):
        slime_megatron.loss.loss_function(args, batch_without, 1, 3, logits)
    wrong_vocab = dict(batch, self_distill_teacher_output_weight=batch["self_distill_teacher_output_weight"][:-1])
    with pytest.raises(ValueError, match=r"output-layer shard has shape \(15, 5\), expected \[16, H\]"):
        slime_megatron.loss.loss_function(args, wrong_vocab, 1, 3, logits)
    batch["teacher_hidden_states"] = [t[:-1] for t in batch["teacher_hidden_states"]]
    with pytest.raises(ValueError, match=r"'teacher_hidden_states' of sample 0 has shape \(5, 5\), expected \(6, H\)"):
        slime_megatron.loss.loss_function(args, batch, 1, 3, logits)


@pytest.mark.parametrize("seed", range(5))
def test_rows_by_sample_cuts_each_samples_rows_and_backs_one_gradient(seed):
    """Samples of one or two runs of rows (slime's zigzag CP gives two), in any order, with gaps (prompt rows) and an
    empty one: each sample's rows, and the gradient of every row, as indexing would give them."""
    from slime_self_distill.custom_loss import rows_by_sample

    g = torch.Generator().manual_seed(seed)
    total = 40
    cut = sorted(torch.randperm(total - 1, generator=g)[:9].add(1).tolist())
    runs = [list(range(a, b)) for a, b in zip([0, *cut], [*cut, total])]  # 10 disjoint runs covering the rows
    layout = [(torch.tensor(runs[1] + runs[6]), None), (torch.tensor(runs[3]), None),
              (torch.zeros(0, dtype=torch.long), None),
              (torch.tensor(runs[8] + runs[4]), None)]  # a later run first; runs 0, 2, 5, 7, 9: rows of no sample
    rows = torch.randn(total, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(len(indices), 3, generator=g, dtype=torch.float64) for indices, _ in layout]
    pieces = rows_by_sample(rows, layout)
    for piece, (indices, _) in zip(pieces, layout):
        assert torch.equal(piece, rows.detach()[indices])
    sum((piece * w).sum() for piece, w in zip(pieces, weights)).backward()
    expected = torch.zeros(total, 3, dtype=torch.float64)
    for (indices, _), w in zip(layout, weights):
        expected[indices] += w
    assert torch.equal(rows.grad, expected)
