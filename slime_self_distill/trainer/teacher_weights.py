"""The teacher's weights on slime's weights backuper: frozen (a checkpoint), live (the student) or an fp32 EMA.

slime's Megatron teacher pass runs when its weights backuper (``slime/utils/tensor_backper.py``) holds a
``"teacher"`` tag: ``train_actor`` restores that tag's tensors into the GPU model, runs the pass, then restores
``"actor"``. Each tag is a dict ``{global parameter name: pinned host tensor}`` in the parameter dtype, one
rank-local shard each. Per teacher kind:

* ``frozen``: slime's own ``--opd-teacher-load`` checkpoint, loaded into the ``"teacher"`` tag by every actor at
  start-up (``load_other_checkpoint``). A checkpoint cannot move, so a resumed, preempted or ``--release-train``
  recreated actor gets the same teacher; the student's own weights would not do (slime loads ``--load``, which is
  the latest ``--save`` checkpoint when resuming).
* ``live``: no copy; ``"teacher"`` is a name for ``"actor"`` (``TeacherAwareBackuper``), and swapping it in is free
  when the model already holds the student's weights.
* ``ema``: an fp32 host shadow of the student's weights (``EmaTeacher``), updated after every optimizer step or
  rollout and rounded into the pinned ``"teacher"`` tag for the next teacher pass. It is saved with every slime
  checkpoint (``save_ema_shadow``) and restored from it on resume (``load_ema_shadow``), bit for bit.

Memory per parameter of this rank's shard (bf16 parameters: 2 bytes), on top of slime's own ``"actor"`` backup:

=========  =============================================  ===================================================
kind       host                                           GPU
=========  =============================================  ===================================================
frozen     2 B (the pinned ``teacher`` tag, slime's)      0 (the teacher is swapped into the same parameters)
live       0                                              0
ema        2 B pinned tag + 4 B fp32 shadow (pageable)    0 persistent; one tensor in fp32 during an update
=========  =============================================  ===================================================

slime allocates its tags tensor by tensor in pinned memory, which PyTorch's caching host allocator rounds up to a
power of two (``host_memory``). The shadow is pageable, so it takes exactly 4 B/parameter. A frozen or EMA teacher
costs one host-to-device copy of the weights per teacher pass and one back (slime's swap); a live one none. An EMA
update copies the shadow to the parameter's device and back (4 B/parameter each way).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch

from slime_self_distill.data.files import write_atomically

TEACHER_TAG = "teacher"
ACTOR_TAG = "actor"
EMA_CHECKPOINT_SUBDIR = os.path.join("self_distill", "ema_teacher")
EMA_FILE_FORMAT = "slime_self_distill.ema_teacher.v1"

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


class TeacherAwareBackuper:
    """slime's weights backuper, as the plugin hands it to slime's train actor (same methods).

    Two things differ from slime's own:

    * After slime loads another checkpoint into the model and backs it up under a new tag (``load_other_checkpoint``
      for ``"ref"``, ``"teacher"``, ``"old_actor"`` at start-up), the student's weights are put back at once. slime
      itself leaves the last checkpoint it loaded in the model until the first teacher pass, and without
      ``--colocate`` its first weight sync reads the live parameters: the rollout engine would sample the first
      rollout from the teacher (or the reference model).
    * With a live teacher, ``"teacher"`` names the ``"actor"`` tensors (no copy), and ``train_actor``'s swap to the
      teacher and back is skipped when the model holds the student's weights (it always does then): no weight copy.

    ``held_tag`` is the tag whose weights the model holds, as far as the backuper can tell (None before the first
    backup or restore).
    """

    def __init__(self, inner: Any, *, live_teacher: bool) -> None:
        self._inner = inner
        self._live_teacher = live_teacher
        self.held_tag: Optional[str] = None
        self._actor_restore_is_redundant = False  # set by a skipped live-teacher swap, cleared by anything else
        self.weight_copies = 0  # host-to-device weight copies (restores) actually made; read by tests and logs

    @property
    def inner(self) -> Any:
        return self._inner

    @property
    def backup_tags(self) -> list:
        tags = list(self._inner.backup_tags)
        if self._live_teacher and ACTOR_TAG in tags and TEACHER_TAG not in tags:
            tags.append(TEACHER_TAG)
        return tags

    def _resolve(self, tag: str) -> str:
        return ACTOR_TAG if self._live_teacher and tag == TEACHER_TAG else tag

    def get(self, tag: str):
        return self._inner.get(self._resolve(tag))

    def backup(self, tag: str) -> None:
        self._actor_restore_is_redundant = False
        loaded_another_checkpoint = tag != ACTOR_TAG and tag not in self._inner.backup_tags
        self._inner.backup(tag)
        self.held_tag = tag
        if loaded_another_checkpoint and ACTOR_TAG in self._inner.backup_tags:
            self._restore(ACTOR_TAG)

    def restore(self, tag: str) -> None:
        if self._live_teacher and tag == TEACHER_TAG and self.held_tag == ACTOR_TAG:
            self._actor_restore_is_redundant = True  # the model holds the student's weights: they are the teacher
            return
        if tag == ACTOR_TAG and self._actor_restore_is_redundant:
            self._actor_restore_is_redundant = False  # nothing but the teacher's forward pass ran since
            return
        self._restore(self._resolve(tag))

    def _restore(self, tag: str) -> None:
        self._actor_restore_is_redundant = False
        self._inner.restore(tag)
        self.held_tag = tag
        self.weight_copies += 1

    def copy(self, *, src_tag: str, dst_tag: str) -> None:
        self._actor_restore_is_redundant = False
        self._inner.copy(src_tag=self._resolve(src_tag), dst_tag=self._resolve(dst_tag))


class EmaTeacher:
    """The EMA teacher's fp32 shadow, kept in step with the pinned ``"teacher"`` tag of slime's backuper.

    Create it right after slime creates its backuper (``MegatronTrainRayActor.init``, before ``backup("actor")``),
    while the model holds the weights slime loaded: the student's initial weights on a fresh start, the resumed
    student otherwise, in which case ``shadow`` is the EMA saved with that checkpoint (``load_ema_shadow``).
    ``after_optimizer_step`` / ``after_rollout_training`` update it per ``ema_update_interval``, and
    ``after_rollout_training`` rounds it into the tag for the next teacher pass.
    """

    def __init__(
        self,
        *,
        backuper: Any,
        source_getter: SourceGetter,
        ema_rate: float,
        ema_update_interval: str = "step",
        shadow: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        if TEACHER_TAG in backuper.backup_tags:
            raise RuntimeError(f"the weights backuper already holds a {TEACHER_TAG!r} tag; set up the teacher once")
        self._backuper = backuper
        self._source_getter = source_getter
        self._ema_rate = ema_rate
        self._ema_update_interval = ema_update_interval
        backuper.backup(TEACHER_TAG)
        tag = backuper.get(TEACHER_TAG)
        for name, tensor in tag.items():
            if not tensor.is_floating_point():
                raise TypeError(f"cannot average the non-floating-point tensor {name!r} ({tensor.dtype})")
        if shadow is None:
            self._shadow = {name: tensor.to(torch.float32, copy=True) for name, tensor in tag.items()}  # pageable
        else:
            check_shadow_matches(shadow, {name: tuple(tensor.shape) for name, tensor in tag.items()})
            self._shadow = shadow
            self._write_tag()

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The EMA's fp32 host tensors."""
        return self._shadow

    def after_optimizer_step(self) -> None:
        if self._ema_update_interval == "step":
            self._update_ema()

    def after_rollout_training(self) -> None:
        if self._ema_update_interval == "rollout":
            self._update_ema()
        self._write_tag()

    def _write_tag(self) -> None:
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


# ---------------------------------------------------------------------- EMA checkpoints
def checkpoint_root(load_or_save: str) -> str:
    """The directory holding ``latest_checkpointed_iteration.txt``: ``--save``, or ``--load`` (which may name one
    ``iter_XXXXXXX`` directory of it, as Megatron allows)."""
    path = os.path.normpath(load_or_save)
    return os.path.dirname(path) if re.fullmatch(r"iter_\d{7}", os.path.basename(path)) else path


def ema_checkpoint_dir(root: str, iteration: int) -> str:
    """Where the EMA shards of checkpoint ``iteration`` live, beside Megatron's ``iter_XXXXXXX``."""
    return os.path.join(checkpoint_root(root), EMA_CHECKPOINT_SUBDIR, f"iter_{iteration:07d}")


def shard_file(directory: str, shard: str) -> str:
    return os.path.join(directory, f"{shard}.pt")


def check_shadow_matches(shadow: dict[str, torch.Tensor], expected_shapes: dict[str, tuple]) -> None:
    """Refuse a saved shadow that is not this rank's parameters (another model or parallel layout)."""
    missing = sorted(expected_shapes.keys() - shadow.keys())
    unexpected = sorted(shadow.keys() - expected_shapes.keys())
    if missing or unexpected:
        raise ValueError(
            f"the saved EMA teacher does not hold this rank's parameters ({len(missing)} missing, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); resume with the model and the "
            "parallel layout (TP, PP, EP) of the run that saved it"
        )
    for name, shape in expected_shapes.items():
        tensor = shadow[name]
        if tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
            raise ValueError(
                f"the saved EMA teacher's {name!r} is {tensor.dtype} {tuple(tensor.shape)}, expected torch.float32 "
                f"{shape}; resume with the model and the parallel layout (TP, PP, EP) of the run that saved it"
            )


def save_ema_shadow(shadow: dict[str, torch.Tensor], directory: str, shard: str) -> str:
    """Write one shard of the EMA shadow atomically (temporary file in ``directory``, fsync, rename); returns the
    path. The file gets the permissions a new file gets under the user's umask."""
    os.makedirs(directory, exist_ok=True)
    path = shard_file(directory, shard)
    write_atomically(path, lambda handle: torch.save(
        {"format": EMA_FILE_FORMAT, "shard": shard, "tensors": shadow}, handle))
    return path


def load_ema_shadow(directory: str, shard: str, expected_shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """This rank's EMA shard of a checkpoint, checked against its parameters."""
    path = shard_file(directory, shard)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"resuming an EMA teacher, but its shard {path} is missing: the checkpoint was not saved by a "
            f"self-distillation run with an EMA teacher (or with another parallel layout). Resume from a checkpoint "
            f"that has it, or pass --finetune to start a new EMA teacher from the loaded weights"
        )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != EMA_FILE_FORMAT or saved.get("shard") != shard:
        raise ValueError(f"{path} is not an EMA teacher shard {shard!r} of this plugin ({EMA_FILE_FORMAT})")
    try:
        check_shadow_matches(saved["tensors"], expected_shapes)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return saved["tensors"]
