"""Shared fixtures."""

import pytest
import torch.distributed as dist

from tests.slime_support import REQUIRE_SLIME_ENV, SLIME_AVAILABLE, SLIME_REQUIRED


def pytest_sessionstart(session):
    if SLIME_REQUIRED and not SLIME_AVAILABLE:
        raise pytest.UsageError(
            f"{REQUIRE_SLIME_ENV}=1 but slime is not importable: install it (bash ../shared/deps/install-slime-cpu.sh) "
            "so that the slime-marked tests run instead of skipping"
        )


@pytest.fixture(scope="module")
def slime_megatron():
    """slime's Megatron-side modules on CPU, in a one-process gloo group with model parallel sizes 1 (created here
    unless a test module already did)."""
    from megatron.core import mpu

    from tests.slime_cpu_harness import destroy_gloo, free_port, import_slime_megatron, init_gloo

    slime = import_slime_megatron()
    created_group = not dist.is_initialized()
    if created_group:
        init_gloo(0, 1, free_port(), slime_group=True)
    created_model_parallel = not mpu.model_parallel_is_initialized()
    if created_model_parallel:
        mpu.initialize_model_parallel(1, 1)
    yield slime
    if created_model_parallel:
        mpu.destroy_model_parallel()
    if created_group:
        destroy_gloo()
