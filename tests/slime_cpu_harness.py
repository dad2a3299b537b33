"""Runs slime's real Megatron-side passes (forward_only, get_batch, DataIterator, log-prob helpers) on CPU.

Only three things of slime's environment are replaced (slime-integration.md section 4): slime's accelerator points
at the CPU, ``model.get_model_config`` returns a bare config, and ``model.get_forward_backward_func`` returns a
small loop (Megatron's scheduler allocates on CUDA) that runs ``forward_step_func`` once per micro-batch and keeps
the post-processor's output, as Megatron does for forward-only passes. The model is ``TinyCausalLM``: a causal
model whose logits depend on the whole prefix, that understands slime's packed THD batches, context-parallel
zigzag chunks and vocabulary-parallel output shards, so that packing or layout mistakes change the numbers.
"""

from __future__ import annotations

import os
import random
import socket
from argparse import Namespace
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist

from slime_self_distill.teacher_view import TeacherView
from tests.megatron_standins import install_standins
from tests.slime_support import SLIME_AVAILABLE


def import_slime_megatron() -> SimpleNamespace:
    install_standins()
    from slime.backends.megatron_utils import actor, cp_utils, data, loss, model

    return SimpleNamespace(actor=actor, model=model, data=data, loss=loss, cp_utils=cp_utils)


@dataclass
class TrainingMicroBatch:
    """What one training micro-batch of ``train_one_step`` produced, kept for the test to compare."""

    batch: dict  # the batch slime's forward_step fetched (through the installed get_batch wrapper)
    loss: torch.Tensor  # loss_function's scaled loss
    normalizer: torch.Tensor  # loss_function's second output (token count with --calculate-per-token-loss)
    logits_grad: torch.Tensor  # d loss / d logits [1, T_local, V/TP]


def cpu_forward_backward_func(*, forward_step_func, data_iterator, model, num_microbatches, forward_only=True, **_):
    """Forward-only: the post-processor's outputs, as Megatron collects them. Training: per micro-batch, the loss
    function on the logits and its backward into the model (the gradient w.r.t. the logits is kept in
    ``module.trained``); returns the log dicts, as Megatron's scheduler does."""
    iterator = data_iterator[0] if isinstance(data_iterator, list) else data_iterator
    module = model[0] if isinstance(model, list) else model
    module.forward_calls += num_microbatches
    store = []
    for _ in range(num_microbatches):
        output, post_process = forward_step_func(iterator, module)
        if forward_only:
            store.append(post_process(output)[1])
            continue
        logits = output  # the gradient reaches the model's parameters (an optimizer step can use it) and the logits
        logits.retain_grad()
        loss, normalizer, log = post_process(logits)
        loss.backward()
        batch = post_process.args[1]  # train_one_step's partial(loss_function, args, batch, ...)
        module.trained.append(TrainingMicroBatch(batch, loss.detach(), normalizer, logits.grad))
        store.append(log)
    return store


def point_slime_at_cpu(set_attribute=setattr) -> None:
    """``set_attribute`` is ``monkeypatch.setattr`` in a test, plain ``setattr`` in a spawned worker."""
    from slime.backends.megatron_utils import model
    from slime.utils import accelerator

    set_attribute(accelerator, "current_device", lambda: "cpu")
    set_attribute(accelerator, "device", lambda index=None: torch.device("cpu"))
    set_attribute(accelerator, "synchronize", lambda device_arg=None: None)
    set_attribute(model, "get_model_config", lambda module: SimpleNamespace(timers=None))
    set_attribute(model, "get_forward_backward_func", lambda: cpu_forward_backward_func)


class TorchWithoutPinnedMemory:
    """slime's weights backuper allocates pinned host memory, which a CPU-only torch cannot; tests give its module
    this torch whose ``empty_like`` ignores ``pin_memory``."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty_like(*args, pin_memory=False, **kwargs):
        return torch.empty_like(*args, **kwargs)


class TinyCausalLM(torch.nn.Module):
    """h_t = tanh(E[x_t] + mean_{s<=t} C[x_s]); logits_t = h_t W. Position t sees its whole prefix."""

    def __init__(self, vocab_size: int = 24, hidden: int = 8, seed: int = 0):
        super().__init__()
        from megatron.core.enums import ModelType

        generator = torch.Generator().manual_seed(seed)
        self.embedding = torch.nn.Parameter(torch.randn(vocab_size, hidden, generator=generator))
        self.context = torch.nn.Parameter(torch.randn(vocab_size, hidden, generator=generator))
        self.output = torch.nn.Parameter(2 * torch.randn(hidden, vocab_size, generator=generator))
        self.model_type = ModelType.encoder_or_decoder
        self.vocab_size = vocab_size
        self.forward_calls = 0
        self.trained: list[TrainingMicroBatch] = []

    def zero_grad_buffer(self) -> None:  # Megatron DDP's method, called by train_one_step
        self.zero_grad()

    def sequence_logits(self, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Logits [T, V] of one unpacked sequence (the brute-force reference runs this in float64)."""
        counts = torch.arange(1, len(tokens) + 1, dtype=dtype).unsqueeze(1)
        prefix_mean = self.context.to(dtype)[tokens].cumsum(0) / counts
        return torch.tanh(self.embedding.to(dtype)[tokens] + prefix_mean) @ self.output.to(dtype)

    def forward(self, input_ids, position_ids, attention_mask, labels, packed_seq_params, loss_mask):
        from megatron.core import mpu

        cp_size, cp_rank = mpu.get_context_parallel_world_size(), mpu.get_context_parallel_rank()
        local = input_ids[0]
        streams = [local]
        if cp_size > 1:
            streams = [torch.empty_like(local) for _ in range(cp_size)]
            dist.all_gather(streams, local, group=mpu.get_context_parallel_group())
        logits = torch.empty(len(local), self.vocab_size)
        boundaries = packed_seq_params.cu_seqlens_q.tolist()
        offset = 0
        for start, end in zip(boundaries[:-1], boundaries[1:]):
            length = (end - start) // cp_size  # this rank's part of the segment: chunks r and 2 * cp - 1 - r
            half = length // 2 if cp_size > 1 else length
            pieces = [stream[offset : offset + length] for stream in streams]
            sequence = torch.cat([p[:half] for p in pieces] + [p[half:] for p in reversed(pieces)])
            sequence_logits = self.sequence_logits(sequence)
            first = cp_rank * half
            second = cp_size * half + (cp_size - 1 - cp_rank) * (length - half)
            logits[offset : offset + half] = sequence_logits[first : first + half]
            logits[offset + half : offset + length] = sequence_logits[second : second + length - half]
            offset += length
        tp_size, tp_rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
        shard = self.vocab_size // tp_size
        return logits[:, tp_rank * shard : (tp_rank + 1) * shard].unsqueeze(0)


def make_args(**overrides) -> Namespace:
    values = dict(
        # slime's forward_only / get_batch / log-prob helpers
        rollout_top_p=1.0, data_pad_size_multiplier=4, allgather_cp=False, use_rollout_entropy=False,
        custom_megatron_before_log_prob_hook_path=None, seq_length=4096, micro_batch_size=1,
        use_dynamic_batch_size=False, max_tokens_per_gpu=None, rollout_temperature=0.7, log_probs_chunk_size=-1,
        entropy_coef=0.0,
        # install()'s checks
        compute_advantages_and_returns=True, loss_type="custom_loss", context_parallel_size=1,
        tensor_model_parallel_size=1, use_opd=False, opd_type=None, opd_kl_coef=1.0, rollout_batch_size=2,
        n_samples_per_prompt=2, rollout_max_response_len=12, padded_vocab_size=24, vocab_size=24, hidden_size=8,
        actor_num_gpus_per_node=8,
        # a live teacher needs no checkpoint (a frozen one is slime's --opd-teacher-load)
        self_distill_teacher="live",
    )
    values.update(overrides)
    return Namespace(**values)


def make_rollout(seed: int, *, vocab_size: int = 24, num_samples: int = 5, without_teacher: tuple = (2,),
                 max_response_len: int = 12, full_length_responses: bool = False,
                 response_lengths: tuple = ()) -> dict:
    """One DP rank's rollout_data as slime's trainer holds it, with the converter's TeacherView payload.

    Response lengths are random in [1, max_response_len], all max_response_len with ``full_length_responses``, or
    the given ``response_lengths`` (one per sample)."""
    rng = random.Random(seed)
    chosen_lengths = list(response_lengths)
    tokens, views, response_lengths, loss_masks = [], [], [], []
    for index in range(num_samples):
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(2, 9))]
        if chosen_lengths:
            response_length = chosen_lengths[index]
        else:
            response_length = max_response_len if full_length_responses else rng.randint(1, max_response_len)
        response = [rng.randrange(vocab_size) for _ in range(response_length)]
        tokens.append(torch.tensor(prompt + response))
        response_lengths.append(response_length)
        mask = [int(rng.random() > 0.2) for _ in range(response_length)]
        # the converter zeroes the loss mask of a sample without a teacher (custom_convert.mask_samples_without_teacher)
        loss_masks.append(torch.tensor([0] * response_length if index in without_teacher else mask, dtype=torch.int))
        if index in without_teacher:
            views.append(TeacherView((), response_length, False, 0.0, reason="no teacher prompt"))
        else:
            teacher_prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(len(prompt), len(prompt) + 14))]
            views.append(TeacherView(tuple(teacher_prompt + response), response_length, True, 1.25))
    micro_batch_indices = [list(range(i, min(i + 2, num_samples))) for i in range(0, num_samples, 2)]
    return {
        "tokens": tokens,
        "response_lengths": response_lengths,
        "total_lengths": [len(t) for t in tokens],
        "loss_masks": loss_masks,
        "prompt": views,
        "micro_batch_indices": micro_batch_indices,
        "num_microbatches": [len(micro_batch_indices)],
    }


def brute_force_teacher(model: TinyCausalLM, sequence: torch.Tensor, response_length: int, temperature: float):
    """float64: the teacher's log-softmax at the rows predicting the response, and the response tokens."""
    logits = model.sequence_logits(sequence, torch.float64) / temperature
    rows = logits[len(sequence) - response_length - 1 : len(sequence) - 1]
    return torch.log_softmax(rows, dim=-1), sequence[len(sequence) - response_length :]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int, *, slime_group: bool = False,
              timeout_seconds: float = 120) -> None:
    """A gloo world; with ``slime_group`` it also serves as slime's all-ranks CPU group
    (``distributed_utils.get_gloo_group``, which slime's train actor sets up). A collective that some rank never joins
    fails after ``timeout_seconds`` instead of hanging the test. End with ``destroy_gloo``."""
    from datetime import timedelta

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_seconds))
    if slime_group:
        from slime.utils.distributed_utils import set_gloo_group

        set_gloo_group(dist.group.WORLD)


def destroy_gloo() -> None:
    """Drop slime's reference to the world group (if it has one) and destroy the world."""
    if SLIME_AVAILABLE:
        from slime.utils.distributed_utils import set_gloo_group

        set_gloo_group(None)
    dist.destroy_process_group()


# (TP, CP, sequence parallelism) of the two-rank training-step tests
TWO_RANK_LAYOUTS = ((2, 1, False), (2, 1, True), (1, 2, False))


def each_two_rank_layout():
    """Megatron's parallel state set to each of ``TWO_RANK_LAYOUTS`` in turn: yields (tp, cp, sequence_parallel),
    destroys the state after each."""
    from megatron.core import mpu

    for tp_size, cp_size, sequence_parallel in TWO_RANK_LAYOUTS:
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp_size, context_parallel_size=cp_size)
        yield tp_size, cp_size, sequence_parallel
        mpu.destroy_model_parallel()
