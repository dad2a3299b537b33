import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime_self_distill.config import ConfigError, SelfDistillConfig
from slime_self_distill.teacher_view import (
    TEACHER_HIDDEN_STATES_KEY,
    TEACHER_TOKEN_LOG_PROBS_KEY,
    TEACHER_TOPK_INDICES_KEY,
    TEACHER_TOPK_LOG_PROBS_KEY,
)
from slime_self_distill.trainer.teacher_outputs import (
    TeacherOutputSpec,
    compute_teacher_outputs,
    cp_response_rows,
    gather_tp_rows,
    keep_tp_rows,
    model_dtype_bytes,
    relayout_cp_rows,
    teacher_bytes_per_token,
    teacher_signal,
    tp_row_block,
)
from tests.gloo_results import gather_from_ranks
from tests.slime_cpu_harness import free_port, init_gloo
from tests.slime_support import needs_slime

HIDDEN = 6


def spec(kl_scope, *, topk=4, temperature=0.7, chunk_size=3, support="teacher", hidden_size=4096):
    config = SelfDistillConfig(kl_scope=kl_scope, topk=topk, chunk_size=chunk_size, topk_support=support)
    return TeacherOutputSpec.from_config(config, temperature, hidden_size, 2)


def brute_force(logits, tokens, temperature):
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
    return log_probs, log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("kl_scope", ["sampled_token", "topk", "full_vocab"])
def test_outputs_match_float64_brute_force(kl_scope):
    generator = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(11, 29, generator=generator)
    tokens = torch.randint(0, 29, (11,), generator=generator)
    hidden = torch.randn(11, HIDDEN, generator=generator).bfloat16()
    outputs = compute_teacher_outputs(logits, tokens, spec(kl_scope), hidden_states=hidden)
    reference, token_reference = brute_force(logits, tokens, 0.7)

    assert set(outputs) == set(spec(kl_scope).output_keys)
    assert outputs[TEACHER_TOKEN_LOG_PROBS_KEY].dtype == torch.float32
    torch.testing.assert_close(outputs[TEACHER_TOKEN_LOG_PROBS_KEY].double(), token_reference, rtol=0, atol=1e-5)
    if kl_scope == "topk":
        top_values, top_indices = reference.sort(dim=-1, descending=True)
        assert outputs[TEACHER_TOPK_INDICES_KEY].dtype == torch.int32
        assert torch.equal(outputs[TEACHER_TOPK_INDICES_KEY].long(), top_indices[:, :4])
        torch.testing.assert_close(outputs[TEACHER_TOPK_LOG_PROBS_KEY].double(), top_values[:, :4], rtol=0, atol=1e-5)
    if kl_scope == "full_vocab":  # the hidden states, kept bit for bit, in their dtype, in a tensor of their own
        stored = outputs[TEACHER_HIDDEN_STATES_KEY]
        assert stored.dtype == torch.bfloat16 and torch.equal(stored, hidden)
        assert stored.data_ptr() != hidden.data_ptr()


def test_each_scope_keeps_the_smaller_exact_signal():
    def signal(**settings):
        hidden_size, element = settings.pop("hidden", (4096, 2))
        return teacher_signal(SelfDistillConfig(**settings), hidden_size, element)

    assert signal(kl_scope="sampled_token") == "token"
    assert signal(kl_scope="full_vocab") == "hidden"
    assert signal(kl_scope="topk", topk=64) == "topk"  # 512 B against 8192 B
    assert signal(kl_scope="topk", topk=1024) == "topk"  # 8192 B: equal, the top-K is kept
    assert signal(kl_scope="topk", topk=1025) == "hidden"
    assert signal(kl_scope="topk", topk=64, hidden=(32, 4)) == "hidden"  # 512 B against 128 B
    for support in ("student", "union"):
        assert signal(kl_scope="topk", topk=8, topk_support=support) == "hidden"
    # the bound: at most 2 H + 64 bytes per response token, every scope (H = 4096, bf16)
    for settings in (dict(kl_scope="full_vocab"), dict(kl_scope="topk", topk=64), dict(kl_scope="sampled_token"),
                     dict(kl_scope="topk", topk=100, topk_support="student"), dict(kl_scope="topk", topk=1025)):
        assert teacher_bytes_per_token(SelfDistillConfig(**settings), 4096, 2) <= 2 * 4096 + 64


def test_model_dtype_bytes_reads_megatrons_params_dtype_then_the_precision_flags():
    assert model_dtype_bytes(SimpleNamespace(params_dtype=torch.bfloat16)) == 2
    assert model_dtype_bytes(SimpleNamespace(params_dtype=torch.float32, bf16=True)) == 4
    assert model_dtype_bytes(SimpleNamespace(bf16=True)) == 2
    assert model_dtype_bytes(SimpleNamespace(fp16=True)) == 2
    assert model_dtype_bytes(SimpleNamespace()) == 4


def test_the_hidden_store_needs_the_hidden_rows():
    logits, tokens = torch.randn(3, 29), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"output layer's input \[N=3, H\] at the response rows, got None"):
        compute_teacher_outputs(logits, tokens, spec("full_vocab"))
    with pytest.raises(ValueError, match=r"got \(2, 6\)"):
        compute_teacher_outputs(logits, tokens, spec("full_vocab"), hidden_states=torch.randn(2, 6))


def test_bf16_logits_are_upcast_before_the_softmax():
    generator = torch.Generator().manual_seed(2)
    logits = (4 * torch.randn(5, 50, generator=generator)).bfloat16()
    tokens = torch.randint(0, 50, (5,), generator=generator)
    outputs = compute_teacher_outputs(logits, tokens, spec("topk", temperature=1.3, topk=50))
    reference, token_reference = brute_force(logits.double(), tokens, 1.3)
    torch.testing.assert_close(outputs[TEACHER_TOKEN_LOG_PROBS_KEY].double(), token_reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs[TEACHER_TOPK_LOG_PROBS_KEY].double(),
                               reference.sort(-1, descending=True).values, rtol=0, atol=1e-5)


def test_neg_inf_logits_stay_neg_inf_and_do_not_poison_other_rows():
    logits = torch.tensor([[0.0, -math.inf, 1.0], [2.0, 0.5, -math.inf]])
    tokens = torch.tensor([2, 0])
    outputs = compute_teacher_outputs(logits, tokens, spec("topk", temperature=1.0, chunk_size=8, topk=3))
    values = outputs[TEACHER_TOPK_LOG_PROBS_KEY]
    assert values[0, 2] == -math.inf and values[1, 2] == -math.inf
    assert torch.isfinite(outputs[TEACHER_TOKEN_LOG_PROBS_KEY]).all()


def test_token_outside_the_vocabulary_is_named():
    with pytest.raises(ValueError, match=r"response token 31 at row 1 is outside the vocabulary of size 29"):
        compute_teacher_outputs(torch.randn(3, 29), torch.tensor([0, 31, 2]), spec("sampled_token"))


def test_topk_larger_than_the_vocabulary_is_refused():
    with pytest.raises(ConfigError, match="--self-distill-topk 40 is larger than the vocabulary"):
        compute_teacher_outputs(torch.randn(2, 29), torch.tensor([0, 1]), spec("topk", topk=40))


def test_non_positive_temperature_is_refused():
    with pytest.raises(ConfigError, match="--rollout-temperature"):
        TeacherOutputSpec.from_config(SelfDistillConfig(), 0.0, 4096, 2)


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


# ---------------------------------------------------------------------- tensor-parallel split of the host store
def test_tp_blocks_partition_the_rows_in_order():
    for num_rows in range(0, 30):
        for tp_size in (1, 2, 3, 4, 8):
            blocks = [tp_row_block(num_rows, rank, tp_size) for rank in range(tp_size)]
            assert [r for start, end in blocks for r in range(start, end)] == list(range(num_rows))
            assert max(end - start for start, end in blocks) == -(-num_rows // tp_size)


def _tp_rows_results(rank, world, group):
    generator = torch.Generator().manual_seed(5)  # the same rows on every rank, as the teacher pass computes them
    results = {}
    for num_rows in (0, 1, 2, 5, 7, 12):
        for full in (torch.randn(num_rows, 3, generator=generator).bfloat16(),
                     torch.randint(0, 1000, (num_rows, 4), generator=generator, dtype=torch.int32)):
            kept = keep_tp_rows(full, group)
            assert kept.data_ptr() != full.data_ptr() or kept.numel() == 0  # its own storage, not a view
            results[(num_rows, full.dtype)] = (full, kept, gather_tp_rows(kept, num_rows, group))
    try:
        gather_tp_rows(torch.zeros(rank + 3, 2), 4, group)  # not this rank's block (every rank: none waits)
    except ValueError as error:
        results["error"] = str(error)
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_each_tp_rank_keeps_its_block_and_the_loss_gathers_every_row(world):
    for rank, results in gather_from_ranks(_tp_rows_results, world).items():
        for key, (full, kept, gathered) in ((k, v) for k, v in results.items() if k != "error"):
            start, end = tp_row_block(key[0], rank, world)
            assert torch.equal(kept, full[start:end])
            assert gathered.dtype == full.dtype and torch.equal(gathered, full)
        expected = tp_row_block(4, rank, world)
        assert f"holds {rank + 3} rows of a 4-row sample, expected its block of {expected[1] - expected[0]}" in \
            results["error"]
