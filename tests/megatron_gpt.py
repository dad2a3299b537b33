"""A tiny causal LM laid out like megatron-core's ``GPTModel``, whose output layer is megatron-core's real
``tensor_parallel.ColumnParallelLinear``, for CPU tests with gloo process groups.

``MegatronTinyGPT`` takes the forward call slime's ``forward_only`` / ``train_one_step`` make and returns, like
``tests.slime_cpu_harness.TinyCausalLM``, this rank's logits ``[1, T_local, V/TP]`` of slime's packed THD batch
(context-parallel zigzag chunks included). The mixing is TinyCausalLM's, so that layout mistakes change numbers:

    h_t = RMSNorm(tanh(E[x_t] + mean_{s<=t} C[x_s])),  logits_t = h_t W^T   (W = E when tied)

Built as GPTModel is: ``embedding.word_embeddings`` is megatron-core's ``VocabParallelEmbedding`` (its CPU
initialization path works as is), ``decoder`` holds the context table C and ``decoder.final_layernorm``, and
``output_layer`` is a ``ColumnParallelLinear(H, V, bias=False, gather_output=False,
skip_weight_param_allocation=tied)`` called as ``GPTModel._postprocess`` calls it: once per MTP head first, then the
main head, with ``weight=shared_embedding_or_output_weight()`` when the weights are tied. Under sequence parallelism
the decoder returns this TP rank's slice ``[s/TP, 1, H]`` of the final hidden states (megatron-core's
``scatter_to_sequence_parallel_region``, after the final norm) and the output layer all-gathers it again; the
layer's backward reduce-scatters the hidden-state gradient and the split's backward all-gathers it, so every
parameter gets its whole gradient on every TP rank (no finalize_model_grads needed: the norm runs on the whole
sequence, unlike a real SP decoder's, whose norm grads Megatron all-reduces over TP).

Every rank builds the full weights from ``seed``; megatron-core's own ``_initialize_affine_weight_cpu`` (through the
``init_method`` given to the embedding and the output layer) copies this TP rank's rows into the parameters. The full
weights are kept as plain attributes (outside ``parameters()`` and ``state_dict()``) for the brute-force
``sequence_logits``; ``refresh_full_weights`` re-gathers them after the parameters changed.

CPU workarounds (``install_cpu_workarounds``, run by the constructor), needed under sequence parallelism only:
megatron-core allocates the sequence-parallel communication buffers with ``device=torch.cuda.current_device()``
(``ColumnParallelLinear``'s backward, ``mappings._gather_along_first_dim``...) and through
``get_global_memory_buffer()`` (its forward all-gather), both of which raise on a CPU-only torch. The workarounds give
the modules ``megatron.core.tensor_parallel.layers`` and ``.mappings`` (and only them) a ``torch`` whose
``cuda.current_device()`` is the CPU, and a CPU memory buffer in place of ``get_global_memory_buffer``. gloo itself
runs ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` (torch 2.13), so the collectives are megatron's own.
The workarounds last for the process; on a machine with a GPU they would move those buffers to the CPU too, which is
what this CPU model needs.
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.distributed as dist

RMS_NORM_EPS = 1e-5


# ---------------------------------------------------------------------- CPU workarounds for megatron-core
class _CudaOnCpu:
    """``torch.cuda`` whose ``current_device()`` is the CPU; everything else is torch.cuda's."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")


class _TorchOnCpu:
    """The ``torch`` module, but with ``_CudaOnCpu`` as ``torch.cuda``."""

    cuda = _CudaOnCpu()

    def __getattr__(self, name):
        return getattr(torch, name)


class CpuMemoryBuffer:
    """megatron-core's ``GlobalMemoryBuffer`` contract on the CPU: one flat buffer per (name, dtype), grown when too
    small, handed out as views (so that, as on a GPU, consecutive users of a name share the memory)."""

    def __init__(self):
        self.buffer = {}

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        required = functools.reduce(operator.mul, tensor_shape, 1)
        key = (name, dtype)
        if key not in self.buffer or self.buffer[key].numel() < required:
            self.buffer[key] = torch.empty(required, dtype=dtype)
        return self.buffer[key][:required].view(*tensor_shape)


_CPU_MEMORY_BUFFER = CpuMemoryBuffer()


def install_cpu_workarounds() -> None:
    """Idempotent; see the module docstring."""
    from megatron.core.tensor_parallel import layers, mappings

    for module in (layers, mappings):
        if not isinstance(module.torch, _TorchOnCpu):
            module.torch = _TorchOnCpu()
        module.get_global_memory_buffer = lambda: _CPU_MEMORY_BUFFER


# ---------------------------------------------------------------------- the model
class _WordEmbedding(torch.nn.Module):
    """GPTModel's ``embedding`` (a ``LanguageModelEmbedding``) reduced to its ``word_embeddings``."""

    def __init__(self, word_embeddings):
        super().__init__()
        self.word_embeddings = word_embeddings

    def forward(self, input_ids):  # [b, s] -> [s, b, H], as LanguageModelEmbedding returns it
        return self.word_embeddings(input_ids).transpose(0, 1).contiguous()


class _PrefixMixingDecoder(torch.nn.Module):
    """Stands in for the transformer block: position t mixes its word embedding with the mean context vector of its
    whole prefix (C is replicated on every TP rank), then ``final_layernorm``. Returns ``[s, 1, H]``, or this TP
    rank's ``[s/TP, 1, H]`` under sequence parallelism, as TransformerBlock does (split after the final norm here, so
    that the norm weight's gradient is whole on every TP rank without Megatron's TP all-reduce of SP norm grads)."""

    def __init__(self, context: torch.Tensor, norm_weight: torch.Tensor, config):
        super().__init__()
        self.config = config
        self.context = torch.nn.Parameter(context.to(config.params_dtype))
        self.final_layernorm = torch.nn.RMSNorm(len(norm_weight), eps=RMS_NORM_EPS, dtype=config.params_dtype)
        with torch.no_grad():
            self.final_layernorm.weight.copy_(norm_weight)

    def forward(self, embedded, input_ids, cu_seqlens):
        """embedded [s, 1, H] (this rank's tokens), input_ids [s] -> hidden states."""
        from megatron.core import mpu
        from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

        prefix_means = _local_prefix_means(self.context, input_ids, cu_seqlens, mpu.get_context_parallel_world_size(),
                                           mpu.get_context_parallel_rank(), mpu.get_context_parallel_group())
        hidden = self.final_layernorm(torch.tanh(embedded + prefix_means.unsqueeze(1)))
        if self.config.sequence_parallel:  # forward: this rank's slice; backward: all-gather of the slices' grads
            hidden = scatter_to_sequence_parallel_region(hidden, group=mpu.get_tensor_model_parallel_group())
        return hidden


def _local_prefix_means(context, local_ids, cu_seqlens, cp_size, cp_rank, cp_group):
    """mean_{s<=t} C[x_s] for this rank's positions t of the packed stream (zigzag chunks r and 2 cp - 1 - r of each
    segment under context parallelism; the other ranks' tokens are all-gathered, without gradient)."""
    streams = [local_ids]
    if cp_size > 1:
        streams = [torch.empty_like(local_ids) for _ in range(cp_size)]
        dist.all_gather(streams, local_ids.contiguous(), group=cp_group)
    rows, offset = [], 0
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        length = (end - start) // cp_size  # this rank's part of the segment
        half = length // 2 if cp_size > 1 else length
        pieces = [stream[offset : offset + length] for stream in streams]
        sequence = torch.cat([p[:half] for p in pieces] + [p[half:] for p in reversed(pieces)])
        counts = torch.arange(1, len(sequence) + 1, dtype=context.dtype).unsqueeze(1)
        means = context[sequence].cumsum(0) / counts
        first = cp_rank * half
        second = cp_size * half + (cp_size - 1 - cp_rank) * (length - half)
        rows += [means[first : first + half], means[second : second + length - half]]
        offset += length
    if offset < len(local_ids):  # positions after the last segment (slime's cu_seqlens cover all of them)
        rows.append(context.new_zeros(len(local_ids) - offset, context.size(1)))
    return torch.cat(rows)


class MegatronTinyGPT(torch.nn.Module):
    """See the module docstring. Needs ``megatron.core.parallel_state`` initialized (TP and CP sizes are read from
    it); ``vocab_size`` must be divisible by the TP size, and under sequence parallelism the packed length by the TP
    size (slime's ``get_batch`` pads to a multiple of TP x ``data_pad_size_multiplier``).

    ``sequence_parallel`` is ignored at TP 1 (as Megatron-LM's argument validation turns it off);
    ``mtp_heads`` extra output-layer calls precede the main one, their logits discarded; ``dtype`` is the parameter
    dtype (float32, float64 or bfloat16): bf16/fp16 logits are returned as float32, as megatron's ``Float16Module``
    does on the last pipeline stage (slime asserts float32 logits), float64 ones stay float64."""

    def __init__(self, vocab_size: int = 24, hidden: int = 8, seed: int = 0, *, tied: bool = False,
                 sequence_parallel: bool = False, mtp_heads: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        from megatron.core import mpu
        from megatron.core.enums import ModelType
        from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
        from megatron.core.transformer import TransformerConfig

        install_cpu_workarounds()
        tp_size, cp_size = mpu.get_tensor_model_parallel_world_size(), mpu.get_context_parallel_world_size()
        if vocab_size % tp_size:
            raise ValueError(f"vocab_size {vocab_size} is not divisible by the TP size {tp_size}")
        self.config = TransformerConfig(
            num_layers=1, hidden_size=hidden, num_attention_heads=tp_size, tensor_model_parallel_size=tp_size,
            context_parallel_size=cp_size, sequence_parallel=sequence_parallel and tp_size > 1,
            use_cpu_initialization=True, perform_initialization=True, gradient_accumulation_fusion=False,
            params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        )
        self.pre_process = True
        self.post_process = True
        self.mtp_process = False
        self.share_embeddings_and_output_weights = tied
        self.mtp_heads = mtp_heads
        self.model_type = ModelType.encoder_or_decoder
        self.vocab_size = vocab_size
        self.hidden_size = hidden
        self.dtype = dtype
        self.forward_calls = 0
        self.trained: list = []  # the harness's TrainingMicroBatch records

        generator = torch.Generator().manual_seed(seed)

        def draw(*shape, scale=1.0):  # float32 values that the parameter dtype represents exactly
            return (scale * torch.randn(*shape, generator=generator)).to(dtype).float()

        embedding, context, output = draw(vocab_size, hidden), draw(vocab_size, hidden), draw(vocab_size, hidden)
        norm_weight = 1 + draw(hidden, scale=0.25)
        self.embedding = _WordEmbedding(VocabParallelEmbedding(
            vocab_size, hidden, init_method=_copy_into(embedding), reduce_scatter_embeddings=False, config=self.config))
        self.decoder = _PrefixMixingDecoder(context, norm_weight, self.config)
        self.output_layer = ColumnParallelLinear(
            hidden, vocab_size, config=self.config, init_method=_copy_into(output), bias=False, gather_output=False,
            skip_bias_add=False, skip_weight_param_allocation=tied)
        # LanguageModule.setup_embeddings_and_output_layer's attributes (one pipeline stage)
        self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        if tied:
            self.shared_embedding_or_output_weight().zero_out_wgrad = True
        else:
            self.output_layer.weight.is_embedding_or_output_parameter = True
        # plain attributes: no parameters, no state_dict entries
        self._full_embedding = embedding.double()
        self._full_output = embedding.double() if tied else output.double()
        self._check_shards()

    # ------------------------------------------------------------------ GPTModel's API
    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        """As GPTModel's: the embedding weight whenever this stage has the embedding (``pre_process``, here always),
        tied or not; ``output_layer.weight`` only on a post-process stage without it."""
        if self.pre_process or self.mtp_process:
            return self.embedding.word_embeddings.weight
        if self.post_process:
            return self.output_layer.weight
        return None

    def zero_grad_buffer(self) -> None:  # Megatron DDP's method, called by train_one_step
        self.zero_grad()

    def forward(self, input_ids, position_ids=None, attention_mask=None, labels=None, packed_seq_params=None,
                loss_mask=None, mtp_kwargs=None):
        """slime's call: input_ids [1, T_local] of a packed THD batch -> logits [1, T_local, V/TP]. position_ids,
        attention_mask, loss_mask and mtp_kwargs (slime's --enable-mtp-training) are accepted and unused; labels must
        be None (GPTModel would return the loss instead of the logits)."""
        if labels is not None:
            raise NotImplementedError("MegatronTinyGPT returns logits only (slime passes labels=None)")
        local_ids = input_ids[0]
        if packed_seq_params is None:  # one sequence
            from megatron.core import mpu

            cu_seqlens = [0, len(local_ids) * mpu.get_context_parallel_world_size()]
        else:
            cu_seqlens = packed_seq_params.cu_seqlens_q.tolist()
        hidden = self.decoder(self.embedding(input_ids), local_ids, cu_seqlens)  # [s, 1, H] ([s/TP, 1, H] under SP)
        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        for head in range(self.mtp_heads):  # GPTModel runs the MTP heads' output layer first (on the MTP block's
            # hidden states; their logits go into MTP losses, here nowhere)
            self.output_layer(hidden.roll(head + 1, dims=0), weight=output_weight, runtime_gather_output=None)
        logits, _ = self.output_layer(hidden, weight=output_weight, runtime_gather_output=None)
        logits = logits.transpose(0, 1).contiguous()
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # Float16Module's float16_to_fp32 on the last stage
        return logits

    # ------------------------------------------------------------------ brute force
    def full_weights(self, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
        """Unsharded copies: embedding [V, H], context [V, H], norm [H], output [V, H] (the embedding when tied)."""
        return {
            "embedding": self._full_embedding.to(dtype).clone(),
            "context": self.decoder.context.detach().to(dtype).clone(),
            "norm": self.decoder.final_layernorm.weight.detach().to(dtype).clone(),
            "output": self._full_output.to(dtype).clone(),
        }

    def sequence_hidden(self, tokens: torch.Tensor, dtype: torch.dtype = torch.float32,
                        weights: dict | None = None) -> torch.Tensor:
        """Final hidden states [T, H] of ONE unpacked sequence, on the full weights (``weights``: those of
        ``full_weights``, e.g. leaves that require grad; default: this model's)."""
        weights = self.full_weights(dtype) if weights is None else weights
        counts = torch.arange(1, len(tokens) + 1, dtype=dtype).unsqueeze(1)
        mixed = torch.tanh(weights["embedding"][tokens] + weights["context"][tokens].cumsum(0) / counts)
        return torch.nn.functional.rms_norm(mixed, (mixed.size(-1),), weights["norm"], RMS_NORM_EPS)

    def sequence_logits(self, tokens: torch.Tensor, dtype: torch.dtype = torch.float32,
                        weights: dict | None = None) -> torch.Tensor:
        """Logits [T, V] (full vocabulary) of ONE unpacked sequence (the brute-force reference runs it in float64)."""
        weights = self.full_weights(dtype) if weights is None else weights
        return self.sequence_hidden(tokens, dtype, weights) @ weights["output"].t()

    def refresh_full_weights(self) -> None:
        """Re-gathers the full embedding / output weights from the TP shards (after an optimizer step changed them).
        A collective: every rank of the TP group must call it."""
        from megatron.core import mpu

        def gathered(shard):
            shard = shard.detach().double().contiguous()
            if mpu.get_tensor_model_parallel_world_size() == 1:
                return shard.clone()
            shards = [torch.empty_like(shard) for _ in range(mpu.get_tensor_model_parallel_world_size())]
            dist.all_gather(shards, shard, group=mpu.get_tensor_model_parallel_group())
            return torch.cat(shards)

        self._full_embedding = gathered(self.embedding.word_embeddings.weight)
        tied = self.share_embeddings_and_output_weights
        self._full_output = self._full_embedding if tied else gathered(self.output_layer.weight)

    def _check_shards(self) -> None:
        """megatron-core's CPU initialization gave this TP rank rows [rank V/TP, (rank + 1) V/TP) of the full
        weights."""
        from megatron.core import mpu

        shard = self.vocab_size // mpu.get_tensor_model_parallel_world_size()
        rows = slice(mpu.get_tensor_model_parallel_rank() * shard, (mpu.get_tensor_model_parallel_rank() + 1) * shard)
        local = {"embedding": self.embedding.word_embeddings.weight}
        if not self.share_embeddings_and_output_weights:
            local["output"] = self.output_layer.weight
        full = {"embedding": self._full_embedding, "output": self._full_output}
        for name, weight in local.items():
            if weight.dtype != self.dtype or not torch.equal(weight.detach().double(), full[name][rows]):
                raise AssertionError(f"the {name} shard is not rows {rows.start}:{rows.stop} of the full weight")


def _copy_into(full: torch.Tensor):
    """An ``init_method`` for megatron-core's CPU initialization: it fills the master weight [V, H] with ``full``."""

    def init_method(master_weight):
        with torch.no_grad():
            master_weight.copy_(full)

    return init_method
