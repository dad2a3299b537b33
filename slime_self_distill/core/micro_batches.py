"""The teacher pass's micro-batch schedule: split for the longer teacher sequences, the same count on every rank.

Pure Python; no slime, no torch. slime packs a rollout into micro-batches from the *student* lengths
(``slime/utils/dp_schedule.py``) and guarantees that every data-parallel rank runs the same number of micro-batches
per training step. The teacher sequences are longer (teacher prompt + the same response), so under
``--use-dynamic-batch-size`` the teacher pass splits the micro-batches whose teacher tokens exceed the per-GPU budget
(``split_by_tokens``). Each rank splits by its own samples, so the counts can then differ between ranks; with MoE
expert parallelism every forward pass runs all-to-alls across the data-parallel replicas, and a rank with fewer
micro-batches would leave the others waiting forever. ``pad_to_counts`` brings every rank to the count the ranks
agreed on (the maximum): it splits the rank's largest multi-sample micro-batches further and, only when none is
left to split, adds padding micro-batches that repeat the step's shortest sample (its output is discarded).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TeacherSchedule:
    """Micro-batches of the teacher pass, in slime's ``DataIterator`` form.

    ``micro_batch_indices`` index the teacher samples: ``0 .. n-1`` are the rank's real samples, ``n + k`` is padding
    sample ``k``, a copy of sample ``padding_sources[k]`` whose output nobody reads. Flattened, the indices are a
    permutation of ``range(n + len(padding_sources))`` (what slime's ``forward_only`` needs to restore the order).
    """

    micro_batch_indices: list[list[int]]
    num_microbatches: list[int]
    padding_sources: list[int]


def _steps(micro_batch_indices: list[list[int]], num_microbatches: list[int]) -> list[list[list[int]]]:
    if sum(num_microbatches) != len(micro_batch_indices):
        raise ValueError(f"num_microbatches {num_microbatches} does not cover {len(micro_batch_indices)} micro-batches")
    steps, position = [], 0
    for count in num_microbatches:
        steps.append([list(mb) for mb in micro_batch_indices[position : position + count]])
        position += count
    return steps


def split_by_tokens(
    micro_batch_indices: list[list[int]], num_microbatches: list[int], lengths: list[int], max_tokens: int
) -> tuple[list[list[int]], list[int]]:
    """Split each micro-batch, keeping sample order, so that its (teacher) tokens stay within ``max_tokens``.

    A sample longer than ``max_tokens`` alone stays alone, as in slime's own packing. Returns the new micro-batches
    and the new count per training step.
    """
    new_indices: list[list[int]] = []
    new_counts: list[int] = []
    for step in _steps(micro_batch_indices, num_microbatches):
        before = len(new_indices)
        for micro_batch in step:
            current: list[int] = []
            current_tokens = 0
            for index in micro_batch:
                if current and current_tokens + lengths[index] > max_tokens:
                    new_indices.append(current)
                    current, current_tokens = [], 0
                current.append(index)
                current_tokens += lengths[index]
            new_indices.append(current)
        new_counts.append(len(new_indices) - before)
    return new_indices, new_counts


def _balanced_halves(micro_batch: list[int], lengths: list[int]) -> tuple[list[int], list[int]]:
    """The contiguous split of a micro-batch (>= 2 samples) whose larger half has the fewest tokens."""
    total = sum(lengths[i] for i in micro_batch)
    best_cut, best_larger, prefix = 1, None, 0
    for cut in range(1, len(micro_batch)):
        prefix += lengths[micro_batch[cut - 1]]
        larger = max(prefix, total - prefix)
        if best_larger is None or larger < best_larger:
            best_cut, best_larger = cut, larger
    return micro_batch[:best_cut], micro_batch[best_cut:]


def pad_to_counts(
    micro_batch_indices: list[list[int]],
    num_microbatches: list[int],
    lengths: list[int],
    target_counts: list[int],
) -> TeacherSchedule:
    """Bring every step to ``target_counts`` micro-batches (each >= the step's current count).

    While a step has fewer: split its multi-sample micro-batch with the most tokens into two balanced contiguous
    halves (each half is within the token budget, since the whole was); when every micro-batch holds one sample, add a
    padding micro-batch repeating the step's shortest sample. ``lengths`` has one entry per real sample.
    """
    if len(target_counts) != len(num_microbatches):
        raise ValueError(f"{len(target_counts)} target counts for {len(num_microbatches)} training steps")
    num_samples = len(lengths)
    indices: list[list[int]] = []
    padding_sources: list[int] = []
    for step, target in zip(_steps(micro_batch_indices, num_microbatches), target_counts, strict=True):
        if not step or target < len(step):
            raise ValueError(f"target count {target} for a step of {len(step)} micro-batches (needs 1 <= count <= target)")
        while len(step) < target:
            splittable = [i for i, mb in enumerate(step) if len(mb) > 1]
            if splittable:
                largest = max(splittable, key=lambda i: sum(lengths[j] for j in step[i]))
                step[largest : largest + 1] = _balanced_halves(step[largest], lengths)
            else:
                shortest = min((mb[0] for mb in step if mb[0] < num_samples), key=lambda i: lengths[i])
                step.append([num_samples + len(padding_sources)])
                padding_sources.append(shortest)
        indices.extend(step)
    return TeacherSchedule(indices, list(target_counts), padding_sources)
