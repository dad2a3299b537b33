"""SD-Zero phase 1 data (``python -m slime_self_distill.sd_zero_data``): the official split into the generation and
revision SFT stages, as slime SFT rows.

The expectations are written by hand from the official code (princeton-pli/Self-Distillation-Zero,
``self-revision-training/prepare_data.py`` and ``sft/sft.py``), not re-derived from the implementation: the texts of
the two stages, the cleaning examples, and the row order that the official ``prepare_data.py`` wrote for the crafted
tuples below (run once on them; recorded in ``OFFICIAL_ORDER``).
"""

import json
import os
import pathlib
import stat
import subprocess
import sys
import types

import pytest

from slime_self_distill.data import files
from slime_self_distill.data.sd_zero_split import strip_sycophantic_opening, trim_repeating_tail
from slime_self_distill.sd_zero_data import main
from tests.cli_support import read_jsonl, run_main, write_jsonl
from tests.slime_support import needs_slime
from tests.tokenizer_factory import make_tokenizer, save_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "sd_zero_tuples.jsonl"
# sft.py:204's literal "...within \\boxed{{}}." is never formatted: the model reads one backslash and doubled braces
OFFICIAL_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{{}}."
OFFICIAL_CODE_SYSTEM = "You are a helpful assistant that solves coding problems step by step."
WRONG = "Wait, this response is wrong. Let me correct it."
REPHRASE = "Let me rephrase the above solution."
STAGE1, STAGE2, REJECTED = "stage1_generation.jsonl", "stage2_revision.jsonl", "rejected.jsonl"


def tuple_row(x, y_init="init", y_revised="revised", *, correct_init=False, revised_correct=True, key="prompt",
              p_r=None, **extra):
    return {key: x, "y_init": y_init, "p_r": p_r or (REPHRASE if correct_init else WRONG), "y_revised": y_revised,
            "y_init_correct": correct_init, "y_revised_correct": revised_correct, **extra}


def run(capsys, *argv):
    return run_main(main, capsys, *argv)


def split(capsys, tmp_path, rows, *flags, name="in.jsonl"):
    source = write_jsonl(tmp_path / name, rows)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "--input", source, "--output-dir", out, "--quiet", *flags)
    assert code == 0, err
    return read_jsonl(out / STAGE1), read_jsonl(out / STAGE2), stdout


def user_and_completion(row):
    """(last user content, assistant content) of an output row, which must end with exactly these two turns."""
    *_, user, assistant = row["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    return user["content"], assistant["content"]


# ------------------------------------------------------------------------------------------- stage texts
def test_the_two_stages_hold_the_official_texts(tmp_path, capsys):
    rows = [
        tuple_row("What is 12 + 30?", "12 + 30 = 32.", "12 + 30 = 42, so \\boxed{42}.", label="42",
                  y_init_reward=0.0, y_revised_reward=1.0),
        tuple_row("What is 2 + 2?", "2 + 2 = 4.", "Adding two and two gives \\boxed{4}.", correct_init=True),
    ]
    stage1, stage2, _ = split(capsys, tmp_path, rows, "--stage2-size", "1")
    # prepare_data.py:165-168: prompt x, completion y_init + P_r + y_revised joined by blank lines; sft.py adds the
    # system message before the user turn
    assert stage1 == [{"messages": [
        {"role": "system", "content": OFFICIAL_MATH_SYSTEM},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "12 + 30 = 32.\n\n" + WRONG + "\n\n12 + 30 = 42, so \\boxed{42}."},
    ]}]
    # prepare_data.py:171-174: x, y_init and P_r in the USER turn, y_revised alone in the assistant's; no
    # "<|im_end|>" appended (sft.py:242 appends it; slime's chat template writes the end token)
    assert stage2 == [{"messages": [
        {"role": "system", "content": OFFICIAL_MATH_SYSTEM},
        {"role": "user", "content": "What is 2 + 2?\n\n2 + 2 = 4.\n\n" + REPHRASE},
        {"role": "assistant", "content": "Adding two and two gives \\boxed{4}."},
    ]}]


def test_the_official_d_revision_json_list(tmp_path, capsys):
    """The official collection's output: a JSON list with x instead of prompt, and its other keys."""
    official = [
        {"x": "Compute 3 * 5.", "y_init": "3 * 5 = 8", "p_r": WRONG, "y_revised": "3 * 5 = 15, \\boxed{15}",
         "ground_truth": "15", "y_init_correct": False, "y_revised_correct": True, "y_init_extracted": "8",
         "y_revised_extracted": "15", "original_index": 4, "response_idx": 0, "revision_idx": 2},
        {"x": "Compute 6 / 2.", "y_init": "6 / 2 = 3", "p_r": REPHRASE, "y_revised": "Halving 6 gives \\boxed{3}",
         "ground_truth": "3", "y_init_correct": True, "y_revised_correct": True, "y_init_extracted": "3",
         "y_revised_extracted": "3", "original_index": 5, "response_idx": 1, "revision_idx": 0},
    ]
    source = tmp_path / "d_revision.json"
    source.write_text(json.dumps(official, indent=2), encoding="utf-8")
    code, out, err = run(capsys, "--input", source, "--output-dir", tmp_path / "o", "--stage2-size", "1", "--quiet")
    assert code == 0, err
    assert "a JSON list" in out and "official d_revision (x): 2" in out
    (stage1,) = read_jsonl(tmp_path / "o" / STAGE1)
    (stage2,) = read_jsonl(tmp_path / "o" / STAGE2)
    assert user_and_completion(stage1) == ("Compute 3 * 5.", "3 * 5 = 8\n\n" + WRONG + "\n\n3 * 5 = 15, \\boxed{15}")
    assert user_and_completion(stage2) == ("Compute 6 / 2.\n\n6 / 2 = 3\n\n" + REPHRASE, "Halving 6 gives \\boxed{3}")


def test_chat_prompts_keep_their_turns_and_their_own_system_turn(tmp_path, capsys):
    history = [
        {"role": "system", "content": "You are a careful tutor."},
        {"role": "user", "content": "Let us do arithmetic."},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "What is 9 squared?"},
    ]
    rows = [
        tuple_row(history, "9 + 9 = 18", "9 x 9 = \\boxed{81}"),
        tuple_row([{"role": "user", "content": "What is 5 - 7?"}], "5 - 7 = 2", "5 - 7 = \\boxed{-2}"),
        tuple_row(history, "81", "Squaring 9 gives \\boxed{81}", correct_init=True),
    ]
    stage1, stage2, out = split(capsys, tmp_path, rows, "--stage2-size", "1")
    by_x = {row["messages"][-2]["content"].split("\n")[0]: row["messages"] for row in stage1}
    earlier = [history[0], history[1], dict(history[2], step_loss_mask=0)]  # the history's answer is not trained on
    assert by_x["What is 9 squared?"] == earlier + [
        {"role": "user", "content": "What is 9 squared?"},
        {"role": "assistant", "content": "9 + 9 = 18\n\n" + WRONG + "\n\n9 x 9 = \\boxed{81}"},
    ]
    assert by_x["What is 5 - 7?"] == [  # chat messages without a system turn get the official one
        {"role": "system", "content": OFFICIAL_MATH_SYSTEM},
        {"role": "user", "content": "What is 5 - 7?"},
        {"role": "assistant", "content": "5 - 7 = 2\n\n" + WRONG + "\n\n5 - 7 = \\boxed{-2}"},
    ]
    assert stage2 == [{"messages": earlier + [
        {"role": "user", "content": "What is 9 squared?\n\n81\n\n" + REPHRASE},
        {"role": "assistant", "content": "Squaring 9 gives \\boxed{81}"},
    ]}]
    assert "2 tuple(s) keep their own" in out


@pytest.mark.parametrize("flags, system", [
    (["--system-prompt", "official_code"], OFFICIAL_CODE_SYSTEM),
    (["--system-prompt", "Solve it."], "Solve it."),
    (["--no-system-prompt"], None),
])
def test_system_prompt_choices(tmp_path, capsys, flags, system):
    stage1, stage2, _ = split(capsys, tmp_path, [tuple_row("A"), tuple_row("B", correct_init=True)],
                              "--stage2-size", "1", *flags)
    for (row,) in (stage1, stage2):
        expected_roles = ["user", "assistant"] if system is None else ["system", "user", "assistant"]
        assert [m["role"] for m in row["messages"]] == expected_roles
        if system is not None:
            assert row["messages"][0]["content"] == system


# ------------------------------------------------------------------------------------------------- split
CORRECT_INIT = {1, 4, 6, 8}
CRAFTED = [tuple_row(f"P{i}", f"init {i}", f"revised {i}", correct_init=i in CORRECT_INIT) for i in range(10)]
# What the official prepare_data.py wrote for CRAFTED (as a d_revision list, x = P<i>): {(stage2_size, seed): (stage-1
# problems in file order, stage-2 problems in file order)}
OFFICIAL_ORDER = {
    (6, 0): (["P2", "P0", "P9", "P5"], ["P8", "P1", "P3", "P6", "P7", "P4"]),
    (3, 0): (["P7", "P3", "P2", "P0", "P9", "P5"], ["P4", "P1", "P6"]),
    (6, 1): (["P9", "P0", "P7", "P2"], ["P4", "P3", "P1", "P6", "P8", "P5"]),
}


def problems(rows):
    return [row["messages"][-2]["content"].split("\n")[0] for row in rows]


@pytest.mark.parametrize("stage2_size, seed", sorted(OFFICIAL_ORDER))
def test_the_split_is_the_official_one_row_for_row(tmp_path, capsys, stage2_size, seed):
    stage1, stage2, out = split(capsys, tmp_path, CRAFTED, "--stage2-size", stage2_size, "--seed", seed)
    assert (problems(stage1), problems(stage2)) == OFFICIAL_ORDER[stage2_size, seed]
    # sizes: stage 2 the quota, correct-init first; stage 1 every other incorrect-init tuple, never a correct-init one
    correct = {f"P{i}" for i in CORRECT_INIT}
    assert len(stage2) == stage2_size
    if stage2_size >= len(correct):
        assert correct <= set(problems(stage2))
    else:
        assert set(problems(stage2)) <= correct
    assert not correct & set(problems(stage1)) and len(stage1) == 6 - max(0, stage2_size - len(correct))
    if stage2_size == 3:
        assert "note: 1 correct-init tuple(s) unused" in out


def test_the_same_split_from_the_official_file_format(tmp_path, capsys):
    official = [dict({k: v for k, v in row.items() if k != "prompt"}, x=row["prompt"]) for row in CRAFTED]
    source = tmp_path / "d_revision.json"
    source.write_text(json.dumps(official), encoding="utf-8")
    code, _, err = run(capsys, "--input", source, "--output-dir", tmp_path / "o", "--stage2-size", 6, "--quiet")
    assert code == 0, err
    assert (problems(read_jsonl(tmp_path / "o" / STAGE1)), problems(read_jsonl(tmp_path / "o" / STAGE2))) == \
        OFFICIAL_ORDER[6, 0]


def test_stage1_size_caps_stage_one(tmp_path, capsys):
    stage1, stage2, out = split(capsys, tmp_path, CRAFTED, "--stage2-size", 3, "--stage1-size", 2)
    assert problems(stage1) == OFFICIAL_ORDER[3, 0][0][:2] and problems(stage2) == OFFICIAL_ORDER[3, 0][1]
    assert "the first 2 of 6 (--stage1-size)" in out


def test_default_stage2_size_is_1000_and_an_empty_stage_one_fails(tmp_path, capsys):
    rows = [tuple_row(f"P{i}") for i in range(1005)] + [tuple_row("C", correct_init=True)]
    stage1, stage2, out = split(capsys, tmp_path, rows)
    assert (len(stage1), len(stage2)) == (6, 1000)
    assert "1 correct-init + 999 incorrect-init" in out
    source = write_jsonl(tmp_path / "few.jsonl", CRAFTED)
    code, _, err = run(capsys, "--input", source, "--output-dir", tmp_path / "few")
    assert code == 1 and "stage 1 would be empty" in err and "lower --stage2-size" in err
    assert not (tmp_path / "few").exists()


# ---------------------------------------------------------------------------------------------- cleaning
@pytest.mark.parametrize("text, expected", [
    # a block of at least 10 characters repeated at least 3 times at the end keeps one copy; the periodic run is
    # extended backward as far as it goes, so the ". " before the first copy joins it
    ("7 x 8 = 54. Let me check. " + "Let me check. " * 6, "7 x 8 = 54. Let me check"),
    ("abcdefghij" * 3, "abcdefghij"),
    ("intro " + "abcdefghij" * 2, "intro " + "abcdefghij" * 2),  # two copies are not a loop
    ("ab" * 20, "ab" * 5),  # shorter periods are found at the shortest allowed period, 10 characters
    ("a" * 29, "a" * 29),  # under 3 x 10 characters: left as it is
    ("a" * 30, "a" * 10),
    ("x" + "".join(chr(0x4E00 + i) for i in range(1501)) * 3,  # a period over 1500 characters is not looked for
     "x" + "".join(chr(0x4E00 + i) for i in range(1501)) * 3),
])
def test_repeating_tails(text, expected):
    assert trim_repeating_tail(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("You're absolutely right to question that! the sum is 42.", "The sum is 42."),
    ("you are right to ask. 42", "42"),
    ("Yes, you are right — 12 + 30 = 42.", "12 + 30 = 42."),
    ("Indeed you're absolutely right: it is 8.", "It is 8."),
    ("Thank you for pointing this out. Great question — good catch. we recompute.", "We recompute."),
    ("Nice observation - the answer is 3.", "The answer is 3."),
    ("  The answer is 42.", "The answer is 42."),  # left-stripped even without an opening
    ("You are right", "You are right"),  # no punctuation after "right": not an opening
    ("You\u2019re right, 42.", "You\u2019re right, 42."),  # a typographic apostrophe is not matched
    ("Thank you for\nthis. Done.", "Thank you for\nthis. Done."),  # an opening ends on its line
    ("", ""),
])
def test_sycophantic_openings(text, expected):
    assert strip_sycophantic_opening(text) == expected


def test_cleaning_in_the_cli_and_no_clean(tmp_path, capsys):
    rows = [tuple_row("Q", "You're right, 1. " + "loop, loop. " * 4, "Good point. the answer is \\boxed{2}.")]
    rows.append(tuple_row("R", correct_init=True))
    stage1, _, out = split(capsys, tmp_path, rows, "--stage2-size", "1")
    # y_init loses its repeating tail but never an opening; y_revised loses its opening
    assert user_and_completion(stage1[0])[1] == \
        "You're right, 1. loop, loop\n\n" + WRONG + "\n\nThe answer is \\boxed{2}."
    assert "repeating tails trimmed from 1 y_init and 0 y_revised; sycophantic openings stripped from 1" in out
    stage1, _, out = split(capsys, tmp_path, rows, "--stage2-size", "1", "--no-clean")
    assert user_and_completion(stage1[0])[1] == "\n\n".join((rows[0]["y_init"], WRONG, rows[0]["y_revised"]))
    assert "cleaning: off (--no-clean)" in out


# ----------------------------------------------------------------------------------------- filter, dedupe
def test_filter_and_dedupe(tmp_path, capsys):
    rows = [
        tuple_row("Q", "a", "B"),
        tuple_row("Q", "a", "B", p_r="Another phrase."),  # the same (x, y_init, y_revised): P_r is not in the key
        tuple_row("Q", "a", "C"),
        tuple_row("Q", "a", "Great question. B"),  # the same as the first once cleaned
        tuple_row("Q", "a", "D", revised_correct=False),  # only verified-correct revisions
        tuple_row([{"role": "user", "content": "Q"}], "a", "B"),  # a lone user turn is the same prompt as its text
        tuple_row([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "a", "B"),  # another one
        tuple_row("R", correct_init=True),
    ]
    stage1, _, out = split(capsys, tmp_path, rows, "--stage2-size", "1")
    completions = sorted((r["messages"][0]["content"], user_and_completion(r)[1]) for r in stage1)
    # the first of the duplicates is kept (its P_r)
    assert completions == [(OFFICIAL_MATH_SYSTEM, f"a\n\n{WRONG}\n\nB"), (OFFICIAL_MATH_SYSTEM, f"a\n\n{WRONG}\n\nC"),
                           ("S", f"a\n\n{WRONG}\n\nB")]
    assert "filtered out (y_revised_correct false): 1" in out
    assert "duplicates dropped (same x, y_init, y_revised): 3" in out
    stage1, _, out = split(capsys, tmp_path, rows, "--stage2-size", "1", "--no-clean")
    assert len(stage1) == 4 and "duplicates dropped (same x, y_init, y_revised): 2" in out


# ---------------------------------------------------------------------------------------------- bad rows
BAD_ROWS = [
    tuple_row("fine"),
    "{not json",
    {k: v for k, v in tuple_row("no y_init").items() if k != "y_init"},
    tuple_row("flag as text", y_init_correct="yes"),
    ["a", "list"],
    "",
    tuple_row([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]),
    dict(tuple_row("Q"), x="also x"),
    tuple_row("Q", y_revised="   "),
    tuple_row("Q", y_revised_reward="high"),
    tuple_row("C", correct_init=True),
]
BAD_LINES = {2: "unparseable_json", 3: "missing_key", 4: "bad_type", 5: "not_an_object", 7: "bad_messages",
             8: "ambiguous_prompt", 9: "empty_text", 10: "bad_type"}


def test_bad_rows_are_listed_with_their_line_and_nothing_is_written(tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / STAGE1).write_text("old\n")
    source = write_jsonl(tmp_path / "in.jsonl", BAD_ROWS)
    code, _, err = run(capsys, "--input", source, "--output-dir", out_dir)
    assert code == 1
    for line, code_name in BAD_LINES.items():
        assert f"row {line}: [{code_name}]" in err
    assert "key 'y_init' is missing" in err and "'y_init_correct' is 'yes'" in err
    assert "row 6" not in err and "row 1:" not in err and "row 11" not in err  # the blank line is skipped
    assert "nothing written" in err and "--skip-invalid" in err
    assert sorted(os.listdir(out_dir)) == [STAGE1] and (out_dir / STAGE1).read_text() == "old\n"


def test_bad_elements_of_a_json_list_are_numbered_by_position(tmp_path, capsys):
    source = tmp_path / "d_revision.json"
    source.write_text(json.dumps([tuple_row("a", key="x"), tuple_row("b", key="x", p_r=7), 3]), encoding="utf-8")
    code, _, err = run(capsys, "--input", source, "--output-dir", tmp_path / "o")
    assert code == 1 and "row 2: [bad_type] key 'p_r' is a int" in err and "row 3: [not_an_object]" in err
    assert not (tmp_path / "o").exists()


def test_skip_invalid_writes_the_good_rows_and_reports_the_bad(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", BAD_ROWS)
    code, out, err = run(capsys, "--input", source, "--output-dir", tmp_path / "o", "--stage2-size", 1,
                         "--skip-invalid", "--quiet")
    assert code == 0, err
    assert len(read_jsonl(tmp_path / "o" / STAGE1)) == 1 and len(read_jsonl(tmp_path / "o" / STAGE2)) == 1
    rejected = read_jsonl(tmp_path / "o" / REJECTED)
    assert {r["row"]: r["code"] for r in rejected} == BAD_LINES
    assert next(r for r in rejected if r["row"] == 2)["data"] == "{not json"
    assert "rows rejected: 8" in out and "row 3: [missing_key]" in out


def test_file_level_problems_are_usage_errors(tmp_path, capsys):
    bad_utf8 = tmp_path / "latin1.jsonl"
    latin1_line = json.dumps(tuple_row("caf\u00e9"), ensure_ascii=False).encode("latin-1")
    bad_utf8.write_bytes(json.dumps(tuple_row("ok")).encode() + b"\n" + latin1_line + b"\n")
    code, _, err = run(capsys, "--input", bad_utf8, "--output-dir", tmp_path / "o")
    assert code == 2 and "is not UTF-8: line 2" in err and not (tmp_path / "o").exists()
    broken_list = tmp_path / "d_revision.json"
    broken_list.write_text('[{"x": "a"},', encoding="utf-8")
    code, _, err = run(capsys, "--input", broken_list, "--output-dir", tmp_path / "o")
    assert code == 2 and "starts like a JSON list but does not parse" in err
    code, _, err = run(capsys, "--input", tmp_path / "missing.jsonl", "--output-dir", tmp_path / "o")
    assert code == 2 and "does not exist" in err
    (tmp_path / "a_file").write_text("")
    code, _, err = run(capsys, "--input", EXAMPLE, "--output-dir", tmp_path / "a_file")
    assert code == 2 and "is a file" in err
    code, _, err = run(capsys, "--input", EXAMPLE, "--output-dir", tmp_path / "o", "--stage2-size", 0)
    assert code == 2 and "--stage2-size must be >= 1" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(EXAMPLE), "--output-dir", str(tmp_path / "o"), "--stage2_size", "2"])
    assert exit_info.value.code == 2 and "did you mean --stage2-size?" in capsys.readouterr().err


def test_a_byte_order_mark_is_accepted(tmp_path, capsys):
    for name, text in (("in.jsonl", "\n".join(json.dumps(r) for r in CRAFTED)),
                       ("in.json", json.dumps([dict(r) for r in CRAFTED]))):
        source = tmp_path / name
        source.write_bytes(files.UTF8_BOM + b"\n  " + text.encode("utf-8"))
        code, _, err = run(capsys, "--input", source, "--output-dir", tmp_path / name.replace(".", "_"),
                           "--stage2-size", 6, "--quiet")
        assert code == 0, err


# ---------------------------------------------------------------------------------------------- writing
def test_outputs_get_the_usual_permissions(tmp_path, capsys):
    old_umask = os.umask(0o027)
    try:
        split(capsys, tmp_path, CRAFTED, "--stage2-size", 3)
    finally:
        os.umask(old_umask)
    for name in (STAGE1, STAGE2):
        assert stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) == 0o640
    assert sorted(os.listdir(tmp_path / "out")) == [STAGE1, STAGE2]


@pytest.mark.parametrize("failing_call", [1, 2])
def test_a_failed_write_leaves_the_outputs_as_they_were(tmp_path, capsys, monkeypatch, failing_call):
    """The disk fails while the first or the second output is written: neither output changes, nothing is left."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name in (STAGE1, STAGE2):
        (out_dir / name).write_text(f"old {name}\n")
    calls = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == failing_call:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    source = write_jsonl(tmp_path / "in.jsonl", CRAFTED)
    code, out, err = run(capsys, "--input", source, "--output-dir", out_dir, "--stage2-size", 3)
    assert code == 2 and "No space left on device" in err and "nothing was written" in err
    assert len(calls) == failing_call and "stage 1 (generation)" not in out
    assert sorted(os.listdir(out_dir)) == [STAGE1, STAGE2]  # no temporary or pending file is left
    for name in (STAGE1, STAGE2):
        assert (out_dir / name).read_text() == f"old {name}\n"


def test_a_failed_write_removes_the_directories_it_created(tmp_path, capsys, monkeypatch):
    def fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", fsync)
    source = write_jsonl(tmp_path / "in.jsonl", CRAFTED)
    code, _, err = run(capsys, "--input", source, "--output-dir", tmp_path / "new" / "dir", "--stage2-size", 3)
    assert code == 2 and "Input/output error" in err and not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------- slime's SFT loss mask
def _slime_sft_samples(tmp_path, monkeypatch, data_path, loss_mask_type):
    """The samples slime's real sft_rollout makes from ``data_path`` (read by slime's real Dataset, as
    --prompt-data with --input-key messages and no --apply-chat-template)."""
    import slime.rollout.sft_rollout as sft_rollout
    from slime.utils.data import Dataset

    dataset = Dataset(str(data_path), tokenizer=None, processor=None, max_length=None, prompt_key="messages")
    for name in ("TOKENIZER", "PROCESSOR", "MASK_GENERATOR"):
        monkeypatch.setattr(sft_rollout, name, None)  # the module caches them for the run's one checkpoint
    monkeypatch.setattr(sft_rollout, "load_processor", lambda *args, **kwargs: None)  # text only

    class DataBuffer:
        def get_samples(self, n):
            return [[sample] for sample in dataset.samples[:n]]

    args = types.SimpleNamespace(hf_checkpoint=save_tokenizer(tmp_path / f"tokenizer_{loss_mask_type}"),
                                 loss_mask_type=loss_mask_type, rollout_batch_size=len(dataset),
                                 rollout_global_dataset=True)
    return [sample for (sample,) in sft_rollout.generate_rollout(args, 0, DataBuffer())]


@needs_slime
@pytest.mark.parametrize("loss_mask_type", ["qwen", "qwen3"])
def test_slime_trains_on_exactly_the_assistant_completion(tmp_path, capsys, monkeypatch, loss_mask_type):
    from slime.utils.mask_utils import MultiTurnLossMaskGenerator

    history = [{"role": "user", "content": "Warm-up: 1 + 1?"}, {"role": "assistant", "content": "2"},
               {"role": "user", "content": "What is 12 + 30?"}]
    rows = [tuple_row("What is 12 + 30?", "12 + 30 = 32.", "12 + 30 = \\boxed{42}."),
            tuple_row(history, "32", "\\boxed{42}"),
            tuple_row("What is 2 + 2?", "4", "Two and two is \\boxed{4}.", correct_init=True)]
    split(capsys, tmp_path, rows, "--stage2-size", 1)
    tokenizer = make_tokenizer()
    generator = MultiTurnLossMaskGenerator(tokenizer, tokenizer_type=loss_mask_type)
    expected = {
        STAGE1: {"12 + 30 = 32.\n\n" + WRONG + "\n\n12 + 30 = \\boxed{42}.", "32\n\n" + WRONG + "\n\n\\boxed{42}"},
        STAGE2: {"Two and two is \\boxed{4}."},
    }
    for name, completions in expected.items():
        rows_written = read_jsonl(tmp_path / "out" / name)
        samples = _slime_sft_samples(tmp_path, monkeypatch, tmp_path / "out" / name, loss_mask_type)
        trained = set()
        for row, sample in zip(rows_written, samples):
            # the tokens are the chat template's rendering of the row; the loss covers the last assistant turn, up
            # to and including the end token the template writes (what sft.py's appended "<|im_end|>" stood for)
            rendered = tokenizer.apply_chat_template(row["messages"], tokenize=False)
            assert tokenizer.decode(sample.tokens) == rendered
            response = sample.tokens[-sample.response_length:]
            assert all(sample.loss_mask) and len(sample.loss_mask) == sample.response_length
            text = tokenizer.decode(response)
            assert text.endswith("<|im_end|>\n") and rendered.endswith("<|im_start|>assistant\n" + text)
            trained.add(text[:-len("<|im_end|>\n")])
            # the generator alone: exactly the completion's tokens, nothing of the earlier turns
            ids, mask = generator.get_loss_mask(row["messages"])
            assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == text
        assert trained == completions


# --------------------------------------------------------------------------------------------- the CLI
def test_the_example_end_to_end(tmp_path, capsys):
    code, out, err = run(capsys, "--input", EXAMPLE, "--output-dir", tmp_path / "srt", "--stage2-size", 2)
    assert code == 0, err
    assert "rows read: 9" in out and "collection (prompt): 9" in out
    assert "filtered out (y_revised_correct false): 1" in out
    assert "duplicates dropped (same x, y_init, y_revised): 1" in out
    assert "tuples kept: 7 (incorrect-init: 5, correct-init: 2)" in out
    assert f"stage 2 (revision): 2 rows (2 correct-init + 0 incorrect-init; --stage2-size 2) -> " \
           f"{tmp_path / 'srt' / STAGE2}" in out
    assert f"stage 1 (generation): 5 rows (incorrect-init, all remaining) -> {tmp_path / 'srt' / STAGE1}" in out
    assert f"----- first row of {STAGE1} -----" in out  # the preview, not with --quiet
    assert len(read_jsonl(tmp_path / "srt" / STAGE1)) == 5 and len(read_jsonl(tmp_path / "srt" / STAGE2)) == 2


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "slime_self_distill.sd_zero_data", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for text in ("--stage2-size", "--stage1-size", "--seed", "--no-clean", "--system-prompt", "--no-system-prompt",
                 "--skip-invalid", STAGE1, STAGE2, "USER turn", "<|im_end|>", "doubled", "exit status"):
        assert text in result.stdout, text
