"""The shipped recipes in configs/*.yaml: loadable, only known keys, valid, their slime arguments parse with slime's
own argument code, and they carry their method's official settings (test_recipes.py checks their loss)."""

import argparse
import dataclasses
import functools
import json
import os
from pathlib import Path

import pytest
import yaml

from slime_self_distill.config import ARG_PREFIX, SETTING_KEYS, SelfDistillConfig
from slime_self_distill.train import RECIPE_SLIME_ARGS_KEY, flag_value, plan_launch
from tests.slime_support import needs_slime

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RECIPES = ("sdft.yaml", "sdft_topk.yaml", "opsd.yaml", "sampled_token_reverse_kl.yaml", "sdpo.yaml", "sd_zero.yaml",
           "offline_topk_kd.yaml", "local_kv_demo.yaml")
OFFLINE_RECIPE = "offline_topk_kd.yaml"  # needs a teacher top-K file: launched with a small one
# Megatron-LM's own flags (megatron.training.arguments, not installable here), which the recipes set for the
# optimizer; slime's argument code knows every other flag they use.
MEGATRON_FLAGS = {"--lr", "--lr-decay-style", "--lr-warmup-fraction", "--lr-warmup-iters", "--lr-warmup-init", "--min-lr",
                  "--weight-decay", "--adam-beta1", "--adam-beta2", "--adam-eps", "--clip-grad",
                  "--calculate-per-token-loss"}
# Flags slime's parse_args reads from sys.argv before its parser exists (_pre_parse_mode), not through the parser.
SLIME_PRE_PARSED_FLAGS = {"--train-backend", "--debug-rollout-only", "--debug-train-only", "--load-debug-rollout-data"}


def load(name: str) -> dict:
    with open(CONFIG_DIR / name) as f:
        return yaml.safe_load(f)


@functools.lru_cache(maxsize=None)
def small_topk_file() -> str:
    """A teacher top-K file of two rows (K 2) and its data file, in a directory removed at exit."""
    import atexit
    import shutil
    import tempfile

    import numpy as np

    from slime_self_distill.offline.topk_file import TopKFileInfo, TopKWriter

    directory = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, directory, True)
    with open(os.path.join(directory, "data.jsonl"), "w") as f:
        for idx in range(2):
            f.write(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                "metadata": {"self_distill_topk": {"idx": idx, "digest": "0", "trained_tokens": 1,
                                                                   "extraction": "e"}}})
                    + "\n")
    info = TopKFileInfo(k=2, values="logprobs", temperature=1.0, loss_mask_type="qwen3", messages_key="messages",
                        tool_key="tools", metadata_key="metadata", teacher="t", tokenizer="t",
                        chat_template_sha256="", vocab_size=8, rows=2, trained_tokens=2, data_file="data.jsonl",
                        data_sha256="", extraction="e")
    path = os.path.join(directory, "teacher_topk.parquet")
    with TopKWriter(path, info.to_metadata()) as writer:
        for idx in range(2):
            writer.add(idx, np.array([[1, 2]], dtype=np.int32), np.log(np.array([[0.5, 0.25]], dtype=np.float32)))
    return path


def plan(name: str):
    offline = ["--self-distill-offline-topk-path", small_topk_file()] if name == OFFLINE_RECIPE else []
    return plan_launch(["--custom-config-path", str(CONFIG_DIR / name), "--ref-load", "/ckpt/initial", *offline])


def test_every_shipped_config_is_tested():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_keys_are_settings_and_validate(name):
    data = load(name)
    assert set(data) <= SETTING_KEYS | {RECIPE_SLIME_ARGS_KEY}, sorted(set(data) - SETTING_KEYS)
    settings = {k: v for k, v in data.items() if k in SETTING_KEYS}
    config = SelfDistillConfig.from_args(argparse.Namespace(**settings))
    for key, value in settings.items():
        assert getattr(config, key[len(ARG_PREFIX):]) == value, key  # nothing coerced or dropped
    launched = plan(name)
    if name == OFFLINE_RECIPE:
        config = dataclasses.replace(config, offline_topk_path=small_topk_file())
    assert launched.config == config and launched.warnings == []  # no knob without effect


@needs_slime
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_slime_arguments_are_slimes_own_flags(name):
    from tests.test_train import slime_parser

    slime_argv = plan(name).slime_argv
    _, unknown = slime_parser().parse_known_args(slime_argv)
    unknown_flags = {token for token in unknown if token.startswith("--")} - SLIME_PRE_PARSED_FLAGS
    assert unknown_flags <= MEGATRON_FLAGS, unknown_flags - MEGATRON_FLAGS
    for flag in unknown_flags - {"--calculate-per-token-loss", "--lr-decay-style"}:
        float(flag_value(slime_argv, flag))  # Megatron's numeric flags get numbers


def slime_settings(name):
    """The recipe's slime flags that take a value, with their (last) value."""
    argv = plan(name).slime_argv
    return {token: flag_value(argv, token) for i, token in enumerate(argv)
            if token.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--")}


# The official settings, per recipe (sources: the recipe files' headers and tests/test_recipes.py).
OFFICIAL = {
    # idanshen/Self-Distillation main.py and README commands
    "sdft.yaml": ({"kl_scope": "full_vocab", "divergence": "forward_kl", "teacher": "ema", "ema_rate": 0.01,
                   "ema_update_interval": "step", "num_loss_tokens_to_skip": 3, "importance_correction": "sequence",
                   "importance_cap": 2.0, "top_entropy_quantile": 1.0},
                  {"--rollout-batch-size": "32", "--n-samples-per-prompt": "1", "--global-batch-size": "32",
                   "--num-epoch": "2", "--rollout-temperature": "1.0", "--rollout-max-response-len": "1024",
                   "--lr": "5e-05", "--lr-decay-style": "cosine", "--lr-warmup-fraction": "0.1", "--min-lr": "0.0",
                   "--weight-decay": "0.0", "--adam-beta1": "0.9", "--adam-beta2": "0.999", "--adam-eps": "1e-08",
                   "--clip-grad": "1.0"}),
    # siyan-zhao/OPSD (2026-03-18 code) scripts/run_opsd_4b.sh, opsd_train.py
    "opsd.yaml": ({"kl_scope": "full_vocab", "divergence": "forward_kl", "vocab_term_clip": 0.05, "teacher": "frozen",
                   "teacher_chat_template_kwargs": {"enable_thinking": True}, "num_loss_tokens_to_skip": 0,
                   "importance_correction": "off", "top_entropy_quantile": 1.0},
                  {"--rollout-batch-size": "32", "--n-samples-per-prompt": "1", "--global-batch-size": "32",
                   "--rollout-temperature": "1.1", "--rollout-top-p": "0.95", "--rollout-top-k": "20",
                   "--rollout-max-response-len": "1024", "--apply-chat-template-kwargs": '{"enable_thinking": false}',
                   "--lr": "5e-06", "--lr-decay-style": "linear", "--clip-grad": "0.1", "--weight-decay": "0.0",
                   "--adam-beta2": "0.999"}),
    # lasgroup/SDPO experiments/generalization/run_sdpo_all.sh, verl/trainer/config/{sdpo,user}.yaml, actor.yaml
    "sampled_token_reverse_kl.yaml": ({"kl_scope": "sampled_token", "divergence": "reverse_kl", "teacher": "ema",
                                       "ema_rate": 0.05, "ema_update_interval": "rollout",
                                       "importance_correction": "token", "importance_cap": 2.0,
                                       "num_loss_tokens_to_skip": 0, "top_entropy_quantile": 1.0},
                                      {"--rollout-batch-size": "32", "--n-samples-per-prompt": "8",
                                       "--global-batch-size": "256", "--rollout-temperature": "1.0",
                                       "--rollout-max-prompt-len": "2048", "--rollout-max-response-len": "8192",
                                       "--lr": "1e-05", "--lr-warmup-iters": "10", "--lr-decay-style": "constant",
                                       "--weight-decay": "0.01", "--clip-grad": "1.0"}),
    # the same sources, with the reprompt of ray_trainer.py and the top-K loss of actor.yaml / run_sdpo_all.sh
    "sdpo.yaml": ({"teacher_context": "sdpo", "success_threshold": 0.5, "dont_reprompt_on_self_success": True,
                   "remove_thinking": True, "feedback": "without_solution", "max_teacher_prompt_len": 10240,
                   "kl_scope": "topk", "topk": 100, "divergence": "alpha_js", "alpha": 0.5, "rl_combination": "none",
                   "teacher": "ema", "ema_rate": 0.05, "ema_update_interval": "rollout",
                   "importance_correction": "token", "importance_cap": 2.0, "num_loss_tokens_to_skip": 0,
                   "top_entropy_quantile": 1.0},
                  {"--rollout-batch-size": "32", "--n-samples-per-prompt": "8", "--global-batch-size": "256",
                   "--rollout-temperature": "1.0", "--rollout-max-prompt-len": "2048",
                   "--rollout-max-response-len": "8192", "--apply-chat-template-kwargs": '{"enable_thinking": false}',
                   "--advantage-estimator": "grpo", "--lr": "1e-05", "--lr-warmup-iters": "10",
                   "--lr-decay-style": "constant", "--weight-decay": "0.01", "--clip-grad": "1.0"}),
    # princeton-pli/Self-Distillation-Zero scripts/distill.sh, examples/configs/distillation_math.yaml, distillation.py
    "sd_zero.yaml": ({"teacher_context": "self_revision", "success_threshold": 1.0, "teacher": "frozen",
                      "revision_phrase_correct": "Let me rephrase the above solution.",
                      "revision_phrase_wrong": "Wait, this response is wrong. Let me correct it.",
                      "kl_scope": "topk", "topk": 64, "topk_tail": "renormalize", "divergence": "mixed_kl",
                      "alpha": 0.5, "importance_correction": "off", "num_loss_tokens_to_skip": 0,
                      "top_entropy_quantile": 1.0},
                     {"--rollout-batch-size": "128", "--n-samples-per-prompt": "1", "--global-batch-size": "128",
                      "--num-rollout": "1000", "--rollout-temperature": "1.0", "--rollout-top-p": "1.0",
                      "--rollout-max-response-len": "8192", "--lr": "5e-06", "--lr-warmup-init": "5e-07",
                      "--lr-warmup-iters": "20", "--lr-decay-style": "constant", "--weight-decay": "0.01",
                      "--adam-beta1": "0.9", "--adam-beta2": "0.999", "--clip-grad": "1.0"}),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_recipe_has_the_official_values(name):
    settings, slime_flags = OFFICIAL[name]
    config = plan(name).config
    assert {k: getattr(config, k) for k in settings} == settings
    assert {flag: slime_settings(name).get(flag) for flag in slime_flags} == slime_flags


def test_the_offline_recipe_runs_slimes_sft_loop_on_the_extracted_data():
    argv = plan(OFFLINE_RECIPE).slime_argv
    assert flag_value(argv, "--rollout-function-path") == "slime.rollout.sft_rollout.generate_rollout"
    assert flag_value(argv, "--prompt-data") == os.path.join(os.path.dirname(small_topk_file()), "data.jsonl")
    assert flag_value(argv, "--loss-mask-type") == "qwen3"  # the file's, not slime's default
    assert flag_value(argv, "--input-key") == "messages"
    for switch in ("--debug-train-only", "--disable-compute-advantages-and-returns", "--calculate-per-token-loss"):
        assert switch in argv
    for online in ("--use-rollout-logprobs", "--use-opd", "--data-source-path"):
        assert online not in argv
    given = plan_launch(["--custom-config-path", str(CONFIG_DIR / OFFLINE_RECIPE), "--self-distill-offline-topk-path",
                         small_topk_file(), "--prompt-data", "/data/subset.jsonl", "--loss-mask-type", "qwen"])
    assert flag_value(given.slime_argv, "--prompt-data") == "/data/subset.jsonl"
    assert flag_value(given.slime_argv, "--loss-mask-type") == "qwen"


def test_the_offline_recipe_without_its_file_names_the_flag():
    from slime_self_distill.config import ConfigError

    recipe = ["--custom-config-path", str(CONFIG_DIR / OFFLINE_RECIPE)]
    directory = os.path.dirname(small_topk_file())
    with pytest.raises(ConfigError, match="is a directory; give the file inside it"):
        plan_launch([*recipe, "--self-distill-offline-topk-path", directory])
    with pytest.raises(ConfigError, match="not its data file"):
        plan_launch([*recipe, "--self-distill-offline-topk-path", os.path.join(directory, "data.jsonl")])
    with pytest.raises(ConfigError, match="holds K=2 per token; use at most 2"):  # at launch, not at the 1st rollout
        plan_launch([*recipe, "--self-distill-offline-topk-path", small_topk_file(), "--self-distill-topk", "3"])

    with pytest.raises(ConfigError, match="--self-distill-offline-topk-path"):
        plan_launch(["--custom-config-path", str(CONFIG_DIR / OFFLINE_RECIPE)])
    with pytest.raises(ConfigError, match="does not exist.*extract_teacher_topk"):
        plan_launch(["--custom-config-path", str(CONFIG_DIR / OFFLINE_RECIPE), "--self-distill-offline-topk-path",
                     "/nowhere/teacher_topk.parquet"])


def test_the_offline_recipe_starts_from_slimes_sft_example():
    # slime's scripts/run-qwen3-4B-base-sft.sh
    assert {flag: slime_settings(OFFLINE_RECIPE).get(flag) for flag in (
        "--rollout-batch-size", "--global-batch-size", "--num-epoch", "--lr", "--lr-decay-style", "--min-lr",
        "--lr-warmup-fraction", "--weight-decay", "--adam-beta1", "--adam-beta2")} == {
        "--rollout-batch-size": "128", "--global-batch-size": "128", "--num-epoch": "3", "--lr": "1e-05",
        "--lr-decay-style": "cosine", "--min-lr": "1e-06", "--lr-warmup-fraction": "0.1", "--weight-decay": "0.1",
        "--adam-beta1": "0.9", "--adam-beta2": "0.95"}


def test_opsd_and_sd_zero_are_per_token_means_and_the_others_per_sample():
    for name in ("opsd.yaml", "sd_zero.yaml"):
        assert "--calculate-per-token-loss" in plan(name).slime_argv
    for name in ("sdft.yaml", "sdft_topk.yaml", "sampled_token_reverse_kl.yaml", "sdpo.yaml"):
        assert "--calculate-per-token-loss" not in plan(name).slime_argv


def test_sdpo_uses_the_official_templates_and_the_chat_template():
    config = plan("sdpo.yaml").config
    assert config.reprompt_template == "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
    assert config.solution_template == "\nCorrect solution:\n\n{successful_previous_attempt}"
    assert config.feedback_template == (
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}")
    argv = plan("sdpo.yaml").slime_argv
    assert "--apply-chat-template" in argv and "--disable-grpo-std-normalization" in argv


def test_sdft_topk_differs_from_sdft_only_in_scope():
    sdft, topk = load("sdft.yaml"), load("sdft_topk.yaml")
    assert topk[ARG_PREFIX + "kl_scope"] == "topk" and topk[ARG_PREFIX + "topk"] == 64
    changed = {k for k in sdft.keys() | topk.keys() if sdft.get(k) != topk.get(k)}
    assert changed == {ARG_PREFIX + "kl_scope", ARG_PREFIX + "topk"}
