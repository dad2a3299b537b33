"""Turn a dataset into slime prompt rows that carry the teacher prompt of every row in their metadata.

    python -m slime_self_distill.prepare_dataset --input data.jsonl --output prepared.jsonl [options]

Every output row is ``{"prompt": <str or chat messages>, "<metadata-key>": {"<teacher-prompt-key>": <same kind>,
"self_distill": {"demonstration": str, "template": str}, ...}}``; the ``self_distill`` entry is written only when
the teacher prompt was built from a demonstration (it is what ``--self-distill-teacher-overflow
truncate_demonstration`` shortens). Train with ``--input-key prompt --metadata-key <metadata-key>``.

Input: .jsonl, .json (a list or JSON lines), .parquet, .csv, .tsv, .arrow, a directory written by ``datasets``'
``save_to_disk`` (a Dataset, or a DatasetDict with ``--split``), or a directory that ``datasets.load_dataset``
reads. A UTF-8 byte order mark at the start of a JSON/JSONL file is accepted (and never written).

Each input row is one of (checked in this order, a null value counts as absent):
  1. a teacher prompt column: used as is (it wins over a demonstration column, which is then kept as an ordinary
     column: the teacher prompt was not built from it);
  2. a demonstration column + a prompt: the teacher prompt is the template filled with both. The prompt is the
     prompt column, or, when the row has none, the messages column as chat messages that do not end with an
     assistant turn (the official SDFT science data: system + user turns, demonstration in ``output_text``).
     A demonstration given as a list of strings is joined with newlines, as the official SDFT code joins
     ``golden_response``;
  3. a chat messages column whose final turn is the assistant's demonstration: prompt = all turns but the last;
  4. an already prepared row (its metadata holds the teacher prompt): passed through, so a prepared file can be
     checked again or measured with --tokenizer.
Chat prompts stay chat messages (slime applies the chat template itself with --apply-chat-template); for chat
messages the template fills only the last user turn.

Columns slime reads at the top level of a row stay there whatever --keep-columns says: the label column
(--label-key), the tools column (--tool-key) and --top-level-columns.

Bad rows (missing/empty/ill-typed fields, malformed messages, lines that are not JSON, metadata conflicts) make the
run fail without writing anything, listing them; with --skip-invalid the good rows are written and the bad ones go
to ``<output>.rejected.jsonl``. A column named by a flag that no row has, or a prompt/teacher-prompt source that no
row has, is one usage error naming the flag and the file's columns. Files are written atomically (temporary file in
the same directory, then rename) with the permissions a new file gets under the umask (an existing output keeps
its own); a failed run leaves an existing output as it was. After a successful run one teacher prompt is printed
as a preview (not with --quiet).

Exit status: 0 success; 1 bad data (bad rows, no usable row, rows over budget with --fail-on-over-budget);
2 unusable invocation or input (bad flag, a named column no row has, input that does not exist, cannot be read, is
not UTF-8 or is corrupt, output that is a directory, is the input, or cannot be written, tokenizer that does not
load).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from slime_self_distill.config import SelfDistillConfig, closest_name
from slime_self_distill.data.cli import (
    EXIT_BAD_DATA,
    EXIT_OK,
    MAX_LISTED,
    BadRow,
    PendingOutputs,
    RowError,
    UsageError,
    counts,
    json_lines_writer,
    print_bad_rows,
    rejected_writer,
    run_cli,
)
from slime_self_distill.data.files import (
    RowFileError,
    UnparseableLine,
    json_rows,
    jsonl_rows,
    parquet_rows,
)
from slime_self_distill.data.templates import (
    STUDENT_TEMPLATES,
    TEMPLATES,
    TemplateError,
    build_student_prompt,
    build_teacher_prompt,
    load_student_template,
    load_template,
    render_prompt,
)

PLUGIN_METADATA_KEY = "self_distill"  # the plugin's own metadata entry (see data_source.py)
OUTPUT_PROMPT_KEY = "prompt"
REJECTED_SUFFIX = ".rejected.jsonl"
DATASETS_BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".arrow": ("arrow", {})}
OUTPUT_FORMATS = (".jsonl", ".parquet")  # the two formats slime's Dataset reads
# The official SDFT code joins a list-valued demonstration (golden_response) with one newline.
DEMONSTRATION_LIST_SEPARATOR = "\n"
PREVIEW_HEAD_CHARS, PREVIEW_TAIL_CHARS = 1500, 500

# Flags that name input columns, with their defaults. Their argparse default is None so that a column the user
# named explicitly can be told apart from a default one: a named column that no row has is a usage error.
COLUMN_FLAG_DEFAULTS = {
    "prompt_column": "prompt",
    "demonstration_column": "demonstration",
    "teacher_prompt_column": "teacher_prompt",
    "messages_column": "messages",
    "label_key": "label",
    "tool_key": "tools",
}
# Usual names of a prompt / demonstration column, proposed when the flag's column is not in the file.
USUAL_COLUMN_NAMES = {
    "--prompt-column": ("question", "problem", "query", "instruction", "input"),
    "--demonstration-column": ("answer", "solution", "response", "output", "output_text", "golden_response",
                               "completion"),
}


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
def _root_cause(error: BaseException) -> str:
    """``Type: first line of the message`` of the innermost cause (datasets wraps the real error)."""
    while error.__cause__ is not None:
        error = error.__cause__
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


def _is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
    (the files ``datasets.load_from_disk`` itself looks for)."""
    import datasets.config as datasets_config

    return (
        os.path.isfile(os.path.join(path, datasets_config.DATASET_STATE_JSON_FILENAME))
        and os.path.isfile(os.path.join(path, datasets_config.DATASET_INFO_FILENAME))
    ) or os.path.isfile(os.path.join(path, datasets_config.DATASETDICT_JSON_FILENAME))


@contextlib.contextmanager
def _datasets_quiet(show_progress: bool) -> Iterator[None]:
    """The datasets library's log lines off while it loads (a failure is reported here, in one line) and its
    progress bars off when ours are (--quiet, no terminal); its own settings are restored afterwards."""
    import datasets
    from datasets.utils import logging as datasets_logging

    verbosity = datasets_logging.get_verbosity()
    bars_were_disabled = datasets.are_progress_bars_disabled()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    if not show_progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if not bars_were_disabled:
            datasets.enable_progress_bars()


def _datasets_rows(path: str, split: Optional[str], show_progress: bool) -> tuple[int, Iterator[tuple[int, Any]]]:
    try:
        import datasets
    except ImportError:
        raise UsageError(f"--input {path!r} needs the 'datasets' package (pip install datasets)") from None
    if os.path.isdir(path) and _is_saved_dataset(path):
        how, load = "datasets.load_from_disk", functools.partial(datasets.load_from_disk, path)
    elif os.path.isdir(path):
        how, load = "datasets.load_dataset", functools.partial(datasets.load_dataset, path)
    else:
        extension = os.path.splitext(path)[1].lower()
        if extension not in DATASETS_BUILDERS:
            raise UsageError(
                f"--input {path!r}: unsupported format; use .jsonl, .json, .parquet, "
                f"{', '.join(DATASETS_BUILDERS)}, a directory written by save_to_disk, or a dataset directory that "
                f"datasets.load_dataset reads"
            )
        builder, options = DATASETS_BUILDERS[extension]
        how = f"datasets.load_dataset({builder!r})"
        load = functools.partial(datasets.load_dataset, builder, data_files=path, **options)
    try:
        with _datasets_quiet(show_progress):
            loaded = load()
    except Exception as e:  # noqa: BLE001 - any load failure is one line naming the file and the cause
        raise UsageError(f"--input {path!r} does not load with {how}: {_root_cause(e)}") from None

    if isinstance(loaded, datasets.Dataset):
        if split is not None:
            raise UsageError(f"--split {split!r}: --input {path!r} is a single saved Dataset, which has no splits; "
                             f"drop --split")
        table = loaded
    else:
        if split is None:
            if len(loaded) != 1:
                raise UsageError(f"--input {path!r} has the splits {sorted(loaded)}; choose one with --split")
            split = next(iter(loaded))
        if split not in loaded:
            raise UsageError(f"--split {split!r} is not in --input {path!r} (splits: {sorted(loaded)})")
        table = loaded[split]
    return len(table), enumerate(table, start=1)


def read_input(path: str, split: Optional[str] = None,
               show_progress: bool = False) -> tuple[Optional[int], Iterator[tuple[int, Any]]]:
    """(row count when it is cheap to know, iterator of (row number, row)); the row number is the line number for
    JSON lines, else the 1-based position. A JSON line that does not parse is yielded as an ``UnparseableLine`` row,
    not raised; a file that cannot be read, is not UTF-8 or is corrupt raises UsageError (also while iterating)."""
    if not os.path.exists(path):
        raise UsageError(f"--input {path!r} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if split is not None and os.path.isfile(path) and extension in (".jsonl", ".json", ".parquet"):
        raise UsageError(f"--split {split!r}: --input {path!r} is a {extension} file, which has no splits; "
                         f"drop --split")

    def unreadable(error: OSError) -> UsageError:
        hint = "; check its permissions" if isinstance(error, PermissionError) else ""
        return UsageError(f"--input {path!r} cannot be read ({error.strerror or error}){hint}")

    try:
        if os.path.isfile(path) and extension == ".jsonl":
            # the output is written without a byte order mark, so one in the input is accepted (slime's own reader
            # would skip the first line)
            total, rows = None, jsonl_rows(path, accept_bom=True)
        elif os.path.isfile(path) and extension == ".json":
            total, rows = None, json_rows(path)
        elif os.path.isfile(path) and extension == ".parquet":
            total, rows = parquet_rows(path)
        else:
            total, rows = _datasets_rows(path, split, show_progress)
    except OSError as e:
        raise unreadable(e) from None
    except RowFileError as e:
        raise UsageError(f"--input {path!r} {e}") from None

    def guarded() -> Iterator[tuple[int, Any]]:
        try:
            yield from rows
        except OSError as e:
            raise unreadable(e) from None
        except RowFileError as e:
            raise UsageError(f"--input {path!r} {e}") from None

    return total, guarded()


# ---------------------------------------------------------------------------------------------- validation
def _check_text(value: Any, role: str, column: str) -> str:
    if value is None:
        raise RowError(f"missing_{role}", f"column {column!r} is missing or null")
    if not isinstance(value, str):
        raise RowError(f"bad_type_{role}", f"column {column!r} is a {type(value).__name__}, expected a string")
    if not value.strip():
        raise RowError(f"empty_{role}", f"column {column!r} is empty")
    return value


def _demonstration_text(value: Any, column: str) -> str:
    """A string demonstration, or a list of strings joined with newlines (the official SDFT code's rule for its
    list-valued ``golden_response``)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise RowError(
                    "bad_type_demonstration",
                    f"column {column!r} item {i} is a {type(item).__name__} ({item!r}); a demonstration list must hold "
                    f"only strings (they are joined with newlines)",
                )
        value = DEMONSTRATION_LIST_SEPARATOR.join(value)
    elif value is not None and not isinstance(value, str):
        raise RowError(
            "bad_type_demonstration",
            f"column {column!r} is a {type(value).__name__}, expected a string or a list of strings",
        )
    return _check_text(value, "demonstration", column)


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


def _prompt_for_demonstration(data: dict, columns: Columns) -> tuple[Any, str]:
    """(prompt, column it came from) of a row with a demonstration column: the prompt column, or else the messages
    column holding chat messages that do not end with an assistant turn (system + user turns, say)."""
    if data.get(columns.prompt) is not None:
        return _check_prompt(data[columns.prompt], "prompt", columns.prompt), columns.prompt
    messages = data.get(columns.messages)
    if messages is None:
        raise RowError(
            "missing_prompt",
            f"column {columns.prompt!r} is missing or null, and there is no column {columns.messages!r} of chat "
            f"messages to take the prompt from",
        )
    if not isinstance(messages, list):
        raise RowError(
            "bad_type_messages",
            f"column {columns.messages!r} is a {type(messages).__name__}, expected a list of chat messages",
        )
    prompt = _check_chat_prompt(messages, "prompt", columns.messages)
    if prompt[-1]["role"] == "assistant":
        raise RowError(
            "ambiguous_demonstration",
            f"column {columns.demonstration!r} holds a demonstration, and column {columns.messages!r} ends with an "
            f"assistant turn, which would be a second one; drop one of them (messages used as the prompt must not end "
            f"with an assistant turn)",
        )
    return prompt, columns.messages


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


def prepare_row(data: Any, columns: Columns, template: str, template_spec: str,
                student_template: Optional[str] = None) -> tuple[str, dict, Any, Any, Any]:
    """(kind, output row, prompt, teacher prompt, tools) of one input row; RowError if it is unusable.
    ``student_template`` (``--student-template``) wraps the student prompt of every row but an already prepared one;
    the teacher template still gets the bare question."""
    if isinstance(data, UnparseableLine):
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
        prompt, prompt_column = _prompt_for_demonstration(data, columns)
        consumed |= {columns.demonstration, columns.prompt, prompt_column}
        demonstration = _demonstration_text(data[columns.demonstration], columns.demonstration)
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
            f"(with {columns.prompt!r} or {columns.messages!r}) or {columns.messages!r}, nor "
            f"metadata[{teacher_key!r}]",
        )

    if student_template is not None and kind != "prepared":
        prompt = build_student_prompt(prompt, student_template)
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


# ------------------------------------------------------------------------------------------ absent columns
def _suggestion(flag: str, named: str, candidates: list) -> Optional[str]:
    """A column of the file that ``flag`` probably meant: a near spelling of ``named``, else a usual name."""
    close = closest_name(named, candidates)
    if close:
        return close
    return next((name for name in USUAL_COLUMN_NAMES.get(flag, ()) if name in candidates), None)


def _absent_column_error(path: str, absent: list, seen: set, assigned: set) -> UsageError:
    """One line for the (flag, column) pairs in ``absent``: the file's columns and the flags to give."""
    candidates = sorted(seen - assigned)
    fixes = []
    for flag, column in absent:
        suggestion = _suggestion(flag, column, candidates)
        if suggestion is not None:
            candidates.remove(suggestion)  # never propose one column for two flags
        fixes.append(f"{flag} {suggestion if suggestion is not None else '<column>'}")
    named = " or ".join(f"{column!r} ({flag})" for flag, column in absent)
    return UsageError(
        f"--input {path!r}: no row has a column {named}; its columns are {sorted(seen)}: name the right column, "
        f"e.g. {' '.join(fixes)}"
    )


def check_columns(path: str, columns: Columns, named: list, seen: set, good: list, bad: list) -> None:
    """UsageError when a column is absent from every row (``seen`` is the union of the rows' keys): a column the
    user named (``named``: (flag, column) pairs), or one the rows failed for. A column that is only null or empty
    in some rows is left to the bad-row report."""
    assigned = {columns.teacher_prompt, columns.prompt, columns.demonstration, columns.messages,
                columns.metadata_key} | set(columns.top_level) | {column for _, column in named}
    absent = [(flag, column) for flag, column in named if column not in seen]
    if absent:
        raise _absent_column_error(path, absent, seen, assigned)
    codes = {b.code for b in bad}
    prompt_absent = columns.prompt not in seen and columns.messages not in seen
    absent_prompt = [("--prompt-column", columns.prompt)] if prompt_absent else []
    teacher_sources = {columns.teacher_prompt, columns.demonstration, columns.messages}
    if "no_teacher_source" in codes and not teacher_sources & seen and not any(r.kind == "prepared" for r in good):
        raise _absent_column_error(path, [("--demonstration-column", columns.demonstration)] + absent_prompt, seen,
                                   assigned)
    if "missing_prompt" in codes and prompt_absent:
        raise _absent_column_error(path, absent_prompt, seen, assigned)


# ------------------------------------------------------------------------------------------------- writing
def rows_writer(path: str, rows: list) -> Callable[[Any], None]:
    """The writer of ``rows`` in the format of ``path`` (.parquet, else JSON lines)."""
    if not path.lower().endswith(".parquet"):
        return json_lines_writer(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise UsageError(
            f"--output {path!r}: the rows do not fit one Parquet schema ({e}); Parquet needs every row's fields "
            f"to have one type (e.g. all prompts strings or all chat messages): write .jsonl instead"
        ) from None
    return lambda f: pq.write_table(table, f)


# ---------------------------------------------------------------------------------------------- token stats
def load_tokenizer(path: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError("--tokenizer needs the 'transformers' package (pip install transformers)") from None
    if not os.path.isdir(path):
        raise UsageError(f"--tokenizer {path!r} is not a directory; give a local Hugging Face checkpoint directory "
                         "(its tokenizer files), as slime's --hf-checkpoint")
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
                   max_teacher_prompt_len: Optional[int], show_progress: bool = False) -> TokenStats:
    """Token lengths of the rendered student and teacher prompts, encoded as slime encodes prompts."""
    if not apply_chat_template:
        chat_rows = [r.row for r in rows if isinstance(r.prompt, list) or isinstance(r.teacher_prompt, list)]
        if chat_rows:
            raise UsageError(
                f"{len(chat_rows)} row(s) (first: {chat_rows[:MAX_LISTED]}) have chat-message prompts, which only a "
                f"chat template turns into text: pass --apply-chat-template (and give slime --apply-chat-template too)"
            )
    from tqdm import tqdm

    stats = TokenStats()
    for row in tqdm(rows, desc="measuring tokens", unit="row", file=sys.stderr, disable=not show_progress):
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


# ------------------------------------------------------------------------------------------------- preview
def shorten(text: str, head: int = PREVIEW_HEAD_CHARS, tail: int = PREVIEW_TAIL_CHARS) -> str:
    """``text`` with its middle replaced by a marker saying how many characters were left out, when it is longer
    than ``head + tail`` (the end stays visible: the template's closing instruction is there)."""
    left_out = len(text) - head - tail
    if left_out <= 0:
        return text
    return f"{text[:head]}\n[... {left_out} characters left out ...]\n{text[len(text) - tail:]}"


def teacher_prompt_preview(row: PreparedRow, tokenizer, *, apply_chat_template: bool,
                           apply_chat_template_kwargs: Optional[dict]) -> str:
    """The labelled preview of ``row``'s teacher prompt: rendered with the chat template when there is a tokenizer
    and --apply-chat-template, else the raw string or chat messages (as JSON)."""
    if tokenizer is not None and apply_chat_template:
        text = render_prompt(row.teacher_prompt, tokenizer, apply_chat_template=True,
                             apply_chat_template_kwargs=apply_chat_template_kwargs, tools=row.tools)
        how = "rendered with the tokenizer's chat template, as slime renders it with --apply-chat-template"
    elif isinstance(row.teacher_prompt, str):
        text = row.teacher_prompt
        how = "raw string, as slime reads it without --apply-chat-template"
    else:
        text = json.dumps(row.teacher_prompt, ensure_ascii=False, indent=2)
        how = "raw chat messages as JSON; --tokenizer with --apply-chat-template shows them rendered"
    return (f"teacher prompt of row {row.row} (the first written row; {how}; {len(text)} characters):\n"
            f"----- begin teacher prompt -----\n{shorten(text)}\n----- end teacher prompt -----")


# -------------------------------------------------------------------------------------------------- driver
def build_parser() -> argparse.ArgumentParser:
    defaults = SelfDistillConfig()
    p = argparse.ArgumentParser(
        prog="python -m slime_self_distill.prepare_dataset",
        description="Write slime prompt rows whose metadata carries each row's teacher prompt.",
        epilog="Exit status: 0 success; 1 bad data (bad rows, no usable row, over budget with "
        "--fail-on-over-budget); 2 unusable flags or input (bad flag, a named column no row has, input missing, "
        "unreadable, not UTF-8 or corrupt, output that is a directory, is the input or cannot be written, tokenizer "
        "that does not load). A failed run leaves an existing output as it was.",
    )
    p.add_argument("--input", required=True, help=".jsonl, .json (a list or JSON lines), .parquet, .csv, .tsv, "
                   ".arrow, a directory written by datasets' save_to_disk (Dataset or DatasetDict), or a directory "
                   "that datasets.load_dataset reads")
    p.add_argument("--output", required=True, help="the prepared dataset: .jsonl or .parquet (what slime reads)")
    p.add_argument("--split", default=None,
                   help="the split to read from a DatasetDict or datasets directory with several splits")
    p.add_argument("--prompt-column", default=None,
                   help="the student prompt (string or chat messages); default 'prompt'. A row with a demonstration "
                   "but no prompt column takes its prompt from --messages-column (chat messages without a final "
                   "assistant turn)")
    p.add_argument("--demonstration-column", default=None,
                   help="the demonstration that --template puts in the teacher prompt (a string, or a list of strings "
                   "joined with newlines); default 'demonstration'")
    p.add_argument("--teacher-prompt-column", default=None,
                   help="a ready teacher prompt; moved into the metadata (wins over a demonstration); default "
                   "'teacher_prompt'")
    p.add_argument("--messages-column", default=None,
                   help="chat messages whose final turn is the assistant demonstration (or, with a demonstration "
                   "column, the prompt turns); default 'messages'")
    p.add_argument("--student-template", default=None,
                   help=f"student prompt template: a name ({', '.join(STUDENT_TEMPLATES)}), a file holding a format "
                   "string, or a literal format string with {prompt} only; default: the prompt as it is")
    p.add_argument("--template", default="sdft",
                   help=f"teacher template: a name ({', '.join(TEMPLATES)}), a file holding a format string, or a "
                   f"literal format string with {{prompt}} and {{demonstration}}; default 'sdft'")
    p.add_argument("--metadata-key", default="metadata",
                   help="the output's metadata column (slime's --metadata-key); an input column of that name is "
                   "merged into it; default 'metadata'")
    p.add_argument("--teacher-prompt-key", default=defaults.teacher_prompt_key,
                   help="metadata key of the teacher prompt (--self-distill-teacher-prompt-key)")
    p.add_argument("--keep-columns", choices=("metadata", "top_level"), default="metadata",
                   help="where the input's other columns go")
    p.add_argument("--label-key", default=None,
                   help="the label column, as slime's --label-key: kept at the top level, where slime reads it; "
                   "default 'label' ('' for none)")
    p.add_argument("--tool-key", default=None,
                   help="the tools column, as slime's --tool-key: kept at the top level, given to the chat template; "
                   "default 'tools' ('' for none)")
    p.add_argument("--top-level-columns", nargs="*", default=[],
                   help="more columns kept at the top level of the row whatever --keep-columns says (e.g. slime's "
                   "--multimodal-keys columns)")
    p.add_argument("--skip-invalid", action="store_true",
                   help=f"write the good rows and report the bad ones in <output>{REJECTED_SUFFIX} instead of failing")
    p.add_argument("--tokenizer", default=None,
                   help="a local Hugging Face tokenizer directory: print token lengths (and, with "
                   "--apply-chat-template, preview the rendered teacher prompt)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render prompts as slime's --apply-chat-template (for the token lengths and the preview)")
    p.add_argument("--apply-chat-template-kwargs", type=json.loads, default=None,
                   help="JSON object passed to the chat template, as slime's flag of that name")
    p.add_argument("--max-teacher-prompt-len", type=int, default=None,
                   help="count the rows whose teacher prompt is over this many tokens (needs --tokenizer)")
    p.add_argument("--fail-on-over-budget", action="store_true",
                   help="fail, writing nothing, if a row is over --max-teacher-prompt-len")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars and no teacher prompt preview (counts, token statistics and errors are "
                   "still printed)")
    return p


def resolve_column_flags(args: argparse.Namespace) -> list:
    """Fill in the column flags the user did not give; return the (flag, column) pairs of those given (an empty
    --label-key or --tool-key means no such column and names none)."""
    named = []
    for name, default in COLUMN_FLAG_DEFAULTS.items():
        value = getattr(args, name)
        if value is None:
            setattr(args, name, default)
        elif value:
            named.append(("--" + name.replace("_", "-"), value))
    return named + [("--top-level-columns", column) for column in args.top_level_columns]


def _check_args(args: argparse.Namespace) -> tuple[str, Optional[str]]:
    """The loaded teacher and student templates; UsageError for inconsistent flags."""
    if os.path.splitext(args.output)[1].lower() not in OUTPUT_FORMATS:
        if os.path.isdir(args.output):
            raise UsageError(f"--output {args.output!r} is a directory; give a file path ending in .jsonl or .parquet")
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
        template = load_template(args.template)
    except TemplateError as e:
        raise UsageError(f"--template: {e}") from None
    try:
        return template, None if args.student_template is None else load_student_template(args.student_template)
    except TemplateError as e:
        raise UsageError(f"--student-template: {e}") from None


def _check_output_paths(input_path: str, outputs: dict) -> None:
    """UsageError for an output that is a directory or the (existing) input file under another spelling."""
    for path, name in outputs.items():
        if os.path.isdir(path):
            raise UsageError(f"{name} {path!r} is a directory; give a file path ending in .jsonl or .parquet")
        if os.path.exists(path) and os.path.samefile(path, input_path):
            raise UsageError(f"{name} {path!r} is the input file itself ({input_path!r}); write to another path (the "
                             f"raw rows would be replaced by the prepared ones)")


def _check_json_encodable(output: dict) -> None:
    try:
        json.dumps(output, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise RowError("not_json_serializable", f"the row cannot be written as JSON: {e}") from None


def run(args: argparse.Namespace) -> int:
    named_columns = resolve_column_flags(args)
    template, student_template = _check_args(args)
    show_progress = not args.quiet and sys.stderr.isatty()
    total, rows = read_input(args.input, args.split, show_progress)
    report = args.output + REJECTED_SUFFIX
    outputs = {args.output: "--output"}
    if args.skip_invalid:
        outputs[report] = "the rejected-rows report"
    _check_output_paths(args.input, outputs)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    columns = Columns(
        teacher_prompt=args.teacher_prompt_column, prompt=args.prompt_column,
        demonstration=args.demonstration_column, messages=args.messages_column, metadata_key=args.metadata_key,
        teacher_prompt_key=args.teacher_prompt_key, keep_columns=args.keep_columns,
        top_level=frozenset(args.top_level_columns) | {key for key in (args.label_key, args.tool_key) if key},
        tool_key=args.tool_key or None,
    )
    write_jsonl = not args.output.lower().endswith(".parquet")

    from tqdm import tqdm

    with PendingOutputs(outputs) as pending:
        good, bad, seen = [], [], set()
        for number, data in tqdm(rows, total=total, desc="preparing", unit="row", file=sys.stderr,
                                 disable=not show_progress):
            if isinstance(data, dict):
                seen.update(data)
            try:
                kind, output, prompt, teacher_prompt, tools = prepare_row(data, columns, template, args.template,
                                                                          student_template)
                if write_jsonl:
                    _check_json_encodable(output)
            except RowError as e:
                bad.append(BadRow(number, e.code, e.reason, data))
                continue
            good.append(PreparedRow(number, kind, output, prompt, teacher_prompt, tools))
        rows_in = len(good) + len(bad)
        if seen:  # without a single object row there are no columns to speak of: the bad rows say why
            check_columns(args.input, columns, named_columns, seen, good, bad)

        if bad and not args.skip_invalid:
            print_bad_rows(bad, sys.stderr)
            print(f"bad rows by reason: {counts(b.code for b in bad)}", file=sys.stderr)
            print(f"nothing written to {args.output}: fix the rows or pass --skip-invalid", file=sys.stderr)
            return EXIT_BAD_DATA
        if not good:
            print(f"no usable row in {args.input} ({rows_in} read); nothing written", file=sys.stderr)
            return EXIT_BAD_DATA

        if tokenizer is not None:
            stats = measure_tokens(good, tokenizer, apply_chat_template=args.apply_chat_template,
                                   apply_chat_template_kwargs=args.apply_chat_template_kwargs,
                                   max_teacher_prompt_len=args.max_teacher_prompt_len, show_progress=show_progress)
            print(format_token_stats(stats))
            if args.max_teacher_prompt_len is not None:
                over = stats.over_budget
                listed = ", ".join(f"row {n} ({length})" for n, length in over[:MAX_LISTED])
                print(f"teacher prompts over {args.max_teacher_prompt_len} tokens: {len(over)} of {len(good)}"
                      + (f"; first: {listed}. In training, --self-distill-max-teacher-prompt-len with "
                         "--self-distill-teacher-overflow error stops at them; drop or truncate_demonstration handles "
                         "them" if over else ""))
                if over and args.fail_on_over_budget:
                    print(f"nothing written to {args.output} (--fail-on-over-budget)", file=sys.stderr)
                    return EXIT_BAD_DATA

        pending.write(args.output, rows_writer(args.output, [row.output for row in good]))
        if args.skip_invalid:
            pending.write(report, rejected_writer(bad))
        pending.commit()

    print(f"rows read: {rows_in}")
    print(f"rows written: {len(good)} ({counts(row.kind for row in good)}) -> {args.output}")
    if args.skip_invalid:
        print(f"rows rejected: {len(bad)} ({counts(b.code for b in bad)}) -> {report}")
        if bad:
            print_bad_rows(bad, sys.stdout)
    without_label = [row.row for row in good if args.label_key not in row.output]
    if args.label_key and 0 < len(without_label) < len(good):
        print(f"note: {len(without_label)} written row(s) (first: {without_label[:MAX_LISTED]}) have no "
              f"{args.label_key!r} column; slime given --label-key {args.label_key} reads it from every row and stops "
              f"with a KeyError on them")
    if not args.quiet:
        print(teacher_prompt_preview(good[0], tokenizer, apply_chat_template=args.apply_chat_template,
                                     apply_chat_template_kwargs=args.apply_chat_template_kwargs))
    return EXIT_OK


def main(argv: Optional[list] = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
