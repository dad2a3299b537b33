"""Offline top-K distillation through slime's real SFT path, on CPU.

Alignment: a tiny Hugging Face teacher (Qwen2ForCausalLM) and small real chat tokenizers; the real extraction CLI
writes the top-K file and the data file; slime's own data source (``RolloutDataSourceWithBuffer`` -> ``Dataset``,
reading ``--prompt-data data.jsonl --input-key messages --tool-key tools``) and slime's ``sft_rollout`` tokenize the
rows; the plugin's converter attaches the stored rows. The payload must be the stored rows, one per trained token of
slime's loss mask, and the stored rows must be the teacher's own top-K at the positions that predict slime's trained
tokens (recomputed here from the teacher); any mismatch between the training run and the file is an error naming
the row.

Training: the converter's train data, laid out as slime's rollout manager lays it out (``build_dp_schedule``,
``tensorize_rollout_data_for_training``), goes through slime's real ``train_one_step`` -> ``get_batch`` (wrapped by
``megatron_hooks.install``'s offline branch) -> ``loss_function`` -> the plugin's loss, with megatron-core's
``ColumnParallelLinear`` output layer (``tests.megatron_gpt``). Loss, every logit gradient and the reported step
metrics are compared with a float64 brute force (``tests.test_sft_kd.reference_row``) at TP 1, TP 2 (with and without
sequence parallelism) and CP 2.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime_self_distill import megatron_hooks
from slime_self_distill.config import ConfigError, SelfDistillConfig
from slime_self_distill.offline.rollout import OfflineTopKError
from slime_self_distill.offline.topk_file import ROW_RECORD_KEY, TopKFileError
from slime_self_distill.teacher_view import PAYLOAD_KEY, StoredTopK
from tests.chat_tokenizers import WEATHER_TOOLS, WEATHER_TURNS, chat_tokenizer
from tests.megatron_gpt import MegatronTinyGPT
from tests.slime_cpu_harness import (
    destroy_gloo,
    each_two_rank_layout,
    free_port,
    import_slime_megatron,
    init_gloo,
    make_args,
    point_slime_at_cpu,
)
from tests.slime_support import requires_slime
from tests.test_end_to_end_loss import local_rows
from tests.test_sft_kd import reference_row

pytestmark = requires_slime

VOCAB = 640  # the teacher's and the student's (padded) vocabulary; the tokenizers have 469 tokens
TOP_K = 6
TEMPERATURE = 0.7  # extraction's --temperature and the training run's --rollout-temperature
KD_WEIGHT = 0.8

# ---------------------------------------------------------------------- chat rows
SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly."}
ASK = {"role": "user", "content": "What is 12 + 30?"}
ANSWER = {"role": "assistant", "content": "12 + 30 = 42."}

ROWS = [
    {"messages": [SYSTEM, ASK, ANSWER], "metadata": {"source_name": "arith"}},
    {"messages": [  # multi-turn: the user turns and an untrained assistant turn sit inside the response
        ASK, ANSWER,
        {"role": "user", "content": "And 12 + 31?"},
        {"role": "assistant", "content": "12 + 31 = 43.", "step_loss_mask": 0},
        {"role": "user", "content": "Add the tens first."},
        {"role": "assistant", "content": "10 + 30 = 40, then 2 + 1 = 3, so 43."},
    ]},
    {"messages": [  # tools: calls, two tool results in one user turn, a final answer
        SYSTEM, *WEATHER_TURNS,
    ], "tools": WEATHER_TOOLS},
    {"messages": [ASK, {**ANSWER, "reasoning_content": "Add the tens first."}]},
]


# ---------------------------------------------------------------------- fixtures: tokenizers, teacher, extraction
def _extract(root: str, name: str, tokenizer_dir: str, teacher_dir: str, chat_path: str, *flags: str) -> str:
    from slime_self_distill.extract_teacher_topk import main

    out = os.path.join(root, name)
    status = main(["--teacher", teacher_dir, "--tokenizer", tokenizer_dir, "--input", chat_path, "--output-dir", out,
                   "--quiet", "--dtype", "float32", "--device", "cpu", "--max-tokens-per-batch", "600", *flags])
    assert status == 0
    return out


def fitted_teacher(model):
    """A few optimizer steps on the chats (both templates' renderings), so that the teacher backs the data's tokens
    with much of its mass and the KD term and its teacher_target_prob weight weigh in the loss (a random teacher is
    nearly uniform over the vocabulary: its KD would be lost in the tolerances)."""
    sequences = []
    for family in ("qwen25", "qwen3"):
        for row in ROWS:
            ids = chat_tokenizer(family).apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=True)
            sequences.append(torch.tensor(ids if isinstance(ids, list) else ids["input_ids"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(18):
        optimizer.zero_grad()
        loss = sum(model(input_ids=s[None], labels=s[None]).loss for s in sequences) / len(sequences)
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tokenizer directories, the teacher, and two extractions: qwen25 / --loss-mask-type qwen / log-probs at
    TEMPERATURE, and qwen3 / --loss-mask-type qwen3 / raw logits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = str(tmp_path_factory.mktemp("offline_kd"))
    tokenizers = {}
    for family in ("qwen25", "qwen3"):
        tokenizers[family] = os.path.join(root, f"tokenizer_{family}")
        chat_tokenizer(family).save_pretrained(tokenizers[family])
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    teacher_dir = os.path.join(root, "teacher")
    fitted_teacher(Qwen2ForCausalLM(config)).save_pretrained(teacher_dir)
    chat_path = os.path.join(root, "chat.jsonl")
    with open(chat_path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in ROWS)
    logprobs = _extract(root, "logprobs", tokenizers["qwen25"], teacher_dir, chat_path, "--top-k", str(TOP_K),
                        "--temperature", str(TEMPERATURE), "--loss-mask-type", "qwen")
    logits = _extract(root, "logits", tokenizers["qwen3"], teacher_dir, chat_path, "--top-k", "5",
                      "--values", "logits", "--loss-mask-type", "qwen3")
    return SimpleNamespace(root=root, tokenizers=tokenizers, teacher=teacher_dir, logprobs=logprobs, logits=logits)


def stored_rows(out_dir: str) -> dict:
    """``{idx: (ids [n, K], values [n, K])}`` read with pyarrow alone (not the plugin's reader)."""
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(out_dir, "teacher_topk.parquet"))
    k = json.loads(table.schema.metadata[b"slime_self_distill.topk"])["k"]
    rows = {}
    for record in table.to_pylist():
        rows[record["idx"]] = (np.asarray(record["topk_indices"]).reshape(-1, k),
                               np.asarray(record["topk_values"], dtype=np.float32).reshape(-1, k))
    return rows


# ---------------------------------------------------------------------- slime's SFT rollout and the converter
@contextlib.contextmanager
def fresh_sft_rollout():
    """slime's sft_rollout caches its tokenizer and mask generator in module globals: start from none, restore."""
    from slime.rollout import sft_rollout

    names = ("TOKENIZER", "PROCESSOR", "MASK_GENERATOR")
    saved = {name: getattr(sft_rollout, name) for name in names}
    for name in names:
        setattr(sft_rollout, name, None)
    try:
        yield sft_rollout
    finally:
        for name, value in saved.items():
            setattr(sft_rollout, name, value)


def slime_samples(tokenizer_dir: str, data_path: str, loss_mask_type: str) -> list:
    """slime's data source over the data file (``--prompt-data --input-key messages --tool-key tools``) and slime's
    ``sft_rollout`` on every row, flattened as slime's rollout manager flattens the groups."""
    from slime.rollout.base_types import call_rollout_fn
    from slime.rollout.data_source import RolloutDataSourceWithBuffer

    args = Namespace(
        rollout_global_dataset=True, prompt_data=data_path, hf_checkpoint=tokenizer_dir, input_key="messages",
        tool_key="tools", metadata_key="metadata", label_key=None, multimodal_keys=None, apply_chat_template=False,
        apply_chat_template_kwargs=None, rollout_max_prompt_len=None, rollout_seed=42, rollout_shuffle=False,
        dump_details=None, buffer_filter_path=None, n_samples_per_prompt=1, rollout_batch_size=len(ROWS),
        loss_mask_type=loss_mask_type,
    )
    with fresh_sft_rollout() as sft_rollout:
        output = call_rollout_fn(sft_rollout.generate_rollout, args, 0, RolloutDataSourceWithBuffer(args),
                                 evaluation=False)
    samples = output.samples
    while isinstance(samples[0], list):
        samples = list(itertools.chain.from_iterable(samples))
    return samples


def converter_args(topk_path: str, loss_mask_type: str, **overrides) -> Namespace:
    """What the converter reads: slime's reward settings (SFT: reward 0, not normalized), --loss-mask-type,
    --rollout-temperature, and the self-distillation settings."""
    values = dict(
        custom_reward_post_process_path=None, advantage_estimator="grpo", rewards_normalization=False,
        grpo_std_normalization=False, n_samples_per_prompt=1, rollout_batch_size=len(ROWS), reward_key=None,
        rollout_top_p=1.0, use_rollout_routing_replay=False, loss_mask_type=loss_mask_type,
        rollout_temperature=TEMPERATURE, self_distill_offline_topk_path=topk_path, self_distill_kl_scope="topk",
    )
    values.update(overrides)
    return Namespace(**values)


def convert(args: Namespace, samples: list) -> dict:
    from slime_self_distill.custom_convert import convert_samples_to_train_data

    return convert_samples_to_train_data(args, samples)


def full_mask(sample) -> list:
    return [0] * (len(sample.tokens) - sample.response_length) + [int(v) for v in sample.loss_mask]


@pytest.fixture(scope="module")
def qwen25_samples(files):
    return slime_samples(files.tokenizers["qwen25"], os.path.join(files.logprobs, "data.jsonl"), "qwen")


# ---------------------------------------------------------------------- alignment
ALIGNMENT = {  # extraction -> (tokenizer family, --loss-mask-type, value kind, K, the temperature slime runs at)
    "logprobs": ("qwen25", "qwen", "logprobs", TOP_K, TEMPERATURE),
    "logits": ("qwen3", "qwen3", "logits", 5, 1.0),
}


@pytest.mark.parametrize("extraction", list(ALIGNMENT))
def test_payload_is_the_stored_teacher_top_k_of_slimes_trained_tokens(files, extraction):
    from transformers import AutoModelForCausalLM

    family, mask_type, kind, k, temperature = ALIGNMENT[extraction]
    out_dir = getattr(files, extraction)
    samples = slime_samples(files.tokenizers[family], os.path.join(out_dir, "data.jsonl"), mask_type)
    overrides = {"self_distill_topk_tail": "renormalize"} if kind == "logits" else {}
    data = convert(converter_args(os.path.join(out_dir, "teacher_topk.parquet"), mask_type,
                                  rollout_temperature=temperature, **overrides), samples)
    stored = stored_rows(out_dir)
    teacher = AutoModelForCausalLM.from_pretrained(files.teacher, dtype=torch.float32).eval()

    assert len(data[PAYLOAD_KEY]) == len(samples) == len(ROWS) == len(stored)
    untrained_inside = 0
    for position, (sample, payload) in enumerate(zip(samples, data[PAYLOAD_KEY], strict=True)):
        assert isinstance(payload, StoredTopK) and payload.value_kind == kind
        assert payload.idx == sample.metadata[ROW_RECORD_KEY]["idx"] == position  # data.jsonl is in idx order
        ids, values = stored[payload.idx]
        np.testing.assert_array_equal(payload.ids, ids)
        np.testing.assert_array_equal(payload.values, values)
        assert payload.ids.shape == (sum(sample.loss_mask), k)
        assert data["loss_masks"][position] == list(sample.loss_mask)
        first, last = sample.loss_mask.index(1), len(sample.loss_mask) - sample.loss_mask[::-1].index(1)
        untrained_inside += 0 in sample.loss_mask[first:last]

        # the stored rows are the teacher's own top-K at the positions predicting slime's trained tokens
        mask = full_mask(sample)
        predicting = [p - 1 for p, bit in enumerate(mask) if bit]
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([sample.tokens])).logits[0, predicting].double()
        expected = torch.log_softmax(logits / temperature, -1) if kind == "logprobs" else logits
        top_values, top_ids = expected.topk(k, -1)
        np.testing.assert_array_equal(ids, top_ids.numpy())
        np.testing.assert_allclose(values, top_values.numpy(), rtol=0, atol=2e-5)
    assert untrained_inside >= 2  # multi-turn and tool rows: untrained rows between trained ones
    assert samples[0].metadata["source_name"] == "arith"  # the row's own metadata survives extraction
    assert samples[2].metadata["tools"] == WEATHER_TOOLS  # slime read --tool-key from the data file


def test_another_loss_mask_type_is_refused(files, qwen25_samples):
    args = converter_args(os.path.join(files.logprobs, "teacher_topk.parquet"), "qwen3")
    with pytest.raises(ConfigError, match="--loss-mask-type qwen"):
        convert(args, copy.deepcopy(qwen25_samples))


def test_another_tokenizer_is_refused_naming_the_row(files):
    """The qwen3-shaped tokenizer on the rows extracted with the qwen25 one, same --loss-mask-type: some rows
    tokenize differently, and the first of them is named."""
    samples = slime_samples(files.tokenizers["qwen3"], os.path.join(files.logprobs, "data.jsonl"), "qwen")
    reference = slime_samples(files.tokenizers["qwen25"], os.path.join(files.logprobs, "data.jsonl"), "qwen")
    changed = [i for i, (a, b) in enumerate(zip(samples, reference)) if a.tokens != b.tokens]
    assert changed, "the two tokenizers tokenize every row alike: this test would check nothing"
    args = converter_args(os.path.join(files.logprobs, "teacher_topk.parquet"), "qwen")
    with pytest.raises(OfflineTopKError, match=f"data row idx {changed[0]} "):
        convert(args, samples)


def test_a_modified_message_is_refused_naming_the_row(files, tmp_path):
    """The data file edited after extraction (an answer reworded): slime trains on other tokens than were stored."""
    data_path = os.path.join(files.logprobs, "data.jsonl")
    with open(data_path) as f:
        rows = [json.loads(line) for line in f]
    rows[3]["messages"][-1]["content"] = "The answer is 42, since 12 + 30 = 42."
    edited = tmp_path / "data.jsonl"
    edited.write_text("".join(json.dumps(row) + "\n" for row in rows))
    samples = slime_samples(files.tokenizers["qwen25"], str(edited), "qwen")
    args = converter_args(os.path.join(files.logprobs, "teacher_topk.parquet"), "qwen")
    with pytest.raises(OfflineTopKError, match="data row idx 3 "):
        convert(args, samples)


def test_same_count_other_tokens_is_refused_by_the_digest(files, qwen25_samples):
    samples = copy.deepcopy(qwen25_samples)
    samples[1].tokens[2] = (samples[1].tokens[2] + 1) % 400  # a prompt token: the trained-token count is unchanged
    args = converter_args(os.path.join(files.logprobs, "teacher_topk.parquet"), "qwen")
    with pytest.raises(OfflineTopKError, match="data row idx 1 .*digest"):
        convert(args, samples)


def test_a_data_file_of_another_extraction_is_refused_row_by_row(files, qwen25_samples, tmp_path):
    """The usual mistake: the data file of one extraction with the top-K file of another (here one more K; another
    --max-length would renumber the rows): the idx agree, the stored rows are not these rows' teacher."""
    from slime_self_distill.data_source import SelfDistillDataError
    from slime_self_distill.offline.rollout import check_data_file

    other = _extract(str(tmp_path), "other", files.tokenizers["qwen25"], files.teacher,
                     os.path.join(files.root, "chat.jsonl"), "--top-k", str(TOP_K + 1), "--temperature",
                     str(TEMPERATURE), "--loss-mask-type", "qwen")
    other_topk = os.path.join(other, "teacher_topk.parquet")
    with pytest.raises(OfflineTopKError, match="data row idx 0 .*another extraction"):
        convert(converter_args(other_topk, "qwen"), copy.deepcopy(qwen25_samples))
    data_file = os.path.join(files.logprobs, "data.jsonl")
    with pytest.raises(SelfDistillDataError, match="row 1: written by another extraction"):
        check_data_file(data_file, data_file_keys(), other_topk)
    own = check_data_file(data_file, data_file_keys(), os.path.join(files.logprobs, "teacher_topk.parquet"))
    assert f"{len(ROWS)} rows" in own and "the data file extraction wrote" in own
    subset = tmp_path / "subset.jsonl"
    with open(data_file) as f:
        subset.write_text("".join(f.readlines()[1:]))
    assert "not the data file extraction wrote" in check_data_file(
        str(subset), data_file_keys(), os.path.join(files.logprobs, "teacher_topk.parquet"))


def data_file_keys(**overrides):
    from slime_self_distill.offline.rollout import DataFileKeys

    return DataFileKeys(**{"input_key": "messages", "metadata_key": "metadata", "tool_key": "tools",
                           "loss_mask_type": "qwen", **overrides})


def test_the_launch_check_tokenizes_every_row_with_a_local_tokenizer(files, tmp_path):
    """With --hf-checkpoint a local directory, --check-only finds at launch what the converter would stop at later."""
    from slime_self_distill.data_source import SelfDistillDataError
    from slime_self_distill.offline.rollout import check_data_file

    topk = os.path.join(files.logprobs, "teacher_topk.parquet")
    data_file = os.path.join(files.logprobs, "data.jsonl")
    same = check_data_file(data_file, data_file_keys(tokenizer=files.tokenizers["qwen25"]), topk)
    assert "every row tokenizes as extraction tokenized it" in same
    with pytest.raises(SelfDistillDataError, match=r"row \d+: tokenizes into other tokens"):
        check_data_file(data_file, data_file_keys(tokenizer=files.tokenizers["qwen3"]), topk)
    with pytest.raises(SelfDistillDataError, match="--loss-mask-type qwen3: .* was extracted with --loss-mask-type "
                                                   "qwen,"):
        check_data_file(data_file, data_file_keys(tokenizer=files.tokenizers["qwen25"], loss_mask_type="qwen3"), topk)
    with pytest.raises(SelfDistillDataError, match="row 1: no chat messages under --input-key 'prompt'"):
        check_data_file(data_file, data_file_keys(input_key="prompt"), topk)


def test_a_sample_without_its_record_is_refused(files, qwen25_samples):
    samples = copy.deepcopy(qwen25_samples)
    del samples[2].metadata[ROW_RECORD_KEY]
    args = converter_args(os.path.join(files.logprobs, "teacher_topk.parquet"), "qwen")
    with pytest.raises(OfflineTopKError, match="sample 2 of the rollout has no 'self_distill_topk' record"):
        convert(args, samples)


def test_a_wrong_idx_is_refused(files, qwen25_samples):
    args = converter_args(os.path.join(files.logprobs, "teacher_topk.parquet"), "qwen")
    samples = copy.deepcopy(qwen25_samples)
    assert sum(samples[0].loss_mask) != sum(samples[1].loss_mask)
    samples[0].metadata[ROW_RECORD_KEY]["idx"] = 1  # another row's stored values
    with pytest.raises(OfflineTopKError, match="data row idx 1 "):
        convert(args, samples)
    samples = copy.deepcopy(qwen25_samples)
    samples[1].metadata[ROW_RECORD_KEY]["idx"] = 17  # no such row
    with pytest.raises(TopKFileError, match="no row with idx 17"):
        convert(args, samples)


@pytest.mark.xfail(strict=True, raises=pytest.fail.Exception, reason=(
    "known limit (README): the top-K file's three columns hold no per-row digest; the converter checks the sample's "
    "tokens against its own record's digest, the stored row count and the record's extraction id, so an idx edited "
    "by hand, within one extraction's data file, to another row with as many trained tokens is accepted"))
def test_a_wrong_idx_to_a_row_of_the_same_length_is_refused(files, qwen25_samples):
    samples = copy.deepcopy(qwen25_samples)
    assert sum(samples[0].loss_mask) == sum(samples[3].loss_mask)  # "12 + 30 = 42." answers both
    assert samples[0].tokens != samples[3].tokens
    samples[0].metadata[ROW_RECORD_KEY]["idx"] = 3
    args = converter_args(os.path.join(files.logprobs, "teacher_topk.parquet"), "qwen")
    with pytest.raises(OfflineTopKError, match="data row idx 3 "):
        convert(args, samples)


def test_raw_logits_need_the_renormalized_tail(files):
    samples = slime_samples(files.tokenizers["qwen3"], os.path.join(files.logits, "data.jsonl"), "qwen3")
    path = os.path.join(files.logits, "teacher_topk.parquet")
    with pytest.raises(ConfigError, match="--self-distill-topk-tail renormalize"):
        convert(converter_args(path, "qwen3", rollout_temperature=1.0, self_distill_topk_tail="bucket"), samples)
    data = convert(converter_args(path, "qwen3", rollout_temperature=1.0, self_distill_topk_tail="renormalize"),
                   samples)
    assert [p.value_kind for p in data[PAYLOAD_KEY]] == ["logits"] * len(ROWS)


def test_temperature_mismatch_is_refused(files, qwen25_samples):
    args = converter_args(os.path.join(files.logprobs, "teacher_topk.parquet"), "qwen", rollout_temperature=1.0)
    with pytest.raises(ConfigError, match=f"temperature {TEMPERATURE}.*--rollout-temperature 1.0"):
        convert(args, copy.deepcopy(qwen25_samples))


def test_raw_logits_need_rollout_temperature_one(files):
    """Raw logits are renormalized as stored (temperature 1) while slime divides the student's logits by
    --rollout-temperature: another temperature would compare the two at different temperatures."""
    samples = slime_samples(files.tokenizers["qwen3"], os.path.join(files.logits, "data.jsonl"), "qwen3")
    args = converter_args(os.path.join(files.logits, "teacher_topk.parquet"), "qwen3", rollout_temperature=0.7,
                          self_distill_topk_tail="renormalize")
    with pytest.raises(ConfigError, match="raw logits.*--rollout-temperature 0.7"):
        convert(args, samples)


def test_explicit_top_k_takes_the_first_columns_and_not_more(files, qwen25_samples):
    path = os.path.join(files.logprobs, "teacher_topk.parquet")
    stored = stored_rows(files.logprobs)
    data = convert(converter_args(path, "qwen", self_distill_topk=3), copy.deepcopy(qwen25_samples))
    for payload in data[PAYLOAD_KEY]:
        np.testing.assert_array_equal(payload.ids, stored[payload.idx][0][:, :3])
        np.testing.assert_array_equal(payload.values, stored[payload.idx][1][:, :3])
    data = convert(converter_args(path, "qwen", self_distill_topk=TOP_K), copy.deepcopy(qwen25_samples))
    assert all(payload.ids.shape[1] == TOP_K for payload in data[PAYLOAD_KEY])
    with pytest.raises(ConfigError, match=f"--self-distill-topk {TOP_K + 1}: .* K={TOP_K}"):
        convert(converter_args(path, "qwen", self_distill_topk=TOP_K + 1), copy.deepcopy(qwen25_samples))


# ---------------------------------------------------------------------- the loss through slime's training step
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LOSS_CASES = {  # the self-distillation settings of each case (KD_WEIGHT, not the default 1)
    "forward_kl-bucket": dict(self_distill_divergence="forward_kl", self_distill_topk_tail="bucket",
                              self_distill_kd_weight=KD_WEIGHT),
    "alpha_js-renormalize-target_prob": dict(self_distill_divergence="alpha_js", self_distill_alpha=0.3,
                                             self_distill_topk_tail="renormalize", self_distill_kd_weight=KD_WEIGHT,
                                             self_distill_kd_token_weight="teacher_target_prob"),
}


def _reference_settings(settings: dict) -> dict:
    config = SelfDistillConfig.from_args(Namespace(**settings))
    return dict(divergence=config.divergence, alpha=config.alpha, tail=config.topk_tail, kd_weight=config.kd_weight,
                token_weight=config.kd_token_weight)


@pytest.fixture(scope="module")
def training_inputs(files, qwen25_samples):
    """The converter's train data for the qwen25 rows and the stored rows read independently."""
    path = os.path.join(files.logprobs, "teacher_topk.parquet")
    train_data = convert(converter_args(path, "qwen"), copy.deepcopy(qwen25_samples))
    return SimpleNamespace(train_data=train_data, stored=stored_rows(files.logprobs), path=path)


def training_rollout(train_data: dict, args: Namespace) -> dict:
    """One DP rank's rollout data as slime's rollout manager builds it (``_split_train_data_by_dp`` with one DP rank:
    ``build_dp_schedule``, the keys it ships, ``tensorize_rollout_data_for_training``)."""
    from slime.observability.rollout_data_utils import tensorize_rollout_data_for_training
    from slime.utils.dp_schedule import build_dp_schedule

    data = dict(train_data)
    data["total_lengths"] = [len(tokens) for tokens in data["tokens"]]
    config = {"dp_size": 1, "cp_size": args.context_parallel_size, "vpp_size": 1,
              "microbatch_group_size_per_vp_stage": 1}
    partitions, micro_batch_indices, num_microbatches, global_batch_sizes = build_dp_schedule(
        args, config, data["total_lengths"], global_batch_size=len(data["tokens"]),
        rollout_indices=data["rollout_ids"])
    (partition,) = partitions
    rollout = {"partition": partition}
    for key in ("tokens", "response_lengths", "rewards", "truncated", "loss_masks", "sample_indices", "rollout_ids",
                "rollout_mask_sums", "source_names", "prompt"):
        rollout[key] = [data[key][j] for j in partition]
    rollout["total_lengths"] = [data["total_lengths"][j] for j in partition]
    rollout.update(global_batch_sizes=global_batch_sizes, num_microbatches=num_microbatches,
                   micro_batch_indices=micro_batch_indices[0])
    tensorize_rollout_data_for_training(rollout)
    return rollout


class Reference:
    """float64, per sample: the student's sequence logits (a leaf) and its per-token terms, cross-entropies and
    divergences on the trained rows, from the stored rows read with pyarrow (by the sample's data row)."""

    def __init__(self, model: MegatronTinyGPT, rollout: dict, stored: dict, settings: dict):
        settings = _reference_settings(settings)
        self.logits, self.sums, self.counts, self.cross_entropy, self.kd = [], [], [], [], []
        for tokens, response_length, mask, idx in zip(rollout["tokens"], rollout["response_lengths"],
                                                      rollout["loss_masks"], rollout["sample_indices"], strict=True):
            logits = model.sequence_logits(tokens, torch.float64).detach().requires_grad_()
            prompt_length = len(tokens) - response_length
            ids, values = stored[idx]
            trained = [j for j in range(response_length) if mask[j]]
            assert len(trained) == len(ids)
            terms, cross_entropy, kd = [], 0.0, 0.0
            for row, j in enumerate(trained):  # stored row `row` belongs to the row-th trained token
                term, ce, divergence, _ = reference_row(
                    logits[prompt_length + j - 1] / TEMPERATURE, int(tokens[prompt_length + j]), ids[row].tolist(),
                    values[row].tolist(), **settings)
                terms.append(term)
                cross_entropy, kd = cross_entropy + float(ce), kd + float(divergence)
            self.logits.append(logits)
            self.sums.append(torch.stack(terms).sum())
            self.counts.append(len(trained))
            self.cross_entropy.append(cross_entropy)
            self.kd.append(kd)

    def micro_batch_objective(self, micro_batch: list, per_token: bool, num_microbatches: int) -> torch.Tensor:
        """slime's scaled loss of one micro-batch (summed over CP ranks, Megatron's CP factor removed): per token, the
        sum of the terms; per sample, the sum of the samples' means x num_microbatches / samples per step."""
        if per_token:
            return sum(self.sums[i] for i in micro_batch)
        return sum(self.sums[i] / self.counts[i] for i in micro_batch) * num_microbatches / len(self.sums)

    def step_mean(self, values: list, per_token: bool) -> float:
        if per_token:
            return float(sum(values)) / sum(self.counts)
        return sum(float(v) / c for v, c in zip(values, self.counts)) / len(self.counts)


def check_offline_training_step(slime, training, settings: dict, per_token: bool, set_attribute=setattr,
                                sequence_parallel: bool = False, **parallel) -> None:
    """``settings``: the self_distill_* arguments of the run (the offline file's path is added)."""
    from megatron.core import mpu

    args = make_args(
        custom_loss_function_path="slime_self_distill.custom_loss.self_distill_loss",
        calculate_per_token_loss=per_token, recompute_loss_function=False,
        custom_megatron_before_train_step_hook_path=None, save_debug_train_data=None, enable_mtp_training=False,
        decoder_seq_length=None, ci_test=False, micro_batch_size=2, balance_data=False, balance_by_flops=False,
        padded_vocab_size=VOCAB, vocab_size=VOCAB, rollout_temperature=TEMPERATURE, loss_mask_type="qwen",
        n_samples_per_prompt=1, **{"self_distill_teacher": None, "self_distill_kl_scope": "topk", **settings,
           "self_distill_offline_topk_path": training.path}, **parallel,
    )
    set_attribute(slime.model, "get_args", lambda: args)  # megatron.training's global args, read by train_one_step
    megatron_hooks.install(args)
    try:
        # the offline branch's wrapper (functools.wraps copies slime's names: its code is the plugin's)
        assert slime.model.get_batch.__code__.co_qualname == "wrap_get_batch_offline.<locals>.get_batch"
        model = MegatronTinyGPT(vocab_size=VOCAB, hidden=8, seed=3, sequence_parallel=sequence_parallel)
        rollout = training_rollout(training.train_data, args)
        samples_per_step = len(rollout["tokens"])
        optimizer = SimpleNamespace(zero_grad=lambda: None, step=lambda: (True, 0.0, 0))
        scheduler = SimpleNamespace(step=lambda increment: None)
        loss_reduced, _ = slime.model.train_one_step(
            args, 0, 0, slime.data.get_data_iterator(rollout), [model], optimizer, scheduler,
            rollout["num_microbatches"][0], samples_per_step)
    finally:
        megatron_hooks.uninstall()

    cp_size, cp_rank = mpu.get_context_parallel_world_size(), mpu.get_context_parallel_rank()
    tp_size, tp_rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    columns = slice(tp_rank * VOCAB // tp_size, (tp_rank + 1) * VOCAB // tp_size)
    reference = Reference(model, rollout, training.stored, settings)
    micro_batches = rollout["micro_batch_indices"]
    assert len(model.trained) == len(micro_batches) >= 2 and max(len(m) for m in micro_batches) == 2
    for micro_batch, trained in zip(micro_batches, model.trained, strict=True):
        loss = trained.loss.clone()
        if cp_size > 1:
            dist.all_reduce(loss, group=mpu.get_context_parallel_group())
        objective = reference.micro_batch_objective(micro_batch, per_token, len(micro_batches))
        torch.testing.assert_close(loss.double() / cp_size, objective.detach(), rtol=1e-5, atol=1e-7)

        gradients = torch.autograd.grad(objective, [reference.logits[i] for i in micro_batch])
        expected = torch.zeros_like(trained.logits_grad[0], dtype=torch.float64)
        for row, (sample, position) in enumerate(local_rows(trained.batch, cp_rank, cp_size)):
            if sample >= 0 and position < trained.batch["total_lengths"][sample]:
                expected[row] = gradients[sample][position, columns]
        scale = float(expected.abs().max())
        torch.testing.assert_close(trained.logits_grad[0].double() / cp_size, expected, rtol=1e-4, atol=3e-5 * scale,
                                   msg=lambda text: f"{settings}: {text}")
        if per_token:
            assert int(trained.normalizer) == sum(reference.counts[i] for i in micro_batch)
    assert loss_reduced["loss"] == pytest.approx(
        reference.step_mean([s.detach() for s in reference.sums], per_token), rel=1e-5)
    assert loss_reduced["self_distill_sft_loss"] == pytest.approx(
        reference.step_mean(reference.cross_entropy, per_token), rel=1e-5)
    assert loss_reduced["self_distill_kd_loss"] == pytest.approx(reference.step_mean(reference.kd, per_token),
                                                                 rel=1e-4, abs=1e-6)


def test_training_data_is_what_the_step_tests_need(training_inputs):
    """Guards the training tests themselves: untrained rows inside responses, and a teacher whose KD term weighs
    (it backs the data's tokens with much of its mass, and leaves a tail outside its top-K)."""
    data = training_inputs.train_data
    assert sum(0 in mask[mask.index(1):] for mask in data["loss_masks"]) >= 2
    target_probs, tails = [], []
    for tokens, mask, idx in zip(data["tokens"], data["loss_masks"], data["sample_indices"], strict=True):
        ids, values = training_inputs.stored[idx]
        targets = [tokens[len(tokens) - len(mask) + j] for j, bit in enumerate(mask) if bit]
        for row, target in enumerate(targets):
            hits = [math.exp(v) for i, v in zip(ids[row], values[row]) if i == target]
            target_probs.append(hits[0] if hits else 0.0)
            tails.append(1 - sum(math.exp(v) for v in values[row]))
    assert sum(target_probs) / len(target_probs) > 0.2
    assert sum(tails) / len(tails) > 0.02


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample_mean", "per_token_loss"])
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_training_step_loss_and_logit_gradients_equal_brute_force(training_inputs, slime_megatron, monkeypatch,
                                                                  case, per_token):
    point_slime_at_cpu(monkeypatch.setattr)
    check_offline_training_step(slime_megatron, training_inputs, LOSS_CASES[case], per_token,
                                set_attribute=monkeypatch.setattr)


def test_the_offline_topk_kd_recipe_through_the_launcher(training_inputs, slime_megatron, monkeypatch):
    """configs/offline_topk_kd.yaml as the launcher hands it to slime (its settings, its --calculate-per-token-loss,
    the --loss-mask-type read from the file), through the same training step and brute force."""
    from slime_self_distill.train import plan_launch
    from tests.test_train import slime_parser

    plan = plan_launch(["--custom-config-path", str(CONFIGS / "offline_topk_kd.yaml"),
                        "--self-distill-offline-topk-path", training_inputs.path,
                        "--rollout-temperature", str(TEMPERATURE), "--rollout-batch-size", str(len(ROWS))])
    slime_args, _ = slime_parser().parse_known_args(plan.slime_argv)
    assert (slime_args.loss_mask_type, slime_args.rollout_temperature) == ("qwen", TEMPERATURE)
    assert slime_args.rollout_function_path == "slime.rollout.sft_rollout.generate_rollout"
    per_token = "--calculate-per-token-loss" in plan.slime_argv
    assert per_token and plan.config.offline and plan.config.kd_weight > 0
    point_slime_at_cpu(monkeypatch.setattr)
    check_offline_training_step(slime_megatron, training_inputs, plan.config.to_args_dict(), per_token,
                                set_attribute=monkeypatch.setattr)


def _parallel_worker(rank: int, port: int, training) -> None:
    slime = import_slime_megatron()
    init_gloo(rank, 2, port, slime_group=True)
    point_slime_at_cpu()
    for tp_size, cp_size, sequence_parallel in each_two_rank_layout():
        for case in LOSS_CASES:
            for per_token in (False, True):
                check_offline_training_step(slime, training, LOSS_CASES[case], per_token,
                                            sequence_parallel=sequence_parallel, tensor_model_parallel_size=tp_size,
                                            context_parallel_size=cp_size)
    destroy_gloo()


@pytest.mark.distributed
def test_tensor_and_context_parallel_training_steps_equal_brute_force(training_inputs):
    training = SimpleNamespace(**vars(training_inputs))
    mp.spawn(_parallel_worker, args=(free_port(), training), nprocs=2)


@pytest.mark.parametrize("setting, message", [
    ({"loss_type": "sft_loss"}, "--loss-type custom_loss"),
    ({"n_samples_per_prompt": 2}, "--n-samples-per-prompt 2"),
    ({"apply_chat_template": True}, "--apply-chat-template"),
    ({"allgather_cp": True, "context_parallel_size": 2}, "--allgather-cp"),
])
def test_slime_settings_the_offline_run_cannot_honour_are_refused(setting, message):
    args = Namespace(**{"loss_type": "custom_loss", "n_samples_per_prompt": 1, "apply_chat_template": False,
                        "allgather_cp": False, "context_parallel_size": 1, **setting})
    config = SelfDistillConfig(kl_scope="topk", offline_topk_path="teacher_topk.parquet")
    with pytest.raises(ConfigError, match=message):
        megatron_hooks.check_offline_args(args, config)
    megatron_hooks.check_offline_args(Namespace(**{**vars(args), **{
        "loss_type": "custom_loss", "n_samples_per_prompt": 1, "apply_chat_template": False, "allgather_cp": False}}),
        config)
