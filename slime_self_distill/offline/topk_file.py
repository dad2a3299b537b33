"""The teacher top-K file: one Parquet row per data row, ``idx: int64, topk_indices: list<int32>, topk_values:
list<float32>``, the lists flattened ``[trained tokens x K]`` (K per token, in the order of the tokens, each token's
K entries by decreasing value). What is needed to read and check it is in the file's key-value metadata
(``TopKFileInfo``); the data file written beside it holds the rows, in idx order, with each row's alignment record.

Row ``idx`` of the data file and the Parquet row with that idx belong together; the Parquet rows themselves may be
in any order (extraction writes them in the order they were computed). Row groups are small (about
``TARGET_GROUP_BYTES``) so that a training batch of random rows reads little more than it needs: ``TopKFile`` maps
each idx to its row group from the idx column alone (8 bytes a row) and decodes only the groups it is asked for.

Storage: ``8 K`` bytes per trained token (int32 id + float32 value) plus, per row, the idx (8 bytes) and two list
offsets; written without compression (log-probabilities do not compress, and reading stays a plain copy).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np

METADATA_KEY = b"slime_self_distill.topk"
FORMAT_VERSION = 1
VALUE_KINDS = ("logprobs", "logits")
COLUMNS = ("idx", "topk_indices", "topk_values")
# The data file's per-row record (under the row's metadata): {"idx": int, "digest": str, "trained_tokens": int,
# "extraction": str}.
ROW_RECORD_KEY = "self_distill_topk"
TARGET_GROUP_BYTES = 1 << 20


class TopKFileError(ValueError):
    """A teacher top-K file that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class TopKFileInfo:
    """What a top-K file holds and how it was made: K, the value kind, and everything the training side checks."""

    k: int
    values: str  # "logprobs" (log-softmax at --temperature) or "logits" (raw)
    temperature: float
    loss_mask_type: str  # slime's --loss-mask-type the rows were tokenized with
    messages_key: str  # the data file's chat messages column (slime's --input-key)
    tool_key: str  # its tools column (slime's --tool-key; "" for none)
    metadata_key: str  # its metadata column (slime's --metadata-key)
    teacher: str
    tokenizer: str
    chat_template_sha256: str
    vocab_size: int  # the teacher's logits width: every id is below it
    rows: int
    trained_tokens: int
    data_file: str  # the data file's name, beside the Parquet file
    data_sha256: str
    extraction: str  # the extraction's id, also in every record of its data file
    format: int = FORMAT_VERSION

    def to_metadata(self) -> dict:
        return {METADATA_KEY: json.dumps(dataclasses.asdict(self), sort_keys=True).encode()}

    @classmethod
    def from_metadata(cls, metadata: Optional[dict], path: str) -> "TopKFileInfo":
        raw = (metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise TopKFileError(
                f"{path!r} has no {METADATA_KEY.decode()!r} metadata: it was not written by python -m "
                "slime_self_distill.extract_teacher_topk (a file of the same columns from another tool lacks what the "
                "training side checks: K, the value kind, the tokenization); extract it with that command"
            )
        fields = json.loads(raw)
        if fields.get("format") != FORMAT_VERSION:
            raise TopKFileError(f"{path!r} is format {fields.get('format')}, this version reads format "
                                f"{FORMAT_VERSION}; extract it again with this version")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(fields))
        if missing:
            raise TopKFileError(f"{path!r}: its metadata lacks {', '.join(missing)}; extract it again")
        return cls(**{name: fields[name] for name in names})

    def data_path(self, topk_path: str) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(topk_path)), self.data_file)


def bytes_per_row(trained_tokens: int, k: int) -> int:
    """Uncompressed bytes of one row: idx, two list offsets, and K ids and values per trained token."""
    return 8 + 2 * 4 + 8 * k * trained_tokens


def arrow_schema(metadata: Optional[dict] = None):
    import pyarrow as pa

    schema = pa.schema([("idx", pa.int64()), ("topk_indices", pa.list_(pa.int32())),
                        ("topk_values", pa.list_(pa.float32()))])
    return schema.with_metadata(metadata) if metadata else schema


def rows_table(idxs: list, indices: list, values: list, metadata: Optional[dict] = None):
    """An Arrow table of rows: ``indices[i]`` / ``values[i]`` are ``[n_i, K]`` int32 / float32 arrays."""
    import pyarrow as pa

    lengths = np.array([a.size for a in indices], dtype=np.int64)
    offsets = np.zeros(len(indices) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat_ids = np.concatenate([a.reshape(-1) for a in indices]) if indices else np.zeros(0, np.int32)
    flat_values = np.concatenate([a.reshape(-1) for a in values]) if values else np.zeros(0, np.float32)
    return pa.Table.from_arrays(
        [pa.array(np.asarray(idxs, dtype=np.int64)),
         pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_ids.astype(np.int32, copy=False))),
         pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_values.astype(np.float32, copy=False)))],
        schema=arrow_schema(metadata),
    )


class TopKWriter:
    """Rows into ``sink`` (a path or a binary file; callers write through a temporary file and rename it), in row
    groups of about ``target_group_bytes``; closed on leaving the ``with`` block."""

    def __init__(self, sink, metadata: Optional[dict] = None, target_group_bytes: int = TARGET_GROUP_BYTES):
        import pyarrow.parquet as pq

        self.metadata, self.target_group_bytes = metadata, target_group_bytes
        self._writer = pq.ParquetWriter(sink, arrow_schema(metadata), compression="none", write_statistics=False,
                                        use_dictionary=False)
        self._pending: tuple[list, list, list] = ([], [], [])
        self._pending_bytes = 0

    def add(self, idx: int, indices: np.ndarray, values: np.ndarray) -> None:
        idxs, ids, vals = self._pending
        idxs.append(int(idx))
        ids.append(indices)
        vals.append(values)
        self._pending_bytes += indices.nbytes + values.nbytes + 16
        if self._pending_bytes >= self.target_group_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._pending[0]:
            table = rows_table(*self._pending, metadata=self.metadata)
            self._writer.write_table(table, row_group_size=table.num_rows)
        self._pending, self._pending_bytes = ([], [], []), 0

    def __enter__(self) -> "TopKWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self._flush()
        self._writer.close()


def iter_rows(parquet_file, k: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(idx, indices [n, K], values [n, K])`` of every row of an open ``pyarrow.parquet.ParquetFile``, one row group
    at a time."""
    for group in range(parquet_file.num_row_groups):
        yield from _group_rows(parquet_file.read_row_group(group, columns=list(COLUMNS)), k, parquet_file)


def _group_rows(table, k: int, where, keep: Optional[set] = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    idxs = table.column("idx").to_numpy()
    ids_column = table.column("topk_indices").combine_chunks()
    values_column = table.column("topk_values").combine_chunks()
    offsets = ids_column.offsets.to_numpy()
    if not np.array_equal(offsets, values_column.offsets.to_numpy()):
        raise TopKFileError(f"{where}: topk_indices and topk_values differ in length in some row; the file is corrupt")
    flat_ids = ids_column.values.to_numpy(zero_copy_only=False)
    flat_values = values_column.values.to_numpy(zero_copy_only=False)
    for row, idx in enumerate(idxs):
        if keep is not None and int(idx) not in keep:
            continue
        start, end = offsets[row], offsets[row + 1]
        if (end - start) % k:
            raise TopKFileError(f"{where}: row idx {idx} holds {end - start} entries, not a multiple of K={k}")
        yield int(idx), flat_ids[start:end].reshape(-1, k).copy(), flat_values[start:end].reshape(-1, k).copy()


def read_idx_column(parquet_file) -> np.ndarray:
    return parquet_file.read(columns=["idx"]).column("idx").to_numpy()


class TopKFile:
    """Random access by idx to a teacher top-K file (``rows``), reading only the row groups that hold the rows."""

    def __init__(self, path: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        if os.path.isdir(path):
            inside = os.path.join(path, "teacher_topk.parquet")
            hint = f"give the file inside it, {inside!r}" if os.path.isfile(inside) else "give the teacher_topk.parquet"
            raise TopKFileError(f"teacher top-K file {path!r} is a directory; {hint}")
        if not os.path.isfile(path):
            raise TopKFileError(f"teacher top-K file {path!r} does not exist; write it with python -m "
                                "slime_self_distill.extract_teacher_topk")
        try:
            self._file = pq.ParquetFile(path)
        except pa.ArrowException as e:
            raise TopKFileError(f"{path!r} is not a readable Parquet file ({e}): give the teacher_topk.parquet that "
                                "extract_teacher_topk wrote (not its data file), fully copied") from None
        self.info = TopKFileInfo.from_metadata(self._file.schema_arrow.metadata, path)
        names = tuple(self._file.schema_arrow.names)
        if names != COLUMNS:
            raise TopKFileError(f"{path!r} has columns {names}, expected {COLUMNS}")
        group_sizes = [self._file.metadata.row_group(g).num_rows for g in range(self._file.num_row_groups)]
        idxs = read_idx_column(self._file)
        if len(idxs) != self.info.rows:
            raise TopKFileError(f"{path!r} holds {len(idxs)} rows, its metadata says {self.info.rows}; the file is "
                                "incomplete: extract it again")
        self._order = np.argsort(idxs, kind="stable")
        self._sorted_idxs = idxs[self._order]
        repeated = self._sorted_idxs[1:][self._sorted_idxs[1:] == self._sorted_idxs[:-1]]
        if repeated.size:
            raise TopKFileError(f"{path!r} holds idx {int(repeated[0])} more than once; the file is corrupt")
        self._group_of_position = np.repeat(np.arange(len(group_sizes)), group_sizes)
        self._group_start = np.concatenate([[0], np.cumsum(group_sizes)])

    def __len__(self) -> int:
        return len(self._sorted_idxs)

    def _position(self, idx: int) -> int:
        at = int(np.searchsorted(self._sorted_idxs, idx))
        if at == len(self._sorted_idxs) or self._sorted_idxs[at] != idx:
            raise TopKFileError(f"{self.path!r} has no row with idx {idx} (it holds {len(self)} rows); the data file "
                                "and the top-K file do not belong together: use the data file extraction wrote "
                                f"beside it ({self.info.data_file})")
        return int(self._order[at])

    def rows(self, idxs: Iterable[int]) -> dict:
        """``{idx: (indices [n, K] int32, values [n, K] float32)}``, reading each needed row group once."""
        wanted: dict = {}
        for idx in idxs:
            position = self._position(int(idx))
            wanted.setdefault(int(self._group_of_position[position]), set()).add(int(idx))
        found = {}
        for group, group_idxs in sorted(wanted.items()):
            table = self._file.read_row_group(group, columns=list(COLUMNS))
            for idx, ids, values in _group_rows(table, self.info.k, f"{self.path!r} row group {group}", group_idxs):
                found[idx] = (ids, values)
        return found
