"""The converter: slime's default train data rebuilt, plus one TeacherView per sample.

The first part runs without slime (sample-like namespaces, the small real tokenizer); the last part runs slime's
real ``Sample`` objects through both slime's own default converter and ours and compares every key.
"""

from __future__ import annotations

import copy
import functools
import logging
import random
import statistics
from argparse import Namespace
from types import SimpleNamespace

import pytest

from slime_self_distill.config import SelfDistillConfig
from slime_self_distill.custom_convert import (
    REASON_EMPTY_RESPONSE,
    REASON_OVER_BUDGET,
    REASON_OVER_BUDGET_AFTER_TRUNCATION,
    REASON_REMOVED,
    build_teacher_views,
    convert_samples_to_train_data,
    fill_rollout_ids,
    normalize_rewards,
    restrict_loss_masks,
    rollout_mask_sums,
    student_prompt_of,
)
from slime_self_distill.data_source import (
    MISSING_TEACHER_REASON_KEY,
    PLUGIN_METADATA_KEY,
    TEACHER_PROMPT_TEXT_KEY,
    SelfDistillDataError,
)
from slime_self_distill.teacher_view import PAYLOAD_KEY, TeacherView
from tests.slime_support import needs_slime
from tests.tokenizer_factory import make_tokenizer, save_tokenizer

WORDS = "the quick brown fox jumps over lazy dog what is 12 + 30 answer question response verified solution".split()


def encode(text):
    return make_tokenizer().encode(text, add_special_tokens=False)


def teacher_sample(index, prompt_len, response_len, teacher_text=None, *, missing_reason=None, rng=None, **fields):
    rng = rng or random.Random(index)
    plugin = {MISSING_TEACHER_REASON_KEY: missing_reason} if missing_reason else {TEACHER_PROMPT_TEXT_KEY: teacher_text}
    sample = SimpleNamespace(
        index=index,
        group_index=index // 2,
        prompt=f"student prompt {index}",
        tokens=[rng.randrange(400) for _ in range(prompt_len + response_len)],
        response_length=response_len,
        loss_mask=None,
        remove_sample=False,
        metadata={PLUGIN_METADATA_KEY: plugin},
    )
    for name, value in fields.items():
        setattr(sample, name, value)
    return sample


def random_text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


# ---------------------------------------------------------------------------------------- reward processing
def reference_normalization(raw, group_size, std_scale):
    """float64 reference: center (and scale by the unbiased std + 1e-6) within each group of ``group_size``."""
    out = []
    for start in range(0, len(raw), group_size):
        group = [float(r) for r in raw[start:start + group_size]]
        mean = sum(group) / len(group)
        centered = [r - mean for r in group]
        if std_scale:
            std = statistics.stdev(centered)
            centered = [c / (std + 1e-6) for c in centered]
        out.extend(centered)
    return out


@pytest.mark.parametrize("estimator,std_flag,std_scale", [
    ("grpo", True, True), ("gspo", True, True), ("cispo", True, True), ("grpo", False, False),
    ("reinforce_plus_plus_baseline", True, False),
])
def test_normalize_rewards_full_batch_is_per_group(estimator, std_flag, std_scale):
    rng = random.Random(1)
    raw = [rng.uniform(-2, 3) for _ in range(12)]
    got = normalize_rewards(raw, advantage_estimator=estimator, rewards_normalization=True,
                            grpo_std_normalization=std_flag, n_samples_per_prompt=4, rollout_batch_size=3)
    assert got == pytest.approx(reference_normalization(raw, 4, std_scale), rel=1e-5, abs=1e-5)


def test_normalize_rewards_partial_batch_is_one_group_like_slime():
    rng = random.Random(2)
    raw = [rng.uniform(0, 1) for _ in range(10)]  # not 4 x 3: slime normalizes over the whole batch
    got = normalize_rewards(raw, advantage_estimator="grpo", rewards_normalization=True,
                            grpo_std_normalization=True, n_samples_per_prompt=4, rollout_batch_size=3)
    assert got == pytest.approx(reference_normalization(raw, len(raw), True), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("estimator,normalization", [("ppo", True), ("grpo", False), ("reinforce_plus_plus", True)])
def test_normalize_rewards_leaves_raw_rewards_otherwise(estimator, normalization):
    raw = [0.25, 1.0, -3.0, 7.5]
    got = normalize_rewards(raw, advantage_estimator=estimator, rewards_normalization=normalization,
                            grpo_std_normalization=True, n_samples_per_prompt=2, rollout_batch_size=2)
    assert got == raw


def test_fill_rollout_ids_keeps_given_ids_and_fills_the_smallest_free_ones():
    assert fill_rollout_ids([None, 0, None, 2, None]) == [1, 0, 3, 2, 4]
    rng = random.Random(3)
    for _ in range(50):
        ids = [rng.choice([None, rng.randrange(8)]) for _ in range(rng.randrange(1, 12))]
        filled = fill_rollout_ids(ids)
        assert all(f == i for f, i in zip(filled, ids) if i is not None)
        fresh = [f for f, i in zip(filled, ids) if i is None]
        assert len(set(fresh)) == len(fresh) and not set(fresh) & {i for i in ids if i is not None}
        assert fresh == sorted(fresh)


def test_rollout_mask_sums_totals_each_rollout():
    ids = [5, 1, 5, 2, 1]
    masks = [[1, 0, 1], [1], [1, 1], [], [0, 1, 1, 1]]
    expected = [4, 4, 4, 0, 4]  # rollout 5: 2 + 2, rollout 1: 1 + 3, rollout 2: 0
    assert rollout_mask_sums(ids, masks) == expected


# ------------------------------------------------------------------------------------------ teacher views
def test_alignment_invariant_on_random_samples():
    rng = random.Random(4)
    config = SelfDistillConfig()
    samples, texts = [], []
    for i in range(200):
        text = random_text(rng, rng.randrange(1, 30))
        texts.append(text)
        samples.append(teacher_sample(i, rng.randrange(1, 40), rng.randrange(1, 60), text, rng=rng))
    views = build_teacher_views(samples, encode=encode, config=config)
    assert len(views) == len(samples)
    tok = make_tokenizer()
    for sample, text, view in zip(samples, texts, views):
        r = sample.response_length
        assert view.has_teacher and view.response_length == r
        assert list(view.tokens[-r:]) == sample.tokens[-r:]
        assert list(view.tokens[:-r]) == tok.encode(text, add_special_tokens=False)
        assert view.loss_weight == 1.0


def test_multi_turn_mask_zeros_keep_the_whole_response_and_the_mask():
    mask = [1, 1, 0, 0, 0, 1, 1, 0, 1]
    sample = teacher_sample(0, 5, len(mask), "what is 12 + 30", loss_mask=list(mask))
    (view,) = build_teacher_views([sample], encode=encode, config=SelfDistillConfig())
    assert list(view.tokens[-len(mask):]) == sample.tokens[-len(mask):]
    assert sample.loss_mask == mask  # the converter never edits the student's mask


def test_loss_weights_and_reasons_with_some_samples_excluded():
    config = SelfDistillConfig(missing_teacher="exclude")
    samples = [
        teacher_sample(0, 3, 4, "the quick brown fox"),
        teacher_sample(1, 3, 4, missing_reason="missing_teacher: no teacher prompt in metadata['teacher_prompt']"),
        teacher_sample(2, 3, 0, "the lazy dog"),
        teacher_sample(3, 3, 5, "what is 12 + 30", remove_sample=True),
        teacher_sample(4, 3, 2, "answer the question"),
        teacher_sample(5, 3, 6, "verified solution"),
    ]
    views = build_teacher_views(samples, encode=encode, config=config)
    with_teacher = [v for v in views if v.has_teacher]
    assert [v.has_teacher for v in views] == [True, False, False, False, True, True]
    for v in with_teacher:
        assert v.loss_weight == pytest.approx(len(samples) / len(with_teacher))
    assert sum(v.loss_weight for v in views) == pytest.approx(len(samples))  # the mean over teachers keeps its scale
    assert views[1].reason.startswith("missing_teacher")
    assert views[2].reason.startswith(REASON_EMPTY_RESPONSE) and views[2].response_length == 0
    assert views[3].reason.startswith(REASON_REMOVED)
    assert all(v.tokens == () and v.loss_weight == 0.0 for v in views if not v.has_teacher)


def test_samples_without_teacher_and_skipped_tokens_leave_slimes_denominators():
    views = [TeacherView((5, 6, 7), 2, True, 1.5), TeacherView((), 3, False, 0.0, reason="no teacher prompt"),
             TeacherView((1, 2, 3, 4), 1, True, 1.5), TeacherView((1, 2, 3, 4, 5, 6), 4, True, 1.5)]
    data = {PAYLOAD_KEY: views, "loss_masks": [[1, 0], [1, 1, 1], [1], [1, 1, 0, 1]], "rollout_ids": [0, 0, 1, 2],
            "rollout_mask_sums": [4, 4, 1, 3]}
    masked = restrict_loss_masks(dict(data), 0)
    assert masked["loss_masks"] == [[1, 0], [0, 0, 0], [1], [1, 1, 0, 1]]
    assert masked["rollout_mask_sums"] == [1, 1, 1, 3]
    skipped = restrict_loss_masks(dict(data), 2)  # the first two tokens of every sample leave the loss
    assert skipped["loss_masks"] == [[0, 0], [0, 0, 0], [0], [0, 0, 0, 1]]
    assert skipped["rollout_mask_sums"] == [0, 0, 0, 1]


def test_no_sample_with_a_teacher_gives_all_zero_weights_and_a_warning(caplog):
    samples = [teacher_sample(i, 2, 3, missing_reason="missing_teacher: empty teacher prompt") for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="slime_self_distill.custom_convert"):
        views = build_teacher_views(samples, encode=encode, config=SelfDistillConfig(missing_teacher="exclude"))
    assert all(not v.has_teacher and v.loss_weight == 0.0 for v in views)
    assert "none of the 3 samples has a teacher" in caplog.text


def test_sample_not_annotated_by_the_data_source_is_an_error():
    sample = teacher_sample(7, 2, 3, "x")
    sample.metadata = {"teacher_prompt": "raw, never rendered"}
    with pytest.raises(SelfDistillDataError, match=r"index=7.*SelfDistillRolloutDataSource"):
        build_teacher_views([sample], encode=encode, config=SelfDistillConfig())


def test_response_length_longer_than_tokens_is_an_error():
    sample = teacher_sample(3, 2, 3, "x")
    sample.response_length = 9
    with pytest.raises(SelfDistillDataError, match="response_length 9 does not fit in its 5 tokens"):
        build_teacher_views([sample], encode=encode, config=SelfDistillConfig())


def test_overflow_error_names_the_sample_sizes_and_fix():
    long_text = " ".join(WORDS * 3)
    n = len(encode(long_text))
    sample = teacher_sample(11, 4, 3, long_text)
    with pytest.raises(SelfDistillDataError) as err:
        build_teacher_views([sample], encode=encode, config=SelfDistillConfig(max_teacher_prompt_len=n - 1))
    message = str(err.value)
    assert "index=11" in message and f"{n} tokens" in message and f"={n - 1}" in message
    assert "--self-distill-teacher-overflow drop" in message


def test_overflow_drop_excludes_only_the_long_samples():
    short, long_text = "the dog", " ".join(WORDS * 2)
    budget = len(encode(short))
    samples = [teacher_sample(0, 2, 3, short), teacher_sample(1, 2, 3, long_text), teacher_sample(2, 2, 3, short)]
    views = build_teacher_views(samples, encode=encode,
                                config=SelfDistillConfig(max_teacher_prompt_len=budget, teacher_overflow="drop"))
    assert [v.has_teacher for v in views] == [True, False, True]
    assert views[1].reason.startswith(REASON_OVER_BUDGET) and str(len(encode(long_text))) in views[1].reason
    assert views[0].loss_weight == pytest.approx(1.5)
    assert len(views[0].tokens) - 3 == budget  # exactly at the budget is allowed


# ------------------------------------------------------------------------------ truncate_demonstration path
def truncation_sample(index, question, demonstration, template, *, apply_chat_template):
    from slime_self_distill.data.templates import build_teacher_prompt, render_prompt

    student = [{"role": "user", "content": question}] if apply_chat_template else question
    teacher = build_teacher_prompt(student, demonstration, template)
    text = render_prompt(teacher, make_tokenizer(), apply_chat_template=apply_chat_template,
                         apply_chat_template_kwargs=None)
    sample = teacher_sample(index, 4, 5, text)
    sample.metadata[PLUGIN_METADATA_KEY].update(demonstration=demonstration, template=template)
    sample.metadata["teacher_prompt"] = teacher
    return sample, student


def render_with(apply_chat_template):
    from slime_self_distill.data.templates import render_prompt

    def render(prompt, tools):
        return render_prompt(prompt, make_tokenizer(), apply_chat_template=apply_chat_template,
                             apply_chat_template_kwargs=None, tools=tools)

    return render


@pytest.mark.parametrize("template", [
    "Question: {prompt}\nExample: {demonstration}\nNow answer.",
    "{demonstration}\n---\n{prompt}",
    "Use {{braces}}: {prompt} / {demonstration} / again {prompt}",
])
def test_student_prompt_is_recovered_from_the_teacher_prompt(template):
    from slime_self_distill.data.templates import build_teacher_prompt

    rng = random.Random(8)
    for _ in range(30):
        question = random_text(rng, rng.randrange(0, 8)) + rng.choice(["", " (a+b)*[c]?", "\nline two", " {x}"])
        demonstration = random_text(rng, rng.randrange(0, 10))
        assert student_prompt_of(build_teacher_prompt(question, demonstration, template), demonstration,
                                 template) == question
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
                    {"role": "assistant", "content": "ok"}, {"role": "user", "content": question}]
        teacher = build_teacher_prompt(messages, demonstration, template)
        assert student_prompt_of(teacher, demonstration, template) == messages


def test_student_prompt_of_a_teacher_prompt_not_built_from_the_template_is_none():
    template = "Question: {prompt}\nExample: {demonstration}"
    assert student_prompt_of("Question: q\nExample: other demo", "the demo", template) is None
    assert student_prompt_of([{"role": "user", "content": "free text"}], "d", template) is None
    assert student_prompt_of("Question: q\nExample: d", "d", "{prompt!r} {demonstration}") is None


@pytest.mark.parametrize("apply_chat_template", [False, True])
def test_truncate_demonstration_fits_the_budget_and_keeps_the_question(apply_chat_template):
    from slime_self_distill.data.templates import build_teacher_prompt

    template = "Question: {prompt}\nExample: {demonstration}\nNow answer."
    demonstration = " ".join(WORDS * 4)
    sample, student = truncation_sample(0, "what is 12 + 30", demonstration, template,
                                        apply_chat_template=apply_chat_template)
    render = render_with(apply_chat_template)
    full = len(encode(sample.metadata[PLUGIN_METADATA_KEY][TEACHER_PROMPT_TEXT_KEY]))
    without_demo = len(encode(render(build_teacher_prompt(student, "", template), None)))
    budget = (full + without_demo) // 2
    config = SelfDistillConfig(max_teacher_prompt_len=budget, teacher_overflow="truncate_demonstration")
    (view,) = build_teacher_views([sample], encode=encode, config=config, render=render)
    assert view.has_teacher and without_demo < view.prompt_length <= budget
    prompt_text = make_tokenizer().decode(list(view.tokens[:view.prompt_length]))
    assert "what is 12 + 30" in prompt_text and "Now answer." in prompt_text
    assert list(view.tokens[-5:]) == sample.tokens[-5:]


def test_truncate_demonstration_drops_when_the_question_alone_is_over_budget():
    from slime_self_distill.data.templates import build_teacher_prompt

    template = "Question: {prompt}\nExample: {demonstration}"
    sample, student = truncation_sample(0, "what is 12 + 30", "the quick brown fox", template,
                                        apply_chat_template=False)
    without_demo = len(encode(build_teacher_prompt(student, "", template)))
    config = SelfDistillConfig(max_teacher_prompt_len=without_demo - 1, teacher_overflow="truncate_demonstration")
    (view,) = build_teacher_views([sample], encode=encode, config=config, render=render_with(False))
    assert not view.has_teacher and view.reason.startswith(REASON_OVER_BUDGET_AFTER_TRUNCATION)


def test_truncate_demonstration_without_demonstration_metadata_is_an_error():
    sample = teacher_sample(5, 2, 3, " ".join(WORDS))
    config = SelfDistillConfig(max_teacher_prompt_len=3, teacher_overflow="truncate_demonstration")
    with pytest.raises(SelfDistillDataError, match=r"index=5.*prepare_dataset"):
        build_teacher_views([sample], encode=encode, config=config, render=render_with(False))


# ------------------------------------------------------------------------------- against slime's real code
def slime_args(hf_checkpoint, **overrides):
    values = dict(
        hf_checkpoint=hf_checkpoint, advantage_estimator="grpo", rewards_normalization=True,
        grpo_std_normalization=True, n_samples_per_prompt=2, rollout_batch_size=3, reward_key=None,
        custom_reward_post_process_path=None, rollout_top_p=1.0, use_rollout_routing_replay=False,
        apply_chat_template=False, apply_chat_template_kwargs=None,
    )
    values.update(overrides)
    return Namespace(**values)


@functools.lru_cache(maxsize=None)
def slime_default_converter():
    """slime's own ``RolloutManager._convert_samples_to_train_data`` (the class under Ray's actor wrapper)."""
    from slime.ray.rollout import RolloutManager

    return RolloutManager.__ray_metadata__.modified_class


def slime_default_train_data(args, samples):
    manager_cls = slime_default_converter()
    manager = SimpleNamespace(args=args, custom_convert_samples_to_train_data_func=None,
                              custom_reward_post_process_func=None)
    manager._post_process_rewards = functools.partial(manager_cls._post_process_rewards, manager)
    return manager_cls._convert_samples_to_train_data(manager, samples)


def real_samples(rng, n, *, with_log_probs=False, teacher_log_probs=False, train_metadata=False, rollout_ids=True):
    from slime.utils.types import Sample

    samples = []
    statuses = [Sample.Status.COMPLETED, Sample.Status.TRUNCATED, Sample.Status.FAILED, Sample.Status.ABORTED]
    for i in range(n):
        prompt_len, response_len = rng.randrange(1, 20), rng.randrange(0, 25)
        teacher_text = random_text(rng, rng.randrange(1, 20))
        sample = Sample(
            index=i, group_index=i // 2, rollout_id=(i if rollout_ids and rng.random() < 0.7 else None),
            prompt=random_text(rng, 4),
            tokens=[rng.randrange(400) for _ in range(prompt_len + response_len)],
            response_length=response_len, reward=rng.uniform(-1, 1), status=rng.choice(statuses),
            remove_sample=rng.random() < 0.15,
            loss_mask=[rng.choice([0, 1, 1]) for _ in range(response_len)] if rng.random() < 0.5 else None,
            metadata={PLUGIN_METADATA_KEY: {TEACHER_PROMPT_TEXT_KEY: teacher_text}},
        )
        if rng.random() < 0.3:
            sample.metadata["raw_reward"] = rng.uniform(5, 6)
        if rng.random() < 0.3:
            sample.metadata["source_name"] = "math"
        if with_log_probs:
            sample.rollout_log_probs = [-rng.random() for _ in range(response_len)]
        if teacher_log_probs:
            sample.teacher_log_probs = [-rng.random() for _ in range(response_len)]
        if train_metadata:
            sample.train_metadata = {"loss": "x", "i": i}
        samples.append(sample)
    return samples


def assert_same_train_data(ours, theirs):
    assert set(ours) - {PAYLOAD_KEY} == set(theirs)
    for key, expected in theirs.items():
        assert ours[key] == expected, key


@pytest.mark.parametrize("case", [
    dict(args={}, samples={}),
    dict(args={"rollout_batch_size": 4}, samples={"with_log_probs": True, "teacher_log_probs": True}),
    dict(args={"advantage_estimator": "ppo"}, samples={"train_metadata": True, "rollout_ids": False}),
    dict(args={"advantage_estimator": "reinforce_plus_plus_baseline"}, samples={}),
])
@pytest.mark.parametrize("seed", [0, 1])
@needs_slime
def test_default_fields_equal_slimes_default_converter(tmp_path, case, seed):
    hf = save_tokenizer(tmp_path / "tok")
    args = slime_args(hf, **case["args"])
    samples = real_samples(random.Random(seed), 6, **case["samples"])
    ours = convert_samples_to_train_data(args, copy.deepcopy(samples))
    theirs = slime_default_train_data(args, copy.deepcopy(samples))
    assert_same_train_data(ours, theirs)


@needs_slime
def test_round_number_and_top_p_fields_equal_slimes(tmp_path):
    hf = save_tokenizer(tmp_path / "tok")
    args = slime_args(hf, rollout_top_p=0.9)
    rng = random.Random(5)
    samples = real_samples(rng, 6)
    for s in samples:
        s.metadata["round_number"] = rng.randrange(3)
        widths = [rng.randrange(1, 4) for _ in range(s.response_length)]
        s.rollout_top_p_token_offsets = [sum(widths[:k]) for k in range(len(widths) + 1)]
        s.rollout_top_p_token_ids = [rng.randrange(400) for _ in range(sum(widths))]
    ours = convert_samples_to_train_data(args, copy.deepcopy(samples))
    assert_same_train_data(ours, slime_default_train_data(args, copy.deepcopy(samples)))
    assert "round_number" in ours and "rollout_top_p_token_ids" in ours


@needs_slime
def test_converter_teacher_views_on_real_samples(tmp_path):
    hf = save_tokenizer(tmp_path / "tok")
    args = slime_args(hf, rollout_batch_size=20)
    rng = random.Random(6)
    samples = real_samples(rng, 40)
    data = convert_samples_to_train_data(args, copy.deepcopy(samples))
    views = data[PAYLOAD_KEY]
    tok = make_tokenizer()
    assert len(views) == len(samples) and all(isinstance(v, TeacherView) for v in views)
    expected_teacher = [not s.remove_sample and s.response_length > 0 for s in samples]
    assert [v.has_teacher for v in views] == expected_teacher
    weight = len(samples) / sum(expected_teacher)
    for sample, view in zip(samples, views):
        assert view.response_length == sample.response_length
        if view.has_teacher:
            r = sample.response_length
            assert list(view.tokens[-r:]) == sample.tokens[-r:]
            text = sample.metadata[PLUGIN_METADATA_KEY][TEACHER_PROMPT_TEXT_KEY]
            assert list(view.tokens[:-r]) == tok.encode(text, add_special_tokens=False)
            assert view.loss_weight == pytest.approx(weight)


@needs_slime
def test_custom_reward_post_process_path_is_honoured(tmp_path):
    hf = save_tokenizer(tmp_path / "tok")
    args = slime_args(hf, custom_reward_post_process_path=f"{__name__}.reward_post_process_for_test")
    samples = real_samples(random.Random(7), 6)
    ours = convert_samples_to_train_data(args, copy.deepcopy(samples))
    assert ours["rewards"] == [10.0 * s.reward for s in samples]
    manager_args = copy.copy(args)
    theirs = slime_default_converter()
    manager = SimpleNamespace(args=manager_args, custom_convert_samples_to_train_data_func=None,
                              custom_reward_post_process_func=reward_post_process_for_test)
    manager._post_process_rewards = functools.partial(theirs._post_process_rewards, manager)
    assert_same_train_data(ours, theirs._convert_samples_to_train_data(manager, copy.deepcopy(samples)))


def reward_post_process_for_test(args, samples):
    raw = [s.reward for s in samples]
    return raw, [10.0 * r for r in raw]



@needs_slime
@pytest.mark.parametrize("apply_chat_template", [True, False])
def test_data_source_then_converter_end_to_end(tmp_path, apply_chat_template):
    """Rows -> slime's data source (ours) -> simulated generation -> converter: the teacher reads the rendered
    teacher prompt, the demonstration is shortened to the budget, rows without a teacher are excluded."""
    import json

    from slime_self_distill.data.templates import TEMPLATES, build_teacher_prompt
    from slime_self_distill.data_source import SelfDistillRolloutDataSource

    template = TEMPLATES["sdft"]
    rows = []
    for i in range(6):
        question = f"what is {i} + 30?"
        demonstration = " ".join(WORDS[: 3 + 2 * i])
        student = [{"role": "user", "content": question}] if apply_chat_template else question
        metadata = {"row": i}
        if i != 3:  # row 3 has no teacher prompt
            metadata.update(teacher_prompt=build_teacher_prompt(student, demonstration, template),
                            self_distill={"demonstration": demonstration, "template": template})
        rows.append({"prompt": student, "metadata": metadata})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = make_tokenizer()
    kwargs = {"enable_thinking": False} if apply_chat_template else {}

    def rendered_ids(teacher_prompt):
        text = (tok.apply_chat_template(teacher_prompt, tokenize=False, add_generation_prompt=True, **kwargs)
                if apply_chat_template else teacher_prompt)
        return tok.encode(text, add_special_tokens=False)

    full_lengths = [len(rendered_ids(r["metadata"]["teacher_prompt"]))
                    for r in rows if "teacher_prompt" in r["metadata"]]
    budget = sorted(full_lengths)[2]  # some rows fit as they are, the others must be shortened
    args = slime_args(
        save_tokenizer(tmp_path / "tok"), rollout_batch_size=6, apply_chat_template=apply_chat_template,
        apply_chat_template_kwargs=kwargs, rollout_global_dataset=True, prompt_data=str(tmp_path / "rows.jsonl"),
        dump_details=None, rollout_max_prompt_len=None, input_key="prompt", multimodal_keys=None, label_key=None,
        metadata_key="metadata", tool_key=None, rollout_seed=1, rollout_shuffle=False, buffer_filter_path=None,
        save=None, load=None, self_distill_missing_teacher="exclude", self_distill_max_teacher_prompt_len=budget,
        self_distill_teacher_overflow="truncate_demonstration",
    )
    rng = random.Random(9)
    samples = [s for group in SelfDistillRolloutDataSource(args).get_samples(6) for s in group]
    for sample in samples:  # what the rollout does: encode the prompt, append sampled response ids
        response = [rng.randrange(400) for _ in range(rng.randrange(1, 12))]
        sample.tokens = tok.encode(sample.prompt, add_special_tokens=False) + response
        sample.response_length, sample.reward = len(response), rng.random()
    views = convert_samples_to_train_data(args, samples)[PAYLOAD_KEY]

    n_with = sum("teacher_prompt" in s.metadata for s in samples)
    shortened = 0
    for sample, view in zip(samples, views):
        row = rows[sample.metadata["row"]]
        if "teacher_prompt" not in row["metadata"]:
            assert not view.has_teacher and view.reason.startswith("missing_teacher")
            continue
        r = sample.response_length
        assert view.has_teacher and view.loss_weight == pytest.approx(len(samples) / n_with)
        assert list(view.tokens[-r:]) == sample.tokens[-r:]
        teacher_ids = list(view.tokens[:-r])
        assert len(teacher_ids) <= budget
        full = row["metadata"]["teacher_prompt"]
        if len(rendered_ids(full)) <= budget:
            assert teacher_ids == rendered_ids(full)
        else:  # the longest demonstration prefix that fits, the question intact
            shortened += 1
            demonstration = row["metadata"]["self_distill"]["demonstration"]
            kept = next(k for k in range(len(demonstration), -1, -1) if teacher_ids == rendered_ids(
                build_teacher_prompt(row["prompt"], demonstration[:k], template)))
            assert kept < len(demonstration)
            longer = build_teacher_prompt(row["prompt"], demonstration[:kept + 1], template)
            assert len(rendered_ids(longer)) > budget
    assert shortened > 0


@needs_slime
def test_use_rollout_logprobs_without_rollout_log_probs_is_refused(tmp_path):
    hf = save_tokenizer(tmp_path / "tok")
    samples = real_samples(random.Random(8), 4)
    with pytest.raises(SelfDistillDataError, match="--use-rollout-logprobs .* has no rollout_log_probs"):
        convert_samples_to_train_data(slime_args(hf, use_rollout_logprobs=True), copy.deepcopy(samples))
    with_log_probs = real_samples(random.Random(8), 4, with_log_probs=True)
    data = convert_samples_to_train_data(slime_args(hf, use_rollout_logprobs=True), with_log_probs)
    assert len(data["rollout_log_probs"]) == 4


@needs_slime
def test_skipped_leading_tokens_leave_the_loss_masks_of_real_samples(tmp_path):
    hf = save_tokenizer(tmp_path / "tok")
    samples = [s for s in real_samples(random.Random(9), 12) if not s.remove_sample]
    plain = convert_samples_to_train_data(slime_args(hf), copy.deepcopy(samples))
    skipped = convert_samples_to_train_data(slime_args(hf, self_distill_num_loss_tokens_to_skip=3),
                                            copy.deepcopy(samples))
    for before, after in zip(plain["loss_masks"], skipped["loss_masks"]):
        assert after == [0] * min(3, len(before)) + before[3:]
    assert skipped["rollout_mask_sums"] == rollout_mask_sums(skipped["rollout_ids"], skipped["loss_masks"])
