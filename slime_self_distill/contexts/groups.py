"""Teacher prompts built from the rollout groups after rewards (SDPO, or a user-defined builder), in the converter.

The samples of one group share ``group_index`` (slime's data source gives each prompt's ``n_samples_per_prompt``
samples the same one). Each sample gets a ``ContextChoice``: its teacher prompt (a string or chat messages, to be
rendered and encoded like the student's prompt) or the reason it has none, and, for SDPO, how to shorten the prompt
to a token budget. slime's objects are read through their attributes only, so the functions need no slime import.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from slime_self_distill.config import SelfDistillConfig, flag_name
from slime_self_distill.contexts.sdpo import (
    Attempt,
    SdpoRules,
    group_reprompts,
    is_success,
    reprompt_target_problem,
    rollout_metrics,
)
from slime_self_distill.data.templates import Prompt
from slime_self_distill.data_source import (
    PLUGIN_METADATA_KEY,
    STUDENT_PROMPT_KEY,
    SelfDistillDataError,
    describe_sample,
)

FEEDBACK_KEY = "feedback"  # in a reward dict, or in sample.metadata
REASON_BUILDER_NONE = "builder_returned_none"


@dataclass(frozen=True)
class ContextChoice:
    prompt: Optional[Prompt]  # to render and encode like the student's prompt; None: no teacher (or prompt_ids)
    reason: str = ""  # why there is no teacher
    # fits -> the longest prompt that fits (None if none does); None when the prompt cannot be shortened
    shorten: Optional[Callable[[Callable[[Prompt], bool]], Optional[Prompt]]] = None
    # the teacher prompt as ids already (self_revision: the student's own prompt and response ids), instead of prompt
    prompt_ids: Optional[tuple] = None

    @property
    def has_teacher(self) -> bool:
        return self.prompt is not None or self.prompt_ids is not None


@dataclass
class GroupContexts:
    choices: list  # one ContextChoice per sample, in the samples' order
    metrics: dict  # rollout metrics of the context (SDPO's fractions), without prefix


def group_positions(samples: Sequence[Any]) -> list[list[int]]:
    """Positions of the samples of each group (same ``group_index``), groups in order of first appearance."""
    groups: dict = {}
    for position, sample in enumerate(samples):
        if sample.group_index is None:
            raise SelfDistillDataError(
                f"{describe_sample(sample)} has no group_index; a teacher context built from the rollout group needs "
                "the samples of one prompt to share it (slime's data source sets it; a custom rollout function must "
                "keep it)"
            )
        groups.setdefault(sample.group_index, []).append(position)
    return list(groups.values())


def reward_of(args: Any, sample: Any):
    """slime's reward of a sample (``Sample.get_reward_value``: the ``--reward-key`` entry of a reward dict), checked
    to be a number, unchanged."""
    reward, key = sample.reward, getattr(args, "reward_key", None)
    if key:
        if not isinstance(reward, dict) or key not in reward:
            found = f"a dict without it ({sorted(reward)})" if isinstance(reward, dict) else repr(reward)
            raise SelfDistillDataError(
                f"{describe_sample(sample)}: --reward-key {key!r} names a reward dict entry, but its reward is {found}")
        reward = reward[key]
    elif isinstance(reward, dict):
        raise SelfDistillDataError(
            f"{describe_sample(sample)}: the reward is a dict ({sorted(reward)}); name its value with --reward-key"
        )
    if not isinstance(reward, numbers.Real):
        raise SelfDistillDataError(
            f"{describe_sample(sample)}: reward {reward!r} is not a number (was the sample scored? a reward function "
            "returns a number, or a dict with --reward-key)"
        )
    return reward


def rule_based_reward_type(args: Any, sample: Any = None) -> str:
    """The rule-based reward slime's ``async_rm`` picks: the sample's ``metadata["rm_type"]`` over ``--rm-type``,
    without its ``boxed_`` prefix ("" when none)."""
    metadata = getattr(sample, "metadata", None)
    rm_type = ((metadata.get("rm_type") if isinstance(metadata, dict) else None) or getattr(args, "rm_type", None)
               or "").strip()
    return rm_type.removeprefix("boxed_")


def feedback_of(sample: Any) -> Optional[str]:
    """The reward function's feedback: ``reward["feedback"]`` (a reward dict) or ``sample.metadata["feedback"]``.
    Absent or None is no feedback; any other non-string is an error (it would be silently ignored)."""
    sources = []
    if isinstance(sample.reward, dict):
        sources.append(("reward dict", sample.reward.get(FEEDBACK_KEY)))
    if isinstance(sample.metadata, dict):
        sources.append(("metadata", sample.metadata.get(FEEDBACK_KEY)))
    for where, value in sources:
        if value is None:
            continue
        if not isinstance(value, str):
            raise SelfDistillDataError(
                f"{describe_sample(sample)}: the {where}'s {FEEDBACK_KEY!r} is a {type(value).__name__}; feedback must "
                "be a string (or None for none)"
            )
        return value
    return None


def raw_student_prompt(sample: Any) -> Prompt:
    """The raw student prompt the data source recorded (chat messages, or the string slime fed)."""
    plugin = sample.metadata.get(PLUGIN_METADATA_KEY) if isinstance(sample.metadata, dict) else None
    if not isinstance(plugin, dict) or STUDENT_PROMPT_KEY not in plugin:
        raise SelfDistillDataError(
            f"{describe_sample(sample)} carries no raw student prompt (metadata[{PLUGIN_METADATA_KEY!r}]"
            f"[{STUDENT_PROMPT_KEY!r}]); the samples must come from the plugin's data source "
            "(--data-source-path slime_self_distill.data_source.SelfDistillRolloutDataSource)"
        )
    return plugin[STUDENT_PROMPT_KEY]


def response_ids_of(sample: Any) -> list:
    return list(sample.tokens[len(sample.tokens) - sample.response_length:]) if sample.response_length else []


def sdpo_contexts(args: Any, samples: Sequence[Any], config: SelfDistillConfig,
                  decode: Callable[[list], str]) -> GroupContexts:
    """SDPO's teacher prompt of every sample; ``decode(ids)`` decodes with special tokens skipped."""
    rules = SdpoRules.from_config(config)
    choices: list = [None] * len(samples)
    groups_attempts, groups_reprompts = [], []
    for positions in group_positions(samples):
        rewards = [float(reward_of(args, samples[p])) for p in positions]
        # only a successful response can be a solution: the others are never decoded
        attempts = [Attempt(decode(response_ids_of(samples[p])) if is_success(reward, rules) else "", reward,
                            feedback_of(samples[p]))
                    for p, reward in zip(positions, rewards, strict=True)]
        reprompts = group_reprompts(attempts, rules)
        groups_attempts.append(attempts)
        groups_reprompts.append(reprompts)
        for position, reprompt in zip(positions, reprompts, strict=True):
            if not reprompt.has_teacher:
                choices[position] = ContextChoice(None, reprompt.reason)
                continue
            student = raw_student_prompt(samples[position])
            problem = reprompt_target_problem(student)
            if problem is not None:
                raise SelfDistillDataError(f"{describe_sample(samples[position])}: {problem}")
            choices[position] = ContextChoice(
                reprompt.prompt(student, rules),
                shorten=lambda fits, reprompt=reprompt, student=student: reprompt.shortened_prompt(
                    student, rules, fits),
            )
    return GroupContexts(choices, rollout_metrics(groups_attempts, groups_reprompts, rules))


def builder_contexts(args: Any, samples: Sequence[Any], builder: Callable, path: str) -> GroupContexts:
    """A user-defined builder's teacher prompts: ``builder(args, group)`` per group, one entry per sample."""
    choices: list = [None] * len(samples)
    for positions in group_positions(samples):
        group = [samples[p] for p in positions]
        prompts = builder(args, group)
        if not isinstance(prompts, (list, tuple)) or len(prompts) != len(group):
            got = f"{len(prompts)} entries" if isinstance(prompts, (list, tuple)) else type(prompts).__name__
            raise SelfDistillDataError(
                f"{flag_name('teacher_context_path')} {path} returned {got} for the group of "
                f"{describe_sample(group[0])} with {len(group)} samples; it must return one teacher prompt or None "
                "per sample"
            )
        for position, sample, prompt in zip(positions, group, prompts, strict=True):
            if prompt is None:
                choices[position] = ContextChoice(None, f"{REASON_BUILDER_NONE}: {path} gave this sample no teacher")
            elif (isinstance(prompt, str) and prompt) or (isinstance(prompt, list) and prompt and all(
                    isinstance(m, dict) and "role" in m and "content" in m for m in prompt)):
                choices[position] = ContextChoice(prompt)
            else:
                raise SelfDistillDataError(
                    f"{flag_name('teacher_context_path')} {path} returned {prompt!r} for {describe_sample(sample)}; a "
                    "teacher prompt is a non-empty string or a list of chat messages (dicts with 'role' and "
                    "'content'), or None for no teacher"
                )
    return GroupContexts(choices, {})
