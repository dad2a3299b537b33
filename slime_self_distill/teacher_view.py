"""The teacher's view of one sample, as it travels from the rollout converter to the Megatron trainer.

slime copies only whitelisted keys of the train data to the trainer (``_split_train_data_by_dp``); ``prompt`` is
the one whitelisted key that slime neither produces nor reads, so the converter puts one ``TeacherView`` per
sample there (``train_data["prompt"][i]``). It is pickled by Ray, so it stays a small frozen dataclass of plain
Python values.

Invariant (checked by ``TeacherView.__post_init__``): for a sample with a teacher,
``tokens[-response_length:]`` are exactly the student's response token ids (never re-tokenized text), and
``tokens[:prompt_length]`` is the teacher prompt encoded exactly as slime encodes the student prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

PAYLOAD_KEY = "prompt"


@dataclass(frozen=True)
class TeacherView:
    # Teacher prompt ids followed by the student's exact response ids; empty when ``has_teacher`` is False.
    tokens: Tuple[int, ...]
    # Number of response tokens (== the student's ``response_length``).
    response_length: int
    # False: the sample is excluded from the distillation loss (no teacher prompt, or dropped for overflow).
    has_teacher: bool
    # Multiplier of this sample's per-sample loss so that the mean runs over samples that have a teacher only
    # (n_samples / n_with_teacher over the whole rollout; 0.0 for samples without a teacher).
    loss_weight: float
    # Why the sample has no teacher ("" when it has one); shown in logs and metrics.
    reason: str = ""

    def __post_init__(self) -> None:
        if self.response_length < 0:
            raise ValueError(f"TeacherView.response_length must be >= 0, got {self.response_length}")
        if self.has_teacher:
            if len(self.tokens) <= self.response_length:
                raise ValueError(
                    f"TeacherView with a teacher needs a non-empty teacher prompt before the {self.response_length} "
                    f"response tokens, got {len(self.tokens)} tokens in all"
                )
            if self.loss_weight <= 0:
                raise ValueError(f"TeacherView with a teacher needs loss_weight > 0, got {self.loss_weight}")
        else:
            if self.tokens:
                raise ValueError("TeacherView without a teacher must carry no tokens")
            if self.loss_weight != 0.0:
                raise ValueError("TeacherView without a teacher must have loss_weight 0.0")
            if not self.reason:
                raise ValueError("TeacherView without a teacher must say why (reason)")

    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length if self.has_teacher else 0

    @property
    def total_length(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class StoredTopK:
    """Offline top-K distillation's payload of one sample: the teacher's stored top-K at its trained tokens (the
    response tokens whose loss mask is 1, in order), read from the teacher top-K file by the converter."""

    idx: int  # the row's idx in the top-K file and the data file
    ids: Any  # numpy int32 [trained tokens, K], global vocabulary ids, by decreasing value
    values: Any  # numpy float32 [trained tokens, K]: log-probabilities, or raw logits (value_kind)
    value_kind: str  # "logprobs" | "logits"

    def __post_init__(self) -> None:
        if self.ids.shape != self.values.shape or self.ids.ndim != 2:
            raise ValueError(f"StoredTopK of idx {self.idx}: ids {self.ids.shape} and values {self.values.shape} must "
                             "both be [trained tokens, K]")


# Keys of the training batch that the Megatron hooks fill (one entry per sample, in the student's response
# layout, local to this context-parallel rank) and that the custom loss reads.
TEACHER_TOKEN_LOG_PROBS_KEY = "teacher_log_probs"  # [R] float: slime's own key
TEACHER_TOPK_LOG_PROBS_KEY = "teacher_topk_log_probs"  # [R, K] float
TEACHER_TOPK_INDICES_KEY = "teacher_topk_indices"  # [R, K] int32, global vocabulary ids
TEACHER_HIDDEN_STATES_KEY = "teacher_hidden_states"  # [R, H] model dtype: the teacher's final hidden states
# One tensor for the whole batch (not one per sample): this rank's shard [V/TP, H] of the teacher's output layer, as
# the teacher pass found it; the loss recomputes the teacher's logits from it and the hidden states.
TEACHER_OUTPUT_WEIGHT_KEY = "self_distill_teacher_output_weight"
LOSS_WEIGHTS_KEY = "self_distill_loss_weights"  # float per sample: TeacherView.loss_weight
