"""From the teacher pass to the teacher inputs of the loss, in the student's layout.

Pure torch (plus optional process groups); no slime import. The Megatron glue (``megatron_hooks``) feeds it the
response rows of the teacher's logits and of its final hidden states (the output layer's input), one sample at a
time, as slime's ``get_responses`` extracts them.

What is kept per response token between the teacher pass and the training step (``teacher_signal``):

* always ``teacher_log_probs`` [R] fp32: log p_teacher(y_t) of the student's sampled token (metrics, and the
  'sampled_token' scope);
* 'topk' scope with the teacher's own support, when K entries are smaller than a hidden state
  (8 K <= H x the model dtype's bytes): ``teacher_topk_log_probs`` [R, K] fp32 and ``teacher_topk_indices``
  [R, K] int32 (global vocabulary ids);
* otherwise ('full_vocab', the student's and the union top-K supports, a teacher-support top-K larger than a hidden
  state): ``teacher_hidden_states`` [R, H] in the model's dtype, and once per rollout this rank's shard of the
  teacher's output layer [V/TP, H] on the device; the loss recomputes the exact logits from them
  (``core.teacher_logits``).

Everything is at the rollout temperature (logits / temperature), like slime's own log-probabilities.

Tensor parallelism: the top-K and the hidden states are the same on every TP rank, so each TP rank keeps only its
block of each sample's rows (``keep_tp_rows``); the loss gathers them back over the TP group (``gather_tp_rows``),
one sample at a time. The host store is thereby 1/TP of a sample's rows per rank.

Context parallelism: slime splits each sequence into 2 * cp_size chunks and gives rank r chunks r and
2 * cp_size - 1 - r ("zigzag"); which response rows a rank holds depends on the sequence's total length. The teacher
sequence is longer than the student's, so its rows are re-laid-out to the student's layout
(``relayout_cp_rows``) before the loss, which sees the student's logits, can use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from slime_self_distill.config import ConfigError, SelfDistillConfig, flag_name
from slime_self_distill.core.divergences import (
    group_rank_and_size,
    local_vocab_columns,
    vocab_parallel_log_softmax,
    vocab_parallel_topk,
)
from slime_self_distill.teacher_view import (
    TEACHER_HIDDEN_STATES_KEY,
    TEACHER_TOKEN_LOG_PROBS_KEY,
    TEACHER_TOPK_INDICES_KEY,
    TEACHER_TOPK_LOG_PROBS_KEY,
)

# Keys kept in host memory between the teacher pass and the training step (moved to the GPU per micro-batch). The
# memory is pageable, not pinned: PyTorch's pinned-memory allocator rounds every block up to a power of two (up to
# 2x the store), while pageable memory costs exactly what ``host_memory`` counts.
HOST_KEYS = (TEACHER_TOPK_LOG_PROBS_KEY, TEACHER_TOPK_INDICES_KEY, TEACHER_HIDDEN_STATES_KEY)
TOKEN_LOG_PROB_BYTES = 4  # fp32, every scope
TOPK_ENTRY_BYTES = 8  # fp32 log-probability + int32 id
SIGNALS = ("token", "topk", "hidden")


def model_dtype_bytes(args: Any) -> int:
    """Bytes per element of the model's activations (the output layer's input): Megatron's ``params_dtype``, else
    2 with --bf16 / --fp16, else 4."""
    dtype = getattr(args, "params_dtype", None)
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    return 2 if getattr(args, "bf16", False) or getattr(args, "fp16", False) else 4


def teacher_signal(config: SelfDistillConfig, hidden_size: int, hidden_element_size: int) -> str:
    """What the teacher pass keeps per response token besides the sampled token's log-probability (module
    docstring): 'token' (nothing more), 'topk' (the teacher's K log-probabilities and ids) or 'hidden' (its final
    hidden state): for each scope, the smaller exact signal."""
    if config.kl_scope == "sampled_token":
        return "token"
    if (config.kl_scope == "topk" and config.topk_support == "teacher"
            and TOPK_ENTRY_BYTES * config.topk <= hidden_size * hidden_element_size):
        return "topk"
    return "hidden"


def host_bytes_per_token(config: SelfDistillConfig, hidden_size: int, hidden_element_size: int) -> int:
    """Bytes the teacher pass keeps in host memory per response token (each TP rank keeps 1/TP of the rows)."""
    signal = teacher_signal(config, hidden_size, hidden_element_size)
    return {"token": 0, "topk": TOPK_ENTRY_BYTES * config.topk, "hidden": hidden_size * hidden_element_size}[signal]


def teacher_bytes_per_token(config: SelfDistillConfig, hidden_size: int, hidden_element_size: int) -> int:
    """Bytes the teacher pass keeps per response token: the host store plus the 4 B token log-prob on the device."""
    return TOKEN_LOG_PROB_BYTES + host_bytes_per_token(config, hidden_size, hidden_element_size)


@dataclass(frozen=True)
class TeacherOutputSpec:
    """What the teacher pass produces; built from the configuration and slime's ``--rollout-temperature``,
    ``--hidden-size`` and model dtype."""

    signal: str
    topk: int
    temperature: float
    chunk_size: int

    @classmethod
    def from_config(cls, config: SelfDistillConfig, temperature: float, hidden_size: int,
                    hidden_element_size: int) -> "TeacherOutputSpec":
        if not temperature > 0:
            raise ConfigError(f"--rollout-temperature must be > 0 for teacher log-probabilities, got {temperature}")
        return cls(
            signal=teacher_signal(config, hidden_size, hidden_element_size),
            topk=config.topk,
            temperature=float(temperature),
            chunk_size=config.chunk_size,
        )

    @classmethod
    def from_args(cls, args: Any, config: SelfDistillConfig) -> "TeacherOutputSpec":
        # the hidden size decides only between a stored top-K and hidden states (never for sampled_token)
        return cls.from_config(config, args.rollout_temperature, getattr(args, "hidden_size", None) or 0,
                               model_dtype_bytes(args))

    @property
    def output_keys(self) -> tuple[str, ...]:
        extra = {
            "hidden": (TEACHER_HIDDEN_STATES_KEY,),
            "topk": (TEACHER_TOPK_LOG_PROBS_KEY, TEACHER_TOPK_INDICES_KEY),
            "token": (),
        }[self.signal]
        return (TEACHER_TOKEN_LOG_PROBS_KEY, *extra)


@torch.no_grad()
def compute_teacher_outputs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    spec: TeacherOutputSpec,
    tp_group: Optional[dist.ProcessGroup] = None,
    hidden_states: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Teacher outputs of one sample's response rows that this rank holds (the teacher sequence's CP layout).

    ``logits`` [N, V_local]: the teacher's raw logits (not divided by temperature) at the positions that predict the
    response tokens ``tokens`` [N] (global vocabulary ids); ``hidden_states`` [N, H]: the output layer's input at the
    same positions (needed for the 'hidden' signal). Rows are processed ``spec.chunk_size`` at a time, so the fp32
    log-softmax never exceeds chunk_size x V_local on the device. ``teacher_log_probs`` stays on ``logits.device``;
    the ``HOST_KEYS`` outputs go to host memory.
    """
    if logits.dim() != 2 or tokens.dim() != 1 or logits.size(0) != tokens.size(0):
        raise ValueError(
            f"expected logits [N, V_local] and tokens [N], got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    num_rows, vocab_local = logits.shape
    _, tp_size = group_rank_and_size(tp_group)
    if spec.signal == "topk" and spec.topk > vocab_local * tp_size:
        raise ConfigError(
            f"{flag_name('topk')} {spec.topk} is larger than the vocabulary ({vocab_local * tp_size}); use a smaller K"
        )

    outputs = {TEACHER_TOKEN_LOG_PROBS_KEY: torch.empty(num_rows, dtype=torch.float32, device=logits.device)}
    if spec.signal == "hidden":
        if hidden_states is None or hidden_states.dim() != 2 or hidden_states.size(0) != num_rows:
            shape = None if hidden_states is None else tuple(hidden_states.shape)
            raise ValueError(f"the hidden-state teacher store needs the output layer's input [N={num_rows}, H] at the "
                             f"response rows, got {shape}")
        # a copy of its own: a view would keep the whole packed micro-batch alive
        outputs[TEACHER_HIDDEN_STATES_KEY] = hidden_states.to("cpu", copy=True)
    elif spec.signal == "topk":
        outputs[TEACHER_TOPK_LOG_PROBS_KEY] = torch.empty(num_rows, spec.topk, dtype=torch.float32)
        outputs[TEACHER_TOPK_INDICES_KEY] = torch.empty(num_rows, spec.topk, dtype=torch.int32)

    for start in range(0, num_rows, spec.chunk_size):
        end = min(start + spec.chunk_size, num_rows)
        log_probs = vocab_parallel_log_softmax(logits[start:end].float() / spec.temperature, tp_group)
        local_ids, in_shard = local_vocab_columns(tokens[start:end].long(), vocab_local, tp_group)
        picked = log_probs.gather(1, local_ids.unsqueeze(1)).squeeze(1)
        # where, not multiply: a -inf log-probability outside this shard must not become NaN.
        picked_and_owner_count = torch.stack([torch.where(in_shard, picked, 0.0), in_shard.float()], dim=1)
        if tp_group is not None:
            dist.all_reduce(picked_and_owner_count, group=tp_group)
        owners = picked_and_owner_count[:, 1]
        if not bool((owners == 1).all()):
            bad = int(torch.nonzero(owners != 1)[0, 0]) + start
            raise ValueError(
                f"response token {int(tokens[bad])} at row {bad} is outside the vocabulary of size "
                f"{vocab_local * tp_size}; the teacher tokens must come from the student's tokenizer"
            )
        outputs[TEACHER_TOKEN_LOG_PROBS_KEY][start:end] = picked_and_owner_count[:, 0]
        if spec.signal == "topk":
            values, indices = vocab_parallel_topk(log_probs, spec.topk, tp_group)
            outputs[TEACHER_TOPK_LOG_PROBS_KEY][start:end] = values
            outputs[TEACHER_TOPK_INDICES_KEY][start:end] = indices
    return outputs


# ---------------------------------------------------------------------- tensor-parallel split of the host store
def tp_row_block(num_rows: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a sample's ``num_rows`` that TP rank ``tp_rank`` keeps: blocks of ceil(rows / TP)."""
    block = -(-num_rows // tp_size)
    return min(tp_rank * block, num_rows), min((tp_rank + 1) * block, num_rows)


def keep_tp_rows(rows: torch.Tensor, tp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """This TP rank's block of ``rows`` (identical on every TP rank), as a tensor of its own."""
    rank, size = group_rank_and_size(tp_group)
    if size == 1:
        return rows
    start, end = tp_row_block(rows.shape[0], rank, size)
    return rows[start:end].clone()


def gather_tp_rows(local: torch.Tensor, num_rows: int, tp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """All ``num_rows`` rows from every TP rank's block (``keep_tp_rows``), on every rank. Every TP rank must call it
    for the same samples in the same order."""
    rank, size = group_rank_and_size(tp_group)
    start, end = tp_row_block(num_rows, rank, size)
    if local.shape[0] != end - start:
        raise ValueError(f"TP rank {rank}/{size} holds {local.shape[0]} rows of a {num_rows}-row sample, expected its "
                         f"block of {end - start}")
    if size == 1 or num_rows == 0:
        return local
    block = -(-num_rows // size)
    padded = local.new_zeros((block, *local.shape[1:]))
    padded[: local.shape[0]] = local
    blocks = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(blocks, padded, group=tp_group)
    return torch.cat(blocks)[:num_rows]


# ---------------------------------------------------------------------- context-parallel layout
def cp_response_rows(
    total_length: int, response_length: int, cp_rank: int, cp_size: int
) -> tuple[tuple[int, int], ...]:
    """Response rows ``[start, end)`` that CP rank ``cp_rank`` holds, in its local order (first chunk, then second).

    Row j is the logit at sequence position prompt_length - 1 + j, which predicts response token j. slime pads the
    sequence to 2 * cp_size equal chunks of ceil(total_length / (2 * cp_size)) positions; rank r holds chunks r and
    2 * cp_size - 1 - r. Empty ranges are left out.
    """
    if cp_size == 1:
        return ((0, response_length),) if response_length else ()
    prompt_length = total_length - response_length
    chunk = -(-total_length // (2 * cp_size))
    ranges = []
    for chunk_index in (cp_rank, 2 * cp_size - 1 - cp_rank):
        first = max(chunk_index * chunk, prompt_length - 1)
        last = min((chunk_index + 1) * chunk, total_length - 1)
        if first < last:
            ranges.append((first - (prompt_length - 1), last - (prompt_length - 1)))
    return tuple(ranges)


def _num_rows(ranges: tuple[tuple[int, int], ...]) -> int:
    return sum(end - start for start, end in ranges)


@torch.no_grad()
def relayout_cp_rows(
    local: torch.Tensor,
    *,
    response_length: int,
    source_total_length: int,
    target_total_length: int,
    cp_group: Optional[dist.ProcessGroup] = None,
    block_rows: int = 1024,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Move per-response-row values from the CP layout of a sequence of ``source_total_length`` tokens to the layout
    of one of ``target_total_length`` tokens with the same ``response_length`` response (teacher -> student).

    ``local`` [rows held here, ...] in the source layout; the result [rows the target layout holds here, ...] is
    allocated where ``local`` is. Rows travel ``block_rows`` at a time through
    ``device`` (default: ``local``'s; the CP group's backend must reach it): each rank writes the rows it owns into
    a zero block and the CP group sums it. The sum runs on the raw bytes (uint8), which is exact for every dtype
    because exactly one rank owns each row. Every CP rank must call this for the same samples in the same order.
    """
    cp_rank, cp_size = group_rank_and_size(cp_group)
    source = cp_response_rows(source_total_length, response_length, cp_rank, cp_size)
    if local.size(0) != _num_rows(source):
        raise ValueError(
            f"expected {_num_rows(source)} local response rows for a {source_total_length}-token sequence with a "
            f"{response_length}-token response on CP rank {cp_rank}/{cp_size}, got {local.size(0)}"
        )
    if cp_size == 1:
        return local
    device = local.device if device is None else torch.device(device)
    target = cp_response_rows(target_total_length, response_length, cp_rank, cp_size)
    trailing = tuple(local.shape[1:])
    out_shape = (_num_rows(target), *trailing)
    out = local.new_empty(out_shape)

    def placements(ranges):  # (response row start, response row end, offset in the local tensor)
        offset, result = 0, []
        for start, end in ranges:
            result.append((start, end, offset))
            offset += end - start
        return result

    for block_start in range(0, response_length, block_rows):
        block_end = min(block_start + block_rows, response_length)
        block = torch.zeros((block_end - block_start, *trailing), dtype=local.dtype, device=device)
        for start, end, offset in placements(source):
            lo, hi = max(start, block_start), min(end, block_end)
            if lo < hi:
                block[lo - block_start : hi - block_start] = local[offset + lo - start : offset + hi - start]
        dist.all_reduce(block.view(-1).view(torch.uint8), group=cp_group)
        for start, end, offset in placements(target):
            lo, hi = max(start, block_start), min(end, block_end)
            if lo < hi:
                out[offset + lo - start : offset + hi - start] = block[lo - block_start : hi - block_start]
    return out
