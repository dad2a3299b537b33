"""The launcher: argv rewriting, flag and YAML checks, slime discovery, start-up validation, the cluster script."""

import argparse
import json
import math
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from slime_self_distill import train as launcher
from slime_self_distill.config import ConfigError, SelfDistillConfig
from slime_self_distill.train import (
    PLUGIN_DEFAULTS,
    LaunchError,
    check_recipe_slime_keys,
    check_self_distill_flags,
    fill_plugin_defaults,
    find_slime_root,
    plan_launch,
    split_launcher_options,
    validate_parsed_args,
)
from tests.slime_support import needs_slime

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = PROJECT_ROOT / "run_self_distill_slime.sh"
GIB = 1024**3


def flag_value(argv, flag):
    return argv[argv.index(flag) + 1]


def precheck_self_distill_settings(argv):
    """The settings the launcher checks before slime runs (a frozen teacher reads --ref-load)."""
    return plan_launch([*argv, "--ref-load", "/ckpt/initial"]).config


LIVE = SelfDistillConfig(teacher="live")


# ---------------------------------------------------------------------- argv rewriting
def test_launcher_options_are_split_off_and_the_rest_keeps_its_order():
    argv = ["--lr", "1e-6", "--slime-entry", "train_async", "--eps-clip-c", "-0.5", "--slime-root=/x",
            "--self-distill-topk=20", "--check-only", "--num-rollout", "3"]
    options = split_launcher_options(argv)
    assert (options.slime_entry, options.slime_root, options.check_only) == ("train_async", "/x", True)
    assert options.slime_argv == ["--lr", "1e-6", "--eps-clip-c", "-0.5", "--self-distill-topk=20",
                                  "--num-rollout", "3"]
    assert split_launcher_options([]).slime_entry == "train"


def test_plugin_defaults_are_filled_when_absent():
    argv, filled = fill_plugin_defaults(["--lr", "1e-6"], LIVE)
    assert argv[:2] == ["--lr", "1e-6"]
    for flag, value in PLUGIN_DEFAULTS:
        assert flag_value(argv, flag) == value
        assert argv.count(flag) == 1
    assert filled == [f"{flag} {value}" for flag, value in PLUGIN_DEFAULTS] + ["--use-rollout-logprobs"]
    assert "--opd-kl-coef" not in argv and "--use-opd" not in argv  # only with --use-opd / a frozen teacher


def test_the_unused_student_pass_is_skipped_unless_a_flag_needs_it():
    assert "--use-rollout-logprobs" in fill_plugin_defaults([], LIVE)[0]
    for keeps_it in ("--use-tis", "--get-mismatch-metrics"):  # slime refuses the first pair; the second wants it
        assert "--use-rollout-logprobs" not in fill_plugin_defaults([keeps_it], LIVE)[0]
    argv, filled = fill_plugin_defaults(["--use-rollout-logprobs"], LIVE)
    assert argv.count("--use-rollout-logprobs") == 1 and "--use-rollout-logprobs" not in filled
    # slime's policy loss, combined with the distillation loss, reads the old log-probs of the student pass
    for combination in ("hybrid", "additive"):
        combined = SelfDistillConfig(teacher="live", rl_combination=combination)
        assert "--use-rollout-logprobs" not in fill_plugin_defaults([], combined)[0]


def test_a_frozen_teacher_is_the_ref_load_checkpoint_through_slimes_opd_loader():
    argv, filled = fill_plugin_defaults(["--ref-load", "/ckpt/initial", "--load", "/ckpt/run"], SelfDistillConfig())
    assert flag_value(argv, "--opd-teacher-load") == "/ckpt/initial"  # never --load: it moves when the run resumes
    assert flag_value(argv, "--opd-type") == "megatron" and flag_value(argv, "--opd-kl-coef") == "0"
    assert "--use-opd --opd-type megatron --opd-teacher-load /ckpt/initial" in filled
    with pytest.raises(ConfigError, match="frozen is the run's initial checkpoint, read from --ref-load"):
        fill_plugin_defaults(["--load", "/ckpt/run"], SelfDistillConfig())
    # the user's own teacher checkpoint is kept
    argv, _ = fill_plugin_defaults(["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", "/t"],
                                   SelfDistillConfig())
    assert argv.count("--opd-teacher-load") == 1 and flag_value(argv, "--opd-teacher-load") == "/t"


def test_user_choices_are_never_overridden():
    user = ["--loss-type", "policy_loss", "--custom-loss-function-path=my.loss.fn",
            "--data-source-path", "my.DataSource"]
    argv, filled = fill_plugin_defaults(user, LIVE)
    assert argv[: len(user)] == user
    assert "--loss-type" not in argv[len(user):] and "my.loss.fn" not in argv[len(user):]
    assert argv.count("--data-source-path") == 1
    assert "--custom-loss-function-path" not in argv  # given in --flag=value form, so not added again
    assert {f.split()[0] for f in filled} == {"--custom-convert-samples-to-train-data-path",
                                              "--custom-megatron-init-path", "--input-key", "--use-rollout-logprobs"}


def test_opd_kl_coef_is_zeroed_with_use_opd_unless_given():
    argv, filled = fill_plugin_defaults(["--use-opd", "--opd-type", "megatron"], SelfDistillConfig())
    assert flag_value(argv, "--opd-kl-coef") == "0" and "--opd-kl-coef 0" in filled
    argv, filled = fill_plugin_defaults(["--use-opd", "--opd-kl-coef", "0.5"], SelfDistillConfig())
    assert argv.count("--opd-kl-coef") == 1 and flag_value(argv, "--opd-kl-coef") == "0.5"
    assert not any(f.startswith("--opd-kl-coef") for f in filled)


# ---------------------------------------------------------------------- --self-distill-* flags and YAML
@pytest.mark.parametrize(
    "typo, suggestion",
    [
        ("--self-distill-kl-scop", "--self-distill-kl-scope"),
        ("--self_distill_topk", "--self-distill-topk"),
        ("--self-distil-ema-rate=0.1", "--self-distill-ema-rate"),
        ("--slef-distill-teacher", "--self-distill-teacher"),
        ("--self-distill-importance-corection", "--self-distill-importance-correction"),
    ],
)
def test_misspelt_flag_is_named_with_the_closest_flag(typo, suggestion):
    with pytest.raises(ConfigError) as error:
        check_self_distill_flags(["--lr", "1e-6", typo, "x"])
    message = str(error.value)
    assert f"unknown flag {typo.split('=')[0]}" in message
    assert f"Did you mean {suggestion}?" in message


def test_unrelated_and_valid_flags_pass_the_flag_check():
    check_self_distill_flags(["--rollout-batch-size", "8", "--self-distill-topk=20", "--self-distill-teacher", "ema",
                              "--no-self-check", "--opd-kl-coef", "0", "--distill-notes", "x"])
    with pytest.raises(ConfigError, match="unknown flag --selfish"):
        check_self_distill_flags(["--selfish"])  # starts with --self: meant for the plugin, not a slime flag


def test_flag_values_are_validated_before_slime_runs():
    with pytest.raises(ConfigError, match=r"--self-distill-alpha: got 1.5, outside \[0, 1\]"):
        precheck_self_distill_settings(["--self-distill-divergence", "alpha_js", "--self-distill-alpha", "1.5"])
    with pytest.raises(ConfigError, match="--self-distill-kl-scope.*invalid choice: 'top_k'"):
        precheck_self_distill_settings(["--self-distill-kl-scope", "top_k"])
    with pytest.raises(ConfigError, match="--self-distill-topk.*invalid int value: '2.5'"):
        precheck_self_distill_settings(["--self-distill-topk", "2.5"])
    config = precheck_self_distill_settings(["--self-distill-kl-scope", "topk", "--self-distill-topk=20", "--lr", "1"])
    assert (config.kl_scope, config.topk) == ("topk", 20)


def write_yaml(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_settings_are_validated_naming_the_file(tmp_path):
    path = write_yaml(tmp_path, "self_distill_teacher: ema\nself_distill_ema_rate: 1e-2\n")
    with pytest.raises(ConfigError, match=r"YAML key self_distill_ema_rate\) must be float, got '1e-2'.*" + path):
        precheck_self_distill_settings(["--custom-config-path", path])
    path = write_yaml(tmp_path, "self_distill_kl_scop: topk\n", "typo.yaml")
    with pytest.raises(ConfigError, match="unknown key 'self_distill_kl_scop'.*did you mean 'self_distill_kl_scope'"):
        precheck_self_distill_settings([f"--custom-config-path={path}"])
    path = write_yaml(tmp_path, "- self_distill_topk: 3\n", "list.yaml")
    with pytest.raises(ConfigError, match="must be a mapping.*got a list"):
        precheck_self_distill_settings(["--custom-config-path", path])
    with pytest.raises(ConfigError, match="missing.yaml: cannot read it"):
        precheck_self_distill_settings(["--custom-config-path", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("key, meant", [
    ("self_distil_topk", "self_distill_topk"), ("self-distill-topk", "self_distill_topk"),
    ("topk", "self_distill_topk"), ("kl_scope", "self_distill_kl_scope"), ("Self_Distill_Teacher", "self_distill_teacher"),
])
def test_a_recipe_key_meant_as_a_setting_is_refused_naming_the_setting(tmp_path, key, meant):
    path = write_yaml(tmp_path, f"self_distill_kl_scope: topk\n{key}: 20\n")
    with pytest.raises(ConfigError) as error:
        plan_launch(["--custom-config-path", path])
    assert f"unknown key {key!r}" in str(error.value) and f"did you mean {meant!r}" in str(error.value)


def test_the_retired_storage_dtype_says_what_replaced_it_as_a_flag_and_as_a_recipe_key(tmp_path):
    gone = r"\(--self-distill-full-vocab-storage-dtype\) is gone: .* final hidden states .* remove the setting"
    with pytest.raises(ConfigError, match=gone):
        check_self_distill_flags(["--self-distill-full-vocab-storage-dtype", "float16"])
    path = write_yaml(tmp_path, "self_distill_kl_scope: full_vocab\nself_distill_full_vocab_storage_dtype: float32\n")
    with pytest.raises(ConfigError, match=f"--custom-config-path {path}: self_distill_full_vocab_storage_dtype {gone}"):
        plan_launch(["--custom-config-path", path])


def test_recipe_keys_that_are_slime_arguments_pass_and_others_are_refused_against_slimes_parser(tmp_path):
    path = write_yaml(tmp_path, "my_reward_threshold: 3\nself_distill_topk: 7\nself_distill_kl_scope: topk\n")
    plan = plan_launch(["--custom-config-path", path, "--ref-load", "/c"])  # without slime: only plugin-like keys
    assert (plan.config.kl_scope, plan.config.topk) == ("topk", 7)
    check_recipe_slime_keys({"lr": 1.0, "self_distill_topk": 7, "slime_args": []}, path, {"lr", "rollout_batch_size"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'my_reward_threshold'; 'rolout_batch_size' \(did you "
                                          r"mean 'rollout_batch_size'\?\)"):
        check_recipe_slime_keys({"my_reward_threshold": 3, "rolout_batch_size": 8}, path, {"lr", "rollout_batch_size"})


def test_recipe_slime_args_go_first_so_that_the_command_line_wins(tmp_path):
    path = write_yaml(tmp_path, "self_distill_teacher: live\nslime_args: [--lr, 5.0e-5, --rollout-batch-size, 32]\n")
    plan = plan_launch(["--custom-config-path", path, "--lr", "1e-6"])
    assert plan.slime_argv[:4] == ["--lr", "5e-05", "--rollout-batch-size", "32"]
    assert flag_value(plan.slime_argv[4:], "--lr") == "1e-6"  # later on the line: argparse keeps it
    assert plan.warnings == ["--lr 1e-6 on the command line replaces the recipe's --lr 5e-05"]
    # a switch the recipe also gives (run_self_distill_slime.sh adds --apply-chat-template) replaces nothing
    path = write_yaml(tmp_path, "self_distill_teacher: live\nslime_args: [--apply-chat-template, --lr, 1.0e-5]\n",
                      "switch.yaml")
    plan = plan_launch(["--custom-config-path", path, "--apply-chat-template", "--lr=1.0e-5", "--clip-grad", "1"])
    assert plan.warnings == ["--lr 1.0e-5 on the command line replaces the recipe's --lr 1e-05"]
    for bad in ("slime_args: --lr 5e-5\n", "slime_args: [5e-5, --lr]\n", "slime_args: [--lr, [1]]\n"):
        with pytest.raises(ConfigError, match="'slime_args' must"):
            plan_launch(["--custom-config-path", write_yaml(tmp_path, bad, "bad.yaml")])
    with pytest.raises(ConfigError, match="unknown flag --self-distill-topc"):
        plan_launch(["--custom-config-path", write_yaml(tmp_path, "slime_args: [--self-distill-topc, 3]\n", "t.yaml")])


def test_a_knob_without_effect_is_a_warning(tmp_path):
    plan = plan_launch(["--self-distill-teacher", "live", "--self-distill-kl-scope", "full_vocab",
                        "--self-distill-topk", "20", "--self-distill-ema-rate", "0.1"])
    assert plan.warnings == ["--self-distill-topk has no effect: --self-distill-kl-scope is full_vocab",
                             "--self-distill-ema-rate has no effect: --self-distill-teacher is live"]
    assert plan_launch(["--self-distill-teacher", "live", "--self-distill-kl-scope", "topk",
                        "--self-distill-topk", "20"]).warnings == []


def test_a_flag_wins_over_the_recipe_key_on_slimes_parsed_args(tmp_path):
    from slime_self_distill.train import apply_recipe_overrides

    path = write_yaml(tmp_path, "self_distill_kl_scope: topk\nself_distill_topk: 64\nself_distill_teacher: live\n")
    plan = plan_launch(["--custom-config-path", path, "--self-distill-topk", "20", "--self-distill-chunk-size", "256"])
    assert (plan.config.topk, plan.config.chunk_size) == (20, 256)
    assert plan.warnings == [f"--self-distill-topk 20 on the command line replaces 'self_distill_topk: 64' of "
                             f"--custom-config-path {path}"]
    assert plan.recipe_overrides == {"self_distill_topk": 20}
    # slime's parser applies the recipe after the flags (slime/utils/arguments.py): the launcher sets the flag back
    parsed = argparse.Namespace(self_distill_kl_scope="topk", self_distill_topk=64, self_distill_teacher="live",
                                self_distill_chunk_size=256)
    apply_recipe_overrides(parsed, plan)
    assert SelfDistillConfig.from_args(parsed) == plan.config
    same = plan_launch(["--custom-config-path", path, "--self-distill-topk", "64"])
    assert same.recipe_overrides == {} and same.warnings == []  # the same value both ways replaces nothing


def test_the_teacher_top_k_file_reaches_slime_as_an_absolute_path(tmp_path, monkeypatch):
    from slime_self_distill.train import apply_recipe_overrides

    monkeypatch.chdir(tmp_path)
    parsed = argparse.Namespace(self_distill_offline_topk_path="kd/teacher_topk.parquet")
    apply_recipe_overrides(parsed, plan_launch(["--ref-load", "/ckpt/initial"]))
    assert parsed.self_distill_offline_topk_path == str(tmp_path / "kd" / "teacher_topk.parquet")


def test_a_recipe_made_valid_by_a_flag_is_accepted():
    """sdft_topk.yaml skips 3 tokens, which a policy-loss combination refuses; a flag setting 0 makes it valid."""
    recipe = Path(__file__).resolve().parents[1] / "configs" / "sdft_topk.yaml"
    plan = plan_launch(["--custom-config-path", str(recipe), "--ref-load", "/c",
                        "--self-distill-rl-combination", "additive", "--self-distill-num-loss-tokens-to-skip", "0"])
    assert (plan.config.rl_combination, plan.config.num_loss_tokens_to_skip) == ("additive", 0)


# ---------------------------------------------------------------------- locating slime
ENTRY_SCRIPT = """\
from slime.utils.arguments import parse_args


def train(args):
    pass


if __name__ == '__main__':
    args = parse_args()
    train(args)
"""


def make_checkout(root: Path, scripts=("train.py", "train_async.py")) -> Path:
    (root / "slime").mkdir(parents=True)
    (root / "slime" / "__init__.py").write_text("")
    for script in scripts:
        (root / script).write_text(ENTRY_SCRIPT)
    return root


def test_slime_root_precedence(tmp_path):
    flag, env, package = (make_checkout(tmp_path / name) for name in ("flag", "env", "pkg"))
    environ = {"SLIME_ROOT": str(env)}
    assert find_slime_root(str(flag), environ, package / "slime") == flag.resolve()
    assert find_slime_root(None, environ, package / "slime") == env.resolve()
    assert find_slime_root(None, {}, package / "slime") == package.resolve()


def test_slime_root_errors_say_how_to_fix(tmp_path):
    with pytest.raises(LaunchError, match="slime is not importable and SLIME_ROOT is not set.*pip install -e"):
        find_slime_root(None, {}, None)
    with pytest.raises(LaunchError, match=r"--slime-root .*nowhere is not a directory"):
        find_slime_root(str(tmp_path / "nowhere"), {}, None)
    no_async = make_checkout(tmp_path / "old", scripts=("train.py",))
    with pytest.raises(LaunchError, match=r"\$SLIME_ROOT .*old is not a slime checkout: train_async.py missing"):
        find_slime_root(None, {"SLIME_ROOT": str(no_async)}, None, entry="train_async")
    site_packages = tmp_path / "site-packages" / "slime"
    site_packages.mkdir(parents=True)
    with pytest.raises(LaunchError, match="has no train.py \\(slime installed without its checkout\\?\\)"):
        find_slime_root(None, {}, site_packages)


def test_main_reports_a_bad_flag_before_importing_slime(tmp_path, capsys):
    checkout = make_checkout(tmp_path / "slime_checkout")
    (checkout / "slime" / "__init__.py").write_text("raise RuntimeError('the launcher imported slime too early')\n")
    rc = launcher.main(["--self-distill-kl-scop", "topk", "--lr", "1e-6"], environ={"SLIME_ROOT": str(checkout)})
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: unknown flag --self-distill-kl-scop" in err and "Did you mean --self-distill-kl-scope?" in err


def test_main_reports_a_missing_slime(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launcher, "importable_slime_package_dir", lambda: None)
    assert launcher.main(["--lr", "1", "--ref-load", "/ckpt/initial"], environ={}) == 2
    assert "slime is not importable and SLIME_ROOT is not set" in capsys.readouterr().err


def test_print_slime_root(tmp_path, capsys):
    checkout = make_checkout(tmp_path / "co")
    assert launcher.main(["--print-slime-root"], environ={"SLIME_ROOT": str(checkout)}) == 0
    assert capsys.readouterr().out.strip() == str(checkout.resolve())


def test_entry_script_with_a_different_main_block_is_refused(tmp_path):
    checkout = make_checkout(tmp_path / "co")
    launcher.check_entry_main_block(ENTRY_SCRIPT, checkout / "train.py")
    changed = ENTRY_SCRIPT.replace("    train(args)\n", "    setup(args)\n    train(args)\n")
    with pytest.raises(LaunchError, match=r"\['args = parse_args\(\)', 'setup\(args\)', 'train\(args\)'\]"):
        launcher.check_entry_main_block(changed, checkout / "train.py")
    with pytest.raises(LaunchError, match="has no `if __name__"):
        launcher.check_entry_main_block("def train(args):\n    pass\n", checkout / "train.py")


# ---------------------------------------------------------------------- validation of slime's parsed args
def parsed_args(**overrides) -> argparse.Namespace:
    """The attributes of slime's parsed ``args`` that the start-up checks read (values as slime would give them)."""
    values = dict(
        loss_type="custom_loss", compute_advantages_and_returns=True, use_opd=False, opd_type=None,
        opd_kl_coef=1.0, allgather_cp=False, debug_rollout_only=False,
        actor_num_nodes=1, actor_num_gpus_per_node=8, tensor_model_parallel_size=2,
        pipeline_model_parallel_size=1, context_parallel_size=1,
        rollout_batch_size=8, n_samples_per_prompt=4, rollout_max_response_len=1000,
        padded_vocab_size=1000, vocab_size=1000, hidden_size=4096, bf16=True,
        self_distill_kl_scope="topk", self_distill_teacher="live",
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def test_parsed_args_pass_and_return_the_config():
    config = validate_parsed_args(parsed_args(self_distill_topk=20))
    assert config == SelfDistillConfig(kl_scope="topk", topk=20, teacher="live")
    # the sampled-token scope keeps no store: the hidden size is not needed
    assert validate_parsed_args(parsed_args(self_distill_kl_scope="sampled_token", hidden_size=None)).kl_scope == \
        "sampled_token"


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(loss_type="policy_loss"), "--loss-type is 'policy_loss'"),
        (dict(use_opd=True, opd_type="megatron", opd_kl_coef=1.0, self_distill_teacher="frozen"),
         "--opd-kl-coef is 1.0"),
        (dict(self_distill_teacher="frozen"), "--self-distill-teacher frozen needs a checkpoint that stays the same"),
        (dict(self_distill_teacher="ema", use_distributed_optimizer=True, overlap_param_gather=True),
         "--self-distill-teacher ema updated every optimizer step would average stale parameters"),
        (dict(use_opd=True, opd_type="megatron", opd_kl_coef=0.0, self_distill_teacher="ema"),
         "--self-distill-teacher ema"),
        (dict(compute_advantages_and_returns=False), "--disable-compute-advantages-and-returns"),
        (dict(self_distill_kl_scope="full_vocab", rollout_max_response_len=None), "--rollout-max-response-len"),
        (dict(self_distill_kl_scope="full_vocab", hidden_size=None), "chosen and sized by the model's hidden size, "
                                                                    "which slime's args do not have: set --hidden-size"),
        (dict(actor_num_gpus_per_node=6, tensor_model_parallel_size=4), "not divisible by TP x PP x CP = 4"),
        (dict(self_distill_topk="20"), "--self-distill-topk"),  # a YAML string where an int belongs
        (dict(use_critic=True), "trains a critic"),
        (dict(use_rollout_logprobs=True, use_routing_replay=True), "--use-routing-replay replays in training"),
        (dict(use_rollout_logprobs=True, log_correct_samples=True), "--log-correct-samples reads the student"),
    ],
)
def test_parsed_args_errors_name_the_flag(overrides, flag):
    with pytest.raises(ConfigError) as error:
        validate_parsed_args(parsed_args(**overrides))
    assert flag in str(error.value)


def full_vocab_store_bytes(args) -> int:
    """Brute-force host-memory estimate of the full_vocab teacher store per node (README "Memory": the teacher's final
    hidden state, H bf16 values, per response row of the rank's share)."""
    world = args.actor_num_nodes * args.actor_num_gpus_per_node
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    dp = world // (tp * args.pipeline_model_parallel_size * cp)
    samples = args.rollout_batch_size * args.n_samples_per_prompt
    rows = math.ceil(math.ceil(args.rollout_max_response_len / cp) / tp)  # each TP rank keeps its block of rows
    per_rank = math.ceil(samples / dp) * rows * args.hidden_size * 2
    return per_rank * min(args.actor_num_gpus_per_node, dp * tp * cp)


def test_full_vocab_host_memory_is_checked_with_the_actor_data_parallel_size():
    args = parsed_args(self_distill_kl_scope="full_vocab")
    needed_gib = full_vocab_store_bytes(args) / GIB
    args.self_distill_host_memory_budget_gb = needed_gib * 1.01
    assert validate_parsed_args(args).kl_scope == "full_vocab"
    args.self_distill_host_memory_budget_gb = needed_gib * 0.99
    with pytest.raises(ConfigError, match="(?s)keep more in host memory.*teacher hidden-state store \\(full_vocab\\).*"
                                          "--self-distill-kl-scope topk --self-distill-topk-support teacher "
                                          "--self-distill-topk 64"):
        validate_parsed_args(args)
    args.debug_rollout_only = True  # no training actors: nothing is stored
    assert validate_parsed_args(args).kl_scope == "full_vocab"


COLLECT = dict(rollout_function_path="slime_self_distill.sd_zero_collect.generate_rollout",
               custom_generate_function_path="slime_self_distill.sd_zero_collect.generate_with_revision")


@pytest.mark.parametrize("overrides, match", [
    (dict(COLLECT), "name the SD-Zero collection, which needs --self-distill-revision-output"),
    (dict(custom_generate_function_path=COLLECT["custom_generate_function_path"]), "which needs"),
    (dict(self_distill_revision_output="/tmp/t.jsonl"), "needs --rollout-function-path slime_self_distill"),
    (dict(COLLECT, self_distill_revision_output="/tmp/t.jsonl", rollout_function_path="my.rollout"),
     "needs --rollout-function-path slime_self_distill.sd_zero_collect.generate_rollout"),
    (dict(COLLECT, self_distill_revision_output="/tmp/t.jsonl", group_rm=True), "--group-rm"),
    (dict(COLLECT, self_distill_revision_output="/tmp/t.jsonl", partial_rollout=True), "--partial-rollout"),
])
def test_an_sd_zero_collection_is_checked_at_start_up(overrides, match):
    from slime_self_distill.sd_zero_collect import SdZeroCollectError

    with pytest.raises(SdZeroCollectError, match=match):
        validate_parsed_args(parsed_args(debug_rollout_only=True, **overrides))
    config = validate_parsed_args(parsed_args(debug_rollout_only=True, self_distill_revision_output="/tmp/t.jsonl",
                                              **COLLECT))
    assert config.collects_revisions


def test_a_rollout_only_run_loads_no_teacher():
    """An SD-Zero collection (or any --debug-rollout-only run) has no trainer: a frozen teacher needs no --ref-load
    and the teacher-pass checks do not apply."""
    argv, filled = fill_plugin_defaults(["--debug-rollout-only"], SelfDistillConfig())
    assert "--use-opd" not in argv and not any("opd" in f for f in filled)
    with pytest.raises(ConfigError, match="--ref-load"):
        fill_plugin_defaults([], SelfDistillConfig())
    args = parsed_args(self_distill_kl_scope="full_vocab", rollout_max_response_len=None, debug_rollout_only=True)
    assert validate_parsed_args(args).kl_scope == "full_vocab"  # no teacher store to size


def test_without_a_budget_the_launcher_node_only_warns(monkeypatch, capsys):
    """The launcher's node need not be a training node: its memory decides nothing unless a budget is given."""
    from slime_self_distill.core import host_memory

    monkeypatch.setattr(host_memory, "available_host_memory_bytes", lambda: 1 << 20)
    args = parsed_args(self_distill_kl_scope="full_vocab")
    assert validate_parsed_args(args).kl_scope == "full_vocab"
    err = capsys.readouterr().err
    assert "warning: the training ranks would keep more in host memory" in err and "node that runs the launcher" in err


def test_flags_that_need_slimes_student_pass_keep_it():
    def filled(*argv):
        return "--use-rollout-logprobs" in fill_plugin_defaults(list(argv), LIVE)[0]

    assert filled("--use-rollout-routing-replay") and filled("--use-routing-replay", "--use-rollout-routing-replay")
    assert not filled("--use-routing-replay")  # the student pass records the routing training replays
    assert not filled("--log-correct-samples")  # slime's metric reads the recomputed log-probs


# ---------------------------------------------------------------------- against slime's real argument code
SLIME_ARGV = [
    "--actor-num-nodes", "1", "--actor-num-gpus-per-node", "8", "--colocate",
    "--hf-checkpoint", "/models/Qwen3-4B", "--ref-load", "/models/Qwen3-4B_torch_dist",
    "--prompt-data", "/data/train.jsonl", "--input-key", "prompt", "--apply-chat-template", "--rm-type", "math",
    "--num-rollout", "10", "--rollout-batch-size", "8", "--n-samples-per-prompt", "4",
    "--rollout-max-response-len", "1000", "--global-batch-size", "32",
    "--self-distill-kl-scope", "topk", "--self-distill-topk", "20", "--self-distill-teacher", "ema",
]


def slime_parser():
    """slime's own argument-adding code with the launcher's hook, on a parser configured like Megatron's.

    slime's ``parse_args`` cannot run on CPU: it calls ``megatron.training.arguments.parse_args`` (Megatron-LM, not
    on PyPI), which builds an ``ArgumentParser(allow_abbrev=False)``, calls slime's provider on it, and parses with
    ``parse_known_args`` (``ignore_unknown_args=True``). This reproduces exactly that part around slime's real code.
    """
    from tests.megatron_standins import install_standins

    install_standins()
    from slime.utils.arguments import get_slime_extra_args_provider

    parser = argparse.ArgumentParser(allow_abbrev=False)
    return get_slime_extra_args_provider(launcher.add_custom_arguments)(parser)


@needs_slime
def test_plugin_flags_and_defaults_parse_with_slimes_real_arguments():
    argv, _ = fill_plugin_defaults(SLIME_ARGV + ["--use-opd", "--opd-type", "megatron"], SelfDistillConfig(teacher="ema"))
    args, unknown = slime_parser().parse_known_args(argv)
    assert unknown == []  # every filled-in plugin flag is one of slime's own
    assert (args.self_distill_kl_scope, args.self_distill_topk, args.self_distill_teacher) == ("topk", 20, "ema")
    assert args.self_distill_chunk_size is None  # not given: the config's own default applies
    for flag, value in PLUGIN_DEFAULTS:
        assert getattr(args, flag[2:].replace("-", "_")) == value
    assert args.opd_kl_coef == 0.0
    assert "90%% of the memory" not in slime_parser().format_help()  # help texts survive argparse's %-formatting
    assert "90% of the memory" in slime_parser().format_help()
    # Megatron adds the parallel sizes; everything else the checks read comes from slime's parser.
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size = 2, 1, 1
    args.hidden_size = 4096
    args.opd_type = "megatron"
    with pytest.raises(ConfigError, match="--self-distill-teacher ema builds the teacher from the student"):
        validate_parsed_args(args)
    args.use_opd = False
    assert validate_parsed_args(args) == SelfDistillConfig(kl_scope="topk", topk=20, teacher="ema")


@needs_slime
def test_misspelt_flag_is_silently_ignored_by_slimes_parser_but_refused_by_the_launcher():
    argv, _ = fill_plugin_defaults(SLIME_ARGV + ["--self-distill-ema-rat", "0.5"], SelfDistillConfig(teacher="ema"))
    args, unknown = slime_parser().parse_known_args(argv)
    assert unknown == ["--self-distill-ema-rat", "0.5"]  # what ignore_unknown_args=True would drop
    assert args.self_distill_ema_rate is None
    with pytest.raises(ConfigError, match="Did you mean --self-distill-ema-rate?"):
        check_self_distill_flags(argv)


@needs_slime
def test_slime_checkout_is_found_and_its_entry_scripts_load_without_running():
    root = find_slime_root(None, {}, launcher.importable_slime_package_dir())
    assert (root / "train.py").is_file()
    from tests.megatron_standins import install_standins

    install_standins()
    launcher.import_slime_from(root)
    for entry in ("train", "train_async"):
        module = launcher.load_entry_module(root, entry)
        assert callable(module.train) and module.__name__ == f"slime_entry_{entry}"


# ---------------------------------------------------------------------- the cluster script
def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_passes_shellcheck():
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def script_env(tmp_path, **overrides):
    """A complete environment for the script, with `ray` and the Python launcher replaced by recorders."""
    checkout = make_checkout(tmp_path / "slime")
    model = tmp_path / "model.sh"
    model.write_text("MODEL_ARGS=(--num-layers 2 --rotary-base \"${MODEL_ARGS_ROTARY_BASE:-10000}\")\n")
    log = tmp_path / "calls.jsonl"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = (
        f"#!{sys.executable}\nimport json, subprocess, sys\n"
        "if sys.argv[1:2] == ['-']:  # the script's inline JSON helper: run it for real\n"
        f"    sys.exit(subprocess.run([{sys.executable!r}, *sys.argv[1:]]).returncode)\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n"
    )
    for name in ("ray", "python-recorder"):
        (bin_dir / name).write_text(recorder)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(bin_dir / "python-recorder"),
        "SLIME_ROOT": str(checkout), "MODEL_ARGS_SCRIPT": str(model), "HF_CHECKPOINT": "/models/hf",
        "REF_LOAD": "/models/dist", "SAVE": "/ckpt", "PROMPT_DATA": "/data/train.jsonl", "RM_TYPE": "math",
        "NUM_GPUS": "4", "TP": "2",
    }
    env.update(overrides)
    return env, log


def run_script(env, *args, cwd=None):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, cwd=cwd, timeout=60)


def test_script_checks_then_starts_ray_then_submits_the_launcher(tmp_path):
    env, log = script_env(tmp_path)
    result = run_script(env, "--lr", "2e-6", cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    precheck, ray_start, submit = calls
    assert precheck[1:4] == ["-m", "slime_self_distill.train", "--check-only"]
    assert ray_start[1:3] == ["start", "--head"] and ray_start[ray_start.index("--num-gpus") + 1] == "4"
    assert submit[1:3] == ["job", "submit"]
    command = submit[submit.index("--") + 1:]
    assert command[1:3] == ["-m", "slime_self_distill.train"]
    assert command[3:] == precheck[4:]  # the job runs exactly the arguments that were checked
    assert flag_value(command, "--custom-config-path") == str(PROJECT_ROOT / "configs" / "sdft.yaml")
    assert flag_value(command, "--slime-root") == env["SLIME_ROOT"]
    assert flag_value(command, "--rotary-base") == "10000"
    assert "--sequence-parallel" in command and "--colocate" in command
    assert command[-2:] == ["--lr", "2e-6"]  # user arguments come last and win
    runtime_env_flag = next(a for a in submit if a.startswith("--runtime-env-json="))
    runtime_env = json.loads(runtime_env_flag.split("=", 1)[1])
    assert str(PROJECT_ROOT) in runtime_env["env_vars"]["PYTHONPATH"].split(":")


def test_script_runs_offline_distillation_without_sglang_rewards_or_prompt_data(tmp_path):
    env, log = script_env(tmp_path, OFFLINE_TOPK="kd/teacher_topk.parquet", SKIP_PRECHECK="1")
    del env["PROMPT_DATA"], env["RM_TYPE"]
    result = run_script(env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    command = [json.loads(line) for line in log.read_text().splitlines()][-1]
    assert flag_value(command, "--self-distill-offline-topk-path") == str(tmp_path / "kd" / "teacher_topk.parquet")
    assert flag_value(command, "--custom-config-path") == str(PROJECT_ROOT / "configs" / "offline_topk_kd.yaml")
    for online in ("--prompt-data", "--input-key", "--rm-type", "--apply-chat-template", "--colocate",
                   "--sglang-mem-fraction-static", "--rollout-num-gpus-per-engine"):
        assert online not in command  # the launcher fills --prompt-data and --input-key from the top-K file


def test_script_relative_config_becomes_absolute(tmp_path):
    env, log = script_env(tmp_path, SELF_DISTILL_CONFIG="configs/opsd.yaml", SKIP_PRECHECK="1")
    assert run_script(env, cwd=PROJECT_ROOT).returncode == 0
    submit = [json.loads(line) for line in log.read_text().splitlines()][-1]
    assert flag_value(submit, "--custom-config-path") == str(PROJECT_ROOT / "configs" / "opsd.yaml")


@pytest.mark.parametrize("missing", ["HF_CHECKPOINT", "REF_LOAD", "SAVE", "PROMPT_DATA", "RM_TYPE"])
def test_script_names_a_missing_setting_before_starting_anything(tmp_path, missing):
    env, log = script_env(tmp_path)
    del env[missing]
    result = run_script(env, cwd=tmp_path)
    assert result.returncode != 0
    assert f"{missing}: set {missing}" in result.stderr
    assert not log.exists()  # neither the launcher nor ray ran


# ---------------------------------------------------------------------- without slime: --help and --check-only
def prompt_file(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return str(path)


GOOD_ROW = {"prompt": "2+2?", "label": "4", "metadata": {"teacher_prompt": "2+2? (It is 4.)"}}


def check_only(monkeypatch, *argv):
    monkeypatch.setattr(launcher, "importable_slime_package_dir", lambda: None)
    return launcher.main(["--check-only", "--ref-load", "/ckpt/initial", *map(str, argv)], environ={})


def test_help_works_without_slime(monkeypatch, capsys):
    monkeypatch.setattr(launcher, "importable_slime_package_dir", lambda: None)
    assert launcher.main(["--help"], environ={}) == 0
    out = capsys.readouterr().out
    assert "--check-only" in out and "--self-distill-kl-scope" in out and "slime_args" in out


def test_check_only_without_slime_checks_the_settings_and_every_row(tmp_path, monkeypatch, capsys):
    data = prompt_file(tmp_path, [GOOD_ROW] * 3)
    assert check_only(monkeypatch, "--prompt-data", data, "--label-key", "label") == 0
    captured = capsys.readouterr()
    assert f"--prompt-data {data}: 3 rows OK" in captured.out
    assert "slime's own arguments were not checked" in captured.err
    assert check_only(monkeypatch, "--self-distill-kl-scop", "topk") == 2  # the settings are still checked
    assert "Did you mean --self-distill-kl-scope?" in capsys.readouterr().err


@pytest.mark.parametrize("bad_row, message", [
    ({"prompt": "2+2?", "label": "4", "metadata": {}}, "no teacher prompt in metadata['teacher_prompt']"),
    ({"prompt": "2+2?", "metadata": {"teacher_prompt": "t"}}, "--label-key 'label' is missing"),
    ({"question": "2+2?", "label": "4", "metadata": {"teacher_prompt": "t"}},
     "--input-key 'prompt' is missing, expected a non-empty string or chat messages (the row's columns: "
     "['label', 'metadata', 'question'])"),
    (b"{not json", "not valid JSON"),
    (b"\xef\xbb\xbf" + json.dumps(GOOD_ROW).encode(), "not valid JSON"),  # slime would skip a BOM'd first line
    ({"prompt": [{"role": "user", "content": "hi"}], "label": "4", "metadata": {"teacher_prompt": "t"}},
     "holds chat messages, which slime renders only with --apply-chat-template"),
])
def test_check_only_names_each_row_that_would_fail(tmp_path, monkeypatch, capsys, bad_row, message):
    data = prompt_file(tmp_path, [bad_row, GOOD_ROW, GOOD_ROW])
    assert check_only(monkeypatch, "--prompt-data", data, "--label-key", "label") == 2
    err = capsys.readouterr().err
    assert f"--prompt-data {data}: 1 of 3 rows would fail" in err and "row 1: " in err and message in err


def test_check_only_honours_slimes_row_slice_and_excluded_teachers(tmp_path, monkeypatch, capsys):
    rows = [{"prompt": "q", "metadata": {}}, GOOD_ROW, GOOD_ROW, {"prompt": "q", "metadata": {}}]
    data = prompt_file(tmp_path, rows)
    assert check_only(monkeypatch, "--prompt-data", f"{data}@[1:3]") == 0  # rows 2 and 3 only
    assert "2 rows OK" in capsys.readouterr().out
    assert check_only(monkeypatch, "--prompt-data", data, "--self-distill-missing-teacher", "exclude") == 0
    assert "4 rows OK, 2 without a teacher prompt (excluded)" in capsys.readouterr().out
    # excluding every row would distill nothing
    assert check_only(monkeypatch, "--prompt-data", prompt_file(tmp_path, rows[:1] * 3),
                      "--self-distill-missing-teacher", "exclude") == 2
    assert "none of its 3 rows has a teacher prompt" in capsys.readouterr().err


def test_check_only_of_sdpo_needs_no_teacher_prompt_in_the_rows(tmp_path, monkeypatch, capsys):
    rows = [{"prompt": "2+2?", "label": "4"}, {"prompt": "3+3?", "label": "6", "metadata": {}}]
    data = prompt_file(tmp_path, rows)
    assert check_only(monkeypatch, "--prompt-data", data, "--label-key", "label") == 2  # static: a teacher prompt
    capsys.readouterr()
    assert check_only(monkeypatch, "--prompt-data", data, "--label-key", "label",
                      "--self-distill-teacher-context", "sdpo") == 0
    out = capsys.readouterr().out
    assert "2 rows OK; teacher prompts are built from each rollout group after rewards" in out
    # the reprompt replaces a last user message of text
    prefilled = [{"prompt": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Let me"}],
                  "label": "4"}]
    assert check_only(monkeypatch, "--prompt-data", prompt_file(tmp_path, prefilled), "--label-key", "label",
                      "--apply-chat-template", "--self-distill-teacher-context", "sdpo") == 2
    assert "row 1: --input-key 'prompt': its last message has role 'assistant'" in capsys.readouterr().err
    # the label the reward reads is still required
    assert check_only(monkeypatch, "--prompt-data", prompt_file(tmp_path, [{"prompt": "q"}]), "--label-key", "label",
                      "--self-distill-teacher-context", "sdpo") == 2


def test_check_only_refuses_a_file_slime_cannot_read(tmp_path, monkeypatch, capsys):
    assert check_only(monkeypatch, "--prompt-data", prompt_file(tmp_path, [b"\xff\xfe{}"])) == 2
    assert "is not UTF-8: line 1, byte offset 0 holds b'\\xff'" in capsys.readouterr().err
    assert check_only(monkeypatch, "--prompt-data", tmp_path / "missing.jsonl") == 2
    assert "does not exist" in capsys.readouterr().err
    truncated = tmp_path / "rows.parquet"
    truncated.write_bytes(b"PAR1 not a whole file")
    assert check_only(monkeypatch, "--prompt-data", truncated) == 2
    assert f"--prompt-data {truncated} is not a readable Parquet file" in capsys.readouterr().err


def test_check_only_reports_a_first_line_behind_a_byte_order_mark_as_slime_reads_it(tmp_path, monkeypatch, capsys):
    # slime's reader fails to parse that line and skips it with only a printed message
    data = prompt_file(tmp_path, [b"\xef\xbb\xbf" + json.dumps(GOOD_ROW).encode(), GOOD_ROW])
    assert check_only(monkeypatch, "--prompt-data", data) == 2
    err = capsys.readouterr().err
    assert "1 of 2 rows would fail" in err and "row 1: not valid JSON" in err
    assert check_only(monkeypatch, "--prompt-data", prompt_file(tmp_path, [GOOD_ROW], "rows.json")) == 2
    assert "slime reads only .jsonl and .parquet" in capsys.readouterr().err


@pytest.mark.parametrize("arguments_module", [
    "import megatron.training.nowhere\n",  # at import
    "def parse_args(add_custom_arguments=None):\n    import megatron.training.nowhere\n",  # when parse_args runs
])
def test_check_only_where_slimes_parser_cannot_be_imported(tmp_path, monkeypatch, capsys, arguments_module):
    """A CPU machine with a slime checkout but without Megatron-LM: the plugin's checks still run."""
    checkout = make_checkout(tmp_path / "slime_checkout")
    utils = checkout / "slime" / "utils"
    utils.mkdir()
    (utils / "__init__.py").write_text("")
    (utils / "arguments.py").write_text(arguments_module)
    monkeypatch.setattr(launcher, "import_slime_from", lambda root: None)
    monkeypatch.syspath_prepend(str(checkout))
    real_slime = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "slime"}
    for name in real_slime:
        del sys.modules[name]
    try:
        argv = ["--check-only", "--ref-load", "/c", "--prompt-data", prompt_file(tmp_path, [GOOD_ROW])]
        assert launcher.main(argv, environ={"SLIME_ROOT": str(checkout)}) == 0
        captured = capsys.readouterr()
        assert "1 rows OK" in captured.out
        assert "slime's argument parser cannot be imported" in captured.err and "Megatron-LM" in captured.err
        assert launcher.main(argv[1:], environ={"SLIME_ROOT": str(checkout)}) == 2  # training needs the parser
    finally:  # the stand-in checkout's modules go, the real slime comes back
        for name in [name for name in sys.modules if name.split(".")[0] == "slime"]:
            del sys.modules[name]
        sys.modules.update(real_slime)


def test_check_only_renders_and_measures_the_teacher_prompts_with_a_local_tokenizer(tmp_path, monkeypatch, capsys):
    from tests.tokenizer_factory import make_tokenizer, save_tokenizer

    hf = save_tokenizer(tmp_path / "hf")
    long_row = {"prompt": "2+2?", "metadata": {"teacher_prompt": "2+2? " + "The answer is four. " * 20}}
    data = prompt_file(tmp_path, [GOOD_ROW, long_row])
    expected = len(make_tokenizer().encode(make_tokenizer().apply_chat_template(
        [{"role": "user", "content": long_row["metadata"]["teacher_prompt"]}], tokenize=False,
        add_generation_prompt=True), add_special_tokens=False))
    common = ["--prompt-data", data, "--hf-checkpoint", hf, "--apply-chat-template"]
    assert check_only(monkeypatch, *common) == 0
    assert f"teacher prompts rendered and encoded: up to {expected} tokens" in capsys.readouterr().out
    assert check_only(monkeypatch, *common, "--self-distill-max-teacher-prompt-len", str(expected - 1)) == 2
    err = capsys.readouterr().err
    assert f"row 2: the teacher prompt has {expected} tokens, over --self-distill-max-teacher-prompt-len=" in err
    # a policy that handles long prompts: nothing to refuse
    assert check_only(monkeypatch, *common, "--self-distill-max-teacher-prompt-len", str(expected - 1),
                      "--self-distill-teacher-overflow", "drop") == 0
    assert check_only(monkeypatch, "--prompt-data", data) == 0
    assert "teacher prompts not rendered (no local --hf-checkpoint directory)" in capsys.readouterr().out
    assert check_only(monkeypatch, *common, "--apply-chat-template-kwargs", "{enable_thinking: false}") == 2
    assert "--apply-chat-template-kwargs '{enable_thinking: false}' is not JSON" in capsys.readouterr().err


def test_check_only_reports_the_settings_that_differ_and_refuses_a_wrong_slime_checkout(tmp_path, monkeypatch,
                                                                                        capsys):
    assert check_only(monkeypatch, "--self-distill-kl-scope", "topk", "--self-distill-topk", "20") == 0
    out = capsys.readouterr().out
    assert "settings OK (kl_scope=topk, topk=20); no --prompt-data: no data checked" in out
    assert check_only(monkeypatch, "--slime-root", tmp_path / "nowhere") == 2  # named by hand: it must be right
    assert "nowhere is not a directory" in capsys.readouterr().err
    assert SelfDistillConfig().describe() == "all defaults"


def test_script_makes_every_path_the_job_uses_absolute(tmp_path):
    env, log = script_env(tmp_path, PROMPT_DATA="data/train.jsonl@[0:100]", SAVE="ckpt", SKIP_PRECHECK="1")
    assert run_script(env, cwd=tmp_path).returncode == 0
    submit = [json.loads(line) for line in log.read_text().splitlines()][-1]
    assert flag_value(submit, "--prompt-data") == f"{tmp_path}/data/train.jsonl@[0:100]"
    assert flag_value(submit, "--save") == flag_value(submit, "--load") == f"{tmp_path}/ckpt"
    assert flag_value(submit, "--hf-checkpoint") == "/models/hf"  # absolute already: unchanged
