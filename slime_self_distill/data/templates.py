"""Teacher prompt templates, and rendering of prompts exactly as slime's ``Dataset`` renders them.

A template is a ``str.format`` string with the fields ``{prompt}`` (the student's question) and
``{demonstration}`` (the expert answer the teacher may read). Only the template is parsed as a format string: the
values are inserted verbatim, so braces inside a question or a demonstration survive unchanged.
"""

from __future__ import annotations

import copy
import os
import string
from typing import Any, Callable, Optional, Union

Prompt = Union[str, list]

TEMPLATE_FIELDS = ("prompt", "demonstration")

TEMPLATES: dict[str, str] = {
    # The official SDFT code's teacher prompt (idanshen/Self-Distillation), character for character.
    "sdft": (
        "\n{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
        "Now answer with a response of your own, including the thinking process.\n"
    ),
    # A teacher conditioned on a verified solution of the same problem (a generic wording).
    "verified_solution": (
        "{prompt}\n\nHere is a verified solution to this problem:\n{demonstration}\n\n"
        "Now that you have seen a verified solution, solve the problem yourself, step by step.\n"
    ),
    # The official OPSD code's teacher message (siyan-zhao/OPSD data_collator.py, code of 2026-03-18), character for
    # character; {prompt} is the problem, {demonstration} the reference solution. Pair it with the student template
    # "opsd".
    "opsd": (
        "Problem: {prompt}\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin ===\n"
        "{demonstration}\n=== Reference Solution End ===\n\n\nAfter reading the reference solution above, make sure "
        "you truly understand the reasoning behind each step \u2014 do not copy or paraphrase it. Now, using your own "
        "words and independent reasoning, derive the same final answer to the problem above. Think step by step, "
        "explore different approaches, and don't be afraid to backtrack or reconsider if something doesn't work "
        "out:\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    ),
}

# Student prompt templates (``prepare_dataset --student-template``): only ``{prompt}``.
STUDENT_TEMPLATES: dict[str, str] = {
    # The official OPSD code's student message, character for character.
    "opsd": "Problem: {prompt}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
}


class TemplateError(ValueError):
    """A template spec that is not a known name, a readable file or a valid format string."""


def check_template(template: str, *, origin: str = "template", fields: tuple = TEMPLATE_FIELDS,
                   optional: tuple = ()) -> str:
    """Return ``template`` if it is a format string whose only fields are plain ``fields`` (by default ``{prompt}``
    and ``{demonstration}``), each used at least once, or ``optional`` ones; raise TemplateError naming ``origin``
    otherwise."""
    if not isinstance(template, str):
        raise TemplateError(f"{origin}: a template must be a str, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # unbalanced '{' or '}'
        raise TemplateError(
            f"{origin}: not a valid format string ({e}); write literal braces as '{{{{' and '}}}}'"
        ) from None
    used = set()
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in (*fields, *optional) or spec or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            allowed = " and ".join(f"{{{f}}}" for f in (*fields, *optional))
            raise TemplateError(
                f"{origin}: field {shown} is not allowed; a template may use only plain {allowed} (write literal "
                "braces as '{{{{' and '}}}}')"
            )
        used.add(field)
    missing = [f"{{{f}}}" for f in fields if f not in used]
    if missing:
        raise TemplateError(f"{origin}: the template never uses {' and '.join(missing)}")
    return template


def load_template(spec: str, *, named: Optional[dict] = None, fields: tuple = TEMPLATE_FIELDS) -> str:
    """The template named by ``spec``: a name in ``named`` (default TEMPLATES), a path to a file holding a format
    string (read verbatim, trailing newline included), or a literal format string using exactly ``fields``.
    A spec with a brace that is neither a name nor a file is checked as a format string, to name its fault."""
    named = TEMPLATES if named is None else named
    if spec in named:
        return named[spec]
    if isinstance(spec, str) and os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return check_template(f.read(), origin=f"template file {spec!r}", fields=fields)
    if isinstance(spec, str) and "{" in spec:  # meant as a literal format string: say what is wrong with it
        return check_template(spec, origin=f"template {spec!r}", fields=fields)
    uses = " and ".join(f"{{{f}}}" for f in fields)
    raise TemplateError(
        f"unknown template {spec!r}: expected one of the names {sorted(named)}, the path of an existing file "
        f"holding a format string, or a literal format string containing {uses}"
    )


def load_student_template(spec: str) -> str:
    """A student prompt template: a name in STUDENT_TEMPLATES, a file, or a format string using only {prompt}."""
    return load_template(spec, named=STUDENT_TEMPLATES, fields=("prompt",))


def _last_user_turn(messages: list) -> int:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(
                f"chat prompt turn {i} is {message!r}; every turn must be a dict with 'role' and 'content'"
            )
    user_turns = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not user_turns:
        raise ValueError("chat prompt has no 'user' turn to put the demonstration into")
    return user_turns[-1]


def fill_last_user_turn(prompt: Prompt, fill: Callable[[str], str], what: str) -> Prompt:
    """A string prompt gives ``fill(prompt)``; chat messages give a deep copy whose LAST user turn's content is
    ``fill(content)``, every other turn unchanged."""
    if isinstance(prompt, str):
        return fill(prompt)
    if not isinstance(prompt, list):
        raise TypeError(f"prompt must be a str or a list of chat messages, got {type(prompt).__name__}")
    turn = _last_user_turn(prompt)
    content = prompt[turn]["content"]
    if not isinstance(content, str):
        raise TypeError(
            f"the last user turn (turn {turn}) has {type(content).__name__} content; the {what} template needs "
            f"text content (str)"
        )
    filled = copy.deepcopy(prompt)
    filled[turn]["content"] = fill(content)
    return filled


def build_teacher_prompt(prompt: Prompt, demonstration: str, template: str) -> Prompt:
    """The teacher's prompt: ``template`` filled with the question and the demonstration.

    A string prompt gives a string. Chat messages give a deep copy in which only the LAST user turn's content is
    replaced by the filled template (its ``{prompt}`` is that turn's content); every other turn is unchanged.
    """
    check_template(template)
    if not isinstance(demonstration, str):
        raise TypeError(f"demonstration must be a str, got {type(demonstration).__name__}")
    return fill_last_user_turn(
        prompt, lambda question: template.format(prompt=question, demonstration=demonstration), "teacher")


def build_student_prompt(prompt: Prompt, template: str) -> Prompt:
    """The student's prompt: ``template`` (fields: ``{prompt}`` only) around the question, in the last user turn of
    chat messages; the teacher template still gets the bare question."""
    check_template(template, fields=("prompt",))
    return fill_last_user_turn(prompt, lambda question: template.format(prompt=question), "student")


def render_prompt(
    prompt: Prompt,
    tokenizer: Any,
    *,
    apply_chat_template: bool,
    apply_chat_template_kwargs: Optional[dict] = None,
    tools: Any = None,
) -> str:
    """The text slime's ``Dataset`` makes of ``prompt`` (slime/utils/data.py).

    With ``apply_chat_template``, a string becomes one user message (as slime's ``_build_messages`` does) and the
    messages go through ``tokenizer.apply_chat_template(..., tokenize=False, add_generation_prompt=True)``.
    Without it, a string is returned unchanged; chat messages are an error (slime would pass the list on as the
    prompt, which its rollout cannot tokenize).
    """
    if not isinstance(prompt, (str, list)):
        raise TypeError(f"prompt must be a str or a list of chat messages, got {type(prompt).__name__}")
    if not apply_chat_template:
        if isinstance(prompt, list):
            raise ValueError(
                "the prompt is a list of chat messages but apply_chat_template is off; pass --apply-chat-template "
                "(slime renders chat messages only with its chat template)"
            )
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(
        messages,
        tools=tools,
        tokenize=False,
        add_generation_prompt=True,
        **(apply_chat_template_kwargs or {}),
    )


def longest_fitting_prefix(length: int, fits_at: Callable[[int], bool]) -> Optional[int]:
    """The largest ``kept`` in ``[0, length]`` found by binary search with ``fits_at(kept)`` true, or None when even
    ``fits_at(0)`` is false (O(log length) calls).

    Maximal in the sense that ``fits_at`` holds at ``kept`` and fails at ``kept + 1``; with a tokenizer-based
    ``fits_at`` token counts are almost, not strictly, monotone in the prefix length, so a longer prefix further on
    could in principle fit again.
    """
    if fits_at(length):
        return length
    if not fits_at(0):
        return None
    fitting, too_long = 0, length  # invariant: fits_at(fitting) and not fits_at(too_long)
    while too_long - fitting > 1:
        middle = (fitting + too_long) // 2
        if fits_at(middle):
            fitting = middle
        else:
            too_long = middle
    return fitting


def truncate_demonstration_to_fit(
    prompt: Prompt,
    demonstration: str,
    template: str,
    fits: Callable[[Prompt], bool],
) -> Optional[tuple[Prompt, int]]:
    """``(teacher_prompt, kept_chars)`` for the longest prefix of ``demonstration`` whose teacher prompt ``fits``
    (``longest_fitting_prefix``); None when even an empty demonstration does not fit. The question is never
    shortened."""

    def teacher_with(kept: int) -> Prompt:
        return build_teacher_prompt(prompt, demonstration[:kept], template)

    kept = longest_fitting_prefix(len(demonstration), lambda chars: fits(teacher_with(chars)))
    return None if kept is None else (teacher_with(kept), kept)
