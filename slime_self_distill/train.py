"""Launch slime's own training loop with the self-distillation plugin wired in.

    python -m slime_self_distill.train [--slime-entry train|train_async] [--slime-root DIR] [--check-only]
        <slime arguments> [--custom-config-path configs/<recipe>.yaml] [--self-distill-* flags]

What it adds to running slime's ``train.py`` directly:

* a recipe (``--custom-config-path``) may carry slime settings as ``slime_args`` (e.g. the official optimisation
  settings of its method); they go on slime's command line *before* yours, so a flag you give wins;
* the plugin's hook paths (data source, converter, loss, Megatron init) are filled in unless given, and so are
  ``--use-rollout-logprobs`` (the loss never reads slime's student log-prob pass: it is skipped) and, for a frozen
  teacher, ``--use-opd --opd-type megatron --opd-teacher-load <--ref-load> --opd-kl-coef 0`` (a checkpoint that
  stays the teacher across restarts);
* the ``--self-distill-*`` flags are registered with slime's real parser (``parse_args(add_custom_arguments=...)``);
  Megatron parses with ``ignore_unknown_args=True``, so a misspelt flag would otherwise be dropped silently: it is
  refused here, naming the closest valid flag, and so is a recipe key that is neither a slime nor a plugin setting;
* every self-distillation setting and its combination with slime's settings is checked before slime's parser runs
  (the ``--self-distill-*`` flags and recipe keys alone; a knob without effect is a warning), every row of
  ``--prompt-data`` goes through the checks of the data source, and slime's parsed ``args`` through the training
  actors' own start-up checks, before any Ray placement group or actor exists, so that a mistake fails in seconds.

Without slime installed, ``--help`` and ``--check-only`` still check the plugin's settings and the prompt data.

slime's ``train.py`` / ``train_async.py`` are scripts at the root of slime's checkout (not importable modules); the
checkout is ``--slime-root``, else ``$SLIME_ROOT``, else the parent of the importable ``slime`` package. The script is
loaded as a module (its ``__main__`` block does not run) and its ``train(args)`` is called with the args parsed here,
exactly what its ``__main__`` block does with ``parse_args()``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Mapping, Optional, Sequence

from slime_self_distill.config import (
    ARG_PREFIX,
    SETTING_KEYS,
    ConfigError,
    SelfDistillConfig,
    add_self_distill_arguments,
    closest_name,
    closest_setting,
    flag_name,
    looks_like_a_setting,
    retired_setting_message,
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
# Offline top-K distillation: slime's SFT loop (no SGLang, no log-prob passes) over the data file extraction wrote,
# with the plugin's converter, loss and get_batch hook. --prompt-data, --loss-mask-type and the data file's keys come
# from the top-K file.
OFFLINE_DEFAULTS: tuple[tuple[str, ...], ...] = (
    ("--rollout-function-path", "slime.rollout.sft_rollout.generate_rollout"),
    ("--custom-convert-samples-to-train-data-path", "slime_self_distill.custom_convert.convert_samples_to_train_data"),
    ("--loss-type", "custom_loss"),
    ("--custom-loss-function-path", "slime_self_distill.custom_loss.self_distill_loss"),
    ("--custom-megatron-init-path", "slime_self_distill.megatron_hooks.install"),
    ("--debug-train-only",),
    ("--disable-compute-advantages-and-returns",),
)
# The loss never reads slime's recomputed student log-probs: --use-rollout-logprobs skips that forward pass (slime
# then takes SGLang's log-probs wherever it needs old log-probs). Not with the flags that need the pass: --use-tis
# (slime refuses the pair), --get-mismatch-metrics (recomputes them on purpose), --use-routing-replay (the pass
# records the routing that training replays; --use-rollout-routing-replay records it in the rollout instead) and
# --log-correct-samples (slime's metric reads the recomputed log-probs).
USE_ROLLOUT_LOGPROBS_FLAG = "--use-rollout-logprobs"
KEEPS_STUDENT_PASS_FLAGS = ("--use-tis", "--get-mismatch-metrics", "--log-correct-samples")
# slime's default --opd-kl-coef is 1.0, which megatron_hooks.check_args refuses when --use-opd only loads the
# frozen teacher checkpoint; 0 is the only accepted value, so it is filled in with --use-opd unless given.
OPD_KL_COEF_FLAG = "--opd-kl-coef"
USE_OPD_FLAG = "--use-opd"
DEBUG_ROLLOUT_ONLY_FLAG = "--debug-rollout-only"
REF_LOAD_FLAG = "--ref-load"
CUSTOM_CONFIG_FLAG = "--custom-config-path"
RECIPE_SLIME_ARGS_KEY = "slime_args"  # recipe key: slime flags put before the command line's
ENTRY_SCRIPTS = {"train": "train.py", "train_async": "train_async.py"}
PARSER_IMPORT_FAILURE = "slime's argument parser cannot be imported"
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
    help: bool
    slime_help: bool
    slime_argv: list[str]


def launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m slime_self_distill.train",
        description="Run slime's train.py / train_async.py with the self-distillation plugin. Every argument not "
        "listed here is passed to slime (--slime-help lists slime's own, which needs slime installed).",
        allow_abbrev=False,
        add_help=False,  # -h/--help is handled by main() (it also lists the --self-distill-* flags)
    )
    parser.add_argument("-h", "--help", action="store_true", help="Show this help and the --self-distill-* flags.")
    parser.add_argument("--slime-help", action="store_true", help="Show slime's own --help (needs slime).")
    parser.add_argument("--slime-entry", choices=sorted(ENTRY_SCRIPTS), default="train",
                        help="slime's training loop: train (synchronous, supports --colocate) or train_async.")
    parser.add_argument("--slime-root", default=None,
                        help=f"slime's checkout (the directory holding train.py); default ${SLIME_ROOT_ENV}, else the "
                        "parent of the importable slime package.")
    parser.add_argument("--check-only", action="store_true",
                        help="Check the settings, the recipe and every row of --prompt-data (and, with slime "
                        "installed, every argument with slime's parser), then exit without training.")
    parser.add_argument("--print-slime-root", action="store_true",
                        help="Print the slime checkout that would be used and exit.")
    return parser


def help_text() -> str:
    plugin = argparse.ArgumentParser(usage=argparse.SUPPRESS, add_help=False, allow_abbrev=False)
    add_self_distill_arguments(plugin)
    return "\n".join([
        launcher_parser().format_help().rstrip(),
        "",
        plugin.format_help().strip(),
        "",
        f"A recipe ({CUSTOM_CONFIG_FLAG} configs/<recipe>.yaml) sets the same settings as YAML keys (flag names with "
        f"underscores) and may list slime flags under '{RECIPE_SLIME_ARGS_KEY}'.",
    ])


def split_launcher_options(argv: Sequence[str]) -> LaunchOptions:
    """Separate the launcher's own options from the arguments meant for slime (kept in order)."""
    known, rest = launcher_parser().parse_known_args(list(argv))
    return LaunchOptions(known.slime_entry, known.slime_root, known.check_only, known.print_slime_root, known.help,
                         known.slime_help, rest)


def _flag_of(token: str) -> Optional[str]:
    """``--name`` for a ``--name`` or ``--name=value`` token, None for a value or a short option."""
    if not token.startswith("--") or token == "--":
        return None
    return token.split("=", 1)[0]


def given_flags(argv: Sequence[str]) -> set[str]:
    return {flag for flag in map(_flag_of, argv) if flag is not None}


def flag_value(argv: Sequence[str], flag: str) -> Optional[str]:
    """The last value given to ``flag`` (argparse keeps the last one), as ``--flag value`` or ``--flag=value``."""
    value = None
    for i, token in enumerate(argv):
        if token == flag:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"{flag} needs a value")
            value = argv[i + 1]
        elif token.startswith(flag + "="):
            value = token.split("=", 1)[1]
    return value


def given_value(argv: Sequence[str], flag: str) -> str:
    """What ``argv`` gives ``flag`` last, as typed: its value, or "" for a switch (no value after it)."""
    shown = ""
    for i, token in enumerate(argv):
        if token == flag:
            shown = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
        elif token.startswith(flag + "="):
            shown = token.split("=", 1)[1]
    return shown


def fill_plugin_defaults(argv: Sequence[str], config: SelfDistillConfig) -> tuple[list[str], list[str]]:
    """Append what the plugin needs and the user did not give; returns (new argv, the arguments filled in).

    A flag the user gave is never changed: a different --loss-type is refused later by ``check_args`` (the message
    names it), and a user's own converter / loss / data source path is their choice.
    """
    present = given_flags(argv)
    filled: list[list[str]] = []
    if config.offline:
        filled = [list(arguments) for arguments in OFFLINE_DEFAULTS if arguments[0] not in present]
        filled += offline_file_defaults(config, present)
        return [*argv, *(token for arguments in filled for token in arguments)], [" ".join(a) for a in filled]
    for flag, value in PLUGIN_DEFAULTS:
        if flag not in present:
            filled.append([flag, value])
    needs_student_pass = bool(present & set(KEEPS_STUDENT_PASS_FLAGS)) or (
        "--use-routing-replay" in present and "--use-rollout-routing-replay" not in present) or (
        config.rl_combination != "none")  # slime's policy loss: old log-probs from the trainer, as slime computes them
    if USE_ROLLOUT_LOGPROBS_FLAG not in present and not needs_student_pass:
        filled.append([USE_ROLLOUT_LOGPROBS_FLAG])
    uses_opd = USE_OPD_FLAG in present
    rollout_only = DEBUG_ROLLOUT_ONLY_FLAG in present  # no trainer: no teacher to load (e.g. an SD-Zero collection)
    if config.teacher == "frozen" and not uses_opd and not rollout_only:
        initial = flag_value(argv, REF_LOAD_FLAG)
        if initial is None:
            raise ConfigError(
                f"{flag_name('teacher')} frozen is the run's initial checkpoint, read from {REF_LOAD_FLAG}: give "
                f"{REF_LOAD_FLAG} <initial Megatron checkpoint>, or name the teacher checkpoint yourself with "
                f"{USE_OPD_FLAG} --opd-type megatron --opd-teacher-load <checkpoint>"
            )
        filled.append([USE_OPD_FLAG, "--opd-type", "megatron", "--opd-teacher-load", initial])
        uses_opd = True
    if uses_opd and OPD_KL_COEF_FLAG not in present:
        filled.append([OPD_KL_COEF_FLAG, "0"])
    return [*argv, *(token for arguments in filled for token in arguments)], [" ".join(a) for a in filled]


def offline_file_defaults(config: SelfDistillConfig, present: set) -> list[list[str]]:
    """``--prompt-data`` (the data file beside the top-K file), ``--loss-mask-type`` and the data file's keys
    (``--input-key``, ``--tool-key``, ``--metadata-key``: the ones extraction used), unless given."""
    from slime_self_distill.offline.rollout import open_topk_file
    from slime_self_distill.offline.topk_file import TopKFileError

    try:
        info = open_topk_file(config.offline_topk_path).info
    except TopKFileError as error:
        raise ConfigError(f"{flag_name('offline_topk_path')}: {error}") from None
    filled = []
    if "--prompt-data" not in present:
        filled.append(["--prompt-data", info.data_path(config.offline_topk_path)])
    for flag, value in (("--loss-mask-type", info.loss_mask_type), ("--input-key", info.messages_key),
                        ("--tool-key", info.tool_key), ("--metadata-key", info.metadata_key)):
        if flag not in present:
            filled.append([flag, value])
    return filled


def _closest_self_distill_flag(flag: str, cutoff: float) -> Optional[str]:
    return closest_name(flag.lower().replace("_", "-"), SELF_DISTILL_FLAGS, cutoff)


def check_self_distill_flags(argv: Sequence[str]) -> None:
    """Refuse a flag meant for the plugin that is not one of its flags (Megatron would silently ignore it).

    "Meant for the plugin": it starts with ``--self`` (any spelling, ``_`` or ``-``), or it is a near miss of a
    ``--self-distill-*`` flag (e.g. ``--slef-distill-topk``); slime's and Megatron's own flags are neither.
    """
    for flag in sorted(given_flags(argv)):
        if flag in SELF_DISTILL_FLAGS:
            continue
        if retired_setting_message(flag):
            raise ConfigError(retired_setting_message(flag))
        near_miss = _closest_self_distill_flag(flag, cutoff=0.85)
        if not (flag.lower().replace("_", "-").startswith("--self") or near_miss):
            continue
        closest = near_miss or _closest_self_distill_flag(flag, cutoff=0.6)
        hint = f"Did you mean {closest}? " if closest else ""
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


def recipe_slime_args(recipe: dict[str, Any], path: str) -> list[str]:
    """The recipe's ``slime_args``: slime flags and values, as strings."""
    values = recipe.get(RECIPE_SLIME_ARGS_KEY, [])
    if not isinstance(values, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                               for v in values):
        raise ConfigError(
            f"{CUSTOM_CONFIG_FLAG} {path}: '{RECIPE_SLIME_ARGS_KEY}' must be a list of slime flags and values "
            f"(e.g. [--lr, 5.0e-5]), got {values!r}"
        )
    arguments = [str(v) for v in values]
    if arguments and _flag_of(arguments[0]) is None:
        raise ConfigError(f"{CUSTOM_CONFIG_FLAG} {path}: '{RECIPE_SLIME_ARGS_KEY}' must start with a flag, got "
                          f"{arguments[0]!r}")
    return arguments


def check_recipe_setting_keys(recipe: dict[str, Any], path: str) -> None:
    """Refuse a recipe key meant as a plugin setting that is not one (slime would set it on ``args`` and nobody would
    read it): ``self_distil_topk``, ``self-distill-topk``, ``topk``, ``kl_scope``. Keys that are slime settings are
    checked against slime's parser in ``check_recipe_slime_keys``."""
    for key in recipe:
        if key in SETTING_KEYS or key == RECIPE_SLIME_ARGS_KEY:
            continue
        if retired_setting_message(key):
            raise ConfigError(f"{CUSTOM_CONFIG_FLAG} {path}: {retired_setting_message(key)}")
        closest = closest_setting(key)
        unprefixed = closest == ARG_PREFIX + key.lower().replace("-", "_")
        if looks_like_a_setting(key) or unprefixed:
            hint = f"; did you mean {closest!r}?" if closest else ""
            raise ConfigError(f"{CUSTOM_CONFIG_FLAG} {path}: unknown key {key!r}: not a self-distillation setting"
                              f"{hint} (settings are the --self-distill-* flags with underscores)")


def check_recipe_slime_keys(recipe: dict[str, Any], path: str, slime_keys: set[str]) -> None:
    """Refuse a recipe key that is neither a slime argument nor a plugin setting: slime would set it without a word."""
    valid = slime_keys | SETTING_KEYS | {RECIPE_SLIME_ARGS_KEY}
    unknown = sorted(key for key in recipe if key not in valid)
    if unknown:
        hints = "; ".join(
            f"{key!r}" + (f" (did you mean {close!r}?)" if (close := closest_name(key.replace("-", "_"), valid))
                          else "")
            for key in unknown
        )
        raise ConfigError(f"{CUSTOM_CONFIG_FLAG} {path}: unknown key(s) {hints}: neither a slime argument nor a "
                          "self-distillation setting, so slime would set it on args and nothing would read it")


@dataclass(frozen=True)
class LaunchPlan:
    """What the launcher hands slime, from the command line and the recipe (no slime needed to build it)."""

    slime_argv: list[str]
    filled: list[str]  # arguments the launcher added
    config: SelfDistillConfig
    recipe: dict[str, Any]
    recipe_path: Optional[str]
    warnings: list[str]
    # self_distill_* recipe keys a command-line flag gives another value: set on slime's args after slime's parser
    # (which applies the recipe last), so that the flag wins as slime's own flags do over the recipe's slime_args
    recipe_overrides: dict[str, Any] = field(default_factory=dict)


def plan_launch(argv: Sequence[str]) -> LaunchPlan:
    """Everything that needs no slime: flag, recipe and setting checks, recipe slime arguments, plugin defaults.

    slime applies ``--custom-config-path`` after parsing and so overrides a flag given on the command line; a
    self-distillation setting given both ways wins as the flag (``recipe_overrides``, applied to slime's parsed args
    by ``apply_recipe_overrides``), with a warning naming both values.
    """
    check_self_distill_flags(argv)
    path = flag_value(argv, CUSTOM_CONFIG_FLAG)
    recipe = load_custom_config(path) if path else {}
    check_recipe_setting_keys(recipe, path)
    from_recipe_args = recipe_slime_args(recipe, path)
    check_self_distill_flags(from_recipe_args)
    from_flags = _config_namespace_from_flags([*from_recipe_args, *argv])
    from_yaml = {k: v for k, v in recipe.items() if k in SETTING_KEYS}
    overrides = {key: from_flags[key] for key in sorted(from_flags.keys() & from_yaml.keys())
                  if from_flags[key] != from_yaml[key]}
    settings = argparse.Namespace(**{**from_yaml, **from_flags})
    try:
        config = SelfDistillConfig.from_args(settings)
    except ConfigError as error:
        where = f" (settings from the command line and {CUSTOM_CONFIG_FLAG} {path})" if path else ""
        raise ConfigError(f"{error}{where}") from None
    explicit = SelfDistillConfig.explicit_settings(settings)
    try:
        config.check_explicit(explicit)
    except ConfigError as error:
        where = f" (settings from the command line and {CUSTOM_CONFIG_FLAG} {path})" if path else ""
        raise ConfigError(f"{error}{where}") from None
    if config.offline:  # a K over the file's would otherwise stop the first rollout
        from slime_self_distill.offline.rollout import open_topk_file, used_k
        from slime_self_distill.offline.topk_file import TopKFileError

        try:
            used_k(open_topk_file(config.offline_topk_path).info, config, explicit)
        except TopKFileError as error:
            raise ConfigError(f"{flag_name('offline_topk_path')}: {error}") from None
    warnings = config.ineffective_settings(explicit)
    warnings += [f"{flag_name(key[len(ARG_PREFIX):])} {value} on the command line replaces '{key}: {from_yaml[key]}' "
                 f"of {CUSTOM_CONFIG_FLAG} {path}" for key, value in overrides.items()]
    for flag in sorted(given_flags(from_recipe_args) & given_flags(argv)):
        ours, recipes = given_value(argv, flag), given_value(from_recipe_args, flag)
        if ours != recipes:  # a switch (no value) or the same value twice replaces nothing
            warnings.append(f"{flag} {ours} on the command line replaces the recipe's {flag} {recipes}")
    slime_argv, filled = fill_plugin_defaults([*from_recipe_args, *argv], config)
    return LaunchPlan(slime_argv, filled, config, recipe, path, warnings, overrides)


def apply_recipe_overrides(args: Any, plan: LaunchPlan) -> None:
    """Set the command line's values of the recipe keys it overrides on slime's parsed ``args`` (slime's parser applied
    the recipe after the flags); the teacher top-K file as an absolute path (slime's Ray actors need not share the
    launcher's working directory)."""
    for key, value in plan.recipe_overrides.items():
        setattr(args, key, value)
    key = ARG_PREFIX + "offline_topk_path"
    if getattr(args, key, None):
        setattr(args, key, os.path.abspath(getattr(args, key)))


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
    """The training actors' own start-up checks, run once on the driver before any actor exists (the host-memory
    check of the actors needs their parameters; here, only the teacher store, a lower bound, against the launcher
    node's memory: a warning, or an error with --self-distill-host-memory-budget-gb)."""
    from slime_self_distill.megatron_hooks import check_args, check_offline_args, check_reward_args, check_teacher_store
    from slime_self_distill.sd_zero_collect import check_collection_args

    config = SelfDistillConfig.from_args(args)
    if config.offline:
        from slime_self_distill.offline.rollout import check_file_against_args, open_topk_file

        check_offline_args(args, config)
        check_file_against_args(open_topk_file(config.offline_topk_path).info, config.offline_topk_path, args, config)
        return config
    check_collection_args(args)
    check_reward_args(args)
    if getattr(args, "debug_rollout_only", False):  # no training actors: no teacher pass, no teacher store
        return config
    check_args(args, config)
    dp_size = actor_data_parallel_size(args)
    try:
        check_teacher_store(args, config, dp_size)
    except ConfigError as over:
        if config.host_memory_budget_gb is not None:  # a budget the user stated holds wherever the launcher runs
            raise
        # measured on the launcher's node, which need not be a training node: the actors decide, on their nodes
        _say(f"warning: {over}\n(measured on the node that runs the launcher; the training actors check every "
             "node's memory when they start)")
    return config


# ---------------------------------------------------------------------- the prompt data
# slime's flags (and defaults) that say where a row's fields are; the recipe may set them as YAML keys too, which
# slime applies last.
PROMPT_DATA_FLAGS = (("--prompt-data", "prompt_data", None), ("--input-key", "input_key", "input"),
                     ("--metadata-key", "metadata_key", "metadata"), ("--label-key", "label_key", None),
                     ("--tool-key", "tool_key", "tools"), ("--hf-checkpoint", "hf_checkpoint", None),
                     ("--apply-chat-template-kwargs", "apply_chat_template_kwargs", None))
MAX_LISTED_ROWS = 20


def check_prompt_data(plan: LaunchPlan) -> Optional[str]:
    """Every row of ``--prompt-data`` through the checks of slime's ``Dataset`` and of the data source; raises
    ``SelfDistillDataError`` listing the bad rows; returns a one-line summary (None without ``--prompt-data``)."""
    from slime_self_distill.data_source import PromptDataKeys, SelfDistillDataError
    from slime_self_distill.data_source import check_prompt_data as check_rows

    values = {}
    for flag, key, default in PROMPT_DATA_FLAGS:
        given = flag_value(plan.slime_argv, flag)
        values[key] = plan.recipe[key] if key in plan.recipe else default if given is None else given
    path = values.pop("prompt_data")
    if path is None:
        return "no --prompt-data: no data checked"
    if plan.config.offline:
        from slime_self_distill.offline.rollout import DataFileKeys, check_data_file

        tokenizer = values["hf_checkpoint"]
        keys = DataFileKeys(input_key=values["input_key"], metadata_key=values["metadata_key"],
                            tool_key=values["tool_key"] or None,
                            loss_mask_type=flag_value(plan.slime_argv, "--loss-mask-type") or "qwen",
                            tokenizer=tokenizer if tokenizer and os.path.isdir(tokenizer) else None)
        return check_data_file(path, keys, plan.config.offline_topk_path)
    apply_chat_template = bool(plan.recipe.get("apply_chat_template",
                                               "--apply-chat-template" in given_flags(plan.slime_argv)))
    tokens, rendering = teacher_prompt_counter(values.pop("hf_checkpoint"), apply_chat_template,
                                               values.pop("apply_chat_template_kwargs"), plan.config)
    keys = PromptDataKeys(apply_chat_template=apply_chat_template, **values)
    report = check_rows(path, keys, plan.config, tokens)
    if report.problems:
        listing = "\n".join(f"  row {number}: {problem}" for number, problem in report.problems[:MAX_LISTED_ROWS])
        raise SelfDistillDataError(
            f"--prompt-data {path}: {len(report.problems)} of {report.rows} rows would fail (the first "
            f"{min(len(report.problems), MAX_LISTED_ROWS)}):\n{listing}"
        )
    if not report.rows:
        raise SelfDistillDataError(f"--prompt-data {path} has no rows")
    if report.without_teacher == report.rows:
        raise SelfDistillDataError(
            f"--prompt-data {path}: none of its {report.rows} rows has a teacher prompt in "
            f"{values['metadata_key']}[{plan.config.teacher_prompt_key!r}], so nothing would be distilled; build the "
            "file with slime_self_distill.prepare_dataset, or point --self-distill-teacher-prompt-key at the key that "
            "holds it"
        )
    excluded = f", {report.without_teacher} without a teacher prompt (excluded)" if report.without_teacher else ""
    if report.longest_teacher_prompt is not None:
        rendering = f"teacher prompts rendered and encoded: up to {report.longest_teacher_prompt} tokens"
    if plan.config.collects_revisions:
        rendering = "an SD-Zero collection: no teacher prompt is read"
    elif plan.config.builds_self_revision_context:
        rendering = "teacher prompts are each sample's own prompt and response, built after rewards"
    elif not plan.config.teacher_prompt_from_row:
        rendering = "teacher prompts are built from each rollout group after rewards"
    return f"--prompt-data {path}: {report.rows} rows OK{excluded}; {rendering}"


def teacher_prompt_counter(hf_checkpoint: Optional[str], apply_chat_template: bool, chat_template_kwargs: Any,
                           config: SelfDistillConfig):
    """(``count(teacher_prompt, tools)`` or None, what the summary says when none): the teacher prompts are rendered
    and encoded with ``--hf-checkpoint``'s tokenizer, as the data source and the converter will, when it is a local
    directory that loads."""
    import json

    from slime_self_distill.data_source import teacher_renderer

    if not hf_checkpoint or not os.path.isdir(hf_checkpoint):
        return None, "teacher prompts not rendered (no local --hf-checkpoint directory)"
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf_checkpoint, trust_remote_code=True)
    except Exception as error:  # noqa: BLE001 - any load failure only means the prompts are not measured
        return None, f"teacher prompts not rendered (the tokenizer of {hf_checkpoint} does not load: {error})"
    if isinstance(chat_template_kwargs, str):  # from the command line; a recipe's YAML gives a mapping
        try:
            chat_template_kwargs = json.loads(chat_template_kwargs)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--apply-chat-template-kwargs {chat_template_kwargs!r} is not JSON ({error})") from None
    render = teacher_renderer(tokenizer, config, apply_chat_template=apply_chat_template,
                              apply_chat_template_kwargs=chat_template_kwargs)

    def count(teacher_prompt, tools) -> int:
        return len(tokenizer.encode(render(teacher_prompt, tools), add_special_tokens=False))

    return count, ""


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
@contextlib.contextmanager
def recorded_argument_names() -> Iterator[set[str]]:
    """While active, every argparse argument added anywhere (slime's, Megatron's, SGLang's parsers) records its
    destination name in the yielded set: the keys a recipe may set."""
    names: set[str] = set()
    original = argparse._ActionsContainer.add_argument

    def add_argument(self, *args, **kwargs):
        action = original(self, *args, **kwargs)
        names.add(action.dest)
        return action

    argparse._ActionsContainer.add_argument = add_argument
    try:
        yield names
    finally:
        argparse._ActionsContainer.add_argument = original


def parse_slime_args(root: Path, slime_argv: Sequence[str], entry: str) -> tuple[Any, set[str]]:
    """slime's real ``parse_args`` with the plugin's flags, on ``slime_argv`` (it reads ``sys.argv``); returns the
    parsed args and the names of every argument slime's parsers know."""
    import_slime_from(root)

    def unimportable(error: ImportError) -> LaunchError:
        return LaunchError(
            f"{PARSER_IMPORT_FAILURE} ({error}); put Megatron-LM on PYTHONPATH (slime's image keeps it at "
            "/root/Megatron-LM; the run script adds $MEGATRON_LM_PATH) and install slime's dependencies"
        )

    try:
        from slime.utils.arguments import parse_args
    except ImportError as error:  # slime's parser imports Megatron-LM's megatron.training and SGLang
        raise unimportable(error) from None

    saved = sys.argv
    sys.argv = [str(root / ENTRY_SCRIPTS[entry]), *slime_argv]
    try:
        with recorded_argument_names() as names:
            args = parse_args(add_custom_arguments=add_custom_arguments)
        return args, names
    except ImportError as error:  # parse_args imports megatron.training's own parser when it runs
        raise unimportable(error) from None
    finally:
        sys.argv = saved


def _say(message: str) -> None:
    print(f"slime_self_distill.train: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None, environ: Mapping[str, str] = os.environ) -> int:
    from slime_self_distill.data_source import SelfDistillDataError

    options = split_launcher_options(sys.argv[1:] if argv is None else argv)
    if options.help:
        print(help_text())
        return 0
    try:
        if options.print_slime_root or options.slime_help:
            root = find_slime_root(options.slime_root, environ, importable_slime_package_dir(), options.slime_entry)
            if options.print_slime_root:
                print(root)
                return 0
            try:
                parse_slime_args(root, ["--help"], options.slime_entry)
            except SystemExit as done:  # argparse printed slime's help
                return int(done.code or 0)
        plan = plan_launch(options.slime_argv)
        for warning in plan.warnings:
            _say(f"warning: {warning}")
        data_summary = check_prompt_data(plan)
        explicit_root = options.slime_root is not None or SLIME_ROOT_ENV in environ
        try:
            root = find_slime_root(options.slime_root, environ, importable_slime_package_dir(), options.slime_entry)
            args, slime_keys = parse_slime_args(root, plan.slime_argv, options.slime_entry)  # sets slime's logging
            apply_recipe_overrides(args, plan)
        except LaunchError as missing:
            # --check-only without a usable slime still checks the plugin; a slime checkout named by hand must work
            if not options.check_only or (explicit_root and not str(missing).startswith(PARSER_IMPORT_FAILURE)):
                raise
            print(f"slime_self_distill.train: self-distillation settings OK ({plan.config.describe()}); "
                  f"{data_summary}")
            _say(f"slime's own arguments were not checked, nor the plugin's settings against them (e.g. "
                 f"--use-kl-loss with --self-distill-rl-combination none, SDPO with one sample per prompt): {missing}")
            return 0
        check_recipe_slime_keys(plan.recipe, plan.recipe_path, slime_keys)
        config = validate_parsed_args(args)
        entry = load_entry_module(root, options.slime_entry)
    except (ConfigError, LaunchError, SelfDistillDataError) as error:
        _say(f"error: {error}")
        return 2
    for filled in plan.filled:
        logger.info("slime_self_distill: filled in %s", filled)
    logger.info("slime_self_distill: %s", config)
    if options.check_only:
        print(f"slime_self_distill.train: arguments OK ({config.describe()}); {data_summary}")
        return 0
    entry.train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
