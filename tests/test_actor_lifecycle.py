"""slime's real train actor on CPU through start-up, rollouts, checkpoints, restarts and weight syncs (the harness
says what is stood in): the teacher survives restarts, the rollout engine never receives a teacher's weights, each
rollout runs one teacher pass and no unused student pass, and a live teacher costs no weight copy."""

import pytest
import torch

from slime_self_distill import megatron_hooks
from slime_self_distill.trainer.teacher_weights import EmaTeacher, ema_checkpoint_dir
from tests.slime_actor_harness import (
    actor_args,
    initial_checkpoint,
    read_checkpoint,
    resolve_load,
    run_rollouts,
    start_actor,
    write_checkpoint,
)
from tests.slime_cpu_harness import TinyCausalLM
from tests.slime_support import requires_slime

pytestmark = requires_slime


@pytest.fixture
def world(slime_megatron, monkeypatch):
    """Uninstalls the plugin before ``monkeypatch`` puts slime's own functions back (the plugin wrapped the
    harness's stand-ins)."""
    yield slime_megatron
    megatron_hooks.uninstall()


def teacher_tag(run) -> dict:
    return {name: tensor.clone() for name, tensor in run.actor.weights_backuper.get("teacher").items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def frozen_args(tmp_path, teacher_path, **overrides):
    return actor_args(tmp_path, self_distill_teacher="frozen", use_opd=True, opd_type="megatron",
                      opd_teacher_load=teacher_path, opd_kl_coef=0.0, **overrides)


# ---------------------------------------------------------------------- teachers across restarts
def test_a_frozen_teacher_is_the_initial_checkpoint_after_a_fresh_and_a_resumed_start(world, monkeypatch, tmp_path):
    initial = initial_checkpoint(tmp_path)
    initial_weights, _ = read_checkpoint(initial, finetune=True)
    fresh = start_actor(monkeypatch, resolve_load(frozen_args(tmp_path, initial)))
    assert same(teacher_tag(fresh), initial_weights)
    run_rollouts(fresh, 0, 2)
    trained = fresh.weights()
    assert not same(trained, initial_weights)  # training moved the student: a copy of it would not be the teacher

    resumed = start_actor(monkeypatch, resolve_load(frozen_args(tmp_path, initial)))  # slime loads --save now
    assert resumed.args.load == resumed.args.save and same(resumed.weights(), trained)
    assert same(teacher_tag(resumed), initial_weights)


def test_a_frozen_teacher_without_a_fixed_checkpoint_is_refused(world, monkeypatch, tmp_path):
    initial_checkpoint(tmp_path)
    args = resolve_load(actor_args(tmp_path, self_distill_teacher="frozen"))
    with pytest.raises(Exception, match="frozen needs a checkpoint that stays the same when the run resumes"):
        start_actor(monkeypatch, args)


def ema_args(tmp_path, **overrides):
    return actor_args(tmp_path, self_distill_teacher="ema", self_distill_ema_rate=0.3, **overrides)


def test_an_ema_run_resumed_mid_way_continues_the_same_shadow(world, monkeypatch, tmp_path):
    initial_checkpoint(tmp_path)
    straight = start_actor(monkeypatch, resolve_load(ema_args(tmp_path / "a", ref_load=str(tmp_path / "initial"))))
    run_rollouts(straight, 0, 4, save_every=100)  # never saves
    final_shadow = {name: tensor.clone() for name, tensor in megatron_hooks.current_installation().ema.shadow.items()}
    final_teacher, final_student = teacher_tag(straight), straight.weights()

    paused_args = ema_args(tmp_path / "b", ref_load=str(tmp_path / "initial"))
    paused = start_actor(monkeypatch, resolve_load(paused_args))
    run_rollouts(paused, 0, 2)  # saves after rollouts 0 and 1, EMA shards included
    assert sorted(p.name for p in (tmp_path / "b" / "save" / "self_distill" / "ema_teacher").iterdir()) == \
        ["iter_0000000", "iter_0000001"]
    resumed = start_actor(monkeypatch, resolve_load(ema_args(tmp_path / "b", ref_load=str(tmp_path / "initial"))))
    assert resumed.args.load == resumed.args.save
    run_rollouts(resumed, 2, 4, save_every=100)
    assert same(megatron_hooks.current_installation().ema.shadow, final_shadow)
    assert same(teacher_tag(resumed), final_teacher) and same(resumed.weights(), final_student)


def test_an_ema_teacher_under_release_train_is_saved_and_restored_every_rollout(world, monkeypatch, tmp_path):
    """--release-train: slime kills the actors after each rollout and recreates them from --save (RayTrainGroup
    .save_model then sets --load to --save, without --finetune)."""
    initial_checkpoint(tmp_path)
    straight = start_actor(monkeypatch, resolve_load(ema_args(tmp_path / "a", ref_load=str(tmp_path / "initial"))))
    run_rollouts(straight, 0, 3, save_every=100)
    final_shadow = {name: tensor.clone() for name, tensor in megatron_hooks.current_installation().ema.shadow.items()}

    args = resolve_load(ema_args(tmp_path / "b", ref_load=str(tmp_path / "initial"), release_train=True))
    for rollout_id in range(3):
        run = start_actor(monkeypatch, args)
        run.actor.train(rollout_id, __import__("tests.slime_actor_harness", fromlist=["x"]).rollout_data_ref(
            args, seed=1000 + rollout_id))
        run.actor.save_model(rollout_id)
        args.load, args.finetune = args.save, False  # RayTrainGroup.save_model under --release-train
    assert same(megatron_hooks.current_installation().ema.shadow, final_shadow)


def test_resuming_an_ema_run_from_a_checkpoint_without_its_shadow_is_refused(world, monkeypatch, tmp_path):
    initial_checkpoint(tmp_path)
    save = tmp_path / "save"
    write_checkpoint(str(save), 5, TinyCausalLM(vocab_size=24, seed=3))  # e.g. saved by a run without the plugin
    with pytest.raises(FileNotFoundError, match="iter_0000005/pp000_tp000_ep000_etp000.pt is missing.*--finetune"):
        start_actor(monkeypatch, resolve_load(ema_args(tmp_path)))
    args = resolve_load(ema_args(tmp_path))
    args.finetune = True  # a new EMA from the loaded weights, as the message says
    run = start_actor(monkeypatch, args)
    assert same(megatron_hooks.current_installation().ema.shadow, {k: v.float() for k, v in run.weights().items()})
    assert ema_checkpoint_dir(str(save), 5).endswith("self_distill/ema_teacher/iter_0000005")
    assert isinstance(megatron_hooks.current_installation().ema, EmaTeacher)


def test_an_ema_run_may_start_from_a_converted_release_checkpoint(world, monkeypatch, tmp_path):
    """slime's converter writes "release" into latest_checkpointed_iteration.txt; slime loads it as --load without
    --finetune (iteration 0): a start, with a new EMA, not a resume."""
    import os

    from tests.slime_actor_harness import TRACKER

    converted = str(tmp_path / "converted")
    write_checkpoint(converted, 0, TinyCausalLM(vocab_size=24, seed=5))
    with open(os.path.join(converted, TRACKER), "w") as tracker:
        tracker.write("release")
    os.rename(os.path.join(converted, "iter_0000000"), os.path.join(converted, "release"))
    args = ema_args(tmp_path, load=converted, finetune=False)
    monkeypatch.setattr("tests.slime_actor_harness.read_checkpoint", lambda path, finetune: (
        torch.load(os.path.join(path, "release", "model.pt"), weights_only=True), 0))
    run = start_actor(monkeypatch, args)
    assert same(megatron_hooks.current_installation().ema.shadow, {k: v.float() for k, v in run.weights().items()})


# ---------------------------------------------------------------------- what the rollout engine receives
@pytest.mark.parametrize("colocate", [False, True])
def test_the_rollout_engine_never_receives_a_teachers_weights(world, monkeypatch, tmp_path, colocate):
    initial = initial_checkpoint(tmp_path)
    teacher = str(tmp_path / "teacher")
    write_checkpoint(teacher, 0, TinyCausalLM(vocab_size=24, seed=7))  # a different model
    args = resolve_load(frozen_args(tmp_path, teacher, colocate=colocate, offload_train=colocate))
    run = start_actor(monkeypatch, args)
    initial_weights, _ = read_checkpoint(initial, finetune=True)
    run.actor.update_weights()  # train.py's first sync, right after the actors start
    assert same(run.engine.received[0], initial_weights)
    run_rollouts(run, 0, 1)
    trained = {name: tensor.clone() for name, tensor in run.actor.weights_backuper.get("actor").items()}
    assert not same(trained, initial_weights) and same(run.engine.received[1], trained)


def test_without_the_plugin_slimes_own_start_up_leaves_the_teacher_in_the_model(world, monkeypatch, tmp_path):
    """The case the plugin's backuper fixes: slime's OPD teacher load, without --colocate, then the first sync."""
    initial_checkpoint(tmp_path)
    teacher = str(tmp_path / "teacher")
    write_checkpoint(teacher, 0, TinyCausalLM(vocab_size=24, seed=7))
    args = resolve_load(frozen_args(tmp_path, teacher, custom_megatron_init_path=None))
    run = start_actor(monkeypatch, args)
    run.actor.update_weights()
    assert same(run.engine.received[0], read_checkpoint(teacher, finetune=True)[0])


# ---------------------------------------------------------------------- passes and copies per rollout
@pytest.mark.parametrize("use_rollout_logprobs, passes", [(True, ["teacher_"]), (False, ["teacher_", ""])])
def test_each_rollout_runs_one_teacher_pass_and_no_unused_student_pass(world, monkeypatch, tmp_path,
                                                                      use_rollout_logprobs, passes):
    initial_checkpoint(tmp_path)
    run = start_actor(monkeypatch, resolve_load(actor_args(tmp_path, use_rollout_logprobs=use_rollout_logprobs)))
    run_rollouts(run, 0, 3)
    assert run.passes == passes * 3
    assert run.actor.optimizer.steps == 3  # and the loss trained the student


@pytest.mark.parametrize("teacher, offload, copies_per_rollout", [
    ("live", False, 0),  # the model holds the student: the teacher swap and the swap back are skipped
    ("live", True, 1),  # wake-up restores the student once (the memory saver keeps no parameter copy)
    ("frozen", False, 2),  # the teacher's weights in, the student's back
])
def test_weight_copies_per_rollout(world, monkeypatch, tmp_path, teacher, offload, copies_per_rollout):
    initial = initial_checkpoint(tmp_path)
    args = frozen_args(tmp_path, initial) if teacher == "frozen" else actor_args(tmp_path)
    args.offload_train = offload
    run = start_actor(monkeypatch, resolve_load(args))
    backuper = run.actor.weights_backuper
    before = backuper.weight_copies
    run_rollouts(run, 0, 2, save_every=100)  # (saving wakes an offloaded actor up: one more restore)
    assert backuper.weight_copies - before == 2 * copies_per_rollout
    # nothing trained on weights the memory saver lost (the student's backup, taken after training, is finite)
    assert all(torch.isfinite(tensor).all() for tensor in backuper.get("actor").values())
