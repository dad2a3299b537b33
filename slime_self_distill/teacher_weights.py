"""The teacher's weights: frozen, live, or an fp32 exponential moving average (EMA) of the student.

slime's Megatron teacher pass runs when its weights backuper (``slime/utils/tensor_backper.py``) holds a
``"teacher"`` tag: ``train_actor`` restores that tag's tensors into the GPU model, runs the pass, then restores
``"actor"``. Each tag is a dict ``{global parameter name: pinned host tensor}`` in the parameter dtype, one
rank-local shard each. This module only fills and maintains the ``"teacher"`` tag; it needs of the backuper only
``backup_tags``, ``backup(tag)`` and ``get(tag)``, plus the same ``(name, parameter)`` source the backuper copies.

Memory per parameter of this rank's shard (bf16 parameters: 2 bytes), on top of slime's own ``"actor"`` backup:

=========  =============================================  ===================================================
kind       host                                           GPU
=========  =============================================  ===================================================
frozen     2 B (the pinned ``teacher`` tag)               0 (the teacher is swapped into the same parameters)
live       0 (the tag aliases ``actor``)                  0
ema        2 B pinned tag + 4 B fp32 shadow (pageable)    0 persistent; one tensor in fp32 during an update
=========  =============================================  ===================================================

slime allocates its tags tensor by tensor in pinned memory, which PyTorch's pinned allocator rounds up to a power of
two: a tag can take up to twice its nominal size. The shadow is pageable, so it takes exactly 4 B/parameter.
Every kind costs one host-to-device copy of the weights per teacher pass (the swap, as slime's OPD teacher); an
EMA update copies the shadow to the parameter's device and back (4 B/parameter each way).
The EMA is not saved in checkpoints: a resumed run restarts it from the student's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

TEACHER_TAG = "teacher"
ACTOR_TAG = "actor"

SourceGetter = Callable[[], Iterable[tuple[str, torch.Tensor]]]


@torch.no_grad()
def ema_update_(shadow: torch.Tensor, student: torch.Tensor, rate: float) -> None:
    """``shadow <- (1 - rate) * shadow + rate * student`` in place, computed in fp32.

    ``shadow`` must be fp32: a bf16 average would round away every update smaller than half a bf16 ulp of the
    weight (2^-9 relative), which is what a small rate times a small weight change is.
    """
    if shadow.dtype != torch.float32:
        raise TypeError(f"the EMA shadow must be float32, got {shadow.dtype}")
    if shadow.shape != student.shape:
        raise ValueError(f"EMA shadow shape {tuple(shadow.shape)} != student shape {tuple(student.shape)}")
    shadow.lerp_(student.to(device=shadow.device, dtype=torch.float32), rate)


class TeacherWeights:
    """Fills the backuper's ``"teacher"`` tag for one teacher kind and keeps it current.

    Create it right after slime creates its backuper, while the GPU model still holds the student's initial
    weights (``MegatronTrainRayActor.init``, before ``backup("actor")`` and before the OPD teacher checkpoint, if
    any, is loaded):

    * ``frozen``: the tag is a copy of the student's initial weights (a ``--opd-teacher-load`` checkpoint teacher is
      slime's own: ``megatron_hooks.install`` then creates no ``TeacherWeights``);
    * ``live``: the tag holds the very tensors of the ``"actor"`` tag (no copy); slime refreshes ``"actor"`` in place
      after every training round, so the teacher is the current student;
    * ``ema``: an fp32 host shadow starts at the student's initial weights; ``after_optimizer_step`` /
      ``after_rollout_training`` update it per ``ema_update_interval``, and ``after_rollout_training`` rounds it
      into the tag for the next teacher pass.
    """

    def __init__(
        self,
        kind: str,
        *,
        backuper: Any,
        source_getter: SourceGetter,
        ema_rate: float = 0.0,
        ema_update_interval: str = "step",
    ) -> None:
        if TEACHER_TAG in backuper.backup_tags:
            raise RuntimeError(f"the weights backuper already holds a {TEACHER_TAG!r} tag; set up the teacher once")
        self.kind = kind
        self._backuper = backuper
        self._source_getter = source_getter
        self._ema_rate = ema_rate
        self._ema_update_interval = ema_update_interval
        self._shadow: dict[str, torch.Tensor] = {}

        if kind == "frozen":
            backuper.backup(TEACHER_TAG)
        elif kind == "live":
            if ACTOR_TAG not in backuper.backup_tags:
                backuper.backup(ACTOR_TAG)  # slime backs "actor" up next anyway, into these same tensors
            backuper.get(TEACHER_TAG).update(backuper.get(ACTOR_TAG))
        elif kind == "ema":
            backuper.backup(TEACHER_TAG)
            for name, tensor in backuper.get(TEACHER_TAG).items():
                if not tensor.is_floating_point():
                    raise TypeError(f"cannot average the non-floating-point tensor {name!r} ({tensor.dtype})")
                self._shadow[name] = tensor.to(torch.float32, copy=True)  # pageable: exact size (see above)
        else:
            raise ValueError(f"unknown teacher kind {kind!r}")

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The EMA's fp32 host tensors (empty unless ``kind == 'ema'``)."""
        return self._shadow

    def after_optimizer_step(self) -> None:
        if self.kind == "ema" and self._ema_update_interval == "step":
            self._update_ema()

    def after_rollout_training(self) -> None:
        if self.kind != "ema":
            return
        if self._ema_update_interval == "rollout":
            self._update_ema()
        for name, tensor in self._backuper.get(TEACHER_TAG).items():
            tensor.copy_(self._shadow[name])

    @torch.no_grad()
    def _update_ema(self) -> None:
        for name, param in self._source_getter():
            shadow = self._shadow.get(name)
            if shadow is None:
                raise KeyError(f"parameter {name!r} has no EMA shadow: the model's parameters changed after set-up")
            if param.device == shadow.device:
                ema_update_(shadow, param, self._ema_rate)
            else:  # average on the parameter's device: 4 B/parameter each way instead of host arithmetic
                work = shadow.to(param.device, non_blocking=True)
                ema_update_(work, param, self._ema_rate)
                shadow.copy_(work)
