"""Token filters and importance weights against brute-force loops (single process; collectives in
test_tensor_parallel.py)."""

import math

import pytest
import torch

from slime_self_distill.core.token_filters import (
    entropy_quantile_threshold,
    keep_top_entropy,
    mask_leading_tokens,
    truncated_importance_weights,
)


def test_the_first_n_completion_tokens_leave_the_loss_mask():
    assert mask_leading_tokens([1, 1, 0, 1, 1], 3) == [0, 0, 0, 1, 1]
    assert mask_leading_tokens([1, 0, 1], 0) == [1, 0, 1]
    assert mask_leading_tokens([1, 1], 5) == [0, 0]


@pytest.mark.parametrize("quantile", [0.1, 0.25, 0.5, 0.999])
def test_entropy_filter_keeps_the_top_fraction_of_candidates(quantile):
    g = torch.Generator().manual_seed(1)
    entropy = torch.rand(57, generator=g, dtype=torch.float64)
    candidates = torch.rand(57, generator=g) > 0.2
    keep = keep_top_entropy(entropy, entropy_quantile_threshold(entropy, candidates, quantile))
    pool = sorted(entropy[candidates].tolist(), reverse=True)
    expected_kept = set(pool[: math.ceil(quantile * len(pool))])
    kept = {e for e, k, c in zip(entropy.tolist(), keep.tolist(), candidates.tolist()) if k and c}
    assert kept == expected_kept


def test_entropy_filter_off_and_without_candidates_keeps_everything():
    entropy = torch.rand(5)
    assert entropy_quantile_threshold(entropy, torch.ones(5, dtype=torch.bool), 1.0) is None
    assert entropy_quantile_threshold(entropy, torch.zeros(5, dtype=torch.bool), 0.5) is None
    assert keep_top_entropy(entropy, None).all()


def test_token_importance_weights_are_truncated_ratios():
    train = torch.tensor([-1.0, -2.0, -0.5, -10.0])
    rollout = torch.tensor([-1.5, -1.0, -3.0, -1.0])
    weights = truncated_importance_weights(train, rollout, mode="token", cap=2.0, valid=torch.ones(4, dtype=torch.bool),
                                           sample_lengths=[4])
    expected = [min(math.exp(t - r), 2.0) for t, r in zip(train.tolist(), rollout.tolist())]
    assert weights.tolist() == pytest.approx(expected)


def test_sequence_importance_weights_average_valid_tokens_per_sample():
    g = torch.Generator().manual_seed(4)
    train = torch.randn(9, generator=g, dtype=torch.float64)
    rollout = train + 0.5 * torch.randn(9, generator=g, dtype=torch.float64)
    valid = torch.tensor([1, 0, 1, 1, 1, 1, 0, 0, 1], dtype=torch.bool)
    lengths = [3, 4, 2]
    weights = truncated_importance_weights(train, rollout, mode="sequence", cap=1.2, valid=valid, sample_lengths=lengths)
    start = 0
    for n in lengths:
        # each valid token's ratio clipped at the cap, then averaged (the official SDFT code's order)
        ratios = [min(math.exp(t - r), 1.2) for t, r, v in zip(
            train[start:start + n].tolist(), rollout[start:start + n].tolist(), valid[start:start + n].tolist()) if v]
        expected = sum(ratios) / max(len(ratios), 1)
        assert weights[start:start + n].tolist() == pytest.approx([expected] * n)
        start += n


def test_importance_weights_are_detached_and_mode_is_checked():
    train = torch.zeros(3, requires_grad=True)
    weights = truncated_importance_weights(train, torch.zeros(3), mode="token", cap=2.0,
                                           valid=torch.ones(3, dtype=torch.bool), sample_lengths=[3])
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        truncated_importance_weights(train, torch.zeros(3), mode="seq", cap=2.0, valid=torch.ones(3, dtype=torch.bool),
                                     sample_lengths=[3])
