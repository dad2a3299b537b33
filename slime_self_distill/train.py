"""Launch slime's own training loop with the self-distillation plugin wired in.

    python -m slime_self_distill.train [--slime-entry train|train_async] [--slime-root DIR] [--check-only]
        <slime arguments> [--self-distill-* flags | --custom-config-path configs/sdft.yaml]

What it adds to running slime's ``train.py`` directly:

* the plugin's hook paths (data source, converter, loss, Megatron init) are filled in unless given;
* the ``--self-distill-*`` flags are registered with slime's real parser (``parse_args(add_custom_arguments=...)``);
  Megatron parses with ``ignore_unknown_args=True``, so a misspelt flag would otherwise be dropped silently: it is
  refused here, naming the closest valid flag;
* every self-distillation setting and its combination with slime's settings is checked before slime's parser runs
  (the ``--self-distill-*`` flags and YAML keys alone) and again on slime's parsed ``args`` (``SelfDistillConfig``,
  ``megatron_hooks.check_args``, the full_vocab host-memory estimate), i.e. before any Ray placement group or
  actor exists, so that a bad setting fails in seconds with the flag named.

slime's ``train.py`` / ``train_async.py`` are scripts at the root of slime's checkout (not importable modules); the
checkout is ``--slime-root``, else ``$SLIME_ROOT``, else the parent of the importable ``slime`` package. The script is
loaded as a module (its ``__main__`` block does not run) and its ``train(args)`` is called with the args parsed here,
exactly what its ``__main__`` block does with ``parse_args()``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Optional, Sequence

from slime_self_distill.config import (
    ARG_PREFIX,
    ConfigError,
    SelfDistillConfig,
    add_self_distill_arguments,
    flag_name,
)

logger = logging.getLogger(__name__)

# slime flag -> the plugin's value, filled in when the user did not give the flag.
PLUGIN_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("--data-source-path", "slime_self_distill.data_source.SelfDistillRolloutDataSource"),
    ("--custom-convert-samples-to-train-data-path", "slime_self_distill.custom_convert.convert_samples_to_train_data"),
    ("--loss-type", "custom_loss"),
    ("--custom-loss-function-path", "slime_self_distill.custom_loss.self_distill_loss"),
    ("--custom-megatron-init-path", "slime_self_distill.megatron_hooks.install"),
    # prepare_dataset writes the student prompt under "prompt"; slime's own default key is "input".
    ("--input-key", "prompt"),
)
# slime's default --opd-kl-coef is 1.0, which megatron_hooks.check_args refuses when --use-opd only loads the
# frozen teacher checkpoint; 0 is the only accepted value, so it is filled in with --use-opd unless given.
OPD_KL_COEF_FLAG = "--opd-kl-coef"
USE_OPD_FLAG = "--use-opd"
CUSTOM_CONFIG_FLAG = "--custom-config-path"
ENTRY_SCRIPTS = {"train": "train.py", "train_async": "train_async.py"}
SLIME_ROOT_ENV = "SLIME_ROOT"

SELF_DISTILL_FLAGS = tuple(flag_name(f.name) for f in dataclasses.fields(SelfDistillConfig))


class LaunchError(RuntimeError):
    """The launch cannot proceed (slime not found, bad entry); the message says how to fix it."""


# ---------------------------------------------------------------------- command line
@dataclass(frozen=True)
class LaunchOptions:
    slime_entry: str
    slime_root: Optional[str]
    check_only: bool
    print_slime_root: bool
    slime_argv: list[str]


def launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m slime_self_distill.train",
        description="Run slime's train.py / train_async.py with the self-distillation plugin. Every argument not "
        "listed here is passed to slime (see slime's --help and the --self-distill-* flags).",
        allow_abbrev=False,
        add_help=False,  # --help is slime's (it lists the --self-distill-* flags too)
    )
    parser.add_argument("--slime-entry", choices=sorted(ENTRY_SCRIPTS), default="train",
                        help="slime's training loop: train (synchronous, supports --colocate) or train_async.")
    parser.add_argument("--slime-root", default=None,
                        help=f"slime's checkout (the directory holding train.py); default ${SLIME_ROOT_ENV}, else the "
                        "parent of the importable slime package.")
    parser.add_argument("--check-only", action="store_true",
                        help="Parse and validate every argument with slime's parser, then exit without training.")
    parser.add_argument("--print-slime-root", action="store_true",
                        help="Print the slime checkout that would be used and exit.")
    return parser


def split_launcher_options(argv: Sequence[str]) -> LaunchOptions:
    """Separate the launcher's own options from the arguments meant for slime (kept in order)."""
    known, rest = launcher_parser().parse_known_args(list(argv))
    return LaunchOptions(known.slime_entry, known.slime_root, known.check_only, known.print_slime_root, rest)


def _flag_of(token: str) -> Optional[str]:
    """``--name`` for a ``--name`` or ``--name=value`` token, None for a value or a short option."""
    if not token.startswith("--") or token == "--":
        return None
    return token.split("=", 1)[0]


def given_flags(argv: Sequence[str]) -> set[str]:
    return {flag for flag in map(_flag_of, argv) if flag is not None}


def fill_plugin_defaults(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Append the plugin's hook paths the user did not give; returns (new argv, the flags filled in).

    A flag the user gave is never changed: a different --loss-type is refused later by ``check_args`` (the message
    names it), and a user's own converter / loss / data source path is their choice.
    """
    present = given_flags(argv)
    filled: list[str] = []
    out = list(argv)
    for flag, value in PLUGIN_DEFAULTS:
        if flag not in present:
            out += [flag, value]
            filled.append(flag)
    if USE_OPD_FLAG in present and OPD_KL_COEF_FLAG not in present:
        out += [OPD_KL_COEF_FLAG, "0"]
        filled.append(OPD_KL_COEF_FLAG)
    return out, filled


def _closest_self_distill_flag(flag: str, cutoff: float) -> Optional[str]:
    close = difflib.get_close_matches(flag.lower().replace("_", "-"), SELF_DISTILL_FLAGS, n=1, cutoff=cutoff)
    return close[0] if close else None


def check_self_distill_flags(argv: Sequence[str]) -> None:
    """Refuse a flag meant for the plugin that is not one of its flags (Megatron would silently ignore it).

    "Meant for the plugin": it starts with ``--self`` (any spelling, ``_`` or ``-``), or it is a near miss of a
    ``--self-distill-*`` flag (e.g. ``--slef-distill-topk``); slime's and Megatron's own flags are neither.
    """
    for flag in sorted(given_flags(argv)):
        if flag in SELF_DISTILL_FLAGS:
            continue
        near_miss = _closest_self_distill_flag(flag, cutoff=0.85)
        if not (flag.lower().replace("_", "-").startswith("--self") or near_miss):
            continue
        closest = near_miss or _closest_self_distill_flag(flag, cutoff=0.6)
        hint = f"did you mean {closest}? " if closest else ""
        raise ConfigError(
            f"unknown flag {flag}: slime's parser would silently ignore it. {hint}"
            f"Valid self-distillation flags: {', '.join(SELF_DISTILL_FLAGS)}"
        )


def _config_namespace_from_flags(argv: Sequence[str]) -> dict[str, Any]:
    """Values of the ``--self-distill-*`` flags actually given, typed and choice-checked by the plugin's parser."""
    parser = argparse.ArgumentParser(prog="--self-distill-* flags", allow_abbrev=False, add_help=False,
                                     exit_on_error=False)
    add_self_distill_arguments(parser)
    try:
        known, _ = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as error:
        raise ConfigError(str(error)) from None
    return {k: v for k, v in vars(known).items() if v is not None}


def custom_config_path(argv: Sequence[str]) -> Optional[str]:
    """The last ``--custom-config-path`` value (argparse keeps the last one)."""
    path = None
    for i, token in enumerate(argv):
        if token == CUSTOM_CONFIG_FLAG:
            if i + 1 >= len(argv):
                raise ConfigError(f"{CUSTOM_CONFIG_FLAG} needs a YAML file path")
            path = argv[i + 1]
        elif token.startswith(CUSTOM_CONFIG_FLAG + "="):
            path = token.split("=", 1)[1]
    return path


def load_custom_config(path: str) -> dict[str, Any]:
    """The YAML mapping slime applies with ``setattr(args, key, value)``."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as error:
        raise ConfigError(f"{CUSTOM_CONFIG_FLAG} {path}: cannot read it ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{CUSTOM_CONFIG_FLAG} {path}: not valid YAML ({error})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{CUSTOM_CONFIG_FLAG} {path}: must be a mapping of keys to values (e.g. 'self_distill_kl_scope: topk'), "
            f"got a {type(data).__name__}"
        )
    return data


def precheck_self_distill_settings(argv: Sequence[str]) -> SelfDistillConfig:
    """Validate the self-distillation settings from the flags and the YAML file alone (no slime import).

    slime applies ``--custom-config-path`` after parsing and so overrides a flag given on the command line; a
    setting given both ways with different values is refused rather than letting the YAML win silently.
    """
    check_self_distill_flags(argv)
    from_flags = _config_namespace_from_flags(argv)
    path = custom_config_path(argv)
    from_yaml = {k: v for k, v in load_custom_config(path).items() if k.startswith(ARG_PREFIX)} if path else {}
    for key in sorted(from_flags.keys() & from_yaml.keys()):
        if from_flags[key] != from_yaml[key]:
            raise ConfigError(
                f"{flag_name(key[len(ARG_PREFIX):])} {from_flags[key]} on the command line conflicts with "
                f"'{key}: {from_yaml[key]}' in {CUSTOM_CONFIG_FLAG} {path} (slime applies the YAML value last); "
                "remove one of them"
            )
    try:
        return SelfDistillConfig.from_args(argparse.Namespace(**{**from_flags, **from_yaml}))
    except ConfigError as error:
        where = f" (settings from the command line and {CUSTOM_CONFIG_FLAG} {path})" if path else ""
        raise ConfigError(f"{error}{where}") from None


# ---------------------------------------------------------------------- parsed-args validation
def actor_data_parallel_size(args: Any) -> int:
    """Data-parallel size of the training actors, as Megatron's mpu will compute it (CP excluded)."""
    world = args.actor_num_nodes * args.actor_num_gpus_per_node
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    if world % model_parallel:
        raise ConfigError(
            f"--actor-num-nodes x --actor-num-gpus-per-node = {world} GPUs is not divisible by TP x PP x CP = "
            f"{model_parallel}; change the parallel sizes"
        )
    return world // model_parallel


def validate_parsed_args(args: Any) -> SelfDistillConfig:
    """The training actors' own start-up checks, run once on the driver before any actor exists."""
    from slime_self_distill.megatron_hooks import check_args, check_host_memory

    config = SelfDistillConfig.from_args(args)
    check_args(args, config)
    if getattr(args, "debug_rollout_only", False):  # no training actors, no teacher store
        return config
    check_host_memory(args, config, actor_data_parallel_size(args))
    return config


def add_custom_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """slime's ``parse_args(add_custom_arguments=...)`` hook: the plugin's ``--self-distill-*`` flags."""
    return add_self_distill_arguments(parser)


# ---------------------------------------------------------------------- locating slime
def importable_slime_package_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("slime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_slime_root(
    explicit: Optional[str],
    environ: Mapping[str, str],
    slime_package_dir: Optional[Path],
    entry: str = "train",
) -> Path:
    """slime's checkout: ``--slime-root``, else ``$SLIME_ROOT``, else the parent of the importable package.

    The checkout must hold the entry script and the ``slime`` package.
    """
    script = ENTRY_SCRIPTS[entry]
    install_hint = (
        "clone https://github.com/THUDM/slime and install it with `pip install -e <checkout>` (the checkout keeps "
        f"{script}), or pass --slime-root <checkout> / set {SLIME_ROOT_ENV}=<checkout>"
    )
    if explicit or environ.get(SLIME_ROOT_ENV):
        source = "--slime-root" if explicit else f"${SLIME_ROOT_ENV}"
        root = Path(explicit or environ[SLIME_ROOT_ENV]).expanduser().resolve()
        if not root.is_dir():
            raise LaunchError(f"{source} {root} is not a directory; {install_hint}")
        missing = [name for name in (script, "slime/__init__.py") if not (root / name).is_file()]
        if missing:
            raise LaunchError(
                f"{source} {root} is not a slime checkout: {' and '.join(missing)} missing; point it at the "
                f"directory that holds slime's {script} and the slime/ package"
            )
        return root
    if slime_package_dir is None:
        raise LaunchError(f"slime is not importable and {SLIME_ROOT_ENV} is not set; {install_hint}")
    root = slime_package_dir.resolve().parent
    if not (root / script).is_file():
        raise LaunchError(
            f"the importable slime package is at {slime_package_dir}, but its parent {root} has no {script} "
            f"(slime installed without its checkout?); {install_hint}"
        )
    return root


def import_slime_from(root: Path) -> ModuleType:
    """Import the ``slime`` package of ``root``, refusing a different copy that is already imported or first on
    the path (the entry script and the package must come from the same checkout)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import slime

    package_dir = Path(slime.__file__).resolve().parent
    if package_dir != (root / "slime").resolve():
        raise LaunchError(
            f"the imported slime package is {package_dir}, not the checkout {root}; use one checkout (set "
            f"{SLIME_ROOT_ENV} to {package_dir.parent} or reinstall slime with `pip install -e {root}`)"
        )
    return slime


# The whole ``__main__`` block of slime's entry scripts (624b824); the launcher replaces it with its own
# ``parse_args(add_custom_arguments=...)`` and ``train(args)``, so anything more would be skipped.
EXPECTED_MAIN_BLOCK = ("args = parse_args()", "train(args)")


def check_entry_main_block(source: str, path: Path) -> None:
    """Refuse an entry script whose ``if __name__ == "__main__":`` block does more than the launcher reproduces."""
    for node in ast.parse(source, str(path)).body:
        if isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"':
            found = tuple(ast.unparse(statement) for statement in node.body)
            if found != EXPECTED_MAIN_BLOCK:
                raise LaunchError(
                    f"the __main__ block of {path} is {list(found)}, not {list(EXPECTED_MAIN_BLOCK)}: this slime "
                    "version starts training differently from what slime_self_distill.train reproduces; run slime's "
                    "script directly (README: 'Without the launcher') or update the launcher"
                )
            return
    raise LaunchError(f"{path} has no `if __name__ == \"__main__\":` block; this slime version is not supported")


def load_entry_module(root: Path, entry: str) -> ModuleType:
    """slime's entry script as a module named ``slime_entry_<entry>``; its ``__main__`` block does not run."""
    path = root / ENTRY_SCRIPTS[entry]
    check_entry_main_block(path.read_text(), path)
    spec = importlib.util.spec_from_file_location(f"slime_entry_{entry}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "train", None)):
        raise LaunchError(f"{path} defines no train(args) function; this slime version is not supported")
    return module


# ---------------------------------------------------------------------- main
def prepare_slime_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Everything that needs no slime: flag and YAML checks, plugin defaults. Returns (slime's argv, filled flags)."""
    precheck_self_distill_settings(argv)
    return fill_plugin_defaults(argv)


def parse_slime_args(root: Path, slime_argv: Sequence[str], entry: str) -> Any:
    """slime's real ``parse_args`` with the plugin's flags, on ``slime_argv`` (it reads ``sys.argv``)."""
    import_slime_from(root)
    from slime.utils.arguments import parse_args

    saved = sys.argv
    sys.argv = [str(root / ENTRY_SCRIPTS[entry]), *slime_argv]
    try:
        return parse_args(add_custom_arguments=add_custom_arguments)
    finally:
        sys.argv = saved


def main(argv: Optional[Sequence[str]] = None, environ: Mapping[str, str] = os.environ) -> int:
    options = split_launcher_options(sys.argv[1:] if argv is None else argv)
    try:
        root = find_slime_root(options.slime_root, environ, importable_slime_package_dir(), options.slime_entry)
        if options.print_slime_root:
            print(root)
            return 0
        slime_argv, filled = prepare_slime_argv(options.slime_argv)
        args = parse_slime_args(root, slime_argv, options.slime_entry)  # configures slime's logging
        config = validate_parsed_args(args)
        entry = load_entry_module(root, options.slime_entry)
    except (ConfigError, LaunchError) as error:
        print(f"slime_self_distill.train: error: {error}", file=sys.stderr)
        return 2
    for flag in filled:
        logger.info("slime_self_distill: filled in %s %s", flag, slime_argv[slime_argv.index(flag) + 1])
    logger.info("slime_self_distill: %s", config)
    if options.check_only:
        print(f"slime_self_distill.train: arguments OK ({config})")
        return 0
    entry.train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
