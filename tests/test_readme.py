"""The README's promises: its set-up commands, CI's test command, every flag and every plugin path it names."""

import dataclasses
import importlib
import re
from pathlib import Path

from slime_self_distill.config import SelfDistillConfig, flag_name

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _code_blocks_of(text: str) -> list[list[str]]:
    return [[line for line in block.splitlines() if line.strip()]
            for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_readme_opens_with_a_quick_start_whose_first_command_runs_the_cpu_demo():
    assert README.index("## Quick start") < README.index("## Contents")
    (first_command,) = _code_blocks_of(README)[0]
    install, demo = first_command.split(" && ")
    assert install == "pip install -e '.[local]'"  # no torch pin: an installed (CUDA) torch stays
    assert demo == "python -m slime_self_distill.local_train --demo"  # tests/test_local_demo.py runs it
    (cluster_command,) = _code_blocks_of(README)[1]
    install, prepare = cluster_command.split(" && ")
    assert install == "pip install -e ."
    assert prepare.startswith("python -m slime_self_distill.prepare_dataset --input examples/")
    assert (ROOT / prepare.split("--input ")[1].split()[0]).is_file()


def test_the_local_extra_holds_what_the_demo_imports():
    setup = (ROOT / "setup.cfg").read_text()
    extra = setup[setup.index("local =") :].split("\n\n")[0].split("\n[")[0]
    assert "transformers" in extra and "matplotlib" in extra and "torch" not in extra


def test_the_readme_gives_the_test_command_ci_runs():
    testing = README[README.index("## Testing"):]
    run_tests = _code_blocks_of(testing)[0][0]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert run_tests in ci_lines and run_tests == "pip install --quiet -e '.[test]' && python -m pytest -q -rs"
    assert "install-slime-cpu.sh" in (ROOT / ".ci" / "run").read_text()


def test_the_memory_table_is_what_the_estimate_gives():
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks.host_memory_qwen3_8b import markdown

    assert markdown() in README


def test_every_flag_is_documented():
    missing = [flag_name(f.name) for f in dataclasses.fields(SelfDistillConfig) if flag_name(f.name) not in README]
    assert not missing


def _module_and_attribute(dotted: str) -> tuple[str, str]:
    """``slime_self_distill.a.b.name`` -> (the longest importable module path, the attribute after it)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        return ".".join(parts[:cut]), parts[cut]
    raise AssertionError(f"{dotted}: no importable module")


def test_every_plugin_path_in_the_readme_exists():
    paths = {_module_and_attribute(dotted) for dotted in re.findall(r"slime_self_distill(?:\.\w+){2,}", README)}
    assert ("slime_self_distill.custom_loss", "self_distill_loss") in paths
    assert ("slime_self_distill.trainer.slime_compat", "verify") in paths  # a subpackage's module too
    for module_name, attribute in paths:
        module = importlib.import_module(module_name)
        source = Path(module.__file__).read_text()
        # the data source class is built lazily (it subclasses slime's, which needs slime): look for its definition
        assert re.search(rf"^\s*(async def|def|class) {attribute}\b", source, re.M), (module_name, attribute)
