"""SD-Zero's self-revision teacher context, against the official construction written out here from its description
(princeton-pli/Self-Distillation-Zero ``distillation.py`` ``_phase2_build_teacher_message_log``, notes in the README):
teacher ids = the student's prompt ids + its response ids + ids("\\n\\n" + P_r + "\\n\\n"), then the response ids again,
P_r chosen by the reward, the delimiter tokenized on its own, the ids concatenated and never re-tokenized.

Through slime's real ``Sample``, data source and converter, with a tokenizer whose pre-tokenizer keeps punctuation
and the newlines after it together (as Qwen's does), so that tokenizing the joined text would merge across the
response / delimiter boundary while the official concatenation does not.
"""

from __future__ import annotations

import copy
from argparse import Namespace

import pytest

from slime_self_distill.config import ConfigError, SelfDistillConfig
from slime_self_distill.contexts.self_revision import revision_delimiter, self_revision_contexts
from slime_self_distill.custom_convert import REASON_OVER_BUDGET, convert_samples_to_train_data
from slime_self_distill.data_source import PLUGIN_METADATA_KEY, SelfDistillDataError
from slime_self_distill.teacher_view import PAYLOAD_KEY
from tests.slime_support import needs_slime
from tests.test_custom_convert import slime_args
from tests.test_data_source import data_source_args, self_distill_data_source

CORRECT = "Let me rephrase the above solution."
WRONG = "Wait, this response is wrong. Let me correct it."
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def merging_tokenizer(tmp_path_factory):
    """(path, tokenizer): byte-level BPE whose pre-tokenizer keeps '.' and the newlines after it in one piece."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+|\w+"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [f"The answer is 42.{revision_delimiter(CORRECT)}", f"It is 41.{revision_delimiter(WRONG)}",
              "What is 12 + 30? user assistant system"]
    core.train_from_iterator(corpus * 30, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("merging_tok")
    tokenizer.save_pretrained(str(path))
    return str(path), AutoTokenizer.from_pretrained(str(path))


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def rollout_sample(tokenizer, *, index, group_index, question, response, reward, end_of_turn=True):
    """slime's Sample after the rollout: the rendered prompt encoded, the response ids (end-of-turn token when the
    response stopped normally), the reward."""
    from slime.utils.types import Sample

    prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                add_generation_prompt=True)
    prompt_ids = encode(tokenizer, prompt_text)
    response_ids = encode(tokenizer, response) + ([tokenizer.convert_tokens_to_ids("<|im_end|>")] if end_of_turn
                                                   else [])
    return Sample(index=index, group_index=group_index, prompt=prompt_text, tokens=prompt_ids + response_ids,
                  response_length=len(response_ids), reward=reward, metadata={},
                  status=Sample.Status.COMPLETED)


def official_teacher_ids(tokenizer, sample, reward_value, threshold=1.0):
    """The official construction: prompt ids + y ids + ids(delimiter with P_r) + y ids (the loss on the last y)."""
    y = list(sample.tokens[-sample.response_length:])
    prompt = list(sample.tokens[:-sample.response_length])
    phrase = CORRECT if reward_value >= threshold else WRONG
    return prompt + y + encode(tokenizer, "\n\n" + phrase + "\n\n") + y


def converter_args(hf, **overrides):
    values = dict(apply_chat_template=True, self_distill_teacher_context="self_revision", n_samples_per_prompt=1,
                  rollout_batch_size=4, wandb_always_use_train_step=False, global_batch_size=4)
    values.update(overrides)
    return slime_args(hf, **values)


def test_the_delimiter_is_the_official_text():
    assert revision_delimiter(CORRECT) == "\n\nLet me rephrase the above solution.\n\n"
    config = SelfDistillConfig(teacher_context="self_revision")
    assert (config.revision_phrase_correct, config.revision_phrase_wrong) == (CORRECT, WRONG)


@needs_slime
@pytest.mark.parametrize("reward_key", [None, "score"])
def test_teacher_ids_are_the_official_concatenation_through_the_converter(merging_tokenizer, reward_key):
    hf, tok = merging_tokenizer
    cases = [("What is 12 + 30?", "The answer is 42.", 1.0, True),
             ("What is 12 + 30?", "It is 41.", 0.0, True),
             ("What is 12 + 30?", "The answer is 42.", 1.0, False),  # cut at the length limit: no end-of-turn token
             ("What is 12 + 30?", "It is 41.", 0.0, False)]
    samples = [rollout_sample(tok, index=i, group_index=i, question=q, response=r,
                              reward={reward_key: value, "other": -1.0} if reward_key else value, end_of_turn=eot)
               for i, (q, r, value, eot) in enumerate(cases)]
    data = convert_samples_to_train_data(converter_args(hf, reward_key=reward_key), copy.deepcopy(samples))
    views = data[PAYLOAD_KEY]
    for sample, view, (_, response, value, end_of_turn) in zip(samples, views, cases):
        assert view.has_teacher and view.loss_weight == pytest.approx(1.0)
        assert list(view.tokens) == official_teacher_ids(tok, sample, value)
        assert list(view.tokens[-view.response_length:]) == list(sample.tokens[-sample.response_length:])
        if not end_of_turn:  # the joined text would merge '.' with the delimiter's newlines; the ids do not
            phrase = CORRECT if value >= 1.0 else WRONG
            joined = encode(tok, response + revision_delimiter(phrase))
            assert joined != encode(tok, response) + encode(tok, revision_delimiter(phrase))
            assert tok.decode(view.tokens[:view.prompt_length]).endswith(response + revision_delimiter(phrase))


@needs_slime
def test_the_phrase_follows_the_threshold_and_metrics_count_correct_responses(merging_tokenizer, monkeypatch):
    from slime.observability import logging_utils
    from slime.rollout.sample_hooks import set_current_rollout_id

    hf, tok = merging_tokenizer
    rewards = [0.5, 0.49, 1.0, 0.0]
    samples = [rollout_sample(tok, index=i, group_index=0, question="What is 12 + 30?", response="It is 41.",
                              reward=r) for i, r in enumerate(rewards)]
    logged = []
    monkeypatch.setattr(logging_utils, "log", lambda args, metrics, step_key: logged.append(metrics))
    set_current_rollout_id(3)
    try:
        data = convert_samples_to_train_data(converter_args(hf, self_distill_success_threshold=0.5), samples)
    finally:
        set_current_rollout_id(None)
    for sample, view, reward in zip(samples, data[PAYLOAD_KEY], rewards):
        assert list(view.tokens) == official_teacher_ids(tok, sample, reward, threshold=0.5)
    (metrics,) = logged
    assert metrics["rollout/self_distill/revision_correct_fraction"] == pytest.approx(0.5)
    assert metrics["rollout/step"] == 3


@needs_slime
def test_the_data_source_needs_no_teacher_prompt_and_records_nothing(tmp_path):
    rows = [{"prompt": "What is 12 + 30?", "label": "42"}, {"prompt": "What is 2 + 2?", "label": "4"}]
    args = data_source_args(tmp_path, rows=rows, self_distill_teacher_context="self_revision")
    source = self_distill_data_source(args)
    for group in source.get_samples(2):
        for sample in group:
            assert PLUGIN_METADATA_KEY not in sample.metadata  # the teacher prompt is the sample's own ids


@needs_slime
def test_over_budget_is_dropped_or_stops_and_cannot_be_truncated(merging_tokenizer):
    hf, tok = merging_tokenizer
    samples = [rollout_sample(tok, index=i, group_index=i, question="What is 12 + 30?", response="The answer is 42.",
                              reward=1.0) for i in range(2)]
    prompt_length = len(official_teacher_ids(tok, samples[0], 1.0)) - samples[0].response_length
    views = convert_samples_to_train_data(
        converter_args(hf, self_distill_max_teacher_prompt_len=prompt_length - 1, self_distill_teacher_overflow="drop"),
        copy.deepcopy(samples))[PAYLOAD_KEY]
    assert all(not v.has_teacher and v.reason.startswith(REASON_OVER_BUDGET + ":") for v in views)
    views = convert_samples_to_train_data(converter_args(hf, self_distill_max_teacher_prompt_len=prompt_length),
                                          copy.deepcopy(samples))[PAYLOAD_KEY]
    assert all(v.has_teacher for v in views)
    over = r"sample index=0 .*over --self-distill-max-teacher-prompt-len"
    with pytest.raises(SelfDistillDataError, match=over) as err:
        convert_samples_to_train_data(converter_args(hf, self_distill_max_teacher_prompt_len=prompt_length - 1),
                                      copy.deepcopy(samples))
    assert "truncate_demonstration" not in str(err.value)  # nothing here may be shortened
    with pytest.raises(ConfigError, match="use error or drop"):
        SelfDistillConfig(teacher_context="self_revision", max_teacher_prompt_len=8,
                          teacher_overflow="truncate_demonstration")


def test_every_sample_gets_a_teacher_without_groups_and_rewards_are_checked():
    samples = [Namespace(index=i, group_index=None, prompt="p", tokens=[1, 2, 3, 4 + i], response_length=2,
                         reward=float(i % 2), metadata={}, remove_sample=False) for i in range(3)]
    contexts = self_revision_contexts(Namespace(reward_key=None), samples, SelfDistillConfig(
        teacher_context="self_revision", revision_phrase_correct="C", revision_phrase_wrong="W"),
        lambda text: [ord(c) for c in text])
    for sample, choice in zip(samples, contexts.choices):
        delimiter = [ord(c) for c in revision_delimiter("C" if sample.reward >= 1.0 else "W")]
        assert choice.has_teacher and list(choice.prompt_ids) == [1, 2, 3, 4 + sample.index] + delimiter
    assert contexts.metrics == {"revision_correct_fraction": pytest.approx(1 / 3)}
    samples[1].reward = {"score": 1.0}
    with pytest.raises(SelfDistillDataError, match=r"sample index=1 .*name its value with --reward-key"):
        self_revision_contexts(Namespace(reward_key=None), samples, SelfDistillConfig(teacher_context="self_revision"),
                               lambda text: [0])
