"""``slime_self_distill.data.sft_tokens`` against slime's real SFT tokenisation, and its own checks."""

from __future__ import annotations

import copy
import types

import pytest

from slime_self_distill.data.sft_tokens import (
    LOSS_MASK_TYPES,
    ROLE_ALIASES,
    ChatRowError,
    SftTokenizer,
    SftTokens,
    normalise_messages,
)
from tests.chat_tokenizers import FAMILIES, WEATHER_TOOLS, WEATHER_TURNS, chat_tokenizer, weather_call
from tests.slime_support import needs_slime

WHERE = "row 17 (line 18)"

SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly."}
ASK = {"role": "user", "content": "What is 12 + 30?"}
ANSWER = {"role": "assistant", "content": "12 + 30 = 42."}
THINK_ANSWER = {
    "role": "assistant",
    "content": "<think>\nAdd the tens first: 10 + 30 = 40, then the units: 2.\n</think>\n\nThe answer is 42.",
}


TOOL_CHAT = [
    SYSTEM,
    *WEATHER_TURNS,
    {"role": "user", "content": "And in Oslo?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [weather_call("Oslo")]},
    {"role": "tool", "name": "get_weather", "content": '{"temperature": 3, "sky": "snow"}'},
    {"role": "assistant", "content": "<think>\nIt is cold.\n</think>\n\nOslo has snow."},
]
MULTI_TURN = [
    ASK,
    ANSWER,
    {"role": "user", "content": "And 12 + 31?"},
    {"role": "assistant", "content": "12 + 31 = 43."},
    {"role": "user", "content": "Add the tens first."},
    {"role": "assistant", "content": "10 + 30 = 40, then 2 + 1 = 3, so 43."},
]

# (name, messages, tools): the conversations every mask type is checked on.
CONVERSATIONS = [
    ("system_user_assistant", [SYSTEM, ASK, ANSWER], None),
    ("no_system", [ASK, ANSWER], None),
    ("multi_turn", MULTI_TURN, None),
    ("multi_turn_system", [SYSTEM] + MULTI_TURN, None),
    ("tool_calls", TOOL_CHAT, None),
    ("tool_calls_with_tools", TOOL_CHAT, WEATHER_TOOLS),
    ("tools_no_system", [ASK, ANSWER], WEATHER_TOOLS),
    ("step_loss_mask_middle", MULTI_TURN[:3] + [{**MULTI_TURN[3], "step_loss_mask": 0}] + MULTI_TURN[4:], None),
    ("step_loss_mask_last", [SYSTEM, ASK, {**ANSWER, "step_loss_mask": 0}], None),
    ("think", [ASK, THINK_ANSWER, {"role": "user", "content": "Why?"}, THINK_ANSWER], None),
    ("reasoning_content", [ASK, {**ANSWER, "reasoning_content": "Add the tens first."}], None),
    ("late_system", MULTI_TURN[:2] + [{"role": "system", "content": "Answer briefly."}] + MULTI_TURN[2:4], None),
]
CONVERSATION_IDS = [name for name, _, _ in CONVERSATIONS]

# Each loss-mask type on the tokenizer family it is written for ("qwen" on an R1-distill tokenizer switches itself
# to the distill path).
MEANT_FOR = [
    ("qwen", "qwen25"),
    ("qwen3", "qwen3"),
    ("qwen3_5", "qwen3_5"),
    ("distill_qwen", "r1_distill"),
    ("qwen", "r1_distill"),
]


def _slime_tokens(tokenizer, loss_mask_type, messages, tools):
    from slime.utils.mask_utils import MultiTurnLossMaskGenerator

    generator = MultiTurnLossMaskGenerator(tokenizer, tokenizer_type=loss_mask_type)
    tokens, mask = generator.get_loss_mask(messages, tools=tools)
    return tokens, mask, generator.get_response_lengths([mask])[0]


def _check_same(ours: SftTokens, tokens, mask, response_length):
    assert list(ours.tokens) == tokens
    assert list(ours.loss_mask) == mask
    assert ours.response_length == response_length
    assert list(ours.response_loss_mask) == mask[-response_length:]


@needs_slime
@pytest.mark.parametrize("loss_mask_type,family", MEANT_FOR, ids=[f"{t}-{f}" for t, f in MEANT_FOR])
@pytest.mark.parametrize("name,messages,tools", CONVERSATIONS, ids=CONVERSATION_IDS)
def test_matches_slime_token_for_token(loss_mask_type, family, name, messages, tools):
    tokenizer = chat_tokenizer(family)
    messages = normalise_messages(messages, WHERE)
    ours = SftTokenizer(tokenizer, loss_mask_type)(messages, tools)
    _check_same(ours, *_slime_tokens(tokenizer, loss_mask_type, messages, tools))
    assert len(ours.trained_positions) == sum(ours.loss_mask)


@needs_slime
@pytest.mark.parametrize("loss_mask_type", LOSS_MASK_TYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_any_type_on_any_tokenizer_matches_slime_or_both_fail(loss_mask_type, family):
    """Users mix them up (``qwen`` is slime's default); whatever slime then does, we do, failures included (a
    token/mask length mismatch is one: slime's rollout raises on it)."""
    tokenizer = chat_tokenizer(family)
    for _, messages, tools in CONVERSATIONS:
        messages = normalise_messages(messages, WHERE)
        try:
            expected = _slime_tokens(tokenizer, loss_mask_type, messages, tools)
            slime_fails = len(expected[0]) != len(expected[1])
        except Exception:
            slime_fails = True
        if slime_fails:
            with pytest.raises(Exception):
                SftTokenizer(tokenizer, loss_mask_type)(messages, tools)
            continue
        _check_same(SftTokenizer(tokenizer, loss_mask_type)(messages, tools), *expected)


@needs_slime
@pytest.mark.parametrize("loss_mask_type,family", MEANT_FOR, ids=[f"{t}-{f}" for t, f in MEANT_FOR])
def test_matches_slime_sft_rollout_samples(monkeypatch, loss_mask_type, family):
    """Through ``generate_rollout`` itself: ``sample.tokens``, ``response_length`` and ``loss_mask`` (the
    ``[-0:]`` case included, by the distill path's untrained last turn)."""
    from slime.rollout import sft_rollout
    from slime.utils.types import Sample

    tokenizer = chat_tokenizer(family)
    rows = [(normalise_messages(m, WHERE), tools) for _, m, tools in CONVERSATIONS]
    for name in ("TOKENIZER", "PROCESSOR", "MASK_GENERATOR"):
        monkeypatch.setattr(sft_rollout, name, None)
    monkeypatch.setattr(sft_rollout, "load_tokenizer", lambda *a, **k: tokenizer)
    monkeypatch.setattr(sft_rollout, "load_processor", lambda *a, **k: None)
    samples = [[Sample(prompt=m, metadata={"tools": tools} if tools else {})] for m, tools in rows]
    buffer = types.SimpleNamespace(get_samples=lambda n: samples[:n])
    args = types.SimpleNamespace(
        hf_checkpoint="unused", loss_mask_type=loss_mask_type, rollout_global_dataset=True, rollout_batch_size=len(rows)
    )
    out = sft_rollout.generate_rollout(args, 0, buffer)
    sft = SftTokenizer(tokenizer, loss_mask_type)
    for (sample,), (messages, tools) in zip(out, rows):
        ours = sft(messages, tools)
        assert list(ours.tokens) == sample.tokens
        assert ours.response_length == sample.response_length
        assert list(ours.response_loss_mask) == sample.loss_mask


# -- without slime ------------------------------------------------------------------------------------------------


def test_qwen_switches_to_the_distill_path_on_an_r1_tokenizer():
    tokenizer = chat_tokenizer("r1_distill")
    messages = normalise_messages([SYSTEM, ASK, ANSWER], WHERE)
    auto = SftTokenizer(tokenizer, "qwen")(messages)
    assert auto == SftTokenizer(tokenizer, "distill_qwen")(messages)
    # The distill path keeps only the first message as the prompt: the user's question is gone.
    prompt = tokenizer.decode(auto.tokens[: len(auto.tokens) - auto.response_length])
    assert "12 + 30" not in prompt and prompt.endswith("<｜Assistant｜><think>\n")
    assert tokenizer.decode(auto.tokens[-auto.response_length :]) == ANSWER["content"]


def test_qwen3_groups_tool_messages_and_trains_assistant_turns_only():
    tokenizer = chat_tokenizer("qwen3")
    messages = normalise_messages(TOOL_CHAT, WHERE)
    row = SftTokenizer(tokenizer, "qwen3")(messages, WEATHER_TOOLS)
    text = tokenizer.decode(row.tokens)
    # Two tool groups, the first with both results in one user turn, as the template renders them at inference.
    assert text.count("<|im_start|>user\n<tool_response>") == 2 and "</tool_response>\n<tool_response>" in text
    # Each assistant turn is rendered as the latest one, so a Qwen3 template gives every turn a <think> block (empty
    # for the tool call), unlike the whole conversation rendered at once.
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>" in text
    assert text != tokenizer.apply_chat_template(messages, tools=WEATHER_TOOLS, tokenize=False)
    trained = tokenizer.decode([row.tokens[i] for i in row.trained_positions])
    assert "Paris is sunny" in trained and "<tool_call>" in trained
    assert "sunny\"}" not in trained and "Oslo?" not in trained


def test_qwen3_5_needs_a_fast_tokenizer():
    class Slow:
        is_fast = False

        def apply_chat_template(self, messages, tokenize=False, **kwargs):
            return "<|im_start|>assistant\nhi<|im_end|>\n"

        def __call__(self, text, **kwargs):
            if kwargs.get("return_offsets_mapping"):
                raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
            return {"input_ids": [1, 2, 3]}

    with pytest.raises(ValueError, match="qwen3_5 needs a fast tokenizer"):
        SftTokenizer(Slow(), "qwen3_5")([{"role": "assistant", "content": "hi"}])


def test_unknown_loss_mask_type_names_the_flag_and_the_choices():
    with pytest.raises(ValueError, match=r"--loss-mask-type 'llama'.*qwen, qwen3, qwen3_5, distill_qwen"):
        SftTokenizer(chat_tokenizer("qwen3"), "llama")


def test_response_length_zero_keeps_slimes_whole_mask_quirk():
    row = SftTokens(tokens=(5, 6, 7), loss_mask=(0, 0, 0))
    assert row.response_length == 0
    assert row.response_loss_mask == (0, 0, 0)  # slime's mask[-0:] is the whole mask, not an empty one
    assert row.trained_positions == ()


def test_response_length_runs_from_the_first_trained_token_to_the_end():
    row = SftTokens(tokens=(1, 2, 3, 4, 5, 6), loss_mask=(0, 1, 1, 0, 1, 0))
    assert row.response_length == 5
    assert row.response_loss_mask == (1, 1, 0, 1, 0)
    assert row.trained_positions == (1, 2, 4)


def test_tokens_and_mask_must_have_the_same_length():
    with pytest.raises(ValueError, match="2 tokens but 3"):
        SftTokens(tokens=(1, 2), loss_mask=(0, 1, 1))


def test_digest_is_stable_and_sensitive():
    row = SftTokens(tokens=(1, 2, 300, 70000), loss_mask=(0, 0, 1, 1))
    assert row.digest() == SftTokens(tokens=(1, 2, 300, 70000), loss_mask=(0, 0, 1, 1)).digest()
    assert len(row.digest()) == 16 and int(row.digest(), 16) >= 0
    assert row.digest() == "fcb320e1cef5152d"  # pinned: a changed digest would fail every stored dataset
    assert SftTokens(tokens=(1, 2, 301, 70000), loss_mask=row.loss_mask).digest() != row.digest()
    assert SftTokens(tokens=row.tokens, loss_mask=(0, 1, 1, 1)).digest() != row.digest()
    assert SftTokens(tokens=(2, 1, 300, 70000), loss_mask=row.loss_mask).digest() != row.digest()


def test_normalise_maps_aliases_and_keeps_other_keys():
    messages = [
        {"role": "Human", "content": "Weather in Paris?"},
        {"role": "gpt", "content": None, "tool_calls": [weather_call("Paris")]},
        {"role": "function", "name": "get_weather", "content": "sunny"},
        {"role": "model", "content": "Sunny.", "reasoning_content": "Read the tool.", "step_loss_mask": 1},
    ]
    out = normalise_messages(messages, WHERE)
    assert [m["role"] for m in out] == ["user", "assistant", "tool", "assistant"]
    assert out[1] == {"role": "assistant", "content": "", "tool_calls": [weather_call("Paris")]}
    assert out[2]["name"] == "get_weather" and out[3]["reasoning_content"] == "Read the tool."
    assert messages[0]["role"] == "Human" and messages[1]["content"] is None  # the input is not modified
    assert set(ROLE_ALIASES.values()) <= {"system", "user", "assistant", "tool"}


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "messages must be a non-empty list"),
        ("hello", "messages must be a non-empty list"),
        (["hello"], r"message 0: expected a dict"),
        ([{"from": "human", "value": "hi"}], r"message 0: no 'role' \(ShareGPT 'from'/'value': rename"),
        ([ASK, {"role": 3, "content": "x"}], r"message 1: 'role' must be a string"),
        ([ASK, {"role": "narrator", "content": "x"}], r"message 1: unknown role 'narrator'; use one of system, user"),
        ([{"role": "user", "content": None}, ANSWER], r"message 0: user message has no 'content'"),
        ([ASK, {"role": "assistant"}], r"message 1: assistant message has no 'content'.*'tool_calls'"),
        ([ASK, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}], r"'content' must be a string"),
        ([ASK, {**ANSWER, "step_loss_mask": "1"}], r"message 1: step_loss_mask must be 0 or 1, got '1'"),
        ([ASK, {**ANSWER, "step_loss_mask": 2}], r"step_loss_mask must be 0 or 1"),
        ([SYSTEM, ASK], r"no assistant message, so nothing to train on; add the assistant's answer"),
    ],
)
def test_normalise_errors_name_the_row_and_the_fix(messages, match):
    with pytest.raises(ChatRowError, match=match) as caught:
        normalise_messages(messages, WHERE)
    assert str(caught.value).startswith(WHERE)


def test_a_template_the_probe_cannot_read_fails_at_construction():
    tokenizer = copy.deepcopy(chat_tokenizer("qwen3"))
    tokenizer.chat_template = "{{ messages[-1].content }}"  # one probe turn out of two survives
    with pytest.raises(ValueError, match="found 'FOR TESTING ONLY' 1 times instead of 2.*--loss-mask-type"):
        SftTokenizer(tokenizer, "qwen")
    SftTokenizer(tokenizer, "qwen3_5")  # only qwen and qwen3 probe the template
