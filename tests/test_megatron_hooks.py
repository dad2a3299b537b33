from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime_self_distill import megatron_hooks
from slime_self_distill.config import ConfigError, SelfDistillConfig
from slime_self_distill.core.host_memory import Parallel, teacher_store_bytes
from slime_self_distill.core.teacher_logits import TeacherHiddenStates
from slime_self_distill.megatron_hooks import (
    add_teacher_inputs,
    build_teacher_rollout_data,
    check_args,
    without_plugin_keys,
    wrap_rollout_data_consumer,
    wrap_then,
)
from slime_self_distill.teacher_view import (
    LOSS_WEIGHTS_KEY,
    TEACHER_HIDDEN_STATES_KEY,
    TEACHER_OUTPUT_WEIGHT_KEY,
    TEACHER_TOKEN_LOG_PROBS_KEY,
    TEACHER_TOPK_INDICES_KEY,
    TEACHER_TOPK_LOG_PROBS_KEY,
    TeacherView,
)
from slime_self_distill.trainer.teacher_outputs import gather_tp_rows
from slime_self_distill.trainer.teacher_weights import TeacherAwareBackuper
from tests.megatron_gpt import MegatronTinyGPT
from tests.slime_cpu_harness import (
    TinyCausalLM,
    TorchWithoutPinnedMemory,
    brute_force_teacher,
    destroy_gloo,
    free_port,
    import_slime_megatron,
    init_gloo,
    make_args,
    make_rollout,
    point_slime_at_cpu,
)
from tests.slime_support import needs_slime

# The key list of slime's train_one_step (model.py), as a training batch requests it.
TRAIN_KEYS = [
    "tokens", "multimodal_train_inputs", "packed_seq_params", "total_lengths", "response_lengths", "loss_masks",
    "log_probs", "ref_log_probs", "values", "advantages", "returns", "rollout_log_probs", "teacher_log_probs",
    "rollout_mask_sums",
]
# The key list of slime's forward_only.
FORWARD_KEYS = ["tokens", "loss_masks", "multimodal_train_inputs", "total_lengths", "response_lengths"]
SCOPE_ARGS = {  # make_args' hidden size 8 in fp32 (32 B) is smaller than K 5 entries (40 B): only 'topk' is stored
    "sampled_token": dict(self_distill_kl_scope="sampled_token"),
    "topk": dict(self_distill_kl_scope="topk", self_distill_topk=5, hidden_size=4096),
    "full_vocab": dict(self_distill_kl_scope="full_vocab"),
    "topk_student": dict(self_distill_kl_scope="topk", self_distill_topk=5, self_distill_topk_support="student"),
}
EXPECTED_KEYS = {
    "sampled_token": {TEACHER_TOKEN_LOG_PROBS_KEY},
    "topk": {TEACHER_TOKEN_LOG_PROBS_KEY, TEACHER_TOPK_LOG_PROBS_KEY, TEACHER_TOPK_INDICES_KEY},
    "full_vocab": {TEACHER_TOKEN_LOG_PROBS_KEY, TEACHER_HIDDEN_STATES_KEY, TEACHER_OUTPUT_WEIGHT_KEY},
    "topk_student": {TEACHER_TOKEN_LOG_PROBS_KEY, TEACHER_HIDDEN_STATES_KEY, TEACHER_OUTPUT_WEIGHT_KEY},
}


# ---------------------------------------------------------------------- pure pieces
def test_teacher_rollout_data_uses_teacher_tokens_and_placeholders():
    rollout = make_rollout(5)
    teacher = build_teacher_rollout_data(rollout)
    for index, view in enumerate(rollout["prompt"]):
        expected = view.tokens if view.has_teacher else tuple(rollout["tokens"][index].tolist())
        assert tuple(teacher["tokens"][index].tolist()) == expected
        assert teacher["total_lengths"][index] == len(expected)
    assert teacher["response_lengths"] == rollout["response_lengths"]
    assert teacher["loss_masks"] is rollout["loss_masks"]
    assert not rollout["prompt"][2].has_teacher and teacher["tokens"][2] is rollout["tokens"][2]


@pytest.mark.parametrize(
    "corrupt, error, match",
    [
        (lambda r: r.pop("prompt"), RuntimeError, "no 'prompt' key"),
        (lambda r: r["prompt"].pop(), ValueError, "4 entries for 5 samples"),
        (lambda r: r["prompt"].__setitem__(1, "text"), TypeError, r"\['prompt'\]\[1\] is a str, not a TeacherView"),
        (lambda r: r["response_lengths"].__setitem__(0, r["response_lengths"][0] + 1), ValueError, "sample 0"),
        (lambda r: r["tokens"][3].__setitem__(-1, (r["tokens"][3][-1] + 1) % 24), ValueError,
         "sample 3: the teacher sequence does not end with the student's response"),
        (lambda r: r.__setitem__("multimodal_train_inputs", [None, {"pixels": 1}, None, None, None]), ValueError,
         "multimodal"),
    ],
)
def test_teacher_rollout_data_refuses_bad_payloads(corrupt, error, match):
    rollout = make_rollout(6)
    corrupt(rollout)
    with pytest.raises(error, match=match):
        build_teacher_rollout_data(rollout)


def test_training_batch_gets_loss_weights_and_device_copies():
    views = [TeacherView((1, 2, 3), 1, True, 1.5), TeacherView((), 2, False, 0.0, reason="no teacher")]
    host = [torch.randn(1, 4), torch.randn(2, 4)]
    masks = [torch.ones(1, dtype=torch.int), torch.zeros(2, dtype=torch.int)]
    batch = {"tokens": torch.zeros(1, 8, dtype=torch.long), "prompt": views, TEACHER_TOPK_LOG_PROBS_KEY: host,
             TEACHER_TOPK_INDICES_KEY: None, "loss_masks": list(masks)}
    add_teacher_inputs(batch)
    assert "prompt" not in batch
    assert torch.equal(batch[LOSS_WEIGHTS_KEY], torch.tensor([1.5, 0.0]))
    assert all(a is b for a, b in zip(batch["loss_masks"], masks))  # slime's masks pass through
    assert all(torch.equal(a, b) for a, b in zip(batch[TEACHER_TOPK_LOG_PROBS_KEY], host))
    assert batch[TEACHER_TOPK_INDICES_KEY] is None  # absent (e.g. not the last pipeline stage): left as slime does
    with pytest.raises(RuntimeError, match="no 'prompt' TeacherView payload"):
        add_teacher_inputs({"tokens": torch.zeros(1, 1), "prompt": None, "loss_masks": []})


def test_consumers_see_rollout_data_without_plugin_keys_and_keep_their_additions():
    seen = {}

    def log_rollout_data(rollout_id, args, rollout_data):
        seen.update(rollout_data)
        rollout_data["correct_entropy"] = [0.5]

    rollout = {"tokens": [1], "prompt": ["view"], TEACHER_TOKEN_LOG_PROBS_KEY: [2], TEACHER_HIDDEN_STATES_KEY: [3],
               TEACHER_TOPK_LOG_PROBS_KEY: [4], TEACHER_TOPK_INDICES_KEY: [5], TEACHER_OUTPUT_WEIGHT_KEY: 6}
    wrap_rollout_data_consumer(log_rollout_data)(7, None, rollout_data=rollout)
    assert set(seen) == {"tokens", TEACHER_TOKEN_LOG_PROBS_KEY}
    assert rollout["correct_entropy"] == [0.5] and rollout["prompt"] == ["view"]
    assert set(without_plugin_keys(rollout)) == {"tokens", TEACHER_TOKEN_LOG_PROBS_KEY, "correct_entropy"}


def test_wrap_then_runs_the_hook_after_the_function():
    calls = []
    wrapped = wrap_then(lambda x, *, y: calls.append(("step", x, y)) or "result", lambda: calls.append("after"))
    assert wrapped(1, y=2) == "result"
    assert calls == [("step", 1, 2), "after"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(compute_advantages_and_returns=False), "--disable-compute-advantages-and-returns"),
        (dict(loss_type="policy_loss"), "--loss-type custom_loss"),
        (dict(allgather_cp=True, context_parallel_size=2), "--allgather-cp"),
        (dict(use_opd=True, opd_type="sglang"), "--opd-type sglang"),
        (dict(use_opd=True, opd_type="megatron", self_distill_teacher="ema", opd_kl_coef=0.0),
         "--self-distill-teacher ema builds the teacher from the student"),
        (dict(use_opd=True, opd_type="megatron", opd_kl_coef=1.0, self_distill_teacher="frozen"), "--opd-kl-coef 0"),
        (dict(self_distill_teacher="frozen"), "frozen needs a checkpoint that stays the same when the run resumes"),
        (dict(self_distill_teacher="ema", use_distributed_optimizer=True, overlap_param_gather=True),
         "would average stale parameters"),
        (dict(self_distill_kl_scope="topk", rollout_max_response_len=None), "needs --rollout-max-response-len"),
        # slime's policy loss is not computed under --self-distill-rl-combination none: its settings would be ignored
        (dict(use_kl_loss=True), r"--use-kl-loss shapes slime's policy loss, which --self-distill-rl-combination none"),
        (dict(entropy_coef=0.01, use_tis=True), "--entropy-coef, --use-tis shape slime's policy loss"),
        (dict(kl_coef=0.1), "--kl-coef shapes"),
        (dict(self_distill_teacher_context="sdpo", n_samples_per_prompt=1, self_distill_feedback="off"),
         "gives no sample a teacher"),
        (dict(self_distill_teacher_context="sdpo", rollout_global_dataset=False), "drop --disable-rollout-global"),
        (dict(self_distill_rl_combination="hybrid", n_samples_per_prompt=1, advantage_estimator="grpo"),
         "every advantage is 0"),
        (dict(rm_type="dapo"), "--rm-type dapo returns a dict .*add --reward-key score"),
        (dict(rm_type="boxed_dapo"), "add --reward-key score"),
        (dict(self_distill_teacher_context="sdpo", prompt_data=None), "give --prompt-data"),
    ],
)
def test_settings_that_would_skip_or_corrupt_the_teacher_pass_are_refused(overrides, match):
    args = make_args(**overrides)
    with pytest.raises(ConfigError, match=match):
        check_args(args, SelfDistillConfig.from_args(args))


@pytest.mark.parametrize(
    "overrides, warned",
    [
        (dict(), True),
        (dict(use_rollout_logprobs=True), False),
        (dict(use_rollout_logprobs=True, get_mismatch_metrics=True), True),
        # the student pass records the routing that training replays, or feeds --log-correct-samples: no advice
        (dict(use_routing_replay=True), False),
        (dict(use_routing_replay=True, use_rollout_routing_replay=True), True),
        (dict(log_correct_samples=True), False),
        # slime's policy loss reads the student's log-probs
        (dict(self_distill_rl_combination="hybrid"), False),
    ],
)
def test_the_unused_student_pass_is_pointed_out_only_when_it_can_be_skipped(overrides, warned):
    args = make_args(**overrides)
    warnings = megatron_hooks.unused_pass_warnings(args, SelfDistillConfig.from_args(args))
    assert bool(warnings) == warned
    assert all("--use-rollout-logprobs" in warning for warning in warnings)


def test_policy_loss_settings_are_accepted_when_the_policy_loss_is_combined():
    for combination in ("hybrid", "additive"):
        args = make_args(use_kl_loss=True, entropy_coef=0.01, self_distill_rl_combination=combination)
        check_args(args, SelfDistillConfig.from_args(args))
    # one response per prompt still gets a teacher from its own success or from feedback
    for overrides in (dict(self_distill_dont_reprompt_on_self_success=False), dict(self_distill_feedback="always")):
        args = make_args(self_distill_teacher_context="sdpo", n_samples_per_prompt=1, **overrides)
        check_args(args, SelfDistillConfig.from_args(args))


def test_frozen_checkpoint_teacher_with_opd_kl_off_is_accepted():
    args = make_args(use_opd=True, opd_type="megatron", opd_kl_coef=0.0, self_distill_teacher="frozen")
    check_args(args, SelfDistillConfig.from_args(args))
    assert megatron_hooks.slime_loads_teacher_checkpoint(args)
    assert not megatron_hooks.slime_loads_teacher_checkpoint(make_args())
    # an EMA refreshed once per rollout reads parameters slime has gathered at the end of training
    args = make_args(self_distill_teacher="ema", self_distill_ema_update_interval="rollout",
                     use_distributed_optimizer=True, overlap_param_gather=True)
    check_args(args, SelfDistillConfig.from_args(args))


# ---------------------------------------------------------------------- slime's real passes on CPU
@pytest.fixture
def slime_cpu(slime_megatron, monkeypatch):
    point_slime_at_cpu(monkeypatch.setattr)
    yield slime_megatron
    megatron_hooks.uninstall()


def log_prob_pass(slime, args, model, rollout, store_prefix):
    """What MegatronTrainRayActor.train_actor does for one pass (its real compute_log_prob)."""
    actor = SimpleNamespace(args=args, model=[model])
    iterators = slime.data.get_data_iterator(rollout)
    return slime.actor.MegatronTrainRayActor.compute_log_prob(
        actor, iterators, rollout["num_microbatches"], store_prefix=store_prefix
    )


def assert_matches_brute_force(model, rollout, outputs, scope, temperature, student_layout=None):
    """Every stored teacher value against a direct float64 computation on the teacher sequence (teacher prompt + the
    student's response): the sampled token's log-prob, the top-K, and the hidden states (and the log-probabilities
    recomputed from them with the stored output-layer shard). ``student_layout(index, values)``: the rows this rank
    holds in the student's context-parallel layout (identity by default); columns are this rank's vocabulary shard.
    The host-kept top-K and hidden states hold only this TP rank's block of those rows (blocks of ceil(rows / TP))."""
    from megatron.core import mpu

    tp_size, tp_rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    shard = model.vocab_size // tp_size
    columns = slice(tp_rank * shard, (tp_rank + 1) * shard)
    cp_layout = student_layout or (lambda index, values: values)

    def layout(index, values):  # the rows this rank keeps in host memory
        rows = cp_layout(index, values)
        block = -(-len(rows) // tp_size)
        return rows[tp_rank * block:(tp_rank + 1) * block]

    for index, view in enumerate(rollout["prompt"]):
        sequence = torch.tensor(view.tokens) if view.has_teacher else rollout["tokens"][index]
        reference, response = brute_force_teacher(model, sequence, view.response_length, temperature)
        token_reference = reference.gather(1, response.unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(outputs[TEACHER_TOKEN_LOG_PROBS_KEY][index].double(),
                                   cp_layout(index, token_reference), rtol=0, atol=2e-5)
        if TEACHER_TOPK_INDICES_KEY in outputs:
            values, indices = reference.sort(dim=-1, descending=True)
            assert outputs[TEACHER_TOPK_INDICES_KEY][index].dtype == torch.int32
            assert torch.equal(outputs[TEACHER_TOPK_INDICES_KEY][index].long(), layout(index, indices[:, :5]))
            torch.testing.assert_close(outputs[TEACHER_TOPK_LOG_PROBS_KEY][index].double(),
                                       layout(index, values[:, :5]), rtol=0, atol=2e-5)
        if TEACHER_HIDDEN_STATES_KEY in outputs:
            hidden = outputs[TEACHER_HIDDEN_STATES_KEY][index]
            rows = slice(len(sequence) - view.response_length - 1, len(sequence) - 1)  # rows predicting the response
            direct = model.sequence_hidden(sequence, torch.float64)[rows]
            assert hidden.device.type == "cpu" and hidden.dtype == model.dtype
            torch.testing.assert_close(hidden.double(), layout(index, direct), rtol=0, atol=1e-5)
            weight = outputs[TEACHER_OUTPUT_WEIGHT_KEY]
            torch.testing.assert_close(weight.double(), model.full_weights()["output"][columns], rtol=0, atol=1e-6)
            # what the loss does: the TP blocks gathered back, the logits recomputed with this rank's weight shard
            tp_group = mpu.get_tensor_model_parallel_group() if tp_size > 1 else None
            every_row = gather_tp_rows(hidden, len(cp_layout(index, direct)), tp_group)
            torch.testing.assert_close(every_row.double(), cp_layout(index, direct), rtol=0, atol=1e-5)
            recomputed = TeacherHiddenStates(every_row, weight, temperature).log_probs(tp_group)
            torch.testing.assert_close(recomputed.double(), cp_layout(index, reference[:, columns]), rtol=0,
                                       atol=2e-5)


@needs_slime
@pytest.mark.parametrize("scope", list(SCOPE_ARGS))
def test_teacher_pass_equals_brute_force_on_the_teacher_sequences(slime_cpu, scope):
    args = make_args(**SCOPE_ARGS[scope])
    megatron_hooks.install(args)
    model, rollout = MegatronTinyGPT(), make_rollout(11)
    outputs = log_prob_pass(slime_cpu, args, model, rollout, "teacher_")
    assert set(outputs) == EXPECTED_KEYS[scope]
    assert_matches_brute_force(model, rollout, outputs, scope, args.rollout_temperature)


@needs_slime
@pytest.mark.parametrize("variant", ["tied", "mtp_head", "bfloat16"])
def test_the_hidden_store_reads_the_main_head_of_the_real_output_layer(slime_cpu, variant):
    """Tied embeddings (the output weight is the embedding's), a multi-token-prediction head (called before the main
    one, ignored) and a bf16 model (hidden states kept in bf16, exactly as the output layer read them)."""
    args = make_args(**SCOPE_ARGS["full_vocab"])
    megatron_hooks.install(args)
    model = MegatronTinyGPT(tied=variant == "tied", mtp_heads=int(variant == "mtp_head"),
                            dtype=torch.bfloat16 if variant == "bfloat16" else torch.float32)
    rollout = make_rollout(12)
    outputs = log_prob_pass(slime_cpu, args, model, rollout, "teacher_")
    if variant == "tied":
        assert model.output_layer.weight is None
        assert torch.equal(outputs[TEACHER_OUTPUT_WEIGHT_KEY], model.embedding.word_embeddings.weight)
    assert outputs[TEACHER_OUTPUT_WEIGHT_KEY].data_ptr() != model.shared_embedding_or_output_weight().data_ptr()
    if variant != "bfloat16":
        assert_matches_brute_force(model, rollout, outputs, "full_vocab", args.rollout_temperature)
        return
    for index, view in enumerate(rollout["prompt"]):  # bit for bit what the output layer read
        sequence = torch.tensor(view.tokens) if view.has_teacher else rollout["tokens"][index]
        rows = slice(len(sequence) - view.response_length - 1, len(sequence) - 1)
        hidden = outputs[TEACHER_HIDDEN_STATES_KEY][index]
        assert hidden.dtype == torch.bfloat16
        torch.testing.assert_close(hidden.double(), model.sequence_hidden(sequence, torch.float64)[rows],
                                   rtol=2e-2, atol=2e-2)


@needs_slime
def test_a_model_without_an_output_layer_is_refused_by_the_hidden_store(slime_cpu):
    args = make_args(**SCOPE_ARGS["full_vocab"])
    megatron_hooks.install(args)
    model = TinyCausalLM()
    with pytest.raises(RuntimeError, match="at the model's output_layer .*this last pipeline stage's model has none: "
                                           "TinyCausalLM; use --self-distill-kl-scope topk"):
        log_prob_pass(slime_cpu, args, model, make_rollout(12), "teacher_")
    assert model.forward_calls == 0  # refused before any forward pass, on every rank


class ScaledLogitsGPT(MegatronTinyGPT):
    """Rescales the logits after its output layer (as MuP output scaling or soft-capping would)."""

    def forward(self, *args, **kwargs):
        return 0.5 * super().forward(*args, **kwargs)


@needs_slime
def test_logits_transformed_after_the_output_layer_are_refused_by_the_hidden_store(slime_cpu):
    args = make_args(**SCOPE_ARGS["full_vocab"])
    megatron_hooks.install(args)
    with pytest.raises(RuntimeError, match=r"not its output layer's product .* MuP output scaling"):
        log_prob_pass(slime_cpu, args, ScaledLogitsGPT(), make_rollout(12), "teacher_")
    # the teacher's own top-K is stored from the logits themselves: no premise to check
    args = make_args(**SCOPE_ARGS["topk"])
    megatron_hooks.install(args)
    assert TEACHER_TOPK_INDICES_KEY in log_prob_pass(slime_cpu, args, ScaledLogitsGPT(), make_rollout(12), "teacher_")


@needs_slime
def test_install_warns_of_an_unused_student_pass_and_knobs_without_effect(slime_cpu, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="slime_self_distill.megatron_hooks"):
        megatron_hooks.install(make_args(self_distill_kl_scope="sampled_token", self_distill_topk=7))
    assert "the self-distillation loss never reads them; pass --use-rollout-logprobs" in caplog.text
    assert "--self-distill-topk has no effect: --self-distill-kl-scope is sampled_token" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slime_self_distill.megatron_hooks"):
        megatron_hooks.install(make_args(self_distill_kl_scope="sampled_token", use_rollout_logprobs=True))
    assert caplog.text == ""
    with caplog.at_level(logging.INFO, logger="slime_self_distill.megatron_hooks"):
        megatron_hooks.install(make_args(self_distill_kl_scope="full_vocab", padded_vocab_size=151936, hidden_size=4096,
                                         bf16=True, tensor_model_parallel_size=2, use_rollout_logprobs=True))
    # 75968 x 4096 x 2 bytes
    assert "a copy of the teacher's output-layer shard on the GPU from every teacher pass to the end of training: " \
           "0.58 GiB" in caplog.text


@needs_slime
def test_student_and_reference_passes_are_untouched(slime_cpu):
    args = make_args(**SCOPE_ARGS["topk"])
    model, rollout = TinyCausalLM(), make_rollout(12)
    before = {prefix: log_prob_pass(slime_cpu, args, model, rollout, prefix) for prefix in ("", "ref_")}
    megatron_hooks.install(args)
    for prefix in ("", "ref_"):
        after = log_prob_pass(slime_cpu, args, model, rollout, prefix)
        assert after.keys() == before[prefix].keys() == {f"{prefix}log_probs"}
        assert all(torch.equal(a, b) for a, b in zip(after[f"{prefix}log_probs"], before[prefix][f"{prefix}log_probs"]))
    teacher = log_prob_pass(slime_cpu, args, model, rollout, "teacher_")
    for index, view in enumerate(rollout["prompt"]):
        same = torch.allclose(teacher[TEACHER_TOKEN_LOG_PROBS_KEY][index], before[""]["log_probs"][index])
        assert same == (not view.has_teacher)  # the teacher prompt changes the log-probs; a placeholder does not


@needs_slime
@pytest.mark.parametrize("scope", ["topk", "full_vocab"])
def test_training_batches_carry_the_teacher_inputs_and_forward_batches_do_not(slime_cpu, scope):
    args = make_args(**SCOPE_ARGS[scope])
    megatron_hooks.install(args)
    model, rollout = MegatronTinyGPT(), make_rollout(13)
    rollout.update(log_prob_pass(slime_cpu, args, model, rollout, "teacher_"))
    per_sample = sorted(EXPECTED_KEYS[scope] - {TEACHER_OUTPUT_WEIGHT_KEY})
    iterator = slime_cpu.data.get_data_iterator(rollout)[0]
    for micro_batch in rollout["micro_batch_indices"]:
        batch = slime_cpu.model.get_batch(iterator, TRAIN_KEYS, args.data_pad_size_multiplier, False)
        assert "prompt" not in batch
        assert batch[LOSS_WEIGHTS_KEY].tolist() == [rollout["prompt"][i].loss_weight for i in micro_batch]
        for key in per_sample:
            assert all(torch.equal(a, rollout[key][i]) for a, i in zip(batch[key], micro_batch, strict=True))
        # the output-layer shard: one tensor for every micro-batch of the rollout, not one per sample
        assert batch[TEACHER_OUTPUT_WEIGHT_KEY] is rollout.get(TEACHER_OUTPUT_WEIGHT_KEY)
    iterator.reset()
    batch = slime_cpu.model.get_batch(iterator, FORWARD_KEYS, args.data_pad_size_multiplier, False)
    assert not {LOSS_WEIGHTS_KEY, TEACHER_OUTPUT_WEIGHT_KEY, "prompt", *per_sample[1:]} & set(batch)


@needs_slime
def test_dynamic_micro_batches_are_split_for_the_longer_teacher_sequences(slime_cpu):
    args = make_args(use_dynamic_batch_size=True, max_tokens_per_gpu=30, **SCOPE_ARGS["full_vocab"])
    megatron_hooks.install(args)
    model, rollout = MegatronTinyGPT(), make_rollout(14, num_samples=6)
    teacher_lengths = build_teacher_rollout_data(rollout)["total_lengths"]
    assert any(sum(teacher_lengths[i] for i in mb) > 30 for mb in rollout["micro_batch_indices"])
    outputs = log_prob_pass(slime_cpu, args, model, rollout, "teacher_")
    assert model.forward_calls > len(rollout["micro_batch_indices"])
    assert_matches_brute_force(model, rollout, outputs, "full_vocab", args.rollout_temperature)


@needs_slime
@pytest.mark.parametrize("scope", ["full_vocab", "topk"])
def test_the_teacher_store_is_what_the_estimate_says(slime_cpu, scope):
    args = make_args(**SCOPE_ARGS[scope])
    megatron_hooks.install(args)
    rollout = make_rollout(15, num_samples=4, full_length_responses=True, max_response_len=9)
    outputs = log_prob_pass(slime_cpu, args, MegatronTinyGPT(), rollout, "teacher_")
    stored = sum(t.nbytes for key in megatron_hooks.HOST_KEYS for t in outputs.get(key, ()))
    config = SelfDistillConfig.from_args(args)
    assert stored == teacher_store_bytes(make_args(rollout_batch_size=4, n_samples_per_prompt=1,
                                                   rollout_max_response_len=9, **SCOPE_ARGS[scope]), config, Parallel())
    assert stored == 4 * 9 * {"full_vocab": 8 * 4, "topk": 5 * 8}[scope]


@needs_slime
def test_host_memory_is_checked_when_slime_creates_the_weights_backuper(slime_cpu, monkeypatch):
    from slime.utils import tensor_backper

    monkeypatch.setattr(tensor_backper, "torch", TorchWithoutPinnedMemory())
    args = make_args(self_distill_host_memory_budget_gb=1.0, rollout_batch_size=64, n_samples_per_prompt=8,
                     rollout_max_response_len=8192, padded_vocab_size=151936, hidden_size=4096, bf16=True)
    megatron_hooks.install(args)  # the launcher checked the store alone; the actors check everything here
    model = TinyCausalLM()
    with pytest.raises(ConfigError) as error:
        tensor_backper.TensorBackuper.create(lambda: model.named_parameters(), None)
    message = str(error.value)
    assert "teacher hidden-state store (full_vocab)" in message and "slime's pinned 'actor' weight backup" in message
    assert "budget 1.0 GiB (--self-distill-host-memory-budget-gb 1.0)" in message
    assert "--self-distill-kl-scope topk" in message


@needs_slime
def test_slimes_metrics_crash_on_plugin_keys_unless_installed(slime_cpu):
    from slime.observability import train_metric_utils

    args = make_args(**SCOPE_ARGS["topk"])
    megatron_hooks.install(args)
    model, rollout = TinyCausalLM(), make_rollout(16)
    rollout.update(log_prob_pass(slime_cpu, args, model, rollout, "teacher_"))
    rollout.update(log_prob_pass(slime_cpu, args, model, rollout, ""))
    rollout["global_batch_sizes"] = [len(rollout["tokens"])]
    metric_args = make_args(log_correct_samples=False, ci_test=False, log_multi_turn=False, log_passrate=False,
                            use_wandb=False, use_tensorboard=False, wandb_always_use_train_step=False)
    train_metric_utils.log_rollout_data(0, metric_args, rollout)  # the installed wrapper
    assert TEACHER_TOPK_INDICES_KEY in rollout and "prompt" in rollout  # still there for training
    megatron_hooks.uninstall()
    with pytest.raises(TypeError):
        train_metric_utils.log_rollout_data(0, metric_args, rollout)


@needs_slime
def test_uninstall_restores_slime_and_install_is_repeatable(slime_cpu):
    from slime.observability import train_data_utils, train_metric_utils
    from slime.utils.tensor_backper import TensorBackuper

    from slime_self_distill.trainer import slime_compat

    def current():
        return (slime_cpu.actor.forward_only, slime_cpu.actor.train, slime_cpu.model.get_batch,
                slime_cpu.model.train_one_step, train_metric_utils.log_rollout_data,
                train_data_utils.save_debug_train_data, TensorBackuper.__dict__["create"],
                slime_cpu.actor.save, slime_cpu.actor.initialize_model_and_optimizer)

    original = current()
    args = make_args(self_distill_teacher="ema", self_distill_kl_scope="sampled_token")
    megatron_hooks.install(args)
    megatron_hooks.install(args)
    patched = current()
    assert all(p is not o for p, o in zip(patched, original))
    assert slime_cpu.actor.forward_only.__wrapped__ is original[0]
    assert slime_cpu.model.train_one_step.__wrapped__ is original[3]
    megatron_hooks.uninstall()
    assert current() == original
    slime_compat.verify()


@needs_slime
def test_a_checkpoint_teacher_is_slimes_and_training_is_left_alone(slime_cpu, monkeypatch):
    from slime.utils import tensor_backper

    monkeypatch.setattr(tensor_backper, "torch", TorchWithoutPinnedMemory())
    megatron_hooks.install(make_args(use_opd=True, opd_type="megatron", opd_kl_coef=0.0, self_distill_teacher="frozen"))
    model = TinyCausalLM()
    backuper = tensor_backper.TensorBackuper.create(lambda: model.named_parameters(), None)
    assert isinstance(backuper, TeacherAwareBackuper) and backuper.backup_tags == []  # slime loads the teacher later
    assert megatron_hooks.current_installation().ema is None
    assert not hasattr(slime_cpu.model.train_one_step, "__wrapped__")
    assert not hasattr(slime_cpu.actor.save, "__wrapped__")


@needs_slime
def test_ema_teacher_is_set_up_with_the_backuper_and_updated_by_the_hooks(slime_cpu, monkeypatch):
    from slime.utils import tensor_backper

    monkeypatch.setattr(tensor_backper, "torch", TorchWithoutPinnedMemory())
    megatron_hooks.install(make_args(self_distill_teacher="ema", self_distill_ema_rate=0.5))
    model = TinyCausalLM()
    backuper = tensor_backper.TensorBackuper.create(lambda: model.named_parameters(), None)  # as slime's init does
    installation = megatron_hooks.current_installation()
    assert installation.ema is not None and "teacher" in backuper.backup_tags
    assert installation.writes_ema_shard and installation.ema_shard == "pp000_tp000_ep000_etp000"
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    installation.after_optimizer_step()
    installation.after_rollout_training()
    for name, param in model.named_parameters():
        torch.testing.assert_close(backuper.get("teacher")[name], initial[name] + 0.5)


# ---------------------------------------------------------------------- TP=2 and CP=2 with two gloo processes
def _parallel_worker(rank, port):
    slime = import_slime_megatron()
    from megatron.core import mpu

    init_gloo(rank, 2, port, slime_group=True)
    point_slime_at_cpu()
    temperature = make_args().rollout_temperature
    for tp_size, cp_size, sequence_parallel in ((2, 1, False), (2, 1, True), (1, 2, False)):
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp_size, context_parallel_size=cp_size)
        for scope, scope_args in SCOPE_ARGS.items():
            args = make_args(tensor_model_parallel_size=tp_size, context_parallel_size=cp_size, **scope_args)
            megatron_hooks.install(args)
            # a 1-token response sits on one CP rank only; the others hold no row of it
            model = MegatronTinyGPT(sequence_parallel=sequence_parallel)
            rollout = make_rollout(21, num_samples=6, response_lengths=(1, 12, 3, 7, 2, 9))
            rollout.update(log_prob_pass(slime, args, model, rollout, "teacher_"))
            rollout.update(log_prob_pass(slime, args, model, rollout, ""))
            assert EXPECTED_KEYS[scope] <= set(rollout)

            def student_layout(index, values):  # the student's CP layout, by slime's own slicing function
                return slime.cp_utils.slice_log_prob_with_cp(
                    values, rollout["total_lengths"][index], rollout["response_lengths"][index])

            for index, got in enumerate(rollout[TEACHER_TOKEN_LOG_PROBS_KEY]):
                assert got.shape == rollout["log_probs"][index].shape  # row for row with the student's logits
            assert_matches_brute_force(model, rollout, rollout, scope, temperature, student_layout)
            if scope in ("full_vocab", "topk"):  # the estimate bounds what this rank keeps (prompts <= 9 tokens)
                stored = sum(t.nbytes for key in megatron_hooks.HOST_KEYS for t in rollout.get(key, ()))
                bound_args = make_args(rollout_batch_size=6, n_samples_per_prompt=1, rollout_max_response_len=12,
                                       rollout_max_prompt_len=9, **scope_args)
                estimate = teacher_store_bytes(bound_args, SelfDistillConfig.from_args(args),
                                               Parallel(tp=tp_size, cp=cp_size))
                assert 0 < stored <= estimate, (scope, stored, estimate)
            iterator = slime.data.get_data_iterator(rollout)[0]
            for micro_batch in rollout["micro_batch_indices"]:
                batch = slime.model.get_batch(iterator, TRAIN_KEYS, args.data_pad_size_multiplier, False)
                for teacher_values, student_values in zip(batch[TEACHER_TOKEN_LOG_PROBS_KEY], batch["log_probs"]):
                    assert teacher_values.shape == student_values.shape
            megatron_hooks.uninstall()
        mpu.destroy_model_parallel()
    destroy_gloo()


@needs_slime
@pytest.mark.distributed
def test_tensor_and_context_parallel_teacher_outputs_equal_brute_force():
    mp.spawn(_parallel_worker, args=(free_port(),), nprocs=2)


# ---------------------------------------------------------------------- DP=2: equal micro-batch counts on every rank
class ExpertParallelLikeLM(TinyCausalLM):
    """Every forward pass joins a collective across the data-parallel ranks, as an MoE layer's all-to-all does under
    expert parallelism: a rank that runs fewer forward passes leaves the other waiting (the gloo timeout fails it)."""

    def forward(self, *args, **kwargs):
        from megatron.core import mpu

        dist.all_reduce(torch.zeros(1), group=mpu.get_data_parallel_group())
        return super().forward(*args, **kwargs)


def skewed_dp_rollout(dp_rank: int, dp_size: int, args, seed: int = 31) -> tuple[dict, list[list[int]]]:
    """This DP rank's rollout_data, partitioned and scheduled by slime's real ``build_dp_schedule`` on the student
    lengths (16 samples, 2 training steps); the samples slime gives rank 0 have teacher prompts 30 tokens longer than
    their student prompts, the others' are as long as theirs. Also returns every rank's micro-batch indices."""
    import random

    from slime.utils.dp_schedule import build_dp_schedule

    rng = random.Random(seed)
    prompts = [[rng.randrange(24) for _ in range(rng.randint(3, 8))] for _ in range(16)]
    responses = [[rng.randrange(24) for _ in range(rng.randint(2, 8))] for _ in range(16)]
    total_lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    partitions, micro_batch_indices, num_microbatches, _ = build_dp_schedule(
        args, {"dp_size": dp_size, "cp_size": 1, "vpp_size": 1, "microbatch_group_size_per_vp_stage": 1},
        total_lengths, global_batch_size=8, rollout_indices=list(range(16)),
    )
    tokens, views = [], []
    for index in partitions[dp_rank]:
        extra = 30 if index in partitions[0] else 0
        teacher_prompt = prompts[index] + [rng.randrange(24) for _ in range(extra)]
        tokens.append(torch.tensor(prompts[index] + responses[index]))
        views.append(TeacherView(tuple(teacher_prompt + responses[index]), len(responses[index]), True, 1.0))
    rollout = {
        "tokens": tokens,
        "response_lengths": [len(responses[i]) for i in partitions[dp_rank]],
        "total_lengths": [len(t) for t in tokens],
        "loss_masks": [torch.ones(len(responses[i]), dtype=torch.int) for i in partitions[dp_rank]],
        "prompt": views,
        "micro_batch_indices": micro_batch_indices[dp_rank],
        "num_microbatches": num_microbatches,
    }
    return rollout, micro_batch_indices


def _data_parallel_worker(rank, port):
    slime = import_slime_megatron()
    from megatron.core import mpu

    from slime_self_distill.core.micro_batches import split_by_tokens

    init_gloo(rank, 2, port, slime_group=True, timeout_seconds=30)
    point_slime_at_cpu()
    mpu.initialize_model_parallel(1, 1)  # two data-parallel ranks
    args = make_args(use_dynamic_batch_size=True, max_tokens_per_gpu=40, balance_data=False, balance_by_flops=False,
                     micro_batch_size=None, **SCOPE_ARGS["topk"])
    megatron_hooks.install(args)
    rollout, _ = skewed_dp_rollout(rank, 2, args)
    # the case the fix is for: split by its own teacher lengths, each rank would run a different number of passes
    own_counts = split_by_tokens(rollout["micro_batch_indices"], rollout["num_microbatches"],
                                 build_teacher_rollout_data(rollout)["total_lengths"], 40)[1]
    gathered_counts = [None, None]
    dist.all_gather_object(gathered_counts, own_counts)
    assert gathered_counts[0] != gathered_counts[1], gathered_counts

    model = ExpertParallelLikeLM()
    outputs = log_prob_pass(slime, args, model, rollout, "teacher_")
    forward_calls = [None, None]
    dist.all_gather_object(forward_calls, model.forward_calls)
    assert forward_calls[0] == forward_calls[1] == sum(max(a, b) for a, b in zip(*gathered_counts))
    assert len(outputs[TEACHER_TOPK_INDICES_KEY]) == len(rollout["tokens"])  # padding samples are not returned
    assert_matches_brute_force(model, rollout, outputs, "topk", args.rollout_temperature)
    megatron_hooks.uninstall()
    mpu.destroy_model_parallel()
    destroy_gloo()


@needs_slime
@pytest.mark.distributed
def test_every_data_parallel_rank_runs_the_same_number_of_teacher_micro_batches():
    mp.spawn(_data_parallel_worker, args=(free_port(),), nprocs=2)


# ---------------------------------------------------------------------- two ranks: EMA shards and the node estimate
def _ema_shard_worker(rank, port, save_dir):
    import os

    import_slime_megatron()
    from megatron.core import mpu
    from slime.utils import tensor_backper

    init_gloo(rank, 2, port, slime_group=True, timeout_seconds=60)
    point_slime_at_cpu()
    tensor_backper.torch = TorchWithoutPinnedMemory()
    for tp_size in (1, 2):  # two data-parallel replicas of one shard, then two tensor-parallel shards
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp_size)
        megatron_hooks.install(make_args(self_distill_teacher="ema", tensor_model_parallel_size=tp_size,
                                         save=os.path.join(save_dir, f"tp{tp_size}")))
        model = TinyCausalLM(seed=rank if tp_size == 2 else 0)
        tensor_backper.TensorBackuper.create(lambda: model.named_parameters(), None)
        installation = megatron_hooks.current_installation()
        nodes = installation.node_report
        assert len(nodes) == 1 and len(nodes[0].ranks) == 2  # both ranks of this machine, summed
        installation.save_ema(3)
        directory = os.path.join(save_dir, f"tp{tp_size}", "self_distill", "ema_teacher", "iter_0000003")
        shards = [None, None]
        dist.all_gather_object(shards, installation.ema_shard)
        assert sorted(os.listdir(directory)) == sorted({f"{shard}.pt" for shard in shards})
        if tp_size == 1:
            assert shards == ["pp000_tp000_ep000_etp000"] * 2 and installation.writes_ema_shard == (rank == 0)
        else:
            assert shards[0] != shards[1] and installation.writes_ema_shard
        megatron_hooks.uninstall()
        mpu.destroy_model_parallel()
    # a write that fails on one rank stops every rank at once, naming it (no rank waits for the timeout)
    mpu.initialize_model_parallel(tensor_model_parallel_size=2)
    megatron_hooks.install(make_args(self_distill_teacher="ema", tensor_model_parallel_size=2,
                                     save=os.path.join(save_dir, "failing")))
    model = TinyCausalLM(seed=rank)
    tensor_backper.TensorBackuper.create(lambda: model.named_parameters(), None)
    if rank == 0:
        megatron_hooks.save_ema_shadow = lambda *args: (_ for _ in ()).throw(OSError("disk full"))
    expected = OSError if rank == 0 else RuntimeError
    with pytest.raises(expected, match="disk full"):
        megatron_hooks.current_installation().save_ema(4)
    megatron_hooks.uninstall()
    mpu.destroy_model_parallel()
    destroy_gloo()


@needs_slime
@pytest.mark.distributed
def test_each_ema_shard_is_written_once_and_host_memory_is_summed_per_node(tmp_path):
    mp.spawn(_ema_shard_worker, args=(free_port(), str(tmp_path)), nprocs=2)
