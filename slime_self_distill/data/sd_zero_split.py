"""SD-Zero phase 1: collected self-revision tuples -> the two SFT stages of the official recipe, as slime SFT rows.

    python -m slime_self_distill.sd_zero_data --input d_revision.json --output-dir /data/srt [options]

SD-Zero (princeton-pli/Self-Distillation-Zero) first trains a "self-revision" model with two SFT stages built from
tuples (x, y_init, P_r, y_revised): a problem, the model's first answer, a revision phrase, and a revision verified
correct. This module reproduces the official ``self-revision-training/prepare_data.py`` (cited as prepare_data:LINE,
at the repository's HEAD fdaeb0b) and the chat formatting of ``self-revision-training/sft/sft.py`` (sft:LINE), and
writes what slime's ``slime.rollout.sft_rollout`` trains on. Where the official README and the official code differ,
the code is followed:

- **Stage sizes.** The README says 4000 generation + 2000 revision tuples (README:108-119, with a ``STAGE1_SIZE``
  knob). The code gives stage 2 ``--stage2_size`` tuples (default 1000: prepare_data:292, scripts/run_srt_data.sh:33)
  and stage 1 *all* remaining incorrect-init tuples (prepare_data:225); it has no stage-1 size. Here:
  ``--stage2-size`` (default 1000) and stage 1 = the rest, unless ``--stage1-size N`` caps it (an addition).
- **Selection** (prepare_data:208-225): the tuples are split into incorrect-init and correct-init (input order kept);
  ``random.Random(seed)`` (seed 0 by default, prepare_data:301 and run_srt_data.sh:43) shuffles the incorrect-init
  list, then the correct-init list; stage 2 takes the first ``min(#correct, size)`` correct-init tuples, then fills
  its quota with the first incorrect-init ones, and the same generator shuffles stage 2; stage 1 is the incorrect-init
  tuples stage 2 did not take, in their shuffled order. Correct-init tuples never go to stage 1 (its completion is a
  mistake followed by its fix); those stage 2 has no room for are unused. The same Python ``random`` calls on the same
  tuples give the official files' rows in the official order.
- **Cleaning** (on by default, prepare_data:122-129, 195-198; ``--no-clean`` turns it off), before the filter:
  y_init and y_revised lose a degenerate repeating tail, and y_revised loses "sycophantic" openings (and its leading
  whitespace), see ``trim_repeating_tail`` and ``strip_sycophantic_opening``.
- **Filter and dedupe** (prepare_data:149-162): only tuples whose ``y_revised_correct`` is true; of tuples with the
  same (x, y_init, y_revised) after cleaning, the first is kept (P_r is not part of the key).

The rows (prepare_data:165-174 for the texts, sft:200-243 for the chat turns):

- stage 1, "generation": ``[system] + user: x + assistant: y_init + "\\n\\n" + P_r + "\\n\\n" + y_revised``;
- stage 2, "revision": ``[system] + user: x + "\\n\\n" + y_init + "\\n\\n" + P_r + assistant: y_revised``. The
  official code puts the first attempt and P_r in the **user** turn (sft:224-234 renders its "prompt" as the user
  message), whereas its collection and its phase-2 teacher continue the assistant turn; kept as the official SFT has it.

Each output row is ``{"messages": [...]}``: train with ``--rollout-function-path slime.rollout.sft_rollout.
generate_rollout --input-key messages`` and no ``--apply-chat-template``. slime's ``MultiTurnLossMaskGenerator``
puts every assistant turn in the loss, chat-template end token included, as the official ``completion_only_loss``
(sft:32) does for the completion: the official code appends ``"<|im_end|>"`` to the completion text itself (sft:242)
because TRL's prompt/completion format has no end token; slime's chat template writes it, so it is not appended here
(it would be trained on twice). slime's ``qwen``/``qwen3`` masks also count the newline the template writes after
the end token: one loss token per row more than the official SFT. Assistant turns that come from a chat prompt's
history get ``"step_loss_mask": 0``, so only the completion is trained, as in the official code.

The system turn: the official SFT adds one, picked by a substring of the data file's path (sft:203-213): for math
(``r1`` in the path) the Python literal ``"...within \\\\boxed{{}}."``, which is never ``.format``-ted, so the model
reads ``\\boxed{{}}`` with *doubled braces*, a quirk reproduced by the default ``--system-prompt official_math``; for
code, ``official_code``. A prompt given as chat messages with its own system turn keeps it and gets no other.

Input: the collection's JSON lines (``prompt``: a string, or chat messages ending with the user turn, whose content is
x and whose earlier turns are kept before it) or the official ``d_revision.json`` (a JSON list, ``x`` instead of
``prompt``); both with ``y_init``, ``p_r``, ``y_revised`` (strings), ``y_init_correct``, ``y_revised_correct``
(booleans); ``label``, ``y_init_reward``, ``y_revised_reward`` are optional (checked, not written). Bad rows are
reported with their line (JSON lines) or 1-based position (JSON list); nothing is written while there are any,
unless ``--skip-invalid``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from slime_self_distill.data.cli import (
    EXIT_BAD_DATA,
    EXIT_OK,
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
    UTF8_BOM,
    RowFileError,
    UnparseableLine,
    json_rows,
    jsonl_rows,
)

STAGE1_FILE = "stage1_generation.jsonl"
STAGE2_FILE = "stage2_revision.jsonl"
REJECTED_FILE = "rejected.jsonl"
OUTPUT_MESSAGES_KEY = "messages"
SEPARATOR = "\n\n"  # between x, y_init, P_r and y_revised (prepare_data:167, 173)
OFFICIAL_STAGE2_SIZE = 1000  # prepare_data:292, scripts/run_srt_data.sh:33
OFFICIAL_SEED = 0  # prepare_data:301, scripts/run_srt_data.sh:43
# sft:204 and sft:209, as the model reads them: the math one keeps the doubled braces of a never-formatted literal.
SYSTEM_PROMPTS = {
    "official_math": "Please reason step by step, and put your final answer within \\boxed{{}}.",
    "official_code": "You are a helpful assistant that solves coding problems step by step.",
}
DEFAULT_SYSTEM_PROMPT = "official_math"
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
PREVIEW_CHARS = 600

# The official cleaning's parameters (prepare_data:84-90).
TAIL_MIN_PERIOD = 10
TAIL_MAX_PERIOD = 1500
TAIL_MIN_COPIES = 3
TAIL_MAX_PASSES = 5


# --------------------------------------------------------------------------------------------------- cleaning
def trim_repeating_tail(text: str, *, min_period: int = TAIL_MIN_PERIOD, max_period: int = TAIL_MAX_PERIOD,
                        min_copies: int = TAIL_MIN_COPIES, max_passes: int = TAIL_MAX_PASSES) -> str:
    """``text`` without a degenerate repeating tail (the model looping until its token budget), the official rule
    (prepare_data:84-119): for each period length from ``min_period`` up to ``min(max_period, len // min_copies)``,
    shortest first, take the longest tail of ``text`` that is periodic with that period; if it holds at least
    ``min_copies`` periods, keep the text before it plus one period of it, and stop looking. Repeated (a trimmed tail
    can show another period) up to ``max_passes`` times, or until a pass trims nothing; a text shorter than
    ``min_copies * min_period`` characters is left as it is."""
    for _ in range(max_passes):
        n = len(text)
        if n < min_copies * min_period:
            break
        for period in range(min_period, min(max_period, n // min_copies) + 1):
            # the tail is periodic over min_copies periods iff its last (min_copies - 1) periods equal the ones a
            # period earlier (text[i] == text[i + period] for every i from n - min_copies * period to n - period)
            start = n - min_copies * period
            if text[start:n - period] != text[start + period:]:
                continue
            while start >= period and text[start - period:start] == text[start:start + period]:
                start -= period  # whole periods first, then single characters
            while start > 0 and text[start - 1] == text[start - 1 + period]:
                start -= 1
            text = text[:start + period]
            break
        else:
            break
    return text


_YOU_ARE = r"you(?:'re| are)"
# The official openings (prepare_data:40-54), each matched at the start of the text, case-insensitively. No two of them
# can match the same text, so the order in which they are tried does not change the result.
SYCOPHANTIC_OPENINGS = tuple(re.compile(pattern, re.IGNORECASE) for pattern in (
    # "You're (absolutely) right to point out ...": the whole sentence, up to its first . ! or ? on the line
    _YOU_ARE + r"\s+(?:absolutely\s+)?right\s+to\s+[^.!?\n]*[.!?]\s*",
    # "(Yes|Indeed)[,!.] you are (absolutely) right" followed by a run of dashes, commas, colons or full stops
    r"(?:(?:yes|indeed)[,!.]?\s+)?" + _YOU_ARE + r"\s+(?:absolutely\s+)?right\s*[—,:.-]+\s*",
    # "Thank you for ...": up to the first . ! or ? on the line
    r"thank\s+you\s+for[^.!?\n]*[.!?]\s*",
    # "Great question ...", "Good/Nice catch/point/observation ...": up to the first . ! ? em dash or hyphen on the line
    r"great\s+question[^.!?\n—-]*[.!?—-]\s*",
    r"(?:good|nice)\s+(?:catch|point|observation)[^.!?\n—-]*[.!?—-]\s*",
))


def _strip_openings(text: str) -> tuple[str, bool]:
    if not text:
        return text, False
    text = text.lstrip()  # the official rule left-strips every non-empty text, opening or not
    stripped = False
    while True:
        match = next((m for m in (opening.match(text) for opening in SYCOPHANTIC_OPENINGS) if m), None)
        if match is None:
            break
        text = text[match.end():].lstrip()
        stripped = True
    if stripped and text[:1].islower():
        text = text[0].upper() + text[1:]  # the sentence now starts where the opening ended
    return text, stripped


def strip_sycophantic_opening(text: str) -> str:
    """``text`` (a revision) without the chat-assistant openings an instruct model writes when it believes a user
    pointed out its error (prepare_data:57-81): the text is left-stripped, then, as long as one of
    ``SYCOPHANTIC_OPENINGS`` matches at its start, the match is removed and the rest left-stripped again; if anything
    was removed, a lowercase first letter is capitalized. An empty text is returned as it is."""
    return _strip_openings(text)[0]


@dataclass
class CleaningStats:
    y_init_tails: int = 0
    y_revised_tails: int = 0
    openings: int = 0


def clean_texts(y_init: str, y_revised: str, stats: Optional[CleaningStats] = None) -> tuple[str, str]:
    """The official cleaning of one tuple (prepare_data:122-129): a non-empty y_init loses its repeating tail; a
    non-empty y_revised loses its repeating tail, then its sycophantic openings."""
    stats = stats if stats is not None else CleaningStats()
    if y_init:
        trimmed = trim_repeating_tail(y_init)
        stats.y_init_tails += trimmed != y_init
        y_init = trimmed
    if y_revised:
        trimmed = trim_repeating_tail(y_revised)
        stats.y_revised_tails += trimmed != y_revised
        y_revised, stripped = _strip_openings(trimmed)
        stats.openings += stripped
    return y_init, y_revised


# ------------------------------------------------------------------------------------------------------ rows
@dataclass
class RevisionTuple:
    """One input row, checked: ``context`` are the chat turns before the last user turn (none for a string
    prompt), ``x`` that turn's content (or the string prompt)."""

    row: int
    source_format: str  # "collection" (prompt) or "official" (x)
    context: list
    x: str
    y_init: str
    p_r: str
    y_revised: str
    y_init_correct: bool
    y_revised_correct: bool
    prompt_key: str = field(default="")  # the whole prompt, for the dedupe key: x, or the messages as JSON

    @property
    def dedupe_key(self) -> tuple:
        return self.prompt_key, self.y_init, self.y_revised

    @property
    def has_own_system(self) -> bool:
        return any(message["role"] == "system" for message in self.context)


def _check_messages(messages: list, key: str) -> None:
    if not messages:
        raise RowError("bad_messages", f"{key!r} is an empty list of chat messages")
    for index, message in enumerate(messages):
        where = f"{key}[{index}]"
        if not isinstance(message, dict):
            raise RowError("bad_messages", f"{where} is a {type(message).__name__}, expected an object with 'role' "
                                           f"and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in MESSAGE_ROLES:
            raise RowError("bad_messages", f"{where}.role is {role!r}, expected one of {', '.join(MESSAGE_ROLES)}")
        if not isinstance(content, str):
            raise RowError("bad_messages", f"{where}.content is {type(content).__name__}, expected a string")
    if messages[-1]["role"] != "user":
        raise RowError("bad_messages", f"{key!r} ends with a {messages[-1]['role']!r} turn; the prompt must end with "
                                       f"the user turn that holds the problem x")
    if not messages[-1]["content"].strip():
        raise RowError("empty_text", f"{key}[-1].content (the problem x) is empty")


def _text(data: dict, key: str, *, allow_empty: bool = False) -> str:
    value = data.get(key)
    if value is None:
        raise RowError("missing_key", f"key {key!r} is missing or null")
    if not isinstance(value, str):
        raise RowError("bad_type", f"key {key!r} is a {type(value).__name__}, expected a string")
    if not allow_empty and not value.strip():
        raise RowError("empty_text", f"key {key!r} is empty")
    return value


def _flag(data: dict, key: str) -> bool:
    value = data.get(key)
    if value is None:
        raise RowError("missing_key", f"key {key!r} is missing or null")
    if not isinstance(value, bool):
        raise RowError("bad_type", f"key {key!r} is {value!r} ({type(value).__name__}), expected true or false")
    return value


def parse_row(number: int, data: Any) -> RevisionTuple:
    """The tuple of one input row (collection or official format); RowError if it is unusable."""
    if isinstance(data, UnparseableLine):
        raise RowError("unparseable_json", f"the line is not valid JSON: {data.error}")
    if not isinstance(data, dict):
        raise RowError("not_an_object", f"the row is a {type(data).__name__}, expected a JSON object")
    has_prompt, has_x = data.get("prompt") is not None, data.get("x") is not None
    if has_prompt and has_x:
        raise RowError("ambiguous_prompt", "the row has both 'prompt' (collection format) and 'x' (official "
                                           "d_revision format); keep one")
    if not has_prompt and not has_x:
        raise RowError("missing_key", "key 'prompt' (collection format) or 'x' (official d_revision format) is "
                                      "missing or null")
    key = "prompt" if has_prompt else "x"
    prompt = data[key]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("empty_text", f"key {key!r} is empty")
        context, x = [], prompt
    elif isinstance(prompt, list):
        _check_messages(prompt, key)
        context, x = [dict(message) for message in prompt[:-1]], prompt[-1]["content"]
    else:
        raise RowError("bad_type", f"key {key!r} is a {type(prompt).__name__}, expected a string or chat messages")
    texts = {name: _text(data, name, allow_empty=name != "p_r") for name in ("y_init", "p_r", "y_revised")}
    flags = {name: _flag(data, name) for name in ("y_init_correct", "y_revised_correct")}
    if flags["y_revised_correct"] and not texts["y_revised"].strip():
        raise RowError("empty_text", "key 'y_revised' is empty but 'y_revised_correct' is true; an empty revision "
                                     "cannot have been verified correct")
    for name in ("y_init_reward", "y_revised_reward"):
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RowError("bad_type", f"key {name!r} is {value!r} ({type(value).__name__}), expected a number")
    # a lone user turn is the same prompt as its text (slime renders a string prompt as that turn)
    prompt_key = x if not context else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return RevisionTuple(row=number, source_format="collection" if has_prompt else "official", context=context, x=x,
                         prompt_key=prompt_key, **texts, **flags)


# ----------------------------------------------------------------------------------------------- selection
@dataclass
class Selection:
    kept: list
    not_revised_correct: int
    duplicates: int


def filter_and_dedupe(tuples: list) -> Selection:
    """The tuples with a verified-correct revision, the first of each (x, y_init, y_revised) (prepare_data:149-162)."""
    kept, seen, not_correct, duplicates = [], set(), 0, 0
    for t in tuples:
        if not t.y_revised_correct:
            not_correct += 1
        elif t.dedupe_key in seen:
            duplicates += 1
        else:
            seen.add(t.dedupe_key)
            kept.append(t)
    return Selection(kept, not_correct, duplicates)


@dataclass
class Split:
    stage1: list
    stage2: list
    stage2_correct_init: int
    stage2_incorrect_init: int
    unused_correct_init: int
    stage1_available: int  # incorrect-init tuples left for stage 1 before --stage1-size


def split_stages(tuples: list, stage2_size: int = OFFICIAL_STAGE2_SIZE, stage1_size: Optional[int] = None,
                 seed: int = OFFICIAL_SEED) -> Split:
    """The official split (prepare_data:208-225; see the module's docstring), then stage 1 cut to its first
    ``stage1_size`` tuples when given."""
    incorrect_init = [t for t in tuples if not t.y_init_correct]
    correct_init = [t for t in tuples if t.y_init_correct]
    rng = random.Random(seed)
    rng.shuffle(incorrect_init)
    rng.shuffle(correct_init)
    n_correct = min(len(correct_init), stage2_size)
    n_incorrect = min(len(incorrect_init), stage2_size - n_correct)
    stage2 = correct_init[:n_correct] + incorrect_init[:n_incorrect]
    rng.shuffle(stage2)
    stage1 = incorrect_init[n_incorrect:]
    available = len(stage1)
    if stage1_size is not None:
        stage1 = stage1[:stage1_size]
    return Split(stage1, stage2, n_correct, n_incorrect, len(correct_init) - n_correct, available)


# -------------------------------------------------------------------------------------------------- output
def _system_turn(t: RevisionTuple, system_prompt: Optional[str]) -> list:
    return [] if system_prompt is None or t.has_own_system else [{"role": "system", "content": system_prompt}]


def _context_turns(t: RevisionTuple) -> list:
    # earlier assistant turns are prompt, not completion: slime's loss mask skips a turn with step_loss_mask 0
    return [dict(m, step_loss_mask=0) if m["role"] == "assistant" else dict(m) for m in t.context]


def stage1_messages(t: RevisionTuple, system_prompt: Optional[str]) -> list:
    """Generation stage: x -> y_init, P_r and y_revised as one assistant turn (prepare_data:165-168)."""
    completion = SEPARATOR.join((t.y_init, t.p_r, t.y_revised))
    return _system_turn(t, system_prompt) + _context_turns(t) + [
        {"role": "user", "content": t.x}, {"role": "assistant", "content": completion}]


def stage2_messages(t: RevisionTuple, system_prompt: Optional[str]) -> list:
    """Revision stage: x, y_init and P_r in the user turn -> y_revised (prepare_data:171-174, sft:224-234)."""
    return _system_turn(t, system_prompt) + _context_turns(t) + [
        {"role": "user", "content": SEPARATOR.join((t.x, t.y_init, t.p_r))},
        {"role": "assistant", "content": t.y_revised}]


# ----------------------------------------------------------------------------------------------------- input
def read_rows(path: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    """(what the file is, its (row number, row) pairs): a JSON list (numbered by position) when its first character
    after a byte order mark and white space is ``[``, else JSON lines (numbered by line)."""
    if not os.path.exists(path):
        raise UsageError(f"--input {path!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"--input {path!r} is a directory; give the collection's .jsonl or the official "
                         f"d_revision.json")
    try:
        with open(path, "rb") as f:
            if f.read(len(UTF8_BOM)) != UTF8_BOM:
                f.seek(0)
            head = f.read(1)
            while head and head.isspace():
                head = f.read(1)
        if head == b"[":
            return "a JSON list", json_rows(path)
        return "JSON lines", jsonl_rows(path, accept_bom=True)
    except RowFileError as e:
        raise UsageError(f"--input {path!r} {e}") from None
    except OSError as e:
        raise UsageError(f"--input {path!r} cannot be read ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------------------- driver
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m slime_self_distill.sd_zero_data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
SD-Zero phase 1: split collected self-revision tuples (x, y_init, P_r, y_revised) into the two SFT stages of the
official recipe (princeton-pli/Self-Distillation-Zero, self-revision-training/prepare_data.py and sft/sft.py), as
slime SFT rows:

  {STAGE1_FILE}  stage 1 "generation": user x -> assistant y_init + "\\n\\n" + P_r + "\\n\\n" + y_revised
  {STAGE2_FILE}    stage 2 "revision":   user x + "\\n\\n" + y_init + "\\n\\n" + P_r -> assistant y_revised

Stage 2 puts the first attempt and P_r in the USER turn, as the official SFT does. Each row is
{{"messages": [system?, ...earlier turns, user, assistant]}}: train each stage with slime's
--rollout-function-path slime.rollout.sft_rollout.generate_rollout --input-key messages --loss-type sft_loss
(no --apply-chat-template; --loss-mask-type qwen: qwen3 would also train the empty think block a hybrid Qwen3
template writes), stage 2 starting from the stage-1 checkpoint. The loss
covers the assistant turn and the end token the chat template writes after it; the official code appends
"<|im_end|>" to its completions because TRL's prompt/completion rows have no template end, so it is not appended here.

The official CODE is followed where its README differs: stage 2 gets --stage2-size tuples (1000; the README's
4000/2000 split is not what the code does) and stage 1 ALL remaining incorrect-init tuples.""",
        epilog=f"""\
input rows (JSON lines, or a JSON list; the format is detected per row):
  collection: prompt (a string, or chat messages ending with the user turn holding x; earlier turns are kept before
              it, earlier assistant turns out of the loss), y_init, p_r, y_revised, y_init_correct,
              y_revised_correct; optional label, y_init_reward, y_revised_reward (checked, not written)
  official:   the d_revision.json of self_critique_pipeline.py: x instead of prompt, the other keys the same

what happens, in the official order:
  1. cleaning (unless --no-clean): y_init and y_revised lose a repeating tail (a block of 10 to 1500 characters
     repeated at least 3 times at the end is cut to one copy, up to 5 passes); y_revised is left-stripped and
     loses sycophantic openings ("You're absolutely right to ...", "Yes, you are right -", "Thank you for ...",
     "Great question.", "Good catch."...), its first letter capitalized if one was removed;
  2. filter: only tuples with y_revised_correct true; dedupe: the first of each (x, y_init, y_revised);
  3. split with random.Random(--seed): incorrect-init and correct-init tuples each shuffled; stage 2 = up to
     --stage2-size tuples, correct-init first (stage 1 cannot use them: its completion starts with a mistake),
     then incorrect-init, shuffled again; stage 1 = every incorrect-init tuple stage 2 did not take (its first
     --stage1-size when given). Correct-init tuples beyond stage 2's quota are unused.

system turn: the official SFT adds one chosen by the data file's name ("r1" -> math, "code" -> code). The math one
is the Python literal "...within \\\\boxed{{{{}}}}.", never formatted, so the model reads \\boxed{{{{}}}} with doubled
braces; --system-prompt official_math (the default) reproduces that quirk; give your own text to avoid it. A chat
prompt with its own system turn keeps it and gets no other.

bad rows (missing key, wrong type, empty text, malformed chat messages, a line that is not JSON) are listed as
"row N: [code] reason" (N: line of JSON lines, 1-based position in a JSON list); nothing is written while there
are any, unless --skip-invalid (the good rows are used, the bad ones written to <output-dir>/{REJECTED_FILE}).
Outputs are written atomically: all of them to pending files beside them, then renamed; a failed run leaves
existing outputs as they were. A summary (rows read, cleaned, filtered, deduplicated, stage sizes, paths) and,
unless --quiet, the first row of each stage are printed.

exit status: 0 success; 1 bad data (bad rows without --skip-invalid, no usable tuple, an empty stage 1);
2 unusable flags or input (bad flag, input missing, unreadable, not UTF-8 or an unparseable JSON list, an output
directory that is a file or cannot be written).""",
    )
    p.add_argument("--input", required=True,
                   help="the collected tuples: the collection's .jsonl or the official d_revision.json")
    p.add_argument("--output-dir", required=True,
                   help=f"where {STAGE1_FILE} and {STAGE2_FILE} are written (created if missing)")
    p.add_argument("--stage2-size", type=int, default=OFFICIAL_STAGE2_SIZE,
                   help="tuples in stage 2 (revision), correct-init first; default %(default)s as the official "
                   "code (its README's 2000 is not what it does)")
    p.add_argument("--stage1-size", type=int, default=None,
                   help="at most this many tuples in stage 1 (generation); default: all incorrect-init tuples stage 2 "
                   "did not take, as the official code (it has no such knob)")
    p.add_argument("--seed", type=int, default=OFFICIAL_SEED,
                   help="seed of the shuffles (random.Random); default %(default)s as the official scripts")
    p.add_argument("--no-clean", action="store_true",
                   help="keep y_init and y_revised as they are (no repeating-tail trim, no opening strip)")
    system = p.add_mutually_exclusive_group()
    system.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                        help=f"the system turn: {' or '.join(SYSTEM_PROMPTS)} (the official SFT's math and code "
                        "system messages) or your own text; default %(default)s")
    system.add_argument("--no-system-prompt", action="store_true", help="no system turn (but a chat prompt's own)")
    p.add_argument("--skip-invalid", action="store_true",
                   help=f"use the good rows and write the bad ones to <output-dir>/{REJECTED_FILE} instead of failing")
    p.add_argument("--quiet", action="store_true", help="no preview of the first row of each stage")
    return p


def _check_args(args: argparse.Namespace) -> tuple[Optional[str], dict]:
    """The system prompt (None: none) and the output paths; UsageError for bad flags or output directories."""
    if args.stage2_size < 1:
        raise UsageError(f"--stage2-size must be >= 1, got {args.stage2_size}")
    if args.stage1_size is not None and args.stage1_size < 1:
        raise UsageError(f"--stage1-size must be >= 1, got {args.stage1_size}")
    system_prompt = None if args.no_system_prompt else SYSTEM_PROMPTS.get(args.system_prompt, args.system_prompt)
    if system_prompt is not None and not system_prompt.strip():
        raise UsageError("--system-prompt is empty; use --no-system-prompt for no system turn")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output-dir {args.output_dir!r} is a file; give a directory")
    names = [STAGE1_FILE, STAGE2_FILE] + ([REJECTED_FILE] if args.skip_invalid else [])
    outputs = {name: os.path.join(args.output_dir, name) for name in names}
    for path in outputs.values():
        if os.path.isdir(path):
            raise UsageError(f"{path!r} is a directory; move it or choose another --output-dir")
        if os.path.exists(path) and os.path.exists(args.input) and os.path.samefile(path, args.input):
            raise UsageError(f"{path!r} is the input file itself; choose another --output-dir")
    return system_prompt, outputs


def _preview(title: str, row: dict) -> str:
    text = json.dumps(row[OUTPUT_MESSAGES_KEY], ensure_ascii=False, indent=1)
    if len(text) > PREVIEW_CHARS:
        text = f"{text[:PREVIEW_CHARS // 2]}\n[... {len(text) - PREVIEW_CHARS} characters left out ...]\n" \
               f"{text[-PREVIEW_CHARS // 2:]}"
    return f"----- {title} -----\n{text}"


def run(args: argparse.Namespace) -> int:
    system_prompt, outputs = _check_args(args)
    input_kind, rows = read_rows(args.input)
    tuples, bad = [], []
    try:
        for number, data in rows:
            try:
                tuples.append(parse_row(number, data))
            except RowError as e:
                bad.append(BadRow(number, e.code, e.reason, data))
    except RowFileError as e:  # JSON lines are decoded while read
        raise UsageError(f"--input {args.input!r} {e}") from None
    except OSError as e:
        raise UsageError(f"--input {args.input!r} cannot be read ({e.strerror or e})") from None

    formats = {"collection": "collection (prompt)", "official": "official d_revision (x)"}
    summary = [f"rows read: {len(tuples) + len(bad)} from {args.input} ({input_kind}; "
               f"{counts(formats[t.source_format] for t in tuples)}{'; bad: %d' % len(bad) if bad else ''})"]
    if bad and not args.skip_invalid:
        print_bad_rows(bad, sys.stderr)
        print(f"bad rows by reason: {counts(b.code for b in bad)}", file=sys.stderr)
        print(f"nothing written to {args.output_dir}: fix the rows or pass --skip-invalid", file=sys.stderr)
        return EXIT_BAD_DATA
    if not tuples:
        print(f"no usable row in {args.input} ({len(bad)} bad); nothing written", file=sys.stderr)
        return EXIT_BAD_DATA

    if args.no_clean:
        summary.append("cleaning: off (--no-clean)")
    else:
        stats = CleaningStats()
        for t in tuples:
            t.y_init, t.y_revised = clean_texts(t.y_init, t.y_revised, stats)
        summary.append(f"cleaned: repeating tails trimmed from {stats.y_init_tails} y_init and "
                       f"{stats.y_revised_tails} y_revised; sycophantic openings stripped from {stats.openings} "
                       f"y_revised")
    selection = filter_and_dedupe(tuples)
    kept = selection.kept
    n_correct_init = sum(t.y_init_correct for t in kept)
    summary.append(f"filtered out (y_revised_correct false): {selection.not_revised_correct}")
    summary.append(f"duplicates dropped (same x, y_init, y_revised): {selection.duplicates}")
    summary.append(f"tuples kept: {len(kept)} (incorrect-init: {len(kept) - n_correct_init}, correct-init: "
                   f"{n_correct_init})")
    if not kept:
        print("\n".join(summary), file=sys.stderr)
        print("no tuple with y_revised_correct true is left; nothing written", file=sys.stderr)
        return EXIT_BAD_DATA
    split = split_stages(kept, args.stage2_size, args.stage1_size, args.seed)
    if not split.stage1:
        print("\n".join(summary), file=sys.stderr)
        print(f"stage 1 would be empty: stage 2 took {split.stage2_incorrect_init} of the "
              f"{len(kept) - n_correct_init} incorrect-init tuple(s) (--stage2-size {args.stage2_size}); lower "
              f"--stage2-size or collect more incorrect-init tuples; nothing written", file=sys.stderr)
        return EXIT_BAD_DATA

    stage1 = [{OUTPUT_MESSAGES_KEY: stage1_messages(t, system_prompt)} for t in split.stage1]
    stage2 = [{OUTPUT_MESSAGES_KEY: stage2_messages(t, system_prompt)} for t in split.stage2]
    writers = {outputs[STAGE1_FILE]: json_lines_writer(stage1), outputs[STAGE2_FILE]: json_lines_writer(stage2)}
    if args.skip_invalid:
        writers[outputs[REJECTED_FILE]] = rejected_writer(bad)
    with PendingOutputs({path: "--output-dir" for path in writers}) as pending:
        for path, write in writers.items():
            pending.write(path, write)
        pending.commit()

    capped = "" if len(split.stage1) == split.stage1_available else \
        f", the first {len(split.stage1)} of {split.stage1_available} (--stage1-size)"
    summary.append(f"stage 2 (revision): {len(split.stage2)} rows ({split.stage2_correct_init} correct-init + "
                   f"{split.stage2_incorrect_init} incorrect-init; --stage2-size {args.stage2_size}) -> "
                   f"{outputs[STAGE2_FILE]}")
    summary.append(f"stage 1 (generation): {len(split.stage1)} rows (incorrect-init{capped or ', all remaining'}) -> "
                   f"{outputs[STAGE1_FILE]}")
    own_system = sum(t.has_own_system for t in kept)
    summary.append("system turn: " + ("none (--no-system-prompt)" if system_prompt is None else repr(system_prompt))
                   + (f"; {own_system} tuple(s) keep their own" if own_system else ""))
    if args.skip_invalid:
        summary.append(f"rows rejected: {len(bad)} ({counts(b.code for b in bad)}) -> {outputs[REJECTED_FILE]}")
    if split.unused_correct_init:
        summary.append(f"note: {split.unused_correct_init} correct-init tuple(s) unused (stage 2 is full; stage 1 "
                       f"takes incorrect-init tuples only)")
    if len(split.stage1) < len(split.stage2):
        summary.append(f"warning: stage 1 ({len(split.stage1)}) is smaller than stage 2 ({len(split.stage2)}); "
                       f"collect more incorrect-init tuples or lower --stage2-size")
    print("\n".join(summary))
    if args.skip_invalid and bad:
        print_bad_rows(bad, sys.stdout)
    if not args.quiet:
        print(_preview(f"first row of {STAGE1_FILE}", stage1[0]))
        print(_preview(f"first row of {STAGE2_FILE}", stage2[0]))
    return EXIT_OK


def main(argv: Optional[list] = None) -> int:
    return run_cli(build_parser(), run, argv)
