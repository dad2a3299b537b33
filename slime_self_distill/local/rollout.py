"""The single-process trainer's rollout side: prompt rows read and rendered as slime's ``Dataset`` and the plugin's
data source read them, responses sampled with ``generate``, rewards, and the train data built by the converter's own
functions (``custom_convert.sample_teacher_views`` and ``with_teacher_views``): the same teacher prompts, contexts
(static, SDPO, self-revision), loss masks and loss weights as on slime.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import inspect
import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from slime_self_distill.config import SelfDistillConfig
from slime_self_distill.custom_convert import (
    fill_rollout_ids,
    loss_mask_of,
    rollout_mask_sums,
    sample_teacher_views,
    with_teacher_views,
)
from slime_self_distill.data_source import (
    PromptDataKeys,
    SelfDistillDataError,
    annotate_student_prompt,
    annotate_teacher_prompt,
    prompt_renderer,
    read_prompt_rows,
    teacher_renderer,
)
from slime_self_distill.local.options import LocalOptions

MAX_LISTED_ROWS = 5


@dataclass
class PromptRow:
    """One prompt row, as slime's Dataset and the plugin's data source make a sample of it."""

    number: int  # the row's number in the file (1-based line for JSON lines)
    prompt: Any  # the rendered student prompt (slime's ``sample.prompt``)
    prompt_ids: list
    label: Any
    metadata: dict  # the row's metadata, annotated by the data source's functions


@dataclass
class LocalSample:
    """A sampled response with the attributes of slime's ``Sample`` that the converter's functions read."""

    index: int
    group_index: int
    prompt: Any
    tokens: list
    response_length: int
    response: str
    label: Any
    metadata: dict
    rollout_log_probs: Optional[list] = None
    reward: Any = None
    loss_mask: Optional[list] = None
    remove_sample: bool = False
    truncated: bool = False
    rollout_id: Optional[int] = None
    extra: dict = field(default_factory=dict)


def prompt_keys(options: LocalOptions) -> PromptDataKeys:
    return PromptDataKeys(input_key=options.input_key, metadata_key=options.metadata_key,
                          label_key=options.label_key, tool_key=options.tool_key,
                          apply_chat_template=options.apply_chat_template)


def load_prompt_rows(path: str, options: LocalOptions, config: SelfDistillConfig, tokenizer,
                     *, annotate: bool = True) -> list[PromptRow]:
    """Every row of ``path`` rendered and encoded as slime does (``tokenizer.encode(text, add_special_tokens=False)``),
    its metadata annotated by the data source's functions (the rendered teacher prompt, or the raw student prompt
    for SDPO). Rows slime could not read stop the run, listed by row number; rows over --rollout-max-prompt-len are
    left out with a count (slime's Dataset leaves them out)."""
    keys = prompt_keys(options)
    render = prompt_renderer(tokenizer, apply_chat_template=options.apply_chat_template,
                             apply_chat_template_kwargs=options.apply_chat_template_kwargs)
    render_teacher = teacher_renderer(tokenizer, config, apply_chat_template=options.apply_chat_template,
                                      apply_chat_template_kwargs=options.apply_chat_template_kwargs)
    rows, problems, too_long = [], [], 0
    for number, row in read_prompt_rows(path):
        try:
            if not isinstance(row, dict) or not isinstance(row.get(keys.input_key), (str, list)):
                raise SelfDistillDataError(f"no {keys.input_key!r} prompt (a string or chat messages; --input-key)")
            raw = row[keys.input_key]
            metadata = copy.deepcopy(row.get(keys.metadata_key) or {})
            tools = row.get(keys.tool_key) if keys.tool_key else None
            tools = json.loads(tools) if isinstance(tools, str) else tools
            if tools is not None and isinstance(metadata, dict):
                metadata["tools"] = tools
            rendered = render(raw, tools)
            ids = list(tokenizer.encode(rendered, add_special_tokens=False))
            if options.rollout_max_prompt_len is not None and len(ids) > options.rollout_max_prompt_len:
                too_long += 1
                continue
            description = f"row {number} of {path}"
            if annotate and config.teacher_prompt_from_row:
                annotate_teacher_prompt(metadata, config=config, apply_chat_template=options.apply_chat_template,
                                        render=render_teacher, sample_description=description)
            if annotate and config.needs_raw_student_prompt:
                chat = [{"role": "user", "content": raw}] if isinstance(raw, str) and keys.apply_chat_template else raw
                annotate_student_prompt(metadata, rendered, index={rendered: chat}, required=True,
                                        sample_description=description)
            label = row.get(keys.label_key) if keys.label_key else None
            rows.append(PromptRow(number, rendered, ids, label, metadata))
        except (SelfDistillDataError, TypeError, ValueError) as error:
            problems.append((number, str(error)))
    if problems:
        listed = "; ".join(f"row {number}: {problem}" for number, problem in problems[:MAX_LISTED_ROWS])
        more = f" (and {len(problems) - MAX_LISTED_ROWS} more)" if len(problems) > MAX_LISTED_ROWS else ""
        raise SelfDistillDataError(f"{path}: {len(problems)} row(s) cannot be used: {listed}{more}")
    if too_long:
        print(f"{path}: {too_long} row(s) over --rollout-max-prompt-len {options.rollout_max_prompt_len} tokens left "
              "out, as slime's Dataset leaves them out")
    if not rows:
        raise SelfDistillDataError(f"{path}: no usable row")
    return rows


class PromptOrder:
    """Prompts in rollouts of ``batch_size``, epoch after epoch, reshuffled per epoch with ``--rollout-shuffle`` (a
    rollout that runs past the end of an epoch continues in the next, as slime's data source does). Its state is a
    position, so a resumed run takes the same prompts."""

    def __init__(self, num_rows: int, batch_size: int, shuffle: bool, seed: int, position: int = 0):
        self.num_rows, self.batch_size, self.shuffle, self.seed = num_rows, batch_size, shuffle, seed
        self.position = position
        self._order: tuple = (None, [])  # (epoch, its order): one shuffle per epoch

    def _epoch_order(self, epoch: int) -> list:
        if self._order[0] != epoch:
            order = list(range(self.num_rows))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def next_rollout(self) -> list:
        indices = []
        for position in range(self.position, self.position + self.batch_size):
            epoch, offset = divmod(position, self.num_rows)
            indices.append(self._epoch_order(epoch)[offset])
        self.position += self.batch_size
        return indices


def left_padded(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            input_ids[row, width - len(sequence):] = torch.as_tensor(list(sequence), dtype=torch.long)
            attention_mask[row, width - len(sequence):] = 1
    return input_ids.to(device), attention_mask.to(device)


def end_of_sequence_ids(model, tokenizer) -> list:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = list(ids) if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer and the model's generation config have no end-of-sequence token: responses "
                         "could not stop; set the tokenizer's eos_token")
    return ids


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = -1, greedy: bool = False, batch_size: int = 64,
             generator_seed: Optional[int] = None) -> list[tuple[list, list, bool]]:
    """Per prompt: (response ids up to and including the end-of-sequence token, each token's log-probability under the
    sampling distribution at ``temperature`` before top-p/top-k, whether it stopped at an end-of-sequence token).

    Only these settings shape the sampling: ``generate`` fills every setting left unset from the checkpoint's
    ``generation_config`` (a Qwen3 checkpoint's top-k 20, top-p 0.95...), so the model's own is set aside meanwhile."""
    from transformers import GenerationConfig

    eos = end_of_sequence_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    sampling = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=max(top_k, 0))  # top-k 0: off
    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, eos_token_id=eos,
                                pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True, **sampling)
    device = next(model.parameters()).device
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    results = []
    own_settings, model.generation_config = model.generation_config, GenerationConfig()
    try:
        outputs = []
        for start in range(0, len(prompts), batch_size):
            input_ids, attention_mask = left_padded(prompts[start:start + batch_size], pad_id, device)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=settings)
            outputs.append((input_ids.shape[1], output))
    finally:
        model.generation_config = own_settings
    for width, output in outputs:
        new_tokens = output.sequences[:, width:]
        scores = torch.stack(output.logits, dim=1).float() / (1.0 if greedy else temperature)
        log_probs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        for row in range(new_tokens.shape[0]):
            ids = new_tokens[row].tolist()
            stop = next((i for i, token in enumerate(ids) if token in eos), None)
            length = len(ids) if stop is None else stop + 1
            results.append((ids[:length], log_probs[row, :length].tolist(), stop is not None))
    return results


def load_function(path: str) -> Callable:
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"--custom-rm-path {path}: cannot import it ({error})") from None


def reward_function(options: LocalOptions) -> Optional[Callable]:
    """``reward(args, sample)`` of ``--custom-rm-path``, or slime's rule-based ``--rm-type`` (slime importable)."""
    if options.custom_rm_path:
        return load_function(options.custom_rm_path)
    if options.rm_type:
        try:
            from slime.rollout.rm_hub import async_rm
        except ImportError as error:
            raise ValueError(f"--rm-type {options.rm_type} is slime's rule-based reward, and slime is not importable "
                             f"({error}); give --custom-rm-path (e.g. slime_self_distill.local.rewards.exact_match)"
                             ) from None
        return async_rm
    return None


def score(reward: Callable, args: Any, samples: Sequence[LocalSample]) -> None:
    """Every sample's reward, as slime calls a reward function (awaited when it is a coroutine)."""
    values = [reward(args, sample) for sample in samples]
    if any(inspect.isawaitable(value) for value in values):
        async def gather():
            return [await value if inspect.isawaitable(value) else value for value in values]

        values = asyncio.run(gather())
    for sample, value in zip(samples, values, strict=True):
        sample.reward = value


def sample_rollout(model, tokenizer, rows: Sequence[PromptRow], indices: Sequence[int], options: LocalOptions,
                   first_index: int, seed: int) -> list[LocalSample]:
    """``--n-samples-per-prompt`` responses to each prompt of ``indices``, a group per prompt, in slime's order."""
    prompts = [rows[i].prompt_ids for i in indices for _ in range(options.n_samples_per_prompt)]
    generated = generate(model, tokenizer, prompts, max_new_tokens=options.rollout_max_response_len,
                         temperature=options.rollout_temperature, top_p=options.rollout_top_p,
                         top_k=options.rollout_top_k, batch_size=options.generate_batch_size, generator_seed=seed)
    samples = []
    for position, (response_ids, log_probs, stopped) in enumerate(generated):
        group = position // options.n_samples_per_prompt
        row = rows[indices[group]]
        samples.append(LocalSample(
            index=first_index + position, group_index=first_index // options.n_samples_per_prompt + group,
            prompt=row.prompt, tokens=row.prompt_ids + response_ids, response_length=len(response_ids),
            response=tokenizer.decode(response_ids, skip_special_tokens=True), label=row.label,
            metadata=copy.deepcopy(row.metadata), rollout_log_probs=log_probs, truncated=not stopped))
    return samples


def train_data_of(samples: Sequence[LocalSample], options: LocalOptions, config: SelfDistillConfig,
                  tokenizer) -> tuple[dict, Optional[dict]]:
    """The converter's train data of the samples (the keys the step reads) and the context's rollout metrics."""
    loss_masks = [loss_mask_of(sample) for sample in samples]
    rollout_ids = fill_rollout_ids([sample.rollout_id for sample in samples])
    data = {
        "tokens": [list(sample.tokens) for sample in samples],
        "response_lengths": [sample.response_length for sample in samples],
        "loss_masks": loss_masks,
        "rollout_ids": rollout_ids,
        "rollout_mask_sums": rollout_mask_sums(rollout_ids, loss_masks),
    }
    if all(sample.rollout_log_probs is not None for sample in samples):
        data["rollout_log_probs"] = [list(sample.rollout_log_probs) for sample in samples]
    views, context_metrics = sample_teacher_views(options.slime_args(), samples, config, tokenizer)
    return with_teacher_views(data, views, config, options.calculate_per_token_loss), context_metrics


def step_slices(train_data: dict, step_samples: int) -> list[dict]:
    """The rollout's train data cut into optimizer steps of ``step_samples`` consecutive samples."""
    count = len(train_data["tokens"])
    per_sample = {key: value for key, value in train_data.items() if isinstance(value, list) and len(value) == count}
    return [{key: value[start:start + step_samples] for key, value in per_sample.items()}
            for start in range(0, count, step_samples)]
