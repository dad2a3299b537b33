"""Real multi-process gloo groups: vocabulary sharded over TP=2 and TP=4 must equal TP=1 (values and the gathered
gradient); the token filters' collectives give every data-/context-parallel rank the same answer."""

import math

import pytest
import torch
import torch.distributed as dist

from slime_self_distill.core.divergences import (
    full_vocab_divergence,
    sampled_token_divergence,
    topk_divergence,
    vocab_parallel_log_softmax,
    vocab_parallel_topk,
)
from slime_self_distill.core.token_filters import entropy_quantile_threshold, truncated_importance_weights
from tests.gloo_results import gather_from_ranks

pytestmark = pytest.mark.distributed

ROWS, VOCAB = 10, 24
CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("alpha_js", 0.3)]
SCOPES = ["full_vocab", "topk", "topk_renormalized", "sampled_token"]


def cases_for(scope):
    """SD-Zero's mixed KL exists on the top-K support only."""
    return CASES + [("mixed_kl", 0.5)] if scope.startswith("topk") else CASES
CLIP = 0.05  # OPSD's clamp of each forward-KL entry (full_vocab term_clip)


def _inputs():
    g = torch.Generator().manual_seed(7)
    logits = 2 * torch.randn(ROWS, VOCAB, generator=g, dtype=torch.float64)
    teacher = torch.log_softmax(2 * torch.randn(ROWS, VOCAB, generator=g, dtype=torch.float64), -1)
    sampled = torch.randint(0, VOCAB, (ROWS,), generator=g)
    weights = torch.rand(ROWS, generator=g, dtype=torch.float64)
    return logits, teacher, sampled, weights


def _run_scope(scope, kind, alpha, logits, teacher_shard, teacher_full, sampled, group):
    """One divergence on this rank's shard; teacher top-K / token values are global quantities."""
    if scope == "full_vocab":
        return full_vocab_divergence(logits, sampled, teacher_shard, divergence=kind, alpha=alpha, tp_group=group,
                                     chunk_size=4)
    if scope.startswith("topk"):
        values, ids = teacher_full.topk(5, -1)
        tail = "renormalize" if scope == "topk_renormalized" else "bucket"
        return topk_divergence(logits, sampled, values, ids, divergence=kind, alpha=alpha, tp_group=group, chunk_size=4,
                               tail=tail)
    token = teacher_full.gather(-1, sampled[:, None]).squeeze(-1)
    return sampled_token_divergence(logits, sampled, token, divergence=kind, alpha=alpha, ratio_cap=5.0,
                                    tp_group=group, chunk_size=4)


def _sharded_results(rank, world, group):
    logits, teacher, sampled, weights = _inputs()
    shard = VOCAB // world
    columns = slice(rank * shard, (rank + 1) * shard)
    results = {}
    for scope in SCOPES:
        for kind, alpha in cases_for(scope):
            local = logits[:, columns].clone().requires_grad_(True)
            out = _run_scope(scope, kind, alpha, local, teacher[:, columns], teacher, sampled, group)
            (out.loss_terms * weights).sum().backward()
            grads = [torch.empty_like(local.grad) for _ in range(world)]
            dist.all_gather(grads, local.grad, group=group)
            results[(scope, kind)] = (out.divergence, out.student_entropy, out.student_token_log_probs,
                                      torch.cat(grads, -1))
    local = logits[:, columns].clone().requires_grad_(True)
    clipped = full_vocab_divergence(local, sampled, teacher[:, columns], divergence="forward_kl", alpha=0.0,
                                    tp_group=group, chunk_size=4, term_clip=CLIP)
    (clipped.loss_terms * weights).sum().backward()
    grads = [torch.empty_like(local.grad) for _ in range(world)]
    dist.all_gather(grads, local.grad, group=group)
    results["clipped"] = (clipped.loss_terms.detach(), clipped.divergence, torch.cat(grads, -1))
    log_softmax = vocab_parallel_log_softmax(logits[:, columns], group)
    gathered = [torch.empty_like(log_softmax) for _ in range(world)]
    dist.all_gather(gathered, log_softmax, group=group)
    results["log_softmax"] = torch.cat(gathered, -1)
    results["topk"] = vocab_parallel_topk(logits[:, columns], 7, group)
    return results


def _single_rank_results():
    logits, teacher, sampled, weights = _inputs()
    results = {}
    for scope in SCOPES:
        for kind, alpha in cases_for(scope):
            local = logits.clone().requires_grad_(True)
            out = _run_scope(scope, kind, alpha, local, teacher, teacher, sampled, None)
            (out.loss_terms * weights).sum().backward()
            results[(scope, kind)] = (out.divergence, out.student_entropy, out.student_token_log_probs, local.grad)
    local = logits.clone().requires_grad_(True)
    clipped = full_vocab_divergence(local, sampled, teacher, divergence="forward_kl", alpha=0.0, chunk_size=4,
                                    term_clip=CLIP)
    (clipped.loss_terms * weights).sum().backward()
    results["clipped"] = (clipped.loss_terms.detach(), clipped.divergence, local.grad)
    results["log_softmax"] = torch.log_softmax(logits, -1)
    results["topk"] = vocab_parallel_topk(logits, 7)
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_vocabulary_sharded_equals_single_rank(world):
    expected = _single_rank_results()
    outputs = gather_from_ranks(_sharded_results, world)
    for rank, results in outputs.items():
        for key, value in expected.items():
            got = results[key]
            for g, e in zip(got if isinstance(got, tuple) else (got,), value if isinstance(value, tuple) else (value,)):
                torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"rank {rank} {key}: {m}")


# ---------------------------------------------------------------------- token-filter collectives
def _filter_results(rank, world, group):
    g = torch.Generator().manual_seed(100 + rank)
    count = 3 + 4 * rank  # ranks hold different numbers of tokens (rank 0 some, others more)
    entropy = torch.rand(count, generator=g, dtype=torch.float64)
    candidates = torch.rand(count, generator=g) > 0.3
    threshold = entropy_quantile_threshold(entropy, candidates, 0.25, group)
    # Sequence importance weights of two samples whose tokens are split over the ranks (as CP does).
    train = torch.randn(6, generator=g, dtype=torch.float64)
    rollout = train + 0.3 * torch.randn(6, generator=g, dtype=torch.float64)
    valid = torch.tensor([True, True, False, True, True, True])
    weights = truncated_importance_weights(train, rollout, mode="sequence", cap=1.5, valid=valid,
                                           sample_lengths=[2, 4], group=group)
    return entropy, candidates, threshold, train, rollout, valid, weights


def test_filter_collectives_agree_across_ranks():
    outputs = gather_from_ranks(_filter_results, 2)
    pooled = torch.cat([o[0][o[1]] for o in outputs.values()]).sort(descending=True).values
    for entropy, candidates, threshold, *_ in outputs.values():
        torch.testing.assert_close(threshold, pooled[math.ceil(0.25 * len(pooled)) - 1])
    # brute force: per sample, mean over every rank's valid tokens of min(exp(train - rollout), cap)
    for sample, rows in enumerate([slice(0, 2), slice(2, 6)]):
        ratios = [torch.exp(o[3][rows] - o[4][rows]).clamp(max=1.5)[o[5][rows]] for o in outputs.values()]
        expected = torch.cat(ratios).mean().item()
        for o in outputs.values():
            assert torch.allclose(o[6][rows], torch.full_like(o[6][rows], expected))
