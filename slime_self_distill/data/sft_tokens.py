"""Chat rows turned into token ids and a loss mask exactly as slime's SFT rollout does it, without slime.

slime's ``--rollout-function-path slime.rollout.sft_rollout.generate_rollout`` hands each row's messages (and
``metadata["tools"]``) to ``slime.utils.mask_utils.MultiTurnLossMaskGenerator`` with ``--loss-mask-type``, then keeps
the mask from its first 1 to the end as the response. This module reproduces that behaviour (checked token for token
against slime commit 624b824 in ``tests/test_sft_tokens.py``) so that a dataset can be tokenised, measured and
fingerprinted on a machine without slime, and the fingerprint checked again at training time.

What the four mask types do (all quirks are slime's, kept on purpose):

- ``qwen``: every message is rendered on its own (``tools`` only with the first one) and the tokens the template adds
  in front of a lone non-system message (a default system prompt) are cut off; an assistant message is trained on all
  its tokens but the generation header, i.e. the content, ``<|im_end|>`` and the newline after it. Consecutive tool
  messages each become their own turn. On a Qwen3 template a lone assistant turn counts as history, so its
  reasoning is dropped from what is trained. If the tokenizer's added vocabulary has ``<｜Assistant｜>`` the row
  goes down the ``distill_qwen`` path instead.
- ``qwen3``: like ``qwen`` but each message (consecutive tool messages as one group, as Qwen templates wrap them in
  one user turn) is rendered after a dummy user turn, so that a Qwen3 template keeps the assistant's reasoning; every
  assistant turn is then rendered as the latest one (a Qwen3 template gives each an empty ``<think>`` block if it has
  no reasoning). On a template that injects a default system prompt the tokens and mask come out of different
  lengths, which slime's rollout rejects (so does ``SftTokens``).
- ``qwen3_5``: the whole conversation is rendered once; the characters of each assistant turn from after
  ``<|im_start|>assistant\\n`` (and after a leading ``<think>\\n``) through ``<|im_end|>`` and its newline are marked,
  and a token is trained if it covers any marked character. Needs a fast tokenizer (offset mapping).
- ``distill_qwen``: the prompt is the first message alone with the generation prompt; the response is the last
  message's raw content (no end-of-sentence token). Every message in between is dropped, and a first message that is
  the system prompt leaves the user's question out.

``step_loss_mask`` on a message: any value other than 1 zeroes that message's mask (``normalise_messages`` only
accepts 0 and 1, so that a string such as ``"1"`` cannot silently untrain a turn). ``SftTokenizer`` takes messages
as ``normalise_messages`` returns them.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Optional

LOSS_MASK_TYPES = ("qwen", "qwen3", "qwen3_5", "distill_qwen")

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES: dict[str, str] = {
    "developer": "system",
    "human": "user",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "ai": "assistant",
    "function": "tool",
    "ipython": "tool",
}

# slime's probe strings and the markers its qwen3_5 path searches for.
_PROBE_TEXT = "FOR TESTING ONLY"
_QWEN3_PREFIX = {"role": "user", "content": "FOR CALCULATING LOSS MASK ONLY"}
_DISTILL_MARKER = "<｜Assistant｜>"
_ASSISTANT_HEADER = "<|im_start|>assistant\n"
_THINK_OPEN = "<think>\n"
_TURN_END = "<|im_end|>"


class ChatRowError(ValueError):
    """A chat row that slime's SFT rollout cannot use; the message says where and how to fix it."""


def normalise_messages(messages: Any, where: str) -> list[dict]:
    """Check one row's messages and return new dicts with canonical roles.

    Each message needs a string ``role`` (case-insensitive; ``ROLE_ALIASES`` are mapped to system/user/assistant/tool)
    and a string ``content``. ``content`` may be None (or absent) only on an assistant message that carries
    ``tool_calls``, the OpenAI shape; it becomes ``""``, which Qwen templates render exactly as a missing content,
    while a None would be printed as "None" by some templates under older transformers (which, unlike 5.x, pass None
    to the template) and crashes slime's ``distill_qwen`` path. Other keys (``tool_calls``, ``name``,
    ``reasoning_content``, ...) are kept as they are. At least one assistant message is required: without one slime
    trains on nothing.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatRowError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} dicts")
    accepted = ", ".join(ROLES) + " (or an alias: " + ", ".join(sorted(ROLE_ALIASES)) + ")"
    out = []
    for i, message in enumerate(messages):
        at = f"{where}, message {i}"
        if not isinstance(message, dict):
            raise ChatRowError(f"{at}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        if "role" not in message:
            hint = " (ShareGPT 'from'/'value': rename them to 'role'/'content')" if "from" in message else ""
            raise ChatRowError(f"{at}: no 'role'{hint}")
        raw_role = message["role"]
        if not isinstance(raw_role, str):
            raise ChatRowError(f"{at}: 'role' must be a string, got {type(raw_role).__name__}")
        role = ROLE_ALIASES.get(raw_role.strip().lower(), raw_role.strip().lower())
        if role not in ROLES:
            raise ChatRowError(f"{at}: unknown role {raw_role!r}; use one of {accepted}")
        content = message.get("content")
        if content is None:
            if role != "assistant" or not message.get("tool_calls"):
                raise ChatRowError(
                    f"{at}: {role} message has no 'content' (only an assistant message with 'tool_calls' may omit it)"
                )
            content = ""
        elif not isinstance(content, str):
            raise ChatRowError(
                f"{at}: 'content' must be a string, got {type(content).__name__} (multimodal parts are not supported)"
            )
        step = message.get("step_loss_mask", 1)
        if not isinstance(step, int) or step not in (0, 1):  # bools pass: slime compares with == 1
            raise ChatRowError(f"{at}: step_loss_mask must be 0 or 1, got {step!r} (slime untrains the turn otherwise)")
        out.append({**message, "role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatRowError(f"{where}: no assistant message, so nothing to train on; add the assistant's answer")
    return out


def row_tools(row: dict, tool_key: Optional[str], metadata: dict, where: str) -> Optional[list]:
    """The tools slime's SFT rollout gives the chat template for ``row``, as slime's ``Dataset`` reads them: the
    ``--tool-key`` column (a JSON string is parsed), else the tools the row's metadata already holds."""
    tools = row[tool_key] if tool_key and tool_key in row else metadata.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ChatRowError(f"{where}: {tool_key!r} is a string that is not JSON ({e})") from None
    if tools is not None and not isinstance(tools, list):
        raise ChatRowError(f"{where}: {tool_key!r} must be a list of tool definitions, got {type(tools).__name__}")
    return tools


@dataclass(frozen=True)
class SftTokens:
    """One row as slime's SFT rollout sees it: all token ids and the full loss mask."""

    tokens: tuple[int, ...]
    loss_mask: tuple[int, ...]

    def __post_init__(self):
        if len(self.tokens) != len(self.loss_mask):
            # slime's rollout rejects this too (it only happens with templates that render a turn shorter than
            # the generation header).
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.loss_mask)} loss-mask entries")

    @property
    def response_length(self) -> int:
        """slime's rule: everything from the first trained token to the end; 0 when nothing is trained."""
        return len(self.loss_mask) - self.loss_mask.index(1) if 1 in self.loss_mask else 0

    @property
    def response_loss_mask(self) -> tuple[int, ...]:
        """What slime stores as ``sample.loss_mask``: ``loss_mask[-response_length:]``.

        With ``response_length == 0`` that slice is ``[-0:]``, the whole (all-zero) mask, longer than the response;
        such rows train nothing and callers reject them.
        """
        return self.loss_mask[-self.response_length :]

    @property
    def trained_positions(self) -> tuple[int, ...]:
        """Indices ``i`` with ``loss_mask[i] == 1``: the tokens the student is trained to predict."""
        return tuple(i for i, bit in enumerate(self.loss_mask) if bit == 1)

    def digest(self) -> str:
        """16 hex chars of sha256 over the tokens (little-endian int32) then the mask bytes."""
        payload = struct.pack(f"<{len(self.tokens)}i", *self.tokens) + bytes(self.loss_mask)
        return hashlib.sha256(payload).hexdigest()[:16]


class SftTokenizer:
    """``SftTokenizer(tokenizer, loss_mask_type)(messages, tools)`` gives what slime's SFT rollout computes for the
    same row with ``--loss-mask-type loss_mask_type`` and the same Hugging Face tokenizer (``--hf-checkpoint``)."""

    def __init__(self, tokenizer, loss_mask_type: str = "qwen"):
        if loss_mask_type not in LOSS_MASK_TYPES:
            raise ValueError(f"unknown --loss-mask-type {loss_mask_type!r}; choose one of {', '.join(LOSS_MASK_TYPES)}")
        self.tokenizer = tokenizer
        self.loss_mask_type = loss_mask_type
        # slime measures these once, at start-up, for qwen and qwen3 only (and crashes there if the probe fails).
        self._lead_length, self._header_length = 0, 0
        if loss_mask_type in ("qwen", "qwen3"):
            self._lead_length, self._header_length = self._probe_template()
        self._prefix_length = len(self._template_ids([_QWEN3_PREFIX])) if loss_mask_type == "qwen3" else 0

    def __call__(self, messages: list[dict], tools: list | None = None) -> SftTokens:
        kind = self.loss_mask_type
        if kind == "qwen" and _DISTILL_MARKER in self.tokenizer.get_added_vocab():
            kind = "distill_qwen"
        if kind == "qwen":
            tokens, mask = self._per_turn([[m] for m in messages], tools, self._render_alone)
        elif kind == "qwen3":
            tokens, mask = self._per_turn(_tool_runs(messages), tools, self._render_after_prefix)
        elif kind == "qwen3_5":
            tokens, mask = self._char_spans(messages, tools)
        else:
            tokens, mask = self._first_and_last(messages, tools)
        return SftTokens(tuple(tokens), tuple(mask))

    # -- helpers ------------------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _template_ids(self, messages: list[dict], **kwargs) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)

    def _probe_template(self) -> tuple[int, int]:
        """Two identical user turns reveal (a) how many tokens a lone turn gets in front of it (a default system
        prompt) and (b) how many tokens the generation prompt adds (the assistant header, left untrained)."""
        needle = self._encode(_PROBE_TEXT)
        pair = [{"role": "user", "content": _PROBE_TEXT}] * 2
        # slime passes add_special_tokens=False to the template renderer as well; keep the same variables visible.
        text = self.tokenizer.apply_chat_template(pair, tokenize=False, add_special_tokens=False)
        ids = self._encode(text)
        hits = [i for i in range(len(ids) - len(needle) + 1) if ids[i : i + len(needle)] == needle]
        if len(hits) != 2:
            raise ValueError(
                f"the chat template probe found {_PROBE_TEXT!r} {len(hits)} times instead of 2 in two rendered user "
                "turns; slime's MultiTurnLossMaskGenerator fails the same way: pick another --loss-mask-type"
            )
        first, second = hits
        turn = second - first  # one whole user turn: header + text + closing
        closing = len(ids) - second - len(needle)
        header = turn - len(needle) - closing
        with_prompt = self._template_ids(pair, add_generation_prompt=True, add_special_tokens=False)
        return first - header, len(with_prompt) - len(ids)

    def _render_alone(self, index: int, group: list[dict], tools) -> list[int]:
        return self._template_ids(group, tools=tools) if index == 0 else self._template_ids(group)

    def _render_after_prefix(self, index: int, group: list[dict], tools) -> list[int]:
        # A dummy user turn next to the group makes the template render it as mid-conversation; its own tokens are
        # measured alone and cut away (after the group for the first message, where tools go, before it otherwise).
        if index == 0:
            return self._template_ids(group + [_QWEN3_PREFIX], tools=tools)[: -self._prefix_length]
        return self._template_ids([_QWEN3_PREFIX] + group)[self._prefix_length :]

    def _per_turn(self, groups, tools, render) -> tuple[list[int], list[int]]:
        tokens: list[int] = []
        mask: list[int] = []
        index = 0
        for group in groups:
            head = group[0]
            ids = render(index, group, tools)
            if index > 0 and head["role"] != "system":
                ids = ids[self._lead_length :]
            if head.get("step_loss_mask", 1) != 1 or head["role"] != "assistant":
                bits = [0] * len(ids)
            else:
                bits = [0] * self._header_length + [1] * (len(ids) - self._header_length)
            tokens += ids
            mask += bits
            index += len(group)
        return tokens, mask

    def _char_spans(self, messages, tools) -> tuple[list[int], list[int]]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, tools=tools)
        try:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # slow tokenizers under transformers 4.x
            encoded = {}
        offsets = encoded.get("offset_mapping")
        if offsets is None:
            raise ValueError("--loss-mask-type qwen3_5 needs a fast tokenizer (one with return_offsets_mapping)")
        tokens = encoded["input_ids"]
        if tokens != self._template_ids(messages, tools=tools):
            raise ValueError("qwen3_5: tokenising the rendered text differs from apply_chat_template(tokenize=True)")

        marked = [0] * len(text)
        cursor = 0
        for message in messages:
            if message["role"] != "assistant":
                continue
            header = text.find(_ASSISTANT_HEADER, cursor)
            if header < 0:
                raise ValueError("qwen3_5: an assistant message is missing from the rendered chat template")
            start = header + len(_ASSISTANT_HEADER)
            end = text.find(_TURN_END, start)
            if end < 0:
                raise ValueError("qwen3_5: an assistant message has no <|im_end|> in the rendered chat template")
            end += len(_TURN_END)
            if text[end : end + 1] == "\n":
                end += 1
            cursor = end
            if message.get("step_loss_mask", 1) != 1:
                continue
            if text.startswith(_THINK_OPEN, start):
                start += len(_THINK_OPEN)
            marked[start:end] = [1] * (end - start)

        # A token is trained when any character it covers is marked (an empty span covers none).
        covered = [0]
        for bit in marked:
            covered.append(covered[-1] + bit)
        mask = [int(covered[end] > covered[start]) for start, end in offsets]
        return tokens, mask

    def _first_and_last(self, messages, tools) -> tuple[list[int], list[int]]:
        prompt = self.tokenizer.apply_chat_template(
            messages[:1], tokenize=False, add_generation_prompt=True, tools=tools
        )
        prompt_ids = self._encode(prompt)
        response_ids = self._encode(messages[-1]["content"])
        tokens = prompt_ids + response_ids
        if messages[-1].get("step_loss_mask", 1) != 1:
            return tokens, [0] * len(tokens)
        return tokens, [0] * len(prompt_ids) + [1] * len(response_ids)


def _tool_runs(messages: list[dict]) -> list[list[dict]]:
    """Messages one by one, except that consecutive tool messages form one group."""
    groups: list[list[dict]] = []
    for message in messages:
        if message["role"] == "tool" and groups and groups[-1][0]["role"] == "tool":
            groups[-1].append(message)
        else:
            groups.append([message])
    return groups
