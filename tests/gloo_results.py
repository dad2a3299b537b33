"""Run a function on every rank of a fresh multi-process gloo world and collect what each rank returns.

``gather_from_ranks(compute, world)`` spawns ``world`` processes; each joins the world (``dist.group.WORLD`` is the
tensor-parallel group of the pure-math tests) and calls ``compute(rank, world, group)``, a module-level function. The
results travel back as bytes (a tensor shared through the queue dies with its worker); a rank that raises fails the
test with its traceback.
"""

from __future__ import annotations

import io
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.slime_cpu_harness import free_port


def _worker(rank, world, port, queue, compute):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        buffer = io.BytesIO()
        torch.save(compute(rank, world, dist.group.WORLD), buffer)
        queue.put((rank, buffer.getvalue()))
        dist.destroy_process_group()
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def gather_from_ranks(compute, world: int) -> dict:
    """``{rank: compute(rank, world, group)}`` from ``world`` gloo processes."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    processes = [ctx.Process(target=_worker, args=(rank, world, port, queue, compute)) for rank in range(world)]
    for process in processes:
        process.start()
    outputs = dict(queue.get(timeout=240) for _ in range(world))
    for process in processes:
        process.join(timeout=60)
    for rank, out in outputs.items():
        if isinstance(out, str):
            pytest.fail(f"rank {rank} failed:\n{out}")
    return {rank: torch.load(io.BytesIO(out)) for rank, out in outputs.items()}
