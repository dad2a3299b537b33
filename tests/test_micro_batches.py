import random

import pytest

from slime_self_distill.core.micro_batches import pad_to_counts, split_by_tokens


def test_split_keeps_order_and_every_sample_and_respects_the_cap():
    lengths = [10, 30, 5, 50, 20, 20, 20, 1]
    indices, counts = split_by_tokens([[0, 1, 2], [3, 4], [5, 6, 7]], [2, 1], lengths, 40)
    assert indices == [[0, 1], [2], [3], [4], [5, 6], [7]]
    assert counts == [4, 2]
    assert sum(indices, []) == list(range(8))
    for micro_batch in indices:
        assert len(micro_batch) == 1 or sum(lengths[i] for i in micro_batch) <= 40


def test_split_leaves_fitting_micro_batches_alone():
    assert split_by_tokens([[0, 1], [2]], [1, 1], [3, 4, 5], 100) == ([[0, 1], [2]], [1, 1])
    with pytest.raises(ValueError, match="does not cover"):
        split_by_tokens([[0, 1], [2]], [1], [3, 4, 5], 100)


def test_padding_splits_the_largest_micro_batch_into_balanced_halves_first():
    lengths = [4, 4, 4, 4, 1, 1, 9]
    schedule = pad_to_counts([[0, 1, 2, 3], [4, 5, 6]], [2], lengths, [3])
    # the 16-token micro-batch is split (the 11-token one is smaller), into 8 + 8 rather than 4 + 12
    assert schedule.micro_batch_indices == [[0, 1], [2, 3], [4, 5, 6]]
    assert schedule.num_microbatches == [3] and schedule.padding_sources == []


def test_padding_adds_repeats_of_the_shortest_sample_when_nothing_can_be_split():
    lengths = [7, 3, 5, 2]
    schedule = pad_to_counts([[0], [1], [2, 3]], [2, 1], lengths, [4, 3])
    # step 0: two one-sample micro-batches, two padding repeats of its shortest sample (1);
    # step 1: [2, 3] splits once, then one padding repeat of its shortest sample (3)
    assert schedule.micro_batch_indices == [[0], [1], [4], [5], [2], [3], [6]]
    assert schedule.padding_sources == [1, 1, 3]
    assert schedule.num_microbatches == [4, 3]


def test_padding_refuses_a_target_below_the_current_count_or_a_mismatched_step_count():
    with pytest.raises(ValueError, match="target count 1 for a step of 2"):
        pad_to_counts([[0], [1]], [2], [1, 1], [1])
    with pytest.raises(ValueError, match="2 target counts for 1 training steps"):
        pad_to_counts([[0], [1]], [2], [1, 1], [2, 2])


@pytest.mark.parametrize("seed", range(20))
def test_padded_schedules_hold_every_sample_once_reach_the_target_and_keep_the_cap(seed):
    rng = random.Random(seed)
    num_samples = rng.randint(1, 12)
    lengths = [rng.randint(1, 30) for _ in range(num_samples)]
    # a student schedule: samples in order, cut into micro-batches, the micro-batches cut into steps
    cuts = sorted(rng.sample(range(1, num_samples), rng.randint(0, num_samples - 1))) if num_samples > 1 else []
    bounds = [0, *cuts, num_samples]
    micro_batches = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    step_cuts = sorted(rng.sample(range(1, len(micro_batches)), rng.randint(0, len(micro_batches) - 1))) \
        if len(micro_batches) > 1 else []
    step_bounds = [0, *step_cuts, len(micro_batches)]
    counts = [b - a for a, b in zip(step_bounds[:-1], step_bounds[1:])]
    cap = 40
    indices, counts = split_by_tokens(micro_batches, counts, lengths, cap)
    targets = [count + rng.randint(0, 4) for count in counts]
    schedule = pad_to_counts(indices, counts, lengths, targets)
    assert schedule.num_microbatches == targets
    assert len(schedule.micro_batch_indices) == sum(targets)
    flat = sum(schedule.micro_batch_indices, [])
    assert sorted(flat) == list(range(num_samples + len(schedule.padding_sources)))
    padded_lengths = lengths + [lengths[source] for source in schedule.padding_sources]
    for micro_batch in schedule.micro_batch_indices:
        assert micro_batch
        assert len(micro_batch) == 1 or sum(padded_lengths[i] for i in micro_batch) <= cap
    # every step keeps exactly its own samples (padding repeats a sample of the same step)
    split_position = padded_position = 0
    for count, target in zip(counts, targets):
        step_samples = sorted(i for mb in indices[split_position : split_position + count] for i in mb)
        padded_step = schedule.micro_batch_indices[padded_position : padded_position + target]
        assert sorted(i for mb in padded_step for i in mb if i < num_samples) == step_samples
        padding = [schedule.padding_sources[i - num_samples] for mb in padded_step for i in mb if i >= num_samples]
        assert set(padding) <= set(step_samples)
        split_position += count
        padded_position += target
