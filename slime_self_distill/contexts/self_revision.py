"""SD-Zero's self-revision teacher (phase 2): the student's own attempt, judged, then the same attempt again.

The official code (princeton-pli/Self-Distillation-Zero, ``self-distillation/nemo_rl/algorithms/distillation.py``,
``_phase2_build_teacher_message_log``) gives the frozen self-revision (SRT) teacher the ids

    student prompt ids  +  response ids  +  ids("\\n\\n" + P_r + "\\n\\n")  +  response ids

where the response ids are the student's exact sampled ids both times (a response that stopped normally ends with
the end-of-turn token in both copies), the delimiter text is tokenized on its own (so no token merges across a
boundary: the ids are concatenated, never re-tokenized), and P_r depends on the response's binary reward: "Let me
rephrase the above solution." when correct, "Wait, this response is wrong. Let me correct it." when wrong. The loss
covers the second copy only: the teacher view's response part, as for every context.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from slime_self_distill.config import SelfDistillConfig
from slime_self_distill.contexts.groups import ContextChoice, GroupContexts, response_ids_of, reward_of


def revision_delimiter(phrase: str) -> str:
    """The text between the two copies of the response."""
    return f"\n\n{phrase}\n\n"


def teacher_prompt_ids(prompt_ids: Sequence[int], response_ids: Sequence[int], delimiter_ids: Sequence[int]) -> tuple:
    """The teacher prompt: the student's prompt ids, its response ids, the delimiter ids (the response follows)."""
    return (*prompt_ids, *response_ids, *delimiter_ids)


def self_revision_contexts(args: Any, samples: Sequence[Any], config: SelfDistillConfig,
                           encode: Callable[[str], Sequence[int]]) -> GroupContexts:
    """Every sample's teacher prompt ids; ``encode(text)`` encodes as slime encodes a prompt (no special tokens).
    The two delimiters are encoded once, the same ids for every sample."""
    delimiters = {correct: tuple(encode(revision_delimiter(phrase))) for correct, phrase in
                  ((True, config.revision_phrase_correct), (False, config.revision_phrase_wrong))}
    choices, n_correct = [], 0
    for sample in samples:
        correct = reward_of(args, sample) >= config.success_threshold
        n_correct += correct
        prompt_ids = sample.tokens[:len(sample.tokens) - sample.response_length]
        choices.append(ContextChoice(
            None, prompt_ids=teacher_prompt_ids(prompt_ids, response_ids_of(sample), delimiters[correct])))
    return GroupContexts(choices, {"revision_correct_fraction": n_correct / len(samples)} if samples else {})


# ----------------------------------------------------------------------------- SD-Zero phase 1 (collection)
def strip_stop_suffix(text: str, suffixes: Sequence[str]) -> str:
    """``text`` without the longest of ``suffixes`` it ends with (a stop string or end-of-turn text the engine kept:
    slime asks SGLang for ``no_stop_trim``), once. The official collection samples with vLLM, which leaves stop
    strings out of the text, so its y_init and y_revised never end with one."""
    for suffix in sorted((s for s in suffixes if s), key=len, reverse=True):
        if text.endswith(suffix):
            return text[:-len(suffix)]
    return text


def revision_continuation(rendered_prompt: str, y_init: str, phrase: str) -> str:
    """SD-Zero phase 1's revision input (self_critique_pipeline.py:212-228): the rendered student prompt, the first
    attempt and the delimiter, one text continuing the assistant turn (tokenized as a whole)."""
    return f"{rendered_prompt}{y_init}{revision_delimiter(phrase)}"
