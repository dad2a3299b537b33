"""Turn a dataset into slime prompt rows that carry the teacher prompt of every row in their metadata.

    python -m slime_self_distill.prepare_dataset --input data.jsonl --output prepared.jsonl [options]

Every output row is ``{"prompt": <str or chat messages>, "<metadata-key>": {"<teacher-prompt-key>": <same kind>,
"self_distill": {"demonstration": str, "template": str}, ...}}``; the ``self_distill`` entry is written only when
the teacher prompt was built from a demonstration (it is what ``--self-distill-teacher-overflow
truncate_demonstration`` shortens). Train with ``--input-key prompt --metadata-key <metadata-key>``.

Each input row is one of (checked in this order, a null value counts as absent):
  1. a teacher prompt column: used as is (it wins over a demonstration column, which is then kept as an ordinary
     column: the teacher prompt was not built from it);
  2. a prompt column + a demonstration column: the teacher prompt is the template filled with both;
  3. a chat messages column whose final turn is the assistant's demonstration: prompt = all turns but the last;
  4. an already prepared row (its metadata holds the teacher prompt): passed through, so a prepared file can be
     checked again or measured with --tokenizer.
Chat prompts stay chat messages (slime applies the chat template itself with --apply-chat-template); for chat
messages the template fills only the last user turn.

Bad rows (missing/empty/ill-typed fields, malformed messages, lines that are not JSON, metadata conflicts) make the
run fail without writing anything, listing them; with --skip-invalid the good rows are written and the bad ones go
to ``<output>.rejected.jsonl``. Files are written atomically (temporary file in the same directory, then rename).
Exit status: 0 success, 1 bad data (bad rows, no usable row, rows over budget with --fail-on-over-budget),
2 unusable invocation or input (bad flag, unreadable file, tokenizer that does not load).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from slime_self_distill.config import SelfDistillConfig
from slime_self_distill.templates import TEMPLATES, TemplateError, build_teacher_prompt, load_template, render_prompt

EXIT_OK, EXIT_BAD_DATA, EXIT_USAGE = 0, 1, 2
MAX_LISTED = 20
PLUGIN_METADATA_KEY = "self_distill"  # the plugin's own metadata entry (see data_source.py)
OUTPUT_PROMPT_KEY = "prompt"
REJECTED_SUFFIX = ".rejected.jsonl"
DATASETS_BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".arrow": ("arrow", {})}
OUTPUT_FORMATS = (".jsonl", ".parquet")  # the two formats slime's Dataset reads


class UsageError(Exception):
    """The invocation or the input file as a whole is unusable (exit status 2)."""


class RowError(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class Unparseable:
    """A JSON line that did not parse, kept for the rejected-rows report."""

    text: str
    error: str


@dataclass(frozen=True)
class BadRow:
    row: int
    code: str
    reason: str
    data: Any


@dataclass(frozen=True)
class PreparedRow:
    row: int
    kind: str
    output: dict
    prompt: Any
    teacher_prompt: Any
    tools: Any


@dataclass(frozen=True)
class Columns:
    teacher_prompt: str
    prompt: str
    demonstration: str
    messages: str
    metadata_key: str
    teacher_prompt_key: str
    keep_columns: str
    top_level: frozenset
    tool_key: Optional[str]


# ------------------------------------------------------------------------------------------------- reading
def _jsonl_rows(lines: Iterable[str], first_line: int = 1) -> Iterator[tuple[int, Any]]:
    for line_number, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue  # slime's reader skips blank lines too
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as e:
            yield line_number, Unparseable(line.rstrip("\n"), str(e))


def _json_rows(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.lstrip().startswith("["):
        yield from _jsonl_rows(text.splitlines())
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--input {path!r} starts like a JSON list but does not parse: {e}") from None
    yield from enumerate(rows, start=1)


def _parquet_rows(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _datasets_rows(path: str, split: Optional[str]) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:
        raise UsageError(f"--input {path!r} needs the 'datasets' package (pip install datasets)") from None
    if os.path.isdir(path):
        loaded = datasets.load_dataset(path)
    else:
        extension = os.path.splitext(path)[1].lower()
        if extension not in DATASETS_BUILDERS:
            raise UsageError(
                f"--input {path!r}: unsupported format; use .jsonl, .json, .parquet, "
                f"{', '.join(DATASETS_BUILDERS)} or a dataset directory that datasets.load_dataset reads"
            )
        builder, options = DATASETS_BUILDERS[extension]
        loaded = datasets.load_dataset(builder, data_files=path, **options)
    if split is None:
        if len(loaded) != 1:
            raise UsageError(f"--input {path!r} has the splits {sorted(loaded)}; choose one with --split")
        split = next(iter(loaded))
    if split not in loaded:
        raise UsageError(f"--split {split!r} is not in --input {path!r} (splits: {sorted(loaded)})")
    yield from enumerate(loaded[split], start=1)


def read_rows(path: str, split: Optional[str] = None) -> Iterator[tuple[int, Any]]:
    """(row number, row) pairs; the row number is the line number for JSON lines, else the 1-based position.
    A JSON line that does not parse is yielded as an ``Unparseable`` row, not raised."""
    if not os.path.exists(path):
        raise UsageError(f"--input {path!r} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".jsonl":
        with open(path, encoding="utf-8") as f:
            yield from _jsonl_rows(f)
    elif extension == ".json":
        yield from _json_rows(path)
    elif extension == ".parquet":
        yield from _parquet_rows(path)
    else:
        yield from _datasets_rows(path, split)


def count_rows(path: str) -> Optional[int]:
    """Row count for the progress bar when it is cheap to know."""
    if path.lower().endswith(".parquet") and os.path.isfile(path):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


# ---------------------------------------------------------------------------------------------- validation
def _check_text(value: Any, role: str, column: str) -> str:
    if value is None:
        raise RowError(f"missing_{role}", f"column {column!r} is missing or null")
    if not isinstance(value, str):
        raise RowError(f"bad_type_{role}", f"column {column!r} is a {type(value).__name__}, expected a string")
    if not value.strip():
        raise RowError(f"empty_{role}", f"column {column!r} is empty")
    return value


def _check_turns(messages: list, role: str, column: str) -> None:
    for i, turn in enumerate(messages):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise RowError(
                f"malformed_{role}",
                f"column {column!r} turn {i} is {turn!r}; every turn must be a dict with a string 'role' and a "
                f"string 'content'",
            )


def _check_chat_prompt(messages: list, role: str, column: str) -> list:
    if not messages:
        raise RowError(f"empty_{role}", f"column {column!r} is an empty list of chat messages")
    _check_turns(messages, role, column)
    user_turns = [turn for turn in messages if turn["role"] == "user"]
    if not user_turns:
        raise RowError(f"malformed_{role}", f"column {column!r} has no 'user' turn")
    if not user_turns[-1]["content"].strip():
        raise RowError(f"empty_{role}", f"column {column!r}: the last user turn is empty")
    return messages


def _check_prompt(value: Any, role: str, column: str) -> Any:
    if isinstance(value, list):
        return _check_chat_prompt(value, role, column)
    if value is not None and not isinstance(value, str):
        raise RowError(
            f"bad_type_{role}",
            f"column {column!r} is a {type(value).__name__}, expected a string or a list of chat messages",
        )
    return _check_text(value, role, column)


def _split_conversation(messages: Any, column: str) -> tuple[list, str]:
    """(prompt turns, demonstration) of chat messages whose final turn is the assistant's demonstration."""
    if not isinstance(messages, list):
        raise RowError("bad_type_messages", f"column {column!r} is a {type(messages).__name__}, expected a list")
    _check_turns(messages, "messages", column)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        last = messages[-1]["role"] if messages else "nothing"
        raise RowError(
            "malformed_messages",
            f"column {column!r} must end with the assistant's demonstration after at least one user turn; its final "
            f"turn is {last!r}",
        )
    demonstration = _check_text(messages[-1]["content"], "demonstration", f"{column}[-1].content")
    return _check_chat_prompt(messages[:-1], "prompt", f"{column}[:-1]"), demonstration


def _merge(metadata: dict, key: str, value: Any, what: str) -> None:
    if key in metadata:
        raise RowError(
            "metadata_conflict",
            f"the row's metadata already has the key {key!r}, which {what} would overwrite; rename one of them",
        )
    metadata[key] = value


def _parse_tools(value: Any, column: str) -> Any:
    """The tools slime hands the chat template for this row (slime parses a JSON string the same way)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError("bad_tools", f"column {column!r} is a string that is not JSON: {e}") from None
    if not isinstance(value, list):
        raise RowError("bad_tools", f"column {column!r} is a {type(value).__name__}, expected a list of tools")
    return value


def prepare_row(data: Any, columns: Columns, template: str, template_spec: str) -> tuple[str, dict, Any, Any, Any]:
    """(kind, output row, prompt, teacher prompt, tools) of one input row; RowError if it is unusable."""
    if isinstance(data, Unparseable):
        raise RowError("unparseable_json", f"the line is not valid JSON: {data.error}")
    if not isinstance(data, dict):
        raise RowError("not_an_object", f"the row is a {type(data).__name__}, expected a JSON object")

    def present(column: str) -> bool:
        return data.get(column) is not None

    input_metadata = data.get(columns.metadata_key)
    if input_metadata is not None and not isinstance(input_metadata, dict):
        raise RowError(
            "bad_metadata",
            f"column {columns.metadata_key!r} (--metadata-key) is a {type(input_metadata).__name__}, expected an "
            f"object",
        )
    metadata = dict(input_metadata or {})
    teacher_key = columns.teacher_prompt_key
    consumed = {columns.metadata_key}
    plugin_entry = None

    if present(columns.teacher_prompt):
        kind = "teacher_prompt"
        consumed |= {columns.teacher_prompt, columns.prompt}
        prompt = _check_prompt(data.get(columns.prompt), "prompt", columns.prompt)
        teacher_prompt = _check_prompt(data[columns.teacher_prompt], "teacher_prompt", columns.teacher_prompt)
        if isinstance(prompt, str) != isinstance(teacher_prompt, str):
            raise RowError(
                "kind_mismatch",
                f"column {columns.prompt!r} is {'a string' if isinstance(prompt, str) else 'chat messages'} but "
                f"column {columns.teacher_prompt!r} is not; both must be strings or both chat messages",
            )
    elif present(columns.demonstration):
        kind = "demonstration"
        consumed |= {columns.demonstration, columns.prompt}
        prompt = _check_prompt(data.get(columns.prompt), "prompt", columns.prompt)
        demonstration = _check_text(data[columns.demonstration], "demonstration", columns.demonstration)
        teacher_prompt = build_teacher_prompt(prompt, demonstration, template)
        plugin_entry = {"demonstration": demonstration, "template": template}
    elif present(columns.messages):
        kind = "messages"
        if present(columns.prompt):
            raise RowError(
                "ambiguous_prompt",
                f"the row has both column {columns.prompt!r} and column {columns.messages!r}; the prompt would come "
                f"from the messages, so drop or rename one of them",
            )
        consumed |= {columns.messages}
        prompt, demonstration = _split_conversation(data[columns.messages], columns.messages)
        teacher_prompt = build_teacher_prompt(prompt, demonstration, template)
        plugin_entry = {"demonstration": demonstration, "template": template}
    elif metadata.get(teacher_key) is not None:
        kind = "prepared"
        consumed |= {columns.prompt}
        prompt = _check_prompt(data.get(columns.prompt), "prompt", columns.prompt)
        teacher_prompt = _check_prompt(metadata.pop(teacher_key), "teacher_prompt",
                                       f"{columns.metadata_key}.{teacher_key}")
    else:
        raise RowError(
            "no_teacher_source",
            f"the row has none of the columns {columns.teacher_prompt!r} (teacher prompt), {columns.demonstration!r} "
            f"(with {columns.prompt!r}) or {columns.messages!r}, nor metadata[{teacher_key!r}]",
        )

    _merge(metadata, teacher_key, teacher_prompt, "the teacher prompt")
    if plugin_entry is not None:
        _merge(metadata, PLUGIN_METADATA_KEY, plugin_entry, f"the plugin's entry (template {template_spec!r})")

    role_columns = {columns.teacher_prompt, columns.prompt, columns.demonstration, columns.messages}
    output = {OUTPUT_PROMPT_KEY: prompt, columns.metadata_key: metadata}
    for column, value in data.items():
        if column in consumed or (column in role_columns and value is None):
            continue
        if columns.keep_columns == "metadata" and column not in columns.top_level:
            _merge(metadata, column, value, f"column {column!r}")
        elif column in output:
            raise RowError(
                "column_conflict", f"column {column!r} would overwrite the output's own {column!r}; rename it"
            )
        else:
            output[column] = value

    tools = None
    if columns.tool_key is not None and data.get(columns.tool_key) is not None:
        tools = _parse_tools(data[columns.tool_key], columns.tool_key)
    return kind, output, prompt, teacher_prompt, tools


# ------------------------------------------------------------------------------------------------- writing
def atomic_write(path: str, write) -> None:
    """Write ``path`` through ``write(temp_path)`` into a temporary file of its directory, then rename it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(temp_path)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.unlink(temp_path)
        raise


def _write_jsonl(lines: Iterable[str]):
    def write(temp_path: str) -> None:
        with open(temp_path, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    return write


def write_rows(path: str, rows: list) -> None:
    if path.lower().endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise UsageError(
                f"--output {path!r}: the rows do not fit one Parquet schema ({e}); Parquet needs every row's fields "
                f"to have one type (e.g. all prompts strings or all chat messages): write .jsonl instead"
            ) from None
        atomic_write(path, lambda temp_path: pq.write_table(table, temp_path))
    else:
        atomic_write(path, _write_jsonl(json.dumps(row, ensure_ascii=False) for row in rows))


def write_rejected(path: str, bad_rows: list) -> None:
    def entry(bad: BadRow) -> dict:
        data = bad.data.text if isinstance(bad.data, Unparseable) else bad.data
        return {"row": bad.row, "code": bad.code, "reason": bad.reason, "data": data}

    # default=repr: a rejected row may hold values JSON cannot encode (that can be why it was rejected)
    atomic_write(path, _write_jsonl(json.dumps(entry(bad), ensure_ascii=False, default=repr) for bad in bad_rows))


# ---------------------------------------------------------------------------------------------- token stats
def load_tokenizer(path: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError("--tokenizer needs the 'transformers' package (pip install transformers)") from None
    try:
        # trust_remote_code as slime's own load_tokenizer does for --hf-checkpoint
        return AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    except Exception as e:  # noqa: BLE001 - any load failure is reported with the path
        raise UsageError(f"--tokenizer {path!r} does not load as a Hugging Face tokenizer: {e}") from None


@dataclass
class TokenStats:
    student: list = field(default_factory=list)
    teacher: list = field(default_factory=list)
    over_budget: list = field(default_factory=list)  # (row number, teacher tokens)


def measure_tokens(rows: list, tokenizer, *, apply_chat_template: bool, apply_chat_template_kwargs: Optional[dict],
                   max_teacher_prompt_len: Optional[int]) -> TokenStats:
    """Token lengths of the rendered student and teacher prompts, encoded as slime encodes prompts."""
    if not apply_chat_template:
        chat_rows = [r.row for r in rows if isinstance(r.prompt, list) or isinstance(r.teacher_prompt, list)]
        if chat_rows:
            raise UsageError(
                f"{len(chat_rows)} row(s) (first: {chat_rows[:MAX_LISTED]}) have chat-message prompts, which only a "
                f"chat template turns into text: pass --apply-chat-template (and give slime --apply-chat-template too)"
            )
    stats = TokenStats()
    for row in rows:
        texts = [
            render_prompt(prompt, tokenizer, apply_chat_template=apply_chat_template,
                          apply_chat_template_kwargs=apply_chat_template_kwargs, tools=row.tools)
            for prompt in (row.prompt, row.teacher_prompt)
        ]
        student, teacher = tokenizer(texts, add_special_tokens=False)["input_ids"]
        stats.student.append(len(student))
        stats.teacher.append(len(teacher))
        if max_teacher_prompt_len is not None and len(teacher) > max_teacher_prompt_len:
            stats.over_budget.append((row.row, len(teacher)))
    return stats


def format_token_stats(stats: TokenStats) -> str:
    import numpy as np

    lines = [f"{'tokens':<18}{'min':>8}{'mean':>10}{'p50':>8}{'p95':>8}{'max':>8}"]
    series = {
        "student prompt": np.array(stats.student),
        "teacher prompt": np.array(stats.teacher),
        "teacher - student": np.array(stats.teacher) - np.array(stats.student),
    }
    for name, values in series.items():
        p50, p95 = np.percentile(values, [50, 95])
        lines.append(f"{name:<18}{values.min():>8}{values.mean():>10.1f}{p50:>8.0f}{p95:>8.0f}{values.max():>8}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- driver
def build_parser() -> argparse.ArgumentParser:
    defaults = SelfDistillConfig()
    p = argparse.ArgumentParser(
        prog="python -m slime_self_distill.prepare_dataset",
        description="Write slime prompt rows whose metadata carries each row's teacher prompt.",
    )
    p.add_argument("--input", required=True, help=".jsonl, .json (a list or JSON lines), .parquet, .csv, .tsv, "
                   ".arrow, or a directory that datasets.load_dataset reads")
    p.add_argument("--output", required=True, help="the prepared dataset: .jsonl or .parquet (what slime reads)")
    p.add_argument("--split", default=None, help="split to read from a datasets directory with several splits")
    p.add_argument("--prompt-column", default="prompt", help="the student prompt (string or chat messages)")
    p.add_argument("--demonstration-column", default="demonstration",
                   help="the demonstration that --template puts in the teacher prompt")
    p.add_argument("--teacher-prompt-column", default="teacher_prompt",
                   help="a ready teacher prompt; moved into the metadata (wins over a demonstration)")
    p.add_argument("--messages-column", default="messages",
                   help="chat messages whose final turn is the assistant demonstration")
    p.add_argument("--template", default="sdft",
                   help=f"teacher template: a name ({', '.join(TEMPLATES)}), a file holding a format string, or a "
                   f"literal format string with {{prompt}} and {{demonstration}}")
    p.add_argument("--metadata-key", default="metadata",
                   help="the output's metadata column (slime's --metadata-key); an input column of that name is "
                   "merged into it")
    p.add_argument("--teacher-prompt-key", default=defaults.teacher_prompt_key,
                   help="metadata key of the teacher prompt (--self-distill-teacher-prompt-key)")
    p.add_argument("--keep-columns", choices=("metadata", "top_level"), default="metadata",
                   help="where the input's other columns go")
    p.add_argument("--top-level-columns", nargs="*", default=[],
                   help="columns kept at the top level of the row whatever --keep-columns says (e.g. slime's "
                   "--label-key or --multimodal-keys columns)")
    p.add_argument("--tool-key", default="tools",
                   help="the tools column, as slime's --tool-key: kept at the top level, given to the chat template")
    p.add_argument("--skip-invalid", action="store_true",
                   help=f"write the good rows and report the bad ones in <output>{REJECTED_SUFFIX} instead of failing")
    p.add_argument("--tokenizer", default=None, help="a local Hugging Face tokenizer directory: print token lengths")
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts as slime's --apply-chat-template")
    p.add_argument("--apply-chat-template-kwargs", type=json.loads, default=None,
                   help="JSON object passed to the chat template, as slime's flag of that name")
    p.add_argument("--max-teacher-prompt-len", type=int, default=None,
                   help="count the rows whose teacher prompt is over this many tokens (needs --tokenizer)")
    p.add_argument("--fail-on-over-budget", action="store_true",
                   help="fail, writing nothing, if a row is over --max-teacher-prompt-len")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_args(args: argparse.Namespace) -> str:
    """The loaded template; UsageError for inconsistent flags."""
    if os.path.splitext(args.output)[1].lower() not in OUTPUT_FORMATS:
        raise UsageError(f"--output {args.output!r}: slime reads only {' and '.join(OUTPUT_FORMATS)} files")
    kwargs = args.apply_chat_template_kwargs
    if kwargs is not None and not isinstance(kwargs, dict):
        raise UsageError(f"--apply-chat-template-kwargs must be a JSON object, got {kwargs!r}")
    if args.max_teacher_prompt_len is not None and args.tokenizer is None:
        raise UsageError("--max-teacher-prompt-len needs --tokenizer to count tokens")
    if args.max_teacher_prompt_len is not None and args.max_teacher_prompt_len < 1:
        raise UsageError(f"--max-teacher-prompt-len must be >= 1, got {args.max_teacher_prompt_len}")
    if args.fail_on_over_budget and args.max_teacher_prompt_len is None:
        raise UsageError("--fail-on-over-budget needs --max-teacher-prompt-len")
    try:
        return load_template(args.template)
    except TemplateError as e:
        raise UsageError(f"--template: {e}") from None


def _check_json_encodable(output: dict) -> None:
    try:
        json.dumps(output, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise RowError("not_json_serializable", f"the row cannot be written as JSON: {e}") from None


def _print_bad_rows(bad_rows: list, out) -> None:
    print(f"{len(bad_rows)} bad row(s); the first {min(len(bad_rows), MAX_LISTED)}:", file=out)
    for bad in bad_rows[:MAX_LISTED]:
        print(f"  row {bad.row}: [{bad.code}] {bad.reason}", file=out)


def _counts(values: Iterable[str]) -> str:
    return ", ".join(f"{name}: {count}" for name, count in sorted(collections.Counter(values).items())) or "none"


def run(args: argparse.Namespace) -> int:
    template = _check_args(args)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    columns = Columns(
        teacher_prompt=args.teacher_prompt_column, prompt=args.prompt_column,
        demonstration=args.demonstration_column, messages=args.messages_column, metadata_key=args.metadata_key,
        teacher_prompt_key=args.teacher_prompt_key, keep_columns=args.keep_columns,
        top_level=frozenset(args.top_level_columns) | ({args.tool_key} if args.tool_key else set()),
        tool_key=args.tool_key,
    )
    write_jsonl = not args.output.lower().endswith(".parquet")

    from tqdm import tqdm

    good, bad = [], []
    progress = tqdm(read_rows(args.input, args.split), total=count_rows(args.input), desc="preparing", unit="row",
                    file=sys.stderr, disable=args.quiet or not sys.stderr.isatty())
    for number, data in progress:
        try:
            kind, output, prompt, teacher_prompt, tools = prepare_row(data, columns, template, args.template)
            if write_jsonl:
                _check_json_encodable(output)
        except RowError as e:
            bad.append(BadRow(number, e.code, e.reason, data))
            continue
        good.append(PreparedRow(number, kind, output, prompt, teacher_prompt, tools))
    rows_in = len(good) + len(bad)

    if bad and not args.skip_invalid:
        _print_bad_rows(bad, sys.stderr)
        print(f"bad rows by reason: {_counts(b.code for b in bad)}", file=sys.stderr)
        print(f"nothing written to {args.output}: fix the rows or pass --skip-invalid", file=sys.stderr)
        return EXIT_BAD_DATA
    if not good:
        print(f"no usable row in {args.input} ({rows_in} read); nothing written", file=sys.stderr)
        return EXIT_BAD_DATA

    if tokenizer is not None:
        stats = measure_tokens(good, tokenizer, apply_chat_template=args.apply_chat_template,
                               apply_chat_template_kwargs=args.apply_chat_template_kwargs,
                               max_teacher_prompt_len=args.max_teacher_prompt_len)
        print(format_token_stats(stats))
        if args.max_teacher_prompt_len is not None:
            over = stats.over_budget
            listed = ", ".join(f"row {n} ({length})" for n, length in over[:MAX_LISTED])
            print(f"teacher prompts over {args.max_teacher_prompt_len} tokens: {len(over)} of {len(good)}"
                  + (f"; first: {listed}" if over else ""))
            if over and args.fail_on_over_budget:
                print(f"nothing written to {args.output} (--fail-on-over-budget)", file=sys.stderr)
                return EXIT_BAD_DATA

    write_rows(args.output, [row.output for row in good])
    print(f"rows read: {rows_in}")
    print(f"rows written: {len(good)} ({_counts(row.kind for row in good)}) -> {args.output}")
    if args.skip_invalid:
        report = args.output + REJECTED_SUFFIX
        write_rejected(report, bad)
        print(f"rows rejected: {len(bad)} ({_counts(b.code for b in bad)}) -> {report}")
        if bad:
            _print_bad_rows(bad, sys.stdout)
    return EXIT_OK


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
