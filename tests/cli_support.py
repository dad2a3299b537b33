"""Helpers of the data command-line tools' tests: JSON-lines files written and read back, a CLI run captured."""

import json
import pathlib


def write_jsonl(path, rows):
    """Rows as JSON lines; a string row is written as it is (a line that may not parse)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    # lines end at "\n" only, as slime reads them (splitlines would also cut at U+2028 inside a JSON string)
    return [json.loads(line) for line in pathlib.Path(path).read_text(encoding="utf-8").split("\n") if line]


def run_main(main, capsys, *argv):
    """(exit status, stdout, stderr) of ``main`` on ``argv`` (each turned into a string)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
