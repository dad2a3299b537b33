"""What the loss benchmarks share: a median wall time, and one micro-batch through slime's real ``loss_function`` on a
single-rank gloo group (skipped, saying why, without slime)."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Iterator, Optional

import torch


def median_seconds(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def single_rank_slime(what: str) -> Iterator[Optional[object]]:
    """slime's Megatron modules with a one-rank gloo group and Megatron's parallel state (TP 1), or None (after
    printing why ``what`` is skipped) when slime is not importable."""
    try:
        from tests.slime_cpu_harness import destroy_gloo, free_port, import_slime_megatron, init_gloo
        slime = import_slime_megatron()
    except ImportError as error:
        print(f"{what}: skipped, slime is not importable ({error})")
        yield None
        return
    from megatron.core import mpu

    init_gloo(0, 1, free_port(), slime_group=True)
    mpu.initialize_model_parallel(1, 1)
    try:
        yield slime
    finally:
        mpu.destroy_model_parallel()
        destroy_gloo()


def packed_micro_batch(samples: int, prompt: int, response: int, vocab: int, generator: torch.Generator):
    """``(logits [1, T, vocab], batch)``: ``samples`` packed sequences of random tokens, every response token in the
    loss, with the keys slime's ``loss_function`` reads for any loss type."""
    tokens = [torch.randint(0, vocab, (prompt + response,), generator=generator) for _ in range(samples)]
    logits = torch.randn(1, samples * (prompt + response), vocab, generator=generator)
    batch = {
        "unconcat_tokens": tokens, "total_lengths": [prompt + response] * samples,
        "response_lengths": [response] * samples, "loss_masks": [torch.ones(response, dtype=torch.int)] * samples,
        "rollout_mask_sums": [torch.tensor(float(response))] * samples,
    }
    return logits, batch
