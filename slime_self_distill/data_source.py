"""slime data source that gives every sample the exact text its teacher will read.

Use with ``--data-source-path slime_self_distill.data_source.SelfDistillRolloutDataSource``.

The student's prompt is left untouched: slime's ``Dataset`` has already rendered it. The teacher prompt is read
from ``sample.metadata[--self-distill-teacher-prompt-key]`` (a string or chat messages, written by
``prepare_dataset``) and rendered the way slime's ``Dataset`` renders the student prompt (same tokenizer, chat
template, ``--apply-chat-template-kwargs`` or ``--self-distill-teacher-chat-template-kwargs``, and tools). The result
goes into the plugin's own metadata entry,
``sample.metadata["self_distill"]``:

* ``"teacher_prompt_text"``: the rendered teacher prompt (the converter encodes it exactly as slime encodes the
  student prompt: ``tokenizer.encode(text, add_special_tokens=False)``);
* ``"missing_teacher_reason"``: instead of the text, when the sample has no usable teacher prompt and
  ``--self-distill-missing-teacher exclude`` is set; the converter then leaves it out of the distillation loss;
* ``"demonstration"`` / ``"template"`` are ``prepare_dataset``'s entries, kept as they are for
  ``--self-distill-teacher-overflow truncate_demonstration`` (with the raw teacher prompt, which stays in the
  metadata: slime keeps only the rendered student prompt, so the converter recovers the raw one from it).

The annotation is a pure function of the row, so groups pushed back through ``add_samples`` (aborted rollouts)
are simply annotated again when they leave the buffer, and ``save``/``load`` need nothing beyond slime's own
counters. slime is imported only when the class is first accessed, so this module imports without slime.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from slime_self_distill.config import SelfDistillConfig, flag_name
from slime_self_distill.contexts.sdpo import reprompt_target_problem
from slime_self_distill.data.files import RowFileError, UnparseableLine, jsonl_rows, parquet_rows

PLUGIN_METADATA_KEY = "self_distill"
TEACHER_PROMPT_TEXT_KEY = "teacher_prompt_text"
MISSING_TEACHER_REASON_KEY = "missing_teacher_reason"
# Written by prepare_dataset when the teacher prompt was built from a demonstration.
DEMONSTRATION_KEY = "demonstration"
TEMPLATE_KEY = "template"
# Written by the data source when the teacher prompt is built after rewards (SDPO, a user-defined builder): the raw
# student prompt (chat messages, or the string slime feeds), which slime's Dataset does not keep.
STUDENT_PROMPT_KEY = "student_prompt"

logger = logging.getLogger(__name__)

DATA_SOURCE_PATH = "slime_self_distill.data_source.SelfDistillRolloutDataSource"
PROMPT_EXCERPT_CHARS = 80


class SelfDistillDataError(ValueError):
    """A sample cannot be given a teacher; the message names the sample and the fix."""


# ---------------------------------------------------------------------------------------------- pure logic
def describe_sample(sample: Any) -> str:
    """``sample index=.. group_index=.. prompt='...'``: enough to find the row the sample came from."""
    prompt = str(getattr(sample, "prompt", ""))
    excerpt = prompt if len(prompt) <= PROMPT_EXCERPT_CHARS else prompt[:PROMPT_EXCERPT_CHARS] + "..."
    return (
        f"sample index={getattr(sample, 'index', None)} group_index={getattr(sample, 'group_index', None)} "
        f"prompt={excerpt!r}"
    )


def teacher_prompt_problem(teacher_prompt: Any, *, apply_chat_template: bool) -> Optional[str]:
    """Why ``teacher_prompt`` cannot be rendered the way slime renders the student prompt (None when it can)."""
    if teacher_prompt is None:
        return "no teacher prompt"
    if isinstance(teacher_prompt, str):
        return "empty teacher prompt" if not teacher_prompt else None
    if isinstance(teacher_prompt, list):
        if not teacher_prompt:
            return "empty teacher prompt (no messages)"
        if not apply_chat_template:
            return (
                "teacher prompt is chat messages but --apply-chat-template is off, so slime feeds the student "
                "prompt as raw text; store the teacher prompt as a string or turn --apply-chat-template on"
            )
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in teacher_prompt):
            return "teacher prompt messages must be dicts with 'role' and 'content'"
        return None
    return f"teacher prompt has type {type(teacher_prompt).__name__}; expected a string or a list of chat messages"


def annotate_teacher_prompt(
    metadata: dict,
    *,
    config: SelfDistillConfig,
    apply_chat_template: bool,
    render: Callable[[Any, Any], str],
    sample_description: str,
) -> None:
    """Write the rendered teacher prompt (or the reason there is none) into ``metadata["self_distill"]``.

    ``render(prompt, tools)`` renders a string or chat messages exactly like slime's ``Dataset`` (``templates.
    render_prompt``: under ``--apply-chat-template`` a string is one user message). Idempotent: a
    sample annotated before (pushed back to the buffer) is annotated again from the same row, with the same result.
    """
    if not isinstance(metadata, dict):
        raise SelfDistillDataError(
            f"{sample_description}: metadata is {type(metadata).__name__}, expected a dict; check --metadata-key "
            f"and re-run prepare_dataset"
        )
    plugin = metadata.get(PLUGIN_METADATA_KEY) or {}
    if not isinstance(plugin, dict):
        raise SelfDistillDataError(
            f"{sample_description}: metadata[{PLUGIN_METADATA_KEY!r}] is {type(plugin).__name__}, expected a dict "
            f"(the plugin's own entry); rename that column of the dataset"
        )
    plugin = {k: v for k, v in plugin.items() if k not in (TEACHER_PROMPT_TEXT_KEY, MISSING_TEACHER_REASON_KEY)}

    teacher_prompt = metadata.get(config.teacher_prompt_key)
    problem = teacher_prompt_problem(teacher_prompt, apply_chat_template=apply_chat_template)
    if problem is None:
        tools = metadata.get("tools")  # slime's Dataset keeps the row's tools here (--tool-key)
        plugin[TEACHER_PROMPT_TEXT_KEY] = render(teacher_prompt, tools)
    elif config.missing_teacher == "exclude":
        plugin[MISSING_TEACHER_REASON_KEY] = f"missing_teacher: {problem} in metadata[{config.teacher_prompt_key!r}]"
    else:
        raise SelfDistillDataError(
            f"{sample_description}: {problem} in metadata[{config.teacher_prompt_key!r}]. Build the dataset with "
            f"slime_self_distill.prepare_dataset (it writes the teacher prompt of every row), point "
            f"{flag_name('teacher_prompt_key')} at the metadata key that holds it, or pass "
            f"{flag_name('missing_teacher')} exclude to keep such samples for rollout but out of the distillation loss"
        )
    metadata[PLUGIN_METADATA_KEY] = plugin


def student_prompt_index(rows: Iterator[tuple[int, Any]], keys: "PromptDataKeys",
                         render: Callable[[Any, Any], str]) -> dict:
    """``{rendered student prompt: raw prompt}`` of the ``--prompt-data`` rows, rendered as slime's ``Dataset`` renders
    them (``render(prompt, tools)``; under ``--apply-chat-template`` a string prompt is one user message). Rows slime
    could not read are left out (slime stops on them itself). Two rows that render alike from different raw prompts
    are refused: their reprompts could differ (e.g. one string holding chat markup vs. two messages)."""
    index: dict = {}
    first_row: dict = {}
    for number, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get(keys.input_key), (str, list)):
            continue
        raw = row[keys.input_key]
        if isinstance(raw, str) and keys.apply_chat_template:
            raw = [{"role": "user", "content": raw}]
        tools = row.get(keys.tool_key) if keys.tool_key else None
        rendered = render(raw, json.loads(tools) if isinstance(tools, str) else tools)
        if rendered in index and index[rendered] != raw:
            raise SelfDistillDataError(
                f"--prompt-data rows {first_row[rendered]} and {number} render to the same prompt from different raw "
                f"prompts ({index[rendered]!r} and {raw!r}), so the SDPO reprompt cannot tell which to rewrite; "
                "remove or merge one of them"
            )
        index[rendered] = raw
        first_row.setdefault(rendered, number)
    return index


def annotate_student_prompt(metadata: dict, prompt: Any, *, index: Optional[dict], required: bool,
                            sample_description: str) -> None:
    """Record the raw student prompt in ``metadata["self_distill"]["student_prompt"]``: the rendered prompt looked up
    in ``index`` (None: no chat template, the prompt is the raw string). ``required`` (SDPO) makes a prompt that is in
    no row an error; a user-defined builder just finds no entry."""
    raw = prompt if index is None else index.get(prompt)
    plugin = metadata.setdefault(PLUGIN_METADATA_KEY, {})
    if raw is not None:
        plugin[STUDENT_PROMPT_KEY] = copy.deepcopy(raw)  # the sample's own: a builder may change it
    elif required:
        raise SelfDistillDataError(
            f"{sample_description}: its prompt is not the rendering of any --prompt-data row, so the raw messages the "
            "reprompt replaces the last user message of are unknown (did the rollout function change sample.prompt?)"
        )


# ---------------------------------------------------------------------------------------------- the prompt file
@dataclass(frozen=True)
class PromptDataKeys:
    """The slime flags that say where a row's fields are (``--input-key`` etc.), as slime's ``Dataset`` reads them."""

    input_key: str = "input"
    metadata_key: str = "metadata"
    label_key: Optional[str] = None
    tool_key: Optional[str] = "tools"
    apply_chat_template: bool = False


@dataclass
class PromptDataReport:
    rows: int = 0
    without_teacher: int = 0  # rows kept for rollout without a teacher (--self-distill-missing-teacher exclude)
    problems: list = field(default_factory=list)  # (row number, problem)
    longest_teacher_prompt: Optional[int] = None  # tokens, when the teacher prompts were encoded


def split_row_slice(path: str) -> tuple[str, Optional[slice]]:
    """slime's ``path@[start:end]`` row selection (``slime/utils/data.py``)."""
    match = re.match(r"^(?P<path>.*)@\[(?P<start>-?\d*):(?P<end>-?\d*)\]$", path)
    if match is None:
        return path, None
    start, end = (int(value) if value else None for value in (match.group("start"), match.group("end")))
    return match.group("path"), slice(start, end)


def read_prompt_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(row number, row) of slime's ``--prompt-data`` file, as slime's ``read_file`` selects them: .jsonl (row number =
    line number; a line that is not JSON, a first line behind a byte order mark included, comes as
    ``UnparseableLine``, where slime would print and skip it) or .parquet (1-based position), with the
    ``@[start:end]`` suffix. A file that cannot be read, is not UTF-8 or is corrupt raises ``SelfDistillDataError``."""
    real_path, row_slice = split_row_slice(path)
    if not os.path.isfile(real_path):
        raise SelfDistillDataError(f"--prompt-data {real_path} does not exist or is not a file")
    if not real_path.endswith((".jsonl", ".parquet")):
        raise SelfDistillDataError(f"--prompt-data {real_path}: slime reads only .jsonl and .parquet files")

    def rows() -> Iterator[tuple[int, Any]]:
        try:
            if real_path.endswith(".jsonl"):
                yield from jsonl_rows(real_path, accept_bom=False)
            else:
                yield from parquet_rows(real_path)[1]
        except RowFileError as error:
            raise SelfDistillDataError(f"--prompt-data {real_path} {error}") from None
        except OSError as error:
            raise SelfDistillDataError(f"--prompt-data {real_path} cannot be read ({error.strerror or error})") from None

    if row_slice is None:
        return rows()
    if (row_slice.start or 0) < 0 or (row_slice.stop or 0) < 0:
        return iter(list(rows())[row_slice])
    return itertools.islice(rows(), row_slice.start, row_slice.stop)


def prompt_row_problem(row: Any, keys: PromptDataKeys, config: SelfDistillConfig) -> tuple[Optional[str], bool]:
    """(why slime or the data source would fail on this row, or None; whether it has a teacher prompt)."""
    if isinstance(row, UnparseableLine):
        return f"not valid JSON ({row.error}); slime would skip the line without a word", False
    if not isinstance(row, dict):
        return f"the row is a {type(row).__name__}, expected an object", False
    prompt = row.get(keys.input_key)
    if not isinstance(prompt, (str, list)) or not prompt:
        found = "missing" if prompt is None else f"a {type(prompt).__name__}" if prompt else "empty"
        return (f"--input-key {keys.input_key!r} is {found}, expected a non-empty string or chat messages "
                f"(the row's columns: {sorted(row)})"), False
    if isinstance(prompt, list) and not keys.apply_chat_template:
        return f"--input-key {keys.input_key!r} holds chat messages, which slime renders only with --apply-chat-template", False
    if keys.label_key is not None and keys.label_key not in row:
        fix = ("prepare the file with prepare_dataset --label-key <the label column> (it stays at the top level)"
               if config.teacher_prompt_from_row and not config.collects_revisions else
               "add that column to every row (the teacher context is built from the rewards)")
        return (f"--label-key {keys.label_key!r} is missing (the row's columns: {sorted(row)}); slime reads it for the "
                f"reward: {fix}, or score without labels (--rm-type random, no --label-key)"), False
    if keys.tool_key is not None and row.get(keys.tool_key) is not None:
        tools = row[keys.tool_key]
        try:
            tools = json.loads(tools) if isinstance(tools, str) else tools
        except json.JSONDecodeError as error:
            return f"--tool-key {keys.tool_key!r} is a string that is not JSON ({error})", False
        if not isinstance(tools, list):
            return f"--tool-key {keys.tool_key!r} is a {type(tools).__name__}, slime needs a list of tools", False
    metadata = row.get(keys.metadata_key) or {}
    if not isinstance(metadata, dict):
        return f"--metadata-key {keys.metadata_key!r} is a {type(metadata).__name__}, expected an object", False
    if not config.teacher_prompt_from_row or config.collects_revisions:  # the row needs no teacher prompt
        if config.builds_sdpo_context:
            problem = reprompt_target_problem(prompt)
            if problem is not None:
                return f"--input-key {keys.input_key!r}: {problem}", False
        return None, True
    problem = teacher_prompt_problem(metadata.get(config.teacher_prompt_key),
                                     apply_chat_template=keys.apply_chat_template)
    if problem is None:
        return None, True
    if config.missing_teacher == "exclude":
        return None, False
    return (f"{problem} in {keys.metadata_key}[{config.teacher_prompt_key!r}] (build the file with "
            f"slime_self_distill.prepare_dataset, or pass {flag_name('missing_teacher')} exclude)"), False


def check_prompt_data(path: str, keys: PromptDataKeys, config: SelfDistillConfig,
                      teacher_prompt_tokens: Optional[Callable[[Any, Any], int]] = None) -> PromptDataReport:
    """Every row of ``--prompt-data`` through the checks slime's ``Dataset`` and this data source apply.

    ``teacher_prompt_tokens(teacher_prompt, tools)``: the length of a teacher prompt rendered and encoded as the data
    source and the converter do; given, every teacher prompt is rendered, and one over
    ``--self-distill-max-teacher-prompt-len`` under ``--self-distill-teacher-overflow error`` (which would stop the
    rollout that draws it) is a problem."""
    report = PromptDataReport()
    budget = config.max_teacher_prompt_len if config.teacher_overflow == "error" else None
    for number, row in read_prompt_rows(path):
        report.rows += 1
        problem, has_teacher = prompt_row_problem(row, keys, config)
        if (problem is None and has_teacher and teacher_prompt_tokens is not None and config.teacher_prompt_from_row
                and not config.collects_revisions):
            tools = row.get(keys.tool_key) if keys.tool_key else None
            try:
                length = teacher_prompt_tokens(row[keys.metadata_key][config.teacher_prompt_key],
                                               json.loads(tools) if isinstance(tools, str) else tools)
            except Exception as error:  # noqa: BLE001 - the chat template's own error, reported for the row
                problem = f"the teacher prompt does not render with the chat template: {error}"
            else:
                report.longest_teacher_prompt = max(report.longest_teacher_prompt or 0, length)
                if budget is not None and length > budget:
                    problem = (f"the teacher prompt has {length} tokens, over {flag_name('max_teacher_prompt_len')}="
                               f"{budget} (the rollout that draws it would stop); raise it, or set "
                               f"{flag_name('teacher_overflow')} drop or truncate_demonstration")
        if problem is not None:
            report.problems.append((number, problem))
        elif not has_teacher:
            report.without_teacher += 1
    return report


# ---------------------------------------------------------------------------------------------- slime glue
@functools.lru_cache(maxsize=None)
def load_hf_tokenizer(hf_checkpoint: str):
    """The tokenizer slime itself uses for ``--hf-checkpoint`` (one instance per path and process)."""
    from slime.utils.processing_utils import load_tokenizer

    return load_tokenizer(hf_checkpoint, trust_remote_code=True)


def prompt_renderer(tokenizer: Any, *, apply_chat_template: bool,
                    apply_chat_template_kwargs: Optional[dict]) -> Callable[[Any, Any], str]:
    """``render(prompt, tools)`` with ``tokenizer``, as slime's ``Dataset`` renders a prompt
    (``templates.render_prompt``)."""
    from slime_self_distill.data.templates import render_prompt

    def render(prompt: Any, tools: Any) -> str:
        return render_prompt(prompt, tokenizer, apply_chat_template=apply_chat_template,
                             apply_chat_template_kwargs=apply_chat_template_kwargs, tools=tools)

    return render


def teacher_renderer(tokenizer: Any, config: SelfDistillConfig, *, apply_chat_template: bool,
                     apply_chat_template_kwargs: Optional[dict]) -> Callable[[Any, Any], str]:
    """``render(prompt, tools)`` of teacher prompts: with the chat template when ``--apply-chat-template``, given
    ``--self-distill-teacher-chat-template-kwargs`` when set (e.g. a teacher reading in thinking mode), else the
    student's ``--apply-chat-template-kwargs``."""
    kwargs = config.teacher_chat_template_kwargs
    return prompt_renderer(tokenizer, apply_chat_template=apply_chat_template,
                           apply_chat_template_kwargs=apply_chat_template_kwargs if kwargs is None else kwargs)


def teacher_prompt_renderer(args: Any, config: SelfDistillConfig) -> Callable[[Any, Any], str]:
    """``teacher_renderer`` with slime's tokenizer of ``--hf-checkpoint`` and slime's parsed arguments."""
    return teacher_renderer(load_hf_tokenizer(args.hf_checkpoint), config,
                            apply_chat_template=bool(args.apply_chat_template),
                            apply_chat_template_kwargs=args.apply_chat_template_kwargs)


def student_prompt_renderer(args: Any) -> Callable[[Any, Any], str]:
    """``render(prompt, tools)`` of student prompts exactly as slime's ``Dataset`` (its chat-template arguments)."""
    return prompt_renderer(load_hf_tokenizer(args.hf_checkpoint), apply_chat_template=bool(args.apply_chat_template),
                           apply_chat_template_kwargs=args.apply_chat_template_kwargs)


def prompt_data_keys(args: Any) -> PromptDataKeys:
    """Where slime's ``Dataset`` reads a row's fields, from slime's parsed arguments."""
    return PromptDataKeys(input_key=args.input_key, metadata_key=args.metadata_key, label_key=args.label_key,
                          tool_key=args.tool_key, apply_chat_template=bool(args.apply_chat_template))


def check_supported_args(args: Any) -> None:
    if getattr(args, "multimodal_keys", None):
        raise SelfDistillDataError(
            "--multimodal-keys is set, but the teacher prompt is text only (its images/videos would not reach the "
            "teacher); run self-distillation on a text-only dataset"
        )


def _build_data_source_class() -> type:
    try:
        from slime.rollout.data_source import RolloutDataSourceWithBuffer
    except ImportError as error:
        raise ImportError(
            "SelfDistillRolloutDataSource subclasses slime's RolloutDataSourceWithBuffer, but slime is not "
            f"importable ({error}); install a THUDM/slime checkout (README 'Running on a cluster')"
        ) from error

    class SelfDistillRolloutDataSource(RolloutDataSourceWithBuffer):
        """slime's buffered data source whose samples carry their rendered teacher prompt (module docstring)."""

        def __init__(self, args):
            check_supported_args(args)
            self.self_distill_config = SelfDistillConfig.from_args(args)
            super().__init__(args)
            self._render = teacher_prompt_renderer(args, self.self_distill_config)
            self._student_prompts = None
            if self.self_distill_config.builds_sdpo_context and self.dataset is None:
                raise SelfDistillDataError(
                    f"{flag_name('teacher_context')} sdpo rewrites the last user message of each sample's prompt, "
                    "which slime's data source knows only for the prompts of --prompt-data with "
                    "--rollout-global-dataset; give both, or build your own teacher context with "
                    f"{flag_name('teacher_context_path')}"
                )
            if self.self_distill_config.needs_raw_student_prompt and args.apply_chat_template:
                self._student_prompts = {}  # without slime's dataset, a builder's samples have no raw prompt
            if self._student_prompts is not None and self.dataset is not None:
                # the whole file (the index is a superset of the rows slime keeps, whatever its @[start:end])
                self._student_prompts = student_prompt_index(
                    read_prompt_rows(split_row_slice(args.prompt_data)[0]), prompt_data_keys(args),
                    student_prompt_renderer(args))
                logger.info("self-distillation: indexed the raw prompts of %d rows of %s for the teacher context",
                            len(self._student_prompts), args.prompt_data)

        def get_samples(self, num_samples: int):
            groups = super().get_samples(num_samples)
            config = self.self_distill_config
            for group in groups:
                for sample in group:
                    if config.teacher_prompt_from_row and not config.collects_revisions:
                        annotate_teacher_prompt(
                            sample.metadata,
                            config=config,
                            apply_chat_template=bool(self.args.apply_chat_template),
                            render=self._render,
                            sample_description=describe_sample(sample),
                        )
                    if config.needs_raw_student_prompt:
                        annotate_student_prompt(sample.metadata, sample.prompt, index=self._student_prompts,
                                                required=config.builds_sdpo_context,
                                                sample_description=describe_sample(sample))
            return groups

    SelfDistillRolloutDataSource.__module__ = __name__
    SelfDistillRolloutDataSource.__qualname__ = "SelfDistillRolloutDataSource"
    return SelfDistillRolloutDataSource


def __getattr__(name: str):
    # Built on first access so that importing this module does not need slime; cached as a module global so
    # that pickling the class by reference finds it.
    if name == "SelfDistillRolloutDataSource":
        cls = _build_data_source_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
