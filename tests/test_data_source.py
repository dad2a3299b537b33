"""The data source: every sample gets the exact text its teacher reads, through slime's real data source."""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace

import pytest

from slime_self_distill.config import SelfDistillConfig
from slime_self_distill.data_source import (
    MISSING_TEACHER_REASON_KEY,
    PLUGIN_METADATA_KEY,
    TEACHER_PROMPT_TEXT_KEY,
    SelfDistillDataError,
    annotate_teacher_prompt,
    teacher_prompt_problem,
)
from tests.slime_support import needs_slime
from tests.tokenizer_factory import make_tokenizer, save_tokenizer


def recording_render(calls):
    def render(prompt, tools):
        calls.append((prompt, tools))
        return f"RENDERED<{json.dumps(prompt)}|{json.dumps(tools)}>"

    return render


# ------------------------------------------------------------------------------------------------ pure logic
def test_module_imports_without_slime():
    code = (
        "import sys; sys.modules['slime'] = None\n"  # any 'import slime...' now fails
        "import slime_self_distill.data_source as d, slime_self_distill.custom_convert\n"
        "try:\n    d.SelfDistillRolloutDataSource\nexcept ImportError:\n    print('lazy')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "lazy"


@pytest.mark.parametrize("teacher,apply_chat_template,problem", [
    (None, True, "no teacher prompt"),
    ("", False, "empty teacher prompt"),
    ([], True, "empty teacher prompt"),
    (42, True, "type int"),
    ({"role": "user"}, True, "type dict"),
    ([{"role": "user", "content": "q"}], False, "--apply-chat-template is off"),
    ([{"content": "q"}], True, "'role' and 'content'"),
    ("q", True, None),
    ("q", False, None),
    ([{"role": "user", "content": "q"}], True, None),
])
def test_teacher_prompt_problem(teacher, apply_chat_template, problem):
    got = teacher_prompt_problem(teacher, apply_chat_template=apply_chat_template)
    assert (got is None) if problem is None else (problem in got)


def test_annotation_renders_the_teacher_prompt_with_the_rows_tools_and_keeps_other_entries():
    calls = []
    teacher = [{"role": "user", "content": "teacher question"}]
    tools = [{"type": "function", "function": {"name": "add"}}]
    metadata = {"teacher_prompt": teacher, "tools": tools,
                PLUGIN_METADATA_KEY: {"demonstration": "d", "template": "{prompt} {demonstration}"}}
    for _ in range(2):  # a sample pushed back to the buffer is annotated again, with the same result
        annotate_teacher_prompt(metadata, config=SelfDistillConfig(), apply_chat_template=True,
                                render=recording_render(calls), sample_description="sample index=0")
    assert calls == [(teacher, tools)] * 2
    assert metadata[PLUGIN_METADATA_KEY] == {
        "demonstration": "d", "template": "{prompt} {demonstration}",
        TEACHER_PROMPT_TEXT_KEY: f"RENDERED<{json.dumps(teacher)}|{json.dumps(tools)}>",
    }
    assert metadata["teacher_prompt"] == teacher


def test_custom_teacher_prompt_key():
    metadata = {"hint_prompt": "with a hint"}
    annotate_teacher_prompt(metadata, config=SelfDistillConfig(teacher_prompt_key="hint_prompt"),
                            apply_chat_template=False, render=lambda p, t: p, sample_description="s")
    assert metadata[PLUGIN_METADATA_KEY][TEACHER_PROMPT_TEXT_KEY] == "with a hint"


@pytest.mark.parametrize("metadata", [{}, {"teacher_prompt": ""}, {"teacher_prompt": 3}])
def test_missing_teacher_error_names_the_sample_and_the_fixes(metadata):
    with pytest.raises(SelfDistillDataError) as err:
        annotate_teacher_prompt(metadata, config=SelfDistillConfig(), apply_chat_template=False,
                                render=lambda p, t: p, sample_description="sample index=4 group_index=2 prompt='abc'")
    message = str(err.value)
    assert "sample index=4 group_index=2 prompt='abc'" in message and "'teacher_prompt'" in message
    assert "prepare_dataset" in message and "--self-distill-missing-teacher exclude" in message


def test_missing_teacher_exclude_records_the_reason_and_replaces_a_stale_text():
    metadata = {PLUGIN_METADATA_KEY: {TEACHER_PROMPT_TEXT_KEY: "stale"}}
    annotate_teacher_prompt(metadata, config=SelfDistillConfig(missing_teacher="exclude"), apply_chat_template=False,
                            render=lambda p, t: p, sample_description="s")
    plugin = metadata[PLUGIN_METADATA_KEY]
    assert TEACHER_PROMPT_TEXT_KEY not in plugin
    assert plugin[MISSING_TEACHER_REASON_KEY].startswith("missing_teacher: no teacher prompt")


@pytest.mark.parametrize("metadata,match", [("not a dict", "metadata is str"),
                                            ({PLUGIN_METADATA_KEY: "x", "teacher_prompt": "t"}, "expected a dict")])
def test_malformed_metadata_is_an_error(metadata, match):
    with pytest.raises(SelfDistillDataError, match=match):
        annotate_teacher_prompt(metadata, config=SelfDistillConfig(), apply_chat_template=False,
                                render=lambda p, t: p, sample_description="s")


# ------------------------------------------------------------------------------------ slime's real data source
ROWS = [
    {"prompt": f"what is {i} + 30", "label": str(i + 30),
     "metadata": {"teacher_prompt": f"what is {i} + 30? A verified solution: {i} + 30 = {i + 30}.", "row": i}}
    for i in range(7)
]


def write_rows(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def data_source_args(tmp_path, rows=ROWS, **overrides):
    values = dict(
        rollout_global_dataset=True, prompt_data=write_rows(tmp_path / "rows.jsonl", rows),
        hf_checkpoint=save_tokenizer(tmp_path / "tok"), dump_details=None, rollout_max_prompt_len=None,
        input_key="prompt", multimodal_keys=None, label_key="label", metadata_key="metadata", tool_key=None,
        apply_chat_template=True, apply_chat_template_kwargs={"enable_thinking": False}, rollout_seed=3,
        rollout_shuffle=True, n_samples_per_prompt=2, buffer_filter_path=None,
        save=str(tmp_path / "ckpt"), load=None,
    )
    values.update(overrides)
    return Namespace(**values)


def self_distill_data_source(args):
    from slime_self_distill.data_source import SelfDistillRolloutDataSource

    return SelfDistillRolloutDataSource(args)


def expected_teacher_text(teacher_prompt, args):
    messages = [{"role": "user", "content": teacher_prompt}] if args.apply_chat_template else None
    if messages is None:
        return teacher_prompt
    return make_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                **(args.apply_chat_template_kwargs or {}))


def rows_of(groups):
    return [[s.metadata["row"] for s in g] for g in groups]


@needs_slime
@pytest.mark.parametrize("apply_chat_template", [True, False])
def test_samples_keep_the_student_prompt_and_carry_the_rendered_teacher_prompt(tmp_path, apply_chat_template):
    from slime.rollout.data_source import RolloutDataSourceWithBuffer

    args = data_source_args(tmp_path, apply_chat_template=apply_chat_template)
    source = self_distill_data_source(args)
    ours = source.get_samples(5)
    plain = RolloutDataSourceWithBuffer(args).get_samples(5)
    assert len(ours) == 5 and all(len(g) == 2 for g in ours)
    for group, plain_group in zip(ours, plain):
        for sample, plain_sample in zip(group, plain_group):
            assert sample.prompt == plain_sample.prompt  # the student prompt is slime's, untouched
            assert (sample.index, sample.group_index) == (plain_sample.index, plain_sample.group_index)
            text = sample.metadata[PLUGIN_METADATA_KEY][TEACHER_PROMPT_TEXT_KEY]
            assert text == expected_teacher_text(sample.metadata["teacher_prompt"], args)
            if apply_chat_template:
                assert "<think></think>" in text  # --apply-chat-template-kwargs reach the teacher too
    # samples are deep copies: annotating them leaves the dataset's rows alone
    assert all(PLUGIN_METADATA_KEY not in row.metadata for row in source.dataset.origin_samples)


@needs_slime
def test_the_teacher_can_read_with_its_own_chat_template_arguments(tmp_path):
    """OPSD: the student rolls out without thinking, the teacher reads its prompt in thinking mode."""
    args = data_source_args(tmp_path, self_distill_teacher_chat_template_kwargs={"enable_thinking": True})
    for group in self_distill_data_source(args).get_samples(2):
        for sample in group:
            assert "<think></think>" in sample.prompt  # slime's student prompt: --apply-chat-template-kwargs
            text = sample.metadata[PLUGIN_METADATA_KEY][TEACHER_PROMPT_TEXT_KEY]
            assert "<think></think>" not in text
            assert text == make_tokenizer().apply_chat_template(
                [{"role": "user", "content": sample.metadata["teacher_prompt"]}], tokenize=False,
                add_generation_prompt=True, enable_thinking=True)


@needs_slime
def test_save_and_load_continue_with_the_same_rows(tmp_path):
    args = data_source_args(tmp_path)
    first = self_distill_data_source(args)
    first.get_samples(3)
    first.save(rollout_id=4)
    expected = first.get_samples(6)  # crosses an epoch boundary (7 rows): reshuffled on both sides

    resumed = self_distill_data_source(data_source_args(tmp_path, load=args.save))
    resumed.load(rollout_id=4)
    got = resumed.get_samples(6)
    assert rows_of(got) == rows_of(expected)
    assert [[s.index for s in g] for g in got] == [[s.index for s in g] for g in expected]
    for group in got:
        for sample in group:
            text = sample.metadata[PLUGIN_METADATA_KEY][TEACHER_PROMPT_TEXT_KEY]
            assert text == expected_teacher_text(sample.metadata["teacher_prompt"], args)


@needs_slime
def test_aborted_groups_pushed_back_come_out_first_with_their_partial_response(tmp_path):
    args = data_source_args(tmp_path)
    source = self_distill_data_source(args)
    group = source.get_samples(1)[0]
    for sample in group:  # a partial rollout, as slime's abort() leaves it
        sample.tokens, sample.response_length, sample.response = [5, 6, 7], 2, "partial"
        sample.metadata["start_rollout_id"] = 0
    source.add_samples([group])
    again, fresh = source.get_samples(2)
    assert again is not None and [s.index for s in again] == [s.index for s in group]
    for sample in again:
        assert sample.tokens == [5, 6, 7] and sample.response == "partial"
        assert sample.metadata[PLUGIN_METADATA_KEY][TEACHER_PROMPT_TEXT_KEY] == expected_teacher_text(
            sample.metadata["teacher_prompt"], args)
    assert fresh[0].index == group[-1].index + 1


@needs_slime
def test_missing_teacher_prompt_error_and_exclude(tmp_path):
    rows = [dict(ROWS[0]), {"prompt": "no teacher here", "label": "x", "metadata": {"row": 1}}]
    args = data_source_args(tmp_path, rows=rows, rollout_shuffle=False)
    with pytest.raises(SelfDistillDataError, match=r"index=2 group_index=1 .*no teacher here"):
        self_distill_data_source(args).get_samples(2)
    args.self_distill_missing_teacher = "exclude"
    groups = self_distill_data_source(args).get_samples(2)
    assert TEACHER_PROMPT_TEXT_KEY in groups[0][0].metadata[PLUGIN_METADATA_KEY]
    for sample in groups[1]:
        assert MISSING_TEACHER_REASON_KEY in sample.metadata[PLUGIN_METADATA_KEY]


@needs_slime
def test_tools_of_the_row_reach_the_teacher_template(tmp_path):
    from transformers import AutoTokenizer

    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    rows = [{**ROWS[0], "tools": tools}]
    hf = save_tokenizer(tmp_path / "tool_tok")
    tokenizer = AutoTokenizer.from_pretrained(hf)
    tokenizer.chat_template = "{% if tools %}TOOLS={{ tools | tojson }}\n{% endif %}" + tokenizer.chat_template
    tokenizer.save_pretrained(hf)
    args = data_source_args(tmp_path, rows=rows, tool_key="tools", hf_checkpoint=hf)
    (sample, _), = self_distill_data_source(args).get_samples(1)
    text = sample.metadata[PLUGIN_METADATA_KEY][TEACHER_PROMPT_TEXT_KEY]
    assert text.startswith("TOOLS=") and '"add"' in text
    assert sample.prompt.startswith("TOOLS=")  # slime rendered the student's prompt with the same tools


@needs_slime
def test_multimodal_datasets_are_refused(tmp_path):
    with pytest.raises(SelfDistillDataError, match="--multimodal-keys"):
        self_distill_data_source(data_source_args(tmp_path, multimodal_keys={"image": "images"}))


def test_data_source_class_without_slime_names_the_missing_dependency(monkeypatch):
    import sys

    from slime_self_distill import data_source

    monkeypatch.setitem(sys.modules, "slime.rollout.data_source", None)  # as if slime were not installed
    with pytest.raises(ImportError, match="subclasses slime's RolloutDataSourceWithBuffer.*install a THUDM/slime"):
        data_source._build_data_source_class()
