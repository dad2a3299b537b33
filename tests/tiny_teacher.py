"""A tiny Hugging Face causal LM teacher (Qwen2 shape: hidden 32, 2 layers) saved with one of the in-process chat
tokenizers of ``tests.chat_tokenizers``, and chat rows to extract from: no download."""

from __future__ import annotations

from tests.chat_tokenizers import WEATHER_TOOLS, chat_tokenizer, weather_call


def save_tiny_teacher(directory, family: str = "qwen25", seed: int = 0) -> str:
    """A randomly initialised Qwen2ForCausalLM over the vocabulary of ``chat_tokenizer(family)``, saved with that
    tokenizer in ``directory``. The weights are drawn wider than usual so that neighbouring logits rarely tie."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = chat_tokenizer(family)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return str(directory)


def chat_rows(count: int = 12) -> list:
    """``count`` chat rows of varied length and shape: plain question and answer (the answer under the alias role
    "bot" in every third row), a system message, several turns, tool calls with tool results and a tools list."""
    rows = []
    for i in range(count):
        answer_role = "bot" if i % 3 == 0 else "assistant"
        shape = i % 4
        if shape == 0:
            messages = [
                {"role": "user", "content": f"What is {i} + 30?"},
                {"role": answer_role, "content": f"{i} + 30 = {i + 30}. " * (1 + i % 3)},
            ]
            rows.append({"messages": messages})
        elif shape == 1:
            messages = [
                {"role": "system", "content": "You are a careful assistant. Answer briefly."},
                {"role": "user", "content": f"What is {i} + 12?"},
                {"role": answer_role, "content": f"The answer is {i + 12}."},
                {"role": "user", "content": "Add the tens first."},
                {"role": "assistant", "content": f"10 + {i} = {10 + i}, then 2, so {i + 12}."},
            ]
            rows.append({"messages": messages, "metadata": {"source": f"row-{i}"}})
        elif shape == 2:
            messages = [
                {"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": "What is the weather in Paris and in Rome?"},
                {"role": "assistant", "content": None, "tool_calls": [weather_call("Paris"), weather_call("Rome")]},
                {"role": "tool", "name": "get_weather", "content": '{"temperature": 21, "sky": "sunny"}'},
                {"role": "tool", "name": "get_weather", "content": '{"temperature": %d, "sky": "rainy"}' % i},
                {"role": answer_role, "content": "Paris is sunny, Rome is rainy." + " Take a coat." * (i % 2)},
            ]
            rows.append({"messages": messages, "tools": WEATHER_TOOLS})
        else:
            messages = [
                {"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": "42."},
                {"role": "user", "content": f"And {i} + 31?"},
                {"role": answer_role, "content": f"{i} + 31 = {i + 31}."},
            ]
            rows.append({"messages": messages})
    return rows
