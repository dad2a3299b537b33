import argparse
import dataclasses
from types import SimpleNamespace

import pytest

from slime_self_distill.config import (
    ConfigError,
    SelfDistillConfig,
    add_self_distill_arguments,
    flag_name,
)


def parse(argv):
    return add_self_distill_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_every_knob_has_a_flag_with_help_and_default():
    parser = add_self_distill_arguments(argparse.ArgumentParser())
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(SelfDistillConfig):
        action = actions["self_distill_" + f.name]
        assert action.option_strings == [flag_name(f.name)]
        assert action.help and "default:" in action.help


def test_flags_absent_fill_defaults():
    assert SelfDistillConfig.from_args(parse([])) == SelfDistillConfig()


def test_flags_parse_with_types():
    args = parse(
        [
            "--self-distill-kl-scope", "topk",
            "--self-distill-divergence", "alpha_js",
            "--self-distill-alpha", "0.3",
            "--self-distill-topk", "20",
            "--self-distill-max-teacher-prompt-len", "4096",
        ]
    )
    config = SelfDistillConfig.from_args(args)
    assert (config.kl_scope, config.divergence, config.alpha, config.topk) == ("topk", "alpha_js", 0.3, 20)
    assert config.max_teacher_prompt_len == 4096


def test_bad_choice_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        parse(["--self-distill-kl-scope", "whole_vocab"])


def test_yaml_style_namespace_partial_keys_fill_defaults():
    # slime's --custom-config-path does setattr(args, key, value) for each YAML key, with no type checks.
    args = SimpleNamespace(self_distill_divergence="reverse_kl", self_distill_ema_rate=1, lr=1e-6)
    config = SelfDistillConfig.from_args(args)
    assert config.divergence == "reverse_kl"
    assert config.ema_rate == 1.0 and isinstance(config.ema_rate, float)
    assert config.kl_scope == SelfDistillConfig().kl_scope


def test_yaml_wrong_type_names_flag_and_key():
    with pytest.raises(ConfigError, match=r"--self-distill-topk \(YAML key self_distill_topk\) must be int"):
        SelfDistillConfig.from_args(SimpleNamespace(self_distill_topk="64"))


def test_misspelt_yaml_key_is_an_error():
    with pytest.raises(ConfigError, match="self_distill_kl_scop"):
        SelfDistillConfig.from_args(SimpleNamespace(self_distill_kl_scop="topk"))


@pytest.mark.parametrize(
    "kwargs, flag, fix",
    [
        ({"alpha": 1.5}, "--self-distill-alpha", "forward KL"),
        ({"alpha": -0.1}, "--self-distill-alpha", "forward KL"),
        ({"topk": 0}, "--self-distill-topk", "K >= 1"),
        ({"top_entropy_quantile": 0.0}, "--self-distill-top-entropy-quantile", "1.0"),
        ({"top_entropy_quantile": 1.5}, "--self-distill-top-entropy-quantile", "1.0"),
        ({"num_loss_tokens_to_skip": -1}, "--self-distill-num-loss-tokens-to-skip", "positive"),
        ({"importance_cap": 0.0}, "--self-distill-importance-cap", "cap > 0"),
        ({"sampled_ratio_cap": -1.0}, "--self-distill-sampled-ratio-cap", "cap > 0"),
        ({"ema_rate": 0.0}, "--self-distill-ema-rate", "0.01"),
        ({"max_teacher_prompt_len": 0}, "--self-distill-max-teacher-prompt-len", "positive"),
        ({"teacher_overflow": "truncate_demonstration"}, "--self-distill-teacher-overflow",
         "--self-distill-max-teacher-prompt-len"),
        ({"chunk_size": 0}, "--self-distill-chunk-size", "positive"),
        ({"host_memory_budget_gb": 0.0}, "--self-distill-host-memory-budget-gb", "GiB"),
        ({"kl_scope": "whole"}, "--self-distill-kl-scope", "full_vocab, topk, sampled_token"),
        ({"teacher_prompt_key": ""}, "--self-distill-teacher-prompt-key", "metadata key"),
        ({"teacher_context": "self_revision", "max_teacher_prompt_len": 8,
          "teacher_overflow": "truncate_demonstration"}, "--self-distill-teacher-overflow", "use error or drop"),
        ({"revision_phrase_wrong": "  "}, "--self-distill-revision-phrase-wrong", "revision phrase"),
        ({"divergence": "mixed_kl"}, "--self-distill-divergence", "--self-distill-kl-scope topk"),
        ({"teacher_context": "sdpo", "teacher_context_path": "my.build"}, "--self-distill-teacher-context-path",
         "drop one of the two"),
        ({"teacher_context_path": "build"}, "--self-distill-teacher-context-path", "module.function"),
        ({"teacher_context_path": "my.build", "max_teacher_prompt_len": 8,
          "teacher_overflow": "truncate_demonstration"}, "--self-distill-teacher-overflow", "error or drop"),
        ({"reprompt_template": "{solution}{feedback}"}, "--self-distill-reprompt-template", "never uses {prompt}"),
        ({"solution_template": "{solution}"}, "--self-distill-solution-template", "{successful_previous_attempt}"),
        ({"feedback_template": "{feedback_raw:>3}"}, "--self-distill-feedback-template", "not allowed"),
        ({"rl_combination": "hybrid", "weight": 1.5}, "--self-distill-weight", "(1 - w) * policy"),
        ({"rl_combination": "additive", "weight": -1.0}, "--self-distill-weight", ">= 0"),
        ({"rl_combination": "additive", "num_loss_tokens_to_skip": 3}, "--self-distill-num-loss-tokens-to-skip",
         "policy loss"),
    ],
)
def test_invalid_values_name_the_flag_and_the_fix(kwargs, flag, fix):
    with pytest.raises(ConfigError) as excinfo:
        SelfDistillConfig(**kwargs)
    assert flag in str(excinfo.value)
    assert fix in str(excinfo.value)


def test_bool_knobs_parse_from_flags_and_refuse_strings_in_yaml():
    for text, value in (("false", False), ("True", True), ("0", False), ("on", True)):
        args = parse(["--self-distill-remove-thinking", text])
        assert SelfDistillConfig.from_args(args).remove_thinking is value
    with pytest.raises(SystemExit):
        parse(["--self-distill-remove-thinking", "maybe"])
    with pytest.raises(ConfigError, match="must be bool.*write true or false"):
        SelfDistillConfig.from_args(SimpleNamespace(self_distill_dont_reprompt_on_self_success="yes"))


def test_sdpo_defaults_are_the_official_rules_and_templates():
    config = SelfDistillConfig()
    assert (config.success_threshold, config.dont_reprompt_on_self_success, config.remove_thinking,
            config.feedback, config.rl_combination, config.weight) == (1.0, True, True, "without_solution", "none", 1.0)
    # lasgroup/SDPO verl/trainer/config/actor/actor.yaml, the YAML block scalars (|-) as the official scripts load them
    assert config.reprompt_template == "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
    assert config.solution_template == "\nCorrect solution:\n\n{successful_previous_attempt}"
    assert config.feedback_template == (
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}")


def test_settings_of_another_context_or_combination_are_pointed_out():
    sdpo_knobs = {"success_threshold", "feedback", "remove_thinking"}
    static = SelfDistillConfig().ineffective_settings(sdpo_knobs | {"weight"})
    assert len(static) == 4 and all("has no effect" in warning for warning in static)
    sdpo = SelfDistillConfig(teacher_context="sdpo", rl_combination="hybrid", weight=0.5)
    assert sdpo.ineffective_settings(sdpo_knobs | {"weight"}) == []
    assert [w.split()[0] for w in sdpo.ineffective_settings({"teacher_prompt_key", "missing_teacher"})] == [
        "--self-distill-teacher-prompt-key", "--self-distill-missing-teacher"]


def test_alpha_js_weight_special_cases():
    assert SelfDistillConfig(divergence="forward_kl", alpha=0.7).alpha_js_weight == 0.0
    assert SelfDistillConfig(divergence="reverse_kl", alpha=0.7).alpha_js_weight == 1.0
    assert SelfDistillConfig(divergence="alpha_js", alpha=0.7).alpha_js_weight == 0.7


def test_round_trip_through_args_dict():
    config = SelfDistillConfig(kl_scope="sampled_token", divergence="reverse_kl", teacher="ema", ema_rate=0.05)
    assert SelfDistillConfig.from_args(SimpleNamespace(**config.to_args_dict())) == config


def test_the_retired_storage_dtype_says_what_replaced_it_as_flag_and_as_yaml_key():
    for args in (parse(["--self-distill-full-vocab-storage-dtype", "float16"]),
                 SimpleNamespace(self_distill_full_vocab_storage_dtype="float32", self_distill_kl_scope="full_vocab")):
        with pytest.raises(ConfigError, match=r"--self-distill-full-vocab-storage-dtype\) is gone: .* final hidden "
                                              r"states .*remove the setting"):
            SelfDistillConfig.from_args(args)
    assert SelfDistillConfig.from_args(parse([])) == SelfDistillConfig()  # the hidden flag defaults to unset
    assert "storage-dtype" not in add_self_distill_arguments(argparse.ArgumentParser()).format_help()


def test_topk_support_choices_and_where_it_has_no_effect():
    assert SelfDistillConfig.from_args(parse(["--self-distill-kl-scope", "topk", "--self-distill-topk-support",
                                              "union"])).topk_support == "union"
    with pytest.raises(SystemExit):
        parse(["--self-distill-topk-support", "both"])
    with pytest.raises(ConfigError, match="--self-distill-topk-support: got 'both'; choose one of teacher, student"):
        SelfDistillConfig(topk_support="both")
    assert SelfDistillConfig(kl_scope="full_vocab").ineffective_settings({"topk_support"}) == [
        "--self-distill-topk-support has no effect: --self-distill-kl-scope is full_vocab"]
    assert SelfDistillConfig(kl_scope="topk").ineffective_settings({"topk_support"}) == []
