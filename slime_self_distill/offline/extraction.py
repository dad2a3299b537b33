"""``python -m slime_self_distill.extract_teacher_topk``: a Hugging Face teacher's top-K log-probabilities at every
token slime's SFT path trains on, into ``<output-dir>/teacher_topk.parquet`` (``topk_file``) and the data file slime
reads, ``<output-dir>/data.jsonl`` (the usable rows, roles normalised, each carrying its alignment record).

Rows are tokenized exactly as slime's ``sft_rollout`` does (``data.sft_tokens``, any ``--loss-mask-type``); a
trained token at position p is predicted by the teacher's logits at p - 1, which are computed from the final hidden
states ``chunk_rows`` rows at a time through the model's own output layer (no ``[T, V]`` float32 copy).

Resumable and data-parallel: work goes into ``<output-dir>/.parts/`` as part files written atomically (rows complete
and final); a run started again with the same settings computes only the rows no part holds. Under ``torchrun``
each rank takes every WORLD_SIZE-th batch of the (length-sorted) row list; rank 0 waits until the parts hold every
row, merges them into the final file and writes the data file, both renamed into place together, then removes the
parts. The output directory must be shared by all ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from slime_self_distill.data.cli import (
    EXIT_BAD_DATA,
    EXIT_OK,
    MAX_LISTED,
    BadRow,
    PendingOutputs,
    UsageError,
    counts,
    json_lines_writer,
    print_bad_rows,
    rejected_writer,
)
from slime_self_distill.data.files import UnparseableLine, write_atomically
from slime_self_distill.data.sft_tokens import (
    LOSS_MASK_TYPES,
    ChatRowError,
    SftTokenizer,
    normalise_messages,
    row_tools,
)
from slime_self_distill.offline.topk_file import (
    ROW_RECORD_KEY,
    VALUE_KINDS,
    TopKFileInfo,
    TopKWriter,
    bytes_per_row,
    iter_rows,
    read_idx_column,
)

TOPK_FILE_NAME = "teacher_topk.parquet"
DATA_FILE_NAME = "data.jsonl"
REJECTED_FILE_NAME = "rejected.jsonl"
PARTS_DIR_NAME = ".parts"
SETTINGS_FILE_NAME = "settings.json"
PROGRESS_INTERVAL_S = 60.0
MERGE_POLL_S = 1.0
LOGITS_CHECK_TOKENS = 64


@dataclass(frozen=True)
class Row:
    idx: int
    number: int  # the input's row number (line number for JSON lines)
    tokens: np.ndarray  # int32, the whole sequence
    predicting: np.ndarray  # int64: positions whose logits predict the trained tokens (trained position - 1)


@dataclass(frozen=True)
class Plan:
    rows: list  # Row, by idx
    aligned: list  # the data file's rows, by idx
    bad: list  # BadRow: rows that cannot be used
    too_long: list  # BadRow: rows over --max-length, left out


# ---------------------------------------------------------------------- rows
def _check_row(data: Any, args: argparse.Namespace, where: str) -> tuple[list, Optional[list], dict]:
    if isinstance(data, UnparseableLine):
        raise ChatRowError(f"{where}: not valid JSON ({data.error})")
    if not isinstance(data, dict):
        raise ChatRowError(f"{where}: a row must be a JSON object with a {args.messages_key!r} list, got "
                           f"{type(data).__name__}")
    if args.messages_key not in data:
        raise ChatRowError(f"{where}: no {args.messages_key!r} column (columns: {sorted(data)}); name the chat "
                           "messages column with --messages-key")
    messages = normalise_messages(data[args.messages_key], where)
    metadata = data.get(args.metadata_key) or {}
    if not isinstance(metadata, dict):
        raise ChatRowError(f"{where}: {args.metadata_key!r} must be an object (slime's --metadata-key), got "
                           f"{type(metadata).__name__}")
    return messages, row_tools(data, args.tool_key, metadata, where), metadata


def plan_rows(rows, tokenizer: Callable, args: argparse.Namespace, report: Optional[Callable[[int], None]] = None
              ) -> Plan:
    """Tokenize every row as slime's SFT rollout will; number the usable ones (idx) in input order. ``report(rows
    read)`` is called after each row."""
    plan = Plan([], [], [], [])
    for number, data in rows:
        if report is not None:
            report(len(plan.rows) + len(plan.bad) + len(plan.too_long))
        where = f"row {number}"
        try:
            messages, tools, metadata = _check_row(data, args, where)
            sft = tokenizer(messages, tools)
        except ChatRowError as e:
            plan.bad.append(BadRow(number, "bad_row", str(e).removeprefix(f"{where}: "), data))
            continue
        except Exception as e:  # noqa: BLE001 - a chat template failing on one row is that row's error
            plan.bad.append(BadRow(number, "chat_template_failed", f"the chat template failed: {e}", data))
            continue
        trained = np.asarray(sft.trained_positions, dtype=np.int64)
        if trained.size == 0:
            plan.bad.append(BadRow(number, "no_trained_tokens", "no assistant token is trained (every "
                                   "assistant message has step_loss_mask 0, or the template marks none)", data))
            continue
        if trained[0] == 0:
            plan.bad.append(BadRow(number, "first_token_trained", "the first token is trained, so no "
                                   "logits predict it; the chat template renders nothing before the assistant", data))
            continue
        if args.max_length is not None and len(sft.tokens) > args.max_length:
            plan.too_long.append(BadRow(number, "over_max_length", f"{len(sft.tokens)} tokens, over "
                                        f"--max-length {args.max_length}", data))
            continue
        idx = len(plan.rows)
        aligned = dict(data)
        aligned[args.messages_key] = messages
        if args.tool_key and args.tool_key in data:
            aligned[args.tool_key] = tools
        aligned[args.metadata_key] = {**metadata, ROW_RECORD_KEY: {
            "idx": idx, "digest": sft.digest(), "trained_tokens": int(trained.size)}}
        plan.aligned.append(aligned)
        plan.rows.append(Row(idx, number, np.asarray(sft.tokens, dtype=np.int32), trained - 1))
    return plan


def batches_of(rows: list, max_tokens: int) -> list:
    """Consecutive rows grouped so that a batch's padded size (rows x longest row) stays within ``max_tokens``; a
    row longer than that is a batch of its own."""
    batches, current, longest = [], [], 0
    for row in rows:
        length = len(row.tokens)
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(row)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches


def ordered(rows: list, sort_by_length: bool) -> list:
    """Longest first with --sort-by-length (less padding, and a batch too large fails at the start)."""
    return sorted(rows, key=lambda row: -len(row.tokens)) if sort_by_length else list(rows)


# ---------------------------------------------------------------------- the teacher
def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_teacher(path: str, dtype: torch.dtype, device: torch.device):
    import transformers

    if not os.path.isdir(path):
        raise UsageError(f"--teacher {path!r} is not a directory; give a local Hugging Face checkpoint directory")
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_keyword = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **{dtype_keyword: dtype},
                                                                  trust_remote_code=True)
    except Exception as e:  # noqa: BLE001 - any load failure is one line naming the checkpoint
        raise UsageError(f"--teacher {path!r} does not load as a Hugging Face causal LM: {e}") from None
    return model.to(device).eval()


class Teacher:
    """The model's decoder (its ``base_model``) for the final hidden states, and its output layer for the logits of
    the rows needed, a chunk at a time."""

    def __init__(self, model, k: int, values: str, temperature: float, chunk_rows: int):
        self.model, self.k, self.values, self.temperature, self.chunk_rows = model, k, values, temperature, chunk_rows
        self.decoder = model.base_model
        self.head = model.get_output_embeddings()
        if self.decoder is model or self.head is None:
            raise UsageError(f"the teacher ({type(model).__name__}) has no separate decoder and output layer; "
                             "extraction needs a causal LM with get_output_embeddings()")
        self.vocab_size = int(self.head.weight.shape[0])
        if k > self.vocab_size:
            raise UsageError(f"--top-k {k} is larger than the teacher's vocabulary ({self.vocab_size})")
        self.checked = False
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def hidden_states(self, batch: list) -> tuple[torch.Tensor, list]:
        """The decoder's final hidden states of a right-padded batch, and each row's positions in its flattening."""
        longest = max(len(row.tokens) for row in batch)
        input_ids = torch.zeros((len(batch), longest), dtype=torch.long)
        attention = torch.zeros((len(batch), longest), dtype=torch.long)
        for b, row in enumerate(batch):
            input_ids[b, : len(row.tokens)] = torch.from_numpy(row.tokens.astype(np.int64))
            attention[b, : len(row.tokens)] = 1
        output = self.decoder(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                              use_cache=False)
        hidden = output[0]
        flat = [torch.from_numpy(row.predicting) + b * longest for b, row in enumerate(batch)]
        return hidden.reshape(-1, hidden.shape[-1]), flat

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Top-K ids (int32) and values (float32) of ``hidden`` [N, H], each chunk's logits in float32 only."""
        ids, values = [], []
        for start in range(0, hidden.shape[0], self.chunk_rows):
            logits = self.head(hidden[start: start + self.chunk_rows]).float()
            top_values, top_ids = logits.topk(self.k, dim=-1)
            if self.values == "logprobs":
                logits /= self.temperature
                top_values = top_values / self.temperature - torch.logsumexp(logits, dim=-1, keepdim=True)
            ids.append(top_ids.to(torch.int32).cpu())
            values.append(top_values.cpu())
        return torch.cat(ids).numpy(), torch.cat(values).numpy()

    @torch.no_grad()
    def check_logits(self, row: Row) -> None:
        """Once: the model's own logits must be its output layer applied to the decoder's final hidden states (a model
        that soft-caps or scales its logits after the output layer would give other top-K values). On the row's first
        ``LOGITS_CHECK_TOKENS`` tokens: the model's full logits of a long row would not fit beside a large teacher."""
        tokens = torch.from_numpy(row.tokens[:LOGITS_CHECK_TOKENS].astype(np.int64))[None].to(self.device)
        positions = torch.arange(max(0, tokens.shape[1] - 8), tokens.shape[1], device=self.device)
        expected = self.model(input_ids=tokens, use_cache=False).logits[0, positions].float()
        hidden = self.decoder(input_ids=tokens, use_cache=False)[0][0, positions]
        ours = self.head(hidden).float()
        tolerance = 4 * torch.finfo(hidden.dtype).eps * (1 + expected.abs().max())
        if not torch.allclose(ours, expected, rtol=0, atol=float(tolerance)):
            raise UsageError(
                f"the teacher's logits are not its output layer applied to its final hidden states (largest "
                f"difference {(ours - expected).abs().max():.3g}): {type(self.model).__name__} transforms them after "
                "the output layer (soft-capping or scaling), which extraction does not reproduce"
            )
        self.checked = True

    def rows(self, batch: list) -> list:
        """``(row, ids [n, K], values [n, K])`` for each row of ``batch``."""
        if not self.checked:
            self.check_logits(batch[0])
        hidden, positions = self.hidden_states(batch)
        ids, values = self.topk(hidden[torch.cat(positions).to(hidden.device)])
        out, start = [], 0
        for row in batch:
            end = start + len(row.predicting)
            out.append((row, ids[start:end], values[start:end]))
            start = end
        return out


# ---------------------------------------------------------------------- parts, resume, merge
@dataclass(frozen=True)
class Rank:
    rank: int
    world: int

    @classmethod
    def from_env(cls) -> "Rank":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def name(self) -> str:
        return f"rank {self.rank} of {self.world}"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def settings_fingerprint(args: argparse.Namespace, tokenizer, plan: Plan, dtype: torch.dtype) -> dict:
    """What the stored values depend on; parts made under other settings are not reused."""
    rows_digest = hashlib.sha256()
    for aligned in plan.aligned:
        rows_digest.update(aligned[args.metadata_key][ROW_RECORD_KEY]["digest"].encode())
    return {
        "teacher": os.path.abspath(args.teacher), "tokenizer": os.path.abspath(args.tokenizer or args.teacher),
        "chat_template_sha256": chat_template_sha256(tokenizer), "loss_mask_type": args.loss_mask_type,
        "top_k": args.top_k, "values": args.values, "temperature": args.temperature, "dtype": str(dtype),
        "rows": len(plan.rows), "rows_sha256": rows_digest.hexdigest(),
    }


def chat_template_sha256(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest()


def prepare_parts_dir(parts_dir: str, fingerprint: dict, overwrite: bool) -> None:
    """Create the parts directory for these settings, or check that the one there was made with them."""
    settings_path = os.path.join(parts_dir, SETTINGS_FILE_NAME)
    if overwrite and os.path.isdir(parts_dir):
        shutil.rmtree(parts_dir)
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            earlier = json.load(f)
        changed = sorted(key for key in set(earlier) | set(fingerprint) if earlier.get(key) != fingerprint.get(key))
        if not changed:
            return
        # settings that differ matter only when parts were made with them: a run that failed before its first
        # part (e.g. --top-k over the vocabulary) leaves only the settings, which are simply replaced
        if part_paths(parts_dir):
            raise UsageError(
                f"{parts_dir!r} holds the parts of an unfinished extraction made with other settings "
                f"({', '.join(changed)} differ); run it again with the same settings to finish it, or pass --overwrite "
                "to start over"
            )
    os.makedirs(parts_dir, exist_ok=True)
    write_atomically(settings_path, lambda f: f.write(json.dumps(fingerprint, indent=1, sort_keys=True).encode()))


def prepare_output_dir(args: argparse.Namespace, fingerprint: dict) -> Optional[str]:
    """A finished extraction in ``--output-dir`` is kept: the same one (settings and rows) needs no work (returns
    why), another is replaced only with ``--overwrite``; then the parts directory is prepared."""
    from slime_self_distill.offline.topk_file import TopKFile, TopKFileError

    finished = os.path.join(args.output_dir, TOPK_FILE_NAME)
    if os.path.exists(finished) and not args.overwrite:
        try:
            earlier = TopKFile(finished).info.extraction
        except TopKFileError:
            earlier = None
        if earlier == extraction_id(fingerprint):
            return (f"{finished} already holds this extraction (the same settings and rows): nothing to do (pass "
                    "--overwrite to compute it again)")
        raise UsageError(f"{finished} holds a finished extraction of other settings or rows; pass --overwrite to "
                         "replace it, or choose another --output-dir")
    prepare_parts_dir(os.path.join(args.output_dir, PARTS_DIR_NAME), fingerprint, args.overwrite)
    return None


def part_paths(parts_dir: str) -> list:
    if not os.path.isdir(parts_dir):
        return []
    return sorted(os.path.join(parts_dir, name) for name in os.listdir(parts_dir)
                  if name.startswith("part-") and name.endswith(".parquet"))


def stored_idxs(paths: list, cache: Optional[dict] = None) -> dict:
    """``{part path: idx array}`` of complete part files (``cache`` keeps those already read)."""
    import pyarrow.parquet as pq

    cache = {} if cache is None else cache
    for path in paths:
        if path not in cache:
            cache[path] = read_idx_column(pq.ParquetFile(path))
    return cache


class PartWriter:
    """Rows of this rank into part files of about ``part_bytes``, each written atomically once full."""

    def __init__(self, parts_dir: str, rank: Rank, part_bytes: int):
        self.parts_dir, self.rank, self.part_bytes = parts_dir, rank, part_bytes
        self.pending: list = []
        self.pending_bytes = 0

    def add(self, idx: int, ids: np.ndarray, values: np.ndarray) -> None:
        self.pending.append((idx, ids, values))
        self.pending_bytes += ids.nbytes + values.nbytes
        if self.pending_bytes >= self.part_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"part-{time.time_ns():020d}-{self.rank.rank:05d}.parquet"
        rows = self.pending

        def write(f) -> None:
            with TopKWriter(f) as writer:
                for row in rows:
                    writer.add(*row)

        write_atomically(os.path.join(self.parts_dir, name), write)
        self.pending, self.pending_bytes = [], 0


def merge_parts(parts: list, k: int, expected_rows: int, sink, info: TopKFileInfo) -> None:
    """Every row of the parts, once, into the final file (row groups of about ``TARGET_GROUP_BYTES``)."""
    import pyarrow.parquet as pq

    seen = np.zeros(expected_rows, dtype=bool)
    with TopKWriter(sink, info.to_metadata()) as writer:
        for path in parts:
            for idx, ids, values in iter_rows(pq.ParquetFile(path), k):
                if seen[idx]:
                    continue  # a part copied in twice; the first copy is kept
                seen[idx] = True
                writer.add(idx, ids, values)
    if not seen.all():
        raise RuntimeError(f"the parts lack {int((~seen).sum())} row(s) (first idx {int(np.argmin(seen))})")


# ---------------------------------------------------------------------- progress
def every_interval(report: Callable[[int], None]) -> Callable[[int], None]:
    """``report(count)`` at most once every ``PROGRESS_INTERVAL_S`` seconds."""
    last = [time.monotonic()]

    def maybe_report(count: int) -> None:
        if time.monotonic() - last[0] >= PROGRESS_INTERVAL_S:
            last[0] = time.monotonic()
            report(count)

    return maybe_report


class Progress:
    """A progress bar on a terminal; elsewhere (cluster logs) a line every ``PROGRESS_INTERVAL_S`` seconds."""

    def __init__(self, rank: Rank, total_rows: int, total_tokens: int, quiet: bool):
        from tqdm import tqdm

        self.rank, self.total_rows, self.total_tokens = rank, total_rows, total_tokens
        self.bar = None
        self.lines = not quiet and not sys.stderr.isatty()
        if not quiet and sys.stderr.isatty() and rank.rank == 0:
            self.bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=f"teacher top-K ({rank.name})",
                            file=sys.stderr, smoothing=0.05)
        self.rows = self.tokens = self.trained = 0
        self.start = time.monotonic()
        self.last_line = self.start - PROGRESS_INTERVAL_S  # a first line after the first batch

    def update(self, rows: int, tokens: int, trained: int) -> None:
        self.rows += rows
        self.tokens += tokens
        self.trained += trained
        if self.bar is not None:
            self.bar.update(tokens)
            self.bar.set_postfix(rows=f"{self.rows}/{self.total_rows}", refresh=False)
        elif self.lines and time.monotonic() - self.last_line >= PROGRESS_INTERVAL_S:
            self.last_line = time.monotonic()
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return (f"[{self.rank.name}] rows {self.rows}/{self.total_rows}, tokens {self.tokens}/{self.total_tokens}, "
                f"{self.tokens / elapsed:.0f} tokens/s ({self.trained / elapsed:.0f} trained tokens/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------- the command
def check_args(args: argparse.Namespace) -> None:
    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.values == "logits" and args.temperature != 1.0:
        raise UsageError("--temperature applies to --values logprobs; raw logits are stored as they are (drop "
                         "--temperature, or store log-probabilities)")
    if args.max_length is not None and args.max_length < 2:
        raise UsageError(f"--max-length must be >= 2 tokens, got {args.max_length}")
    for name in ("max_tokens_per_batch", "chunk_rows", "part_size_mb"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if os.path.isfile(args.output_dir):
        raise UsageError(f"--output-dir {args.output_dir!r} is a file; give a directory")


def device_for(rank: Rank, name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def shared_setup(rank: Rank, set_up: Callable[[], Optional[str]]) -> tuple[bool, Optional[str]]:
    """``set_up()`` on rank 0 (the parts directory: ``--overwrite`` removes old parts first), then every rank past it
    before any rank reads the parts; rank 0's error stops every rank, each with the same message. Returns whether it
    created the process group (a caller's own group is used, and left to the caller) and what ``set_up`` returned:
    a reason for every rank to stop without work, or None."""
    failure, done, created = None, None, False
    if rank.rank == 0:
        try:
            done = set_up()
        except UsageError as error:
            failure = str(error)
    if rank.world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
            created = True
        message = [failure, done]
        dist.broadcast_object_list(message, src=0)
        failure, done = message
    if failure is not None:
        if created:
            dist.destroy_process_group()
        raise UsageError(failure)
    return created, done


def run(args: argparse.Namespace) -> int:
    from slime_self_distill.prepare_dataset import load_tokenizer, read_input

    check_args(args)
    rank = Rank.from_env()
    say = print if rank.rank == 0 else (lambda *a, **k: None)
    tokenizer = load_tokenizer(args.tokenizer or args.teacher)
    try:
        sft_tokenizer = SftTokenizer(tokenizer, args.loss_mask_type)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar
    _, rows = read_input(args.input)
    if not args.quiet:
        say(f"tokenizing {args.input} as slime's SFT rollout will (--loss-mask-type {args.loss_mask_type}, "
            f"tokenizer {args.tokenizer or args.teacher})", file=sys.stderr)
    plan = plan_rows(rows, sft_tokenizer, args, None if args.quiet else every_interval(
        lambda count: say(f"tokenized {count} rows", file=sys.stderr, flush=True)))
    if plan.bad and not args.skip_invalid:
        if rank.rank == 0:
            print_bad_rows(plan.bad, sys.stderr)
            print(f"bad rows by reason: {counts(b.code for b in plan.bad)}", file=sys.stderr)
            print(f"nothing written to {args.output_dir}: fix the rows or pass --skip-invalid", file=sys.stderr)
        return EXIT_BAD_DATA
    if not plan.rows:
        say(f"no usable row in {args.input}; nothing written", file=sys.stderr)
        return EXIT_BAD_DATA
    trained_tokens = sum(len(row.predicting) for row in plan.rows)
    say(f"rows: {len(plan.rows)} usable, {len(plan.too_long)} over --max-length, {len(plan.bad)} bad "
        f"({counts(b.code for b in plan.bad)}); {sum(len(r.tokens) for r in plan.rows)} tokens, {trained_tokens} "
        f"trained tokens; {bytes_per_row(trained_tokens, args.top_k) / 2**30:.2f} GiB of top-K")

    os.makedirs(args.output_dir, exist_ok=True)
    parts_dir = os.path.join(args.output_dir, PARTS_DIR_NAME)
    device = device_for(rank, args.device)
    dtype = resolve_dtype(args.dtype, device)
    fingerprint = settings_fingerprint(args, tokenizer, plan, dtype)
    identify_extraction(plan, args.metadata_key, fingerprint)
    created_group = False
    try:
        created_group, done = shared_setup(rank, lambda: prepare_output_dir(args, fingerprint))
        if done is not None:
            say(done)
            return EXIT_OK
        return extract(args, rank, plan, tokenizer, parts_dir, device, dtype, trained_tokens)
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def extraction_id(fingerprint: dict) -> str:
    """What ties a data file's rows to their top-K file: the settings and every row's digest, hashed."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def identify_extraction(plan: Plan, metadata_key: str, fingerprint: dict) -> None:
    """Each data row's record names its extraction: a data file paired with another extraction's top-K file (say,
    one run with another --max-length, whose idx count other rows) is refused in training, row by row."""
    identity = extraction_id(fingerprint)
    for aligned in plan.aligned:
        aligned[metadata_key][ROW_RECORD_KEY]["extraction"] = identity


def extract(args: argparse.Namespace, rank: Rank, plan: Plan, tokenizer, parts_dir: str, device: torch.device,
            dtype: torch.dtype, trained_tokens: int) -> int:
    """This rank's rows into parts; on rank 0, then, the merge."""
    say = print if rank.rank == 0 else (lambda *a, **k: None)
    teacher = Teacher(load_teacher(args.teacher, dtype, device), args.top_k,
                      args.values, args.temperature, args.chunk_rows)
    if len(tokenizer) > teacher.vocab_size:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens, the teacher's output layer {teacher.vocab_size}: "
                         "they do not share a vocabulary (--tokenizer must be the student's, of the same family)")
    everything = batches_of(ordered(plan.rows, args.sort_by_length), args.max_tokens_per_batch)
    mine = [row for batch in everything[rank.rank:: rank.world] for row in batch]
    done = set()
    for idxs in stored_idxs(part_paths(parts_dir)).values():
        done.update(int(i) for i in idxs)
    todo = [row for row in mine if row.idx not in done]
    if done:
        say(f"resuming: {len(done)} of {len(plan.rows)} rows are in {parts_dir}")

    progress = Progress(rank, len(todo), sum(len(r.tokens) for r in todo), args.quiet)
    writer = PartWriter(parts_dir, rank, args.part_size_mb << 20)
    try:
        for batch in batches_of(todo, args.max_tokens_per_batch):
            for row, ids, values in teacher.rows(batch):
                writer.add(row.idx, ids, values)
            progress.update(len(batch), sum(len(r.tokens) for r in batch), sum(len(r.predicting) for r in batch))
        writer.flush()
    finally:
        progress.close()
    if not args.quiet:
        print(progress.line(), file=sys.stderr)
    if rank.rank != 0:
        return EXIT_OK
    return finish(args, plan, teacher, tokenizer, parts_dir, trained_tokens)


def wait_for_parts(parts_dir: str, rows: int) -> list:
    """The part files once together they hold all ``rows`` (other ranks may still be writing theirs)."""
    cache: dict = {}
    last_report = time.monotonic()
    while True:
        paths = part_paths(parts_dir)
        held = np.zeros(rows, dtype=bool)
        for idxs in stored_idxs(paths, cache).values():
            held[idxs] = True
        if held.all():
            return paths
        if time.monotonic() - last_report >= PROGRESS_INTERVAL_S:
            last_report = time.monotonic()
            print(f"waiting for the other ranks: {int((~held).sum())} rows are in no part yet (parts go to "
                  f"{parts_dir}, which every rank must share)", file=sys.stderr, flush=True)
        time.sleep(MERGE_POLL_S)


def finish(args: argparse.Namespace, plan: Plan, teacher: Teacher, tokenizer, parts_dir: str,
           trained_tokens: int) -> int:
    paths = wait_for_parts(parts_dir, len(plan.rows))
    topk_path = os.path.join(args.output_dir, TOPK_FILE_NAME)
    data_path = os.path.join(args.output_dir, DATA_FILE_NAME)
    rejected_path = os.path.join(args.output_dir, REJECTED_FILE_NAME)
    outputs = {topk_path: "the top-K file", data_path: "the data file", rejected_path: "the rejected-rows report"}
    with PendingOutputs(outputs) as pending:
        pending.write(data_path, json_lines_writer(plan.aligned))
        pending.write(rejected_path, rejected_writer(plan.bad + plan.too_long))
        info = TopKFileInfo(
            k=args.top_k, values=args.values, temperature=args.temperature, loss_mask_type=args.loss_mask_type,
            messages_key=args.messages_key, tool_key=args.tool_key or "", metadata_key=args.metadata_key,
            teacher=os.path.abspath(args.teacher), tokenizer=os.path.abspath(args.tokenizer or args.teacher),
            chat_template_sha256=chat_template_sha256(tokenizer), vocab_size=teacher.vocab_size,
            rows=len(plan.rows), trained_tokens=trained_tokens, data_file=DATA_FILE_NAME,
            extraction=plan.aligned[0][args.metadata_key][ROW_RECORD_KEY]["extraction"],
            data_sha256=file_sha256(pending.temp_paths[data_path]),
        )
        pending.write(topk_path, lambda f: merge_parts(paths, args.top_k, len(plan.rows), f, info))
        pending.commit()
    shutil.rmtree(parts_dir)
    size = os.path.getsize(topk_path)
    print(f"wrote {topk_path}: {len(plan.rows)} rows, {trained_tokens} trained tokens x K={args.top_k}, "
          f"{size / 2**20:.1f} MiB ({size / trained_tokens:.1f} bytes per trained token)")
    print(f"wrote {data_path} (slime's --prompt-data; the launcher reads it and the keys from the top-K file)")
    if plan.bad or plan.too_long:
        print(f"rows left out: {len(plan.bad)} bad, {len(plan.too_long)} over --max-length -> {rejected_path}")
        if plan.bad:
            print_bad_rows(plan.bad, sys.stdout)
        for row in plan.too_long[:MAX_LISTED]:
            print(f"  row {row.row}: [{row.code}] {row.reason}")
    print(f"next: python -m slime_self_distill.train --custom-config-path configs/offline_topk_kd.yaml "
          f"--self-distill-offline-topk-path {os.path.abspath(topk_path)} --hf-checkpoint <the student, whose "
          "tokenizer extraction used> <your model, checkpoint and parallel flags> (README \"Offline top-K "
          "distillation\")")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m slime_self_distill.extract_teacher_topk",
        description="Store a Hugging Face teacher's top-K log-probabilities at every token slime's SFT rollout trains "
        "on (Parquet), with the data file slime reads; for offline top-K distillation "
        "(--self-distill-offline-topk-path). Data-parallel with torchrun; resumable.",
        epilog="Exit status: 0 success; 1 bad data (bad rows without --skip-invalid, no usable row); 2 unusable flags, "
        "input, teacher or tokenizer. Interrupted, it keeps the finished parts in <output-dir>/.parts: the same "
        "command continues from them.",
    )
    p.add_argument("--teacher", required=True, help="local Hugging Face causal LM directory")
    p.add_argument("--input", required=True, help="chat rows: .jsonl, .json, .parquet (a 'messages' list per row)")
    p.add_argument("--output-dir", required=True,
                   help=f"where {TOPK_FILE_NAME}, {DATA_FILE_NAME} and {REJECTED_FILE_NAME} go (shared by all ranks)")
    p.add_argument("--tokenizer", default=None,
                   help="the student's tokenizer (slime's --hf-checkpoint); default: the teacher's. It must tokenize "
                   "exactly as slime will in training")
    p.add_argument("--loss-mask-type", default="qwen", choices=LOSS_MASK_TYPES,
                   help="slime's --loss-mask-type of the training run (default qwen, as slime's)")
    p.add_argument("--messages-key", default="messages", help="the chat messages column (slime's --input-key)")
    p.add_argument("--tool-key", default="tools", help="the tools column (slime's --tool-key); '' for none")
    p.add_argument("--metadata-key", default="metadata", help="slime's --metadata-key")
    p.add_argument("--max-length", type=int, default=None,
                   help="leave out rows of more tokens than this (reported in the rejected-rows file)")
    p.add_argument("--top-k", type=int, default=64, help="K entries per trained token (default 64)")
    p.add_argument("--values", choices=VALUE_KINDS, default="logprobs",
                   help="logprobs (default: log-softmax over the whole vocabulary, what the KD tail needs) or raw "
                   "logits")
    p.add_argument("--temperature", type=float, default=1.0, help="of the stored log-probabilities (default 1)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="the teacher's dtype; auto: bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK when a GPU is visible, else cpu")
    p.add_argument("--max-tokens-per-batch", type=int, default=16384,
                   help="padded tokens (rows x longest row) per forward pass (default 16384)")
    p.add_argument("--chunk-rows", type=int, default=1024,
                   help="positions whose [rows, vocab] float32 logits exist at once (default 1024)")
    p.add_argument("--sort-by-length", action="store_true", help="batch rows of similar length (less padding)")
    p.add_argument("--part-size-mb", type=int, default=256,
                   help="size of each part file (the work lost to an interruption is at most one per rank)")
    p.add_argument("--skip-invalid", action="store_true",
                   help=f"leave bad rows out (listed in {REJECTED_FILE_NAME}) instead of failing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished extraction in --output-dir, or discard the parts of an unfinished one, made "
                   "with other settings (or compute the same one again)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p
