"""What the data command-line tools (``prepare_dataset``, ``sd_zero_data``) share: bad-row reports, and outputs
written all or nothing (temporary files beside them, renamed over them only once every one is written)."""

from __future__ import annotations

import argparse
import collections
import json
import os
import stat
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from slime_self_distill.config import closest_name
from slime_self_distill.data.files import UnparseableLine, new_file_mode

MAX_LISTED = 20  # bad rows listed in full
EXIT_OK, EXIT_BAD_DATA, EXIT_USAGE = 0, 1, 2  # success; bad rows; unusable flags or input as a whole


class UsageError(Exception):
    """The invocation or the input file as a whole is unusable (exit status 2)."""


class RowError(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class BadRow:
    row: int
    code: str
    reason: str
    data: Any



class PendingOutputs:
    """Temporary files beside the outputs, created on entry (so that an output that cannot be written fails before
    any work) and renamed over the outputs by ``commit``; without a commit they are removed, with any directory
    created for them, and existing outputs stay as they were.

    ``outputs`` maps each path to the name used in messages (e.g. "--output"). A renamed file gets the mode of the
    output it replaces, or that of a new file under the umask (mkstemp creates 0600)."""

    def __init__(self, outputs: dict):
        self.outputs = outputs
        self.temp_paths: dict = {}
        self.created_directories: list = []
        self.committed = False

    def _fail(self, path: str, action: str, error: OSError, consequence: str = "nothing was written") -> UsageError:
        return UsageError(f"{self.outputs[path]} {path!r}: cannot {action} ({error.strerror or error}); choose a "
                          f"writable location; {consequence}")

    def _make_directories(self, path: str) -> None:
        missing = []
        directory = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        for directory in reversed(missing):
            try:
                os.mkdir(directory)
            except OSError as e:
                raise self._fail(path, f"create the directory {directory!r}", e) from None
            self.created_directories.append(directory)

    def __enter__(self) -> "PendingOutputs":
        try:
            for path in self.outputs:
                self._make_directories(path)
                directory = os.path.dirname(os.path.abspath(path))
                try:
                    fd, temp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                                     suffix=".tmp")
                except OSError as e:
                    raise self._fail(path, f"create a file in {directory!r}", e) from None
                os.close(fd)
                self.temp_paths[path] = temp_path
        except BaseException:
            self._discard()
            raise
        return self

    def write(self, path: str, write: Callable[[Any], None]) -> None:
        """``write(binary file)`` fills the temporary file of ``path``."""
        try:
            with open(self.temp_paths[path], "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise self._fail(path, "write", e) from None

    def commit(self) -> None:
        """Rename every temporary file over its output. They are all written before the first rename, so a failure
        while writing leaves every output as it was; only a rename failing after another succeeded (both in
        directories just written to) would not, and the message then says which output was replaced."""
        file_mode = new_file_mode()
        replaced = []
        for path, temp_path in self.temp_paths.items():
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else file_mode
                os.chmod(temp_path, mode)
                os.replace(temp_path, path)
            except OSError as e:
                consequence = f"{' and '.join(replaced)} already replaced" if replaced else "nothing was written"
                raise self._fail(path, "replace it", e, consequence) from None
            replaced.append(repr(path))
        self.committed = True

    def _discard(self) -> None:
        for temp_path in self.temp_paths.values():
            if os.path.exists(temp_path):
                os.unlink(temp_path)
        for directory in reversed(self.created_directories):
            try:
                os.rmdir(directory)
            except OSError:
                pass  # not empty any more: something else was put there meanwhile; leave it

    def __exit__(self, *exc_info) -> None:
        if not self.committed:
            self._discard()


def jsonl_writer(lines: Iterable[str]) -> Callable[[Any], None]:
    def write(f) -> None:
        for line in lines:
            f.write((line + "\n").encode("utf-8"))

    return write



def json_lines_writer(rows: Iterable[Any]) -> Callable[[Any], None]:
    """The writer of ``rows`` as JSON lines (UTF-8, non-ASCII kept)."""
    return jsonl_writer(json.dumps(row, ensure_ascii=False) for row in rows)


def rejected_writer(bad_rows: list) -> Callable[[Any], None]:
    def entry(bad: BadRow) -> dict:
        data = bad.data.text if isinstance(bad.data, UnparseableLine) else bad.data
        return {"row": bad.row, "code": bad.code, "reason": bad.reason, "data": data}

    # default=repr: a rejected row may hold values JSON cannot encode (that can be why it was rejected)
    return jsonl_writer(json.dumps(entry(bad), ensure_ascii=False, default=repr) for bad in bad_rows)



def print_bad_rows(bad_rows: list, out, most: int = MAX_LISTED) -> None:
    print(f"{len(bad_rows)} bad row(s); the first {min(len(bad_rows), most)}:", file=out)
    for bad in bad_rows[:most]:
        print(f"  row {bad.row}: [{bad.code}] {bad.reason}", file=out)


def counts(values: Iterable[str]) -> str:
    """``name: count, ...`` of ``values``, sorted by name ("none" when empty)."""
    return ", ".join(f"{name}: {count}" for name, count in sorted(collections.Counter(values).items())) or "none"


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int], argv: Optional[list]) -> int:
    """Parse ``argv`` (an unknown flag is an error naming the closest known one), then ``run(args)``; a
    ``UsageError`` is printed as ``error: ...`` with exit status 2."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [option for action in parser._actions for option in action.option_strings]
        hints = [f"{token} (did you mean {close}?)" if (close := closest_name(token.split("=")[0], flags)) else token
                 for token in unknown if token.startswith("-")]
        parser.error(f"unrecognized arguments: {' '.join(hints or unknown)}")
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
