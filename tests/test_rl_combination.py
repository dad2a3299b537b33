"""--self-distill-rl-combination hybrid / additive: slime's own policy loss plus the distillation loss.

One micro-batch goes through slime's real ``loss_function`` with the plugin's custom loss, which calls slime's real
``policy_loss_function``. The reference is float64 from first principles: GRPO's clipped surrogate
``max(-A r, -A clip(r, 1 - eps, 1 + eps_high))`` with ``r = exp(log p - log p_old)`` minus ``entropy_coef`` times the
entropy, each a per-sample token mean averaged over the step's samples (or a token mean over the step with
``--calculate-per-token-loss``), and the distillation loss averaged over the samples that have a teacher only.
"""

from argparse import Namespace

import pytest
import torch

from slime_self_distill.config import SelfDistillConfig
from slime_self_distill.custom_convert import restrict_loss_masks, with_per_token_loss_weights
from slime_self_distill.teacher_view import PAYLOAD_KEY, TeacherView
from tests.slime_support import requires_slime

pytestmark = requires_slime

VOCAB, HIDDEN = 12, 5
PROMPTS, RESPONSES = [3, 5, 2, 4], [6, 4, 7, 5]
WITHOUT_TEACHER = 1
EPS_CLIP, EPS_CLIP_HIGH, ENTROPY_COEF, TEMPERATURE = 0.2, 0.28, 0.01, 0.8


def step_inputs(seed: int):
    """Per sample: student logits rows, tokens, masks, old log-probs, advantages, and the teacher as (hidden states
    [R, H], its float64 log-softmax at the rollout temperature); last, the teacher's output weight [V, H]."""
    g = torch.Generator().manual_seed(seed)
    output_weight = (2 * torch.randn(VOCAB, HIDDEN, generator=g)).double()  # float32 values, held exactly
    rows, tokens, masks, old, advantages, teacher = [], [], [], [], [], []
    for p, r in zip(PROMPTS, RESPONSES):
        tokens.append(torch.randint(0, VOCAB, (p + r,), generator=g))
        rows.append(2 * torch.randn(p + r, VOCAB, generator=g, dtype=torch.float64))
        masks.append((torch.rand(r, generator=g) > 0.2).int().tolist())
        old.append(-torch.rand(r, generator=g, dtype=torch.float64) * 3)  # old log-probs: ratios far from 1 clip
        advantages.append(torch.full((r,), float(torch.randn(1, generator=g)), dtype=torch.float64))
        hidden = torch.randn(r, HIDDEN, generator=g, dtype=torch.float64).float()
        teacher.append((hidden, torch.log_softmax(hidden.double() @ output_weight.t() / TEMPERATURE, -1)))
    return rows, tokens, masks, old, advantages, teacher, output_weight.float()


def plugin_step(config: SelfDistillConfig, per_token: bool, inputs, num_microbatches=2, step_samples=8):
    """(slime's scaled loss, the loss Megatron optimizes, its gradient, the logged metrics) for one micro-batch."""
    from slime.backends.megatron_utils.loss import loss_function

    rows, tokens, masks, old, advantages, teacher, output_weight = inputs
    views = [TeacherView((), r, False, 0.0, reason="no_solution_nor_feedback") if i == WITHOUT_TEACHER
             else TeacherView(tuple(range(len(t) + 1)), r, True, 1.0)
             for i, (t, r) in enumerate(zip(tokens, RESPONSES))]
    data = restrict_loss_masks({PAYLOAD_KEY: views, "loss_masks": masks, "rollout_ids": list(range(len(masks)))}, 0,
                               keep_masks_without_teacher=config.rl_combination != "none")
    n_with_teacher = sum(v.has_teacher for v in views)
    views = [TeacherView(v.tokens, v.response_length, True, len(views) / n_with_teacher) if v.has_teacher else v
             for v in views]  # the converter's per-sample weights (custom_convert.teacher_views)
    if per_token:
        views = with_per_token_loss_weights(views, data["loss_masks"])
    logits = torch.cat(rows).float().unsqueeze(0).requires_grad_(True)
    args = Namespace(
        loss_type="custom_loss", custom_loss_function_path="slime_self_distill.custom_loss.self_distill_loss",
        calculate_per_token_loss=per_token, recompute_loss_function=False, allgather_cp=False,
        rollout_temperature=TEMPERATURE, log_probs_chunk_size=-1, rollout_top_p=1.0,
        advantage_estimator="grpo", use_rollout_logprobs=False, eps_clip=EPS_CLIP, eps_clip_high=EPS_CLIP_HIGH,
        eps_clip_c=None, use_opsm=False, get_mismatch_metrics=False, use_tis=False,
        custom_pg_loss_reducer_function_path=None, entropy_coef=ENTROPY_COEF, use_kl_loss=False, hidden_size=HIDDEN,
        **config.to_args_dict(),
    )
    teacher_token = [t.gather(-1, tok[-r:, None]).squeeze(-1).float()
                     for (_, t), tok, r in zip(teacher, tokens, RESPONSES)]
    batch = {
        "unconcat_tokens": tokens, "total_lengths": [len(t) for t in tokens], "response_lengths": RESPONSES,
        "loss_masks": [torch.tensor(m, dtype=torch.int) for m in data["loss_masks"]],
        "rollout_mask_sums": [torch.tensor(float(s)) for s in data["rollout_mask_sums"]],
        "advantages": [a.float() for a in advantages], "log_probs": [o.float() for o in old],
        "teacher_log_probs": teacher_token, "teacher_hidden_states": [h for h, _ in teacher],
        "self_distill_teacher_output_weight": output_weight,
        "self_distill_loss_weights": [v.loss_weight for v in views],
    }
    loss, normalizer, log = loss_function(args, batch, num_microbatches, step_samples, logits)
    objective = loss / normalizer if per_token else loss
    (grad,) = torch.autograd.grad(objective, logits)
    return objective.detach().double(), grad.double(), dict(zip(log["keys"], log["values"][1:].tolist()))


def reference(config: SelfDistillConfig, per_token: bool, inputs, num_microbatches=2, step_samples=8):
    """float64: the combined loss of the micro-batch as slime scales it, and its gradient."""
    rows, tokens, masks, old, advantages, teacher, _ = inputs
    teacher = [log_probs for _, log_probs in teacher]
    logits = torch.cat(rows).clone().requires_grad_(True)
    policy_terms, distill_terms, start = [], [], 0
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        log_p = torch.log_softmax(logits[start + p - 1:start + p + r - 1] / TEMPERATURE, -1)
        start += p + r
        sampled = log_p.gather(-1, tokens[i][-r:, None]).squeeze(-1)
        ratio = torch.exp(sampled - old[i])
        surrogate = torch.maximum(-advantages[i] * ratio,
                                  -advantages[i] * ratio.clamp(1 - EPS_CLIP, 1 + EPS_CLIP_HIGH))
        entropy = -(log_p.exp() * log_p).sum(-1)
        mask = torch.tensor(masks[i], dtype=torch.float64)
        policy_terms.append(((surrogate - ENTROPY_COEF * entropy) * mask, mask))
        if i != WITHOUT_TEACHER:  # full-vocabulary forward KL(T || S)
            kl = (teacher[i].exp() * (teacher[i] - log_p)).sum(-1)
            distill_terms.append((kl * mask, mask))
    if per_token:
        tokens_all = sum(max(float(m.sum()), 1.0) for _, m in policy_terms)
        policy = sum(t.sum() for t, _ in policy_terms) / tokens_all
        distillation = sum(t.sum() for t, _ in distill_terms) / sum(float(m.sum()) for _, m in distill_terms)
    else:  # per-sample means; slime scales the micro-batch's sum by num_microbatches / step samples
        scale = num_microbatches / step_samples
        policy = scale * sum(t.sum() / max(float(m.sum()), 1.0) for t, m in policy_terms)
        distillation = scale * sum(t.sum() / max(float(m.sum()), 1.0) for t, m in distill_terms) * (
            len(policy_terms) / len(distill_terms))
    w = config.weight
    total = ((1 - w) if config.rl_combination == "hybrid" else 1.0) * policy + w * distillation
    (grad,) = torch.autograd.grad(total, logits)
    return total.detach(), grad


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample_mean", "per_token_loss"])
@pytest.mark.parametrize("combination, weight", [("hybrid", 0.3), ("hybrid", 1.0), ("additive", 0.5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_combined_loss_and_gradient_equal_the_brute_force(slime_megatron, combination, weight, per_token, seed):
    config = SelfDistillConfig(kl_scope="full_vocab", rl_combination=combination,
                               weight=weight, teacher="live")
    inputs = step_inputs(seed)
    value, grad, metrics = plugin_step(config, per_token, inputs)
    expected_value, expected_grad = reference(config, per_token, inputs)
    torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad.unsqueeze(0), rtol=1e-4, atol=1e-7)
    # slime's policy metrics keep their names next to the distillation's
    assert {"pg_loss", "entropy_loss", "pg_clipfrac", "ppo_kl", "self_distill_loss", "loss"} <= set(metrics)
    # the clipping is exercised, not everywhere (a sum of per-sample fractions, or of tokens per token)
    assert 0 < metrics["pg_clipfrac"] < (sum(map(sum, inputs[2])) if per_token else len(PROMPTS))


def test_the_sample_without_a_teacher_still_trains_on_the_policy_loss(slime_megatron):
    """Its loss mask is kept (the policy term needs it) and its rows get the policy gradient only."""
    inputs = step_inputs(3)
    config = SelfDistillConfig(kl_scope="full_vocab", rl_combination="additive",
                               weight=0.5, teacher="live")
    _, grad, _ = plugin_step(config, False, inputs)
    start = sum(p + r for p, r in zip(PROMPTS[:WITHOUT_TEACHER], RESPONSES[:WITHOUT_TEACHER]))
    prompt, response = PROMPTS[WITHOUT_TEACHER], RESPONSES[WITHOUT_TEACHER]
    rows = grad[0, start + prompt - 1:start + prompt + response - 1]
    assert rows.abs().sum() > 0
    distillation_only = SelfDistillConfig(kl_scope="full_vocab", teacher="live")
    _, grad_none, metrics = plugin_step(distillation_only, False, inputs)
    assert grad_none[0, start:start + prompt + response].abs().sum() == 0
    assert "pg_loss" not in metrics  # none: slime's policy loss is not computed
