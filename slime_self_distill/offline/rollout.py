"""Rollout-side glue of offline top-K distillation: the converter attaches each SFT sample's stored teacher top-K.

slime's ``sft_rollout`` tokenizes each row of the data file (``--loss-mask-type``) into ``sample.tokens`` and the
response's ``sample.loss_mask``; the row's ``metadata["self_distill_topk"]`` (written by extraction) says which
top-K row belongs to it and the digest of the tokens and loss mask extraction computed. A sample whose tokens, loss
mask or trained-token count differ from the stored row's is an error naming the row: the stored values would belong
to other tokens. Reading is per rollout, only the row groups of the rollout's rows (``TopKFile``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from slime_self_distill.config import ConfigError, SelfDistillConfig, flag_name
from slime_self_distill.data.sft_tokens import SftTokens, row_tools
from slime_self_distill.offline.topk_file import ROW_RECORD_KEY, TopKFile, TopKFileInfo
from slime_self_distill.teacher_view import StoredTopK


class OfflineTopKError(ValueError):
    """A sample that does not match its stored teacher row; the message names the row and the fix."""


@functools.lru_cache(maxsize=4)
def open_topk_file(path: str) -> TopKFile:
    return TopKFile(path)


def used_k(info: TopKFileInfo, config: SelfDistillConfig, explicit: set) -> int:
    """The file's K, or a smaller --self-distill-topk given explicitly (the first K of each row by value)."""
    if "topk" not in explicit:
        return info.k
    if config.topk > info.k:
        raise ConfigError(f"{flag_name('topk')} {config.topk}: the teacher top-K file holds K={info.k} per token; use "
                          f"at most {info.k}, or extract again with --top-k {config.topk}")
    return config.topk


def check_file_against_args(info: TopKFileInfo, path: str, args: Any, config: SelfDistillConfig) -> None:
    """What the file records against the training run's settings."""
    mask_type = getattr(args, "loss_mask_type", "qwen")
    if info.loss_mask_type != mask_type:
        raise ConfigError(f"{path!r} was extracted with --loss-mask-type {info.loss_mask_type}, this run tokenizes "
                          f"with --loss-mask-type {mask_type}: use {info.loss_mask_type} (the stored rows follow its "
                          "tokens)")
    if info.values == "logits" and config.topk_tail != "renormalize":
        raise ConfigError(f"{path!r} holds raw logits, which say nothing of the mass outside the top-K: set "
                          f"{flag_name('topk_tail')} renormalize, or extract log-probabilities (--values logprobs)")
    temperature = float(getattr(args, "rollout_temperature", 1.0))
    if info.values == "logprobs" and info.temperature != temperature:
        raise ConfigError(f"{path!r} holds log-probabilities at temperature {info.temperature}, and slime divides the "
                          f"student's logits by --rollout-temperature {temperature} in training: extract at "
                          f"--temperature {temperature}, or set --rollout-temperature {info.temperature}")
    if info.values == "logits" and temperature != 1.0:  # the K logits are renormalized as they are (temperature 1)
        raise ConfigError(f"{path!r} holds raw logits, read as the teacher's distribution at temperature 1, and slime "
                          f"divides the student's logits by --rollout-temperature {temperature} in training: set "
                          f"--rollout-temperature 1, or extract log-probabilities at --temperature {temperature}")


def _record_of(sample: Any, position: int) -> dict:
    metadata = getattr(sample, "metadata", None) or {}
    record = metadata.get(ROW_RECORD_KEY)
    if not isinstance(record, dict) or not {"idx", "digest", "trained_tokens", "extraction"} <= set(record):
        raise OfflineTopKError(
            f"sample {position} of the rollout has no {ROW_RECORD_KEY!r} record in its metadata: --prompt-data must be "
            "the data file extract_teacher_topk wrote beside the top-K file (data.jsonl), read with slime's "
            "--metadata-key pointing at its metadata column"
        )
    return record


def _check_alignment(sample: Any, record: dict, ids_rows: int) -> None:
    where = f"data row idx {record['idx']} (line {record['idx'] + 1} of the data file)"
    response_length = int(sample.response_length)
    response_mask = [int(v) for v in sample.loss_mask]
    if len(response_mask) != response_length:
        raise OfflineTopKError(f"{where}: the sample's loss mask has {len(response_mask)} entries for a response of "
                               f"{response_length} tokens; the rollout is not slime's sft_rollout "
                               "(--rollout-function-path slime.rollout.sft_rollout.generate_rollout)")
    tokens = [int(t) for t in sample.tokens]
    full_mask = (0,) * (len(tokens) - response_length) + tuple(response_mask)
    trained = sum(response_mask)
    if trained != record["trained_tokens"] or ids_rows != trained:
        raise OfflineTopKError(
            f"{where}: slime trains on {trained} token(s) of this row, extraction stored {ids_rows} (record: "
            f"{record['trained_tokens']}); the row is tokenized differently now (tokenizer, chat template, "
            "--loss-mask-type or --tool-key): extract again with the training run's tokenizer and flags"
        )
    digest = SftTokens(tuple(tokens), full_mask).digest()
    if digest != record["digest"]:
        raise OfflineTopKError(
            f"{where}: slime tokenized this row into other tokens or another loss mask than extraction did (digest "
            f"{digest} != {record['digest']}): use the tokenizer (--hf-checkpoint), chat template, --loss-mask-type "
            "and --tool-key that extraction used, or extract again with this run's"
        )


def stored_topk_payload(args: Any, samples: Sequence[Any], config: SelfDistillConfig) -> list:
    """One ``StoredTopK`` per sample, checked against the sample's tokens."""
    topk_file = open_topk_file(config.offline_topk_path)
    check_file_against_args(topk_file.info, config.offline_topk_path, args, config)
    k = used_k(topk_file.info, config, SelfDistillConfig.explicit_settings(args))
    records = [_record_of(sample, position) for position, sample in enumerate(samples)]
    for record in records:
        if record["extraction"] != topk_file.info.extraction:
            raise OfflineTopKError(
                f"data row idx {record['idx']} (line {record['idx'] + 1} of the data file) was written by another "
                f"extraction ({record['extraction']}) than the top-K file {config.offline_topk_path!r} "
                f"({topk_file.info.extraction}), whose idx number other rows: use the data file written beside it "
                f"({topk_file.info.data_file}), or a subset of its rows"
            )
    rows = topk_file.rows(record["idx"] for record in records)
    payload = []
    for sample, record in zip(samples, records, strict=True):
        ids, values = rows[record["idx"]]
        _check_alignment(sample, record, ids.shape[0])
        payload.append(StoredTopK(record["idx"], ids[:, :k], values[:, :k], topk_file.info.values))
    return payload


@dataclass(frozen=True)
class DataFileKeys:
    """slime's flags that say where a data row's fields are, and how the run tokenizes it."""

    input_key: str
    metadata_key: str
    tool_key: Optional[str]
    loss_mask_type: str
    tokenizer: Optional[str] = None  # a local --hf-checkpoint: every row is tokenized as slime's SFT rollout will


def _row_problem(row: Any, keys: DataFileKeys, info: TopKFileInfo, seen: set,
                 tokenize: Optional[Callable]) -> Optional[str]:
    metadata = row.get(keys.metadata_key) if isinstance(row, dict) else None
    record = metadata.get(ROW_RECORD_KEY) if isinstance(metadata, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("idx"), int):  # an unparseable line too
        return f"no {keys.metadata_key}.{ROW_RECORD_KEY} record"
    if record.get("extraction") != info.extraction:
        return f"written by another extraction ({record.get('extraction')}) than the top-K file ({info.extraction})"
    if record["idx"] in seen:
        return f"idx {record['idx']} repeated"
    if not 0 <= record["idx"] < info.rows:
        return f"idx {record['idx']} is not in the top-K file ({info.rows} rows)"
    seen.add(record["idx"])
    if not isinstance(row.get(keys.input_key), list):
        return (f"no chat messages under --input-key {keys.input_key!r} (extraction read "
                f"{info.messages_key!r})")
    if tokenize is not None:
        try:
            digest = tokenize(row[keys.input_key], row_tools(row, keys.tool_key, metadata, "the row")).digest()
        except Exception as error:  # noqa: BLE001 - a row the chat template cannot render is that row's problem
            return (f"does not tokenize as slime's SFT rollout would with --hf-checkpoint's tokenizer and "
                    f"--loss-mask-type {keys.loss_mask_type} ({error}); extraction used {info.tokenizer}")
        if digest != record["digest"]:
            return (f"tokenizes into other tokens or another loss mask than extraction's (digest {digest} != "
                    f"{record['digest']}): the tokenizer, chat template, --loss-mask-type or --tool-key differ")
    return None


def check_data_file(path: str, keys: DataFileKeys, topk_path: str) -> str:
    """The launcher's check of ``--prompt-data`` for offline distillation: every row has its record, from the top-K
    file's extraction, for a distinct row of it, and its chat messages; with a local tokenizer, every row tokenizes
    as extraction tokenized it. Returns a one-line summary; raises ``SelfDistillDataError`` listing the bad rows."""
    from slime_self_distill.data.files import RowFileError, jsonl_rows, parquet_rows
    from slime_self_distill.data.sft_tokens import SftTokenizer
    from slime_self_distill.data_source import SelfDistillDataError
    from slime_self_distill.offline.extraction import file_sha256

    info = open_topk_file(topk_path).info
    if keys.loss_mask_type != info.loss_mask_type:
        raise SelfDistillDataError(f"--loss-mask-type {keys.loss_mask_type}: {topk_path} was extracted with "
                                   f"--loss-mask-type {info.loss_mask_type}, which the launcher fills in unless given; "
                                   "drop the flag, or extract again with it")
    tokenize = None
    if keys.tokenizer is not None:
        from slime_self_distill.data_source import load_hf_tokenizer

        tokenize = SftTokenizer(load_hf_tokenizer(keys.tokenizer), keys.loss_mask_type)
    try:
        rows = parquet_rows(path)[1] if path.lower().endswith(".parquet") else jsonl_rows(path, accept_bom=False)
        problems, seen, count = [], set(), 0
        for number, row in rows:
            count += 1
            problem = _row_problem(row, keys, info, seen, tokenize)
            if problem is not None:
                problems.append(f"row {number}: {problem}")
    except (OSError, RowFileError) as error:
        raise SelfDistillDataError(f"--prompt-data {path}: cannot be read ({error})") from None
    if problems:
        listing = "\n".join(f"  {problem}" for problem in problems[:20])
        raise SelfDistillDataError(
            f"--prompt-data {path}: {len(problems)} of {count} rows would fail with the teacher top-K file "
            f"{topk_path} (its data file is {info.data_file}, beside it):\n{listing}"
        )
    same = file_sha256(path) == info.data_sha256
    tokens = ("every row tokenizes as extraction tokenized it" if tokenize is not None else
              "tokens are checked in training, sample by sample (give a local --hf-checkpoint to check them now)")
    return (f"--prompt-data {path}: {count} rows, each with its teacher top-K row (K={info.k}, {info.values}), "
            f"{'the data file extraction wrote' if same else 'not the data file extraction wrote'}; {tokens}")
