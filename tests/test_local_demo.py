"""The CPU demo's pieces (``slime_self_distill.local.demo``): the shipped key-value files, the word-level tokenizer,
the tiny model pretrained to read demonstrations, and the demo itself (the README's first command), which learns."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re

import pytest
import torch

pytest.importorskip("transformers")

from slime_self_distill import local_train, prepare_dataset  # noqa: E402
from slime_self_distill.local import demo  # noqa: E402
from slime_self_distill.local.rollout import generate  # noqa: E402
from slime_self_distill.local.trainer import exact_match_accuracy  # noqa: E402
from tests.cli_support import read_jsonl  # noqa: E402

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
SHIPPED = {name: EXAMPLES / name for name in (demo.TRAIN_FILE, demo.HELDOUT_FILE)}
KEY_OF_QUESTION = re.compile(r"What is the code of ((?:\d )+)\?")
REGENERATE = "python -c 'from slime_self_distill.local import demo; demo.write_demo_data(\"examples\")'"


def key_of(row: dict) -> str:
    match = KEY_OF_QUESTION.fullmatch(row["prompt"])
    assert match, f"not a question of the task: {row['prompt']!r}"
    return match.group(1).strip()


@pytest.fixture(scope="module")
def shipped_rows() -> dict:
    return {name: read_jsonl(path) for name, path in SHIPPED.items()}


@pytest.fixture(scope="module")
def tokenizer():
    return demo.demo_tokenizer()


# ---------------------------------------------------------------------------------------------------- the data
def test_the_shipped_files_are_what_the_generator_writes(tmp_path):
    written = demo.write_demo_data(str(tmp_path))
    for path in written:
        shipped = SHIPPED[pathlib.Path(path).name]
        assert pathlib.Path(path).read_bytes() == shipped.read_bytes(), f"{shipped} is stale: {REGENERATE}"


def test_every_answer_is_the_key_under_one_secret_substitution(shipped_rows):
    """Read from the files alone: each key digit always gets the same code digit, no two key digits share one, none
    keeps its own digit; and it is the seeded cipher of the demo."""
    substitution = {}
    for rows in shipped_rows.values():
        for row in rows:
            key_digits, code_digits = key_of(row).split(), row["label"].split()
            assert row["demonstration"] == row["label"]
            assert len(key_digits) == len(code_digits) == demo.KEY_LENGTH
            for digit, code in zip(key_digits, code_digits):
                assert substitution.setdefault(digit, code) == code, f"key digit {digit} has two codes"
    assert sorted(substitution) == sorted(substitution.values()) == list(demo.DIGITS)
    assert all(digit != code for digit, code in substitution.items())
    assert tuple(substitution[d] for d in demo.DIGITS) == demo.demo_task().cipher


def test_held_out_keys_are_never_training_keys(shipped_rows):
    train = [key_of(row) for row in shipped_rows[demo.TRAIN_FILE]]
    heldout = [key_of(row) for row in shipped_rows[demo.HELDOUT_FILE]]
    assert (len(train), len(heldout)) == (demo.TRAIN_KEYS, demo.HELDOUT_KEYS)
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)


def test_another_seed_draws_another_cipher_and_split():
    assert demo.secret_cipher(1) != demo.secret_cipher(0)
    assert demo.split_keys(1, 3, 5, 5) != demo.split_keys(0, 3, 5, 5)
    with pytest.raises(ValueError, match="only 100 keys"):
        demo.split_keys(0, 2, 90, 20)


# ----------------------------------------------------------------------------------------------- the tokenizer
@pytest.fixture(scope="module")
def prepared_rows(tmp_path_factory) -> list:
    """Both shipped files through ``prepare_dataset --template sdft``, as the demo prepares them."""
    directory = tmp_path_factory.mktemp("prepared")
    rows = []
    for name, path in SHIPPED.items():
        output = directory / name
        assert prepare_dataset.main(["--input", str(path), "--output", str(output), "--template", "sdft",
                                     "--quiet"]) == 0
        rows += read_jsonl(output)
    return rows


def test_prepared_rows_keep_the_label_and_the_sdft_teacher_prompt(prepared_rows):
    assert len(prepared_rows) == demo.TRAIN_KEYS + demo.HELDOUT_KEYS
    for row in prepared_rows:
        demonstration = row["metadata"]["self_distill"]["demonstration"]
        assert row["label"] == demonstration
        assert row["metadata"]["teacher_prompt"] == demo.teacher_prompt(row["prompt"], demonstration)


def test_the_tokenizer_knows_every_word_of_every_prompt_and_answer(prepared_rows, tokenizer):
    for row in prepared_rows:
        for text in (row["prompt"], row["metadata"]["teacher_prompt"]):
            assert tokenizer.unk_token_id not in tokenizer.encode(text, add_special_tokens=False), text
        # a right answer, generated token by token, decodes to exactly its label
        answer = tokenizer.encode(row["label"], add_special_tokens=False)
        assert len(answer) == demo.KEY_LENGTH and tokenizer.decode(answer + [tokenizer.eos_token_id],
                                                                   skip_special_tokens=True) == row["label"]


def test_the_tokenizer_adds_nothing_and_survives_a_save(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    specials = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    assert len(specials) == 3
    assert tokenizer.encode("What is the code of 1 2 3 ?") == tokenizer.encode("What is the code of 1 2 3 ?",
                                                                                add_special_tokens=False)
    assert tokenizer.unk_token_id in tokenizer.encode("What is the cipher of 12 ?", add_special_tokens=False)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = demo.teacher_prompt("What is the code of 0 5 9 ?", "7 4 6")
    assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------------- the model
def test_pretraining_is_deterministic_given_the_seed(tokenizer):
    def pretrained(seed):
        model = demo.pretrain_demo_model(tokenizer, seed, steps=4, copy_steps=2, batch_size=4, progress=False)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    first = pretrained(5)
    assert torch.equal(first, pretrained(5))
    assert not torch.equal(first, pretrained(6))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> pathlib.Path:
    """The README's first command, ``python -m slime_self_distill.local_train --demo`` (about a minute and a half on
    2 CPU cores: the tiny model's pretraining, then 150 rollouts), into a temporary output directory."""
    output = tmp_path_factory.mktemp("demo")
    assert local_train.main(["--demo", "--output-dir", str(output), "--quiet"]) == 0
    return output


def test_the_pretrained_model_reads_demonstrations_and_knows_no_cipher(demo_run, shipped_rows):
    """With the demonstration the held-out answers are right; without it they are at chance (the cipher was never
    seen): what self-distillation has to move. Scored by the trainer's own evaluation (greedy, exact match)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = demo_run / "base_model"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    rows = shipped_rows[demo.HELDOUT_FILE]
    labels = [row["label"] for row in rows]

    def ids(texts):
        return [tokenizer.encode(text, add_special_tokens=False) for text in texts]

    teacher_prompts = ids(demo.teacher_prompt(row["prompt"], row["demonstration"]) for row in rows)
    student_prompts = ids(row["prompt"] for row in rows)
    max_new_tokens = demo.KEY_LENGTH + 1
    assert exact_match_accuracy(model, tokenizer, teacher_prompts, labels, max_new_tokens, 64) >= 0.9
    assert exact_match_accuracy(model, tokenizer, student_prompts, labels, max_new_tokens, 64) <= 0.05
    # mixed prompt lengths in one left-padded batch are answered as they are one at a time
    mixed, mixed_labels = teacher_prompts[:4] + student_prompts[:4], labels[:4] * 2
    one_at_a_time = [exact_match_accuracy(model, tokenizer, [p], [label], max_new_tokens, 1)
                     for p, label in zip(mixed, mixed_labels)]
    assert exact_match_accuracy(model, tokenizer, mixed, mixed_labels, max_new_tokens, 8) == \
        sum(one_at_a_time) / len(mixed)
    # half the labels made wrong (a token more than the answer): half the accuracy
    answers = [tokenizer.decode(a, skip_special_tokens=True) for a, _, _ in
               generate(model, tokenizer, teacher_prompts[:8], max_new_tokens=max_new_tokens, greedy=True)]
    labels = answers[:4] + [answer + " 9" for answer in answers[4:]]
    assert exact_match_accuracy(model, tokenizer, teacher_prompts[:8], labels, max_new_tokens, 3) == 0.5


def test_the_demo_student_learns_to_answer_without_the_demonstration(demo_run):
    """The numbers the demo prints: the held-out student without demonstrations before and after, the teacher with
    them. Self-distillation is the only way the student can know the cipher, and the keys were never trained on."""
    summary = json.loads((demo_run / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    student, teacher = "eval/heldout/student_accuracy", "eval/heldout/teacher_accuracy"
    print(f"demo: student {before[student]:.2f} -> {after[student]:.2f}, teacher {before[teacher]:.2f} -> "
          f"{after[teacher]:.2f}, {summary['seconds']:.0f} s of training")
    assert before[student] <= 0.05 and before[teacher] >= 0.9
    assert after[student] >= 0.8 and after[teacher] >= 0.9
    records = [json.loads(line) for line in (demo_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout"] for r in records] == list(range(151))
    if importlib.util.find_spec("matplotlib"):  # the local and test extras install it
        assert (demo_run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
