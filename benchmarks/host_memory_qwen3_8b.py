"""Host memory per node of the README's Qwen3-8B example, as the training actors estimate it at start-up.

    PYTHONPATH=. python benchmarks/host_memory_qwen3_8b.py

Qwen3-8B (36 layers, hidden 4096, FFN 12288, 32 query / 8 key-value heads of 128, vocabulary 151936, untied output
layer) on one node of 8 GPUs, TP 2 (so DP 4), Megatron's layout (fused QKV and gate/up projections, vocabulary padded
to a multiple of 128 x TP), bf16 weights, distributed optimizer, colocated with SGLang (--offload-train, the
default with --colocate), a rollout of 32 prompts x 8 samples with responses up to 8192 tokens.

"teacher store, log-probs": what the teacher store held before the hidden-state store (V/TP fp16 log-probabilities per
response token for full_vocab, K fp32 values + K int64 ids for the top-K; the student's top-K was not possible);
"teacher store, now": what it holds (``host_memory.teacher_store_bytes``: the final hidden state, H bf16 values, or
K fp32 values + K int32 ids for the teacher's own top-K when that is smaller; each TP rank keeps 1/TP of the rows);
then ``host_memory.rank_host_memory`` summed over the node's 8 ranks, by phase, and the node's peak (weight backups
with pinned-allocator rounding, the EMA shadow, the memory saver's optimizer backup or the teacher store, whichever
is larger).
"""

from __future__ import annotations

from argparse import Namespace
from typing import Optional

from slime_self_distill.config import SelfDistillConfig
from slime_self_distill.core.host_memory import (
    ALWAYS,
    GIB,
    WHILE_ASLEEP,
    WHILE_TRAINING,
    NodeHostMemory,
    Parallel,
    TensorInfo,
    rank_host_memory,
    teacher_store_bytes,
)

QWEN3_8B = dict(layers=36, hidden=4096, ffn=12288, heads=32, kv_heads=8, head_dim=128, vocab=151936)
TP, GPUS_PER_NODE, BF16 = 2, 8, 2


def megatron_shard(tp: int, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, head_dim: int,
                   vocab: int) -> list[TensorInfo]:
    """One tensor-parallel rank's parameter tensors of a Qwen3-style GPTModel in Megatron's layout."""
    padded_vocab = -(-vocab // (128 * tp)) * 128 * tp
    tensors = [TensorInfo("embedding.word_embeddings.weight", padded_vocab // tp * hidden, BF16)]
    for layer in range(layers):
        prefix = f"decoder.layers.{layer}."
        tensors += [
            TensorInfo(prefix + "self_attention.linear_qkv.layer_norm_weight", hidden, BF16),
            TensorInfo(prefix + "self_attention.linear_qkv.weight", (heads + 2 * kv_heads) * head_dim // tp * hidden,
                       BF16),
            TensorInfo(prefix + "self_attention.q_layernorm.weight", head_dim, BF16),
            TensorInfo(prefix + "self_attention.k_layernorm.weight", head_dim, BF16),
            TensorInfo(prefix + "self_attention.linear_proj.weight", hidden * heads * head_dim // tp, BF16),
            TensorInfo(prefix + "mlp.linear_fc1.layer_norm_weight", hidden, BF16),
            TensorInfo(prefix + "mlp.linear_fc1.weight", 2 * ffn // tp * hidden, BF16),
            TensorInfo(prefix + "mlp.linear_fc2.weight", hidden * ffn // tp, BF16),
        ]
    tensors += [TensorInfo("decoder.final_layernorm.weight", hidden, BF16),
                TensorInfo("output_layer.weight", padded_vocab // tp * hidden, BF16)]
    return tensors


def example_args() -> Namespace:
    return Namespace(rollout_batch_size=32, n_samples_per_prompt=8, rollout_max_response_len=8192,
                     padded_vocab_size=-(-QWEN3_8B["vocab"] // (128 * TP)) * 128 * TP, hidden_size=QWEN3_8B["hidden"],
                     bf16=True, kl_coef=0.0,
                     use_kl_loss=False, use_opd=False, opd_type=None, keep_old_actor=False,
                     use_distributed_optimizer=True, optimizer_cpu_offload=False, offload_train=True)


def node(config: SelfDistillConfig, args: Namespace) -> NodeHostMemory:
    parallel = Parallel(tp=TP, dp=GPUS_PER_NODE // TP)
    rank = rank_host_memory(args, config, megatron_shard(TP, **QWEN3_8B), parallel)
    return NodeHostMemory("example", [rank] * GPUS_PER_NODE)


CASES = (
    ("sdft.yaml (full_vocab, EMA teacher)", SelfDistillConfig(kl_scope="full_vocab", teacher="ema"), {}),
    ("sdft_topk.yaml (top-64, EMA teacher)", SelfDistillConfig(kl_scope="topk", topk=64, teacher="ema"), {}),
    ("opsd.yaml (full_vocab, frozen teacher)", SelfDistillConfig(kl_scope="full_vocab"),
     dict(use_opd=True, opd_type="megatron")),
    ("sdpo.yaml (student's top-100, EMA teacher)",
     SelfDistillConfig(kl_scope="topk", topk=100, topk_support="student", teacher="ema"), {}),
    ("sd_zero.yaml (teacher's top-64, frozen teacher)", SelfDistillConfig(kl_scope="topk", topk=64),
     dict(use_opd=True, opd_type="megatron")),
    ("sampled_token_reverse_kl.yaml (EMA teacher)", SelfDistillConfig(kl_scope="sampled_token", teacher="ema"), {}),
)


def log_prob_store_bytes(args: Namespace, config: SelfDistillConfig, parallel: Parallel) -> Optional[int]:
    """The store before the hidden-state store, per rank: fp16 V/TP log-probabilities per response token (full_vocab),
    K fp32 values + K int64 ids (the teacher's top-K), nothing (sampled_token); None where it could not be kept (the
    student's top-K)."""
    rows = (-(-args.rollout_batch_size * args.n_samples_per_prompt // parallel.dp)
            * -(-args.rollout_max_response_len // parallel.cp))
    if config.kl_scope == "full_vocab":
        return rows * args.padded_vocab_size // parallel.tp * 2
    if config.kl_scope == "topk":
        return rows * config.topk * 12 if config.topk_support == "teacher" else None
    return 0


def rows() -> list[tuple[str, Optional[float], float, float, float, float, float]]:
    """(recipe, log-prob store (None: impossible), store now, held throughout, while asleep, while training, peak) in
    GiB per node."""
    table = []
    parallel = Parallel(tp=TP, dp=GPUS_PER_NODE // TP)
    for name, config, overrides in CASES:
        args = example_args()
        for key, value in overrides.items():
            setattr(args, key, value)
        estimate = node(config, args)
        before = log_prob_store_bytes(args, config, parallel)
        table.append((name, None if before is None else before * GPUS_PER_NODE / GIB,
                      teacher_store_bytes(args, config, parallel) * GPUS_PER_NODE / GIB,
                      estimate.phase_bytes(ALWAYS) / GIB, estimate.phase_bytes(WHILE_ASLEEP) / GIB,
                      estimate.phase_bytes(WHILE_TRAINING) / GIB, estimate.peak_bytes / GIB))
    return table


def markdown() -> str:
    lines = ["| recipe | teacher store, log-probs | teacher store, now | held throughout | while asleep | "
             "teacher pass to end of training | peak |", "|---|---|---|---|---|---|---|"]
    for name, before, store, always, asleep, training, peak in rows():
        old = "impossible" if before is None else f"{before:.1f} GiB"
        lines.append(f"| {name} | {old} | {store:.1f} GiB | {always:.1f} GiB | {asleep:.1f} GiB | {training:.1f} GiB | "
                     f"{peak:.1f} GiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    shard = megatron_shard(TP, **QWEN3_8B)
    print(f"Qwen3-8B, TP {TP}: {sum(t.numel for t in shard) / 1e9:.3f} B parameters per rank; host memory per node "
          f"of {GPUS_PER_NODE} ranks, 32 prompts x 8 samples x 8192 tokens:")
    print(markdown())
