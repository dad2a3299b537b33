import os
import stat

import pytest
import torch

from slime_self_distill.trainer.teacher_weights import (
    ACTOR_TAG,
    TEACHER_TAG,
    EmaTeacher,
    TeacherAwareBackuper,
    checkpoint_root,
    ema_checkpoint_dir,
    ema_update_,
    load_ema_shadow,
    save_ema_shadow,
)
from tests.slime_cpu_harness import TorchWithoutPinnedMemory
from tests.slime_support import needs_slime


def test_ema_in_fp32_keeps_small_updates_that_bf16_would_lose():
    rate, steps = 0.01, 300
    generator = torch.Generator().manual_seed(0)
    master = 1 + torch.rand(64, generator=generator, dtype=torch.float64)  # the optimizer's fp32 main weights
    initial = master.bfloat16()  # the bf16 model weights in [1, 2): ulp 2^-7
    shadow, reference, naive_bf16 = initial.float(), initial.double(), initial.clone()
    for _ in range(steps):
        master += 2e-3 * torch.rand(64, generator=generator, dtype=torch.float64)
        student = master.bfloat16()
        ema_update_(shadow, student, rate)
        reference = (1 - rate) * reference + rate * student.double()
        naive_bf16 = ((1 - rate) * naive_bf16 + rate * student).bfloat16()
    torch.testing.assert_close(shadow.double(), reference, rtol=1e-6, atol=0)
    assert ((reference - initial.double()) > 0.05).all()  # the average really moved...
    assert (naive_bf16.double() - reference).abs().mean() > 0.05  # ...which a bf16 average largely misses


def test_ema_rate_one_copies_the_student_exactly():
    shadow = torch.randn(10)
    student = torch.randn(10).bfloat16()
    ema_update_(shadow, student, 1.0)
    assert torch.equal(shadow, student.float())


def test_ema_shadow_must_be_fp32_and_shapes_must_match():
    with pytest.raises(TypeError, match="float32"):
        ema_update_(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="shape"):
        ema_update_(torch.zeros(3), torch.zeros(4), 0.1)


# ---------------------------------------------------------------------- on slime's real weights backuper
class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.first = torch.nn.Parameter((1 + torch.rand(6, 5, generator=generator)).bfloat16())
        self.second = torch.nn.Parameter(torch.randn(5, generator=generator).bfloat16())


@pytest.fixture
def backuper_and_model(monkeypatch):
    from slime.utils import tensor_backper

    monkeypatch.setattr(tensor_backper, "torch", TorchWithoutPinnedMemory())
    monkeypatch.setattr(tensor_backper.accelerator, "synchronize", lambda device_arg=None: None)
    model = TwoLayer()
    source = lambda: model.named_parameters()  # noqa: E731 - the backuper's source_getter
    return tensor_backper.TensorBackuper.create(source_getter=source, single_tag=None), model, source


def attach_ema(backuper, source, **kwargs):
    return EmaTeacher(backuper=backuper, source_getter=source, **{"ema_rate": 0.05, **kwargs})


@torch.no_grad()
def optimizer_step(model, generator):
    for param in model.parameters():
        param.add_(1e-2 * torch.rand(param.shape, generator=generator).to(param.dtype))


def snapshot(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@needs_slime
def test_the_model_holds_the_student_again_after_slime_loads_another_checkpoint(backuper_and_model):
    """slime's init: backup("actor"), then load_other_checkpoint loads e.g. the teacher into the model and backs it up;
    without colocation, the first weight sync reads the live parameters."""
    inner, model, _ = backuper_and_model
    backuper = TeacherAwareBackuper(inner, live_teacher=False)
    student = snapshot(model)
    backuper.backup(ACTOR_TAG)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(-3)  # load_checkpoint(opd_teacher_load)
    teacher = snapshot(model)
    backuper.backup(TEACHER_TAG)
    assert all(torch.equal(param, student[name]) for name, param in model.named_parameters())
    assert all(torch.equal(backuper.get(TEACHER_TAG)[name], teacher[name]) for name in teacher)
    assert backuper.held_tag == ACTOR_TAG and backuper.weight_copies == 1
    backuper.backup(ACTOR_TAG)  # end of train_actor: no checkpoint was loaded, nothing is restored
    assert backuper.weight_copies == 1
    backuper.restore(TEACHER_TAG)  # the teacher pass
    assert all(torch.equal(param, teacher[name]) for name, param in model.named_parameters())
    backuper.restore(ACTOR_TAG)
    assert all(torch.equal(param, student[name]) for name, param in model.named_parameters())
    assert backuper.weight_copies == 3


@needs_slime
def test_a_live_teacher_is_the_students_weights_without_any_copy(backuper_and_model):
    inner, model, _ = backuper_and_model
    backuper = TeacherAwareBackuper(inner, live_teacher=True)
    backuper.backup(ACTOR_TAG)
    assert TEACHER_TAG in backuper.backup_tags and TEACHER_TAG not in inner.backup_tags  # no pinned copy
    assert backuper.get(TEACHER_TAG) is inner.get(ACTOR_TAG)
    optimizer_step(model, torch.Generator().manual_seed(3))
    trained = snapshot(model)
    backuper.backup(ACTOR_TAG)  # end of train_actor
    backuper.restore(TEACHER_TAG)  # next rollout's teacher pass: the model already holds these weights
    backuper.restore(ACTOR_TAG)  # and back
    assert backuper.weight_copies == 0
    assert all(torch.equal(param, trained[name]) for name, param in model.named_parameters())
    # after a reference pass the model holds other weights: the live teacher is then copied in for real
    inner.backup("ref")
    backuper.restore("ref")
    backuper.restore(TEACHER_TAG)
    assert all(torch.equal(param, trained[name]) for name, param in model.named_parameters())
    assert backuper.weight_copies == 2
    # an actor restore that no skipped teacher swap precedes is always made (e.g. wake_up after an offload)
    backuper.restore(ACTOR_TAG)
    assert backuper.weight_copies == 3


@needs_slime
@pytest.mark.parametrize("interval", ["step", "rollout"])
def test_ema_teacher_tracks_a_float64_average_and_is_written_to_the_tag(backuper_and_model, interval):
    backuper, model, source = backuper_and_model
    rate = 0.05
    weights = attach_ema(backuper, source, ema_rate=rate, ema_update_interval=interval)
    backuper.backup(ACTOR_TAG)
    reference = {name: param.detach().double() for name, param in model.named_parameters()}
    generator = torch.Generator().manual_seed(4)
    for _rollout in range(3):
        for _step in range(4):
            optimizer_step(model, generator)
            weights.after_optimizer_step()
            if interval == "step":
                for name, param in model.named_parameters():
                    reference[name] = (1 - rate) * reference[name] + rate * param.detach().double()
        weights.after_rollout_training()
        if interval == "rollout":
            for name, param in model.named_parameters():
                reference[name] = (1 - rate) * reference[name] + rate * param.detach().double()
        for name, shadow in weights.shadow.items():
            assert shadow.dtype == torch.float32
            torch.testing.assert_close(shadow.double(), reference[name], rtol=1e-6, atol=1e-7)
            assert torch.equal(backuper.get(TEACHER_TAG)[name], shadow.bfloat16())
    trained = snapshot(model)
    backuper.backup(ACTOR_TAG)
    backuper.restore(TEACHER_TAG)
    for name, param in model.named_parameters():
        assert torch.equal(param, weights.shadow[name].bfloat16())
        assert not torch.equal(param, trained[name])


@needs_slime
def test_teacher_is_set_up_once(backuper_and_model):
    backuper, _, source = backuper_and_model
    attach_ema(backuper, source)
    with pytest.raises(RuntimeError, match="already holds a 'teacher' tag"):
        attach_ema(backuper, source)


# ---------------------------------------------------------------------- EMA checkpoints
def shadow_of(seed):
    generator = torch.Generator().manual_seed(seed)
    return {"first": torch.randn(6, 5, generator=generator), "second": torch.randn(5, generator=generator)}


SHAPES = {"first": (6, 5), "second": (5,)}


def test_ema_shards_round_trip_bit_for_bit_atomically_with_the_users_permissions(tmp_path):
    directory = ema_checkpoint_dir(str(tmp_path / "save"), 7)
    assert directory == str(tmp_path / "save" / "self_distill" / "ema_teacher" / "iter_0000007")
    assert ema_checkpoint_dir(str(tmp_path / "save" / "iter_0000007"), 7) == directory  # --load of one iteration
    assert checkpoint_root(str(tmp_path / "save") + "/") == str(tmp_path / "save")
    shadow = shadow_of(0)
    old_umask = os.umask(0o027)
    try:
        path = save_ema_shadow(shadow, directory, "pp000_tp001_ep000_etp000")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert os.listdir(directory) == ["pp000_tp001_ep000_etp000.pt"]  # no temporary file left
    loaded = load_ema_shadow(directory, "pp000_tp001_ep000_etp000", SHAPES)
    assert all(torch.equal(loaded[name], shadow[name]) for name in shadow)
    save_ema_shadow(shadow_of(1), directory, "pp000_tp001_ep000_etp000")  # a later save replaces it whole
    assert torch.equal(load_ema_shadow(directory, "pp000_tp001_ep000_etp000", SHAPES)["first"], shadow_of(1)["first"])


def test_a_failed_write_leaves_the_previous_shard(tmp_path, monkeypatch):
    directory = str(tmp_path / "ema")
    save_ema_shadow(shadow_of(0), directory, "s")
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_ema_shadow(shadow_of(1), directory, "s")
    assert os.listdir(directory) == ["s.pt"]
    assert torch.equal(load_ema_shadow(directory, "s", SHAPES)["first"], shadow_of(0)["first"])


def test_resuming_without_a_matching_shard_says_what_to_do(tmp_path):
    directory = str(tmp_path / "ema")
    with pytest.raises(FileNotFoundError, match="shard .*s.pt is missing.*pass --finetune to start a new EMA"):
        load_ema_shadow(directory, "s", SHAPES)
    save_ema_shadow(shadow_of(0), directory, "s")
    with pytest.raises(ValueError, match="1 missing, e.g. \\['third'\\].*parallel layout"):
        load_ema_shadow(directory, "s", {**SHAPES, "third": (2,)})
    with pytest.raises(ValueError, match="'first' is torch.float32 \\(6, 5\\), expected torch.float32 \\(5, 6\\)"):
        load_ema_shadow(directory, "s", {"first": (5, 6), "second": (5,)})
    torch.save({"tensors": shadow_of(0)}, os.path.join(directory, "other.pt"))
    with pytest.raises(ValueError, match="not an EMA teacher shard 'other'"):
        load_ema_shadow(directory, "other", SHAPES)


@needs_slime
def test_an_ema_resumed_from_its_shard_continues_exactly(backuper_and_model, tmp_path):
    """Run A: 3 steps, save, 2 more steps. Run B: resumed from the save (the model holds A's weights at the save),
    the same 2 steps: B's shadow and teacher tag equal A's bit for bit."""
    backuper, model, source = backuper_and_model
    generator = torch.Generator().manual_seed(9)
    updates = [1e-2 * torch.rand(6, 5, generator=generator) for _ in range(5)]

    def step(weights, k):
        with torch.no_grad():
            model.first.add_(updates[k].bfloat16())
        weights.after_optimizer_step()

    run_a = attach_ema(backuper, source)
    for k in range(3):
        step(run_a, k)
    saved_weights = snapshot(model)
    save_ema_shadow(run_a.shadow, str(tmp_path), "shard")
    for k in (3, 4):
        step(run_a, k)
    run_a.after_rollout_training()

    from slime.utils import tensor_backper

    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(saved_weights[name])  # slime resumes the student from the checkpoint
    resumed = tensor_backper.TensorBackuper.create(source_getter=source, single_tag=None)
    run_b = attach_ema(resumed, source, shadow=load_ema_shadow(str(tmp_path), "shard", SHAPES))
    assert all(torch.equal(resumed.get(TEACHER_TAG)[n], run_b.shadow[n].bfloat16()) for n in SHAPES)
    for k in (3, 4):
        step(run_b, k)
    run_b.after_rollout_training()
    for name in SHAPES:
        assert torch.equal(run_b.shadow[name], run_a.shadow[name])
        assert torch.equal(resumed.get(TEACHER_TAG)[name], backuper.get(TEACHER_TAG)[name])
