"""slime converter that adds each sample's teacher view to the training data.

Use with ``--custom-convert-samples-to-train-data-path slime_self_distill.custom_convert.convert_samples_to_train_data``
together with ``--data-source-path slime_self_distill.data_source.SelfDistillRolloutDataSource``.

slime calls a custom converter *instead of* its own ``RolloutManager._convert_samples_to_train_data`` and its
reward post-processing, so ``default_train_data`` rebuilds everything the default produces, with the same
meaning (reward group normalization included), and ``build_teacher_views`` adds ``train_data["prompt"]``: one
``TeacherView`` per sample (``prompt`` is the one key slime forwards to the trainer without using it).

A teacher view's tokens are the teacher prompt, encoded as slime encodes the student prompt
(``tokenizer.encode(text, add_special_tokens=False)``), followed by the student's response ids copied from
``sample.tokens`` (never re-tokenized). A sample is left out of the distillation loss (``has_teacher`` False,
``loss_weight`` 0, with the reason) when it has no teacher prompt (``--self-distill-missing-teacher exclude``),
when slime marked it ``remove_sample``, when its response is empty, or when its teacher prompt is over
``--self-distill-max-teacher-prompt-len`` under ``--self-distill-teacher-overflow drop`` (or still over it after
``truncate_demonstration``). The others get ``loss_weight = n_samples / n_with_teacher`` so that the loss averages
over the samples that have a teacher.

Sample status is treated as slime treats it: slime's rollout returns aborted groups to the data source's buffer
before conversion, and any ABORTED/FAILED/TRUNCATED sample that does reach a converter is trained like the others
(only ``truncated`` records TRUNCATED), so each gets its teacher view like any sample.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import string
from collections import Counter
from typing import Any, Callable, Optional, Sequence

from slime_self_distill.config import SelfDistillConfig, flag_name
from slime_self_distill.contexts.groups import (
    ContextChoice,
    GroupContexts,
    builder_contexts,
    reward_of,
    sdpo_contexts,
)
from slime_self_distill.contexts.self_revision import self_revision_contexts
from slime_self_distill.core.token_filters import mask_leading_tokens
from slime_self_distill.data_source import (
    DATA_SOURCE_PATH,
    DEMONSTRATION_KEY,
    MISSING_TEACHER_REASON_KEY,
    PLUGIN_METADATA_KEY,
    TEACHER_PROMPT_TEXT_KEY,
    TEMPLATE_KEY,
    SelfDistillDataError,
    describe_sample,
    load_hf_tokenizer,
    teacher_renderer,
)
from slime_self_distill.teacher_view import PAYLOAD_KEY, TeacherView

logger = logging.getLogger(__name__)

# Advantage estimators whose rewards slime centers per prompt group (--rewards-normalization), and the subset
# it also divides by the group's standard deviation (--grpo-std-normalization).
GROUP_CENTERED_ESTIMATORS = ("grpo", "gspo", "cispo", "reinforce_plus_plus_baseline")
STD_SCALED_ESTIMATORS = ("grpo", "gspo", "cispo")
STD_EPSILON = 1e-6

# Reason prefixes of samples left out of the distillation loss (the text after ':' gives the details).
REASON_REMOVED = "remove_sample"
REASON_EMPTY_RESPONSE = "empty_response"
REASON_OVER_BUDGET = "teacher_prompt_over_budget"
REASON_OVER_BUDGET_AFTER_TRUNCATION = "teacher_prompt_over_budget_after_truncation"

# Prefix of the teacher-context metrics the converter logs into slime's rollout logging (SDPO's names).
CONTEXT_METRICS_PREFIX = "rollout/self_distill/"


# ------------------------------------------------------------------------------------- slime's default fields
def normalize_rewards(
    raw_rewards: Sequence[float],
    *,
    advantage_estimator: str,
    rewards_normalization: bool,
    grpo_std_normalization: bool,
    n_samples_per_prompt: int,
    rollout_batch_size: int,
) -> list:
    """slime's default reward post-processing (``RolloutManager._post_process_rewards``), as a pure function.

    Rewards are centered on their group mean (and, for GRPO-like estimators, divided by the group's unbiased
    standard deviation + 1e-6). As in slime, the groups are the prompts' groups only when the batch holds exactly
    ``rollout_batch_size`` groups of ``n_samples_per_prompt``; any other batch size is treated as ONE group.
    Computed in float32 as slime does. Without normalization the raw rewards are returned.
    """
    import torch

    if not (rewards_normalization and advantage_estimator in GROUP_CENTERED_ESTIMATORS):
        return list(raw_rewards)
    values = torch.tensor(raw_rewards, dtype=torch.float)
    full_groups = values.numel() == n_samples_per_prompt * rollout_batch_size
    groups = values.view(-1, n_samples_per_prompt) if full_groups else values.view(1, -1)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if grpo_std_normalization and advantage_estimator in STD_SCALED_ESTIMATORS:
        centered = centered / (centered.std(dim=1, keepdim=True) + STD_EPSILON)
    return centered.flatten().tolist()


def fill_rollout_ids(rollout_ids: Sequence[Optional[int]]) -> list:
    """Give every ``None`` the smallest id not used yet (in order), as slime does for single-sample rollouts."""
    used = {rid for rid in rollout_ids if rid is not None}
    filled, candidate = [], 0
    for rid in rollout_ids:
        if rid is None:
            while candidate in used:
                candidate += 1
            rid = candidate
            used.add(rid)
        filled.append(rid)
    return filled


def rollout_mask_sums(rollout_ids: Sequence[int], loss_masks: Sequence[Sequence[int]]) -> list:
    """Per sample: the loss-mask total of its whole rollout (the per-rollout loss denominator slime uses)."""
    totals: dict = {}
    for rid, mask in zip(rollout_ids, loss_masks, strict=True):
        totals[rid] = totals.get(rid, 0) + sum(mask)
    return [totals[rid] for rid in rollout_ids]


def loss_mask_of(sample: Any) -> list:
    """slime's loss mask of a sample: all ones when unset, all zeros when slime marked it ``remove_sample``."""
    mask = sample.loss_mask if sample.loss_mask is not None else [1] * sample.response_length
    if len(mask) != sample.response_length:
        raise SelfDistillDataError(
            f"{describe_sample(sample)}: loss_mask has {len(mask)} entries but response_length is "
            f"{sample.response_length}; the rollout function must keep them the same length"
        )
    return [0] * sample.response_length if sample.remove_sample else list(mask)


def _check_top_p_replay(sample: Any) -> None:
    ids, offsets = sample.rollout_top_p_token_ids, sample.rollout_top_p_token_offsets
    if ids is None or offsets is None:
        raise SelfDistillDataError(
            f"{describe_sample(sample)}: --rollout-top-p < 1 needs rollout top-p token ids and offsets"
        )
    if len(offsets) != sample.response_length + 1:
        raise SelfDistillDataError(
            f"{describe_sample(sample)}: {len(offsets)} top-p offsets for a response of {sample.response_length} "
            f"tokens (expected response_length + 1)"
        )
    if int(offsets[-1]) != len(ids):
        raise SelfDistillDataError(
            f"{describe_sample(sample)}: last top-p offset {int(offsets[-1])} != {len(ids)} top-p token ids"
        )


def post_processed_rewards(args: Any, samples: Sequence[Any]) -> tuple:
    """(raw rewards, training rewards): ``--custom-reward-post-process-path`` when set, else slime's default."""
    if getattr(args, "custom_reward_post_process_path", None) is not None:
        from slime.utils.misc import load_function

        return load_function(args.custom_reward_post_process_path)(args, samples)
    raw_rewards = [reward_of(args, sample) for sample in samples]  # slime's get_reward_value, checked
    rewards = normalize_rewards(
        raw_rewards,
        advantage_estimator=args.advantage_estimator,
        rewards_normalization=args.rewards_normalization,
        grpo_std_normalization=args.grpo_std_normalization,
        n_samples_per_prompt=args.n_samples_per_prompt,
        rollout_batch_size=args.rollout_batch_size,
    )
    return raw_rewards, rewards


def default_train_data(args: Any, samples: Sequence[Any]) -> dict:
    """Every key slime's default converter produces, with the same values (slime's ``Sample`` objects)."""
    import torch
    from slime.utils.data import get_source
    from slime.utils.types import Sample

    raw_rewards, rewards = post_processed_rewards(args, samples)
    if len(raw_rewards) != len(samples) or len(rewards) != len(samples):
        raise SelfDistillDataError(
            f"reward post-processing returned {len(raw_rewards)} raw rewards and {len(rewards)} rewards for "
            f"{len(samples)} samples; --custom-reward-post-process-path must return one of each per sample"
        )
    rollout_ids = fill_rollout_ids([sample.rollout_id for sample in samples])
    loss_masks = [loss_mask_of(sample) for sample in samples]
    data = {
        "tokens": [sample.tokens for sample in samples],
        "response_lengths": [sample.response_length for sample in samples],
        "rewards": rewards,
        "raw_reward": raw_rewards,
        "truncated": [int(sample.status == Sample.Status.TRUNCATED) for sample in samples],
        "sample_indices": [sample.index for sample in samples],
        "rollout_ids": rollout_ids,
        "loss_masks": loss_masks,
        "rollout_mask_sums": rollout_mask_sums(rollout_ids, loss_masks),
    }
    # A reward the rollout recorded before shaping wins over the post-processed one, sample by sample.
    if any(sample.metadata and "raw_reward" in sample.metadata for sample in samples):
        data["raw_reward"] = [
            sample.metadata["raw_reward"] if sample.metadata and "raw_reward" in sample.metadata else sample.reward
            for sample in samples
        ]

    # As in slime, the optional per-sample fields are present or absent for the whole batch, decided by the
    # first sample (except multimodal inputs: any sample).
    first = samples[0]
    if first.metadata and "round_number" in first.metadata:
        data["round_number"] = [sample.metadata["round_number"] for sample in samples]
    if first.rollout_log_probs is not None:
        data["rollout_log_probs"] = [sample.rollout_log_probs for sample in samples]
    if getattr(args, "rollout_top_p", 1.0) != 1.0:
        for sample in samples:
            _check_top_p_replay(sample)
        data["rollout_top_p_token_ids"] = [sample.rollout_top_p_token_ids for sample in samples]
        data["rollout_top_p_token_offsets"] = [sample.rollout_top_p_token_offsets for sample in samples]
    if first.rollout_routed_experts is not None:
        routed_experts = [torch.as_tensor(sample.rollout_routed_experts) for sample in samples]
        if getattr(args, "use_rollout_routing_replay", False):
            from slime.observability.rollout_data_utils import validate_rollout_routed_experts_for_replay

            validate_rollout_routed_experts_for_replay(routed_experts, args)
        data["rollout_routed_experts"] = routed_experts
    if first.train_metadata is not None:
        data["metadata"] = [sample.train_metadata for sample in samples]
    if any(sample.multimodal_train_inputs is not None for sample in samples):
        data["multimodal_train_inputs"] = [sample.multimodal_train_inputs for sample in samples]
    if first.teacher_log_probs is not None:
        data["teacher_log_probs"] = [sample.teacher_log_probs for sample in samples]
    if first.metadata is not None:
        data["source_names"] = [get_source(sample) for sample in samples]
    return data


# ------------------------------------------------------------------------------------------- teacher views
def _plugin_metadata(sample: Any) -> dict:
    plugin = (sample.metadata or {}).get(PLUGIN_METADATA_KEY) if isinstance(sample.metadata, dict) else None
    if not isinstance(plugin, dict) or not (TEACHER_PROMPT_TEXT_KEY in plugin or MISSING_TEACHER_REASON_KEY in plugin):
        raise SelfDistillDataError(
            f"{describe_sample(sample)} carries no rendered teacher prompt (metadata[{PLUGIN_METADATA_KEY!r}]"
            f"[{TEACHER_PROMPT_TEXT_KEY!r}]); the samples must come from --data-source-path {DATA_SOURCE_PATH}"
        )
    return plugin


def _template_prompt_value(text: str, template: str, demonstration: str) -> Optional[str]:
    """The ``{prompt}`` value that, with ``demonstration``, formats ``template`` into ``text`` (None if none)."""
    pattern, has_prompt = [], False
    for literal, field, spec, conversion in string.Formatter().parse(template):
        pattern.append(re.escape(literal))
        if field is None:
            continue
        if spec or conversion or field not in ("prompt", "demonstration"):
            return None
        if field == "demonstration":
            pattern.append(re.escape(demonstration))
        else:
            pattern.append("(?P=prompt)" if has_prompt else "(?P<prompt>.*)")
            has_prompt = True
    match = re.fullmatch("".join(pattern), text, flags=re.DOTALL) if has_prompt else None
    return match.group("prompt") if match else None


def student_prompt_of(teacher_prompt: Any, demonstration: str, template: str) -> Optional[Any]:
    """The student prompt that ``build_teacher_prompt(student, demonstration, template)`` turned into
    ``teacher_prompt``, or None when the teacher prompt was not built that way.

    slime's ``Dataset`` keeps only the rendered student prompt, so the raw one (the string, or the messages whose
    last user turn the template formatted) is recovered from the teacher prompt, which the row keeps raw; the
    result is checked by rebuilding the teacher prompt from it.
    """
    from slime_self_distill.data.templates import build_teacher_prompt

    if isinstance(teacher_prompt, str):
        student = _template_prompt_value(teacher_prompt, template, demonstration)
    else:
        user_turns = [i for i, m in enumerate(teacher_prompt) if m.get("role") == "user"]
        content = teacher_prompt[user_turns[-1]]["content"] if user_turns else None
        question = _template_prompt_value(content, template, demonstration) if isinstance(content, str) else None
        student = None
        if question is not None:
            student = [dict(m) for m in teacher_prompt]
            student[user_turns[-1]]["content"] = question
    if student is None or build_teacher_prompt(student, demonstration, template) != teacher_prompt:
        return None
    return student


def _truncated_teacher_ids(
    sample: Any,
    plugin: dict,
    *,
    encode: Callable[[str], Sequence[int]],
    render: Callable[[Any, Any], str],
    config: SelfDistillConfig,
) -> Optional[list]:
    """Teacher prompt ids with the demonstration shortened to fit the budget, or None if nothing fits."""
    from slime_self_distill.data.templates import truncate_demonstration_to_fit

    budget = config.max_teacher_prompt_len
    if not (isinstance(plugin.get(DEMONSTRATION_KEY), str) and isinstance(plugin.get(TEMPLATE_KEY), str)):
        raise SelfDistillDataError(
            f"{describe_sample(sample)}: its teacher prompt is over {flag_name('max_teacher_prompt_len')}={budget} "
            f"and {flag_name('teacher_overflow')} truncate_demonstration needs the demonstration and template in "
            f"metadata[{PLUGIN_METADATA_KEY!r}] (prepare_dataset writes them when it builds the teacher prompt from a "
            f"demonstration); rebuild the dataset that way or use {flag_name('teacher_overflow')} drop"
        )
    demonstration, template = plugin[DEMONSTRATION_KEY], plugin[TEMPLATE_KEY]
    student = student_prompt_of(sample.metadata.get(config.teacher_prompt_key), demonstration, template)
    if student is None:
        raise SelfDistillDataError(
            f"{describe_sample(sample)}: metadata[{config.teacher_prompt_key!r}] is not the template in "
            f"metadata[{PLUGIN_METADATA_KEY!r}][{TEMPLATE_KEY!r}] applied to the prompt and its demonstration, so "
            f"the demonstration cannot be shortened; rebuild the dataset with prepare_dataset or use "
            f"{flag_name('teacher_overflow')} drop"
        )
    tools = sample.metadata.get("tools")

    def ids_of(teacher_prompt: Any) -> Sequence[int]:
        return encode(render(teacher_prompt, tools))

    fitted = truncate_demonstration_to_fit(
        student, demonstration, template, lambda teacher_prompt: len(ids_of(teacher_prompt)) <= budget
    )
    return None if fitted is None else list(ids_of(fitted[0]))


def _check_response_length(sample: Any) -> None:
    if not 0 <= sample.response_length <= len(sample.tokens):
        raise SelfDistillDataError(
            f"{describe_sample(sample)}: response_length {sample.response_length} does not fit in its "
            f"{len(sample.tokens)} tokens"
        )


def _untrainable_reason(sample: Any) -> Optional[str]:
    """Why a sample gets no teacher whatever its teacher prompt (None when it can have one)."""
    if sample.remove_sample:
        return f"{REASON_REMOVED}: slime marked the sample remove_sample (its loss mask is all zero)"
    if sample.response_length == 0:
        return f"{REASON_EMPTY_RESPONSE}: the sample has no response token to distill"
    return None


def _within_budget(sample: Any, prompt_ids: list, config: SelfDistillConfig,
                   shortened_ids: Optional[Callable[[], Optional[list]]], what_is_shortened: str) -> tuple:
    """(ids, None) when ``prompt_ids`` fit ``--self-distill-max-teacher-prompt-len``, else what
    ``--self-distill-teacher-overflow`` says: an error, (None, reason), or ``shortened_ids()`` (None: nothing fits)."""
    budget = config.max_teacher_prompt_len
    if budget is None or len(prompt_ids) <= budget:
        return prompt_ids, None
    over = f"teacher prompt has {len(prompt_ids)} tokens, over {flag_name('max_teacher_prompt_len')}={budget}"
    if config.teacher_overflow == "error":
        truncation = (f" or truncate_demonstration (shorten the {what_is_shortened} to fit)"
                      if shortened_ids is not None else "")
        raise SelfDistillDataError(
            f"{describe_sample(sample)}: {over} (student prompt+response {len(sample.tokens)} tokens). Raise "
            f"{flag_name('max_teacher_prompt_len')}, or set {flag_name('teacher_overflow')} drop (leave such samples "
            f"out of the distillation loss){truncation}"
        )
    if config.teacher_overflow == "drop":
        return None, f"{REASON_OVER_BUDGET}: {over}"
    shortened = shortened_ids()
    if shortened is None:
        return None, f"{REASON_OVER_BUDGET_AFTER_TRUNCATION}: {over}, and still over with no {what_is_shortened} left"
    return shortened, None


def teacher_view_for(
    sample: Any,
    *,
    encode: Callable[[str], Sequence[int]],
    config: SelfDistillConfig,
    render: Optional[Callable[[Any, Any], str]] = None,
) -> tuple:
    """The row's teacher prompt (``static``): (teacher prompt ids, None), or (None, reason it has none)."""
    _check_response_length(sample)
    plugin = _plugin_metadata(sample)
    if MISSING_TEACHER_REASON_KEY in plugin:
        return None, plugin[MISSING_TEACHER_REASON_KEY]
    reason = _untrainable_reason(sample)
    if reason is not None:
        return None, reason
    if config.teacher_overflow == "truncate_demonstration" and render is None:
        raise ValueError("teacher_view_for: truncate_demonstration needs render (the teacher prompt renderer)")
    return _within_budget(
        sample, list(encode(plugin[TEACHER_PROMPT_TEXT_KEY])), config,
        lambda: _truncated_teacher_ids(sample, plugin, encode=encode, render=render, config=config), "demonstration")


def contextual_teacher_ids(
    sample: Any,
    choice: ContextChoice,
    *,
    encode: Callable[[str], Sequence[int]],
    render: Callable[[Any, Any], str],
    config: SelfDistillConfig,
) -> tuple:
    """A teacher prompt built from the rollout group, rendered and encoded like the student's: (ids, None), or
    (None, reason)."""
    _check_response_length(sample)
    if not choice.has_teacher:
        return None, choice.reason
    reason = _untrainable_reason(sample)
    if reason is not None:
        return None, reason
    if choice.prompt_ids is not None:  # nothing in it may be shortened: the student's own prompt and response
        return _within_budget(sample, list(choice.prompt_ids), config, None, "")
    tools = sample.metadata.get("tools") if isinstance(sample.metadata, dict) else None

    def ids_of(prompt: Any) -> list:
        try:
            return list(encode(render(prompt, tools)))
        except (TypeError, ValueError) as error:
            raise SelfDistillDataError(
                f"{describe_sample(sample)}: its teacher prompt does not render ({error})") from None

    def shortened_ids() -> Optional[list]:
        if choice.shorten is None:
            raise SelfDistillDataError(f"{describe_sample(sample)}: this teacher prompt cannot be shortened")
        fitted = choice.shorten(lambda prompt: len(ids_of(prompt)) <= config.max_teacher_prompt_len)
        return None if fitted is None else ids_of(fitted)

    return _within_budget(sample, ids_of(choice.prompt), config, shortened_ids, "solution or feedback")


def build_teacher_views(
    samples: Sequence[Any],
    *,
    encode: Callable[[str], Sequence[int]],
    config: SelfDistillConfig,
    render: Optional[Callable[[Any, Any], str]] = None,
) -> list:
    """One ``TeacherView`` per sample from the rows' teacher prompts (``static``); see ``teacher_views``.

    ``samples`` need ``tokens``, ``response_length``, ``metadata``, ``remove_sample`` (and ``index``,
    ``group_index``, ``prompt`` for messages); ``encode(text)`` is the teacher prompt tokenizer call; ``render``
    (needed by ``truncate_demonstration`` only) renders a teacher prompt like slime's Dataset.
    """
    return teacher_views(samples, [teacher_view_for(s, encode=encode, config=config, render=render) for s in samples])


def teacher_views(samples: Sequence[Any], decisions: Sequence[tuple]) -> list:
    """One ``TeacherView`` per sample from its (teacher prompt ids or None, reason); loss weights
    ``n_samples / n_with_teacher`` over the whole call (the per-sample mean over the samples with a teacher)."""
    n_with_teacher = sum(ids is not None for ids, _ in decisions)
    weight = len(samples) / n_with_teacher if n_with_teacher else 0.0
    views = []
    for sample, (prompt_ids, reason) in zip(samples, decisions, strict=True):
        length = sample.response_length
        if prompt_ids is None:
            views.append(
                TeacherView(tokens=(), response_length=length, has_teacher=False, loss_weight=0.0, reason=reason)
            )
        else:
            response_ids = list(sample.tokens[len(sample.tokens) - length:])
            views.append(
                TeacherView(
                    tokens=tuple(prompt_ids + response_ids),
                    response_length=length,
                    has_teacher=True,
                    loss_weight=weight,
                )
            )
    _log_exclusions(views)
    return views


def _log_exclusions(views: Sequence[TeacherView]) -> None:
    excluded = Counter(v.reason.split(":", 1)[0] for v in views if not v.has_teacher)
    if not excluded:
        return
    summary = ", ".join(f"{reason}={count}" for reason, count in sorted(excluded.items()))
    if sum(excluded.values()) == len(views):
        logger.warning(
            "self-distillation: none of the %d samples has a teacher (%s); this rollout adds no distillation loss",
            len(views), summary,
        )
    else:
        logger.info(
            "self-distillation: %d of %d samples left out of the loss (%s)", sum(excluded.values()), len(views), summary
        )


# ------------------------------------------------------------------------------------------------ entry point
def convert_samples_to_train_data(args: Any, samples: list) -> dict:
    """slime's ``--custom-convert-samples-to-train-data-path`` hook: default train data + ``prompt`` teacher views (or,
    for offline top-K distillation, each sample's stored teacher top-K)."""
    if not samples:
        raise SelfDistillDataError(
            "convert_samples_to_train_data got no samples; the rollout produced nothing to train on"
        )
    config = SelfDistillConfig.from_args(args)
    data = default_train_data(args, samples)
    if config.offline:  # SFT samples: the payload is each one's stored teacher top-K
        from slime_self_distill.offline.rollout import stored_topk_payload

        data[PAYLOAD_KEY] = stored_topk_payload(args, samples, config)
        return data
    if getattr(args, "use_rollout_logprobs", False) and "rollout_log_probs" not in data:
        raise SelfDistillDataError(
            f"--use-rollout-logprobs (filled in by the launcher to skip slime's unused student log-prob pass) needs "
            f"the rollout engine's log-probabilities, but {describe_sample(samples[0])} has no rollout_log_probs; "
            "make the rollout function return them (slime's SGLang rollout does), or drop --use-rollout-logprobs"
        )
    views, contexts_metrics = sample_teacher_views(args, samples, config, load_hf_tokenizer(args.hf_checkpoint))
    if contexts_metrics is not None:
        log_context_metrics(args, contexts_metrics, views)
    return with_teacher_views(data, views, config, bool(getattr(args, "calculate_per_token_loss", False)))


def with_teacher_views(data: dict, views: list, config: SelfDistillConfig, calculate_per_token_loss: bool) -> dict:
    """Train data with the teacher views as payload, the loss masks restricted (``restrict_loss_masks``) and, with
    ``--calculate-per-token-loss``, the per-token loss weights. Shared by the converter and the single-process
    trainer."""
    data[PAYLOAD_KEY] = views
    data = restrict_loss_masks(data, config.num_loss_tokens_to_skip,
                               keep_masks_without_teacher=config.rl_combination != "none")
    if calculate_per_token_loss:
        data[PAYLOAD_KEY] = with_per_token_loss_weights(data[PAYLOAD_KEY], data["loss_masks"])
    return data


def sample_teacher_views(args: Any, samples: Sequence[Any], config: SelfDistillConfig,
                         tokenizer: Any) -> tuple[list, Optional[dict]]:
    """One ``TeacherView`` per sample (the row's teacher prompt, or the context built after rewards), and the
    context's rollout metrics (None for a row's own teacher prompt). ``args`` needs slime's chat-template flags
    (``apply_chat_template``, ``apply_chat_template_kwargs``) and, for contexts built after rewards, its reward
    flags; ``tokenizer`` encodes as slime encodes a prompt. Shared by the converter and the single-process trainer."""

    @functools.lru_cache(maxsize=None)  # the samples of a group share their teacher prompt: encode it once
    def encode(text: str) -> tuple:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    render = teacher_renderer(tokenizer, config, apply_chat_template=bool(args.apply_chat_template),
                              apply_chat_template_kwargs=args.apply_chat_template_kwargs)
    if config.teacher_prompt_from_row:
        truncates = config.teacher_overflow == "truncate_demonstration"
        return build_teacher_views(samples, encode=encode, config=config, render=render if truncates else None), None
    contexts = built_contexts(args, samples, config, encode=encode,
                              decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    views = teacher_views(samples, [
        contextual_teacher_ids(sample, choice, encode=encode, render=render, config=config)
        for sample, choice in zip(samples, contexts.choices, strict=True)])
    return views, contexts.metrics


def built_contexts(args: Any, samples: Sequence[Any], config: SelfDistillConfig, *,
                   encode: Callable[[str], Sequence[int]], decode: Callable[[list], str]) -> GroupContexts:
    """The teacher prompts built after rewards: SDPO's (from the groups), SD-Zero's self-revision, or the
    user-defined builder's."""
    if config.builds_self_revision_context:
        return self_revision_contexts(args, samples, config, encode)
    if config.teacher_context_path is None:
        return sdpo_contexts(args, samples, config, decode)
    from slime.utils.misc import load_function

    return builder_contexts(args, samples, load_function(config.teacher_context_path), config.teacher_context_path)


def context_metrics(contexts_metrics: dict, views: Sequence[TeacherView]) -> dict:
    """The rollout's metrics of a context built after rewards, as logged: the context's own (SDPO's fractions), the
    fraction of samples in the distillation loss, and the teacher prompts' token lengths."""
    prompt_lengths = [view.prompt_length for view in views if view.has_teacher]
    metrics = dict(contexts_metrics)
    metrics["distilled_sample_fraction"] = len(prompt_lengths) / len(views)
    if prompt_lengths:
        metrics |= {"teacher_prompt_len_mean": sum(prompt_lengths) / len(prompt_lengths),
                    "teacher_prompt_len_max": max(prompt_lengths), "teacher_prompt_len_min": min(prompt_lengths)}
    return {f"{CONTEXT_METRICS_PREFIX}{name}": value for name, value in metrics.items()}


def log_context_metrics(args: Any, contexts_metrics: dict, views: Sequence[TeacherView]) -> None:
    """Log ``context_metrics`` into slime's rollout logging (wandb / tensorboard, at the rollout's step) and the log.

    slime logs a rollout before converting it, so the converter logs its own entry at the same step: slime's
    ``logging_utils.log`` with ``rollout/step``, read from slime's current rollout id."""
    metrics = context_metrics(contexts_metrics, views)
    logger.info("self-distillation teacher context: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if getattr(args, "load_debug_rollout_data", None):  # slime logs no rollout metrics then either
        return
    from slime.observability import logging_utils
    from slime.observability.metric_utils import compute_rollout_step
    from slime.rollout import sample_hooks

    rollout_id = sample_hooks._current_rollout_id  # set by RolloutManager.generate before the rollout
    if rollout_id is None:
        return
    logging_utils.log(args, {**metrics, "rollout/step": compute_rollout_step(args, rollout_id)},
                      step_key="rollout/step")


def with_per_token_loss_weights(views: Sequence[TeacherView], loss_masks: Sequence[Sequence[int]]) -> list:
    """Views whose ``loss_weight`` makes slime's per-token mean (``--calculate-per-token-loss``) a mean over the
    loss tokens of the samples with a teacher: slime divides by every sample's token count (at least 1 per sample,
    its clamp), so each distilled token is weighted by that count over the distilled samples' token count (over the
    rollout: exact when a rollout is one training step)."""
    token_counts = [int(sum(mask)) for mask in loss_masks]
    slime_count = sum(max(count, 1) for count in token_counts)
    distilled = sum(count for count, view in zip(token_counts, views, strict=True) if view.has_teacher)
    weight = slime_count / distilled if distilled else 1.0
    return [dataclasses.replace(view, loss_weight=weight) if view.has_teacher else view for view in views]


def restrict_loss_masks(data: dict, num_loss_tokens_to_skip: int, keep_masks_without_teacher: bool = False) -> dict:
    """Zero the loss mask of every sample without a teacher (unless ``keep_masks_without_teacher``: slime's policy
    loss still trains them) and of the first ``num_loss_tokens_to_skip`` tokens of every sample
    (``--self-distill-num-loss-tokens-to-skip``); recompute ``rollout_mask_sums``.

    The loss already gives samples without a teacher weight 0; zeroing their masks also takes their tokens out of
    slime's denominators (the token count of ``--calculate-per-token-loss`` and the per-rollout mask sums). The
    skipped tokens leave the numerator and every denominator, as in the official SDFT code.
    """
    views = data[PAYLOAD_KEY]
    data["loss_masks"] = [
        mask_leading_tokens(mask, num_loss_tokens_to_skip) if view.has_teacher or keep_masks_without_teacher
        else [0] * len(mask)
        for mask, view in zip(data["loss_masks"], views, strict=True)
    ]
    data["rollout_mask_sums"] = rollout_mask_sums(data["rollout_ids"], data["loss_masks"])
    return data
