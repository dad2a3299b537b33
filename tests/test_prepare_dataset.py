import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from slime_self_distill import prepare_dataset
from slime_self_distill.prepare_dataset import main
from slime_self_distill.templates import TEMPLATES, build_teacher_prompt, render_prompt
from tests.slime_support import needs_slime
from tests.tokenizer_factory import make_tokenizer, save_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
SDFT = TEMPLATES["sdft"]
CHAT_PROMPT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 12 + 30?"}]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines()]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------------- row kinds
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
    ({"prompt": "q", "demonstration": ["d"]}, "bad_type_demonstration"),
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
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q"}])
    code, _, err = run(capsys, "--input", source, "--output", tmp_path / "out.jsonl", "--skip-invalid")
    assert code == 1 and "no usable row" in err and not (tmp_path / "out.jsonl").exists()


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    output = tmp_path / "out.jsonl"
    output.write_text("old\n")

    def failing_rows():
        yield "{}"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        prepare_dataset.atomic_write(str(output), prepare_dataset._write_jsonl(failing_rows()))
    assert output.read_text() == "old\n" and os.listdir(tmp_path) == ["out.jsonl"]
    prepare_dataset.atomic_write(str(tmp_path / "new" / "dir" / "x.jsonl"), prepare_dataset._write_jsonl(["{}"]))
    assert (tmp_path / "new" / "dir" / "x.jsonl").read_text() == "{}\n"


# -------------------------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("extra, message", [
    (["--template", "nope"], "--template: unknown template 'nope'"),
    (["--template", "{prompt} {x} {demonstration}"], r"field \{x\} is not allowed"),
    (["--max-teacher-prompt-len", "5"], "needs --tokenizer"),
    (["--apply-chat-template-kwargs", "[1]"], "must be a JSON object"),
    (["--tokenizer", "/no/such/tokenizer"], "does not load as a Hugging Face tokenizer"),
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
    assert re.findall(r"row (\d+) \(", out) == [str(n) for n in over]
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
