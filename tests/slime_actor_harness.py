"""slime's real train actor on CPU: ``MegatronTrainRayActor.init``, ``train``, ``save_model``, ``update_weights``.

One training rank in a one-process gloo world. The actor's own code runs as slime ships it: its start-up sequence
(weights backuper, ``backup("actor")``, ``load_other_checkpoint`` for the reference / OPD teacher, the offload
branch), ``train_actor`` (reference / teacher / student log-prob passes, advantages, slime's metrics, ``train`` ->
``train_one_step`` -> ``loss_function`` -> the plugin's loss, the end-of-rollout backup), ``save_model`` and
``update_weights``. What cannot run on a CPU machine is replaced at the module globals the actor calls, each by the
smallest stand-in with the same contract:

* Megatron's start-up (``initialize.init``: the custom init hook is still called, as slime's ``init`` does last),
  its model builder and checkpoint loader/saver: ``TinyCausalLM`` and Megatron-like checkpoint directories
  (``iter_XXXXXXX`` + ``latest_checkpointed_iteration.txt``; a ``--finetune`` load starts at iteration 0);
* the optimizer: SGD on the real gradients of the tiny model (slime's ``train_one_step`` drives it);
* the weight updaters: they record what the rollout engine would receive: the live parameters (slime's
  ``UpdateWeightFromDistributed`` / ``FromDisk`` read the model) or the ``"actor"`` tag (``FromTensor``, colocated);
* torch_memory_saver: ``pause`` loses the parameters' contents (slime keeps no CPU copy of the parameter buffers; it
  restores them from the ``"actor"`` tag on wake-up), ``resume`` gives the memory back;
* Ray, the tokenizer / HF config loaders, tracking, process-group reloading, memory printing, perf logging.

Each ``forward_only`` call is recorded with its store prefix, and each weight copy by the backuper.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from slime_self_distill.teacher_view import TeacherView
from tests.megatron_standins import install_standins
from tests.slime_cpu_harness import TinyCausalLM, TorchWithoutPinnedMemory, point_slime_at_cpu

TRACKER = "latest_checkpointed_iteration.txt"
VOCAB = 24


# ---------------------------------------------------------------------- Megatron-like checkpoints
def write_checkpoint(root: str, iteration: int, model: torch.nn.Module) -> None:
    directory = os.path.join(root, f"iter_{iteration:07d}")
    os.makedirs(directory, exist_ok=True)
    torch.save({name: param.detach().clone() for name, param in model.state_dict().items()},
               os.path.join(directory, "model.pt"))
    with open(os.path.join(root, TRACKER), "w") as tracker:
        tracker.write(str(iteration))


def read_checkpoint(path: str, finetune: bool) -> tuple[dict, int]:
    """(weights, iteration) as Megatron's loader returns them (iteration 0 with --finetune)."""
    with open(os.path.join(path, TRACKER)) as tracker:
        iteration = int(tracker.read())
    weights = torch.load(os.path.join(path, f"iter_{iteration:07d}", "model.pt"), weights_only=True)
    return weights, 0 if finetune else iteration


# ---------------------------------------------------------------------- stand-ins
class SgdOptimizer:
    """What slime's train_one_step calls on Megatron's optimizer, as plain SGD on the model's gradients."""

    def __init__(self, model: torch.nn.Module, lr: float):
        self.model, self.lr = model, lr
        self.param_groups = [{"params": list(model.parameters())}]
        self.chained_optimizers = []
        self.steps = 0

    def scale_loss(self, loss):
        return loss

    def zero_grad(self):
        self.model.zero_grad()

    @torch.no_grad()
    def step(self):
        for param in self.model.parameters():
            if param.grad is not None:
                param.add_(param.grad, alpha=-self.lr)
        self.steps += 1
        return True, 0.0, 0


class ConstantScheduler:
    def step(self, increment):
        pass

    def get_lr(self, group):
        return 0.0


@dataclass
class RolloutEngine:
    """What the rollout engine receives at each weight sync: {name: tensor}."""

    received: list = field(default_factory=list)


def recording_updater(engine: RolloutEngine, reads_live_parameters: bool):
    class RecordingWeightUpdater:
        def __init__(self, args, model, weights_getter, *, model_name, quantization_config):
            self.model, self.weights_getter = model, weights_getter
            self.weight_version = 0

        def update_weights(self):
            self.weight_version += 1
            if reads_live_parameters:  # UpdateWeightFromDistributed / FromDisk: the model's parameters
                weights = {name: param.detach().clone() for name, param in self.model[0].named_parameters()}
            else:  # UpdateWeightFromTensor (colocated): the "actor" tag
                weights = {name: tensor.clone() for name, tensor in self.weights_getter().items()}
            engine.received.append(weights)

        def pop_metrics(self):
            return {}

    return RecordingWeightUpdater


class MemorySaver:
    """torch_memory_saver without a CPU copy of the parameters: pause loses them, as on the GPU."""

    def __init__(self):
        self.model = None

    def pause(self):
        with torch.no_grad():
            for param in self.model.parameters():
                param.fill_(float("nan"))

    def resume(self):
        pass

    def disable(self):
        import contextlib

        return contextlib.nullcontext()


class FakeRay:
    @staticmethod
    def get(value):
        return value


class Remote:
    def __init__(self, value):
        self.value = value

    def remote(self, *args, **kwargs):
        return self.value


# ---------------------------------------------------------------------- the run
def actor_args(tmp_path, **overrides) -> argparse.Namespace:
    """slime's parsed args: every slime default from slime's real argument code, plus what Megatron's parser and
    slime's validation would set for a one-rank CPU run, plus the plugin's hooks (as the launcher fills them)."""
    from slime.utils.arguments import get_slime_extra_args_provider

    from slime_self_distill.train import add_custom_arguments

    parser = argparse.ArgumentParser(allow_abbrev=False)
    get_slime_extra_args_provider(add_custom_arguments)(parser)
    args, _ = parser.parse_known_args([
        "--rollout-batch-size", "3", "--n-samples-per-prompt", "2", "--global-batch-size", "6",
        "--rollout-max-response-len", "8", "--rollout-temperature", "0.8", "--hf-checkpoint", str(tmp_path / "hf"),
        "--loss-type", "custom_loss", "--custom-loss-function-path", "slime_self_distill.custom_loss.self_distill_loss",
        "--custom-megatron-init-path", "slime_self_distill.megatron_hooks.install", "--use-rollout-logprobs",
        "--self-distill-kl-scope", "topk", "--self-distill-topk", "4", "--self-distill-teacher", "live",
    ])
    megatron = dict(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
        expert_model_parallel_size=1, seq_length=4096, micro_batch_size=1, decoder_seq_length=None,
        use_distributed_optimizer=False, overlap_param_gather=False, overlap_grad_reduce=False,
        align_grad_reduce=False, align_param_gather=False, manual_gc=False, calculate_per_token_loss=False,
        check_for_nan_in_loss_and_grad=True, finetune=False, no_load_optim=False, no_load_rng=False, ckpt_step=None,
        debug_rollout_only=False, debug_train_only=False, use_critic=False, vocab_size=VOCAB, padded_vocab_size=VOCAB,
        hidden_size=8,  # TinyCausalLM's: K 4 (32 B) is no larger than a hidden state, so the top-K is stored
        offload_train=False, async_save=False, save_hf=None, lr=0.5, actor_num_nodes=1, actor_num_gpus_per_node=1,
        num_gpus_per_node=1, use_dynamic_batch_size=False, ref_load=str(tmp_path / "initial"), load=None,
        save=str(tmp_path / "save"), use_pytorch_profiler=False, record_memory_history=False, profile_target=[],
    )
    for name, value in {**megatron, **overrides}.items():
        setattr(args, name, value)
    return args


@dataclass
class ActorRun:
    """One actor and what it did."""

    actor: object
    args: argparse.Namespace
    engine: RolloutEngine
    passes: list  # store prefix of every forward_only call

    @property
    def model(self) -> TinyCausalLM:
        return self.actor.model[0]

    def weights(self) -> dict:
        return {name: param.detach().clone() for name, param in self.model.named_parameters()}


def initial_checkpoint(tmp_path, seed: int = 0) -> str:
    """The run's initial Megatron checkpoint (``--ref-load``)."""
    path = str(tmp_path / "initial")
    write_checkpoint(path, 0, TinyCausalLM(vocab_size=VOCAB, seed=seed))
    return path


def install_stand_ins(monkeypatch, engine: RolloutEngine, passes: list, memory_saver: MemorySaver) -> None:
    install_standins()
    from slime.backends.megatron_utils import actor as actor_module
    from slime.backends.megatron_utils import model as model_module
    from slime.observability import train_metric_utils
    from slime.ray import train_actor
    from slime.utils import data as data_module
    from slime.utils import tensor_backper
    from slime.utils.misc import load_function

    point_slime_at_cpu(monkeypatch.setattr)
    monkeypatch.setattr(tensor_backper, "torch", TorchWithoutPinnedMemory())
    monkeypatch.setenv("SLIME_DESTROY_WORLD_PROCESS_GROUP", "0")
    current = SimpleNamespace(args=None)

    def base_init(self, args, role, with_ref=False, with_opd_teacher=False):  # TrainRayActor.init after the group
        self.args, self.role, self.with_ref, self.with_opd_teacher = args, role, with_ref, with_opd_teacher
        args.rank, args.world_size = 0, 1
        current.args = args

    def megatron_init(args):  # initialize.init: Megatron's set-up, then the custom init hook, last
        if args.custom_megatron_init_path:
            load_function(args.custom_megatron_init_path)(args)

    def initialize_model_and_optimizer(args, role="actor"):
        model = TinyCausalLM(vocab_size=VOCAB, seed=123)  # overwritten by the checkpoint
        weights, iteration = read_checkpoint(args.load, args.finetune)
        model.load_state_dict(weights)
        memory_saver.model = model
        return [model], SgdOptimizer(model, args.lr), ConstantScheduler(), iteration

    def load_checkpoint(ddp_model, optimizer, opt_param_scheduler, checkpointing_context, skip_load_to_model_and_opt):
        weights, iteration = read_checkpoint(current.args.load, current.args.finetune)
        ddp_model[0].load_state_dict(weights)
        return iteration, 0

    def save(iteration, model, optimizer, opt_param_scheduler):
        write_checkpoint(current.args.save, iteration, model[0])

    slimes_forward_only = inspect.unwrap(model_module.forward_only)

    @functools.wraps(slimes_forward_only)  # slime_compat sees slime's own function through the wrapper
    def forward_only(f, args, model, data_iterator, num_microbatches, store_prefix="", use_rollout_top_p_replay=False):
        passes.append(store_prefix)
        return slimes_forward_only(f, args, model, data_iterator, num_microbatches, store_prefix,
                                   use_rollout_top_p_replay)

    for owner, name, value in [
        (actor_module, "monkey_patch_torch_dist", lambda: None),
        (train_actor.TrainRayActor, "init", base_init),
        (actor_module, "init", megatron_init),
        (actor_module, "init_tracking", lambda *a, **k: None),
        (actor_module, "AutoConfig", SimpleNamespace(from_pretrained=lambda *a, **k: SimpleNamespace(vocab_size=VOCAB))),
        (actor_module, "AutoTokenizer", SimpleNamespace(from_pretrained=lambda *a, **k: None)),
        # slime's actor calls the model module's functions through its own names (slime_compat checks both agree)
        (actor_module, "initialize_model_and_optimizer", initialize_model_and_optimizer),
        (model_module, "initialize_model_and_optimizer", initialize_model_and_optimizer),
        (actor_module, "load_checkpoint", load_checkpoint),
        (actor_module, "save", save),
        (model_module, "save", save),
        (actor_module, "forward_only", forward_only),
        (model_module, "forward_only", forward_only),
        (actor_module, "named_params_and_buffers",
         lambda args, model, convert_to_global_name=True: model[0].named_parameters()),
        (actor_module, "UpdateWeightFromDistributed", recording_updater(engine, reads_live_parameters=True)),
        (actor_module, "UpdateWeightFromDisk", recording_updater(engine, reads_live_parameters=True)),
        (actor_module, "UpdateWeightFromTensor", recording_updater(engine, reads_live_parameters=False)),
        (actor_module, "clear_memory", lambda *a, **k: None),
        (actor_module, "print_memory", lambda *a, **k: None),
        (actor_module, "torch_memory_saver", memory_saver),
        (actor_module, "destroy_process_groups", lambda: None),
        (actor_module, "reload_process_groups", lambda: None),
        (actor_module, "ray", FakeRay()),
        (data_module, "ray", FakeRay()),
        (model_module, "get_args", lambda: current.args),
        (train_metric_utils, "log_perf_data", lambda *a, **k: None),
    ]:
        monkeypatch.setattr(owner, name, value)


def resolve_load(args) -> argparse.Namespace:
    """slime's rule for ``--load`` (``slime_validate_args``), with the run script's ``LOAD=$SAVE``: resume from
    ``--save`` when it holds a Megatron checkpoint, else start from ``--ref-load`` with ``--finetune``."""
    if os.path.isfile(os.path.join(args.save, TRACKER)):
        args.load, args.finetune = args.save, False
    else:
        args.load, args.finetune = args.ref_load, True
    return args


def start_actor(monkeypatch, args) -> ActorRun:
    """``RayTrainGroup.create`` for one rank: the actor object and its real ``init``, with slime's own choice of
    reference and OPD teacher (``placement_group.create_actor_model``)."""
    from slime.backends.megatron_utils.actor import MegatronTrainRayActor
    from slime.observability.timer import Timer

    from slime_self_distill import megatron_hooks

    megatron_hooks.uninstall()  # a previous actor's patches (the new actor's init installs its own)
    Timer().start_time.clear()  # the process-wide timers of a previous actor (each actor is its own process in slime)
    engine, passes, memory_saver = RolloutEngine(), [], MemorySaver()
    install_stand_ins(monkeypatch, engine, passes, memory_saver)
    actor = MegatronTrainRayActor.__new__(MegatronTrainRayActor)
    actor._rank = 0
    MegatronTrainRayActor.init(
        actor, args, "actor",
        with_ref=args.kl_coef != 0 or args.use_kl_loss,
        with_opd_teacher=bool(args.use_opd) and args.opd_type == "megatron",
    )
    actor.rollout_manager = SimpleNamespace(
        get_updatable_engines_and_lock=Remote(([engine], None, 0, [], [], [])),
        clear_updatable_num_new_engines=Remote(None),
    )
    return ActorRun(actor, args, engine, passes)


def rollout_data_ref(args, seed: int):
    """What slime's RolloutManager sends the one training rank: samples with their teacher views, rewards and
    SGLang's log-probs, scheduled by slime's real ``build_dp_schedule`` and tensorized like slime does."""
    from slime.observability.rollout_data_utils import tensorize_rollout_data_for_training
    from slime.utils.dp_schedule import build_dp_schedule
    from slime.utils.misc import Box

    rng = random.Random(seed)
    samples = args.rollout_batch_size * args.n_samples_per_prompt
    tokens, views, response_lengths, loss_masks, log_probs = [], [], [], [], []
    for _ in range(samples):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 6))]
        response = [rng.randrange(VOCAB) for _ in range(rng.randint(1, args.rollout_max_response_len))]
        teacher_prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(len(prompt), len(prompt) + 6))]
        tokens.append(prompt + response)
        views.append(TeacherView(tuple(teacher_prompt + response), len(response), True, 1.0))
        response_lengths.append(len(response))
        loss_masks.append([1] * len(response))
        log_probs.append([-rng.random() for _ in response])
    total_lengths = [len(t) for t in tokens]
    partitions, micro_batch_indices, num_microbatches, global_batch_sizes = build_dp_schedule(
        args, {"dp_size": 1, "cp_size": 1, "vpp_size": 1, "microbatch_group_size_per_vp_stage": 1},
        total_lengths, global_batch_size=args.global_batch_size, rollout_indices=list(range(samples)),
    )
    data = {
        "partition": partitions[0], "tokens": tokens, "response_lengths": response_lengths,
        "rewards": [rng.random() for _ in range(samples)], "raw_reward": [0.0] * samples,
        "truncated": [0] * samples, "loss_masks": loss_masks, "sample_indices": list(range(samples)),
        "rollout_ids": list(range(samples)), "rollout_mask_sums": [sum(m) for m in loss_masks],
        "rollout_log_probs": log_probs, "prompt": views, "total_lengths": total_lengths,
        "global_batch_sizes": global_batch_sizes, "num_microbatches": num_microbatches,
        "micro_batch_indices": micro_batch_indices[0],
    }
    tensorize_rollout_data_for_training(data)
    return [Box(data)]


def run_rollouts(run: ActorRun, first: int, last: int, save_every: int = 1) -> None:
    """slime's train.py loop for the actor: train, save at the interval, sync weights to the rollout engine."""
    for rollout_id in range(first, last):
        run.actor.train(rollout_id, rollout_data_ref(run.args, seed=1000 + rollout_id))
        if (rollout_id + 1) % save_every == 0:
            run.actor.save_model(rollout_id)
        run.actor.update_weights()
