import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime_self_distill.config import ConfigError, SelfDistillConfig
from slime_self_distill.teacher_view import (
    TEACHER_FULL_LOG_PROBS_KEY,
    TEACHER_TOKEN_LOG_PROBS_KEY,
    TEACHER_TOPK_INDICES_KEY,
    TEACHER_TOPK_LOG_PROBS_KEY,
)
from slime_self_distill.trainer.teacher_outputs import (
    TeacherOutputSpec,
    compute_teacher_outputs,
    cp_response_rows,
    relayout_cp_rows,
)
from tests.slime_cpu_harness import free_port, init_gloo
from tests.slime_support import needs_slime


def spec(kl_scope, *, topk=4, temperature=0.7, chunk_size=3, storage="float32"):
    config = SelfDistillConfig(kl_scope=kl_scope, topk=topk, chunk_size=chunk_size, full_vocab_storage_dtype=storage)
    return TeacherOutputSpec.from_config(config, temperature)


def brute_force(logits, tokens, temperature):
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
    return log_probs, log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("kl_scope", ["sampled_token", "topk", "full_vocab"])
def test_outputs_match_float64_brute_force(kl_scope):
    generator = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(11, 29, generator=generator)
    tokens = torch.randint(0, 29, (11,), generator=generator)
    outputs = compute_teacher_outputs(logits, tokens, spec(kl_scope))
    reference, token_reference = brute_force(logits, tokens, 0.7)

    assert set(outputs) == set(spec(kl_scope).output_keys)
    assert outputs[TEACHER_TOKEN_LOG_PROBS_KEY].dtype == torch.float32
    torch.testing.assert_close(outputs[TEACHER_TOKEN_LOG_PROBS_KEY].double(), token_reference, rtol=0, atol=1e-5)
    if kl_scope == "topk":
        top_values, top_indices = reference.sort(dim=-1, descending=True)
        assert torch.equal(outputs[TEACHER_TOPK_INDICES_KEY], top_indices[:, :4])
        torch.testing.assert_close(outputs[TEACHER_TOPK_LOG_PROBS_KEY].double(), top_values[:, :4], rtol=0, atol=1e-5)
    if kl_scope == "full_vocab":
        torch.testing.assert_close(outputs[TEACHER_FULL_LOG_PROBS_KEY].double(), reference, rtol=0, atol=1e-5)


def test_bf16_logits_are_upcast_before_the_softmax():
    generator = torch.Generator().manual_seed(2)
    logits = (4 * torch.randn(5, 50, generator=generator)).bfloat16()
    tokens = torch.randint(0, 50, (5,), generator=generator)
    outputs = compute_teacher_outputs(logits, tokens, spec("full_vocab", temperature=1.3))
    reference, _ = brute_force(logits.double(), tokens, 1.3)
    torch.testing.assert_close(outputs[TEACHER_FULL_LOG_PROBS_KEY].double(), reference, rtol=0, atol=1e-5)


def test_neg_inf_logits_stay_neg_inf_and_do_not_poison_other_rows():
    logits = torch.tensor([[0.0, -math.inf, 1.0], [2.0, 0.5, -math.inf]])
    tokens = torch.tensor([2, 0])
    outputs = compute_teacher_outputs(logits, tokens, spec("full_vocab", temperature=1.0, chunk_size=8))
    full = outputs[TEACHER_FULL_LOG_PROBS_KEY]
    assert full[0, 1] == -math.inf and full[1, 2] == -math.inf
    assert torch.isfinite(outputs[TEACHER_TOKEN_LOG_PROBS_KEY]).all()


def test_full_vocab_storage_dtype_error_is_one_rounding():
    generator = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(16, 1000, generator=generator)
    tokens = torch.randint(0, 1000, (16,), generator=generator)
    reference, _ = brute_force(logits, tokens, 1.0)
    for storage, mantissa_bits in (("float16", 10), ("bfloat16", 7)):
        stored = compute_teacher_outputs(logits, tokens, spec("full_vocab", temperature=1.0, storage=storage))
        values = stored[TEACHER_FULL_LOG_PROBS_KEY]
        assert values.dtype == getattr(torch, storage)
        # round-to-nearest: relative error at most 2^-(mantissa bits + 1), plus the fp32 computation's error
        bound = reference.abs() * 2.0 ** -(mantissa_bits + 1) + 1e-5
        assert ((values.double() - reference).abs() <= bound).all()
        # forward KL(T || S) with S = T computed from the stored values: the storage error's effect on the loss
        kl = (reference.exp() * (reference - values.double())).sum(-1).abs().max()
        assert kl < {"float16": 2e-3, "bfloat16": 2e-2}[storage]


def test_full_vocab_storage_dtype_error_on_the_forward_kl_gradient():
    """The number the README reports: relative L1 error of the forward-KL gradient p_S - p_T (w.r.t. the student's
    logits) when p_T comes from the stored teacher log-probabilities, against float64."""
    generator = torch.Generator().manual_seed(4)
    vocab = 32000
    teacher_logits = 3 * torch.randn(16, vocab, generator=generator)
    student = torch.log_softmax((teacher_logits + 0.5 * torch.randn(16, vocab, generator=generator)).double(), -1)
    tokens = torch.randint(0, vocab, (16,), generator=generator)
    reference, _ = brute_force(teacher_logits, tokens, 1.0)
    exact_gradient = student.exp() - reference.exp()
    errors = {}
    for storage in ("float32", "float16", "bfloat16"):
        stored = compute_teacher_outputs(teacher_logits, tokens, spec("full_vocab", temperature=1.0, storage=storage))
        gradient = student.exp() - stored[TEACHER_FULL_LOG_PROBS_KEY].double().exp()
        errors[storage] = float(((gradient - exact_gradient).abs().sum(-1) / exact_gradient.abs().sum(-1)).max())
    assert errors["float32"] < 1e-4
    assert 5e-4 < errors["float16"] < 6e-3  # 0.3-0.4% measured
    assert 5 * errors["float16"] < errors["bfloat16"] < 5e-2  # 3 mantissa bits fewer: ~8x (2.8% measured)


def test_token_outside_the_vocabulary_is_named():
    with pytest.raises(ValueError, match=r"response token 31 at row 1 is outside the vocabulary of size 29"):
        compute_teacher_outputs(torch.randn(3, 29), torch.tensor([0, 31, 2]), spec("sampled_token"))


def test_topk_larger_than_the_vocabulary_is_refused():
    with pytest.raises(ConfigError, match="--self-distill-topk 40 is larger than the vocabulary"):
        compute_teacher_outputs(torch.randn(2, 29), torch.tensor([0, 1]), spec("topk", topk=40))


def test_non_positive_temperature_is_refused():
    with pytest.raises(ConfigError, match="--rollout-temperature"):
        TeacherOutputSpec.from_config(SelfDistillConfig(), 0.0)


# ---------------------------------------------------------------------- context-parallel layout
def test_cp_rows_partition_the_response_across_ranks():
    for total_length in range(2, 40):
        for response_length in range(1, total_length):
            for cp_size in (1, 2, 3, 4):
                rows = [r for rank in range(cp_size)
                        for start, end in cp_response_rows(total_length, response_length, rank, cp_size)
                        for r in range(start, end)]
                assert sorted(rows) == list(range(response_length))


@needs_slime
def test_cp_rows_match_slimes_slice_log_prob_with_cp(monkeypatch):
    from slime.backends.megatron_utils import cp_utils

    for cp_size in (2, 3, 4):
        for cp_rank in range(cp_size):
            monkeypatch.setattr(
                cp_utils, "mpu",
                SimpleNamespace(get_context_parallel_rank=lambda r=cp_rank: r,
                                get_context_parallel_world_size=lambda s=cp_size: s),
            )
            for total_length in range(2, 30):
                for response_length in range(1, total_length):
                    values = torch.arange(response_length)
                    expected = cp_utils.slice_log_prob_with_cp(values, total_length, response_length)
                    ranges = cp_response_rows(total_length, response_length, cp_rank, cp_size)
                    mine = torch.cat([values[s:e] for s, e in ranges]) if ranges else values[:0]
                    assert torch.equal(mine, expected), (total_length, response_length, cp_rank, cp_size)


def test_relayout_is_identity_without_context_parallelism():
    values = torch.randn(7, 3)
    assert relayout_cp_rows(values, response_length=7, source_total_length=30, target_total_length=12) is values
    with pytest.raises(ValueError, match="expected 7 local response rows"):
        relayout_cp_rows(values[:5], response_length=7, source_total_length=30, target_total_length=12)


def _relayout_worker(rank, world_size, port):
    init_gloo(rank, world_size, port)
    group = dist.group.WORLD
    generator = torch.Generator().manual_seed(0)
    cases = [(9, 25, 13), (9, 13, 25), (1, 40, 3), (6, 8, 7), (17, 60, 18)]  # (response, source total, target total)
    for response_length, source_total, target_total in cases:
        for full in (
            torch.randn(response_length, 5, generator=generator),
            torch.randn(response_length, 5, generator=generator).bfloat16(),
            torch.randn(response_length, 4, generator=generator).half(),
            torch.randint(-(2**62), 2**62, (response_length, 3), generator=generator),
            torch.randn(response_length, generator=generator),
        ):
            def rows(total):
                ranges = cp_response_rows(total, response_length, rank, world_size)
                return torch.cat([full[s:e] for s, e in ranges]) if ranges else full[:0]

            for block_rows in (1, 4, 1024):
                moved = relayout_cp_rows(
                    rows(source_total), response_length=response_length, source_total_length=source_total,
                    target_total_length=target_total, cp_group=group, block_rows=block_rows, device="cpu",
                )
                assert moved.dtype == full.dtype
                assert torch.equal(moved, rows(target_total)), (response_length, source_total, target_total)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_relayout_between_cp_layouts_with_two_gloo_ranks():
    mp.spawn(_relayout_worker, args=(2, free_port()), nprocs=2)
