"""The README's promises: its set-up commands, CI's test command, every flag and every plugin path it names."""

import dataclasses
import importlib
import re
from pathlib import Path

from slime_self_distill.config import SelfDistillConfig, flag_name

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _first_code_block() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_second():
    install_and_prepare, run_tests = _first_code_block()
    assert install_and_prepare.startswith("pip install torch==2.13.0 -e . && python -m slime_self_distill.prepare_dataset")
    assert "--input examples/" in install_and_prepare
    assert (ROOT / install_and_prepare.split("--input ")[1].split()[0]).is_file()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert run_tests in ci_lines


def test_every_flag_is_documented():
    missing = [flag_name(f.name) for f in dataclasses.fields(SelfDistillConfig) if flag_name(f.name) not in README]
    assert not missing


def test_every_plugin_path_in_the_readme_exists():
    paths = set(re.findall(r"slime_self_distill\.(\w+)\.(\w+)", README))
    assert ("custom_loss", "self_distill_loss") in paths
    for module_name, attribute in paths:
        module = importlib.import_module(f"slime_self_distill.{module_name}")
        source = Path(module.__file__).read_text()
        # the data source class is built lazily (it subclasses slime's, which needs slime): look for its definition
        assert re.search(rf"^\s*(def|class) {attribute}\b", source, re.M), (module_name, attribute)
