"""The host-memory estimate of the training ranks, per node, and the start-up verdict."""

from argparse import Namespace

import pytest

from slime_self_distill.config import ConfigError, SelfDistillConfig
from slime_self_distill.core.host_memory import (
    ALWAYS,
    GIB,
    WHILE_ASLEEP,
    WHILE_TRAINING,
    NodeHostMemory,
    Parallel,
    TensorInfo,
    _cgroup_paths,
    cgroup_room_bytes,
    check_nodes,
    cp_rank_response_rows,
    group_by_node,
    meminfo_available_bytes,
    pinned_bytes,
    rank_host_memory,
    teacher_store_bytes,
)

# Three bf16 tensors of a rank's shard: 3000, 1000 and 40 elements (6000, 2000 and 80 bytes).
TENSORS = [TensorInfo("decoder.layers.0.mlp.weight", 3000, 2), TensorInfo("decoder.layers.0.bias", 1000, 2),
           TensorInfo("decoder.layers.0.mlp.experts.linear_fc1.weight0", 40, 2)]
ONE_PINNED_TAG = 8192 + 2048 + 128  # each tensor rounded up to a power of two by PyTorch's caching host allocator


def run_args(**overrides):
    values = dict(rollout_batch_size=16, n_samples_per_prompt=4, rollout_max_response_len=1000, padded_vocab_size=500,
                  hidden_size=4096, bf16=True,
                  kl_coef=0.0, use_kl_loss=False, use_opd=False, opd_type=None, keep_old_actor=False,
                  update_weights_interval=1, use_distributed_optimizer=False, optimizer_cpu_offload=False,
                  optimizer_offload_fraction=1.0, offload_train=False)
    values.update(overrides)
    return Namespace(**values)


def items(estimate):
    return {(item.what, item.phase): item.nbytes for item in estimate.items}


def test_pinned_blocks_round_up_to_a_power_of_two():
    assert [pinned_bytes(n) for n in (0, 1, 2, 3, 4096, 4097, 6000)] == [0, 1, 2, 4, 4096, 8192, 8192]


@pytest.mark.parametrize("overrides, config, tags", [
    (dict(), SelfDistillConfig(teacher="live", kl_scope="sampled_token"), ["actor"]),
    (dict(use_opd=True, opd_type="megatron"), SelfDistillConfig(kl_scope="sampled_token"), ["actor", "teacher"]),
    (dict(kl_coef=0.1), SelfDistillConfig(teacher="live", kl_scope="sampled_token"), ["actor", "ref"]),
    (dict(use_kl_loss=True, keep_old_actor=True), SelfDistillConfig(teacher="ema", kl_scope="sampled_token"),
     ["actor", "ref", "teacher", "old_actor", "rollout_actor"]),
    (dict(keep_old_actor=True, update_weights_interval=2), SelfDistillConfig(teacher="live", kl_scope="sampled_token"),
     ["actor", "old_actor"]),
])
def test_every_weight_backup_slime_keeps_is_counted_with_its_rounding(overrides, config, tags):
    estimate = rank_host_memory(run_args(**overrides), config, TENSORS, Parallel())
    expected = {(f"slime's pinned {tag!r} weight backup", ALWAYS): ONE_PINNED_TAG for tag in tags}
    if config.teacher == "ema":
        expected["EMA teacher fp32 shadow", ALWAYS] = 4 * 4040  # pageable: exact
    assert items(estimate) == expected


def test_optimizer_cpu_offload_and_the_memory_saver_backup_use_the_optimizer_shard():
    args = run_args(use_distributed_optimizer=True, optimizer_cpu_offload=True, optimizer_offload_fraction=0.25,
                    offload_train=True)
    parallel = Parallel(dp=4, cp=2, expert_dp=5)
    # dense tensors split over DP x CP = 8 ranks, the expert tensor over the 5 expert data-parallel ranks
    shard = 3000 // 8 + 1000 // 8 + 40 // 5
    estimate = items(rank_host_memory(args, SelfDistillConfig(teacher="live", kl_scope="sampled_token"), TENSORS,
                                      parallel))
    assert estimate["--optimizer-cpu-offload gradients + Adam moments", ALWAYS] == int(0.25 * shard) * 12
    assert estimate["torch_memory_saver backup of the GPU optimizer state", WHILE_ASLEEP] == int(0.75 * shard) * 12
    without_distributed = items(rank_host_memory(run_args(offload_train=True), SelfDistillConfig(
        teacher="live", kl_scope="sampled_token"), TENSORS, parallel))
    assert without_distributed["torch_memory_saver backup of the GPU optimizer state", WHILE_ASLEEP] == 4040 * 12


def test_teacher_store_of_a_known_configuration():
    # Qwen3-8B (H 4096, bf16, padded vocabulary 151936), TP 2, 8 GPUs: 512 samples / DP 4 = 128 per rank x 4096 rows,
    # of which each TP rank keeps its block of 4096 / 2
    args = run_args(rollout_batch_size=64, n_samples_per_prompt=8, rollout_max_response_len=4096,
                    padded_vocab_size=151936)
    parallel = Parallel(tp=2, dp=4)
    rows = 128 * 2048
    # the final hidden state, H values in bf16, whatever the vocabulary (the old store: 151936 / 2 x 2 bytes, all rows)
    assert teacher_store_bytes(args, SelfDistillConfig(kl_scope="full_vocab"), parallel) == rows * 4096 * 2
    for support in ("student", "union"):
        assert teacher_store_bytes(args, SelfDistillConfig(kl_scope="topk", topk_support=support), parallel) == \
            rows * 4096 * 2
    # the teacher's own top-K: K fp32 values + K int32 ids per row, 16x smaller than a hidden state at K 64
    assert teacher_store_bytes(args, SelfDistillConfig(kl_scope="topk", topk=64), parallel) == rows * 64 * 8
    assert teacher_store_bytes(args, SelfDistillConfig(kl_scope="topk", topk=2000), parallel) == rows * 4096 * 2
    assert teacher_store_bytes(args, SelfDistillConfig(kl_scope="sampled_token"), parallel) == 0
    # a float32 model keeps 4 bytes per hidden value
    float32_model = run_args(rollout_batch_size=64, n_samples_per_prompt=8, rollout_max_response_len=4096, bf16=False)
    assert teacher_store_bytes(float32_model, SelfDistillConfig(kl_scope="full_vocab"), parallel) == rows * 4096 * 4
    # context parallelism: a CP rank holds two of 2 x CP chunks of the sequence, so at most 2 x ceil((2048 + 4096) / 6)
    # = 2048 response rows of a sample, then TP its block (1024); without a prompt bound the whole response may sit
    # in one rank's chunks; TP 1 keeps every row; only the last pipeline stage keeps a store
    bounded = run_args(rollout_batch_size=64, n_samples_per_prompt=8, rollout_max_response_len=4096,
                       rollout_max_prompt_len=2048)
    assert teacher_store_bytes(bounded, SelfDistillConfig(kl_scope="full_vocab"),
                               Parallel(tp=2, dp=4, cp=3)) == 128 * 1024 * 4096 * 2
    assert teacher_store_bytes(args, SelfDistillConfig(kl_scope="full_vocab"),
                               Parallel(tp=2, dp=4, cp=3)) == 128 * 2048 * 4096 * 2
    assert teacher_store_bytes(args, SelfDistillConfig(kl_scope="full_vocab"), Parallel(tp=1, dp=4)) == \
        128 * 4096 * 4096 * 2
    assert teacher_store_bytes(args, SelfDistillConfig(kl_scope="full_vocab"),
                               Parallel(tp=2, dp=4, last_pipeline_stage=False)) == 0
    with pytest.raises(ConfigError, match="--hidden-size"):
        teacher_store_bytes(run_args(hidden_size=None), SelfDistillConfig(kl_scope="full_vocab"), parallel)


def test_the_node_peak_adds_the_larger_phase_to_what_is_held_throughout():
    config = SelfDistillConfig(teacher="ema", kl_scope="topk")
    args = run_args(offload_train=True)
    rank = rank_host_memory(args, config, TENSORS, Parallel(dp=2))
    always, asleep, training = (rank.phase_bytes(p) for p in (ALWAYS, WHILE_ASLEEP, WHILE_TRAINING))
    assert always == ONE_PINNED_TAG * 2 + 4 * 4040 and asleep == 4040 * 12 and training == 32 * 1000 * 64 * 8
    nodes = group_by_node([("a", rank, 100), ("b", rank, 50), ("a", rank, 120)])
    assert [(n.host, len(n.ranks), n.available_bytes) for n in nodes] == [("a", 2, 120), ("b", 1, 50)]
    assert nodes[0].peak_bytes == 2 * (always + max(asleep, training))


def test_a_node_over_its_budget_is_refused_with_its_numbers_and_the_alternatives():
    config = SelfDistillConfig(teacher="ema", kl_scope="full_vocab")
    args = run_args(rollout_batch_size=64, n_samples_per_prompt=8, rollout_max_response_len=4096,
                    padded_vocab_size=151936)
    parallel = Parallel(tp=2, dp=4)
    rank = rank_host_memory(args, config, TENSORS, parallel)
    node = NodeHostMemory("gpu-node-7", [rank] * 8, available_bytes=15 * GIB)
    with pytest.raises(ConfigError) as error:
        check_nodes([node, NodeHostMemory("roomy", [rank], available_bytes=10_000 * GIB)], args, config, parallel)
    message = str(error.value)
    assert "node gpu-node-7 (8 training ranks): peak about 16.0 GiB" in message and "roomy" not in message
    assert "16.0 GiB  teacher hidden-state store (full_vocab) (teacher pass to end of training)" in message
    assert "budget 13.5 GiB (90% of 15.0 GiB available at start-up)" in message
    assert ("--self-distill-kl-scope topk --self-distill-topk-support teacher --self-distill-topk 64 (a teacher store "
            "of about 128.0 MiB per rank instead of 2.0 GiB, but the teacher's support only)") in message
    assert "--self-distill-teacher frozen or live" in message
    check_nodes([node], args, SelfDistillConfig(teacher="ema", kl_scope="full_vocab", host_memory_budget_gb=20.0),
                parallel)
    with pytest.raises(ConfigError, match=r"budget 10.0 GiB \(--self-distill-host-memory-budget-gb 10.0\)"):
        check_nodes([node], args, SelfDistillConfig(teacher="ema", kl_scope="full_vocab",
                                                    host_memory_budget_gb=10.0), parallel)


def test_available_memory_readings():
    assert meminfo_available_bytes("MemTotal: 100 kB\nMemAvailable:   2048 kB\n") == 2048 * 1024
    assert meminfo_available_bytes("MemTotal: 100 kB\n") is None
    assert cgroup_room_bytes("max\n", "123\n") is None  # cgroup v2 without a limit
    assert cgroup_room_bytes(str(1 << 62), "123") is None  # cgroup v1's "no limit"
    assert cgroup_room_bytes("1000\n", "700\n") == 300
    assert cgroup_room_bytes("1000", "700", "anon 500\ninactive_file 200\nactive_file 5\n") == 500  # cache reclaims
    assert cgroup_room_bytes("1000", "1500", "total_inactive_file 100\n") == 0
    v2 = _cgroup_paths("0::/kubepods/pod1/ctr\n")
    assert v2[0] == ("/sys/fs/cgroup/kubepods/pod1/ctr/memory.max", "/sys/fs/cgroup/kubepods/pod1/ctr/memory.current",
                     "/sys/fs/cgroup/kubepods/pod1/ctr/memory.stat")
    assert v2[1][0] == "/sys/fs/cgroup/memory.max"
    v1 = _cgroup_paths("12:cpu,cpuacct:/x\n7:memory:/docker/abc\n")
    assert v1[0][0] == "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes"


def test_the_cp_bound_holds_for_every_sequence_slime_can_split():
    """Brute force over slime's zigzag layout (teacher_outputs.cp_response_rows, checked against slime's own
    slice_log_prob_with_cp): no CP rank ever holds more response rows than the bound."""
    from slime_self_distill.trainer.teacher_outputs import cp_response_rows

    for max_prompt, max_response in ((5, 9), (1, 20), (30, 7)):
        args = run_args(rollout_max_prompt_len=max_prompt, rollout_max_response_len=max_response)
        for cp in (1, 2, 3, 4):
            bound = cp_rank_response_rows(args, cp)
            worst = max(sum(end - start for start, end in cp_response_rows(prompt + response, response, rank, cp))
                        for prompt in range(1, max_prompt + 1) for response in range(1, max_response + 1)
                        for rank in range(cp))
            assert worst <= bound, (max_prompt, max_response, cp)
            assert worst >= bound - 2 * cp, (max_prompt, max_response, cp)  # and not far above it
