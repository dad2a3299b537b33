import builtins
import json
import os
import pathlib
import re
import stat
import string
import subprocess
import sys
import tempfile

import pytest

from slime_self_distill import prepare_dataset
from slime_self_distill.data.cli import jsonl_writer
from slime_self_distill.data.templates import TEMPLATES, build_teacher_prompt, render_prompt
from slime_self_distill.prepare_dataset import main
from tests.cli_support import read_jsonl, run_main, write_jsonl
from tests.slime_support import needs_slime
from tests.tokenizer_factory import make_tokenizer, save_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
SDFT = TEMPLATES["sdft"]
CHAT_PROMPT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 12 + 30?"}]
CHAT_ROW = {"prompt": CHAT_PROMPT, "demonstration": "42"}


def run(capsys, *argv):
    return run_main(main, capsys, *argv)


# ------------------------------------------------------------------------------------------------- row kinds
def test_opsd_rows_get_the_official_student_and_teacher_messages(tmp_path, capsys):
    """The OPSD dataset's columns (problem, solution) with the official student and teacher messages."""
    from tests.test_templates import official_opsd_student, official_opsd_teacher

    source = write_jsonl(tmp_path / "in.jsonl", [{"problem": "What is 3 + 4?", "solution": "3 + 4 = \\boxed{7}"}])
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl", "--quiet",
                       "--prompt-column", "problem", "--demonstration-column", "solution",
                       "--template", "opsd", "--student-template", "opsd")
    assert code == 0, err
    (row,) = read_jsonl(tmp_path / "out.jsonl")
    assert row["prompt"] == official_opsd_student("What is 3 + 4?")
    assert row["metadata"]["teacher_prompt"] == official_opsd_teacher("What is 3 + 4?", "3 + 4 = \\boxed{7}")
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "bad.jsonl", "--prompt-column", "problem",
                       "--demonstration-column", "solution", "--student-template", "no such template")
    assert code == 2 and "--student-template: unknown template 'no such template'" in err



def test_demonstration_rows(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "What is 2 + 2?", "demonstration": "2 + 2 = 4", "id": 7, "source": "gsm"},
        {"prompt": CHAT_PROMPT, "demonstration": "42"},
    ])
    code, out, _ = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl", "--quiet")
    assert code == 0 and "rows written: 2" in out
    first, second = read_jsonl(tmp_path / "out.jsonl")
    assert first == {
        "prompt": "What is 2 + 2?",
        "metadata": {
            "teacher_prompt": SDFT.format(prompt="What is 2 + 2?", demonstration="2 + 2 = 4"),
            "self_distill": {"demonstration": "2 + 2 = 4", "template": SDFT},
            "id": 7,
            "source": "gsm",
        },
    }
    assert second["prompt"] == CHAT_PROMPT  # chat prompts stay messages
    assert second["metadata"]["teacher_prompt"] == [
        CHAT_PROMPT[0], {"role": "user", "content": SDFT.format(prompt="What is 12 + 30?", demonstration="42")}]


def test_teacher_prompt_rows_win_over_a_demonstration(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "q1", "teacher_prompt": "teacher sees q1 with hints", "demonstration": "unused demo"},
        {"prompt": CHAT_PROMPT, "teacher_prompt": CHAT_PROMPT + [{"role": "user", "content": "more"}]},
    ])
    code, _, _ = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl")
    assert code == 0
    first, second = read_jsonl(tmp_path / "out.jsonl")
    # the teacher prompt was not built from the demonstration: no self_distill entry, the column is kept as data
    assert first == {"prompt": "q1", "metadata": {"teacher_prompt": "teacher sees q1 with hints",
                                                  "demonstration": "unused demo"}}
    assert second["metadata"] == {"teacher_prompt": CHAT_PROMPT + [{"role": "user", "content": "more"}]}


def test_messages_rows(tmp_path, capsys):
    messages = CHAT_PROMPT + [{"role": "assistant", "content": "12 + 30 = 42"}]
    source = write_jsonl(tmp_path / "in.jsonl", [{"messages": messages, "id": "a"}])
    code, _, _ = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl", "--template", "verified_solution")
    assert code == 0
    (row,) = read_jsonl(tmp_path / "out.jsonl")
    template = TEMPLATES["verified_solution"]
    assert row["prompt"] == CHAT_PROMPT
    assert row["metadata"] == {
        "teacher_prompt": build_teacher_prompt(CHAT_PROMPT, "12 + 30 = 42", template),
        "self_distill": {"demonstration": "12 + 30 = 42", "template": template},
        "id": "a",
    }
    assert row["metadata"]["teacher_prompt"][1]["content"].startswith("What is 12 + 30?\n\nHere is a verified solution")


def test_custom_column_names_and_keys(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"question": "q", "answer": "a", "meta": {"split": "train"}}])
    code, _, _ = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl", "--prompt-column", "question",
                     "--demonstration-column", "answer", "--metadata-key", "meta", "--teacher-prompt-key", "tp",
                     "--template", "<{prompt}|{demonstration}>")
    assert code == 0
    assert read_jsonl(tmp_path / "out.jsonl") == [{"prompt": "q", "meta": {
        "split": "train", "tp": "<q|a>",
        "self_distill": {"demonstration": "a", "template": "<{prompt}|{demonstration}>"}}}]


def test_keep_columns_top_level_and_tools(tmp_path, capsys):
    tools = [{"type": "function", "function": {"name": "add"}}]
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "demonstration": "d", "label": "4", "tools": tools,
                                                  "extra": 1}])
    code, _, _ = run(capsys, "--input", source, "--output", tmp_path / "top.jsonl", "--keep-columns", "top_level")
    assert code == 0
    (row,) = read_jsonl(tmp_path / "top.jsonl")
    assert row["label"] == "4" and row["extra"] == 1 and row["tools"] == tools
    assert set(row["metadata"]) == {"teacher_prompt", "self_distill"}
    code, _, _ = run(capsys, "--input", source, "--output", tmp_path / "meta.jsonl", "--top-level-columns", "label")
    (row,) = read_jsonl(tmp_path / "meta.jsonl")
    # slime reads --label-key and --tool-key columns at the top level of the row
    assert row["label"] == "4" and row["tools"] == tools and row["metadata"]["extra"] == 1
    assert "label" not in row["metadata"] and "tools" not in row["metadata"]


def test_list_demonstration_is_joined_with_newlines(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "answer": ["Thought: look", "", "Action: add"]}])
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl",
                       "--demonstration-column", "answer")
    assert code == 0, err
    (row,) = read_jsonl(tmp_path / "out.jsonl")
    joined = "Thought: look\n\nAction: add"
    assert row["metadata"]["teacher_prompt"] == SDFT.format(prompt="q", demonstration=joined)
    assert row["metadata"]["self_distill"]["demonstration"] == joined  # what truncate_demonstration shortens


def test_list_demonstration_with_a_non_string_item_names_the_item(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "demonstration": ["a", None, "b"]}])
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl")
    assert code == 1
    assert ("row 1: [bad_type_demonstration] column 'demonstration' item 1 is a NoneType (None); a demonstration list "
            "must hold only strings") in err


def test_demonstration_row_takes_its_prompt_from_messages_without_a_final_assistant_turn(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"messages": CHAT_PROMPT, "answer": "42", "id": 3}])
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl",
                       "--demonstration-column", "answer")
    assert code == 0, err
    (row,) = read_jsonl(tmp_path / "out.jsonl")
    assert row["prompt"] == CHAT_PROMPT
    assert row["metadata"] == {
        "teacher_prompt": [CHAT_PROMPT[0],
                           {"role": "user", "content": SDFT.format(prompt="What is 12 + 30?", demonstration="42")}],
        "self_distill": {"demonstration": "42", "template": SDFT},
        "id": 3,  # the messages and the demonstration are consumed, not kept as ordinary columns
    }


def test_prompt_column_wins_over_messages_in_a_demonstration_row(tmp_path, capsys):
    conversation = CHAT_PROMPT + [{"role": "assistant", "content": "42"}]
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "demonstration": "d", "messages": conversation}])
    assert run(capsys, "--input", source, "--output", tmp_path / "out.jsonl")[0] == 0
    (row,) = read_jsonl(tmp_path / "out.jsonl")
    assert row["prompt"] == "q" and row["metadata"]["messages"] == conversation  # kept as data, as before


def test_label_key_stays_at_the_top_level(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "demonstration": "d", "label": "4", "answer": "5"}])
    assert run(capsys, "--input", source, "--output", tmp_path / "a.jsonl")[0] == 0
    (row,) = read_jsonl(tmp_path / "a.jsonl")
    assert row["label"] == "4" and "label" not in row["metadata"] and row["metadata"]["answer"] == "5"
    assert run(capsys, "--input", source, "--output", tmp_path / "b.jsonl", "--label-key", "answer")[0] == 0
    (row,) = read_jsonl(tmp_path / "b.jsonl")
    assert row["answer"] == "5" and row["metadata"]["label"] == "4"


def test_empty_label_and_tool_keys_name_no_column(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "demonstration": "d", "label": "4", "tools": "{x"}])
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl", "--label-key", "",
                       "--tool-key", "")
    assert code == 0, err  # the tools column is ordinary data now: its value is not parsed as tools
    (row,) = read_jsonl(tmp_path / "out.jsonl")
    assert set(row) == {"prompt", "metadata"} and row["metadata"]["label"] == "4" and row["metadata"]["tools"] == "{x"


def test_rows_without_the_label_are_noted(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "demonstration": "d", "label": "4"},
                                                 {"prompt": "q", "demonstration": "d"},
                                                 {"prompt": "q", "demonstration": "d", "label": None}])
    code, out, _ = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl")
    assert code == 0
    assert ("note: 1 written row(s) (first: [2]) have no 'label' column; slime given --label-key label reads it from "
            "every row and stops with a KeyError on them") in out
    write_json_lines(tmp_path / "plain.jsonl")  # no label anywhere: a dataset without labels, nothing to note
    assert "note:" not in run(capsys, "--input", tmp_path / "plain.jsonl", "--output", tmp_path / "p.jsonl")[1]


def test_prepared_output_is_accepted_again_unchanged(tmp_path, capsys):
    first = tmp_path / "once.jsonl"
    assert run(capsys, "--input", REPO / "examples" / "sdft_demo.jsonl", "--output", first)[0] == 0
    assert run(capsys, "--input", first, "--output", tmp_path / "twice.jsonl")[0] == 0
    assert read_jsonl(tmp_path / "twice.jsonl") == read_jsonl(first)


# -------------------------------------------------------------------------------------------- input formats
ROWS = [{"prompt": "q1", "demonstration": "d1"}, {"prompt": "q2", "demonstration": "d2"}]
EXPECTED = [{"prompt": r["prompt"], "metadata": {
    "teacher_prompt": SDFT.format(prompt=r["prompt"], demonstration=r["demonstration"]),
    "self_distill": {"demonstration": r["demonstration"], "template": SDFT}}} for r in ROWS]


def write_json_list(path):
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")


def write_json_lines(path):
    write_jsonl(path, ROWS)


def write_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), path)


def write_csv(path):
    path.write_text("prompt,demonstration\n" + "".join(f"{r['prompt']},{r['demonstration']}\n" for r in ROWS))


@pytest.mark.parametrize("name, writer", [
    ("in.jsonl", write_json_lines), ("in.json", write_json_list), ("lines.json", write_json_lines),
    ("in.parquet", write_parquet), ("in.csv", write_csv),
])
def test_input_formats(tmp_path, capsys, name, writer):
    writer(tmp_path / name)
    code, _, err = run(capsys, "--input", tmp_path / name, "--output", tmp_path / "out.jsonl")
    assert code == 0, err
    assert read_jsonl(tmp_path / "out.jsonl") == EXPECTED


def test_datasets_directory_input(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    write_csv(tmp_path / "data" / "train.csv")
    code, _, err = run(capsys, "--input", tmp_path / "data", "--output", tmp_path / "out.jsonl")
    assert code == 0, err
    assert read_jsonl(tmp_path / "out.jsonl") == EXPECTED


def test_datasets_directory_with_several_splits_needs_split(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    write_csv(tmp_path / "data" / "train.csv")
    (tmp_path / "data" / "test.csv").write_text("prompt,demonstration\ntq,td\n")
    code, _, err = run(capsys, "--input", tmp_path / "data", "--output", tmp_path / "out.jsonl")
    assert code == 2 and "choose one with --split" in err and "'test', 'train'" in err
    assert run(capsys, "--input", tmp_path / "data", "--output", tmp_path / "out.jsonl", "--split", "test")[0] == 0
    assert [r["prompt"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["tq"]


def save_to_disk(path, splits=None):
    """ROWS saved with the datasets library: a Dataset, or a DatasetDict with ``splits`` {name: rows}."""
    import datasets

    if splits is None:
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    else:
        datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
            str(path))
    return path


def test_saved_dataset_directory_input(tmp_path, capsys):
    code, _, err = run(capsys, "--input", save_to_disk(tmp_path / "saved"), "--output", tmp_path / "out.jsonl")
    assert code == 0, err
    assert read_jsonl(tmp_path / "out.jsonl") == EXPECTED


def test_saved_dataset_dict_needs_split_only_with_several_splits(tmp_path, capsys):
    saved = save_to_disk(tmp_path / "dict", {"train": ROWS, "test": [{"prompt": "tq", "demonstration": "td"}]})
    code, _, err = run(capsys, "--input", saved, "--output", tmp_path / "out.jsonl")
    assert code == 2 and "has the splits ['test', 'train']; choose one with --split" in err
    assert run(capsys, "--input", saved, "--output", tmp_path / "out.jsonl", "--split", "test")[0] == 0
    assert [r["prompt"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["tq"]
    code, _, err = run(capsys, "--input", saved, "--output", tmp_path / "out.jsonl", "--split", "dev")
    assert code == 2 and "--split 'dev' is not in --input" in err
    single = save_to_disk(tmp_path / "single", {"train": ROWS})
    assert run(capsys, "--input", single, "--output", tmp_path / "out.jsonl")[0] == 0
    assert read_jsonl(tmp_path / "out.jsonl") == EXPECTED


def test_split_of_a_saved_dataset_without_splits_is_refused(tmp_path, capsys):
    code, _, err = run(capsys, "--input", save_to_disk(tmp_path / "saved"), "--output", tmp_path / "out.jsonl",
                       "--split", "train")
    assert code == 2 and "is a single saved Dataset, which has no splits; drop --split" in err


@pytest.mark.parametrize("name, writer", [("in.jsonl", write_json_lines), ("in.json", write_json_list)])
def test_a_utf8_byte_order_mark_is_accepted_and_not_written(tmp_path, capsys, name, writer):
    writer(tmp_path / name)
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + (tmp_path / name).read_bytes())
    code, _, err = run(capsys, "--input", tmp_path / name, "--output", tmp_path / "out.jsonl")
    assert code == 0, err
    assert read_jsonl(tmp_path / "out.jsonl") == EXPECTED
    assert (tmp_path / "out.jsonl").read_bytes().startswith(b'{"prompt"')


def test_json_lines_in_a_json_file_split_only_at_newlines(tmp_path, capsys):
    # U+2028 may appear raw inside a JSON string; str.splitlines would cut the row there
    rows = [{"prompt": "line\u2028separator", "demonstration": "d"}, ROWS[1]]
    (tmp_path / "in.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                      encoding="utf-8")
    code, _, err = run(capsys, "--input", tmp_path / "in.json", "--output", tmp_path / "out.jsonl")
    assert code == 0, err
    assert [r["prompt"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["line\u2028separator", "q2"]


def test_parquet_output_round_trip(tmp_path, capsys):
    import pyarrow.parquet as pq

    write_json_lines(tmp_path / "in.jsonl")
    assert run(capsys, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "sub" / "out.parquet")[0] == 0
    assert pq.read_table(tmp_path / "sub" / "out.parquet").to_pylist() == EXPECTED


def test_parquet_output_with_mixed_prompt_kinds_is_a_clear_error(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "demonstration": "d"},
                                                 {"prompt": CHAT_PROMPT, "demonstration": "d"}])
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.parquet")
    assert code == 2 and "write .jsonl instead" in err and not (tmp_path / "out.parquet").exists()


# ---------------------------------------------------------------------------------------------------- bad rows
BAD_ROWS = [  # (row or raw line, expected code)
    ("{not json", "unparseable_json"),
    ([1, 2], "not_an_object"),
    ({"demonstration": "d"}, "missing_prompt"),
    ({"prompt": "   ", "demonstration": "d"}, "empty_prompt"),
    ({"prompt": 5, "demonstration": "d"}, "bad_type_prompt"),
    ({"prompt": "q", "demonstration": ""}, "empty_demonstration"),
    ({"prompt": "q", "demonstration": ["d", 2]}, "bad_type_demonstration"),
    ({"prompt": "q", "demonstration": {"d": 1}}, "bad_type_demonstration"),
    ({"prompt": "q", "demonstration": []}, "empty_demonstration"),
    ({"prompt": [{"role": "system", "content": "s"}], "demonstration": "d"}, "malformed_prompt"),
    ({"prompt": [{"role": "user"}], "demonstration": "d"}, "malformed_prompt"),
    ({"prompt": [], "demonstration": "d"}, "empty_prompt"),
    ({"prompt": "q", "teacher_prompt": CHAT_PROMPT}, "kind_mismatch"),
    ({"prompt": "q", "teacher_prompt": ""}, "empty_teacher_prompt"),
    ({"messages": [{"role": "user", "content": "q"}]}, "malformed_messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}, "empty_demonstration"),
    ({"messages": "q", "id": 1}, "bad_type_messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "prompt": "q"},
     "ambiguous_prompt"),
    ({"prompt": "q"}, "no_teacher_source"),
    ({"prompt": "q", "demonstration": "d", "metadata": "m"}, "bad_metadata"),
    ({"prompt": "q", "demonstration": "d", "metadata": {"teacher_prompt": "x"}}, "metadata_conflict"),
    ({"prompt": "q", "demonstration": "d", "metadata": {"self_distill": 1}}, "metadata_conflict"),
    ({"prompt": "q", "demonstration": "d", "metadata": {"id": 1}, "id": 2}, "metadata_conflict"),
    ({"prompt": "q", "demonstration": "d", "tools": "{oops"}, "bad_tools"),
    ({"messages": CHAT_PROMPT + [{"role": "assistant", "content": "a"}], "demonstration": "d"},
     "ambiguous_demonstration"),
    ({"messages": "q", "demonstration": "d"}, "bad_type_messages"),
    ({"messages": [{"role": "system", "content": "s"}], "demonstration": "d"}, "malformed_prompt"),
    ({"messages": [{"role": "user", "content": 1}], "demonstration": "d"}, "malformed_prompt"),
]


@pytest.mark.parametrize("bad, code_name", BAD_ROWS, ids=[code for _, code in BAD_ROWS])
def test_each_bad_row_is_reported_with_its_line(tmp_path, capsys, bad, code_name):
    source = write_jsonl(tmp_path / "in.jsonl", [ROWS[0], bad, ROWS[1]])
    output = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "--input", source, "--output", output)
    assert code == 1 and not output.exists()
    assert re.search(rf"row 2: \[{code_name}\]", err), err
    assert f"bad rows by reason: {code_name}: 1" in err


def test_failure_leaves_an_existing_output_untouched(tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    output.write_text("previous content\n")
    source = write_jsonl(tmp_path / "in.jsonl", [ROWS[0], {"prompt": "q"}])
    assert run(capsys, "--input", source, "--output", output)[0] == 1
    assert output.read_text() == "previous content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_blank_lines_are_skipped_and_line_numbers_are_file_lines(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [ROWS[0], "", "  ", {"prompt": ""}, ROWS[1]])
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl")
    assert code == 1 and "row 4: [no_teacher_source]" in err


def test_skip_invalid_writes_good_rows_and_a_report(tmp_path, capsys):
    bad = [("{broken", "unparseable_json"), ({"prompt": "q", "demonstration": ""}, "empty_demonstration"),
           ({"prompt": "q"}, "no_teacher_source")]
    source = write_jsonl(tmp_path / "in.jsonl", [ROWS[0], bad[0][0], bad[1][0], ROWS[1], bad[2][0]])
    output = tmp_path / "out.jsonl"
    code, out, _ = run(capsys, "--input", source, "--output", output, "--skip-invalid")
    assert code == 0
    assert read_jsonl(output) == EXPECTED
    report = read_jsonl(str(output) + ".rejected.jsonl")
    assert [(r["row"], r["code"]) for r in report] == [(2, "unparseable_json"), (3, "empty_demonstration"),
                                                       (5, "no_teacher_source")]
    assert [r["data"] for r in report] == [b[0] for b in bad]  # the raw line for the unparseable one
    assert "rows read: 5" in out and "rows written: 2" in out
    assert "rows rejected: 3 (empty_demonstration: 1, no_teacher_source: 1, unparseable_json: 1)" in out


def test_skip_invalid_with_no_bad_row_writes_an_empty_report(tmp_path, capsys):
    write_json_lines(tmp_path / "in.jsonl")
    report = tmp_path / "out.jsonl.rejected.jsonl"
    report.write_text("stale\n")
    assert run(capsys, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", "--skip-invalid")[0] == 0
    assert report.read_text() == ""


def test_no_usable_row_is_a_failure(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "demonstration": " "}])
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl", "--skip-invalid")
    assert code == 1 and "no usable row" in err and not (tmp_path / "out.jsonl").exists()


def test_pending_outputs_keep_the_old_files_when_writing_fails(tmp_path):
    output, report = tmp_path / "out.jsonl", tmp_path / "out.jsonl.rejected.jsonl"
    output.write_text("old\n")

    def failing_writer(f):
        f.write(b"{}\n")
        raise OSError(28, "No space left on device")

    outputs = {str(output): "--output", str(report): "the rejected-rows report"}
    with pytest.raises(prepare_dataset.UsageError, match=r"--output .*out.jsonl.*No space left on device"):
        with prepare_dataset.PendingOutputs(outputs) as pending:
            pending.write(str(report), jsonl_writer(["{}"]))
            pending.write(str(output), failing_writer)
    assert output.read_text() == "old\n" and os.listdir(tmp_path) == ["out.jsonl"]  # no report, no temporary file


def test_pending_outputs_create_directories_and_remove_them_when_nothing_is_committed(tmp_path):
    nested = tmp_path / "new" / "dir" / "x.jsonl"
    with prepare_dataset.PendingOutputs({str(nested): "--output"}) as pending:
        assert (tmp_path / "new" / "dir").is_dir()  # made on entry, to hold the temporary file
    assert os.listdir(tmp_path) == []
    with prepare_dataset.PendingOutputs({str(nested): "--output"}) as pending:
        pending.write(str(nested), jsonl_writer(["{}"]))
        pending.commit()
    assert nested.read_text() == "{}\n" and os.listdir(nested.parent) == ["x.jsonl"]


# -------------------------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("extra, message", [
    (["--template", "nope"], "--template: unknown template 'nope'"),
    (["--template", "{prompt} {x} {demonstration}"], r"field \{x\} is not allowed"),
    (["--max-teacher-prompt-len", "5"], "needs --tokenizer"),
    (["--apply-chat-template-kwargs", "[1]"], "must be a JSON object"),
    (["--tokenizer", "/no/such/tokenizer"], "is not a directory; give a local Hugging Face checkpoint"),
])
def test_usage_errors_exit_2(tmp_path, capsys, extra, message):
    write_json_lines(tmp_path / "in.jsonl")
    code, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", *extra)
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "out.jsonl").exists()


def test_unusable_paths_exit_2(tmp_path, capsys):
    write_json_lines(tmp_path / "in.jsonl")
    code, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.json")
    assert code == 2 and "slime reads only .jsonl and .parquet" in err
    code, _, err = run(capsys, "--input", tmp_path / "missing.jsonl", "--output", tmp_path / "out.jsonl")
    assert code == 2 and "does not exist" in err
    (tmp_path / "broken.json").write_text('[{"prompt": "q",}]')
    code, _, err = run(capsys, "--input", tmp_path / "broken.json", "--output", tmp_path / "out.jsonl")
    assert code == 2 and "does not parse" in err
    (tmp_path / "in.xml").write_text("<rows/>")
    code, _, err = run(capsys, "--input", tmp_path / "in.xml", "--output", tmp_path / "out.jsonl")
    assert code == 2 and "unsupported format" in err


# ------------------------------------------------------------------------------------- file-level problems
IS_ROOT = os.geteuid() == 0


def assert_one_line_error(code, err, *fragments):
    """Exit status 2 and a single ``error: ...`` line holding every fragment (no traceback, no row list)."""
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture
def existing_output(tmp_path):
    """An output from an earlier run; a failed run must leave it as it was, with nothing beside it."""
    output = tmp_path / "out.jsonl"
    output.write_text("earlier output\n")
    yield output
    assert output.read_text() == "earlier output\n"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_non_utf8_jsonl_names_the_line_and_byte_offset(tmp_path, capsys, existing_output):
    first = json.dumps(ROWS[0]).encode() + b"\n"
    second = b'{"prompt": "caf\xe9", "demonstration": "d"}\n'
    (tmp_path / "in.jsonl").write_bytes(first + second)
    code, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", existing_output)
    offset = len(first) + second.index(b"\xe9")
    assert_one_line_error(code, err, "is not UTF-8: line 2, byte offset", f"byte offset {offset} holds b'\\xe9'",
                          "convert the file to UTF-8")


@pytest.mark.parametrize("name, raw, bad_byte, line", [
    # the byte order mark counts in the offset
    ("in.jsonl", b'\xef\xbb\xbf{"prompt": "\xff", "demonstration": "d"}\n', b"\xff", 1),
    ("in.json",
     b'[\n  {"prompt": "q", "demonstration": "d"},\n  {"prompt": "\x93quoted\x94", "demonstration": "d"}\n]\n',
     b"\x93", 3),
], ids=["jsonl after a byte order mark", "json list"])
def test_non_utf8_names_the_line_and_the_files_byte_offset(tmp_path, capsys, existing_output, name, raw, bad_byte,
                                                           line):
    (tmp_path / name).write_bytes(raw)
    code, _, err = run(capsys, "--input", tmp_path / name, "--output", existing_output)
    assert_one_line_error(code, err, f"line {line}, byte offset {raw.index(bad_byte)} holds {bad_byte!r}")


def deny(monkeypatch, denied_path, error=PermissionError(13, "Permission denied")):
    """Make opening ``denied_path`` fail with ``error``, by default as it does for a file without read permission
    (root reads every file)."""
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if os.fspath(file) == str(denied_path):
            raise error
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)


@pytest.mark.parametrize("name, writer", [("in.jsonl", write_json_lines), ("in.json", write_json_list)])
def test_unreadable_input_is_one_line(tmp_path, capsys, monkeypatch, existing_output, name, writer):
    writer(tmp_path / name)
    deny(monkeypatch, tmp_path / name)
    code, _, err = run(capsys, "--input", tmp_path / name, "--output", existing_output)
    assert_one_line_error(code, err, f"--input '{tmp_path / name}' cannot be read (Permission denied)",
                          "check its permissions")


def test_input_read_error_is_one_line(tmp_path, capsys, monkeypatch, existing_output):
    write_json_lines(tmp_path / "in.jsonl")
    deny(monkeypatch, tmp_path / "in.jsonl", OSError(5, "Input/output error"))
    code, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", existing_output)
    assert_one_line_error(code, err, "cannot be read (Input/output error)")
    assert "permissions" not in err


@pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their permissions")
def test_input_without_read_permission_is_one_line(tmp_path, capsys, existing_output):
    write_json_lines(tmp_path / "in.jsonl")
    (tmp_path / "in.jsonl").chmod(0)
    code, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", existing_output)
    assert_one_line_error(code, err, "cannot be read (Permission denied)")


def truncated_parquet(path):
    write_parquet(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


@pytest.mark.parametrize("name, corrupt, message", [
    ("in.parquet", truncated_parquet, "is not a readable Parquet file (Parquet magic bytes not found"),
    ("in.parquet", lambda path: path.write_text("prompt,demonstration\nq,d\n"),
     "is not a readable Parquet file (Parquet magic bytes not found"),
    ("in.parquet", lambda path: path.write_bytes(b""), "is not a readable Parquet file (Parquet file size is 0"),
    ("in.arrow", lambda path: path.write_bytes(b"garbage"), "does not load with datasets.load_dataset('arrow'): "
                                                             "ArrowInvalid"),
    ("in.csv", lambda path: path.write_bytes("prompt,demonstration\ncaf\xe9,d\n".encode("latin-1")),
     "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9"),
])
def test_corrupt_input_is_one_line(tmp_path, capsys, existing_output, name, corrupt, message):
    corrupt(tmp_path / name)
    code, _, err = run(capsys, "--input", tmp_path / name, "--output", existing_output)
    assert_one_line_error(code, err, f"--input '{tmp_path / name}'", message)


def test_unwritable_output_directory_fails_before_reading(tmp_path, capsys, monkeypatch, existing_output):
    def no_permission(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", no_permission)
    monkeypatch.setattr(prepare_dataset, "prepare_row", lambda *args: pytest.fail("rows were read"))
    write_json_lines(tmp_path / "in.jsonl")
    code, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", existing_output)
    assert_one_line_error(code, err, f"--output '{existing_output}': cannot create a file in '{tmp_path}' "
                                     f"(Permission denied); choose a writable location; nothing was written")


@pytest.mark.skipif(IS_ROOT, reason="root writes in any directory whatever its permissions")
def test_read_only_output_directory_is_one_line(tmp_path, capsys):
    write_json_lines(tmp_path / "in.jsonl")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    code, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "ro" / "out.jsonl")
    assert_one_line_error(code, err, "cannot create a file in", "(Permission denied)")


def test_output_under_a_file_is_one_line(tmp_path, capsys):
    write_json_lines(tmp_path / "in.jsonl")
    (tmp_path / "plain").write_text("a file, not a directory\n")
    code, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "plain" / "sub" / "out.jsonl")
    assert_one_line_error(code, err, "cannot create the directory", "(Not a directory)")
    assert (tmp_path / "plain").read_text() == "a file, not a directory\n"


def test_output_that_is_a_directory_is_refused(tmp_path, capsys):
    write_json_lines(tmp_path / "in.jsonl")
    (tmp_path / "out.jsonl").mkdir()
    code, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl")
    assert_one_line_error(code, err, f"--output '{tmp_path / 'out.jsonl'}' is a directory; give a file path")
    (tmp_path / "report.jsonl.rejected.jsonl").mkdir()
    code, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "report.jsonl",
                       "--skip-invalid")
    assert_one_line_error(code, err, "the rejected-rows report", "is a directory")
    assert not (tmp_path / "report.jsonl").exists()


@pytest.mark.parametrize("spelling", ["same", "dot_dot", "symlink", "hard_link"])
def test_output_that_is_the_input_is_refused(tmp_path, capsys, spelling):
    source = tmp_path / "data" / "in.jsonl"
    source.parent.mkdir()
    write_json_lines(source)
    original = source.read_bytes()
    output = {
        "same": source,
        "dot_dot": tmp_path / "data" / ".." / "data" / "." / "in.jsonl",
        "symlink": tmp_path / "link.jsonl",
        "hard_link": tmp_path / "hard.jsonl",
    }[spelling]
    if spelling == "symlink":
        output.symlink_to(source)
    if spelling == "hard_link":
        os.link(source, output)
    code, _, err = run(capsys, "--input", source, "--output", output)
    assert_one_line_error(code, err, f"--output '{output}' is the input file itself", "write to another path")
    assert source.read_bytes() == original


def test_rejected_rows_report_that_is_the_input_is_refused(tmp_path, capsys):
    source = tmp_path / "out.jsonl.rejected.jsonl"
    write_json_lines(source)
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl", "--skip-invalid")
    assert_one_line_error(code, err, "the rejected-rows report", "is the input file itself")


def test_a_rename_failing_after_another_says_which_output_was_replaced(tmp_path, capsys, monkeypatch):
    write_json_lines(tmp_path / "in.jsonl")
    real_replace = os.replace

    def replace(source, target):
        if str(target).endswith(".rejected.jsonl"):
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(prepare_dataset.os, "replace", replace)
    output = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", output, "--skip-invalid")
    assert_one_line_error(code, err, "the rejected-rows report", "cannot replace it (Input/output error)",
                          f"'{output}' already replaced")
    assert read_jsonl(output) == EXPECTED and sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]


def test_split_of_a_file_without_splits_is_refused(tmp_path, capsys):
    write_json_lines(tmp_path / "in.jsonl")
    code, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", "--split", "train")
    assert_one_line_error(code, err, "is a .jsonl file, which has no splits; drop --split")


def test_failed_run_removes_the_directories_it_made(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [ROWS[0], {"prompt": "q", "demonstration": ""}])
    assert run(capsys, "--input", source, "--output", tmp_path / "new" / "deeper" / "out.jsonl")[0] == 1
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


# --------------------------------------------------------------------------------------------- permissions
@pytest.fixture
def umask():
    """Set the process umask for one test (returns a setter) and restore it afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("output_name", ["out.jsonl", "out.parquet"])
def test_new_outputs_get_the_umask_permissions(tmp_path, capsys, umask, mask, output_name):
    write_json_lines(tmp_path / "in.jsonl")
    umask(mask)
    output = tmp_path / output_name
    assert run(capsys, "--input", tmp_path / "in.jsonl", "--output", output, "--skip-invalid")[0] == 0
    for path in (output, tmp_path / (output_name + ".rejected.jsonl")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_an_existing_output_keeps_its_permissions(tmp_path, capsys, umask):
    write_json_lines(tmp_path / "in.jsonl")
    output, report = tmp_path / "out.jsonl", tmp_path / "out.jsonl.rejected.jsonl"
    for path, mode in ((output, 0o640), (report, 0o604)):
        path.write_text("old\n")
        path.chmod(mode)
    umask(0o077)
    assert run(capsys, "--input", tmp_path / "in.jsonl", "--output", output, "--skip-invalid")[0] == 0
    assert read_jsonl(output) == EXPECTED
    assert stat.S_IMODE(output.stat().st_mode) == 0o640 and stat.S_IMODE(report.stat().st_mode) == 0o604


# ----------------------------------------------------------------------------------------- absent columns
def test_a_named_column_that_no_row_has_is_one_usage_error(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"question": f"q{i}", "answer": "a", "id": i} for i in range(30)])
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl", "--prompt-column", "query",
                       "--demonstration-column", "answer")
    assert_one_line_error(code, err, f"--input '{source}': no row has a column 'query' (--prompt-column); its columns "
                                     f"are ['answer', 'id', 'question']: name the right column, e.g. --prompt-column "
                                     f"question")


def test_a_misspelt_column_gets_the_near_spelling(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"question": "q", "golden_response": ["a"]}])
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl", "--prompt-column", "question",
                       "--demonstration-column", "golden_respons")
    assert_one_line_error(code, err, "no row has a column 'golden_respons' (--demonstration-column)",
                          "e.g. --demonstration-column golden_response")


def test_default_prompt_column_absent_from_every_row_names_the_flag(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"problem": "q", "answer": "a"}] * 3)
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl",
                       "--demonstration-column", "answer")
    assert_one_line_error(code, err, "no row has a column 'prompt' (--prompt-column)", "e.g. --prompt-column problem")


def test_no_teacher_source_in_any_row_names_both_flags(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"question": "q", "solution": "s"}] * 3)
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl")
    assert_one_line_error(code, err, "no row has a column 'demonstration' (--demonstration-column) or 'prompt' "
                                     "(--prompt-column); its columns are ['question', 'solution']",
                          "e.g. --demonstration-column solution --prompt-column question")


def test_no_suggestion_without_a_likely_column(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "zzz": "s"}])
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl")
    assert_one_line_error(code, err, "e.g. --demonstration-column <column>")


@pytest.mark.parametrize("flag", ["--label-key", "--tool-key", "--top-level-columns", "--teacher-prompt-column",
                                  "--messages-column"])
def test_every_column_flag_is_checked_against_the_file(tmp_path, capsys, flag):
    write_json_lines(tmp_path / "in.jsonl")
    code, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", flag, "nope")
    assert_one_line_error(code, err, f"no row has a column 'nope' ({flag})")


def test_a_column_that_is_null_or_missing_in_some_rows_gives_bad_rows(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [ROWS[0], {"prompt": None, "demonstration": "d"},
                                                 {"demonstration": "d"}, {"prompt": "q", "demonstration": None}])
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl")
    assert code == 1 and "error:" not in err
    assert "row 2: [missing_prompt]" in err and "row 3: [missing_prompt]" in err
    assert "row 4: [no_teacher_source]" in err


def test_a_column_null_in_every_row_gives_bad_rows(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "demonstration": None}] * 2)
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl")
    assert code == 1 and "row 1: [no_teacher_source]" in err and "row 2: [no_teacher_source]" in err


def test_prepared_rows_without_a_teacher_prompt_are_bad_rows(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "metadata": {"teacher_prompt": "t"}},
                                                 {"prompt": "q", "metadata": {}}])
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl")
    assert code == 1 and "row 2: [no_teacher_source]" in err


# ------------------------------------------------------------------------------------------------- preview
def preview_of(out):
    match = re.search(r"^teacher prompt of row (\d+) \(the first written row; ([^;]+);.*?characters\):\n"
                      r"----- begin teacher prompt -----\n(.*)\n----- end teacher prompt -----$", out, re.S | re.M)
    assert match, out
    return int(match.group(1)), match.group(2), match.group(3)


def test_preview_of_a_raw_string_teacher_prompt(tmp_path, capsys):
    write_json_lines(tmp_path / "in.jsonl")
    code, out, _ = run(capsys, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl")
    assert code == 0
    assert preview_of(out) == (1, "raw string, as slime reads it without --apply-chat-template",
                               EXPECTED[0]["metadata"]["teacher_prompt"])
    assert f"; {len(EXPECTED[0]['metadata']['teacher_prompt'])} characters):" in out


def test_preview_is_of_the_first_written_row(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "demonstration": ""}, CHAT_ROW])
    code, out, _ = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl", "--skip-invalid")
    assert code == 0
    row, how, text = preview_of(out)
    assert row == 2 and how == "raw chat messages as JSON"
    assert json.loads(text) == build_teacher_prompt(CHAT_PROMPT, "42", SDFT)


def test_preview_rendered_with_the_chat_template(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [CHAT_ROW])
    code, out, _ = run(capsys, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", "--tokenizer",
                       save_tokenizer(tmp_path / "tok"), "--apply-chat-template")
    assert code == 0
    _, how, text = preview_of(out)
    assert how.startswith("rendered with the tokenizer's chat template")
    assert text == render_prompt(build_teacher_prompt(CHAT_PROMPT, "42", SDFT), make_tokenizer(),
                                 apply_chat_template=True)


def test_quiet_prints_no_preview(tmp_path, capsys):
    write_json_lines(tmp_path / "in.jsonl")
    code, out, _ = run(capsys, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", "--quiet")
    assert code == 0 and "rows written: 2" in out and "teacher prompt" not in out


def test_a_long_preview_is_shortened_and_says_how_much(tmp_path, capsys):
    demonstration = "".join(f"step {i}; " for i in range(1000))
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "demonstration": demonstration}])
    code, out, _ = run(capsys, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl")
    assert code == 0
    teacher = SDFT.format(prompt="q", demonstration=demonstration)
    left_out = len(teacher) - prepare_dataset.PREVIEW_HEAD_CHARS - prepare_dataset.PREVIEW_TAIL_CHARS
    _, _, text = preview_of(out)
    assert text == (teacher[:prepare_dataset.PREVIEW_HEAD_CHARS] + f"\n[... {left_out} characters left out ...]\n"
                    + teacher[-prepare_dataset.PREVIEW_TAIL_CHARS:])


def test_shorten():
    assert prepare_dataset.shorten("abcdef", head=3, tail=3) == "abcdef"
    assert prepare_dataset.shorten("abcdefg", head=3, tail=2) == "abc\n[... 2 characters left out ...]\nfg"


# ---------------------------------------------------------------------------------------------- token stats
def stats_row(out, name):
    line = next(line for line in out.splitlines() if line.startswith(name))
    return [float(x) for x in line[len(name):].split()]


def brute_force_lengths(rows, apply_chat_template):
    tok = make_tokenizer()

    def length(prompt):
        return len(tok.encode(render_prompt(prompt, tok, apply_chat_template=apply_chat_template),
                              add_special_tokens=False))

    return ([length(r["prompt"]) for r in rows], [length(r["metadata"]["teacher_prompt"]) for r in rows])


@pytest.mark.parametrize("example, apply_chat_template", [
    ("sdft_demo.jsonl", False), ("sdft_demo.jsonl", True), ("chat_messages_demo.jsonl", True)])
def test_token_stats_match_a_brute_force_count(tmp_path, capsys, example, apply_chat_template):
    import numpy as np

    tokenizer_dir = save_tokenizer(tmp_path / "tok")
    output = tmp_path / "out.jsonl"
    flags = ["--apply-chat-template"] if apply_chat_template else []
    code, out, err = run(capsys, "--input", REPO / "examples" / example, "--output", output, "--tokenizer",
                         tokenizer_dir, *flags)
    assert code == 0, err
    student, teacher = brute_force_lengths(read_jsonl(output), apply_chat_template)
    for name, values in [("student prompt", student), ("teacher prompt", teacher),
                         ("teacher - student", np.subtract(teacher, student))]:
        expected = [min(values), np.mean(values), np.percentile(values, 50), np.percentile(values, 95), max(values)]
        assert stats_row(out, name) == pytest.approx(expected, abs=0.51), name
    assert min(np.subtract(teacher, student)) > 0


def test_over_budget_rows_are_reported_and_can_fail(tmp_path, capsys):
    tokenizer_dir = save_tokenizer(tmp_path / "tok")
    example = REPO / "examples" / "sdft_demo.jsonl"
    output = tmp_path / "out.jsonl"
    assert run(capsys, "--input", example, "--output", output, "--tokenizer", tokenizer_dir)[0] == 0
    _, teacher = brute_force_lengths(read_jsonl(output), False)
    budget = sorted(teacher)[len(teacher) // 2]
    over = [i + 1 for i, n in enumerate(teacher) if n > budget]  # one row per line in the example file
    assert 0 < len(over) < len(teacher)
    output.unlink()
    code, out, _ = run(capsys, "--input", example, "--output", output, "--tokenizer", tokenizer_dir,
                       "--max-teacher-prompt-len", budget)
    assert code == 0 and output.exists()
    assert f"teacher prompts over {budget} tokens: {len(over)} of {len(teacher)}" in out
    over_line = next(line for line in out.splitlines() if line.startswith("teacher prompts over"))
    assert re.findall(r"row (\d+) \(", over_line) == [str(n) for n in over]
    output.unlink()
    code, _, err = run(capsys, "--input", example, "--output", output, "--tokenizer", tokenizer_dir,
                       "--max-teacher-prompt-len", budget, "--fail-on-over-budget")
    assert code == 1 and "--fail-on-over-budget" in err and not output.exists()


def test_chat_rows_with_a_tokenizer_need_apply_chat_template(tmp_path, capsys):
    code, _, err = run(capsys, "--input", REPO / "examples" / "chat_messages_demo.jsonl", "--output",
                       tmp_path / "out.jsonl", "--tokenizer", save_tokenizer(tmp_path / "tok"))
    assert code == 2 and "pass --apply-chat-template" in err and "6 row(s)" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_chat_template_kwargs_reach_the_renderer(tmp_path, capsys):
    tokenizer_dir = save_tokenizer(tmp_path / "tok")
    args = ["--input", REPO / "examples" / "sdft_demo.jsonl", "--tokenizer", tokenizer_dir, "--apply-chat-template"]
    _, plain, _ = run(capsys, *args, "--output", tmp_path / "a.jsonl")
    _, off, _ = run(capsys, *args, "--output", tmp_path / "b.jsonl", "--apply-chat-template-kwargs",
                    '{"enable_thinking": false}')
    think_tokens = len(make_tokenizer().encode("<think></think>", add_special_tokens=False))
    assert stats_row(off, "student prompt")[0] == stats_row(plain, "student prompt")[0] + think_tokens


@pytest.mark.parametrize("quiet", [False, True])
def test_token_measurement_shows_progress_on_a_terminal_unless_quiet(tmp_path, capsys, monkeypatch, quiet):
    tokenizer_dir = save_tokenizer(tmp_path / "tok")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    flags = ["--quiet"] if quiet else []
    code, _, err = run(capsys, "--input", REPO / "examples" / "sdft_demo.jsonl", "--output", tmp_path / "out.jsonl",
                       "--tokenizer", tokenizer_dir, *flags)
    assert code == 0
    assert ("measuring tokens: 100%" in err and "12/12" in err) != quiet
    assert ("preparing" in err) != quiet


def test_no_progress_bars_without_a_terminal(tmp_path, capsys):
    code, _, err = run(capsys, "--input", REPO / "examples" / "sdft_demo.jsonl", "--output", tmp_path / "out.jsonl",
                       "--tokenizer", save_tokenizer(tmp_path / "tok"))
    assert code == 0 and err == ""


# ----------------------------------------------------------------------------------- official SDFT datasets
# How the official SDFT code (github.com/idanshen/Self-Distillation, now Continual-Intelligence/Self-Distillation;
# read at its last upstream commit d775732 through the fork mkandrus/Self-Distillation) turns its two datasets into
# prompts, written here from its main.py, not from this project's code. Both prompts are then rendered with TRL's
# maybe_apply_chat_template, i.e. apply_chat_template(..., add_generation_prompt=True), and tokenized without
# special tokens (distil_trainer.py:1347-1380): what slime does with --apply-chat-template.
OFFICIAL_TEACHER_TEMPLATE = string.Template(  # main.py:30-37 (tool use) and main.py:56-63 (science), verbatim
    "\n$orig_content\n\nThis is an example for a response to the question:\n$output_text\n\n"
    "Now answer with a response of your own, including the thinking process.\n"
)


def official_tooluse_prompts(example):
    """main.py:39-42: the student reads one user turn holding ``prompt``; the teacher one user turn holding the
    template filled with ``prompt`` and the ``golden_response`` list joined with "\\n" (main.py:41)."""
    teacher = OFFICIAL_TEACHER_TEMPLATE.substitute(orig_content=example["prompt"],
                                                   output_text="\n".join(example["golden_response"]))
    return [{"role": "user", "content": example["prompt"]}], [{"role": "user", "content": teacher}]


def official_science_prompts(example):
    """main.py:65-74: the student reads ``messages`` (system + user) unchanged (main.py:66); the teacher reads
    messages[0] (the system turn, main.py:68) and a user turn holding the template filled with messages[1]'s content
    and ``output_text`` (main.py:69-72)."""
    teacher = OFFICIAL_TEACHER_TEMPLATE.substitute(orig_content=example["messages"][1]["content"],
                                                   output_text=example["output_text"])
    return example["messages"], [example["messages"][0], {"role": "user", "content": teacher}]


# Rows that would trip a format-string or Template-based rebuild: $ signs, braces, a field name, an empty item.
TRICKY_TOOLUSE_ROW = {
    "prompt": "Use {prompt} and $orig_content literally. Costs $5 {x}.\nBegin!\nQuestion: convert $10",
    "name": "FX", "description": "d", "nl_documentation": "n", "instruction": "convert $10",
    "golden_answer": [{"Action": "convert", "Action_Input": "{\"amount\": 10}"}],
    "golden_response": ["Thought: {demonstration} $output_text", "", "Action: convert\nAction Input: {\"amount\": 10}"],
}
TRICKY_SCIENCE_ROW = {
    "messages": [{"role": "system", "content": "Answer in <answer></answer>. {prompt} $x"},
                 {"role": "user", "content": "Which costs $3? {A} or {B}\n\nA: x\nB: y"}],
    "output_text": "<reasoning>\n{demonstration} $output_text\n</reasoning>\n<answer>\nA\n</answer>",
}


def official_rows(example_name, tricky_row):
    return read_jsonl(REPO / "examples" / example_name) + [tricky_row]


def as_messages(prompt):
    """The messages slime hands the chat template: a string prompt is one user turn (slime's _build_messages)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def check_against_official(source_rows, output, official_prompts):
    tok = make_tokenizer()
    prepared = read_jsonl(output)
    assert len(prepared) == len(source_rows)
    for row, example in zip(prepared, source_rows, strict=True):
        student, teacher = official_prompts(example)
        prompt, teacher_prompt = row["prompt"], row["metadata"]["teacher_prompt"]
        assert as_messages(prompt) == student
        assert as_messages(teacher_prompt) == teacher  # character for character, every turn
        for ours, theirs in ((prompt, student), (teacher_prompt, teacher)):
            assert render_prompt(ours, tok, apply_chat_template=True) == tok.apply_chat_template(
                theirs, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("as_saved_dataset", [False, True])
def test_official_tooluse_dataset_in_one_command(tmp_path, capsys, as_saved_dataset):
    rows = official_rows("sdft_tooluse_demo.jsonl", TRICKY_TOOLUSE_ROW)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    if as_saved_dataset:  # the official data ships as data/tooluse_data/train_data, written by save_to_disk
        import datasets

        source = tmp_path / "train_data"
        datasets.Dataset.from_list(rows).save_to_disk(str(source))
    output = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "--input", source, "--output", output, "--demonstration-column", "golden_response")
    assert code == 0, err
    check_against_official(rows, output, official_tooluse_prompts)
    row = read_jsonl(output)[-1]
    assert row["metadata"]["self_distill"]["demonstration"] == "\n".join(TRICKY_TOOLUSE_ROW["golden_response"])
    assert row["metadata"]["golden_answer"] == TRICKY_TOOLUSE_ROW["golden_answer"]  # other columns kept as data


@pytest.mark.parametrize("prompt_flags", [[], ["--prompt-column", "messages"]])
@pytest.mark.parametrize("as_saved_dataset", [False, True])
def test_official_science_dataset_in_one_command(tmp_path, capsys, as_saved_dataset, prompt_flags):
    rows = official_rows("sdft_science_demo.jsonl", TRICKY_SCIENCE_ROW)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    if as_saved_dataset:  # data/science_data/train_data, written by save_to_disk
        import datasets

        source = tmp_path / "train_data"
        datasets.Dataset.from_list(rows).save_to_disk(str(source))
    output = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "--input", source, "--output", output, "--demonstration-column", "output_text",
                       *prompt_flags)
    assert code == 0, err
    check_against_official(rows, output, official_science_prompts)
    assert all(set(row) == {"prompt", "metadata"} for row in read_jsonl(output))  # messages used, not kept


# ------------------------------------------------------------------------------------------- command line
def test_module_runs_as_a_script_on_the_example(tmp_path):
    output = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "slime_self_distill.prepare_dataset",
         "--input", str(REPO / "examples" / "sdft_demo.jsonl"), "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    source = read_jsonl(REPO / "examples" / "sdft_demo.jsonl")
    rows = read_jsonl(output)
    assert len(rows) == len(source) >= 10
    for row, original in zip(rows, source, strict=True):
        assert row["metadata"]["teacher_prompt"] == SDFT.format(prompt=original["prompt"],
                                                                demonstration=original["demonstration"])
    assert "rows written: 12" in result.stdout


def test_examples_are_well_formed():
    for row in read_jsonl(REPO / "examples" / "chat_messages_demo.jsonl"):
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-2]["role"] == "user"
    # shaped like the official SDFT data (its dataset_info.json schemas at d775732)
    for row in read_jsonl(REPO / "examples" / "sdft_tooluse_demo.jsonl"):
        assert set(row) == {"prompt", "name", "description", "nl_documentation", "instruction", "golden_answer",
                            "golden_response"}
        assert isinstance(row["prompt"], str) and all(isinstance(item, str) for item in row["golden_response"])
        assert all(set(answer) == {"Action", "Action_Input"} for answer in row["golden_answer"])
    for row in read_jsonl(REPO / "examples" / "sdft_science_demo.jsonl"):
        assert set(row) == {"messages", "output_text"}
        assert [turn["role"] for turn in row["messages"]] == ["system", "user"]


# ------------------------------------------------------------------------------------ against slime's Dataset
@needs_slime
@pytest.mark.parametrize("example, output_name, apply_chat_template", [
    ("sdft_demo.jsonl", "out.jsonl", False), ("sdft_demo.jsonl", "out.parquet", True),
    ("chat_messages_demo.jsonl", "out.jsonl", True)])
def test_slime_dataset_reads_the_output(tmp_path, capsys, example, output_name, apply_chat_template):
    from slime.utils.data import Dataset

    source = read_jsonl(REPO / "examples" / example)
    output = tmp_path / output_name
    assert run(capsys, "--input", REPO / "examples" / example, "--output", output)[0] == 0
    tok = make_tokenizer()
    dataset = Dataset(str(output), tok, None, None, prompt_key="prompt", metadata_key="metadata",
                      apply_chat_template=apply_chat_template)
    assert len(dataset) == len(source)
    for sample, original in zip(dataset.origin_samples, source, strict=True):
        if "messages" in original:
            prompt, demonstration = original["messages"][:-1], original["messages"][-1]["content"]
        else:
            prompt, demonstration = original["prompt"], original["demonstration"]
        assert sample.prompt == render_prompt(prompt, tok, apply_chat_template=apply_chat_template)
        assert sample.metadata["teacher_prompt"] == build_teacher_prompt(prompt, demonstration, SDFT)
        assert sample.metadata["self_distill"] == {"demonstration": demonstration, "template": SDFT}
        assert sample.metadata["id"] == original["id"]


@needs_slime
def test_slime_finds_the_label_at_the_top_level(tmp_path, capsys):
    # the README walkthrough trains with RM_TYPE=math LABEL_KEY=label, i.e. slime's --label-key label
    from slime.utils.data import Dataset

    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "What is 2 + 2?", "demonstration": "4", "label": "4"}])
    assert run(capsys, "--input", source, "--output", tmp_path / "out.jsonl")[0] == 0
    dataset = Dataset(str(tmp_path / "out.jsonl"), make_tokenizer(), None, None, prompt_key="prompt",
                      label_key="label", metadata_key="metadata")
    (sample,) = dataset.origin_samples
    assert sample.label == "4" and sample.metadata["teacher_prompt"] == SDFT.format(prompt="What is 2 + 2?",
                                                                                    demonstration="4")


@needs_slime
def test_a_byte_order_mark_that_slime_would_drop_a_row_for_is_prepared_away(tmp_path, capsys):
    # why a BOM is accepted: slime's reader fails to parse the first line of such a file and skips it with only a
    # printed message; the prepared output has no BOM, so slime reads every row of it
    from slime.utils.data import read_file

    source = tmp_path / "in.jsonl"
    write_json_lines(source)
    source.write_bytes(b"\xef\xbb\xbf" + source.read_bytes())
    assert len(list(read_file(str(source)))) == len(ROWS) - 1
    assert run(capsys, "--input", source, "--output", tmp_path / "out.jsonl")[0] == 0
    assert list(read_file(str(tmp_path / "out.jsonl"))) == EXPECTED


@needs_slime
@pytest.mark.parametrize("example, demonstration_column, official_prompts", [
    ("sdft_tooluse_demo.jsonl", "golden_response", official_tooluse_prompts),
    ("sdft_science_demo.jsonl", "output_text", official_science_prompts)])
def test_slime_renders_the_official_student_and_teacher_prompts(tmp_path, capsys, example, demonstration_column,
                                                                official_prompts):
    from slime.utils.data import Dataset

    from slime_self_distill.config import SelfDistillConfig
    from slime_self_distill.data_source import PLUGIN_METADATA_KEY, TEACHER_PROMPT_TEXT_KEY, annotate_teacher_prompt

    output = tmp_path / "out.jsonl"
    assert run(capsys, "--input", REPO / "examples" / example, "--output", output,
               "--demonstration-column", demonstration_column)[0] == 0
    tok = make_tokenizer()
    dataset = Dataset(str(output), tok, None, None, prompt_key="prompt", metadata_key="metadata",
                      apply_chat_template=True)
    source = read_jsonl(REPO / "examples" / example)
    for sample, original in zip(dataset.origin_samples, source, strict=True):
        student, teacher = official_prompts(original)
        assert sample.prompt == tok.apply_chat_template(student, tokenize=False, add_generation_prompt=True)
        annotate_teacher_prompt(
            sample.metadata, config=SelfDistillConfig(), apply_chat_template=True,
            render=lambda prompt, tools: render_prompt(prompt, tok, apply_chat_template=True, tools=tools),
            sample_description="test")
        assert sample.metadata[PLUGIN_METADATA_KEY][TEACHER_PROMPT_TEXT_KEY] == tok.apply_chat_template(
            teacher, tokenize=False, add_generation_prompt=True)


def test_usage_mistakes_name_the_fix(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "demonstration": "d"}])
    (tmp_path / "outdir").mkdir()
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "outdir")
    assert code == 2 and "is a directory; give a file path ending in .jsonl or .parquet" in err
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "o.jsonl", "--tokenizer", tmp_path / "none")
    assert code == 2 and "--tokenizer" in err and "is not a directory; give a local Hugging Face checkpoint" in err
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "o.jsonl", "--tokenizer", tmp_path / "outdir")
    assert code == 2 and "does not load as a Hugging Face tokenizer" in err  # a directory without tokenizer files
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(source), "--output", str(tmp_path / "o.jsonl"), "--demonstraton-column", "d"])
    assert exit_info.value.code == 2
    assert "--demonstraton-column (did you mean --demonstration-column?)" in capsys.readouterr().err
