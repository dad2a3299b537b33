import ast
import copy
import json
import pathlib
import re

import pytest

from slime_self_distill.data.templates import (
    STUDENT_TEMPLATES,
    TEMPLATES,
    TemplateError,
    build_student_prompt,
    build_teacher_prompt,
    load_student_template,
    load_template,
    render_prompt,
    truncate_demonstration_to_fit,
)
from tests.slime_support import needs_slime
from tests.tokenizer_factory import make_tokenizer

# The project's math notes live in ../shared beside the checkout (as in CI).
MATH_DOC = pathlib.Path(__file__).resolve().parents[2] / "shared" / "docs" / "self-distillation-math.md"

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "What is 12 + 30?"},
]


def official_sdft_template() -> str:
    doc = MATH_DOC
    if not doc.is_file():
        pytest.skip(f"{doc} (the SDFT template's source) is not available")
    text = doc.read_text(encoding="utf-8")
    match = re.search(r"Teacher prompt template of the official code:\s*`(\"[^`]*\")`", text)
    assert match, f"{doc} no longer quotes the official template"
    # The doc quotes a Python string literal with \n escapes; decode it as such.
    return ast.literal_eval(match.group(1))


def test_sdft_template_is_the_official_text():
    assert TEMPLATES["sdft"] == official_sdft_template()


def test_every_named_template_uses_both_fields():
    for name, template in TEMPLATES.items():
        assert load_template(name) == template
        filled = template.format(prompt="<<Q>>", demonstration="<<D>>")
        assert "<<Q>>" in filled and "<<D>>" in filled, name
    assert "verified solution" in TEMPLATES["verified_solution"]


# The official OPSD messages (siyan-zhao/OPSD, data_collator.py of the code released 2026-03-18, read at commit
# 7448751 of the louieworth/OPSD fork, lines 37-43 and 67 and 97-103), rebuilt here from their f-strings.
OPSD_TRANSITION = ("\n\nAfter reading the reference solution above, make sure you truly understand "
                   "the reasoning behind each step \u2014 do not copy or paraphrase it. Now, using your "
                   "own words and independent reasoning, derive the same final answer to the problem above. "
                   "Think step by step, explore different approaches, and don't be afraid to backtrack "
                   "or reconsider if something doesn't work out:\n")


def official_opsd_student(problem):
    return f"Problem: {problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def official_opsd_teacher(problem, solution):
    return (f"Problem: {problem}\n\n"
            f"Here is a reference solution to this problem:\n"
            f"=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n"
            f"{OPSD_TRANSITION}\n"
            f"Please reason step by step, and put your final answer within \\boxed{{}}.")


def test_opsd_templates_are_the_official_messages():
    problem, solution = "Find x if 2x = {6}.", "x = 3, since 2 \\cdot 3 = 6."
    assert build_teacher_prompt(problem, solution, load_template("opsd")) == official_opsd_teacher(problem, solution)
    assert build_student_prompt(problem, load_student_template("opsd")) == official_opsd_student(problem)
    assert "\\boxed{}" in STUDENT_TEMPLATES["opsd"].format(prompt="p") and "\u2014" in TEMPLATES["opsd"]


def test_student_templates_use_only_the_prompt():
    assert build_student_prompt("Q", "<{prompt}>") == "<Q>"
    chat = build_student_prompt(CHAT, "<{prompt}>")
    assert chat[-1]["content"] == "<What is 12 + 30?>" and chat[:-1] == CHAT[:-1]
    with pytest.raises(TemplateError, match="field \\{demonstration\\} is not allowed.*only plain \\{prompt\\}"):
        load_student_template("{prompt} {demonstration}")
    with pytest.raises(TemplateError, match="unknown template 'sdft'.*\\['opsd'\\]"):
        load_student_template("sdft")  # a teacher template's name is not a student template


def test_string_prompt_is_formatted():
    assert build_teacher_prompt("Q?", "D.", "[{prompt}|{demonstration}]") == "[Q?|D.]"
    sdft = build_teacher_prompt("What is 2+2?", "4", TEMPLATES["sdft"])
    assert sdft == ("\nWhat is 2+2?\n\nThis is an example for a response to the question:\n4\n\n"
                    "Now answer with a response of your own, including the thinking process.\n")


def test_chat_prompt_changes_only_the_last_user_turn():
    original = copy.deepcopy(CHAT)
    teacher = build_teacher_prompt(CHAT, "42", "{prompt}\nExample: {demonstration}")
    assert CHAT == original  # the input is not modified
    assert teacher[:3] == CHAT[:3]
    assert teacher[3] == {"role": "user", "content": "What is 12 + 30?\nExample: 42"}
    teacher[1]["content"] = "changed"
    assert CHAT[1]["content"] == "first question"  # deep copy: no shared turn dicts


def test_chat_prompt_with_trailing_non_user_turn_formats_the_last_user_turn():
    messages = CHAT + [{"role": "assistant", "content": "partial"}]
    teacher = build_teacher_prompt(messages, "D", "{prompt} / {demonstration}")
    assert teacher[3]["content"] == "What is 12 + 30? / D" and teacher[4] == messages[4]


def test_chat_prompt_errors():
    with pytest.raises(ValueError, match="no 'user' turn"):
        build_teacher_prompt([{"role": "system", "content": "x"}], "d", TEMPLATES["sdft"])
    with pytest.raises(TypeError, match="turn 0.*content"):
        build_teacher_prompt([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "d", TEMPLATES["sdft"])
    with pytest.raises(ValueError, match="turn 1"):
        build_teacher_prompt([{"role": "user", "content": "q"}, "not a dict"], "d", TEMPLATES["sdft"])
    with pytest.raises(TypeError, match="demonstration must be a str"):
        build_teacher_prompt("q", None, TEMPLATES["sdft"])
    with pytest.raises(TypeError, match="prompt must be"):
        build_teacher_prompt(42, "d", TEMPLATES["sdft"])


def test_braces_in_content_survive():
    question = "Evaluate {x} + {y!r} with x = {0} and f'{a:>3}' and a lone { or }"
    demonstration = "Use a dict: {'a': 1} then '{}'.format(2) -> {2}"
    text = build_teacher_prompt(question, demonstration, "Q: {prompt}\nA: {demonstration}")
    assert text == f"Q: {question}\nA: {demonstration}"
    chat = build_teacher_prompt([{"role": "user", "content": question}], demonstration, "{prompt}|{demonstration}")
    assert chat[0]["content"] == question + "|" + demonstration


def test_escaped_braces_in_template_and_repeated_fields():
    assert build_teacher_prompt("q", "d", "{{lit}} {prompt} {demonstration} {prompt}") == "{lit} q d q"


def test_load_template_from_file_and_literal(tmp_path):
    path = tmp_path / "teacher.txt"
    path.write_text("Problem:\n{prompt}\nReference:\n{demonstration}\n", encoding="utf-8")
    assert load_template(str(path)) == path.read_text(encoding="utf-8")  # verbatim, trailing newline kept
    literal = "Q={prompt} D={demonstration}"
    assert load_template(literal) == literal


@pytest.mark.parametrize("spec, message", [
    ("nope", r"unknown template 'nope'.*sdft.*verified_solution"),
    ("/no/such/file.txt", r"unknown template '/no/such/file.txt'"),
    ("only {prompt}", r"never uses \{demonstration\}"),
    ("{prompt} {demonstration} {other}", r"field \{other\} is not allowed"),
    ("{prompt} {demonstration!r}", r"field \{demonstration!r\} is not allowed"),
    ("{prompt:>5} {demonstration}", r"field \{prompt:>5\} is not allowed"),
    ("{prompt} {demonstration} {", r"not a valid format string"),
    ("{prompt} } {demonstration}", r"not a valid format string"),
])
def test_bad_template_specs(spec, message):
    with pytest.raises(TemplateError, match=message):
        load_template(spec)


def test_bad_template_file_is_named(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("{prompt} only", encoding="utf-8")
    with pytest.raises(TemplateError, match=r"template file .*bad.txt.*never uses \{demonstration\}"):
        load_template(str(path))
    with pytest.raises(TemplateError, match="not allowed"):
        build_teacher_prompt("q", "d", "{prompt} {demonstration} {0}")


# ------------------------------------------------------------------------------------------------ render_prompt
def test_render_string_without_chat_template_is_unchanged():
    assert render_prompt("plain {text}", make_tokenizer(), apply_chat_template=False) == "plain {text}"


def test_render_messages_matches_the_tokenizer_chat_template():
    tok = make_tokenizer()
    expected = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert render_prompt(CHAT, tok, apply_chat_template=True) == expected
    assert expected.endswith("<|im_start|>assistant\n")
    thinking_off = render_prompt(CHAT, tok, apply_chat_template=True,
                                 apply_chat_template_kwargs={"enable_thinking": False})
    assert thinking_off == expected + "<think></think>"


def test_render_string_with_chat_template_is_one_user_message():
    tok = make_tokenizer()
    expected = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt("hi", tok, apply_chat_template=True) == expected


def test_render_messages_without_chat_template_is_an_error():
    with pytest.raises(ValueError, match="--apply-chat-template"):
        render_prompt(CHAT, make_tokenizer(), apply_chat_template=False)


def test_student_and_teacher_renderings_share_the_chat_prefix():
    tok = make_tokenizer()
    template = TEMPLATES["sdft"]
    demonstration = "12 + 30 = 42"
    student = render_prompt(CHAT, tok, apply_chat_template=True)
    teacher = render_prompt(build_teacher_prompt(CHAT, demonstration, template), tok, apply_chat_template=True)
    question = CHAT[-1]["content"]
    filled = template.format(prompt=question, demonstration=demonstration)
    # identical up to the last user turn's content, which differs exactly by the template around the question
    prefix = student[: student.index(question)]
    suffix = student[student.index(question) + len(question):]
    assert teacher == prefix + filled + suffix
    assert prefix.count("<|im_start|>") == 4 and suffix == "<|im_end|>\n<|im_start|>assistant\n"


@needs_slime
def test_render_prompt_matches_slime_dataset(tmp_path):
    from slime.utils.data import Dataset

    tok = make_tokenizer()
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "plain {question}"}, {"prompt": CHAT}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    kwargs = {"enable_thinking": False}
    chat = Dataset(str(path), tok, None, None, prompt_key="prompt", apply_chat_template=True,
                   apply_chat_template_kwargs=kwargs)
    for row, sample in zip(rows, chat.origin_samples, strict=True):
        assert render_prompt(row["prompt"], tok, apply_chat_template=True,
                             apply_chat_template_kwargs=kwargs) == sample.prompt
    plain = Dataset(str(path), tok, None, None, prompt_key="prompt")
    assert render_prompt(rows[0]["prompt"], tok, apply_chat_template=False) == plain.origin_samples[0].prompt


# ------------------------------------------------------------------------------------- truncate_demonstration_to_fit
def char_budget_fits(budget):
    def fits(teacher):
        text = teacher if isinstance(teacher, str) else "".join(m["content"] for m in teacher)
        return len(text) <= budget

    return fits


@pytest.mark.parametrize("prompt", ["What is 12 + 30?", CHAT])
def test_truncation_keeps_the_longest_fitting_prefix(prompt):
    template = "Q: {prompt}\nExample: {demonstration}\nNow answer."
    demonstration = "The quick brown fox jumps over the lazy dog. " * 5
    empty_length = len(build_teacher_prompt("What is 12 + 30?", "", template))
    other_turns = 0 if isinstance(prompt, str) else sum(len(m["content"]) for m in CHAT[:-1])
    for extra in (0, 1, 17, len(demonstration) - 1):
        fits = char_budget_fits(other_turns + empty_length + extra)
        teacher, kept = truncate_demonstration_to_fit(prompt, demonstration, template, fits)
        assert kept == extra  # brute force: exactly `extra` characters fit with a character budget
        assert teacher == build_teacher_prompt(prompt, demonstration[:kept], template)
        assert fits(teacher) and not fits(build_teacher_prompt(prompt, demonstration[:kept + 1], template))
        question = teacher if isinstance(teacher, str) else teacher[-1]["content"]
        assert "What is 12 + 30?" in question and question.endswith("Now answer.")


def test_truncation_returns_everything_when_it_fits_and_none_when_nothing_does():
    template = "{prompt} {demonstration}"
    assert truncate_demonstration_to_fit("q", "demo", template, lambda t: True) == ("q demo", 4)
    assert truncate_demonstration_to_fit("q", "demo", template, char_budget_fits(1)) is None  # "q " is 2 chars


def test_truncation_with_a_token_budget_is_maximal():
    tok = make_tokenizer()
    template = TEMPLATES["sdft"]
    question = "How many legs does a spider have?"
    demonstration = "Question: how many legs does a spider have? Answer: eight. " * 6

    def length(teacher):
        return len(tok(render_prompt(teacher, tok, apply_chat_template=True), add_special_tokens=False)["input_ids"])

    without = length(build_teacher_prompt(question, "", template))
    full = length(build_teacher_prompt(question, demonstration, template))
    budget = (without + full) // 2
    teacher, kept = truncate_demonstration_to_fit(question, demonstration, template, lambda t: length(t) <= budget)
    assert 0 < kept < len(demonstration) and length(teacher) <= budget
    assert length(build_teacher_prompt(question, demonstration[:kept + 1], template)) > budget
    assert teacher.startswith("\n" + question + "\n")
