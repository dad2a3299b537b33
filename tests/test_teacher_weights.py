import pytest
import torch

from slime_self_distill.teacher_weights import ACTOR_TAG, TEACHER_TAG, TeacherWeights, ema_update_
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


def attach(kind, backuper, source, **kwargs):
    return TeacherWeights(kind, backuper=backuper, source_getter=source, **kwargs)


@torch.no_grad()
def optimizer_step(model, generator):
    for param in model.parameters():
        param.add_(1e-2 * torch.rand(param.shape, generator=generator).to(param.dtype))


def snapshot(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@needs_slime
def test_frozen_teacher_is_the_students_initial_weights(backuper_and_model):
    backuper, model, source = backuper_and_model
    initial = snapshot(model)
    attach("frozen", backuper, source)
    backuper.backup(ACTOR_TAG)
    optimizer_step(model, torch.Generator().manual_seed(2))
    backuper.backup(ACTOR_TAG)
    backuper.restore(TEACHER_TAG)
    assert all(torch.equal(param, initial[name]) for name, param in model.named_parameters())


@needs_slime
def test_live_teacher_aliases_the_actor_backup(backuper_and_model):
    backuper, model, source = backuper_and_model
    attach("live", backuper, source)
    backuper.backup(ACTOR_TAG)  # what slime does right after creating the backuper
    teacher, actor = backuper.get(TEACHER_TAG), backuper.get(ACTOR_TAG)
    assert set(teacher) == {name for name, _ in model.named_parameters()}
    for name in teacher:
        assert teacher[name] is actor[name]
        assert teacher[name].untyped_storage().data_ptr() == actor[name].untyped_storage().data_ptr()
    optimizer_step(model, torch.Generator().manual_seed(3))
    trained = snapshot(model)
    backuper.backup(ACTOR_TAG)  # end of train_actor
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()  # whatever the GPU holds before the teacher pass (e.g. the reference model)
    backuper.restore(TEACHER_TAG)
    assert all(torch.equal(param, trained[name]) for name, param in model.named_parameters())


@needs_slime
@pytest.mark.parametrize("interval", ["step", "rollout"])
def test_ema_teacher_tracks_a_float64_average_and_is_written_to_the_tag(backuper_and_model, interval):
    backuper, model, source = backuper_and_model
    rate = 0.05
    weights = attach("ema", backuper, source, ema_rate=rate, ema_update_interval=interval)
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
    attach("frozen", backuper, source)
    with pytest.raises(RuntimeError, match="already holds a 'teacher' tag"):
        attach("ema", backuper, source)
