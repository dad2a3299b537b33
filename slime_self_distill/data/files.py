"""Files, read and written the same way everywhere.

Row files (JSON lines, a JSON list, Parquet), shared by the data tools (``prepare_dataset --input``) and the
launcher's check of slime's ``--prompt-data`` (``data_source.read_prompt_rows``): a file-level problem raises
``RowFileError``, whose message continues the file's name ("<flag> <path> is not UTF-8: line 3, ..."); a JSON line
that does not parse is yielded as an ``UnparseableLine`` row, for the caller to report with the other bad rows.

Writes (``prepare_dataset``'s outputs, the EMA teacher's checkpoint shards) go to a temporary file in the target's
directory, renamed over the target once complete, with the permissions a new file gets under the user's umask.
Pure Python, plus pyarrow for Parquet.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable, Iterator

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


# ---------------------------------------------------------------------- writing
def new_file_mode() -> int:
    """The permissions ``open(path, "w")`` would give a new file under the current umask (mkstemp creates 0600)."""
    umask = os.umask(0)  # the umask can only be read by setting it
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """``write(binary file)`` into a temporary file beside ``path``, flushed to disk, then renamed over ``path``:
    a reader sees the old file or the whole new one, never a part; on failure the temporary file is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, new_file_mode())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
