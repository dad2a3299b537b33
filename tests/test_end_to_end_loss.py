"""End to end on CPU, through the installed hooks and slime's real code: the teacher pass (``compute_log_prob`` ->
``forward_only`` on the teacher sequences), a training step (``train_one_step``: its own ``get_batch`` key list,
``loss_function`` with ``--loss-type custom_loss`` and the plugin's loss, ``reduce_train_step_metrics``), compared
with a float64 brute force computed directly from the tiny model's teacher sequences (teacher prompt + the exact
response) and student sequences.

Per micro-batch the test checks the scaled loss and its gradient w.r.t. every student logit (prompt and padding
rows included, which must get none); per step the reported loss, i.e. the objective Megatron optimises. One sample
has no teacher (loss weight 0). Single process (gloo world 1), then TP=2 and CP=2 with two spawned gloo processes.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime_self_distill import megatron_hooks
from slime_self_distill.custom_convert import with_per_token_loss_weights
from tests.megatron_gpt import MegatronTinyGPT
from tests.slime_cpu_harness import (
    TinyCausalLM,
    brute_force_teacher,
    destroy_gloo,
    each_two_rank_layout,
    free_port,
    import_slime_megatron,
    init_gloo,
    make_args,
    make_rollout,
    point_slime_at_cpu,
)
from tests.slime_support import requires_slime

pytestmark = requires_slime

TOP_K = 5
SCOPES = {  # the model's hidden size is 8 (32 B per hidden state in fp32): K 5 (40 B) keeps the hidden states too
    "full_vocab": dict(self_distill_kl_scope="full_vocab"),
    "topk": dict(self_distill_kl_scope="topk", self_distill_topk=TOP_K),
    "topk_student": dict(self_distill_kl_scope="topk", self_distill_topk=TOP_K, self_distill_topk_support="student"),
    "topk_union": dict(self_distill_kl_scope="topk", self_distill_topk=TOP_K, self_distill_topk_support="union"),
    "sampled_token": dict(self_distill_kl_scope="sampled_token", self_distill_divergence="reverse_kl"),
}
# (rtol of the loss, gradient atol relative to the gradient's largest entry): fp32 against fp64; the top-K tail
# (1 - the support's mass) cancels digits in fp32
TOLERANCES = {scope: (1e-5, 3e-5 if scope.startswith("topk") else 1e-5) for scope in SCOPES}
WITHOUT_TEACHER = 2  # make_rollout's sample without a teacher prompt; the 4 others weigh 5 / 4


def training_args(scope: str, per_token: bool, recompute_loss_function: bool = False, **parallel):
    return make_args(
        custom_loss_function_path="slime_self_distill.custom_loss.self_distill_loss",
        calculate_per_token_loss=per_token, recompute_loss_function=recompute_loss_function,
        # read by train_one_step
        custom_megatron_before_train_step_hook_path=None, save_debug_train_data=None, enable_mtp_training=False,
        decoder_seq_length=None, ci_test=False,
        **SCOPES[scope], **parallel,
    )


# ---------------------------------------------------------------------- float64 brute force
def reference_terms(scope: str, student_logits: torch.Tensor, teacher_log_probs: torch.Tensor,
                    response: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token loss terms from first principles: ``student_logits`` [R, V] raw, ``teacher_log_probs`` [R, V]."""
    student = torch.log_softmax(student_logits / temperature, dim=-1)
    teacher = teacher_log_probs
    if scope.startswith("full_vocab"):  # KL(T || S) over the whole vocabulary
        return (teacher.exp() * (teacher - student)).sum(-1)
    if scope.startswith("topk"):  # KL(T || S) on a top-K support plus one bucket for all the others
        terms = []
        for row in range(len(teacher)):
            by_teacher = set(teacher[row].topk(TOP_K).indices.tolist())
            by_student = set(student[row].detach().topk(TOP_K).indices.tolist())
            support = {"topk": by_teacher, "topk_student": by_student, "topk_union": by_teacher | by_student}[scope]
            top = torch.tensor(sorted(support))
            teacher_p, student_p = teacher[row].exp()[top], student[row].exp()[top]
            teacher_p = torch.cat([teacher_p, 1 - teacher_p.sum(-1, keepdim=True)])
            student_p = torch.cat([student_p, 1 - student_p.sum(-1, keepdim=True)])
            terms.append((teacher_p * (teacher_p.log() - student_p.log())).sum())
        return torch.stack(terms)
    # reverse KL, score-function surrogate at the sampled token y: sg(log S(y) - log T(y)) * log S(y)
    student_y = student.gather(1, response.unsqueeze(1)).squeeze(1)
    teacher_y = teacher.gather(1, response.unsqueeze(1)).squeeze(1)
    return (student_y - teacher_y).detach() * student_y


class Reference:
    """Per sample, float64: the student's sequence logits (a leaf, for gradients) and its per-token loss terms."""

    def __init__(self, model, rollout: dict, scope: str, temperature: float):
        self.rollout = rollout
        self.logits, self.terms = [], []
        for index, view in enumerate(rollout["prompt"]):
            student_tokens = rollout["tokens"][index]
            teacher_tokens = torch.tensor(view.tokens) if view.has_teacher else student_tokens
            teacher, response = brute_force_teacher(model, teacher_tokens, view.response_length, temperature)
            logits = model.sequence_logits(student_tokens, torch.float64).detach().requires_grad_()
            prompt_length = len(student_tokens) - view.response_length
            rows = logits[prompt_length - 1 : len(student_tokens) - 1]
            self.logits.append(logits)
            self.terms.append(reference_terms(scope, rows, teacher, response, temperature))

    def masked_sum(self, index: int) -> torch.Tensor:
        return (self.terms[index] * self.rollout["loss_masks"][index].double()).sum()

    def token_count(self, index: int) -> int:
        """slime's count of a sample's loss tokens, at least 1 (a sample without a teacher has an all-zero mask from
        the converter, so it counts 1)."""
        return max(int(self.rollout["loss_masks"][index].sum()), 1)

    def micro_batch_objective(self, micro_batch: list[int], per_token: bool, samples_per_step: int) -> torch.Tensor:
        """What one micro-batch's loss must be (summed over CP ranks, Megatron's CP factor removed)."""
        views = self.rollout["prompt"]
        if per_token:  # numerator of the step's token mean, in the converter's per-token weights
            return sum(views[i].loss_weight * self.masked_sum(i) for i in micro_batch if views[i].has_teacher)
        num_microbatches = len(self.rollout["micro_batch_indices"])
        return sum(views[i].loss_weight * self.masked_sum(i) / self.token_count(i) for i in micro_batch) * (
            num_microbatches / samples_per_step
        )

    def step_loss(self, per_token: bool) -> float:
        """The loss slime reports for the step, from the definition: per sample, the mean over the samples that
        have a teacher of their token means; per token, the mean over their loss tokens (a sample without a teacher
        counts in neither)."""
        with_teacher = [i for i, view in enumerate(self.rollout["prompt"]) if view.has_teacher]
        if per_token:
            tokens = sum(int(self.rollout["loss_masks"][i].sum()) for i in with_teacher)
            return float(sum(self.masked_sum(i) for i in with_teacher) / tokens)
        return float(sum(self.masked_sum(i) / self.token_count(i) for i in with_teacher) / len(with_teacher))


# ---------------------------------------------------------------------- slime's layout of the packed logits
def local_rows(batch: dict, cp_rank: int, cp_size: int) -> list[tuple[int, int]]:
    """(sample index within the micro-batch or -1 for padding, sequence position) of every local logits row, from
    slime's packing (``cu_seqlens`` of the CP-padded sequences) and its zigzag split (chunks r and 2 cp - 1 - r)."""
    boundaries = [b // cp_size for b in batch["packed_seq_params"].cu_seqlens_q.tolist()]
    rows = []
    for segment, (start, end) in enumerate(zip(boundaries[:-1], boundaries[1:])):
        length = end - start
        sample = segment if segment < len(batch["total_lengths"]) else -1
        half = length // 2
        for j in range(length):
            if cp_size == 1:
                position = j
            elif j < half:
                position = cp_rank * half + j
            else:
                position = (2 * cp_size - 1 - cp_rank) * half + j - half
            rows.append((sample, position))
    return rows


# ---------------------------------------------------------------------- one training step
def check_training_step(slime, scope: str, per_token: bool, seed: int, set_attribute=setattr,
                        sequence_parallel: bool = False, recompute_loss_function: bool = False, **parallel) -> None:
    """One teacher pass and one training step of megatron-core-structured ``MegatronTinyGPT`` (its output layer is
    megatron-core's ColumnParallelLinear, which the hidden-state store reads) against the brute force."""
    from megatron.core import mpu

    args = training_args(scope, per_token, recompute_loss_function, **parallel)
    set_attribute(slime.model, "get_args", lambda: args)  # megatron.training's global args, read by train_one_step
    megatron_hooks.install(args)
    try:
        model = MegatronTinyGPT(sequence_parallel=sequence_parallel)
        rollout = make_rollout(seed, num_samples=5, without_teacher=(WITHOUT_TEACHER,))
        if per_token:  # the whole rollout is one step: the converter's weights make it the teacher tokens' mean
            rollout["prompt"] = with_per_token_loss_weights(rollout["prompt"], rollout["loss_masks"])
        actor = SimpleNamespace(args=args, model=[model])
        rollout.update(slime.actor.MegatronTrainRayActor.compute_log_prob(
            actor, slime.data.get_data_iterator(rollout), rollout["num_microbatches"], store_prefix="teacher_"))

        samples_per_step = len(rollout["tokens"])
        optimizer = SimpleNamespace(zero_grad=lambda: None, step=lambda: (True, 0.0, 0))
        scheduler = SimpleNamespace(step=lambda increment: None)
        loss_reduced, _ = slime.model.train_one_step(
            args, 0, 0, slime.data.get_data_iterator(rollout), [model], optimizer, scheduler,
            rollout["num_microbatches"][0], samples_per_step,
        )
    finally:
        megatron_hooks.uninstall()

    cp_size, cp_rank = mpu.get_context_parallel_world_size(), mpu.get_context_parallel_rank()
    tp_size, tp_rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    shard = model.vocab_size // tp_size
    columns = slice(tp_rank * shard, (tp_rank + 1) * shard)
    reference = Reference(model, rollout, scope, args.rollout_temperature)
    assert len(model.trained) == len(rollout["micro_batch_indices"])
    for micro_batch, trained in zip(rollout["micro_batch_indices"], model.trained, strict=True):
        # each CP rank holds part of every sample: its loss and gradients are its share (x cp_size, slime's factor)
        loss = trained.loss.clone()
        if cp_size > 1:
            dist.all_reduce(loss, group=mpu.get_context_parallel_group())
        objective = reference.micro_batch_objective(micro_batch, per_token, samples_per_step)
        loss_rtol, gradient_atol = TOLERANCES[scope]
        torch.testing.assert_close(loss.double() / cp_size, objective.detach(), rtol=loss_rtol, atol=1e-7)

        gradients = torch.autograd.grad(objective, [reference.logits[i] for i in micro_batch], allow_unused=True)
        expected = torch.zeros_like(trained.logits_grad[0], dtype=torch.float64)
        for row, (sample, position) in enumerate(local_rows(trained.batch, cp_rank, cp_size)):
            if sample >= 0 and position < trained.batch["total_lengths"][sample] and gradients[sample] is not None:
                expected[row] = gradients[sample][position, columns]
        # the tolerance follows the gradient's scale (in fp32 the top-K tail 1 - sum cancels digits)
        scale = float(expected.abs().max())
        torch.testing.assert_close(trained.logits_grad[0].double() / cp_size, expected, rtol=1e-4,
                                   atol=gradient_atol * scale, msg=lambda text: f"{scope}: {text}")
        if micro_batch == [WITHOUT_TEACHER, WITHOUT_TEACHER + 1]:  # the teacher-less sample's rows get no gradient
            first = [s for s, _ in local_rows(trained.batch, cp_rank, cp_size)].count(0)
            assert not trained.logits_grad[0, :first].any()
        if per_token:  # slime's token count: the teacher samples' loss tokens, 1 for the one without a teacher
            assert int(trained.normalizer) == sum(reference.token_count(i) for i in micro_batch)

    assert loss_reduced["loss"] == pytest.approx(reference.step_loss(per_token), rel=TOLERANCES[scope][0], abs=1e-8)


# ---------------------------------------------------------------------- single process
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample_mean", "per_token_loss"])
@pytest.mark.parametrize("scope", list(SCOPES))
def test_training_step_loss_and_logit_gradients_equal_brute_force(slime_megatron, monkeypatch, scope, per_token):
    point_slime_at_cpu(monkeypatch.setattr)
    check_training_step(slime_megatron, scope, per_token, seed=31, set_attribute=monkeypatch.setattr)


def test_reference_sees_the_teacher_prompt(slime_megatron):
    """Guards the brute force itself: the teacher's log-probabilities on its own prompt differ from those on the
    student's prompt, so a hook that ran the teacher on the student's tokens could not pass the tests above."""
    model, rollout = TinyCausalLM(), make_rollout(31, num_samples=5, without_teacher=(WITHOUT_TEACHER,))
    with_teacher = Reference(model, rollout, "full_vocab", 0.7)
    rollout["prompt"] = [
        view if not view.has_teacher else type(view)(
            tuple(rollout["tokens"][i].tolist()), view.response_length, True, view.loss_weight)
        for i, view in enumerate(rollout["prompt"])
    ]
    on_student_prompt = Reference(model, rollout, "full_vocab", 0.7)
    for index in range(5):
        same = torch.allclose(with_teacher.terms[index], on_student_prompt.terms[index])
        assert same == (index == WITHOUT_TEACHER)
        assert (on_student_prompt.terms[index].abs() < 1e-12).all()  # KL of the model with itself


# ---------------------------------------------------------------------- TP=2 and CP=2, two gloo processes
def _parallel_worker(rank: int, port: int) -> None:
    slime = import_slime_megatron()
    init_gloo(rank, 2, port, slime_group=True)
    point_slime_at_cpu()
    for tp_size, cp_size, sequence_parallel in each_two_rank_layout():
        for scope in SCOPES:
            for per_token in (False, True):
                check_training_step(slime, scope, per_token, seed=41, sequence_parallel=sequence_parallel,
                                    tensor_model_parallel_size=tp_size, context_parallel_size=cp_size)
        # --recompute-loss-function: the loss runs again inside backward, its TP gathers of the teacher rows too
        check_training_step(slime, "topk_student", False, seed=43, sequence_parallel=sequence_parallel,
                            recompute_loss_function=True, tensor_model_parallel_size=tp_size,
                            context_parallel_size=cp_size)
    destroy_gloo()


@pytest.mark.distributed
def test_tensor_and_context_parallel_training_steps_equal_brute_force():
    mp.spawn(_parallel_worker, args=(free_port(),), nprocs=2)


def _tensor_and_context_parallel_worker(rank: int, port: int) -> None:
    slime = import_slime_megatron()
    from megatron.core import mpu

    init_gloo(rank, 4, port, slime_group=True)
    point_slime_at_cpu()
    mpu.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    for scope in ("full_vocab", "topk_student"):  # TP blocks of the CP-re-laid-out teacher rows
        check_training_step(slime, scope, False, seed=41, sequence_parallel=True, tensor_model_parallel_size=2,
                            context_parallel_size=2)
    mpu.destroy_model_parallel()
    destroy_gloo()


@pytest.mark.distributed
def test_tensor_and_context_parallel_together():
    mp.spawn(_tensor_and_context_parallel_worker, args=(free_port(),), nprocs=4)
