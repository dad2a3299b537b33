"""``python -m slime_self_distill.extract_teacher_topk`` on a tiny Hugging Face teacher (hidden 32, 2 layers): the
stored top-K against a brute-force computation from the model's full forward, the output contract, bad rows, resume
after an interruption, two data-parallel ranks, atomic outputs, and ``TopKFile``'s random access."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import socket
import stat
import struct
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from slime_self_distill.data.sft_tokens import SftTokenizer
from slime_self_distill.extract_teacher_topk import main
from slime_self_distill.offline import extraction
from slime_self_distill.offline.topk_file import METADATA_KEY, TopKFile, TopKFileError, TopKFileInfo, TopKWriter
from tests.cli_support import read_jsonl, run_main, write_jsonl
from tests.slime_support import requires_slime
from tests.tiny_teacher import chat_rows, save_tiny_teacher

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOP_K = 5
ROW_COUNT = 12
VALUE_TOLERANCE = 1e-5  # float32 batched / chunked computation against a float64 log-softmax of one row's forward
TIE_TOLERANCE = 1e-6  # neighbouring values this close may come out in either order
ROLE_ALIASES_USED = {"bot": "assistant"}
OUTPUT_NAMES = ("teacher_topk.parquet", "data.jsonl", "rejected.jsonl")
PARQUET_MAGIC_BYTES = 12  # "PAR1" at both ends and the footer's 4-byte length
ORIGINAL_TEACHER_ROWS = extraction.Teacher.rows


# ---------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def input_rows():
    return chat_rows(ROW_COUNT)


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory, input_rows):
    return write_jsonl(tmp_path_factory.mktemp("input") / "chat.jsonl", input_rows)


def command_line(teacher_dir, input_path, output_dir, *flags) -> list:
    """The command's arguments, K = TOP_K unless ``flags`` give another --top-k (the last one counts)."""
    argv = ["--teacher", teacher_dir, "--input", input_path, "--output-dir", output_dir, "--top-k", TOP_K, "--quiet"]
    return [str(a) for a in argv + list(flags)]


def extract(teacher_dir, input_path, output_dir, *flags) -> int:
    return main(command_line(teacher_dir, input_path, output_dir, *flags))


@pytest.fixture(scope="session")
def extracted(tmp_path_factory, teacher_dir, chat_file):
    """``extracted(*flags)``: the output directory of a run on the chat rows with these flags (each run once)."""
    runs = {}

    def output_dir_of(*flags):
        if flags not in runs:
            output_dir = tmp_path_factory.mktemp("extracted")
            assert extract(teacher_dir, chat_file, output_dir, *flags) == 0
            runs[flags] = output_dir
        return runs[flags]

    return output_dir_of


@pytest.fixture(scope="session")
def hf_teacher(teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(teacher_dir)


def slime_tokens(tokenizer, messages, tools) -> tuple[list, list]:
    """Token ids and loss mask from slime's own SFT tokenisation (what ``sft_rollout`` trains on)."""
    from slime.utils.mask_utils import MultiTurnLossMaskGenerator

    tokens, mask = MultiTurnLossMaskGenerator(tokenizer, tokenizer_type="qwen").get_loss_mask(messages, tools=tools)
    return list(tokens), list(mask)


def sft_tokenizer_tokens(tokenizer, messages, tools) -> tuple[list, list]:
    """The same through ``SftTokenizer`` (checked against slime in tests/test_sft_tokens.py), for machines without
    slime."""
    sft = SftTokenizer(tokenizer, "qwen")(messages, tools)
    return list(sft.tokens), list(sft.loss_mask)


@pytest.fixture(scope="session")
def reference(hf_teacher):
    """``reference(data_row, values, temperature, tokenize)``: (tokens, loss mask, [trained tokens, vocab] float64
    values at the positions predicting the trained tokens) from the model's full forward of the row alone."""
    model, tokenizer = hf_teacher
    logits_of_tokens = {}

    @torch.no_grad()
    def values_of(data_row, values="logprobs", temperature=1.0, tokenize=sft_tokenizer_tokens):
        tokens, mask = tokenize(tokenizer, data_row["messages"], data_row.get("tools"))
        if tuple(tokens) not in logits_of_tokens:
            logits_of_tokens[tuple(tokens)] = model(input_ids=torch.tensor([tokens])).logits[0].double()
        predicting = torch.from_numpy(np.flatnonzero(np.asarray(mask) == 1) - 1)
        logits = logits_of_tokens[tuple(tokens)][predicting]
        if values == "logprobs":
            logits = torch.log_softmax(logits / temperature, dim=-1)
        return tokens, mask, logits.numpy()

    return values_of


def untied_slots(reference_values: np.ndarray, k: int) -> np.ndarray:
    """[n, k] bool: the slots of each row's top-k whose value is apart from both neighbours' (the last slot's lower
    neighbour is the (k+1)-th value), so that the id there is determined."""
    top = -np.sort(-reference_values, axis=1)[:, : k + 1]
    apart_from_next = top[:, :-1] - top[:, 1:] > TIE_TOLERANCE
    apart_from_previous = np.concatenate([np.ones((len(top), 1), dtype=bool), apart_from_next[:, :-1]], axis=1)
    return apart_from_next & apart_from_previous


def assert_top_k_of(reference_values: np.ndarray, ids: np.ndarray, values: np.ndarray, k: int) -> None:
    """``ids`` / ``values`` [n, k] are the top-k of each row of ``reference_values`` [n, vocab], by decreasing value."""
    assert ids.shape == values.shape == (len(reference_values), k)
    assert ids.dtype == np.int32 and values.dtype == np.float32
    order = np.argsort(-reference_values, axis=1, kind="stable")[:, :k]
    expected_values = np.take_along_axis(reference_values, order, axis=1)
    np.testing.assert_allclose(values, expected_values, rtol=0, atol=VALUE_TOLERANCE)
    at_stored_ids = np.take_along_axis(reference_values, ids.astype(np.int64), axis=1)
    np.testing.assert_allclose(values, at_stored_ids, rtol=0, atol=VALUE_TOLERANCE)
    assert all(len(set(row)) == k for row in ids.tolist()), "an id appears twice in one token's top-k"
    assert (np.diff(values, axis=1) <= 0).all(), "a token's entries are not by decreasing value"
    untied = untied_slots(reference_values, k)
    assert untied.mean() > 0.9, "the tiny teacher's logits tie too often for the ids to be checked"
    np.testing.assert_array_equal(ids[untied], order[untied])


def assert_same_top_k(reference_values: np.ndarray, expected: tuple, actual: tuple, k: int) -> None:
    """Two stored rows agree: values to VALUE_TOLERANCE, ids wherever the reference has no tie."""
    untied = untied_slots(reference_values, k)
    np.testing.assert_array_equal(actual[0][untied], expected[0][untied])
    np.testing.assert_allclose(actual[1], expected[1], rtol=0, atol=VALUE_TOLERANCE)


def stored_rows(output_dir) -> dict:
    """``{idx: (ids [n, K], values [n, K])}`` of every row of the top-K file, through ``TopKFile``."""
    topk = TopKFile(str(pathlib.Path(output_dir) / "teacher_topk.parquet"))
    held = pq.read_table(topk.path, columns=["idx"]).column("idx").to_pylist()
    return topk.rows(held)


def assert_same_output(reference, expected_dir, actual_dir, k: int = TOP_K) -> None:
    """Same data file (byte for byte), same metadata, and the same top-K row for row."""
    assert (actual_dir / "data.jsonl").read_bytes() == (expected_dir / "data.jsonl").read_bytes()
    assert TopKFile(str(actual_dir / "teacher_topk.parquet")).info == TopKFile(
        str(expected_dir / "teacher_topk.parquet")).info
    expected, actual = stored_rows(expected_dir), stored_rows(actual_dir)
    assert sorted(actual) == sorted(expected)
    for idx, data_row in enumerate(read_jsonl(actual_dir / "data.jsonl")):
        assert_same_top_k(reference(data_row)[2], expected[idx], actual[idx], k)


def normalised(row: dict) -> dict:
    """What the data file should hold for an input row, before its alignment record: roles by their canonical name
    and an assistant message with tool calls but no content given content ''."""
    messages = [{**m, "role": ROLE_ALIASES_USED.get(m["role"], m["role"]),
                 "content": "" if m.get("content") is None else m["content"]} for m in row["messages"]]
    return {**row, "messages": messages}


def sft_digest(tokens: list, mask: list) -> str:
    """The alignment record's digest: sha256 of the tokens (little-endian int32) then the mask bytes, 16 hex chars."""
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens) + bytes(mask)).hexdigest()[:16]


class TeacherCalls:
    """Records the idxs of the rows each ``Teacher.rows`` call computes; with ``interrupt_at`` the call of that number
    (0-based) raises KeyboardInterrupt instead, as a Ctrl-C or a killed job would stop the run."""

    def __init__(self, monkeypatch, interrupt_at=None):
        self.batches = []

        def rows(teacher, batch):
            if interrupt_at is not None and len(self.batches) == interrupt_at:
                raise KeyboardInterrupt
            self.batches.append([row.idx for row in batch])
            return ORIGINAL_TEACHER_ROWS(teacher, batch)

        monkeypatch.setattr(extraction.Teacher, "rows", rows)

    @property
    def idxs(self) -> list:
        return sorted(idx for batch in self.batches for idx in batch)


def write_a_part_per_row(monkeypatch) -> None:
    """Every row goes to a part file of its own at once (--part-size-mb cannot go below 1 MiB)."""
    original_add = extraction.PartWriter.add

    def add(writer, idx, ids, values):
        original_add(writer, idx, ids, values)
        writer.flush()

    monkeypatch.setattr(extraction.PartWriter, "add", add)


def part_idxs(output_dir) -> set:
    paths = sorted((pathlib.Path(output_dir) / ".parts").glob("part-*.parquet"))
    return {idx for path in paths for idx in pq.read_table(path, columns=["idx"]).column("idx").to_pylist()}


# ---------------------------------------------------------------------- 1. brute force
VALUE_SETTINGS = {  # flags -> (stored value kind, temperature)
    "logprobs": ((), "logprobs", 1.0),
    "logits": (("--values", "logits"), "logits", 1.0),
    "logprobs_temperature_2": (("--temperature", "2"), "logprobs", 2.0),
}
TRAINED_POSITION_SOURCES = [
    pytest.param(slime_tokens, id="slime_loss_mask", marks=requires_slime),
    pytest.param(sft_tokenizer_tokens, id="sft_tokenizer"),
]


@pytest.mark.parametrize("tokenize", TRAINED_POSITION_SOURCES)
@pytest.mark.parametrize("setting", sorted(VALUE_SETTINGS))
def test_stored_top_k_is_the_full_forward_top_k_at_every_trained_token(setting, tokenize, extracted, reference,
                                                                      input_rows):
    flags, value_kind, temperature = VALUE_SETTINGS[setting]
    output_dir = extracted(*flags)
    info = TopKFile(str(output_dir / "teacher_topk.parquet")).info
    assert (info.values, info.temperature, info.k) == (value_kind, temperature, TOP_K)
    data_rows = read_jsonl(output_dir / "data.jsonl")
    rows = stored_rows(output_dir)
    assert sorted(rows) == list(range(len(input_rows))) == [row["metadata"]["self_distill_topk"]["idx"]
                                                            for row in data_rows]
    for idx, data_row in enumerate(data_rows):
        tokens, mask, expected = reference(data_row, value_kind, temperature, tokenize)
        assert data_row["metadata"]["self_distill_topk"] == {
            "idx": idx, "digest": sft_digest(tokens, mask), "trained_tokens": sum(mask), "extraction": info.extraction}
        assert_top_k_of(expected, *rows[idx], TOP_K)


def test_the_rows_cover_system_messages_tool_turns_and_role_aliases(input_rows):
    roles = {m["role"] for row in input_rows for m in row["messages"]}
    assert {"system", "user", "tool", "bot", "assistant"} <= roles
    assert any(row.get("tools") for row in input_rows)
    assert any(sum(m["role"] in ("assistant", "bot") for m in row["messages"]) > 1 for row in input_rows)


BATCHING_FLAGS = {
    "chunk_rows_1": ("--chunk-rows", "1"),
    "chunk_rows_3_a_row_per_batch": ("--chunk-rows", "3", "--max-tokens-per-batch", "1"),
    "chunk_rows_large_small_batches": ("--chunk-rows", "100000", "--max-tokens-per-batch", "600"),
    "sorted_by_length": ("--sort-by-length", "--max-tokens-per-batch", "400"),
    "sorted_one_batch": ("--sort-by-length", "--max-tokens-per-batch", "1000000"),
}


@pytest.mark.parametrize("name", sorted(BATCHING_FLAGS))
def test_batching_chunking_and_sorting_give_the_same_file(name, extracted, reference):
    assert_same_output(reference, extracted(), extracted(*BATCHING_FLAGS[name]))


# ---------------------------------------------------------------------- 2. output contract
def test_schema_metadata_and_data_file(extracted, teacher_dir, hf_teacher, input_rows):
    output_dir = extracted()
    topk_path, data_path = output_dir / "teacher_topk.parquet", output_dir / "data.jsonl"
    model, tokenizer = hf_teacher

    schema = pq.read_schema(topk_path)
    assert schema.names == ["idx", "topk_indices", "topk_values"]
    assert schema.field("idx").type == pa.int64()
    for name, value_type in (("topk_indices", pa.int32()), ("topk_values", pa.float32())):
        assert pa.types.is_list(schema.field(name).type) and schema.field(name).type.value_type == value_type

    data_rows = read_jsonl(data_path)
    records = [row["metadata"]["self_distill_topk"] for row in data_rows]
    assert [record["idx"] for record in records] == list(range(len(input_rows)))
    for input_row, data_row, record in zip(input_rows, data_rows, records):
        expected = normalised(input_row)
        expected["metadata"] = {**input_row.get("metadata", {}), "self_distill_topk": record}
        assert data_row == expected

    metadata = json.loads(schema.metadata[METADATA_KEY])
    trained_tokens = [record["trained_tokens"] for record in records]
    assert metadata["k"] == TOP_K and metadata["values"] == "logprobs" and metadata["temperature"] == 1.0
    assert metadata["loss_mask_type"] == "qwen"
    assert metadata["rows"] == len(input_rows) and metadata["trained_tokens"] == sum(trained_tokens)
    assert metadata["data_file"] == "data.jsonl"
    assert metadata["data_sha256"] == hashlib.sha256(data_path.read_bytes()).hexdigest()
    assert metadata["vocab_size"] == model.get_output_embeddings().weight.shape[0]
    assert metadata["teacher"] == metadata["tokenizer"] == os.path.abspath(teacher_dir)
    assert metadata["chat_template_sha256"] == hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()

    table = pq.read_table(topk_path)
    entries = dict(zip(table.column("idx").to_pylist(),
                       pc.list_value_length(table.column("topk_indices")).to_pylist()))
    assert entries == {i: n * TOP_K for i, n in enumerate(trained_tokens)}
    assert pc.list_value_length(table.column("topk_values")).to_pylist() == pc.list_value_length(
        table.column("topk_indices")).to_pylist()
    assert (output_dir / "rejected.jsonl").read_bytes() == b""
    assert not (output_dir / ".parts").exists()


def footer_bytes(path) -> int:
    return pq.ParquetFile(path).metadata.serialized_size + PARQUET_MAGIC_BYTES


def test_storage_is_at_most_8k_plus_8_bytes_per_trained_token_beyond_the_footer(extracted):
    output_dir = extracted()
    topk_path = output_dir / "teacher_topk.parquet"
    trained_tokens = TopKFile(str(topk_path)).info.trained_tokens
    # the footer (schema, key-value metadata, row-group index: 1.9 KB here) is the only fixed overhead
    assert topk_path.stat().st_size <= (8 * TOP_K + 8) * trained_tokens + footer_bytes(topk_path)


def test_storage_per_trained_token_with_a_few_hundred_rows(tmp_path, teacher_dir):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 30?"},
                          {"role": "assistant", "content": f"{i} + 30 = {i + 30}."}]} for i in range(300)]
    output_dir = tmp_path / "out"
    top_k = 16
    assert extract(teacher_dir, write_jsonl(tmp_path / "many.jsonl", rows), output_dir, "--top-k", top_k) == 0
    topk_path = output_dir / "teacher_topk.parquet"
    trained_tokens = TopKFile(str(topk_path)).info.trained_tokens
    assert topk_path.stat().st_size / trained_tokens <= 8 * top_k + 8


def test_storage_bound_holds_for_ids_spread_over_a_large_vocabulary(tmp_path):
    # the tiny teacher's 469 ids would flatter any encoding; uniformly spread ids over a Qwen-sized vocabulary
    # are the hard case (a dictionary of them is larger than the ids themselves)
    rng = np.random.default_rng(0)
    top_k, vocab_size, path, trained_tokens = 64, 151_936, tmp_path / "spread.parquet", 0
    with TopKWriter(str(path)) as writer:
        for idx in range(300):
            n = int(rng.integers(1, 40))
            trained_tokens += n
            writer.add(idx, rng.integers(0, vocab_size, (n, top_k), dtype=np.int32),
                       rng.standard_normal((n, top_k)).astype(np.float32))
    assert path.stat().st_size / trained_tokens <= 8 * top_k + 8


# ---------------------------------------------------------------------- 3. bad rows
def bad_and_good_lines(input_rows) -> list:
    """JSON lines 1 and 6 are usable; 2-5 are not."""
    return [
        input_rows[0],
        '{"messages": [{"role": "user", "content": "unterminated',
        {"conversation": input_rows[1]["messages"]},
        {"messages": [{"role": "narrator", "content": "Once upon a time"}, {"role": "assistant", "content": "Hi."}]},
        {"messages": [{"role": "user", "content": "Nobody answers."}]},
        input_rows[1],
    ]


def test_bad_rows_fail_the_run_and_write_nothing(tmp_path, capsys, teacher_dir, input_rows):
    input_path = write_jsonl(tmp_path / "bad.jsonl", bad_and_good_lines(input_rows))
    output_dir = tmp_path / "out"
    code, _, err = run_main(main, capsys, *command_line(teacher_dir, input_path, output_dir))
    assert code == 1
    for row_number in (2, 3, 4, 5):
        assert f"row {row_number}:" in err
    assert "row 1:" not in err and "row 6:" not in err
    assert not output_dir.exists()


def test_skip_invalid_lists_bad_rows_with_their_row_numbers(tmp_path, teacher_dir, input_rows, extracted, reference):
    lines = bad_and_good_lines(input_rows)
    input_path = write_jsonl(tmp_path / "bad.jsonl", lines)
    output_dir = tmp_path / "out"
    assert extract(teacher_dir, input_path, output_dir, "--skip-invalid") == 0

    rejected = read_jsonl(output_dir / "rejected.jsonl")
    assert [entry["row"] for entry in rejected] == [2, 3, 4, 5]
    assert rejected[0]["data"] == lines[1] and "JSON" in rejected[0]["reason"]
    assert rejected[1]["data"] == lines[2] and "'messages'" in rejected[1]["reason"]
    assert "narrator" in rejected[2]["reason"]
    assert "assistant" in rejected[3]["reason"]

    data_rows = read_jsonl(output_dir / "data.jsonl")
    assert [row["metadata"]["self_distill_topk"]["idx"] for row in data_rows] == [0, 1]
    assert [row["messages"] for row in data_rows] == [normalised(input_rows[i])["messages"] for i in (0, 1)]
    rows, all_rows = stored_rows(output_dir), stored_rows(extracted())
    for idx, data_row in enumerate(data_rows):
        assert_same_top_k(reference(data_row)[2], all_rows[idx], rows[idx], TOP_K)


def test_max_length_leaves_out_longer_rows_and_numbers_the_rest_contiguously(tmp_path, teacher_dir, chat_file,
                                                                              input_rows, hf_teacher, extracted,
                                                                              reference):
    _, tokenizer = hf_teacher
    lengths = [len(sft_tokenizer_tokens(tokenizer, normalised(row)["messages"], row.get("tools"))[0])
               for row in input_rows]
    max_length = sorted(lengths)[len(lengths) // 2]
    kept = [i for i, length in enumerate(lengths) if length <= max_length]
    assert 0 < len(kept) < len(input_rows)
    output_dir = tmp_path / "out"
    assert extract(teacher_dir, chat_file, output_dir, "--max-length", max_length) == 0

    rejected = read_jsonl(output_dir / "rejected.jsonl")
    assert [entry["row"] for entry in rejected] == [i + 1 for i in range(len(input_rows)) if i not in kept]
    assert {entry["code"] for entry in rejected} == {"over_max_length"}
    data_rows = read_jsonl(output_dir / "data.jsonl")
    assert [row["metadata"]["self_distill_topk"]["idx"] for row in data_rows] == list(range(len(kept)))
    assert [row["messages"] for row in data_rows] == [normalised(input_rows[i])["messages"] for i in kept]
    rows, all_rows = stored_rows(output_dir), stored_rows(extracted())
    assert sorted(rows) == list(range(len(kept)))
    for idx, original_idx in enumerate(kept):
        assert_same_top_k(reference(data_rows[idx])[2], all_rows[original_idx], rows[idx], TOP_K)


# ---------------------------------------------------------------------- 4. resume
A_ROW_PER_BATCH = ("--max-tokens-per-batch", "1")


def test_resume_computes_only_the_rows_no_part_holds(tmp_path, monkeypatch, teacher_dir, chat_file, extracted,
                                                     reference):
    output_dir = tmp_path / "out"
    with monkeypatch.context() as patch:
        write_a_part_per_row(patch)
        interrupted = TeacherCalls(patch, interrupt_at=3)
        with pytest.raises(KeyboardInterrupt):
            extract(teacher_dir, chat_file, output_dir, *A_ROW_PER_BATCH)
    assert sorted(os.listdir(output_dir)) == [".parts"]
    assert len(interrupted.batches) == 3 and sorted(part_idxs(output_dir)) == interrupted.idxs

    resumed = TeacherCalls(monkeypatch)
    assert extract(teacher_dir, chat_file, output_dir, *A_ROW_PER_BATCH) == 0
    assert resumed.idxs == sorted(set(range(ROW_COUNT)) - set(interrupted.idxs))
    assert sorted(os.listdir(output_dir)) == sorted(OUTPUT_NAMES)
    assert_same_output(reference, extracted(), output_dir)


def test_interrupted_merge_leaves_no_output_and_resumes_without_computing(tmp_path, monkeypatch, teacher_dir,
                                                                         chat_file, extracted, reference):
    output_dir = tmp_path / "out"

    def interrupted_merge(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(extraction, "merge_parts", interrupted_merge)
        with pytest.raises(KeyboardInterrupt):
            extract(teacher_dir, chat_file, output_dir)
    assert sorted(os.listdir(output_dir)) == [".parts"]  # no temporary output left behind
    assert part_idxs(output_dir) == set(range(ROW_COUNT))

    resumed = TeacherCalls(monkeypatch)
    assert extract(teacher_dir, chat_file, output_dir) == 0
    assert resumed.batches == []
    assert_same_output(reference, extracted(), output_dir)


def test_a_finished_extraction_is_kept_unless_overwrite(tmp_path, monkeypatch, capsys, teacher_dir, chat_file,
                                                         extracted):
    output_dir = tmp_path / "out"
    assert extract(teacher_dir, chat_file, output_dir) == 0
    before = {name: (output_dir / name).read_bytes() for name in OUTPUT_NAMES}
    capsys.readouterr()

    again = TeacherCalls(monkeypatch)
    code, out, _ = run_main(main, capsys, *command_line(teacher_dir, chat_file, output_dir))
    assert code == 0 and "nothing to do" in out and again.batches == []

    code, _, err = run_main(main, capsys, *command_line(teacher_dir, chat_file, output_dir, "--top-k", TOP_K + 1))
    assert code == 2 and "finished extraction" in err and "--overwrite" in err
    assert {name: (output_dir / name).read_bytes() for name in OUTPUT_NAMES} == before and again.batches == []

    assert extract(teacher_dir, chat_file, output_dir, "--top-k", TOP_K + 1, "--overwrite") == 0
    assert TopKFile(str(output_dir / "teacher_topk.parquet")).info.k == TOP_K + 1 and again.batches


def leave_two_rows_in_parts(monkeypatch, teacher_dir, chat_file, output_dir) -> None:
    """An extraction interrupted at its third row, with a part file per finished row."""
    with monkeypatch.context() as patch:
        write_a_part_per_row(patch)
        TeacherCalls(patch, interrupt_at=2)
        with pytest.raises(KeyboardInterrupt):
            extract(teacher_dir, chat_file, output_dir, *A_ROW_PER_BATCH)


def test_changed_settings_are_refused_while_parts_exist_and_overwrite_starts_over(tmp_path, monkeypatch, capsys,
                                                                                  teacher_dir, chat_file, reference):
    output_dir = tmp_path / "out"
    leave_two_rows_in_parts(monkeypatch, teacher_dir, chat_file, output_dir)
    parts_before = sorted(os.listdir(output_dir / ".parts"))
    capsys.readouterr()

    other_k = TOP_K + 1
    code, _, err = run_main(main, capsys, *command_line(teacher_dir, chat_file, output_dir, "--top-k", other_k))
    assert code == 2 and "top_k" in err and "--overwrite" in err
    assert sorted(os.listdir(output_dir / ".parts")) == parts_before
    assert not (output_dir / "teacher_topk.parquet").exists()

    started_over = TeacherCalls(monkeypatch)
    assert extract(teacher_dir, chat_file, output_dir, "--top-k", other_k, "--overwrite") == 0
    assert started_over.idxs == list(range(ROW_COUNT))
    rows = stored_rows(output_dir)
    assert TopKFile(str(output_dir / "teacher_topk.parquet")).info.k == other_k
    for idx, data_row in enumerate(read_jsonl(output_dir / "data.jsonl")):
        assert_top_k_of(reference(data_row)[2], *rows[idx], other_k)


def test_a_run_failing_before_its_first_part_does_not_block_the_corrected_run(tmp_path, capsys, teacher_dir,
                                                                              chat_file, hf_teacher):
    model, _ = hf_teacher
    output_dir = tmp_path / "out"
    too_many = model.get_output_embeddings().weight.shape[0] + 1
    code, _, err = run_main(main, capsys, *command_line(teacher_dir, chat_file, output_dir, "--top-k", too_many))
    assert code == 2 and "--top-k" in err
    code, _, err = run_main(main, capsys, *command_line(teacher_dir, chat_file, output_dir))
    assert code == 0, err
    assert TopKFile(str(output_dir / "teacher_topk.parquet")).info.k == TOP_K


# ---------------------------------------------------------------------- 5. data parallel
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(argv: list) -> tuple[list, list]:
    """(exit codes, outputs) of two extraction ranks run as torchrun would (RANK, WORLD_SIZE, MASTER_*)."""
    port = free_port()
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        processes.append(subprocess.Popen([sys.executable, "-m", "slime_self_distill.extract_teacher_topk", *argv],
                                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=240)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return [process.returncode for process in processes], outputs


@pytest.mark.distributed
def test_two_ranks_merge_to_the_single_process_result(tmp_path, teacher_dir, chat_file, extracted, reference):
    output_dir = tmp_path / "out"
    # a row per batch: rank 0 takes the rows of even idx, which include every (long) tool-call row, so it is
    # usually the last to finish and does not wait for rank 1's part
    codes, outputs = run_two_ranks(command_line(teacher_dir, chat_file, output_dir, *A_ROW_PER_BATCH))
    assert codes == [0, 0], "\n".join(outputs)
    assert "wrote" in outputs[0] and "wrote" not in outputs[1]
    assert sorted(os.listdir(output_dir)) == sorted(OUTPUT_NAMES)
    assert_same_output(reference, extracted(), output_dir)


@pytest.mark.distributed
def test_rank_0s_refusal_of_old_parts_stops_every_rank_with_its_message(tmp_path, monkeypatch, teacher_dir, chat_file):
    output_dir = tmp_path / "out"
    leave_two_rows_in_parts(monkeypatch, teacher_dir, chat_file, output_dir)
    codes, outputs = run_two_ranks(command_line(teacher_dir, chat_file, output_dir, "--top-k", TOP_K + 1))
    assert codes == [2, 2], "\n".join(outputs)
    for output in outputs:  # rank 1 did not wait in a barrier for a rank 0 that had stopped
        assert "top_k" in output and "--overwrite" in output


# ---------------------------------------------------------------------- 6. atomic outputs, permissions
def test_outputs_are_0644_under_umask_022_and_failed_runs_leave_them_untouched(tmp_path, teacher_dir, chat_file,
                                                                             input_rows, hf_teacher):
    model, _ = hf_teacher
    output_dir = tmp_path / "out"
    umask = os.umask(0o022)
    try:
        assert extract(teacher_dir, chat_file, output_dir) == 0
    finally:
        os.umask(umask)
    for name in OUTPUT_NAMES:
        assert stat.S_IMODE((output_dir / name).stat().st_mode) == 0o644, name
    before = {name: (output_dir / name).read_bytes() for name in OUTPUT_NAMES}

    bad_input = write_jsonl(tmp_path / "bad.jsonl", input_rows[:2] + ["{not json"])
    assert extract(teacher_dir, bad_input, output_dir) == 1
    too_many = model.get_output_embeddings().weight.shape[0] + 1
    assert extract(teacher_dir, chat_file, output_dir, "--top-k", too_many) == 2
    assert {name: (output_dir / name).read_bytes() for name in OUTPUT_NAMES} == before
    assert not [name for name in os.listdir(output_dir) if name.endswith(".tmp")]


# ---------------------------------------------------------------------- 7. TopKFile
def topk_info(rows: int, trained_tokens: int, k: int, data_file: str = "data.jsonl") -> TopKFileInfo:
    return TopKFileInfo(k=k, values="logprobs", temperature=1.0, loss_mask_type="qwen", messages_key="messages",
                        tool_key="tools", metadata_key="metadata", teacher="/teacher",
                        tokenizer="/teacher", chat_template_sha256="0" * 64, vocab_size=1000, rows=rows,
                        trained_tokens=trained_tokens, data_file=data_file, data_sha256="0" * 64,
                        extraction="0" * 16)


def random_rows(rng, idxs, k: int) -> list:
    rows = []
    for idx in idxs:
        n = int(rng.integers(1, 10))
        values = -np.sort(-rng.standard_normal((n, k)).astype(np.float32), axis=1)
        rows.append((idx, rng.integers(0, 1000, (n, k), dtype=np.int32), values))
    return rows


def write_topk_file(path, rows: list, k: int, target_group_bytes: int, data_file: str = "data.jsonl") -> None:
    info = topk_info(len(rows), sum(len(ids) for _, ids, _ in rows), k, data_file)
    with TopKWriter(str(path), info.to_metadata(), target_group_bytes=target_group_bytes) as writer:
        for row in rows:
            writer.add(*row)


def test_random_access_by_idx_across_row_groups(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    k, count = 3, 40
    rows = random_rows(rng, rng.permutation(count).tolist(), k)  # written in no particular idx order
    path = tmp_path / "topk.parquet"
    write_topk_file(path, rows, k, target_group_bytes=256)
    assert pq.ParquetFile(path).num_row_groups >= 4

    topk = TopKFile(str(path))
    assert len(topk) == count
    by_idx = {idx: (ids, values) for idx, ids, values in rows}
    wanted = rng.choice(count, 15, replace=False).tolist()
    found = topk.rows(wanted + wanted[:3])  # repeated idxs are fine
    assert sorted(found) == sorted(wanted)
    for idx in wanted:
        np.testing.assert_array_equal(found[idx][0], by_idx[idx][0])
        np.testing.assert_array_equal(found[idx][1], by_idx[idx][1])

    groups_read = []
    read_row_group = topk._file.read_row_group
    monkeypatch.setattr(topk._file, "read_row_group", lambda group, **kw: groups_read.append(group)
                        or read_row_group(group, **kw))
    topk.rows([rows[-1][0]])
    assert groups_read == [pq.ParquetFile(path).num_row_groups - 1]  # only the group holding the row


def test_a_missing_idx_names_the_data_file(tmp_path):
    path = tmp_path / "topk.parquet"
    write_topk_file(path, random_rows(np.random.default_rng(2), range(5), 2), 2, 1 << 20,
                    data_file="my_rows.jsonl")
    with pytest.raises(TopKFileError, match=r"idx 7.*my_rows\.jsonl"):
        TopKFile(str(path)).rows([1, 7])


def test_a_repeated_idx_is_refused(tmp_path):
    path = tmp_path / "topk.parquet"
    write_topk_file(path, random_rows(np.random.default_rng(3), [0, 1, 2, 1], 2), 2, 1 << 20)
    with pytest.raises(TopKFileError, match="idx 1 more than once"):
        TopKFile(str(path))


@pytest.mark.parametrize("writer", ["topk_writer", "plain_pyarrow"])
def test_a_parquet_without_the_metadata_is_refused_clearly(tmp_path, writer):
    path = tmp_path / "topk.parquet"
    rows = random_rows(np.random.default_rng(4), range(3), 2)
    if writer == "topk_writer":
        with TopKWriter(str(path)) as topk_writer:
            for row in rows:
                topk_writer.add(*row)
    else:
        table = pa.table({"idx": [idx for idx, _, _ in rows],
                          "topk_indices": [ids.reshape(-1).tolist() for _, ids, _ in rows],
                          "topk_values": [values.reshape(-1).tolist() for _, _, values in rows]})
        pq.write_table(table, path)
    with pytest.raises(TopKFileError, match="no 'slime_self_distill.topk' metadata.*extract_teacher_topk"):
        TopKFile(str(path))
