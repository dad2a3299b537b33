"""A small real tokenizer, trained in-process (no download), with a chat template.

It is a byte-level BPE tokenizer wrapped in ``transformers.PreTrainedTokenizerFast`` so that it has the same
``encode``/``apply_chat_template`` interface slime uses (``AutoTokenizer`` from ``--hf-checkpoint``).
"""

from __future__ import annotations

import functools

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think></think>{% endif %}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 30? Let us add the numbers: 12 + 30 = 42.",
    "This is an example for a response to the question:",
    "Now answer with a response of your own, including the thinking process.",
    "A verified solution is given below. Solve the problem step by step.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "def add(a, b):\n    return a + b\n",
    "Question: how many legs does a spider have? Answer: eight.",
    "user assistant system tool",
]


def trained_byte_level_bpe(corpus: list, special_tokens: list, vocab_size: int):
    """A ``tokenizers`` byte-level BPE trained on ``corpus`` (4 passes), with ``special_tokens`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus * 4, trainer=trainer)
    return core


@functools.lru_cache(maxsize=None)
def make_tokenizer(vocab_size: int = 400):
    from transformers import PreTrainedTokenizerFast

    core = trained_byte_level_bpe(_CORPUS, SPECIAL_TOKENS, vocab_size)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(path) -> str:
    """Write the tokenizer to ``path`` (a directory) so that ``AutoTokenizer.from_pretrained(path)`` loads it."""
    make_tokenizer().save_pretrained(str(path))
    return str(path)
