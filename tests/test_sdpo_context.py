"""SDPO's teacher context (the reprompt built from the rollout group after rewards) and user-defined builders.

Every expectation comes from ``reference_batch`` / ``reference_reprompt``, a brute-force restatement of the official
rules (lasgroup/SDPO ``verl/trainer/ppo/ray_trainer.py``: ``_collect_feedback``, ``_collect_solutions_by_uid``,
``_get_solution``, ``_maybe_build_self_distillation_batch``) written here independently of the code under test.

The first part runs without slime (the pure rules, and the glue on sample-like namespaces); the rest runs slime's
real ``Sample``, data source and converter with a small real tokenizer whose ``<think>`` tokens survive decoding
(as Qwen3's do), so that ``remove_thinking`` matters end to end.
"""

from __future__ import annotations

import copy
import json
import random
import re
from argparse import Namespace
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pytest

from slime_self_distill import config as config_module
from slime_self_distill.config import ConfigError, SelfDistillConfig
from slime_self_distill.contexts.groups import REASON_BUILDER_NONE, builder_contexts, sdpo_contexts
from slime_self_distill.contexts.sdpo import (
    REASON_NO_SOLUTION_NOR_FEEDBACK,
    Attempt,
    SdpoRules,
    group_reprompts,
    rollout_metrics,
)
from slime_self_distill.custom_convert import (
    CONTEXT_METRICS_PREFIX,
    REASON_OVER_BUDGET,
    REASON_OVER_BUDGET_AFTER_TRUNCATION,
    context_metrics,
    convert_samples_to_train_data,
    log_context_metrics,
)
from slime_self_distill.data_source import (
    PLUGIN_METADATA_KEY,
    STUDENT_PROMPT_KEY,
    TEACHER_PROMPT_TEXT_KEY,
    SelfDistillDataError,
)
from slime_self_distill.teacher_view import PAYLOAD_KEY, TeacherView
from tests.slime_support import SLIME_AVAILABLE, needs_slime
from tests.test_custom_convert import slime_args
from tests.test_data_source import data_source_args, self_distill_data_source
from tests.tokenizer_factory import save_tokenizer

# ------------------------------------------------------------------------------------ the official rules, restated
OFFICIAL_TEMPLATES = dict(  # lasgroup/SDPO verl/trainer/config/actor/actor.yaml (YAML `|-` block scalars)
    reprompt_template="{prompt}{solution}{feedback}\n\nCorrectly solve the original question.",
    solution_template="\nCorrect solution:\n\n{successful_previous_attempt}",
    feedback_template="\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}",
)
CUSTOM_TEMPLATES = dict(  # every field moved around, literal braces, a template text of its own
    reprompt_template="Feedback first:{feedback}\nQ: {prompt}\n{{keep these braces}}{solution}\nGo.",
    solution_template="[[{successful_previous_attempt}]]",
    feedback_template="<<{feedback_raw}>>",
)
CLOSING_INSTRUCTION = "Correctly solve the original question."
OFFICIAL_THINKING = re.compile(r"<think>.*?</think>\s*", re.DOTALL)  # ray_trainer._remove_thinking_trace
FEEDBACK_MODES = ("off", "without_solution", "always")


def knobs(*, threshold=1.0, dont_self=True, remove_thinking=True, feedback="without_solution", templates=None):
    """The SDPO settings, as SelfDistillConfig field names (the reference reads the same dict)."""
    return dict(success_threshold=threshold, dont_reprompt_on_self_success=dont_self, remove_thinking=remove_thinking,
                feedback=feedback, **(templates or OFFICIAL_TEMPLATES))


@dataclass(frozen=True)
class Expected:
    solution: Optional[str]  # the (thinking-free) solution text, None: no successful sibling to read
    feedback: Optional[str]  # the feedback text put into the reprompt, None: not used
    feedback_available: bool

    @property
    def has_teacher(self) -> bool:
        return self.solution is not None or self.feedback is not None


def reference_batch(items, k) -> list:
    """``items``: (group id, response text, reward, feedback) in batch order; one ``Expected`` per item."""
    expected = []
    for i, (group, _, _, feedback) in enumerate(items):
        solution = None
        for j, (other_group, text, reward, _) in enumerate(items):  # the first success of the group, in batch order
            if other_group != group or reward < k["success_threshold"]:
                continue
            if k["dont_reprompt_on_self_success"] and j == i:
                continue
            solution = text
            break
        if solution is not None and k["remove_thinking"]:
            solution = OFFICIAL_THINKING.sub("", solution)
        usable = isinstance(feedback, str) and feedback.strip() != ""
        available = usable and k["feedback"] != "off"
        used = available and (k["feedback"] == "always" or solution is None)
        expected.append(Expected(solution, feedback if used else None, available))
    return expected


def reference_reprompt(question: str, e: Expected, k) -> str:
    solution = "" if e.solution is None else k["solution_template"].format(successful_previous_attempt=e.solution)
    feedback = "" if e.feedback is None else k["feedback_template"].format(feedback_raw=e.feedback)
    return k["reprompt_template"].format(prompt=question, solution=solution, feedback=feedback)


def reference_teacher_prompt(student, e: Expected, k):
    """The student's prompt with its last user message replaced by the reprompt (a string prompt is that message)."""
    if isinstance(student, str):
        return reference_reprompt(student, e, k)
    last_user = max(i for i, m in enumerate(student) if m["role"] == "user")
    return [dict(m, content=reference_reprompt(m["content"], e, k)) if i == last_user else dict(m)
            for i, m in enumerate(student)]


def reference_metrics(items, expected, k) -> dict:
    n, groups = len(items), {g for g, _, _, _ in items}
    successful_groups = {g for g, _, reward, _ in items if reward >= k["success_threshold"]}
    return {
        "success_group_fraction": len(successful_groups) / len(groups),
        "success_sample_fraction": sum(e.solution is not None for e in expected) / n,
        "feedback_available_fraction": sum(e.feedback_available for e in expected) / n,
        "feedback_used_fraction": sum(e.feedback is not None for e in expected) / n,
        "reprompt_sample_fraction": sum(e.has_teacher for e in expected) / n,
    }


# ------------------------------------------------------------------------------------------- random groups
WORDS = ("the quick brown fox jumps over lazy dog what is 12 + 30 = 42 answer step {x} } { caf\u00e9 \u2014 "
         "because therefore").split()
FEEDBACKS = (None, "", "   ", "\n\t ", "Test failed: expected {x} but got 41.", "  padded feedback, kept raw \n",
             "Runtime error:\n  File 'a.py', line 3")
WHITESPACE = ("", " ", "\n", "\n\n", " \n\t \n")


def words(rng, low=1, high=8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def random_response(rng) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return words(rng)
    if kind == 1:  # one block, some whitespace after it
        return f"<think>{words(rng)}\n{words(rng)}</think>{rng.choice(WHITESPACE)}{words(rng)}"
    if kind == 2:  # two blocks, text between them
        return (f"{words(rng)} <think>{words(rng)}</think>{rng.choice(WHITESPACE)}{words(rng)}"
                f"<think>\n{words(rng)}\n</think>{rng.choice(WHITESPACE)}{words(rng)}")
    if kind == 3:  # nested: the non-greedy match stops at the first </think>
        return f"<think>a <think>{words(rng)}</think>{rng.choice(WHITESPACE)}inner</think> {words(rng)}"
    if kind == 4:  # unclosed: nothing to remove
        return f"{words(rng)} <think> {words(rng)}"
    return f"<think></think>{rng.choice(WHITESPACE)}{words(rng)}"  # an empty block


def random_rewards(rng, size, threshold) -> list:
    below = (threshold - 1.0, threshold - 1e-9, threshold - 0.5)
    above = (threshold, threshold, threshold + 1e-9, threshold + 0.5)  # exactly the threshold succeeds
    mode = rng.choice(("mixed", "none", "all", "single"))
    if mode == "none":
        return [rng.choice(below) for _ in range(size)]
    if mode == "all":
        return [rng.choice(above) for _ in range(size)]
    if mode == "single":
        winner = rng.randrange(size)
        return [rng.choice(above) if i == winner else rng.choice(below) for i in range(size)]
    return [rng.choice(below + above) for _ in range(size)]


def random_student_prompt(rng, question):
    shape = rng.randrange(4)
    if shape == 0:
        return question
    if shape == 1:
        return [{"role": "user", "content": question}]
    if shape == 2:
        return [{"role": "system", "content": "You are a careful solver."}, {"role": "user", "content": question}]
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first try"},
            {"role": "assistant", "content": "41"}, {"role": "user", "content": question}]


def random_groups(seed, n_groups, threshold):
    """[(question, student prompt, [(response text, reward, feedback)])] with sizes 1-8."""
    rng = random.Random(seed)
    groups = []
    for g in range(n_groups):
        size = rng.randint(1, 8)
        question = f"Q{g}: {words(rng, 2, 6)}?"
        rewards = random_rewards(rng, size, threshold)
        attempts = [(random_response(rng), rewards[i], rng.choice(FEEDBACKS)) for i in range(size)]
        groups.append((question, random_student_prompt(rng, question), attempts))
    return groups


def batches_of(groups, seed):
    rng = random.Random(seed)
    start = 0
    while start < len(groups):
        size = rng.randint(1, 6)
        yield groups[start:start + size]
        start += size


SETTINGS = [dict(dont_self=d, remove_thinking=r, feedback=f) for d in (True, False) for r in (True, False)
            for f in FEEDBACK_MODES]


# ------------------------------------------------------------------------------------------- pure rules
def test_default_templates_are_the_official_strings():
    assert config_module.SDPO_REPROMPT_TEMPLATE == (
        "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.")
    assert config_module.SDPO_SOLUTION_TEMPLATE == "\nCorrect solution:\n\n{successful_previous_attempt}"
    assert config_module.SDPO_FEEDBACK_TEMPLATE == (
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}")
    defaults = SelfDistillConfig(teacher_context="sdpo")
    assert {name: getattr(defaults, name) for name in OFFICIAL_TEMPLATES} == OFFICIAL_TEMPLATES
    # the official README's defaults: threshold 1.0, no self-reprompt, thinking removed, feedback only without solution
    assert (defaults.success_threshold, defaults.dont_reprompt_on_self_success, defaults.remove_thinking,
            defaults.feedback) == (1.0, True, True, "without_solution")


@pytest.mark.parametrize("templates", [OFFICIAL_TEMPLATES, CUSTOM_TEMPLATES], ids=["official", "custom"])
@pytest.mark.parametrize("threshold", [1.0, 0.0, -0.25])
def test_pure_rules_match_the_brute_force_on_random_groups(templates, threshold):
    groups = random_groups(seed=int(threshold * 100) + 17, n_groups=300, threshold=threshold)
    seen = {"solution_and_feedback": 0, "feedback_only": 0, "no_teacher": 0, "thinking_removed": 0,
            "success_at_threshold": 0}
    for setting in SETTINGS:
        k = knobs(threshold=threshold, templates=templates, **setting)
        rules = SdpoRules.from_config(SelfDistillConfig(teacher_context="sdpo", **k))
        for batch in batches_of(groups, seed=len(groups)):
            items, batch_attempts, batch_reprompts, students = [], [], [], []
            for g, (question, student, attempts) in enumerate(batch):
                items += [(g, text, reward, feedback) for text, reward, feedback in attempts]
                batch_attempts.append([Attempt(text, reward, feedback) for text, reward, feedback in attempts])
                batch_reprompts.append(group_reprompts(batch_attempts[-1], rules))
                students += [(question, student)] * len(attempts)
            expected = reference_batch(items, k)
            flat = [r for group in batch_reprompts for r in group]
            assert len(flat) == len(expected)
            for reprompt, e, (question, student) in zip(flat, expected, students):
                assert reprompt.has_teacher == e.has_teacher
                if not e.has_teacher:
                    assert reprompt.reason.startswith(REASON_NO_SOLUTION_NOR_FEEDBACK)
                    with pytest.raises(ValueError):
                        reprompt.prompt(student, rules)
                    seen["no_teacher"] += 1
                    continue
                assert reprompt.reason == ""
                assert reprompt.text(question, rules) == reference_reprompt(question, e, k)
                before = copy.deepcopy(student)
                assert reprompt.prompt(student, rules) == reference_teacher_prompt(student, e, k)
                assert student == before  # the student's prompt is never edited in place
                seen["solution_and_feedback"] += e.solution is not None and e.feedback is not None
                seen["feedback_only"] += e.solution is None
                seen["thinking_removed"] += e.solution is not None and e.solution not in {t for _, t, _, _ in items}
            for reward in (r for _, _, r, _ in items):
                seen["success_at_threshold"] += reward == threshold
            assert rollout_metrics(batch_attempts, batch_reprompts, rules) == pytest.approx(
                reference_metrics(items, expected, k))
    assert all(count > 0 for count in seen.values()), seen  # the random groups reached every case


def test_remove_thinking_and_feedback_rules_on_hand_made_groups():
    """A few cases spelled out, so that a failure of the random test has a readable twin."""
    k = knobs(threshold=0.5, feedback="always")
    rules = SdpoRules.from_config(SelfDistillConfig(teacher_context="sdpo", **k))
    attempts = [Attempt("<think>plan</think>\n\n  The answer is 42.", 0.5, None),  # success at the threshold
                Attempt("41", 0.0, "  off by one  "),
                Attempt("40", 0.0, "   ")]
    first, second, third = group_reprompts(attempts, rules)
    assert not first.has_teacher  # its own success does not count, no feedback
    assert second.text("Q", rules) == ("Q\nCorrect solution:\n\nThe answer is 42.\nThe following is feedback from "
                                       "your unsuccessful earlier attempt:\n\n  off by one  \n\n" + CLOSING_INSTRUCTION)
    assert third.text("Q", rules) == "Q\nCorrect solution:\n\nThe answer is 42.\n\n" + CLOSING_INSTRUCTION
    assert rollout_metrics([attempts], [[first, second, third]], rules) == pytest.approx({
        "success_group_fraction": 1.0, "success_sample_fraction": 2 / 3, "feedback_available_fraction": 1 / 3,
        "feedback_used_fraction": 1 / 3, "reprompt_sample_fraction": 2 / 3})
    self_rules = SdpoRules.from_config(
        SelfDistillConfig(teacher_context="sdpo", **dict(k, dont_reprompt_on_self_success=False)))
    assert group_reprompts(attempts, self_rules)[0].has_teacher  # its own success is its solution now


# ------------------------------------------------------------------------- the glue on sample-like namespaces
def decode_chars(ids):
    return "".join(map(chr, ids))


def namespace_sample(index, group_index, student, response, reward, feedback, *, reward_key, rng):
    """A sample-like object: tokens are character codes (``decode_chars`` is the tokenizer); with a reward key the
    reward is a dict, and the feedback goes into it or into the metadata."""
    metadata = {PLUGIN_METADATA_KEY: {STUDENT_PROMPT_KEY: copy.deepcopy(student)}}
    in_reward_dict = rng.random() < 0.7
    if reward_key:  # slime's get_reward_value indexes the reward dict with the key
        reward = {reward_key: reward, "other": -5.0,
                  **({"feedback": feedback} if feedback is not None and in_reward_dict else {})}
    if feedback is not None and not (reward_key and in_reward_dict):
        metadata["feedback"] = feedback
    prompt_ids = [ord(c) for c in f"rendered {index}"]
    return SimpleNamespace(index=index, group_index=group_index, prompt=f"rendered {index}", reward=reward,
                           tokens=prompt_ids + [ord(c) for c in response], response_length=len(response),
                           metadata=metadata, remove_sample=False)


@pytest.mark.parametrize("reward_key", [None, "score"])
def test_group_glue_matches_the_brute_force_with_interleaved_groups(reward_key):
    rng = random.Random(5)
    groups = random_groups(seed=6, n_groups=120, threshold=1.0)
    for setting in SETTINGS:
        k = knobs(**setting)
        config = SelfDistillConfig(teacher_context="sdpo", **k)
        for batch in batches_of(groups, seed=7):
            ids = rng.sample(range(1000), len(batch))  # any group ids, not 0..n-1
            entries = [(ids[g], student, text, reward, feedback)
                       for g, (_, student, attempts) in enumerate(batch) for text, reward, feedback in attempts]
            rng.shuffle(entries)  # the groups' samples interleaved; "first" is first in this order
            samples = [namespace_sample(i, gid, student, text, reward, feedback, reward_key=reward_key, rng=rng)
                       for i, (gid, student, text, reward, feedback) in enumerate(entries)]
            items = [(gid, text, reward, feedback) for gid, _, text, reward, feedback in entries]
            expected = reference_batch(items, k)
            contexts = sdpo_contexts(Namespace(reward_key=reward_key), samples, config, decode_chars)
            for choice, e, (_, student, *_) in zip(contexts.choices, expected, entries, strict=True):
                if e.has_teacher:
                    assert choice.prompt == reference_teacher_prompt(student, e, k) and choice.reason == ""
                else:
                    assert choice.prompt is None and choice.reason.startswith(REASON_NO_SOLUTION_NOR_FEEDBACK)
            assert contexts.metrics == pytest.approx(reference_metrics(items, expected, k))


def test_shortening_cuts_the_solution_first_then_the_feedback():
    k = knobs(feedback="always")
    rules = SdpoRules.from_config(SelfDistillConfig(teacher_context="sdpo", **k))
    solution, feedback = "S" * 50 + " the end", "F" * 40 + " why"
    _, reprompt = group_reprompts([Attempt(solution, 1.0, None), Attempt("wrong", 0.0, feedback)], rules)
    student = [{"role": "system", "content": "sys"}, {"role": "user", "content": "the question?"}]

    def size(prompt):
        return sum(len(m["content"]) for m in prompt)

    def teacher(solution_kept, feedback_kept):
        """None for solution_kept: the solution section is left out."""
        kept_solution = None if solution_kept is None else solution[:solution_kept]
        return reference_teacher_prompt(student, Expected(kept_solution, feedback[:feedback_kept], True), k)

    full, bare = size(teacher(len(solution), len(feedback))), size(teacher(None, 0))
    for budget in range(bare - 2, full + 2):
        got = reprompt.shortened_prompt(student, rules, lambda prompt: size(prompt) <= budget)
        if budget >= full:
            assert got == teacher(len(solution), len(feedback))
        elif budget >= size(teacher(1, len(feedback))):  # a solution prefix fits with the whole feedback
            kept = budget - size(teacher(0, len(feedback)))
            assert got == teacher(kept, len(feedback))
        elif budget >= size(teacher(None, 1)):  # no solution prefix fits: without it, the feedback is cut
            assert got == teacher(None, budget - bare)
        else:  # an empty solution or feedback would leave a heading over nothing: no teacher
            assert got is None
        if got is not None:
            assert got[0] == student[0] and "the question?" in got[1]["content"]
            assert got[1]["content"].endswith(CLOSING_INSTRUCTION)


# ------------------------------------------------------------------------------------------- errors (pure)
def error_sample(index=3, **fields):
    values = dict(index=index, group_index=1, prompt="what is 2 + 2", tokens=[104, 105], response_length=1,
                  reward=1.0, metadata={PLUGIN_METADATA_KEY: {STUDENT_PROMPT_KEY: "what is 2 + 2"}},
                  remove_sample=False)
    values.update(fields)
    return SimpleNamespace(**values)


@pytest.mark.parametrize("fields,reward_key,message", [
    (dict(reward={"score": 1.0}), None, r"reward is a dict \(\['score'\]\); name its value with --reward-key"),
    (dict(reward={"acc": 1.0}), "score", r"--reward-key 'score' names a reward dict entry, but its reward is a dict "
                                         r"without it \(\['acc'\]\)"),
    (dict(reward=1.0), "score", r"--reward-key 'score' names a reward dict entry, but its reward is 1.0"),
    (dict(reward="1.0"), None, r"reward '1.0' is not a number"),
    (dict(reward=None), None, r"reward None is not a number"),
    (dict(reward={"score": "high"}), "score", r"reward 'high' is not a number"),
    (dict(reward={"score": 0.0, "feedback": 3}), "score", r"reward dict's 'feedback' is a int"),
    (dict(metadata={PLUGIN_METADATA_KEY: {STUDENT_PROMPT_KEY: "q"}, "feedback": ["a"]}), None,
     r"metadata's 'feedback' is a list"),
    (dict(group_index=None), None, r"has no group_index"),
    (dict(metadata={}), None, r"carries no raw student prompt.*SelfDistillRolloutDataSource"),
])
def test_glue_errors_name_the_sample(fields, reward_key, message):
    # sample 2 succeeds, so sample 3 has a teacher
    samples = [error_sample(2, reward={reward_key: 1.0} if reward_key else 1.0), error_sample(3, **fields)]
    with pytest.raises(SelfDistillDataError, match=message) as error:
        sdpo_contexts(Namespace(reward_key=reward_key), samples, SelfDistillConfig(teacher_context="sdpo"),
                      decode_chars)
    assert "sample index=3 " in str(error.value)


@pytest.mark.parametrize("student, message", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "Let me"}], "last message has role 'assistant'"),
    ([{"role": "user", "content": [{"type": "text", "text": "q"}]}], "has list content"),
])
def test_a_prompt_the_reprompt_cannot_rewrite_is_refused_naming_the_sample(student, message):
    samples = [error_sample(2), error_sample(3, metadata={PLUGIN_METADATA_KEY: {STUDENT_PROMPT_KEY: student}})]
    with pytest.raises(SelfDistillDataError, match=message) as error:
        sdpo_contexts(Namespace(reward_key=None), samples, SelfDistillConfig(teacher_context="sdpo"), decode_chars)
    assert "sample index=3 " in str(error.value)


def test_feedback_comes_from_the_reward_dict_then_the_metadata():
    """``feedback_of``'s documented order: the reward dict's 'feedback', else ``sample.metadata['feedback']``."""
    both = error_sample(reward={"score": 0.0, "feedback": "from the reward"},
                        metadata={PLUGIN_METADATA_KEY: {STUDENT_PROMPT_KEY: "q"}, "feedback": "from the metadata"})
    metadata_only = error_sample(reward={"score": 0.0, "feedback": None},
                                 metadata={PLUGIN_METADATA_KEY: {STUDENT_PROMPT_KEY: "q"},
                                           "feedback": "from the metadata"})
    k = knobs(feedback="always")
    for sample, used in ((both, "from the reward"), (metadata_only, "from the metadata")):
        config = SelfDistillConfig(teacher_context="sdpo", **k)
        (choice,) = sdpo_contexts(Namespace(reward_key="score"), [sample], config, decode_chars).choices
        assert choice.prompt == reference_reprompt("q", Expected(None, used, True), k)


def test_builder_errors_name_the_group_or_the_sample():
    samples = [error_sample(7, group_index=4), error_sample(8, group_index=4)]
    path = "pkg.build"
    with pytest.raises(SelfDistillDataError, match=r"pkg\.build returned 1 entries .*index=7 .* with 2 samples"):
        builder_contexts(None, samples, lambda args, group: ["one"], path)
    with pytest.raises(SelfDistillDataError, match=r"returned dict for the group of sample index=7 "):
        builder_contexts(None, samples, lambda args, group: {"a": 1}, path)
    for bad in ("", [], [{"role": "user"}], 42, {"role": "user", "content": "x"}):
        with pytest.raises(SelfDistillDataError, match=r"pkg\.build returned .* for sample index=8 "):
            builder_contexts(None, samples, lambda args, group: ["fine", bad], path)


# ================================================================================= against slime's real code
@pytest.fixture(autouse=True)
def no_current_rollout_id():
    """slime's current rollout id is a module global: leave it unset around every test (the converter logs its
    metrics only when it is set)."""
    if not SLIME_AVAILABLE:
        yield
        return
    from slime.rollout.sample_hooks import set_current_rollout_id

    set_current_rollout_id(None)
    yield
    set_current_rollout_id(None)


@pytest.fixture(scope="module")
def thinking_tokenizer(tmp_path_factory):
    """(path, tokenizer): the test tokenizer with ``<think>``/``</think>`` as ordinary added tokens, which
    ``decode(skip_special_tokens=True)`` keeps, as in Qwen3."""
    from transformers import AutoTokenizer

    path = save_tokenizer(tmp_path_factory.mktemp("thinking_tok"))
    with open(f"{path}/tokenizer.json") as f:
        core = json.load(f)
    for token in core["added_tokens"]:
        if token["content"] in ("<think>", "</think>"):
            token["special"] = False
    with open(f"{path}/tokenizer.json", "w") as f:
        json.dump(core, f)
    with open(f"{path}/tokenizer_config.json") as f:
        settings = json.load(f)
    for key in ("extra_special_tokens", "additional_special_tokens"):
        if isinstance(settings.get(key), list):
            settings[key] = [t for t in settings[key] if t not in ("<think>", "</think>")]
    with open(f"{path}/tokenizer_config.json", "w") as f:
        json.dump(settings, f)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.encode("<think>x</think> y<|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think> y"
    return path, tokenizer


def render_ids(tokenizer, prompt, kwargs, apply_chat_template=True) -> list:
    """A prompt rendered and encoded as slime renders and encodes the student's."""
    if apply_chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return tokenizer.encode(prompt, add_special_tokens=False)


def converter_args(hf, **overrides):
    values = dict(apply_chat_template=True, apply_chat_template_kwargs={"enable_thinking": False},
                  self_distill_teacher_context="sdpo", wandb_always_use_train_step=False, global_batch_size=4)
    values.update(overrides)
    return slime_args(hf, **values)


def real_sample(tokenizer, *, index, group_index, student, response, reward, feedback=None, reward_key=None,
                feedback_in="metadata", kwargs=None, apply_chat_template=True):
    """slime's Sample as the data source and a rollout leave it: the raw student prompt recorded, the rendered one
    encoded, the response ids (with the end-of-turn token) appended, the reward (a dict with a reward key)."""
    from slime.utils.types import Sample

    prompt_ids = render_ids(tokenizer, student, kwargs or {}, apply_chat_template)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [end_of_turn]
    metadata = {PLUGIN_METADATA_KEY: {STUDENT_PROMPT_KEY: copy.deepcopy(student)}}
    if reward_key is not None:
        reward = {reward_key: reward, "unrelated": 99.0}
    if feedback is not None and feedback_in == "reward":
        reward["feedback"] = feedback
    elif feedback is not None:
        metadata["feedback"] = feedback
    return Sample(index=index, group_index=group_index, prompt=tokenizer.decode(prompt_ids),
                  tokens=prompt_ids + response_ids,
                  response_length=len(response_ids), reward=reward, metadata=metadata, status=Sample.Status.COMPLETED)


def reward_value(sample, reward_key):
    return sample.reward[reward_key] if reward_key else sample.reward


def feedback_value(sample):
    if isinstance(sample.reward, dict) and "feedback" in sample.reward:
        return sample.reward["feedback"]
    return sample.metadata.get("feedback")


def capture_slime_log(monkeypatch) -> list:
    from slime.observability import logging_utils

    calls = []
    monkeypatch.setattr(logging_utils, "log", lambda args, metrics, step_key: calls.append((metrics, step_key)))
    return calls


CONVERTER_CASES = [
    dict(reward_key=None, setting=dict(dont_self=True, remove_thinking=True, feedback="without_solution")),
    dict(reward_key="score", setting=dict(dont_self=False, remove_thinking=True, feedback="always")),
    dict(reward_key="score", setting=dict(dont_self=True, remove_thinking=False, feedback="off"),
         teacher_kwargs={"enable_thinking": True}),
    dict(reward_key=None, setting=dict(dont_self=False, remove_thinking=False, feedback="always"),
         apply_chat_template=False),
]


@needs_slime
@pytest.mark.parametrize("case", CONVERTER_CASES, ids=["float-metadata", "dict-reward-key", "teacher-kwargs",
                                                       "no-chat-template"])
def test_converter_teacher_views_match_the_brute_force(thinking_tokenizer, monkeypatch, case):
    from slime.rollout.sample_hooks import set_current_rollout_id

    hf, tok = thinking_tokenizer
    rng = random.Random(11)
    apply_chat_template = case.get("apply_chat_template", True)
    student_kwargs = {"enable_thinking": False} if apply_chat_template else {}
    teacher_kwargs = case.get("teacher_kwargs") or student_kwargs
    reward_key = case["reward_key"]
    k = knobs(threshold=1.0, **case["setting"])
    samples = []
    for g, (question, _, attempts) in enumerate(random_groups(seed=12, n_groups=9, threshold=1.0)):
        student = question if not apply_chat_template else (
            [{"role": "system", "content": f"System message {g}: be exact."}, {"role": "user", "content": question}])
        for text, reward, feedback in attempts:
            feedback_in = rng.choice(("reward", "metadata")) if reward_key else "metadata"
            samples.append(dict(group_index=100 - 7 * g, student=student, response=text, reward=reward,
                                feedback=feedback, feedback_in=feedback_in))
    rng.shuffle(samples)  # several groups' samples interleaved
    samples = [real_sample(tok, index=i, reward_key=reward_key, kwargs=student_kwargs,
                           apply_chat_template=apply_chat_template, **s) for i, s in enumerate(samples)]
    args = converter_args(hf, reward_key=reward_key, rollout_batch_size=9, n_samples_per_prompt=4,
                          apply_chat_template=apply_chat_template, apply_chat_template_kwargs=student_kwargs or None,
                          self_distill_teacher_chat_template_kwargs=case.get("teacher_kwargs"),
                          **{f"self_distill_{name}": value for name, value in k.items()})
    logged = capture_slime_log(monkeypatch)
    set_current_rollout_id(7)
    data = convert_samples_to_train_data(args, copy.deepcopy(samples))

    items = [(s.group_index, tok.decode(s.tokens[-s.response_length:], skip_special_tokens=True),
              reward_value(s, reward_key), feedback_value(s)) for s in samples]
    expected = reference_batch(items, k)
    assert sum(e.has_teacher for e in expected) not in (0, len(samples))  # both kinds are present
    if k["remove_thinking"]:  # some solution lost a thinking block that survived decoding
        assert any(e.solution is not None and e.solution not in {t for _, t, _, _ in items} for e in expected)
    views = data[PAYLOAD_KEY]
    assert len(views) == len(samples) and all(isinstance(v, TeacherView) for v in views)
    n_with = sum(e.has_teacher for e in expected)
    prompt_lengths = []
    for sample, view, e in zip(samples, views, expected):
        r = sample.response_length
        assert view.has_teacher == e.has_teacher and view.response_length == r
        if not e.has_teacher:
            assert view.reason.startswith(REASON_NO_SOLUTION_NOR_FEEDBACK) and view.loss_weight == 0.0
            continue
        teacher = reference_teacher_prompt(sample.metadata[PLUGIN_METADATA_KEY][STUDENT_PROMPT_KEY], e, k)
        if apply_chat_template:
            assert teacher[0] == {"role": "system", "content": teacher[0]["content"]}  # the system message kept
            assert teacher[0]["content"].startswith("System message")
        teacher_ids = render_ids(tok, teacher, teacher_kwargs, apply_chat_template)
        assert list(view.tokens) == teacher_ids + sample.tokens[-r:]
        assert list(view.tokens[-r:]) == sample.tokens[-r:]  # the student's exact response ids
        assert view.loss_weight == pytest.approx(len(samples) / n_with)
        prompt_lengths.append(len(teacher_ids))
    if reward_key:
        assert data["raw_reward"] == [s.reward[reward_key] for s in samples]

    ((metrics, step_key),) = logged  # the converter's own entry at the rollout's step
    reference = {CONTEXT_METRICS_PREFIX + name: value for name, value in reference_metrics(items, expected, k).items()}
    reference |= {CONTEXT_METRICS_PREFIX + "distilled_sample_fraction": n_with / len(samples),
                  CONTEXT_METRICS_PREFIX + "teacher_prompt_len_mean": sum(prompt_lengths) / len(prompt_lengths),
                  CONTEXT_METRICS_PREFIX + "teacher_prompt_len_max": max(prompt_lengths),
                  CONTEXT_METRICS_PREFIX + "teacher_prompt_len_min": min(prompt_lengths),
                  "rollout/step": 7}
    assert step_key == "rollout/step" and metrics == pytest.approx(reference)


@needs_slime
def test_removed_and_empty_samples_get_no_teacher(thinking_tokenizer):
    hf, tok = thinking_tokenizer
    student = [{"role": "user", "content": "what is 12 + 30?"}]
    samples = [real_sample(tok, index=i, group_index=0, student=student, response=text, reward=reward)
               for i, (text, reward) in enumerate([("42", 1.0), ("41", 0.0), ("40", 0.0)])]
    samples[1].remove_sample = True
    samples[2].tokens, samples[2].response_length = samples[2].tokens[:-samples[2].response_length], 0
    views = convert_samples_to_train_data(converter_args(hf, rollout_batch_size=1, n_samples_per_prompt=3),
                                          samples)[PAYLOAD_KEY]
    assert [v.has_teacher for v in views] == [False, False, False]
    assert views[0].reason.startswith(REASON_NO_SOLUTION_NOR_FEEDBACK)
    assert views[1].reason.startswith("remove_sample") and views[2].reason.startswith("empty_response")


# ------------------------------------------------------------------------------------------- the data source
SDPO_ROWS = [
    {"prompt": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "what is 1 + 30"}],
     "label": "31", "metadata": {"row": 0}},
    {"prompt": "what is 2 + 30", "label": "32", "metadata": {"row": 1}},
    {"prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "what is {3} + 30"}],
     "label": "33", "metadata": {"row": 2}},
    {"prompt": "what is 4 + 30, in words?", "label": "34", "metadata": {"row": 3}},
]


def raw_messages(row, apply_chat_template):
    prompt = row["prompt"]
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) and apply_chat_template else prompt


@needs_slime
@pytest.mark.parametrize("apply_chat_template", [True, False])
def test_data_source_records_the_raw_student_prompt(tmp_path, apply_chat_template):
    rows = SDPO_ROWS if apply_chat_template else [r for r in SDPO_ROWS if isinstance(r["prompt"], str)]
    args = data_source_args(tmp_path, rows=rows, apply_chat_template=apply_chat_template,
                            self_distill_teacher_context="sdpo")
    by_id = {row["metadata"]["row"]: row for row in rows}
    groups = self_distill_data_source(args).get_samples(len(rows) + 1)  # crosses the epoch: rows come again
    assert len(groups) == len(rows) + 1
    for group in groups:
        for sample in group:
            plugin = sample.metadata[PLUGIN_METADATA_KEY]
            assert plugin[STUDENT_PROMPT_KEY] == raw_messages(by_id[sample.metadata["row"]], apply_chat_template)
            assert TEACHER_PROMPT_TEXT_KEY not in plugin  # no row teacher prompt is read under sdpo
            assert len({s.group_index for s in group}) == 1


@needs_slime
def test_data_source_refuses_a_prompt_that_is_in_no_row(tmp_path):
    args = data_source_args(tmp_path, rows=SDPO_ROWS, rollout_shuffle=False, self_distill_teacher_context="sdpo")
    source = self_distill_data_source(args)
    source.dataset.samples[1].prompt = "a prompt the rollout function rewrote"
    source.get_samples(1)  # the first row is fine
    with pytest.raises(SelfDistillDataError) as error:
        source.get_samples(1)
    message = str(error.value)
    assert "'a prompt the rollout function rewrote'" in message and "sample index=2 " in message
    assert "sample.prompt" in message


@needs_slime
def test_data_source_refuses_two_rows_rendering_to_the_same_prompt(tmp_path):
    rows = [{"prompt": "a<|im_end|>\n<|im_start|>user\nb", "label": "x", "metadata": {"row": 0}},
            {"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "label": "y",
             "metadata": {"row": 1}}]
    args = data_source_args(tmp_path, rows=rows, apply_chat_template_kwargs=None, rollout_shuffle=False,
                            self_distill_teacher_context="sdpo")
    with pytest.raises(SelfDistillDataError, match="rows 1 and 2 render to the same prompt from different raw"):
        self_distill_data_source(args)  # refused when the data source starts, not when the row is drawn


@needs_slime
def test_data_source_then_converter_end_to_end(tmp_path, thinking_tokenizer):
    """Rows -> slime's data source (ours) -> a simulated rollout with rewards -> the converter."""
    hf, tok = thinking_tokenizer
    kwargs = {"enable_thinking": False}
    args = data_source_args(
        tmp_path, rows=SDPO_ROWS, hf_checkpoint=hf, apply_chat_template_kwargs=kwargs, n_samples_per_prompt=3,
        advantage_estimator="grpo", rewards_normalization=True, grpo_std_normalization=True, rollout_batch_size=4,
        reward_key=None, custom_reward_post_process_path=None, rollout_top_p=1.0, use_rollout_routing_replay=False,
        self_distill_teacher_context="sdpo", self_distill_feedback="always", self_distill_success_threshold=0.5)
    k = knobs(threshold=0.5, feedback="always")
    rng = random.Random(13)
    samples = [s for group in self_distill_data_source(args).get_samples(4) for s in group]
    for sample in samples:  # what the rollout and the reward function do
        response_ids = tok.encode(random_response(rng), add_special_tokens=False) + [tok.eos_token_id]
        sample.tokens = tok.encode(sample.prompt, add_special_tokens=False) + response_ids
        sample.response_length = len(response_ids)
        sample.reward = rng.choice((0.0, 0.5, 1.0))
        sample.metadata["feedback"] = rng.choice(FEEDBACKS)
    rng.shuffle(samples)
    views = convert_samples_to_train_data(args, copy.deepcopy(samples))[PAYLOAD_KEY]
    items = [(s.group_index, tok.decode(s.tokens[-s.response_length:], skip_special_tokens=True), s.reward,
              s.metadata["feedback"]) for s in samples]
    expected = reference_batch(items, k)
    assert any(e.has_teacher for e in expected)
    for sample, view, e in zip(samples, views, expected):
        assert view.has_teacher == e.has_teacher
        if e.has_teacher:
            raw = raw_messages(SDPO_ROWS[sample.metadata["row"]], True)
            teacher_ids = render_ids(tok, reference_teacher_prompt(raw, e, k), kwargs)
            assert list(view.tokens) == teacher_ids + sample.tokens[-sample.response_length:]


# ---------------------------------------------------------------------------------------------- the budget
BUDGET_QUESTION = "what is 12 + 30?"
BUDGET_SOLUTION = " ".join(["First add the tens: 10 + 30 = 40, then the units: 40 + 2 = 42."] * 4)
BUDGET_FEEDBACK = " ".join(["Wrong answer: the checker expected 42 but read 41 in the last line."] * 3)


def budget_samples(tok):
    student = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": BUDGET_QUESTION}]
    return [real_sample(tok, index=0, group_index=5, student=student, response=BUDGET_SOLUTION, reward=1.0),
            real_sample(tok, index=1, group_index=5, student=student, response="The answer is 41.", reward=0.0,
                        feedback=BUDGET_FEEDBACK)]


def budget_teacher_ids(tok, samples, solution_kept, feedback_kept):
    """None for solution_kept: the solution section is left out."""
    k = knobs(feedback="always")
    student = samples[1].metadata[PLUGIN_METADATA_KEY][STUDENT_PROMPT_KEY]
    solution = None if solution_kept is None else BUDGET_SOLUTION[:solution_kept]
    e = Expected(solution, BUDGET_FEEDBACK[:feedback_kept], True)
    return render_ids(tok, reference_teacher_prompt(student, e, k), {"enable_thinking": False})


def budget_views(hf, samples, budget, overflow):
    args = converter_args(hf, rollout_batch_size=1, n_samples_per_prompt=2, self_distill_feedback="always",
                          self_distill_max_teacher_prompt_len=budget, self_distill_teacher_overflow=overflow)
    return convert_samples_to_train_data(args, copy.deepcopy(samples))[PAYLOAD_KEY]


@needs_slime
def test_truncation_shortens_the_solution_then_the_feedback_and_keeps_the_question(thinking_tokenizer):
    hf, tok = thinking_tokenizer
    samples = budget_samples(tok)
    n_solution, n_feedback = len(BUDGET_SOLUTION), len(BUDGET_FEEDBACK)
    full = len(budget_teacher_ids(tok, samples, n_solution, n_feedback))
    without_solution = len(budget_teacher_ids(tok, samples, None, n_feedback))
    bare = len(budget_teacher_ids(tok, samples, None, 0))
    assert bare + 10 < without_solution < full - 10

    # a budget between: the solution is cut to its longest fitting prefix, the feedback is whole
    budget = (without_solution + full) // 2
    first, view = budget_views(hf, samples, budget, "truncate_demonstration")
    assert not first.has_teacher  # sample 0 has no other success and no feedback
    prompt = list(view.tokens[:view.prompt_length])
    assert view.has_teacher and len(prompt) <= budget
    assert list(view.tokens[view.prompt_length:]) == samples[1].tokens[-samples[1].response_length:]
    kept = next(c for c in range(n_solution, -1, -1) if budget_teacher_ids(tok, samples, c, n_feedback) == prompt)
    assert 0 < kept < n_solution
    assert len(budget_teacher_ids(tok, samples, kept + 1, n_feedback)) > budget  # the longest prefix that fits
    text = tok.decode(prompt)
    assert BUDGET_QUESTION in text and BUDGET_FEEDBACK in text and BUDGET_SOLUTION[:kept] in text
    assert CLOSING_INSTRUCTION + "<|im_end|>" in text and "Answer briefly." in text

    # smaller: no solution prefix fits with the feedback, so the solution is left out and the feedback cut; the
    # question and the closing instruction stay
    budget = (bare + without_solution) // 2
    _, view = budget_views(hf, samples, budget, "truncate_demonstration")
    prompt = list(view.tokens[:view.prompt_length])
    assert view.has_teacher and len(prompt) <= budget
    kept = next(c for c in range(n_feedback, -1, -1) if budget_teacher_ids(tok, samples, None, c) == prompt)
    assert 0 < kept < n_feedback
    assert len(budget_teacher_ids(tok, samples, None, kept + 1)) > budget
    text = tok.decode(prompt)
    assert BUDGET_QUESTION in text and CLOSING_INSTRUCTION + "<|im_end|>" in text and "Correct solution" not in text

    # smaller than the question and the template's own text: excluded
    _, view = budget_views(hf, samples, bare - 1, "truncate_demonstration")
    assert not view.has_teacher and view.reason.startswith(REASON_OVER_BUDGET_AFTER_TRUNCATION)


@needs_slime
def test_over_budget_drop_and_error(thinking_tokenizer):
    hf, tok = thinking_tokenizer
    samples = budget_samples(tok)
    full = len(budget_teacher_ids(tok, samples, len(BUDGET_SOLUTION), len(BUDGET_FEEDBACK)))
    first, view = budget_views(hf, samples, full - 1, "drop")
    assert first.reason.startswith(REASON_NO_SOLUTION_NOR_FEEDBACK)
    assert not view.has_teacher and view.reason.startswith(REASON_OVER_BUDGET + ":")
    _, view = budget_views(hf, samples, full, "drop")
    assert view.has_teacher and view.prompt_length == full  # exactly at the budget fits
    with pytest.raises(SelfDistillDataError, match=r"sample index=1 .*over --self-distill-max-teacher-prompt-len"):
        budget_views(hf, samples, full - 1, "error")


# ------------------------------------------------------------------------------------- errors through the converter
def two_samples(tok, **second):
    student = [{"role": "user", "content": "what is 2 + 2"}]
    fields = dict(index=1, group_index=3, student=student, response="5", reward=0.0)
    fields.update(second)
    return [real_sample(tok, index=0, group_index=3, student=student, response="4", reward=1.0),
            real_sample(tok, **fields)]


@needs_slime
def test_converter_errors_name_the_sample(thinking_tokenizer):
    hf, tok = thinking_tokenizer
    args = converter_args(hf, rollout_batch_size=1, n_samples_per_prompt=2)
    samples = two_samples(tok)
    samples[1].group_index = None
    with pytest.raises(SelfDistillDataError, match=r"sample index=1 .*has no group_index"):
        convert_samples_to_train_data(args, samples)
    samples = two_samples(tok, feedback=7)
    with pytest.raises(SelfDistillDataError, match=r"sample index=1 .*metadata's 'feedback' is a int"):
        convert_samples_to_train_data(args, samples)
    samples = two_samples(tok, reward_key="score", feedback=["not", "text"], feedback_in="reward")
    samples[0].reward = {"score": 1.0}
    with pytest.raises(SelfDistillDataError, match=r"sample index=1 .*reward dict's 'feedback' is a list"):
        convert_samples_to_train_data(converter_args(hf, rollout_batch_size=1, n_samples_per_prompt=2,
                                                     reward_key="score"), samples)
    samples = two_samples(tok)
    del samples[1].metadata[PLUGIN_METADATA_KEY]
    with pytest.raises(SelfDistillDataError, match=r"sample index=1 .*no raw student prompt"):
        convert_samples_to_train_data(args, samples)


@needs_slime
@pytest.mark.parametrize("estimator", ["ppo", "grpo"])  # grpo normalizes the rewards: checked before that
@pytest.mark.parametrize("reward,reward_key,message", [
    ({"score": 0.0}, None, "name its value with --reward-key"),
    ("0.0", None, "is not a number"),
    (None, None, "is not a number"),
    ({"score": "low"}, "score", "is not a number"),
])
def test_converter_reward_errors_name_the_sample(thinking_tokenizer, estimator, reward, reward_key, message):
    hf, tok = thinking_tokenizer
    samples = two_samples(tok)
    samples[1].reward = reward
    if reward_key:
        samples[0].reward = {reward_key: 1.0}
    args = converter_args(hf, advantage_estimator=estimator, reward_key=reward_key, rollout_batch_size=1,
                          n_samples_per_prompt=2)
    with pytest.raises(SelfDistillDataError, match=rf"sample index=1 .*{message}"):
        convert_samples_to_train_data(args, samples)


# ------------------------------------------------------------------------------------------ user-defined builders
BUILDER_CALLS: list = []


def builder_for_test(args, group):
    """One teacher prompt per sample: chat messages naming the group's best response, a plain string, or None for
    a sample whose reward is negative."""
    BUILDER_CALLS.append([s.index for s in group])
    best = max(group, key=lambda s: s.reward)
    prompts = []
    for sample in group:
        if sample.reward < 0:
            prompts.append(None)
        elif sample.index % 2:
            prompts.append(f"plain teacher prompt for {sample.index} (group of {len(group)})")
        else:
            prompts.append([{"role": "system", "content": "Teacher."},
                            {"role": "user", "content": f"best so far: sample {best.index}; now {sample.index}"}])
    return prompts


def builder_with_a_wrong_count(args, group):
    return [None] * (len(group) + 1)


def builder_with_a_bad_entry(args, group):
    return [[{"role": "user"}]] * len(group)


def expected_builder_prompt(sample, group):
    if sample.reward < 0:
        return None
    if sample.index % 2:
        return f"plain teacher prompt for {sample.index} (group of {len(group)})"
    best = max(group, key=lambda s: s.reward)
    return [{"role": "system", "content": "Teacher."},
            {"role": "user", "content": f"best so far: sample {best.index}; now {sample.index}"}]


@needs_slime
def test_user_defined_builder_gives_the_views_it_says(thinking_tokenizer, monkeypatch):
    from slime.rollout.sample_hooks import set_current_rollout_id

    hf, tok = thinking_tokenizer
    rng = random.Random(21)
    student = [{"role": "user", "content": "student question"}]
    specs = [(group, rng.choice((-1.0, 0.0, 1.0))) for group in (4, 9, 4, 2, 9, 4, 2, 2)]  # interleaved groups
    samples = [real_sample(tok, index=i, group_index=g, student=student, response=f"answer {i}", reward=r)
               for i, (g, r) in enumerate(specs)]
    for sample in samples:  # a builder needs no raw student prompt
        del sample.metadata[PLUGIN_METADATA_KEY]
    BUILDER_CALLS.clear()
    args = converter_args(hf, rollout_batch_size=1, n_samples_per_prompt=8, self_distill_teacher_context=None,
                          self_distill_teacher_context_path=f"{__name__}.builder_for_test",
                          self_distill_max_teacher_prompt_len=1000, self_distill_teacher_overflow="drop")
    logged = capture_slime_log(monkeypatch)
    set_current_rollout_id(2)
    views = convert_samples_to_train_data(args, copy.deepcopy(samples))[PAYLOAD_KEY]
    groups = {}
    for sample in samples:
        groups.setdefault(sample.group_index, []).append(sample)
    assert BUILDER_CALLS == [[s.index for s in group] for group in groups.values()]  # first-appearance order
    n_with = sum(s.reward >= 0 for s in samples)
    assert 0 < n_with < len(samples)
    for sample, view in zip(samples, views):
        prompt = expected_builder_prompt(sample, groups[sample.group_index])
        if prompt is None:
            assert not view.has_teacher and view.reason.startswith(REASON_BUILDER_NONE)
            assert "builder_for_test" in view.reason
            continue
        r = sample.response_length
        assert list(view.tokens) == render_ids(tok, prompt, {"enable_thinking": False}) + sample.tokens[-r:]
        assert view.loss_weight == pytest.approx(len(samples) / n_with)
    ((metrics, _),) = logged
    assert metrics[CONTEXT_METRICS_PREFIX + "distilled_sample_fraction"] == pytest.approx(n_with / len(samples))
    assert not any(name.startswith(CONTEXT_METRICS_PREFIX + "success") for name in metrics)  # no SDPO fractions


@needs_slime
@pytest.mark.parametrize("builder,message", [
    ("builder_with_a_wrong_count", r"returned 3 entries for the group of sample index=0 .* with 2 samples"),
    ("builder_with_a_bad_entry", r"returned \[\{'role': 'user'\}\] for sample index=0 "),
])
def test_user_defined_builder_errors_name_the_sample(thinking_tokenizer, builder, message):
    hf, tok = thinking_tokenizer
    args = converter_args(hf, rollout_batch_size=1, n_samples_per_prompt=2, self_distill_teacher_context=None,
                          self_distill_teacher_context_path=f"{__name__}.{builder}")
    with pytest.raises(SelfDistillDataError, match=message):
        convert_samples_to_train_data(args, two_samples(tok))


def test_builder_path_excludes_sdpo_and_truncation():
    with pytest.raises(ConfigError, match="teacher-context-path"):
        SelfDistillConfig(teacher_context="sdpo", teacher_context_path="pkg.build")
    with pytest.raises(ConfigError, match="truncate_demonstration"):
        SelfDistillConfig(teacher_context_path="pkg.build", max_teacher_prompt_len=10,
                          teacher_overflow="truncate_demonstration")


# ---------------------------------------------------------------------------------------------------- metrics
def test_context_metrics_are_the_fractions_and_teacher_prompt_lengths():
    views = [TeacherView((1, 2, 3, 9), 1, True, 2.0), TeacherView((), 2, False, 0.0, reason="no"),
             TeacherView((1, 2, 3, 4, 5, 6, 9, 9), 2, True, 2.0), TeacherView((), 1, False, 0.0, reason="no")]
    got = context_metrics({"success_group_fraction": 0.25}, views)
    assert got == {CONTEXT_METRICS_PREFIX + "success_group_fraction": 0.25,
                   CONTEXT_METRICS_PREFIX + "distilled_sample_fraction": 0.5,
                   CONTEXT_METRICS_PREFIX + "teacher_prompt_len_mean": 4.5,  # prompts of 3 and 6 tokens
                   CONTEXT_METRICS_PREFIX + "teacher_prompt_len_max": 6,
                   CONTEXT_METRICS_PREFIX + "teacher_prompt_len_min": 3}
    assert context_metrics({}, views[1::2]) == {CONTEXT_METRICS_PREFIX + "distilled_sample_fraction": 0.0}


@needs_slime
@pytest.mark.parametrize("train_step", [False, True])
def test_log_context_metrics_logs_at_slimes_rollout_step(monkeypatch, train_step):
    from slime.observability.metric_utils import compute_rollout_step
    from slime.rollout.sample_hooks import set_current_rollout_id

    logged = capture_slime_log(monkeypatch)
    args = Namespace(wandb_always_use_train_step=train_step, rollout_batch_size=8, n_samples_per_prompt=4,
                     global_batch_size=16)
    views = [TeacherView((1, 2, 9), 1, True, 1.0)]
    log_context_metrics(args, {"reprompt_sample_fraction": 1.0}, views)
    assert logged == []  # no current rollout (e.g. outside RolloutManager.generate): nothing logged

    set_current_rollout_id(5)
    log_context_metrics(args, {"reprompt_sample_fraction": 1.0}, views)
    step = 5 * 8 * 4 // 16 if train_step else 5
    assert compute_rollout_step(args, 5) == step
    assert logged == [({**context_metrics({"reprompt_sample_fraction": 1.0}, views), "rollout/step": step},
                       "rollout/step")]

    args.load_debug_rollout_data = "/some/dump"  # slime logs no rollout metrics then either
    log_context_metrics(args, {"reprompt_sample_fraction": 1.0}, views)
    assert len(logged) == 1
