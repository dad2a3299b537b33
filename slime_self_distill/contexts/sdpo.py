"""SDPO's teacher context: the reprompt built from a rollout group after rewards (pure: no slime, no tokenizer).

The rules of the official code (lasgroup/SDPO, ``verl/trainer/ppo/ray_trainer.py``:
``_collect_solutions_by_uid``, ``_get_solution``, ``_collect_feedback``, ``_maybe_build_self_distillation_batch``):

* a response is successful when its sequence reward is >= the success threshold;
* its solution is the first successful response of its group, or, with ``dont_reprompt_on_self_success``, the first
  successful response other than itself; with ``remove_thinking`` every ``<think>...</think>`` block and the
  whitespace after it is removed from the solution;
* its feedback is the reward function's feedback when that is a non-empty string (after stripping; the text used
  is not stripped), used ``always`` or only ``without_solution``;
* with a solution or used feedback, the teacher's last user message is
  ``reprompt_template.format(prompt=<the student's last user message>, solution=<solution section or "">,
  feedback=<feedback section or "">)``, the sections being ``solution_template`` / ``feedback_template`` filled with
  the raw texts; without either the response has no teacher.

Over a token budget, only the solution (first) and then the feedback are shortened, never the question or the
template's own text (the official code cuts the rendered prompt's tail instead, instruction included): the longest
solution prefix that fits with the whole feedback; if none does, the longest feedback prefix without the solution;
if none does, no teacher.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from slime_self_distill.data.templates import Prompt, fill_last_user_turn, longest_fitting_prefix

THINKING_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)

REASON_NO_SOLUTION_NOR_FEEDBACK = "no_solution_nor_feedback"


def remove_thinking(text: str) -> str:
    """``text`` without its ``<think>...</think>`` blocks and the whitespace after each."""
    return THINKING_BLOCK.sub("", text)


@dataclass(frozen=True)
class Attempt:
    """One response of a group, as SDPO's rules read it."""

    response_text: str  # the response ids decoded with special tokens skipped
    reward: float  # the sequence reward
    feedback: Optional[str]  # the reward function's feedback string, None when it gave none


@dataclass(frozen=True)
class SdpoRules:
    success_threshold: float
    dont_reprompt_on_self_success: bool
    remove_thinking: bool
    feedback: str  # "off" | "without_solution" | "always"
    reprompt_template: str
    solution_template: str
    feedback_template: str

    @classmethod
    def from_config(cls, config) -> "SdpoRules":
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Reprompt:
    """What one response's teacher reads besides the question (None: absent)."""

    solution: Optional[str]
    feedback: Optional[str]  # the feedback used (None when absent or not used)
    feedback_available: bool  # the reward function gave feedback and the rules read it (feedback not off)

    @property
    def has_teacher(self) -> bool:
        return self.solution is not None or self.feedback is not None

    @property
    def reason(self) -> str:
        """Why there is no teacher ("" when there is one)."""
        if self.has_teacher:
            return ""
        # (feedback that is available is used whenever there is no solution, so there is none here)
        return f"{REASON_NO_SOLUTION_NOR_FEEDBACK}: no successful response of the group to read and no feedback"

    def text(self, question: str, rules: SdpoRules) -> str:
        """The reprompt around ``question``."""
        solution_section = feedback_section = ""
        if self.solution is not None:
            solution_section = rules.solution_template.format(successful_previous_attempt=self.solution)
        if self.feedback is not None:
            feedback_section = rules.feedback_template.format(feedback_raw=self.feedback)
        return rules.reprompt_template.format(prompt=question, solution=solution_section, feedback=feedback_section)

    def prompt(self, student_prompt: Prompt, rules: SdpoRules) -> Prompt:
        """The teacher's prompt: the student's, its last user message replaced by the reprompt (a string prompt is
        that message); every other message kept."""
        if not self.has_teacher:
            raise ValueError("a response without a solution or used feedback has no teacher prompt")
        return fill_last_user_turn(student_prompt, lambda question: self.text(question, rules), "SDPO reprompt")

    def shortened_prompt(self, student_prompt: Prompt, rules: SdpoRules,
                         fits: Callable[[Prompt], bool]) -> Optional[Prompt]:
        """The teacher prompt with the longest non-empty solution prefix that ``fits`` with the whole feedback;
        failing that, without the solution, with the longest non-empty feedback prefix; None when neither fits (an
        empty solution or feedback would leave the teacher a heading with nothing under it)."""
        if self.solution:
            def with_solution(chars: int) -> Prompt:
                return dataclasses.replace(self, solution=self.solution[:chars]).prompt(student_prompt, rules)

            kept = longest_fitting_prefix(len(self.solution), lambda chars: fits(with_solution(chars)))
            if kept:
                return with_solution(kept)
        if self.feedback:
            def with_feedback(chars: int) -> Prompt:
                return dataclasses.replace(self, solution=None, feedback=self.feedback[:chars]).prompt(
                    student_prompt, rules)

            kept = longest_fitting_prefix(len(self.feedback), lambda chars: fits(with_feedback(chars)))
            if kept:
                return with_feedback(kept)
        return None


def reprompt_target_problem(prompt: Prompt) -> Optional[str]:
    """Why the reprompt cannot replace ``prompt``'s last message (None when it can): chat messages must end with a user
    message of text content (the official code replaces the last message whatever its role; TRL refuses another
    role, as here: a prompt ending in, e.g., an assistant prefill would lose it)."""
    if isinstance(prompt, str):
        return None
    if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
        return f"the prompt is {type(prompt).__name__}, expected a string or a non-empty list of chat messages"
    last = prompt[-1]
    if last.get("role") != "user":
        return (f"its last message has role {last.get('role')!r}; the SDPO reprompt replaces a last user message "
                "(end the prompt with the user's turn)")
    if not isinstance(last.get("content"), str):
        return (f"its last user message has {type(last.get('content')).__name__} content; the SDPO reprompt needs "
                "text content")
    return None


def is_success(reward: float, rules: SdpoRules) -> bool:
    return reward >= rules.success_threshold


def usable_feedback(feedback: Optional[str]) -> Optional[str]:
    """The feedback as the official code keeps it: a string that is not blank, unchanged; anything else None."""
    return feedback if isinstance(feedback, str) and feedback.strip() else None


def group_reprompts(attempts: Sequence[Attempt], rules: SdpoRules) -> list[Reprompt]:
    """One ``Reprompt`` per attempt of one group (the responses to the same prompt), in order."""
    successes = [j for j, attempt in enumerate(attempts) if is_success(attempt.reward, rules)]
    reprompts = []
    for i, attempt in enumerate(attempts):
        sources = [j for j in successes if j != i] if rules.dont_reprompt_on_self_success else successes
        solution = None
        if sources:
            solution = attempts[sources[0]].response_text
            if rules.remove_thinking:
                solution = remove_thinking(solution)
        available = rules.feedback != "off" and usable_feedback(attempt.feedback) is not None
        used = available and (rules.feedback == "always" or solution is None)
        reprompts.append(Reprompt(solution, attempt.feedback if used else None, available))
    return reprompts


def rollout_metrics(groups: Sequence[Sequence[Attempt]], reprompts: Sequence[Sequence[Reprompt]],
                    rules: SdpoRules) -> dict:
    """The official per-rollout metrics (``self_distillation/*``): the fraction of groups with a successful
    response; of samples with a solution (``success_sample_fraction``: a solution, not a success of their own), with
    feedback available, with feedback used, and with a reprompt (a teacher)."""
    flat = [r for group in reprompts for r in group]
    n = len(flat)
    if not n:
        return {}
    return {
        "success_group_fraction":
            sum(any(is_success(a.reward, rules) for a in group) for group in groups) / len(groups),
        "success_sample_fraction": sum(r.solution is not None for r in flat) / n,
        "feedback_available_fraction": sum(r.feedback_available for r in flat) / n,
        "feedback_used_fraction": sum(r.feedback is not None for r in flat) / n,
        "reprompt_sample_fraction": sum(r.has_teacher for r in flat) / n,
    }
