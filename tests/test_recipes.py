"""Each recipe's loss is its method's official objective, in value and gradient.

For every recipe in configs/, a step's worth of samples goes through the plugin as slime runs it: the recipe's
settings and slime arguments (the launcher), the converter's loss masks, the teacher outputs computed from the
teacher's logits (``compute_teacher_outputs``, as the teacher pass does), and the loss through slime's real
``loss_function`` with its own reduction and scaling. The reference is a float64 reading of the official code's
loss, written from its rules (file and lines cited), on the same logits: the student's and the teacher's raw logits,
the sampled tokens, the loss masks and the rollout engine's log-probabilities.
"""

import dataclasses
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from slime_self_distill.custom_convert import restrict_loss_masks
from slime_self_distill.teacher_view import PAYLOAD_KEY, TeacherView
from slime_self_distill.train import plan_launch
from slime_self_distill.trainer.teacher_outputs import TeacherOutputSpec, compute_teacher_outputs
from tests.slime_support import requires_slime

pytestmark = requires_slime

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB = 16
HIDDEN = 16  # 64 B per hidden state in float32: the recipes' teacher top-5 (40 B) is stored, as K 64 is at H 4096
PROMPTS, RESPONSES = [3, 5, 2, 4, 3], [6, 4, 7, 2, 8]  # the last sample keeps only its tail after skipping


def recipe(name: str):
    """(plugin config, rollout temperature, per-token loss) as the launcher hands the recipe to slime: slime's own
    parser reads the temperature; --calculate-per-token-loss is Megatron's flag."""
    from tests.test_train import slime_parser

    plan = plan_launch(["--custom-config-path", str(CONFIGS / name), "--ref-load", "/ckpt/initial"])
    args, _ = slime_parser().parse_known_args(plan.slime_argv)
    return plan.config, args.rollout_temperature, "--calculate-per-token-loss" in plan.slime_argv


def step_inputs(seed: int):
    """Student raw logits over each whole sequence; the teacher's final hidden states at the response rows and its
    output weights (float32 values), and its raw logits from them in float64; sampled tokens, loss masks, rollout
    log-probs."""
    g = torch.Generator().manual_seed(seed)
    output_weight = 2 * torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN ** 0.5
    student_rows, teacher, tokens, masks, rollout = [], [], [], [], []
    for p, r in zip(PROMPTS, RESPONSES):
        tokens.append(torch.randint(0, VOCAB, (p + r,), generator=g))
        student_rows.append(2 * torch.randn(p + r, VOCAB, generator=g, dtype=torch.float64))
        hidden = torch.randn(r, HIDDEN, generator=g)
        teacher.append((hidden, hidden.double() @ output_weight.double().t()))
        masks.append((torch.rand(r, generator=g) > 0.15).int().tolist())
        rollout.append(-torch.rand(r, generator=g, dtype=torch.float64) * 3)
    return student_rows, (teacher, output_weight), tokens, masks, rollout


def plugin_objective(config, temperature: float, per_token: bool, inputs):
    """The step's loss and its gradient w.r.t. the student logits, through the converter's masks, the teacher
    outputs and slime's loss_function (one micro-batch holding the step's samples)."""
    from slime.backends.megatron_utils.loss import loss_function

    student_rows, (teacher_rows, output_weight), tokens, masks, rollout = inputs
    views = [TeacherView(tuple(range(len(t) + 1)), r, True, 1.0) for t, r in zip(tokens, RESPONSES)]
    data = restrict_loss_masks({PAYLOAD_KEY: views, "loss_masks": masks, "rollout_ids": list(range(len(masks)))},
                               config.num_loss_tokens_to_skip)
    logits = torch.cat(student_rows).float().unsqueeze(0).requires_grad_(True)
    args = Namespace(loss_type="custom_loss", custom_loss_function_path="slime_self_distill.custom_loss.self_distill_loss",
                     calculate_per_token_loss=per_token, recompute_loss_function=False, allgather_cp=False,
                     rollout_temperature=temperature, hidden_size=HIDDEN, **config.to_args_dict())
    spec = TeacherOutputSpec.from_args(args, config)
    teacher = [compute_teacher_outputs(t_logits.float(), tok[-r:], spec, hidden_states=hidden)
               for (hidden, t_logits), tok, r in zip(teacher_rows, tokens, RESPONSES)]
    batch = {
        "unconcat_tokens": tokens, "total_lengths": [len(t) for t in tokens], "response_lengths": RESPONSES,
        "loss_masks": [torch.tensor(m, dtype=torch.int) for m in data["loss_masks"]], "rollout_mask_sums": None,
        "rollout_log_probs": [r.float() for r in rollout], "self_distill_loss_weights": [1.0] * len(tokens),
        **{key: [outputs[key] for outputs in teacher] for key in teacher[0]},
        "self_distill_teacher_output_weight": output_weight,
    }
    loss, normalizer, _ = loss_function(args, batch, 1, len(tokens), logits)
    objective = loss / normalizer if per_token else loss  # Megatron divides by the token count with per-token loss
    (grad,) = torch.autograd.grad(objective, logits)
    return objective.detach().double(), grad.double()


def per_sample(inputs, temperature=1.0):
    """The student logits as a float64 leaf, and per sample: (student log-probs, teacher log-probs) over the response
    rows at ``temperature``, the response tokens, the loss mask, the rollout log-probs."""
    student_rows, (teacher_rows, _), tokens, masks, rollout = inputs
    teacher_logits = [t_logits for _, t_logits in teacher_rows]
    logits = torch.cat(student_rows).clone().requires_grad_(True)
    samples, start = [], 0
    for p, r, t_logits, tok, mask, roll in zip(PROMPTS, RESPONSES, teacher_logits, tokens, masks, rollout):
        response_logits = logits[start + p - 1 : start + p + r - 1]  # row i predicts token i + 1
        samples.append((torch.log_softmax(response_logits / temperature, -1),
                        torch.log_softmax(t_logits / temperature, -1), tok[-r:], mask, roll))
        start += p + r
    return logits, samples


def value_and_grad(objective, logits):
    (grad,) = torch.autograd.grad(objective, logits)
    return objective.detach(), grad


# ---------------------------------------------------------------------- the official objectives, float64
def official_sdft(inputs, *, topk=None):
    """idanshen/Self-Distillation distil_trainer.py (d775732): _compute_loss L1599-1688 with alpha 0 (kl_div of the
    student's log-probs against the teacher's, summed over the vocabulary), num_loss_tokens_to_skip 3 removed from the
    mask (L1599-1606), the vLLM importance weight of _generate_and_score_completions L1454-1458 (per token,
    clamp(max=2)) averaged over the loss mask into one weight per sequence (L1678-1682), a per-sequence mean, the mean
    over the step's sequences (L1687-1688; gradient accumulation 32 x batch 1). Temperature 1. ``topk``: the same
    with the KL over the teacher's top-K tokens plus one tail bucket (sdft_topk.yaml)."""
    logits, samples = per_sample(inputs)
    total = 0.0
    for student, teacher, response, mask, roll in samples:
        if topk is None:
            kl = (teacher.exp() * (teacher - student)).sum(-1)
        else:
            ids = teacher.topk(topk, -1).indices
            t_top, s_top = teacher.exp().gather(-1, ids), student.exp().gather(-1, ids)
            t_all = torch.cat([t_top, 1 - t_top.sum(-1, keepdim=True)], -1)
            s_all = torch.cat([s_top, 1 - s_top.sum(-1, keepdim=True)], -1)
            kl = (t_all * (t_all.log() - s_all.log())).sum(-1)
        loss_mask = torch.tensor(mask, dtype=torch.float64) * (torch.arange(len(mask)) >= 3)
        old = student.detach().gather(-1, response[:, None]).squeeze(-1)
        ratio = torch.exp(old - roll).clamp(max=2.0)
        weight = (ratio * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
        total = total + (kl * weight * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
    return value_and_grad(total / len(samples), logits)


def official_opsd(inputs, *, temperature=1.1, clip=0.05):
    """siyan-zhao/OPSD opsd_trainer.py (7448751) generalized_jsd_loss L382-474 with beta 0: student and teacher logits
    divided by the temperature, F.kl_div(student, teacher, log_target=True) per vocabulary entry, clamp(max=clip)
    per entry, the masked entries summed and divided by the number of masked tokens of the (per-device) batch."""
    logits, samples = per_sample(inputs, temperature)
    total, count = 0.0, 0
    for student, teacher, _, mask, _ in samples:
        jsd = (teacher.exp() * (teacher - student)).clamp(max=clip)
        kept = torch.tensor(mask, dtype=torch.bool)
        total = total + jsd[kept].sum()
        count += int(kept.sum())
    return value_and_grad(total / count, logits)


def official_sdpo_token_level(inputs, *, cap=2.0):
    """lasgroup/SDPO verl/trainer/ppo/core_algos.py (0e6d510) compute_self_distillation_loss L1164-1187 with
    full_logit_distillation False: (log S - log T).detach() * log S at the sampled token (rollout temperature 1.0),
    times the rollout correction min(exp(old - rollout), 2) per token (rollout_corr_helper.py L530-566); token-mean
    over a micro-batch of one sequence (user.yaml ppo_micro_batch_size_per_gpu 1), averaged over the step's
    sequences (1 / gradient accumulation)."""
    logits, samples = per_sample(inputs)
    total = 0.0
    for student, teacher, response, mask, roll in samples:
        ids = response[:, None]
        log_s, log_t = student.gather(-1, ids).squeeze(-1), teacher.gather(-1, ids).squeeze(-1)
        per_token = (log_s - log_t).detach() * log_s * torch.exp(log_s.detach() - roll).clamp(max=cap)
        loss_mask = torch.tensor(mask, dtype=torch.float64)
        total = total + (per_token * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
    return value_and_grad(total / len(samples), logits)


def official_sdpo(inputs, *, topk, alpha=0.5, cap=2.0):
    """lasgroup/SDPO verl/trainer/ppo/core_algos.py (0e6d510) compute_self_distillation_loss L1106-1162 with
    full_logit_distillation, distillation_topk, distillation_add_tail and alpha 0.5 (actor.yaml): both top-K
    log-probabilities get a tail bucket log(-expm1(logsumexp)), the mixture log M = logsumexp(log S + log(1 - alpha),
    log T + log(alpha)), the loss lerp(KL(S || M), KL(T || M), alpha) summed over the K + 1 entries; times the rollout
    correction min(exp(old - rollout), 2) per token; token-mean over a micro-batch of one sequence, averaged over the
    step's sequences. The top-K ids are the STUDENT's (dp_actor.py passes topk_indices=student_topk_indices to the
    teacher's forward)."""
    logits, samples = per_sample(inputs)
    total = 0.0

    def with_tail(log_p):
        log_sum = torch.logsumexp(log_p, -1, keepdim=True).clamp(max=-1e-7)
        return torch.cat([log_p, torch.log(-torch.expm1(log_sum))], -1)

    for student, teacher, response, mask, roll in samples:
        ids = student.detach().topk(topk, -1).indices
        log_s, log_t = with_tail(student.gather(-1, ids)), with_tail(teacher.gather(-1, ids))
        log_m = torch.logsumexp(torch.stack([log_s + torch.log(torch.tensor(1 - alpha, dtype=torch.float64)),
                                             log_t + torch.log(torch.tensor(alpha, dtype=torch.float64))]), 0)
        kl_student = (log_s.exp() * (log_s - log_m)).sum(-1)
        kl_teacher = (log_t.exp() * (log_t - log_m)).sum(-1)
        per_token = torch.lerp(kl_student, kl_teacher, alpha)
        old = student.detach().gather(-1, response[:, None]).squeeze(-1)
        per_token = per_token * torch.exp(old - roll).clamp(max=cap)
        loss_mask = torch.tensor(mask, dtype=torch.float64)
        total = total + (per_token * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
    return value_and_grad(total / len(samples), logits)


def official_sd_zero(inputs, *, topk, mixed_kl_weight=0.5):
    """princeton-pli/Self-Distillation-Zero self-distillation/nemo_rl/algorithms/loss_functions.py (fdaeb0b)
    DistillationLossFn L1240-1325 with kl_type mixed, zero_outside_topk false: the student's logits gathered at the
    teacher's top-K ids and both sides log-softmaxed over those K, per token mixed_kl_weight * sum T(log T - log S) +
    (1 - mixed_kl_weight) * sum S(log S - log T); masked_mean over the step's loss tokens (the global token count);
    temperature 1."""
    logits, samples = per_sample(inputs)
    total, count = 0.0, 0
    for student, teacher, _, mask, _ in samples:
        ids = teacher.topk(topk, -1).indices
        log_s = torch.log_softmax(student.gather(-1, ids), -1)  # log_softmax of the logits gathered at the ids
        log_t = torch.log_softmax(teacher.gather(-1, ids), -1)
        forward = (log_t.exp() * (log_t - log_s)).sum(-1)
        reverse = (log_s.exp() * (log_s - log_t)).sum(-1)
        per_token = mixed_kl_weight * forward + (1 - mixed_kl_weight) * reverse
        loss_mask = torch.tensor(mask, dtype=torch.float64)
        total = total + (per_token * loss_mask).sum()
        count += int(loss_mask.sum())
    return value_and_grad(total / count, logits)


TOPK = 5  # the recipes' K (64, 100) are beyond this test's 16-token vocabulary
OFFICIAL = {
    "sdft.yaml": official_sdft,
    "sdft_topk.yaml": lambda inputs: official_sdft(inputs, topk=TOPK),
    "opsd.yaml": official_opsd,
    "sampled_token_reverse_kl.yaml": official_sdpo_token_level,
    "sdpo.yaml": lambda inputs: official_sdpo(inputs, topk=TOPK),
    "sd_zero.yaml": lambda inputs: official_sd_zero(inputs, topk=TOPK),
}


# Recipes of no official method, and where their loss is checked through slime's real loss_function.
CHECKED_ELSEWHERE = {"offline_topk_kd.yaml": "test_offline_kd.py", "local_kv_demo.yaml": "test_local_train.py"}


def test_every_recipe_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted([*OFFICIAL, *CHECKED_ELSEWHERE])
    for name, test_file in CHECKED_ELSEWHERE.items():
        assert name in (Path(__file__).parent / test_file).read_text()


@pytest.mark.parametrize("name", sorted(OFFICIAL))
@pytest.mark.parametrize("seed", [0, 1])
def test_the_recipe_loss_is_the_official_objective(slime_megatron, name, seed):
    config, temperature, per_token = recipe(name)
    if config.kl_scope == "topk":
        config = dataclasses.replace(config, topk=TOPK)
    inputs = step_inputs(seed)
    value, grad = plugin_objective(config, temperature, per_token, inputs)
    expected_value, expected_grad = OFFICIAL[name](inputs)
    torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad.unsqueeze(0), rtol=1e-4, atol=1e-7)
