import pytest

from slime_self_distill.trainer import slime_compat
from slime_self_distill.trainer.slime_compat import (
    CHECKED_SLIME_COMMIT,
    SlimeCompatibilityError,
    find_incompatibilities,
    installed_slime_version,
    signature_text,
    verify,
)
from tests.slime_cpu_harness import import_slime_megatron
from tests.slime_support import needs_slime


@pytest.fixture(scope="module")
def slime_megatron():
    return import_slime_megatron()


def test_signature_text_drops_annotations_but_keeps_kinds_and_defaults():
    def function(a: int, b: str = "x", *, c=None) -> bool:
        return True

    assert signature_text(function) == "(a, b='x', *, c=None)"


@needs_slime
def test_the_installed_slime_is_the_checked_one(slime_megatron):
    assert find_incompatibilities() == []
    assert verify() == installed_slime_version()
    assert installed_slime_version().startswith(slime_compat.CHECKED_SLIME_VERSION)


@needs_slime
def test_a_changed_signature_stops_the_run_with_version_and_commit(slime_megatron, monkeypatch):
    def get_batch(data_iterator, keys, pad_multiplier=128):  # slime dropped allgather_cp
        raise AssertionError("never called")

    monkeypatch.setattr(slime_megatron.model, "get_batch", get_batch)
    with pytest.raises(SlimeCompatibilityError) as excinfo:
        verify()
    message = str(excinfo.value)
    assert "slime.backends.megatron_utils.model.get_batch(data_iterator, keys, pad_multiplier=128) differs from " \
           "the checked slime.backends.megatron_utils.model.get_batch(data_iterator, keys, pad_multiplier=128, " \
           "allgather_cp=False)" in message
    assert CHECKED_SLIME_COMMIT in message and installed_slime_version() in message
    assert "adds the teacher tensors" in message


@needs_slime
def test_a_missing_function_is_reported(slime_megatron, monkeypatch):
    from slime.observability import train_metric_utils

    monkeypatch.delattr(train_metric_utils, "log_rollout_data")
    problems = find_incompatibilities()
    assert any("train_metric_utils.log_rollout_data is missing" in p for p in problems)


@needs_slime
def test_a_global_that_slime_no_longer_calls_by_that_name_is_reported(slime_megatron, monkeypatch):
    original = slime_megatron.actor.forward_only

    def forward_only(f, args, model, data_iterator, num_microbatches, store_prefix="", use_rollout_top_p_replay=False):
        return original(f, args, model, data_iterator, num_microbatches, store_prefix, use_rollout_top_p_replay)

    monkeypatch.setattr(slime_megatron.actor, "forward_only", forward_only)
    problems = find_incompatibilities()
    assert any("actor.forward_only is no longer slime.backends.megatron_utils.model.forward_only" in p
               for p in problems)


@needs_slime
def test_a_changed_control_flow_is_reported(slime_megatron, monkeypatch):
    def train(rollout_id, model, optimizer, opt_param_scheduler, data_iterator, num_microbatches, global_batch_sizes):
        return None  # same signature, but no longer runs train_one_step per step

    monkeypatch.setattr(slime_megatron.model, "train", train)
    monkeypatch.setattr(slime_megatron.actor, "train", train)
    problems = find_incompatibilities()
    assert any("model.train no longer contains 'train_one_step('" in p for p in problems)
