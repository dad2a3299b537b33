"""The teacher's distribution recomputed from its final hidden states, and the top-K supports built on it.

Pure torch (plus an optional tensor-parallel process group); nothing here imports slime.

At a position, the teacher's distribution is fixed by its final hidden state h (the output layer's input, after the
final norm) and its output-layer weights W: ``log_softmax(h W^T / temperature)``. h is H values where the
distribution is V/TP per tensor-parallel rank, so the teacher pass keeps h (``TeacherHiddenStates``) and the loss
recomputes the logits one chunk of rows at a time: never more than ``chunk_size x V/TP`` of them exist at once.

Top-K supports (``teacher_support``), per row, all exact (the teacher's log-probabilities come from its full
sharded log-softmax):

* ``teacher``: the teacher's K most likely tokens;
* ``student``: the current student's K most likely tokens (SDPO's and TRL's support), the teacher's log-probabilities
  at the same ids;
* ``union``: both sets (up to 2K ids; a student id already among the teacher's is marked absent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from slime_self_distill.core.divergences import (
    DEFAULT_CHUNK_SIZE,
    _all_reduce,
    _chunks,
    _ChunkWorkspace,
    _row_log_normalizer,
    group_rank_and_size,
    local_vocab_columns,
    vocab_parallel_topk,
)

TOPK_SUPPORTS = ("teacher", "student", "union")


@dataclass(frozen=True)
class TeacherHiddenStates:
    """The teacher at N positions: its final hidden states ``hidden`` [N, H] and this tensor-parallel rank's shard of
    its output layer ``weight`` [V_local, H] (rows ``rank * V_local ...``, Megatron's vocabulary-parallel layout;
    with tied embeddings, the embedding's shard). Logits are ``hidden @ weight^T`` in the weights' dtype (as the
    output layer computes them), then divided by ``temperature`` in the compute dtype (fp32; fp64 for fp64 inputs)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    temperature: float = 1.0

    def __post_init__(self):
        if self.hidden.dim() != 2 or self.weight.dim() != 2 or self.hidden.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"teacher hidden states [N, H] and output weights [V_local, H] must share H; got "
                f"{tuple(self.hidden.shape)} and {tuple(self.weight.shape)}"
            )
        if not self.temperature > 0:
            raise ValueError(f"the teacher's temperature must be > 0, got {self.temperature}")

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the teacher's log-probabilities it stands for: [N, V_local]."""
        return self.hidden.shape[0], self.weight.shape[0]

    @torch.no_grad()  # the teacher is a constant of the loss, even when its weight is a trained parameter
    def logits_into(self, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of ``rows`` divided by the temperature, written into ``out`` [rows, V_local]."""
        hidden = self.hidden[rows].to(self.weight.dtype)
        if out.dtype == self.weight.dtype:
            torch.mm(hidden, self.weight.t(), out=out)
        else:
            out.copy_(torch.mm(hidden, self.weight.t()))
        if self.temperature != 1.0:
            out.div_(self.temperature)
        return out

    @torch.no_grad()
    def chunk(self, rows: slice, work: _ChunkWorkspace, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities, probabilities) of ``rows`` in the workspace's buffers, over the sharded vocabulary."""
        n = rows.stop - rows.start
        log_probs = self.logits_into(rows, work.get("teacher", n))
        row_max, probs = _row_log_normalizer(log_probs, tp_group, work.get("teacher_p", n))
        total = _all_reduce(probs.sum(-1), tp_group)
        probs.div_(total.unsqueeze(-1))
        log_probs.sub_((row_max + total.log()).unsqueeze(-1))
        return log_probs, probs

    @torch.no_grad()
    def log_probs(self, tp_group=None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All rows' log-probabilities [N, V_local] at once (tests and small checks; the loss never needs them)."""
        out = torch.empty(self.shape, dtype=dtype, device=self.hidden.device)
        work = _ChunkWorkspace(out, chunk_size)
        for rows in _chunks(self.shape[0], chunk_size):
            out[rows] = self.chunk(rows, work, tp_group)[0]
        return out


def _gather_global_ids(values: torch.Tensor, ids: torch.Tensor, tp_group) -> torch.Tensor:
    """``values`` [n, V_local] (sharded columns) at global ids [n, k], replicated on every TP rank."""
    local, in_shard = local_vocab_columns(ids, values.shape[-1], tp_group)
    return _all_reduce(torch.where(in_shard, values.gather(-1, local), 0.0), tp_group)


@dataclass
class TopKSupport:
    ids: torch.Tensor  # [N, K'] global vocabulary ids (int64)
    teacher_log_probs: torch.Tensor  # [N, K'] the teacher's log-probabilities at ids
    present: Optional[torch.Tensor] = None  # [N, K'] bool; None: every entry belongs to the support


@torch.no_grad()
def teacher_support(
    student_logits: torch.Tensor,
    teacher: TeacherHiddenStates,
    support: str,
    k: int,
    tp_group=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> TopKSupport:
    """The top-K ``support`` of every row (module docstring) and the teacher's log-probabilities on it.

    ``student_logits`` [N, V_local]: the student's rows (at the same temperature as the teacher's), read only to pick
    the student's top-K ids. One pass over the teacher's recomputed logits, chunk by chunk."""
    if support not in TOPK_SUPPORTS:
        raise ValueError(f"unknown top-K support {support!r}; choose one of {', '.join(TOPK_SUPPORTS)}")
    n, vocab_local = teacher.shape
    if tuple(student_logits.shape) != (n, vocab_local):
        raise ValueError(f"student logits {tuple(student_logits.shape)} and the teacher's log-probabilities "
                         f"{(n, vocab_local)} must have the same shape (rows x this rank's vocabulary shard)")
    _, tp_size = group_rank_and_size(tp_group)
    if k < 1:
        raise ValueError(f"top-K needs K >= 1, got {k}")
    if k > vocab_local * tp_size:
        raise ValueError(f"top-K with K={k} exceeds the vocabulary size {vocab_local * tp_size}")
    width = 2 * k if support == "union" else k
    device = student_logits.device
    ids = torch.empty(n, width, dtype=torch.long, device=device)
    values = torch.empty(n, width, dtype=torch.float64 if student_logits.dtype == torch.float64 else torch.float32,
                         device=device)
    present = torch.ones(n, width, dtype=torch.bool, device=device) if support == "union" else None
    work = _ChunkWorkspace(student_logits, chunk_size)
    for rows in _chunks(n, chunk_size):
        teacher_log_probs, _ = teacher.chunk(rows, work, tp_group)
        columns = slice(0, 0)
        if support in ("teacher", "union"):
            columns = slice(0, k)
            values[rows, columns], ids[rows, columns] = vocab_parallel_topk(teacher_log_probs, k, tp_group)
        if support in ("student", "union"):
            student_columns = slice(columns.stop, columns.stop + k)
            student_ids = vocab_parallel_topk(student_logits[rows], k, tp_group)[1]
            ids[rows, student_columns] = student_ids
            values[rows, student_columns] = _gather_global_ids(teacher_log_probs, student_ids, tp_group)
            if support == "union":
                already = (student_ids.unsqueeze(-1) == ids[rows, columns].unsqueeze(-2)).any(-1)
                present[rows, student_columns] = ~already
    return TopKSupport(ids=ids, teacher_log_probs=values, present=present)
