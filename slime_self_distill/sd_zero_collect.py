"""SD-Zero phase 1 inside a slime run: collect self-revision tuples (x, y_init, P_r, y_revised).

SD-Zero (princeton-pli/Self-Distillation-Zero, ``self-revision-training/self_critique_pipeline.py``) samples a first
attempt y_init per prompt x, grades it, and (by default only when it is wrong) continues the *assistant turn* with
the text ``y_init + "\\n\\n" + P_r + "\\n\\n"`` to sample revisions y_revised, graded the same way; a tuple is kept
when its revision is verified correct. Here slime does the sampling and the grading:

- ``generate_with_revision`` (``--custom-generate-function-path``): y_init with slime's own ``generate``, graded
  with slime's ``async_rm`` (the reward is set on the sample, so slime does not grade it again); then
  ``--self-distill-revisions-per-attempt`` revisions, each a fresh sample whose prompt is the rendered student
  prompt + y_init + delimiter, graded with ``async_rm`` against the sample's label. The kept tuples go to
  ``sample.metadata["self_distill"]["sd_zero_tuples"]``.
- ``generate_rollout`` (``--rollout-function-path``): slime's ``sglang_rollout.generate_rollout``, then the batch's
  kept tuples appended to the JSON-lines file ``--self-distill-revision-output`` (the whole file rewritten
  atomically), counts logged, and the collection stopped at ``--self-distill-revision-target`` tuples.

The file is what ``python -m slime_self_distill.sd_zero_data`` splits into the two SFT stages.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import IO, Any, Iterable

from slime_self_distill.config import config_of, flag_name
from slime_self_distill.contexts.groups import reward_of, rule_based_reward_type
from slime_self_distill.contexts.self_revision import revision_continuation, strip_stop_suffix
from slime_self_distill.data.cli import RowError
from slime_self_distill.data.files import RowFileError, jsonl_rows, write_atomically
from slime_self_distill.data.sd_zero_split import parse_row
from slime_self_distill.data_source import (
    PLUGIN_METADATA_KEY,
    STUDENT_PROMPT_KEY,
    SelfDistillDataError,
    describe_sample,
)

logger = logging.getLogger(__name__)

# Keys of sample.metadata["self_distill"] written by generate_with_revision.
TUPLES_KEY = "sd_zero_tuples"
COUNTS_KEY = "sd_zero_counts"
# Rule-based rewards of slime's rm_hub that grade against the label (``boxed_`` prefixes included).
LABELLED_RM_TYPES = ("math", "dapo", "deepscaler", "f1")
METRIC_PREFIX = "rollout/sd_zero/"


class SdZeroCollectError(SelfDistillDataError):
    """The collection cannot go on: a sample it cannot grade, an unusable flag or output file."""


# ----------------------------------------------------------------------------------------------- knobs
def output_path(args: Any) -> str:
    path = config_of(args).revision_output
    if not path:
        raise SdZeroCollectError(
            f"{flag_name('revision_output')} is not set: the SD-Zero collection rollout function writes the kept "
            "self-revision tuples to that JSON-lines file; give its path (an existing file of this format is resumed)")
    if os.path.isdir(path):
        raise SdZeroCollectError(f"{flag_name('revision_output')} {path!r} is a directory; give a .jsonl file path")
    return path


def revision_phrase(args: Any, y_init_correct: bool) -> str:
    config = config_of(args)
    return config.revision_phrase_correct if y_init_correct else config.revision_phrase_wrong


ROLLOUT_FUNCTION_PATH = f"{__name__}.generate_rollout"
GENERATE_FUNCTION_PATH = f"{__name__}.generate_with_revision"


def check_collection_args(args: Any) -> None:
    """The launcher's start-up check: the collection's two functions and its output file go together (any one without
    the others collects nothing, or fails at the first rollout), and what the collection cannot work with."""
    config = config_of(args)
    functions = {"--rollout-function-path": (getattr(args, "rollout_function_path", None), ROLLOUT_FUNCTION_PATH),
                 "--custom-generate-function-path": (getattr(args, "custom_generate_function_path", None),
                                                     GENERATE_FUNCTION_PATH)}
    given = [flag for flag, (value, ours) in functions.items() if value == ours]
    if not given and not config.collects_revisions:
        return
    missing = [f"{flag} {ours}" for flag, (value, ours) in functions.items() if value != ours]
    if not config.collects_revisions:
        raise SdZeroCollectError(f"{' and '.join(given)} name the SD-Zero collection, which needs "
                                 f"{flag_name('revision_output')} <the JSON-lines file of kept tuples>")
    if missing:
        raise SdZeroCollectError(f"{flag_name('revision_output')} collects SD-Zero tuples, which needs "
                                 f"{' and '.join(missing)}")
    check_args(args)


def check_args(args: Any) -> None:
    """What the collection cannot work with, refused before anything is generated."""
    config_of(args)  # the settings are valid
    if getattr(args, "group_rm", False):
        raise SdZeroCollectError(
            "--group-rm is set, but the SD-Zero collection grades each first attempt and each revision on its own "
            "(slime's async_rm) as soon as it is generated; use a per-sample reward")
    if getattr(args, "partial_rollout", False):
        raise SdZeroCollectError(
            "--partial-rollout is not supported by the SD-Zero collection: an aborted sample would be resumed "
            "without its revisions; drop the flag")


# ----------------------------------------------------------------------------------------- per sample
def _slime():
    from slime.rollout import rm_hub, sglang_rollout
    from slime.utils.types import Sample

    return sglang_rollout, rm_hub, Sample


def _plugin_metadata(sample: Any) -> dict:
    if sample.metadata is None:
        sample.metadata = {}
    if not isinstance(sample.metadata, dict):
        raise SdZeroCollectError(f"{describe_sample(sample)}: its metadata is a {type(sample.metadata).__name__}, "
                                 "expected a dict")
    plugin = sample.metadata.setdefault(PLUGIN_METADATA_KEY, {})
    if not isinstance(plugin, dict):
        raise SdZeroCollectError(f"{describe_sample(sample)}: metadata[{PLUGIN_METADATA_KEY!r}] is "
                                 f"{type(plugin).__name__}, expected a dict (the plugin's own entry)")
    return plugin


def tuple_prompt(sample: Any) -> Any:
    """The prompt written into a tuple: the raw prompt the plugin's data source recorded (chat messages or text),
    else slime's ``sample.prompt``."""
    plugin = sample.metadata.get(PLUGIN_METADATA_KEY) if isinstance(sample.metadata, dict) else None
    if isinstance(plugin, dict) and plugin.get(STUDENT_PROMPT_KEY) is not None:
        return copy.deepcopy(plugin[STUDENT_PROMPT_KEY])
    return sample.prompt


def check_label(args: Any, sample: Any) -> None:
    """A rule-based reward of slime that compares with the label, and no label: every attempt would be graded
    wrong without an error (a custom reward function is not checked: it may not need one)."""
    if sample.custom_rm_path or getattr(args, "custom_rm_path", None):
        return
    rm_type = rule_based_reward_type(args, sample)
    if rm_type in LABELLED_RM_TYPES and (sample.label is None or (isinstance(sample.label, str)
                                                                  and not sample.label.strip())):
        raise SdZeroCollectError(
            f"{describe_sample(sample)} has no label, but --rm-type {rm_type} grades the response against it, so "
            "no attempt could be verified correct; give the dataset's answer column with --label-key")


async def grade(args: Any, sample: Any, what: str) -> tuple[float, bool]:
    """slime's reward of ``sample`` (set as ``sample.reward``), its number (``--reward-key`` honoured) and whether it
    counts as correct (``>= --self-distill-success-threshold``)."""
    _, rm_hub, _ = _slime()
    sample.reward = await rm_hub.async_rm(args, sample)
    try:
        value = reward_of(args, sample)
    except SelfDistillDataError as e:
        raise SdZeroCollectError(f"{what}: {e}") from None
    value = value.item() if hasattr(value, "item") else value  # a numpy number, for the JSON file
    return value, value >= config_of(args).success_threshold


def stop_suffixes(args: Any, tokenizer: Any) -> list:
    """Texts a stopped response may end with (slime asks SGLang not to trim them): ``--rollout-stop``, the end
    token's text and that of ``--rollout-stop-token-ids`` (present unless ``--rollout-skip-special-tokens``)."""
    stops = getattr(args, "rollout_stop", None) or []
    suffixes = [stops] if isinstance(stops, str) else list(stops)
    if tokenizer is not None:
        if tokenizer.eos_token:
            suffixes.append(tokenizer.eos_token)
        for token_id in getattr(args, "rollout_stop_token_ids", None) or []:
            suffixes.append(tokenizer.decode([token_id]))
    return suffixes


def response_text(args: Any, sample: Any, suffixes: list) -> str:
    """The response as the official collection has it: without the stop text that ended it."""
    _, _, Sample = _slime()
    if sample.status == Sample.Status.COMPLETED:
        return strip_stop_suffix(sample.response, suffixes)
    return sample.response


# Fields of a Sample that describe the prompt (copied to a revision); every other field is generation output and
# starts at its default, so a field slime adds later is reset rather than carried over.
_PROMPT_FIELDS = ("group_index", "index", "rollout_id", "multimodal_inputs", "apply_chat_template_kwargs", "label",
                  "generate_function_path", "custom_rm_path", "train_metadata")


def revision_sample(sample: Any, prompt: str) -> Any:
    """A fresh pending sample for one revision: ``prompt`` as its text prompt (tokenized as a whole), the original's
    label and metadata (without this collection's entries), no tokens, response, reward or status."""
    _, _, Sample = _slime()
    kept = {name: copy.deepcopy(getattr(sample, name)) for name in _PROMPT_FIELDS}
    metadata = copy.deepcopy(sample.metadata) if isinstance(sample.metadata, dict) else {}
    plugin = metadata.get(PLUGIN_METADATA_KEY)
    if isinstance(plugin, dict):
        for key in (TUPLES_KEY, COUNTS_KEY):
            plugin.pop(key, None)
    return Sample(prompt=prompt, metadata=metadata, **kept)


def collection_done(args: Any) -> bool:
    """Whether this process's collection into ``--self-distill-revision-output`` has reached its target (no more
    revisions)."""
    path = config_of(args).revision_output
    state = _COLLECTIONS.get(os.path.abspath(path)) if path else None
    return state is not None and state.done


async def generate_with_revision(args: Any, sample: Any, sampling_params: dict, evaluation: bool = False) -> Any:
    """slime custom generate function: y_init, graded, then its revisions (see the module's docstring)."""
    sglang_rollout, _, Sample = _slime()
    revision_params = copy.deepcopy(sampling_params)  # slime's generate lowers max_new_tokens in place
    if evaluation:
        return await sglang_rollout.generate(args, sample, sampling_params)
    check_args(args)
    check_label(args, sample)
    if not isinstance(sample.prompt, str):
        raise SdZeroCollectError(
            f"{describe_sample(sample)}: its prompt is {type(sample.prompt).__name__}, not text; the revision "
            "continues the assistant turn as text, so the prompt must be rendered (--apply-chat-template)")
    plugin = _plugin_metadata(sample)
    sample = await sglang_rollout.generate(args, sample, sampling_params)
    if sample.status in (Sample.Status.ABORTED, Sample.Status.FAILED):
        return sample  # slime drops or retries it; nothing to grade

    y_init_reward, y_init_correct = await grade(args, sample, f"the first attempt of {describe_sample(sample)}")
    counts = {"y_init_correct": y_init_correct, "revised": False, "revisions_sampled": 0, "revisions_correct": 0,
              "revisions_aborted": 0}
    plugin[TUPLES_KEY] = []
    plugin[COUNTS_KEY] = counts
    state = sglang_rollout.GenerateState(args)
    wants_revision = not y_init_correct or config_of(args).revise_correct
    if not wants_revision or state.aborted or collection_done(args):
        return sample

    suffixes = stop_suffixes(args, state.tokenizer)
    y_init = response_text(args, sample, suffixes)
    phrase = revision_phrase(args, y_init_correct)
    prompt = revision_continuation(sample.prompt, y_init, phrase)
    revisions = [revision_sample(sample, prompt) for _ in range(config_of(args).revisions_per_attempt)]
    revisions = await asyncio.gather(*(sglang_rollout.generate(args, revision, copy.deepcopy(revision_params))
                                       for revision in revisions))
    counts["revised"] = True
    student_prompt = tuple_prompt(sample)
    for number, revision in enumerate(revisions):
        if revision.status in (Sample.Status.ABORTED, Sample.Status.FAILED):
            counts["revisions_aborted"] += 1
            continue
        counts["revisions_sampled"] += 1
        reward, correct = await grade(args, revision,
                                      f"revision {number} of the first attempt of {describe_sample(sample)}")
        if not correct:
            continue
        counts["revisions_correct"] += 1
        plugin[TUPLES_KEY].append({
            "prompt": copy.deepcopy(student_prompt), "label": sample.label, "y_init": y_init, "p_r": phrase,
            "y_revised": response_text(args, revision, suffixes), "y_init_correct": y_init_correct,
            "y_revised_correct": True, "y_init_reward": y_init_reward, "y_revised_reward": reward,
            "sample_index": sample.index, "revision_index": number,
        })
    return sample


# ----------------------------------------------------------------------------------------------- the file
@dataclass
class Collection:
    """The output file of one collection, as this process knows it."""

    path: str
    target: int
    count: int = 0  # tuples in the file
    ends_with_newline: bool = True
    last_output: Any = None  # the last rollout's output, returned again once the target is reached

    @property
    def done(self) -> bool:
        return self.count >= self.target


_COLLECTIONS: dict = {}


def _bad_file(path: str, where: str, why: str) -> SdZeroCollectError:
    return SdZeroCollectError(
        f"{flag_name('revision_output')} {path!r} {where}: {why}; it is not a file of this collection (JSON lines of "
        "kept self-revision tuples), so it is not resumed: move it away or give another path")


def load_collection(path: str, target: int) -> Collection:
    """The collection of ``path``: 0 tuples if the file does not exist; else its tuples, each checked (a line that
    is not one names the file and the line). A file holding more than ``target`` tuples is cut to its first
    ``target`` (rewritten atomically)."""
    collection = Collection(path, target)
    if not os.path.exists(path):
        return collection
    try:
        for line, row in jsonl_rows(path, accept_bom=False):
            try:
                parsed = parse_row(line, row)
            except RowError as e:
                raise _bad_file(path, f"line {line}", f"[{e.code}] {e.reason}") from None
            if parsed.source_format != "collection":
                raise _bad_file(path, f"line {line}", "the row has 'x', the official d_revision format")
            if not parsed.y_revised_correct:
                raise _bad_file(path, f"line {line}", "'y_revised_correct' is false; the collection writes only "
                                                      "verified revisions")
            collection.count += 1
    except RowFileError as e:
        raise _bad_file(path, "", str(e)) from None
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            collection.ends_with_newline = f.read(1) == b"\n"
    if collection.count > target:
        _truncate(collection)
    return collection


def _truncate(collection: Collection) -> None:
    path, target = collection.path, collection.target

    def write(out: IO[bytes]) -> None:
        kept = 0
        with open(path, "rb") as f:
            for raw in f:
                if kept == target:
                    break
                if not raw.strip():
                    continue
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")
                kept += 1

    write_atomically(path, write)
    logger.info("SD-Zero collection: %s held %d tuples, cut to the target %d", path, collection.count, target)
    collection.count, collection.ends_with_newline = target, True


def append_rows(collection: Collection, rows: list) -> int:
    """Append up to the target's remaining room of ``rows`` (JSON objects) by rewriting the whole file atomically
    (the old bytes, then the new lines); returns how many were written."""
    rows = rows[:max(collection.target - collection.count, 0)]
    if not rows:
        return 0
    path = collection.path
    lines = [json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n" for row in rows]

    def write(out: IO[bytes]) -> None:
        if os.path.exists(path):
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out)
            if not collection.ends_with_newline:
                out.write(b"\n")
        out.writelines(lines)

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    write_atomically(path, write)
    collection.count += len(rows)
    collection.ends_with_newline = True
    return len(rows)


def _collection(args: Any) -> Collection:
    path = output_path(args)
    key = os.path.abspath(path)
    target = config_of(args).revision_target
    collection = _COLLECTIONS.get(key)
    if collection is None or collection.target != target:
        collection = load_collection(path, target)
        _COLLECTIONS[key] = collection
        logger.info("SD-Zero collection into %s: %d tuples there, target %d%s", path, collection.count, target,
                    " (reached)" if collection.done else "")
    return collection


# ------------------------------------------------------------------------------------------------ rollout
def flat_samples(node: Any) -> Iterable[Any]:
    if isinstance(node, list):
        for item in node:
            yield from flat_samples(item)
    else:
        yield node


def batch_tuples(samples: Iterable[Any], rollout_id: int) -> tuple[list, dict]:
    """The kept tuples of a batch's samples (in the samples' order) with ``rollout_id``, and the batch's counts."""
    rows = []
    counts = {"samples": 0, "y_init_correct": 0, "revised": 0, "revisions_sampled": 0, "revisions_correct": 0,
              "revisions_aborted": 0}
    for sample in samples:
        counts["samples"] += 1
        plugin = sample.metadata.get(PLUGIN_METADATA_KEY) if isinstance(sample.metadata, dict) else None
        sample_counts = plugin.get(COUNTS_KEY) if isinstance(plugin, dict) else None
        if sample_counts is None:
            raise SdZeroCollectError(
                f"{describe_sample(sample)} was not generated by slime_self_distill.sd_zero_collect."
                "generate_with_revision: pass --custom-generate-function-path "
                "slime_self_distill.sd_zero_collect.generate_with_revision with this rollout function")
        for name in counts:
            if name != "samples":
                counts[name] += int(sample_counts[name])
        rows.extend({**row, "rollout_id": rollout_id} for row in plugin[TUPLES_KEY])
    return rows, counts


def _log(collection: Collection, rollout_id: int, counts: dict, written: int, output: Any) -> None:
    metrics = {f"{METRIC_PREFIX}{name}": value for name, value in counts.items()}
    metrics.update({f"{METRIC_PREFIX}kept": written, f"{METRIC_PREFIX}total_kept": collection.count,
                    f"{METRIC_PREFIX}target": collection.target,
                    f"{METRIC_PREFIX}target_reached": int(collection.done)})
    # slime logs the rollout function's metrics with the rollout (wandb / tensorboard, at "rollout/step")
    output.metrics = {**(output.metrics or {}), **metrics}
    logger.info("SD-Zero collection, rollout %d: %d samples (%d first attempts correct), %d revised, %d revisions "
                "sampled (%d aborted), %d correct, %d kept; %d / %d tuples in %s%s", rollout_id, counts["samples"],
                counts["y_init_correct"], counts["revised"], counts["revisions_sampled"], counts["revisions_aborted"],
                counts["revisions_correct"], written, collection.count, collection.target, collection.path,
                ": target reached" if collection.done else "")


def generate_rollout(args: Any, rollout_id: int, data_source: Any, evaluation: bool = False) -> Any:
    """slime rollout function: slime's ``sglang_rollout.generate_rollout``, then the batch's kept tuples appended to
    ``--self-distill-revision-output``. Once the target is reached: with ``--debug-rollout-only`` each later rollout
    returns the last batch again without generating (slime's loop runs to ``--num-rollout``; nothing can end it
    earlier from here, see the README), otherwise rollouts are generated (for training) without revisions."""
    sglang_rollout, _, _ = _slime()
    if evaluation:
        return sglang_rollout.generate_rollout(args, rollout_id, data_source, evaluation=True)
    check_args(args)
    collection = _collection(args)
    if collection.done and collection.last_output is not None and getattr(args, "debug_rollout_only", False):
        logger.info("SD-Zero collection: target reached (%d tuples in %s); rollout %d generates nothing and returns "
                    "the last batch again; stop the run (or lower --num-rollout)", collection.count, collection.path,
                    rollout_id)
        return collection.last_output
    was_done = collection.done
    output = sglang_rollout.generate_rollout(args, rollout_id, data_source, evaluation=False)
    rows, counts = batch_tuples(flat_samples(output.samples), rollout_id)
    written = 0 if was_done else append_rows(collection, rows)
    _log(collection, rollout_id, counts, written, output)
    collection.last_output = output
    return output


def reset_collections() -> None:
    """Forget what this process knows of the output files (tests; a new run re-reads them)."""
    _COLLECTIONS.clear()


__all__ = ["generate_with_revision", "generate_rollout", "SdZeroCollectError", "load_collection", "append_rows"]
