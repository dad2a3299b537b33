"""The CPU demo's task, tokenizer and model: a secret code that a tiny causal LM learns by self-distillation.

The task: every key (a few digits, "3 1 4") has a code, the key's digits each replaced by a fixed secret digit
substitution (the cipher, drawn from a seed: "8 2 5"). The student is asked "What is the code of 3 1 4 ?"; the
teacher is the same model reading the question with the code as its demonstration (the ``sdft`` template). The
model is pretrained to read demonstrations (it copies the demonstrated code, whatever cipher made it) but has never
seen the secret cipher: without a demonstration it answers at chance. Self-distillation is the only way the student
can learn the cipher, and held-out keys (never in the training rows) show whether it learned the cipher itself or
memorised answers.

Everything is built on the fly, with no download: a word-level tokenizer covering the template and the task, and a
small Llama-architecture model pretrained for a few tens of seconds on a CPU.

The teacher must be the pretrained weights, frozen. A model this small does not keep its reading of demonstrations
while it learns the cipher (its own answers with a demonstration go wrong within a few dozen steps, measured), so a
teacher that follows the student (live weights, or an EMA of rate 0.01 after about 100 steps) loses the cipher too.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Sequence

from slime_self_distill.data.cli import json_lines_writer
from slime_self_distill.data.files import write_atomically
from slime_self_distill.data.templates import TEMPLATES, build_teacher_prompt

DEMO_SEED = 0
DIGITS = tuple("0123456789")
KEY_LENGTH = 3
TRAIN_KEYS = 200
HELDOUT_KEYS = 100
TRAIN_FILE = "kv_lookup_train.jsonl"
HELDOUT_FILE = "kv_lookup_heldout.jsonl"
TEACHER_TEMPLATE = "sdft"
QUESTION = "What is the code of {key} ?"

PAD_TOKEN, EOS_TOKEN, UNKNOWN_TOKEN = "<pad>", "<eos>", "<unk>"

# The pretraining that teaches the model to read demonstrations: about 25-30 s on 2 CPU cores.
PRETRAIN_STEPS = 500
# The first steps see only the teacher's format: copying the demonstration is found within about 200 steps that way,
# while student questions mixed in from the start (whose random codes can only be learned as noise) delay it a lot.
PRETRAIN_COPY_STEPS = 250
PRETRAIN_BATCH_SIZE = 64
PRETRAIN_LEARNING_RATE = 1e-3  # 3e-3 makes the copying unstable
# Share of the teacher's format after the copy steps; the rest are student questions with random codes, which teach
# the answer's format (the key's length in digits, then eos) without any cipher.
PRETRAIN_TEACHER_SHARE = 0.5
PROGRESS_EVERY_SECONDS = 5.0


# ------------------------------------------------------------------------------------------------------ the task
@dataclass(frozen=True)
class CodeTask:
    """The secret cipher: ``cipher[d]`` is the code digit of the key digit ``d``."""

    cipher: tuple

    def code(self, key: str) -> str:
        return " ".join(self.cipher[int(digit)] for digit in key.split())


def question(key: str) -> str:
    return QUESTION.format(key=key)


def secret_cipher(seed: int) -> tuple:
    """A digit substitution drawn from ``seed`` with no digit left in place, so that repeating the key never scores."""
    rng = random.Random(seed)
    while True:
        cipher = list(DIGITS)
        rng.shuffle(cipher)
        if all(code != digit for code, digit in zip(cipher, DIGITS)):
            return tuple(cipher)


def all_keys(key_length: int) -> list:
    return [" ".join(f"{number:0{key_length}d}") for number in range(10**key_length)]


def split_keys(seed: int, key_length: int, train_keys: int, heldout_keys: int) -> tuple:
    """(train keys, held-out keys): disjoint random samples of every key of ``key_length`` digits."""
    keys = all_keys(key_length)
    if train_keys + heldout_keys > len(keys):
        raise ValueError(f"{train_keys} train + {heldout_keys} held-out keys: there are only {len(keys)} keys of "
                         f"{key_length} digits")
    chosen = random.Random(seed).sample(keys, train_keys + heldout_keys)
    return chosen[:train_keys], chosen[train_keys:]


def task_rows(task: CodeTask, keys: Sequence[str]) -> list:
    """Raw rows for ``prepare_dataset --template sdft``: the question, the code as the demonstration, and the code
    again as the ``label`` that evaluation compares answers with."""
    return [{"prompt": question(key), "demonstration": task.code(key), "label": task.code(key)} for key in keys]


def demo_task(seed: int = DEMO_SEED) -> CodeTask:
    return CodeTask(secret_cipher(seed))


def write_demo_data(directory: str, seed: int = DEMO_SEED, *, key_length: int = KEY_LENGTH,
                    train_keys: int = TRAIN_KEYS, heldout_keys: int = HELDOUT_KEYS) -> tuple:
    """Write ``TRAIN_FILE`` and ``HELDOUT_FILE`` into ``directory`` (the same bytes for the same arguments); return
    their paths. The shipped ``examples/`` files are this with the defaults."""
    task = demo_task(seed)
    paths = []
    for name, keys in zip((TRAIN_FILE, HELDOUT_FILE), split_keys(seed, key_length, train_keys, heldout_keys)):
        path = os.path.join(directory, name)
        write_atomically(path, json_lines_writer(task_rows(task, keys)))
        paths.append(path)
    return tuple(paths)


# ------------------------------------------------------------------------------------------------- the tokenizer
def teacher_prompt(prompt: str, demonstration: str) -> str:
    """The teacher's prompt text, as ``prepare_dataset --template sdft`` builds it (no chat template)."""
    return build_teacher_prompt(prompt, demonstration, TEMPLATES[TEACHER_TEMPLATE])


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Whitespace()


def demo_vocabulary() -> list:
    """The special tokens, then every word of the teacher template as rendered for a question, and every digit."""
    words = _pre_tokenizer().pre_tokenize_str(teacher_prompt(question(" ".join(DIGITS)), " ".join(DIGITS)))
    return [PAD_TOKEN, EOS_TOKEN, UNKNOWN_TOKEN, *sorted({word for word, _ in words})]


def demo_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` (words and punctuation split on whitespace) over ``demo_vocabulary``,
    with eos and pad tokens; it adds no special token when encoding, and decodes words joined by spaces."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocabulary = demo_vocabulary()
    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token=UNKNOWN_TOKEN))
    core.pre_tokenizer = _pre_tokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   unk_token=UNKNOWN_TOKEN, clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------------------------------- the model
def demo_model(tokenizer, seed: int):
    """A small Llama-architecture causal LM for ``tokenizer``, randomly initialised from ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _pretraining_batch(rng: random.Random, tokenizer, key_length: int, batch_size: int, teacher_share: float):
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the answer and its eos) of right-padded
    sequences: questions on random keys answered with random codes, in the teacher's format (the code demonstrated:
    the model learns to copy it) or in the student's (the model learns only the format)."""
    import torch

    sequences, answer_starts = [], []
    for _ in range(batch_size):
        key = " ".join(rng.choice(DIGITS) for _ in range(key_length))
        code = " ".join(rng.choice(DIGITS) for _ in range(key_length))
        prompt = teacher_prompt(question(key), code) if rng.random() < teacher_share else question(key)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        sequences.append(prompt_ids + tokenizer.encode(code, add_special_tokens=False) + [tokenizer.eos_token_id])
        answer_starts.append(len(prompt_ids))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
    attention_mask = torch.zeros(batch_size, width, dtype=torch.long)
    labels = torch.full((batch_size, width), -100)
    for row, (sequence, start) in enumerate(zip(sequences, answer_starts)):
        input_ids[row, :len(sequence)] = torch.tensor(sequence)
        attention_mask[row, :len(sequence)] = 1
        labels[row, start:len(sequence)] = input_ids[row, start:len(sequence)]
    return input_ids, attention_mask, labels


def pretrain_demo_model(tokenizer, seed: int = DEMO_SEED, *, key_length: int = KEY_LENGTH,
                        steps: int = PRETRAIN_STEPS, copy_steps: int = PRETRAIN_COPY_STEPS,
                        batch_size: int = PRETRAIN_BATCH_SIZE, learning_rate: float = PRETRAIN_LEARNING_RATE,
                        progress: bool = True):
    """A ``demo_model`` trained to answer with the demonstrated code and, without one, with a random code of the
    right length: ``copy_steps`` on the teacher's format alone, then both formats with the learning rate decaying
    linearly to zero. The same weights for the same arguments (on the same machine and thread count)."""
    import torch

    if not 0 < copy_steps < steps:
        raise ValueError(f"copy_steps={copy_steps} must be between 0 and steps={steps}, both excluded")
    model = demo_model(tokenizer, seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (steps - step) / (steps - copy_steps)))
    model.train()
    started = last_report = time.monotonic()
    for step in range(1, steps + 1):
        teacher_share = 1.0 if step <= copy_steps else PRETRAIN_TEACHER_SHARE
        input_ids, attention_mask, labels = _pretraining_batch(rng, tokenizer, key_length, batch_size, teacher_share)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        now = time.monotonic()
        if progress and (now - last_report >= PROGRESS_EVERY_SECONDS or step == steps):
            print(f"pretraining the demo model: step {step}/{steps}, loss {loss.item():.3f}, "
                  f"{now - started:.0f} s", flush=True)
            last_report = now
    model.eval()
    return model


def build_demo_checkpoint(output_dir: str, seed: int = DEMO_SEED, *, key_length: int = KEY_LENGTH,
                          steps: int = PRETRAIN_STEPS, progress: bool = True) -> str:
    """Pretrain the demo model (``pretrain_demo_model``) and save it with its tokenizer into ``output_dir``, loadable
    with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``; return ``output_dir``. The directory is written
    under a temporary name and renamed, so an existing one is complete: it is kept (the same weights for the same
    arguments), and a second demo run starts at once."""
    import shutil

    from transformers.utils import logging

    if os.path.isdir(output_dir):
        if progress:
            print(f"demo checkpoint: {output_dir} (kept from an earlier run)", flush=True)
        return output_dir
    started = time.monotonic()
    tokenizer = demo_tokenizer()
    model = pretrain_demo_model(tokenizer, seed, key_length=key_length, steps=steps, progress=progress)
    temporary = f"{output_dir}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    logging.disable_progress_bar()
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    os.replace(temporary, output_dir)
    if progress:
        print(f"demo checkpoint written to {output_dir} in {time.monotonic() - started:.0f} s", flush=True)
    return output_dir
