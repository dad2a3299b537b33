"""Training-side glue: install with ``--custom-megatron-init-path slime_self_distill.megatron_hooks.install``.

slime's Megatron OPD teacher pass (``train_actor``: ``compute_log_prob(..., store_prefix="teacher_")`` whenever the
weights backuper holds a ``"teacher"`` tag) runs the teacher on the student's own tokens. ``install(args)`` replaces a
few module globals that slime looks up at call time, so that, inside every training actor:

* ``actor.forward_only`` with ``store_prefix == "teacher_"`` runs slime's real ``forward_only`` on the teacher
  sequences of the converter's ``TeacherView`` payload (``rollout_data["prompt"]``) instead, and post-processes the
  teacher's logits into the teacher inputs of the loss (``teacher_outputs``), re-laid-out to the student's
  context-parallel layout. Every other pass (student, reference) is passed through untouched.
* ``model.get_batch``, for training batches (the key list that asks for ``teacher_log_probs``), also returns the
  teacher's top-K or final hidden states (moved from host memory to the GPU one micro-batch at a time), the rollout's
  copy of the teacher's output-layer shard and ``self_distill_loss_weights``.
* ``train_metric_utils.log_rollout_data`` and ``train_data_utils.save_debug_train_data`` see the rollout data
  without the plugin's keys (the payload and the large teacher tensors), which slime's rollout metrics cannot
  average. They run after the teacher pass and before/after training on the same dict the training iterator
  reads, so the keys cannot simply be deleted there (nor in ``--rollout-data-postprocess-path``, which stays free).
* ``TensorBackuper.create`` (in ``MegatronTrainRayActor.init``, once the model is loaded and before any weight
  backup exists) checks the host memory of every node (``host_memory``), sets up an EMA teacher, and hands slime a
  ``TeacherAwareBackuper`` (``teacher_weights``): the model never keeps another checkpoint's weights after start-up,
  and a live teacher costs no weight copy. A frozen teacher is slime's own ``--opd-teacher-load`` checkpoint.
* For an EMA teacher: ``model.train_one_step`` / ``actor.train`` update it after each optimizer step / rollout;
  ``actor.save`` writes its shadow beside each slime checkpoint and ``actor.initialize_model_and_optimizer`` records
  which checkpoint slime resumed from, so that the shadow is restored from it.

``slime_compat.verify()`` checks every replaced function first.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from slime_self_distill.config import ConfigError, SelfDistillConfig, flag_name
from slime_self_distill.contexts.groups import rule_based_reward_type
from slime_self_distill.core import host_memory
from slime_self_distill.core.micro_batches import TeacherSchedule, pad_to_counts, split_by_tokens
from slime_self_distill.custom_convert import GROUP_CENTERED_ESTIMATORS
from slime_self_distill.teacher_view import (
    LOSS_WEIGHTS_KEY,
    PAYLOAD_KEY,
    TEACHER_OUTPUT_WEIGHT_KEY,
    TEACHER_TOKEN_LOG_PROBS_KEY,
    TeacherView,
)
from slime_self_distill.trainer import slime_compat
from slime_self_distill.trainer.output_layer import OutputLayerCapture, check_recomputed_logits, describe_chunks
from slime_self_distill.trainer.stored_topk import add_stored_topk
from slime_self_distill.trainer.teacher_outputs import (
    HOST_KEYS,
    TeacherOutputSpec,
    compute_teacher_outputs,
    keep_tp_rows,
    model_dtype_bytes,
    relayout_cp_rows,
)
from slime_self_distill.trainer.teacher_weights import (
    EmaTeacher,
    TeacherAwareBackuper,
    checkpoint_root,
    ema_checkpoint_dir,
    load_ema_shadow,
    save_ema_shadow,
)

logger = logging.getLogger(__name__)

TEACHER_STORE_PREFIX = "teacher_"
# rollout_data keys that only the plugin reads: kept away from slime's metrics and debug dump.
PLUGIN_ONLY_KEYS = (PAYLOAD_KEY, *HOST_KEYS, TEACHER_OUTPUT_WEIGHT_KEY)

_ACTOR = "slime.backends.megatron_utils.actor"
_MODEL = "slime.backends.megatron_utils.model"


# ---------------------------------------------------------------------- start-up checks
def slime_loads_teacher_checkpoint(args: Any) -> bool:
    """slime itself loads ``--opd-teacher-load`` into the ``"teacher"`` tag (``--use-opd --opd-type megatron``)."""
    return bool(getattr(args, "use_opd", False)) and getattr(args, "opd_type", None) == "megatron"


def routing_replay_needs_student_pass(args: Any) -> bool:
    """``--use-routing-replay`` records the expert routing in slime's student log-prob pass, unless the rollout
    records it (``--use-rollout-routing-replay``)."""
    return bool(getattr(args, "use_routing_replay", False)) and not getattr(args, "use_rollout_routing_replay", False)


# slime's rule-based rewards that return a dict (slime_self_distill reads the number under --reward-key).
DICT_REWARDS = ("dapo",)


def check_reward_args(args: Any) -> None:
    """A reward slime returns as a dict needs --reward-key: every reader of the reward (slime's own metrics, the
    plugin's contexts and reward normalization) takes the number under that key."""
    if rule_based_reward_type(args) in DICT_REWARDS and not getattr(args, "custom_rm_path", None) and not getattr(args, "reward_key", None):
        raise ConfigError(
            f"--rm-type {args.rm_type} returns a dict (e.g. {{'score': 1.0, 'acc': True, 'pred': ...}}): add "
            "--reward-key score"
        )


def refuse_allgather_cp(args: Any, what: str) -> None:
    if getattr(args, "allgather_cp", False) and getattr(args, "context_parallel_size", 1) > 1:
        raise ConfigError(
            f"--allgather-cp with --context-parallel-size > 1 is not supported: {what} follow the zigzag "
            "context-parallel layout of slime's default CP; drop --allgather-cp"
        )


def check_args(args: Any, config: SelfDistillConfig) -> None:
    """Refuse slime settings under which the teacher pass would not run, or would run with the wrong teacher."""
    check_reward_args(args)
    if not getattr(args, "compute_advantages_and_returns", True):
        raise ConfigError(
            "--disable-compute-advantages-and-returns skips all of slime's log-prob passes, the teacher pass "
            "included; remove it (the self-distillation loss needs the teacher pass)"
        )
    if getattr(args, "loss_type", None) != "custom_loss":
        raise ConfigError(
            f"--loss-type is {getattr(args, 'loss_type', None)!r}: the teacher outputs are only read by the "
            "self-distillation loss; use --loss-type custom_loss with the plugin's --custom-loss-function-path"
        )
    if config.kl_scope != "sampled_token" and getattr(args, "rollout_max_response_len", None) is None:
        # slime allows it (SGLang then generates up to the context length), but the store cannot be sized.
        raise ConfigError(
            f"{flag_name('kl_scope')} {config.kl_scope} keeps teacher outputs of every response token in host memory "
            "and needs --rollout-max-response-len to bound them; set it (or use the sampled_token scope)"
        )
    if config.teacher == "frozen" and not slime_loads_teacher_checkpoint(args):
        raise ConfigError(
            f"{flag_name('teacher')} frozen needs a checkpoint that stays the same when the run resumes (slime loads "
            "the latest --save checkpoint into the model after a restart, and --release-train recreates the actors "
            "from it every rollout): add --use-opd --opd-type megatron --opd-teacher-load <the initial checkpoint, "
            "e.g. your --ref-load> --opd-kl-coef 0 (python -m slime_self_distill.train fills these in from "
            f"--ref-load), or use {flag_name('teacher')} ema or live"
        )
    if (config.teacher == "ema" and config.ema_update_interval == "step"
            and getattr(args, "use_distributed_optimizer", False) and getattr(args, "overlap_param_gather", False)):
        raise ConfigError(
            f"{flag_name('teacher')} ema updated every optimizer step would average stale parameters with "
            "--use-distributed-optimizer --overlap-param-gather (the updated parameters are all-gathered only during "
            "the next forward pass, so each data-parallel replica's average would drift apart); drop "
            f"--overlap-param-gather, or use {flag_name('ema_update_interval')} rollout (slime gathers the "
            "parameters at the end of each rollout's training)"
        )
    if config.rl_combination == "none":
        ignored = [flag for flag, set_ in (
            ("--use-kl-loss", getattr(args, "use_kl_loss", False)),
            ("--kl-coef", getattr(args, "kl_coef", 0.0) != 0),
            ("--entropy-coef", getattr(args, "entropy_coef", 0.0) != 0),
            ("--use-tis", getattr(args, "use_tis", False)),
            ("--use-opsm", getattr(args, "use_opsm", False)),
            ("--custom-pg-loss-reducer-function-path", getattr(args, "custom_pg_loss_reducer_function_path", None)),
        ) if set_]
        if ignored:
            raise ConfigError(
                f"{', '.join(ignored)} shape{'s' if len(ignored) == 1 else ''} slime's policy loss, which "
                f"{flag_name('rl_combination')} none never computes (the distillation loss replaces it), so slime "
                f"would ignore {'it' if len(ignored) == 1 else 'them'}; drop {'it' if len(ignored) == 1 else 'them'}, "
                f"or add the policy loss with {flag_name('rl_combination')} hybrid or additive"
            )
    if (config.rl_combination != "none" and getattr(args, "n_samples_per_prompt", 2) == 1
            and getattr(args, "advantage_estimator", None) in GROUP_CENTERED_ESTIMATORS
            and getattr(args, "rewards_normalization", True)):
        raise ConfigError(
            f"{flag_name('rl_combination')} {config.rl_combination} adds slime's policy loss, but with "
            f"--advantage-estimator {args.advantage_estimator} and one sample per prompt every advantage is 0 (the "
            "reward minus its group's mean): sample several responses per prompt (--n-samples-per-prompt), or use "
            f"{flag_name('rl_combination')} none"
        )
    if config.builds_sdpo_context and not (getattr(args, "rollout_global_dataset", True)
                                           and getattr(args, "prompt_data", "") is not None):
        raise ConfigError(
            f"{flag_name('teacher_context')} sdpo rewrites the last user message of each sample's prompt, which the "
            "data source knows only for the rows of --prompt-data read by slime's global dataset; give --prompt-data "
            f"and drop --disable-rollout-global-dataset, or build your own context with "
            f"{flag_name('teacher_context_path')}"
        )
    if (config.builds_sdpo_context and getattr(args, "n_samples_per_prompt", 2) == 1
            and config.dont_reprompt_on_self_success and config.feedback == "off"):
        raise ConfigError(
            f"{flag_name('teacher_context')} sdpo with --n-samples-per-prompt 1, "
            f"{flag_name('dont_reprompt_on_self_success')} true and {flag_name('feedback')} off gives no sample a "
            "teacher (a solution comes from another response of the same prompt); sample several responses per "
            "prompt (SDPO uses 8), or use the reward function's feedback"
        )
    if getattr(args, "use_critic", False):
        raise ConfigError(
            "--advantage-estimator ppo trains a critic (a value model), which the plugin does not support: the "
            "critic's actors do not load the teacher; use another --advantage-estimator (e.g. grpo)"
        )
    if getattr(args, "use_rollout_logprobs", False):
        if routing_replay_needs_student_pass(args):
            raise ConfigError(
                "--use-rollout-logprobs skips slime's student log-prob pass, which records the expert routing that "
                "--use-routing-replay replays in training (the first training step would fail); drop "
                "--use-rollout-logprobs or record the routing in the rollout with --use-rollout-routing-replay"
            )
        if getattr(args, "log_correct_samples", False):
            raise ConfigError(
                "--log-correct-samples reads the student log-probs that --use-rollout-logprobs stops slime from "
                "computing (slime would fail in its rollout metrics); drop one of them"
            )
    refuse_allgather_cp(args, "the teacher outputs")
    if config.kl_scope != "sampled_token":
        host_memory.hidden_size_of(args)
    if getattr(args, "use_opd", False):
        if getattr(args, "opd_type", None) != "megatron":
            raise ConfigError(
                f"--use-opd --opd-type {getattr(args, 'opd_type', None)} fetches teacher log-probs on the student's "
                "prompt during rollout; self-distillation runs its own teacher in the trainer. Drop --use-opd, or "
                "use --opd-type megatron --opd-teacher-load <checkpoint> for a frozen teacher checkpoint"
            )
        if config.teacher != "frozen":
            raise ConfigError(
                f"{flag_name('teacher')} {config.teacher} builds the teacher from the student, but --use-opd "
                f"--opd-type megatron would load --opd-teacher-load as the teacher; drop --use-opd, --opd-type and "
                f"--opd-teacher-load, or use {flag_name('teacher')} frozen"
            )
        if getattr(args, "opd_kl_coef", 0.0) != 0:
            raise ConfigError(
                f"--opd-kl-coef is {args.opd_kl_coef}: slime would subtract a reverse-KL penalty computed from the "
                "teacher's log-probs (on the teacher prompt) from the advantages, on top of the distillation loss; "
                "set --opd-kl-coef 0 when --use-opd only loads the frozen teacher checkpoint"
            )


def check_teacher_store(args: Any, config: SelfDistillConfig, dp_size: int) -> None:
    """The launcher's early check, before any actor exists: the teacher store alone (a lower bound of what the
    training ranks keep on the host) against the budget, measured on the launcher's node. The training actors check
    everything they keep, on their own nodes, when they start (``Installation.check_host_memory``)."""
    parallel = host_memory.Parallel(tp=args.tensor_model_parallel_size, cp=args.context_parallel_size, dp=dp_size)
    store = host_memory.teacher_store_bytes(args, config, parallel)
    if not store:
        return
    store_rank = host_memory.RankHostMemory(
        (host_memory.Item(f"{host_memory.store_description(args, config)} ({config.kl_scope})", store,
                          host_memory.WHILE_TRAINING),)
    )
    ranks_per_node = min(args.actor_num_gpus_per_node, dp_size * parallel.tp * parallel.cp)
    node = host_memory.NodeHostMemory(
        "of the launcher", [store_rank] * ranks_per_node, host_memory.available_host_memory_bytes()
    )
    host_memory.check_nodes([node], args, config, parallel)


# ---------------------------------------------------------------------- teacher pass
def build_teacher_rollout_data(rollout_data: dict) -> dict:
    """The teacher's view of this rank's rollout data, for slime's ``DataIterator`` / ``get_batch``.

    Sample i gets ``rollout_data["prompt"][i].tokens`` (teacher prompt + the student's exact response ids) and the
    student's response length and loss mask. A sample without a teacher gets the student's own tokens as a
    placeholder (its outputs are excluded by its loss weight 0).
    """
    views = rollout_data.get(PAYLOAD_KEY)
    tokens = rollout_data["tokens"]
    if views is None:
        raise RuntimeError(
            f"rollout_data has no {PAYLOAD_KEY!r} key: the teacher pass needs one TeacherView per sample, put there by "
            "the self-distillation converter (--custom-convert-samples-to-train-data-path)"
        )
    if len(views) != len(tokens):
        raise ValueError(f"rollout_data[{PAYLOAD_KEY!r}] has {len(views)} entries for {len(tokens)} samples")
    multimodal = rollout_data.get("multimodal_train_inputs")
    if multimodal is not None and any(item is not None for item in multimodal):
        raise ValueError("multimodal samples are not supported by the self-distillation teacher pass")
    teacher_tokens = []
    for index, (view, student_tokens, response_length) in enumerate(
        zip(views, tokens, rollout_data["response_lengths"], strict=True)
    ):
        if not isinstance(view, TeacherView):
            raise TypeError(
                f"rollout_data[{PAYLOAD_KEY!r}][{index}] is a {type(view).__name__}, not a TeacherView: use the "
                "self-distillation converter (--custom-convert-samples-to-train-data-path)"
            )
        if view.response_length != response_length:
            raise ValueError(
                f"sample {index}: TeacherView.response_length {view.response_length} != the student's response length "
                f"{response_length}"
            )
        if not view.has_teacher:
            teacher_tokens.append(student_tokens)
            continue
        sequence = torch.tensor(view.tokens, dtype=torch.long).to(student_tokens.device, non_blocking=True)
        student_response = student_tokens[len(student_tokens) - response_length :]
        if not torch.equal(sequence[len(sequence) - response_length :], student_response):
            raise ValueError(f"sample {index}: the teacher sequence does not end with the student's response token ids")
        teacher_tokens.append(sequence)
    return {
        "tokens": teacher_tokens,
        "total_lengths": [len(t) for t in teacher_tokens],
        "response_lengths": list(rollout_data["response_lengths"]),
        "loss_masks": rollout_data["loss_masks"],
    }


def _group_or_none(get_group: Callable, get_size: Callable):
    return get_group() if get_size() > 1 else None


def run_teacher_pass(
    forward_only: Callable, spec: TeacherOutputSpec, args: Any, model, data_iterator, num_microbatches
) -> dict[str, list[torch.Tensor]]:
    """slime's ``forward_only`` on the teacher sequences; returns ``{teacher_<key>: [per sample]}`` in the student's
    CP layout (teacher_log_probs on the GPU; the top-K or the final hidden states in host memory, the top-K computed
    chunk by chunk: the device never holds a whole sample's distribution) and, with the hidden-state store, the copy
    of the teacher's output-layer shard under ``self_distill_teacher_output_weight``."""
    from megatron.core import mpu
    from slime.backends.megatron_utils.data import DataIterator
    from slime.backends.megatron_utils.loss import get_responses

    rollout_data = data_iterator[0].rollout_data
    teacher_data = build_teacher_rollout_data(rollout_data)
    num_samples = len(teacher_data["tokens"])
    schedule = TeacherSchedule(data_iterator[0].micro_batch_indices, list(num_microbatches), [])
    if args.use_dynamic_batch_size:
        schedule = teacher_schedule(args, schedule, teacher_data["total_lengths"], len(data_iterator) > 1)
        teacher_data = with_padding_samples(teacher_data, schedule.padding_sources)
    teacher_iterators = [DataIterator(teacher_data, schedule.micro_batch_indices) for _ in data_iterator]

    # forward_only hands the post-processor the very token tensors of teacher_data: they identify the sample.
    sample_of_tokens = {id(tokens): index for index, tokens in enumerate(teacher_data["tokens"])}
    student_total_lengths = rollout_data["total_lengths"]
    tp_group = _group_or_none(mpu.get_tensor_model_parallel_group, mpu.get_tensor_model_parallel_world_size)
    cp_group = _group_or_none(mpu.get_context_parallel_group, mpu.get_context_parallel_world_size)
    capture = OutputLayerCapture(model, tp_group) if spec.signal == "hidden" else None
    if capture is not None:
        # every rank, before any forward: a last stage without an output layer would otherwise fail alone, inside
        # the pipeline, leaving the other stages waiting
        last_stage = mpu.is_pipeline_last_stage(ignore_virtual=True)
        _on_every_rank_or_none(lambda: require_logits_module(capture, model) if last_stage else None)

    def teacher_outputs(logits, *, args, unconcat_tokens, total_lengths, response_lengths, with_entropy=False):
        # with_entropy is slime's switch for the student's entropy metric; the teacher's entropy is not needed.
        outputs = {key.removeprefix(TEACHER_STORE_PREFIX): [] for key in spec.output_keys}
        lengths = dict(args=args, unconcat_tokens=unconcat_tokens, total_lengths=total_lengths,
                       response_lengths=response_lengths, apply_temperature=False)  # divided per chunk instead
        responses = get_responses(logits, **lengths)
        hidden_rows = [None] * len(unconcat_tokens)
        if capture is not None:
            hidden = capture.take(logits.size(1))
            # slime's own slicing (it wants float32; the rows go back to the model's dtype exactly)
            hidden_rows = [rows.to(hidden.dtype) for rows, _ in get_responses(hidden.float(), **lengths)]
            responses = list(responses)
            checked = next((i for i, (rows, _) in enumerate(responses) if len(rows)), None)
            if checked is not None:  # the logits are what the loss will recompute
                check_recomputed_logits(hidden_rows[checked], capture.weight, responses[checked][0])
        for (rows, tokens), hidden_states, sequence, total_length, response_length in zip(
            responses, hidden_rows, unconcat_tokens, total_lengths, response_lengths, strict=True
        ):
            index = sample_of_tokens[id(sequence)]
            if index >= num_samples:  # a padding sample: it ran only to keep the ranks' forward counts equal
                for values in outputs.values():
                    values.append(rows.new_empty(0))
                continue
            student_total_length = student_total_lengths[index]
            for key, value in compute_teacher_outputs(rows, tokens, spec, tp_group, hidden_states).items():
                value = relayout_cp_rows(
                    value,
                    response_length=response_length,
                    source_total_length=total_length,
                    target_total_length=student_total_length,
                    cp_group=cp_group,
                    block_rows=spec.chunk_size,
                    device=logits.device,
                )
                if key in HOST_KEYS:  # the same on every TP rank: each keeps its block of the rows
                    value = keep_tp_rows(value, tp_group)
                outputs[key.removeprefix(TEACHER_STORE_PREFIX)].append(value)
        return torch.empty((0,), device=logits.device), outputs

    with capture if capture is not None else contextlib.nullcontext():
        outputs = forward_only(
            teacher_outputs, args, model, teacher_iterators, schedule.num_microbatches,
            store_prefix=TEACHER_STORE_PREFIX, use_rollout_top_p_replay=False,
        )
    result = {key: values[:num_samples] for key, values in outputs.items()}  # padding samples come last
    if capture is not None and capture.weight is not None:  # the last pipeline stage
        result[TEACHER_OUTPUT_WEIGHT_KEY] = capture.weight_copy()
    return result


def require_logits_module(capture: OutputLayerCapture, model) -> None:
    if capture.module is None:
        raise RuntimeError(
            f"the hidden-state teacher store reads the final hidden states at the model's output_layer (megatron-core's "
            f"GPTModel structure), but this last pipeline stage's model has none: {describe_chunks(model)}; use "
            f"{flag_name('kl_scope')} topk {flag_name('topk_support')} teacher or sampled_token, which read the "
            "logits only"
        )


def teacher_schedule(args: Any, student_schedule: TeacherSchedule, teacher_lengths: list[int],
                     virtual_pipeline: bool) -> TeacherSchedule:
    """The teacher pass's micro-batches under ``--use-dynamic-batch-size``: the student's, split so that each holds
    at most ``--max-tokens-per-gpu`` x CP teacher tokens, then brought to the largest per-step count of any rank, so
    that every rank runs as many forward passes as the others (MoE all-to-alls span the data-parallel ranks)."""
    from megatron.core import mpu
    from slime.utils.distributed_utils import get_gloo_group

    cap = args.max_tokens_per_gpu * mpu.get_context_parallel_world_size()
    indices, counts = split_by_tokens(
        student_schedule.micro_batch_indices, student_schedule.num_microbatches, teacher_lengths, cap
    )
    # The maximum over every training rank is the maximum over the data-parallel ranks: tensor-, context- and
    # pipeline-parallel peers hold the same samples and compute the same counts.
    agreed = torch.tensor(counts, dtype=torch.long)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=get_gloo_group())
    agreed_counts = agreed.tolist()
    if agreed_counts != student_schedule.num_microbatches and virtual_pipeline:
        # every rank sees the same agreed counts, so every rank stops here: none is left waiting in a collective
        raise RuntimeError(
            f"teacher sequences exceed --max-tokens-per-gpu {args.max_tokens_per_gpu} in a micro-batch on some rank, "
            "and with virtual pipeline stages the teacher pass cannot split micro-batches; raise --max-tokens-per-gpu "
            "by the longest teacher prompt's extra length"
        )
    return pad_to_counts(indices, counts, teacher_lengths, agreed_counts)


def with_padding_samples(teacher_data: dict, padding_sources: list[int]) -> dict:
    """``teacher_data`` with one more sample per padding source: a copy (a tensor of its own, so that the
    post-processor can tell it from its source) of that sample, appended after the real samples."""
    if not padding_sources:
        return teacher_data
    padded = {key: list(values) for key, values in teacher_data.items()}
    for source in padding_sources:
        padded["tokens"].append(teacher_data["tokens"][source].clone())
        for key in ("total_lengths", "response_lengths", "loss_masks"):
            padded[key].append(teacher_data[key][source])
    return padded


# ---------------------------------------------------------------------- training batches
def add_teacher_inputs(batch: dict) -> dict:
    """Complete a training batch fetched with the plugin's extra keys: move the host-kept teacher tensors to the
    batch's device and add ``self_distill_loss_weights`` [B] float32 (``TeacherView.loss_weight``).

    Samples without a teacher already arrive with an all-zero loss mask (``custom_convert``), which keeps their
    tokens out of slime's token count; slime still counts 1 for each (it clamps every sample's count at 1)."""
    views = batch.pop(PAYLOAD_KEY)
    if views is None:
        raise RuntimeError(
            f"the training batch has no {PAYLOAD_KEY!r} TeacherView payload; the self-distillation converter "
            "(--custom-convert-samples-to-train-data-path) must provide it"
        )
    device = batch["tokens"].device
    for key in HOST_KEYS:
        if batch.get(key) is not None:
            batch[key] = [value.to(device, non_blocking=True) for value in batch[key]]
    batch[LOSS_WEIGHTS_KEY] = torch.tensor([view.loss_weight for view in views], dtype=torch.float32, device=device)
    return batch


def without_plugin_keys(rollout_data: dict) -> dict:
    """A shallow copy of ``rollout_data`` without the keys only the plugin reads."""
    return {key: value for key, value in rollout_data.items() if key not in PLUGIN_ONLY_KEYS}


# ---------------------------------------------------------------------- wrappers
def wrap_forward_only(original: Callable, spec: TeacherOutputSpec) -> Callable:
    @functools.wraps(original)
    def forward_only(f, args, model, data_iterator, num_microbatches, store_prefix="", use_rollout_top_p_replay=False):
        if store_prefix != TEACHER_STORE_PREFIX:
            return original(
                f, args, model, data_iterator, num_microbatches,
                store_prefix=store_prefix, use_rollout_top_p_replay=use_rollout_top_p_replay,
            )
        return run_teacher_pass(original, spec, args, model, data_iterator, num_microbatches)

    return forward_only


def wrap_get_batch(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_batch(data_iterator, keys, pad_multiplier=128, allgather_cp=False):
        if TEACHER_TOKEN_LOG_PROBS_KEY not in keys:  # a forward-only pass: untouched
            return original(data_iterator, keys, pad_multiplier, allgather_cp)
        extra = [key for key in (*HOST_KEYS, PAYLOAD_KEY) if key not in keys]
        batch = original(data_iterator, [*keys, *extra], pad_multiplier, allgather_cp)
        # one tensor per rollout, not per sample: read from the rollout data rather than through the iterator
        batch[TEACHER_OUTPUT_WEIGHT_KEY] = getattr(data_iterator, "rollout_data", {}).get(TEACHER_OUTPUT_WEIGHT_KEY)
        return add_teacher_inputs(batch)

    return get_batch


def wrap_get_batch_offline(original: Callable) -> Callable:
    """Offline top-K distillation: training batches also carry each sample's stored teacher top-K."""
    from slime.backends.megatron_utils.cp_utils import slice_log_prob_with_cp

    @functools.wraps(original)
    def get_batch(data_iterator, keys, pad_multiplier=128, allgather_cp=False):
        if TEACHER_TOKEN_LOG_PROBS_KEY not in keys:
            return original(data_iterator, keys, pad_multiplier, allgather_cp)
        batch = original(data_iterator, [*keys, *([] if PAYLOAD_KEY in keys else [PAYLOAD_KEY])], pad_multiplier,
                         allgather_cp)
        return add_stored_topk(batch, slice_log_prob_with_cp)

    return get_batch


def check_offline_args(args: Any, config: SelfDistillConfig) -> None:
    """Refuse slime settings under which offline top-K distillation would not run as configured."""
    if getattr(args, "loss_type", None) != "custom_loss":
        raise ConfigError(
            f"--loss-type is {getattr(args, 'loss_type', None)!r} with {flag_name('offline_topk_path')}: the stored "
            "teacher is only read by the plugin's loss; use --loss-type custom_loss --custom-loss-function-path "
            "slime_self_distill.custom_loss.self_distill_loss"
        )
    if getattr(args, "n_samples_per_prompt", 1) != 1:
        raise ConfigError(
            f"--n-samples-per-prompt {args.n_samples_per_prompt}: slime's SFT rollout trains each data row once per "
            "rollout (it stops on groups of several samples); drop the flag"
        )
    if getattr(args, "apply_chat_template", False):
        raise ConfigError(
            "--apply-chat-template renders each row's messages into a string before slime's SFT rollout, which "
            "tokenizes the messages itself (as extraction did); drop it"
        )
    refuse_allgather_cp(args, "the stored teacher rows")


def wrap_rollout_data_consumer(original: Callable) -> Callable:
    """For ``log_rollout_data(rollout_id, args, rollout_data)`` and ``save_debug_train_data(args, *, rollout_id,
    rollout_data)``: the same call on ``rollout_data`` without the plugin's keys. Keys the function adds to the
    dict it is given (``log_rollout_data`` adds ``correct_*`` entries) are carried back into ``rollout_data``."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def consumer(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        rollout_data = bound.arguments["rollout_data"]
        visible = bound.arguments["rollout_data"] = without_plugin_keys(rollout_data)
        result = original(*bound.args, **bound.kwargs)
        rollout_data.update(visible)
        return result

    return consumer


def wrap_initialize(original: Callable, installation: "Installation") -> Callable:
    """``initialize_model_and_optimizer(args, role)``, recording what it loaded (the EMA teacher resumes from it)."""

    @functools.wraps(original)
    def initialize_model_and_optimizer(args, role="actor"):
        result = original(args, role)
        installation.record_loaded_checkpoint(args, result[3])
        return result

    return initialize_model_and_optimizer


def wrap_save(original: Callable, installation: "Installation") -> Callable:
    """``save(iteration, model, optimizer, opt_param_scheduler)``: the EMA shadow first, then slime's checkpoint."""

    @functools.wraps(original)
    def save(iteration, model, optimizer, opt_param_scheduler):
        installation.save_ema(iteration)
        return original(iteration, model, optimizer, opt_param_scheduler)

    return save


def wrap_then(original: Callable, after: Callable[[], None]) -> Callable:
    """``original`` followed by ``after()`` (the EMA updates after ``train_one_step`` / ``train``)."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        after()
        return result

    return wrapper


# ---------------------------------------------------------------------- install / uninstall
@dataclass(frozen=True)
class LoadedCheckpoint:
    """What slime's ``initialize_model_and_optimizer`` loaded into the student: ``--load``, the iteration Megatron
    returned, and ``--finetune`` (slime sets it when ``--load`` holds no Megatron checkpoint and it starts from
    ``--ref-load``)."""

    load: Optional[str]
    iteration: int
    finetune: bool

    @property
    def resumes_a_run(self) -> bool:
        """A Megatron checkpoint saved by a run (not a converted "release" one) loaded without --finetune: slime
        continues the run that saved it."""
        if self.finetune or not self.load:
            return False
        tracker = os.path.join(checkpoint_root(self.load), "latest_checkpointed_iteration.txt")
        if not os.path.isfile(tracker):
            return False
        with open(tracker) as handle:
            return handle.read().strip() != "release"  # slime's converter writes "release": a start, not a resume


def model_parallel_shard() -> str:
    """Which part of the model this rank's weights are: ranks with the same name hold the same tensors (data- and
    context-parallel replicas)."""
    from megatron.core import mpu

    return (f"pp{mpu.get_pipeline_model_parallel_rank():03d}_tp{mpu.get_tensor_model_parallel_rank():03d}_"
            f"ep{mpu.get_expert_model_parallel_rank():03d}_etp{mpu.get_expert_tensor_parallel_rank():03d}")


def _all_ranks(value: Any) -> list:
    """``value`` of every training rank, over slime's all-ranks gloo group."""
    from slime.utils.distributed_utils import get_gloo_group

    group = get_gloo_group()
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def _on_every_rank_or_none(work: Callable[[], Any]) -> Any:
    """``work()`` on every training rank; if it fails on any rank, every rank raises, naming the failures (instead of
    the others waiting in their next collective until the timeout). Also a barrier."""
    try:
        result, failure = work(), None
    except Exception as error:  # noqa: BLE001 - reported on every rank below, re-raised here
        result, failure = None, error
    failures = [f for f in _all_ranks(None if failure is None else f"rank {dist.get_rank()}: {failure}") if f]
    if failure is not None:
        raise failure
    if failures:
        raise RuntimeError(f"another training rank failed: {'; '.join(failures)}")
    return result


@dataclass
class Installation:
    args: Any
    config: SelfDistillConfig
    # (owner, attribute, the owner's own value before patching): restored by uninstall().
    replaced: list[tuple[Any, str, Any]] = field(default_factory=list)
    loaded: Optional[LoadedCheckpoint] = None
    backuper: Optional[TeacherAwareBackuper] = None
    ema: Optional[EmaTeacher] = None  # None unless --self-distill-teacher ema, and in processes without a backuper
    ema_shard: str = ""
    writes_ema_shard: bool = False
    node_report: list = field(default_factory=list)  # the host-memory estimate of every node, from start-up

    def replace(self, owner: Any, name: str, make: Callable[[Callable], Any]) -> None:
        own_value = inspect.getattr_static(owner, name)
        self.replaced.append((owner, name, own_value))
        setattr(owner, name, make(getattr(owner, name)))

    # ------------------------------------------------------------------ called from slime's start-up
    def record_loaded_checkpoint(self, args: Any, iteration: int) -> None:
        self.loaded = LoadedCheckpoint(args.load, iteration, bool(getattr(args, "finetune", False)))

    def create_backuper(self, original: Callable, source_getter: Callable, single_tag: Optional[str]):
        """slime's ``TensorBackuper.create`` in ``MegatronTrainRayActor.init``, while the model holds the weights
        slime loaded from ``--load`` and before any weight backup exists: check host memory, set up the teacher,
        hand slime the ``TeacherAwareBackuper``."""
        if single_tag is not None:
            raise RuntimeError(f"a single-tag weights backuper ({single_tag!r}) cannot hold a teacher")
        backuper = original(source_getter, single_tag)
        tensors = list(source_getter())
        self.check_host_memory(tensors)
        if self.config.teacher == "ema":
            self.ema_shard = model_parallel_shard()
            shards = _all_ranks(self.ema_shard)
            self.writes_ema_shard = shards.index(self.ema_shard) == dist.get_rank()  # the first rank of its shard
            shadow = None
            if self.loaded is not None and self.loaded.resumes_a_run:
                directory = ema_checkpoint_dir(self.loaded.load, self.loaded.iteration)
                shadow = _on_every_rank_or_none(lambda: load_ema_shadow(
                    directory, self.ema_shard, {name: tuple(t.shape) for name, t in tensors}))
                logger.info("slime_self_distill: EMA teacher restored from %s", directory)
            self.ema = EmaTeacher(
                backuper=backuper, source_getter=source_getter, ema_rate=self.config.ema_rate,
                ema_update_interval=self.config.ema_update_interval, shadow=shadow,
            )
        self.backuper = TeacherAwareBackuper(backuper, live_teacher=self.config.teacher == "live")
        return self.backuper

    def check_host_memory(self, tensors: list) -> None:
        """Every rank's host-memory estimate, summed per node, against what each node has (``host_memory``)."""
        import socket

        from megatron.core import mpu

        parallel = host_memory.Parallel(
            tp=mpu.get_tensor_model_parallel_world_size(),
            pp=mpu.get_pipeline_model_parallel_world_size(),
            cp=mpu.get_context_parallel_world_size(),
            dp=mpu.get_data_parallel_world_size(with_context_parallel=False),
            expert_dp=mpu.get_expert_data_parallel_world_size(),
            last_pipeline_stage=mpu.is_pipeline_last_stage(ignore_virtual=True),
        )
        infos = [host_memory.TensorInfo(name, t.numel(), t.element_size()) for name, t in tensors]
        estimate = host_memory.rank_host_memory(self.args, self.config, infos, parallel)
        # Every rank reads the available memory before any of them allocates its weight backups: the gather below
        # is the first thing a rank waits in after its own reading.
        self.node_report = host_memory.group_by_node(_all_ranks(
            (socket.gethostname(), estimate, host_memory.available_host_memory_bytes())
        ))
        if dist.get_rank() == 0:
            for node in self.node_report:
                logger.info("slime_self_distill host memory: %s", host_memory.describe_node(node, self.config))
        host_memory.check_nodes(self.node_report, self.args, self.config, parallel)

    # ------------------------------------------------------------------ called from slime's training loop
    def save_ema(self, iteration: int) -> None:
        """Before slime's checkpoint of ``iteration``: this shard of the EMA shadow, beside it. All ranks wait for
        every shard, so that Megatron marks the checkpoint complete only once the EMA is on disk."""
        if self.ema is None:
            return
        directory = ema_checkpoint_dir(self.args.save, iteration)
        _on_every_rank_or_none(
            lambda: save_ema_shadow(self.ema.shadow, directory, self.ema_shard) if self.writes_ema_shard else None)

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.after_optimizer_step()

    def after_rollout_training(self) -> None:
        if self.ema is not None:
            self.ema.after_rollout_training()


_installation: Optional[Installation] = None


def current_installation() -> Optional[Installation]:
    return _installation


def install(args: Any) -> None:
    """``--custom-megatron-init-path`` hook: check the set-up, then patch slime in this training process."""
    import importlib

    from slime.observability import train_data_utils, train_metric_utils
    from slime.utils.tensor_backper import TensorBackuper

    global _installation
    uninstall()
    config = SelfDistillConfig.from_args(args)
    config.check_explicit(SelfDistillConfig.explicit_settings(args))
    slime_version = slime_compat.verify()
    if config.offline:
        return install_offline(args, config, slime_version)
    check_args(args, config)
    spec = TeacherOutputSpec.from_args(args, config)
    explicit = SelfDistillConfig.explicit_settings(args)
    for warning in unused_pass_warnings(args, config) + config.ineffective_settings(explicit):
        logger.warning("slime_self_distill: %s", warning)

    actor = importlib.import_module(_ACTOR)
    model = importlib.import_module(_MODEL)
    installation = Installation(args, config)
    try:
        installation.replace(actor, "forward_only", lambda original: wrap_forward_only(original, spec))
        installation.replace(model, "get_batch", wrap_get_batch)
        installation.replace(train_metric_utils, "log_rollout_data", wrap_rollout_data_consumer)
        installation.replace(train_data_utils, "save_debug_train_data", wrap_rollout_data_consumer)
        installation.replace(
            TensorBackuper, "create",
            lambda original: staticmethod(functools.partial(installation.create_backuper, original)),
        )
        if config.teacher == "ema":
            installation.replace(actor, "initialize_model_and_optimizer",
                                 lambda original: wrap_initialize(original, installation))
            installation.replace(actor, "save", lambda original: wrap_save(original, installation))
            if config.ema_update_interval == "step":
                installation.replace(model, "train_one_step", lambda o: wrap_then(o, installation.after_optimizer_step))
            installation.replace(actor, "train", lambda o: wrap_then(o, installation.after_rollout_training))
    except BaseException:
        _restore(installation)
        raise
    _installation = installation
    teacher = {
        "frozen": f"a frozen teacher (the --opd-teacher-load checkpoint {getattr(args, 'opd_teacher_load', None)})",
        "live": "a live teacher (the student's current weights)",
        "ema": f"an EMA teacher (rate {config.ema_rate} every {config.ema_update_interval}, saved with checkpoints)",
    }[config.teacher]
    patched = ", ".join(f"{getattr(owner, '__name__', owner)}.{name}" for owner, name, _ in installation.replaced)
    logger.info(
        "slime_self_distill hooks installed on slime %s (checked against %s): %s scope, %s; patched %s",
        slime_version, slime_compat.CHECKED_SLIME_COMMIT[:9], config.kl_scope, teacher, patched,
    )
    if spec.signal == "hidden":
        logger.info("slime_self_distill: the teacher is kept as its final hidden states; each last-stage rank also "
                    "holds a copy of the teacher's output-layer shard on the GPU from every teacher pass to the end of "
                    "training: %.2f GiB", output_weight_copy_bytes(args) / host_memory.GIB)


def install_offline(args: Any, config: SelfDistillConfig, slime_version: str) -> None:
    """Offline top-K distillation: no teacher pass and no teacher weights; training batches get the stored top-K."""
    from slime.observability import train_data_utils, train_metric_utils

    global _installation
    check_offline_args(args, config)
    for warning in config.ineffective_settings(SelfDistillConfig.explicit_settings(args)):
        logger.warning("slime_self_distill: %s", warning)
    import importlib

    model = importlib.import_module(_MODEL)
    installation = Installation(args, config)
    try:
        installation.replace(model, "get_batch", wrap_get_batch_offline)
        installation.replace(train_metric_utils, "log_rollout_data", wrap_rollout_data_consumer)
        installation.replace(train_data_utils, "save_debug_train_data", wrap_rollout_data_consumer)
    except BaseException:
        _restore(installation)
        raise
    _installation = installation
    logger.info("slime_self_distill hooks installed on slime %s for offline top-K distillation from %s: SFT "
                "cross-entropy + %s x %s on the stored top-K (%s tail)", slime_version, config.offline_topk_path,
                config.kd_weight, config.divergence, config.topk_tail)


def output_weight_copy_bytes(args: Any) -> int:
    """GPU bytes of the copy of the teacher's output-layer shard: padded vocabulary / TP x hidden size x dtype."""
    vocab = getattr(args, "padded_vocab_size", None) or getattr(args, "vocab_size", None) or 0
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    return -(-vocab // tp) * args.hidden_size * model_dtype_bytes(args)


def unused_pass_warnings(args: Any, config: SelfDistillConfig) -> list[str]:
    """slime passes whose results the self-distillation loss never reads."""
    warnings = []
    if (routing_replay_needs_student_pass(args) or getattr(args, "log_correct_samples", False)
            or config.rl_combination != "none"):  # slime's policy loss reads the student's log-probs
        return warnings  # the pass records the routing, or --log-correct-samples reads it: not to be skipped
    if not getattr(args, "use_rollout_logprobs", False) or getattr(args, "get_mismatch_metrics", False):
        warnings.append(
            "slime recomputes the student's log-probabilities in a forward pass every rollout (about a quarter of "
            "the actor's compute), and the self-distillation loss never reads them; pass --use-rollout-logprobs "
            "(python -m slime_self_distill.train does) and leave --get-mismatch-metrics off to skip that pass"
        )
    return warnings


def _restore(installation: Installation) -> None:
    for owner, name, own_value in reversed(installation.replaced):
        setattr(owner, name, own_value)
    installation.replaced.clear()


def uninstall() -> None:
    """Put every patched slime attribute back (tests; a second ``install`` in the same process)."""
    global _installation
    if _installation is not None:
        _restore(_installation)
        _installation = None
