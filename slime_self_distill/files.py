"""Row files, read the same way everywhere: JSON lines, a JSON list, Parquet.

Shared by the data tools (``prepare_dataset --input``) and the launcher's check of slime's ``--prompt-data``
(``data_source.read_prompt_rows``). Pure Python, plus pyarrow for Parquet. A file-level problem raises
``RowFileError``, whose message continues the file's name ("<flag> <path> is not UTF-8: line 3, ..."); a JSON line
that does not parse is yielded as an ``UnparseableLine`` row, for the caller to report with the other bad rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

UTF8_BOM = b"\xef\xbb\xbf"


class RowFileError(ValueError):
    """The file as a whole cannot be read as rows (not UTF-8, corrupt); the message follows the file's name."""


@dataclass(frozen=True)
class UnparseableLine:
    """A JSON line that does not parse: its text (without the line break) and the parser's error."""

    text: str
    error: str


def decode_utf8(raw: bytes, first_line: int, offset: int) -> str:
    """``raw`` (a line or a whole file, starting at byte ``offset`` of the file, on line ``first_line``) decoded; a
    ``RowFileError`` naming the line and the byte offset if it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise RowFileError(
            f"is not UTF-8: line {line}, byte offset {offset + e.start} holds {raw[e.start:e.end]!r}; convert the "
            "file to UTF-8 (e.g. iconv -f <its encoding> -t utf-8)"
        ) from None


def _bom_length(raw: bytes) -> int:
    return len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0


def _parse_json_lines(lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, Any]]:
    for line_number, line in lines:
        if not line.strip():
            continue  # slime's reader skips blank lines too
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as e:
            yield line_number, UnparseableLine(line.rstrip("\r\n"), str(e))


def jsonl_rows(path: str, *, accept_bom: bool) -> Iterator[tuple[int, Any]]:
    """(line number, row) of a JSON-lines file. ``accept_bom``: skip a UTF-8 byte order mark; without it, a first
    line that starts with one is unparseable, as it is for slime's reader (which prints and skips it)."""

    def lines() -> Iterator[tuple[int, str]]:
        with open(path, "rb") as f:  # bytes, so that a line that is not UTF-8 can be named with its byte offset
            offset = 0
            for line_number, raw in enumerate(f, start=1):
                skip = _bom_length(raw) if accept_bom and line_number == 1 else 0
                yield line_number, decode_utf8(raw[skip:], line_number, offset + skip)
                offset += len(raw)

    return _parse_json_lines(lines())


def json_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(position, row) of a JSON list, or (line number, row) of JSON lines in a .json file; a BOM is skipped."""
    with open(path, "rb") as f:
        raw = f.read()
    skip = _bom_length(raw)
    text = decode_utf8(raw[skip:], 1, skip)
    if not text.lstrip().startswith("["):
        # JSON lines in a .json file; split on "\n" only, as a JSONL file is read (str.splitlines would also split
        # inside strings holding U+2028 and similar characters, which JSON allows raw)
        return _parse_json_lines(enumerate(text.split("\n"), start=1))
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise RowFileError(f"starts like a JSON list but does not parse: {e}") from None
    return enumerate(rows, start=1)


def parquet_rows(path: str) -> tuple[int, Iterator[tuple[int, Any]]]:
    """(row count, iterator of (1-based position, row)) of a Parquet file, read batch by batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def corrupt(error: Exception) -> RowFileError:
        return RowFileError(f"is not a readable Parquet file ({error}); check that it was fully written (a "
                            "truncated copy fails like this)")

    try:
        parquet_file = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise corrupt(e) from None

    def rows() -> Iterator[tuple[int, Any]]:
        number = 0
        try:
            for batch in parquet_file.iter_batches():
                for row in batch.to_pylist():
                    number += 1
                    yield number, row
        except pa.ArrowException as e:
            raise corrupt(e) from None

    return parquet_file.metadata.num_rows, rows()
