"""Small real chat tokenizers (byte-level BPE trained in-process, no download) shaped like the model families slime's
``--loss-mask-type`` values are written for.

The templates are short re-writings of each family's structure, not the official files; what matters to slime is kept:

- ``qwen25``: a default system prompt when the first message is not a system message, tools listed in the system
  message, tool calls as ``<tool_call>`` blocks, consecutive tool results in one user turn of ``<tool_response>``s.
- ``qwen3``: no default system prompt; an assistant turn after the last real user query shows its reasoning in a
  ``<think>`` block (taken from ``reasoning_content`` or split off the content), earlier turns drop it.
- ``qwen3_5``: like ``qwen3`` but every assistant turn after the last query opens with ``<think>\\n`` (empty or not),
  tool calls are XML ``<function=...>`` blocks, and a conversation without a user query is an error.
- ``r1_distill``: DeepSeek-R1-distill style: ``<｜User｜>``/``<｜Assistant｜>`` markers in the added vocabulary, a BOS
  token that the tokenizer also adds by itself unless ``add_special_tokens=False``, reasoning dropped from history.
"""

from __future__ import annotations

import functools

_TOOLS_BLOCK = (
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nCall a function as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.' }}"
)
_TOOL_TURN = (
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
)
_JSON_CALL = (
    "{{- '<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' }}"
    "{{- (f.arguments | tojson) + '}\\n</tool_call>' }}"
)

QWEN25_TEMPLATE = (
    "{%- set own_system = messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- set default_system = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' %}"
    "{{- messages[0].content if own_system else default_system }}"
    "{%- if tools %}{{- '\\n\\n# Tools\\n\\n<tools>' }}" + _TOOLS_BLOCK + "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' and loop.first %}"
    "{%- elif m.role == 'tool' %}" + _TOOL_TURN + "{%- elif m.role == 'assistant' and m.tool_calls %}"
    "{{- '<|im_start|>assistant' }}{%- if m.content %}{{- '\\n' + m.content }}{%- endif %}"
    "{%- for call in m.tool_calls %}{%- set f = call.function if call.function is defined else call %}"
    "{{- '\\n' }}" + _JSON_CALL + "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _qwen3_like(think_always: bool, xml_calls: bool) -> str:
    # Shared by the Qwen3 and Qwen3.5 shapes: system/tools header, last-query search, grouped tool turns.
    if xml_calls:
        call = (
            "{{- '<tool_call>\\n<function=' + f.name + '>\\n' }}"
            "{%- for k, v in f.arguments.items() %}"
            "{{- '<parameter=' + k + '>\\n' + (v | string) + '\\n</parameter>\\n' }}{%- endfor %}"
            "{{- '</function>\\n</tool_call>' }}"
        )
    else:
        call = _JSON_CALL
    show_think = "loop.index0 > ns.last_query" + ("" if think_always else " and (loop.last or reasoning)")
    no_query = "{%- if ns.searching %}{{- raise_exception('No user query found.') }}{%- endif %}"
    return (
        "{%- if tools %}{{- '<|im_start|>system\\n' }}"
        "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
        "{{- '# Tools\\n\\n<tools>' }}" + _TOOLS_BLOCK + "{{- '<|im_end|>\\n' }}"
        "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- set ns = namespace(last_query=messages | length - 1, searching=true) %}"
        "{%- for m in messages[::-1] %}"
        "{%- if ns.searching and m.role == 'user' and not m.content.startswith('<tool_response>') %}"
        "{%- set ns.searching = false %}{%- set ns.last_query = messages | length - 1 - loop.index0 %}"
        "{%- endif %}{%- endfor %}" + (no_query if think_always else "") + "{%- for m in messages %}"
        "{%- if m.role == 'system' and loop.first %}"
        "{%- elif m.role == 'tool' %}" + _TOOL_TURN + "{%- elif m.role == 'assistant' %}"
        "{%- set content = m.content if m.content is string else '' %}"
        "{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' %}"
        "{%- if not reasoning and '</think>' in content %}"
        "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
        "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
        "{{- '<|im_start|>assistant\\n' }}"
        "{%- if " + show_think + " %}{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}{%- endif %}"
        "{{- content }}"
        "{%- for call in m.tool_calls or [] %}{%- set f = call.function if call.function is defined else call %}"
        "{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}" + call + "{%- endfor %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        + ("{{- '<think>\\n' }}" if think_always else "")
        + "{%- endif %}"
    )


QWEN3_TEMPLATE = _qwen3_like(think_always=False, xml_calls=False)
QWEN3_5_TEMPLATE = _qwen3_like(think_always=True, xml_calls=True)

R1_DISTILL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for m in messages %}{%- if m.role == 'system' %}{{- m.content }}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{- '<｜User｜>' + m.content }}"
    "{%- elif m.role == 'assistant' %}"
    "{{- '<｜Assistant｜>' + m.content.split('</think>')[-1] + '<｜end▁of▁sentence｜>' }}"
    "{%- elif m.role == 'tool' %}{{- '<｜tool▁output▁begin｜>' + m.content + '<｜tool▁output▁end｜>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)

_QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen's added tokens that are not "special" (they stay visible in decoded text).
_QWEN_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
_R1_SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
_R1_ADDED = ["<think>", "</think>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]

_CORPUS = [
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "You are a careful assistant. Answer briefly.",
    "What is 12 + 30? 12 + 30 = 42. The answer is 42.",
    "Add the tens first: 10 + 30 = 40, then the units: 2. So 42.",
    "What is the weather in Paris and in Rome? Paris is sunny, Rome is rainy.",
    '{"name": "get_weather", "arguments": {"city": "Paris"}} {"temperature": 21, "sky": "sunny"}',
    "# Tools\n\nCall a function as tool_call name arguments. function parameter city",
    "user assistant system tool\n\n",
    "FOR TESTING ONLY FOR CALCULATING LOSS MASK ONLY",
]


def _train(special: list[str], added: list[str], template: str, bos: str | None, eos: str, vocab_size: int):
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    from tests.tokenizer_factory import trained_byte_level_bpe

    core = trained_byte_level_bpe(_CORPUS, special, vocab_size)
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if bos is not None:
        # Like Llama-family tokenizers: BOS is prepended unless add_special_tokens=False.
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, core.token_to_id(bos))]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=special[0])
    tok.chat_template = template
    return tok


@functools.lru_cache(maxsize=None)
def chat_tokenizer(family: str):
    """A fast tokenizer for ``family`` in ``qwen25``, ``qwen3``, ``qwen3_5``, ``r1_distill``."""
    if family == "r1_distill":
        return _train(_R1_SPECIAL, _R1_ADDED, R1_DISTILL_TEMPLATE, _R1_SPECIAL[0], _R1_SPECIAL[1], 600)
    templates = {"qwen25": QWEN25_TEMPLATE, "qwen3": QWEN3_TEMPLATE, "qwen3_5": QWEN3_5_TEMPLATE}
    return _train(_QWEN_SPECIAL, _QWEN_ADDED, templates[family], None, "<|im_end|>", 600)


FAMILIES = ("qwen25", "qwen3", "qwen3_5", "r1_distill")


# Chat rows shared by the tests: a tool that the assistant calls twice, two tool results in a row.
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def weather_call(city: str) -> dict:
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


WEATHER_TURNS = [  # a question, two calls, two results (one user turn for Qwen templates), the answer
    {"role": "user", "content": "What is the weather in Paris and in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [weather_call("Paris"), weather_call("Rome")]},
    {"role": "tool", "name": "get_weather", "content": '{"temperature": 21, "sky": "sunny"}'},
    {"role": "tool", "name": "get_weather", "content": '{"temperature": 14, "sky": "rainy"}'},
    {"role": "assistant", "content": "Paris is sunny, Rome is rainy."},
]
