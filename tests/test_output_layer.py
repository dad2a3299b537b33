"""The capture of the teacher's final hidden states and output weight: which module, which call, which tensors.

The real megatron-core model goes through slime's forward_only in tests/test_megatron_hooks.py; here, the rules on
small stand-in modules: the wrappers Megatron puts around a GPTModel, pipeline stages without an output layer, the
multi-token-prediction calls, sequence-parallel shards (with two gloo ranks) and the errors.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime_self_distill.trainer.output_layer import (
    OutputLayerCapture,
    check_recomputed_logits,
    describe_chunks,
    gather_sequence_parallel,
    logits_module,
)
from tests.slime_cpu_harness import free_port, init_gloo
from tests.slime_support import needs_slime


class OutputLayer(torch.nn.Module):
    """A column-parallel-like linear: ``forward(input_, weight=None)``, own weight optional (tied embeddings)."""

    def __init__(self, vocab: int, hidden: int, own_weight: bool = True, sequence_parallel: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(vocab, hidden)) if own_weight else None
        self.sequence_parallel = sequence_parallel

    def forward(self, input_, weight=None, runtime_gather_output=None):
        return input_ @ (self.weight if weight is None else weight).t(), None


class Model(torch.nn.Module):
    def __init__(self, post_process=True, tied=False, mtp_heads=0, sequence_parallel=False):
        super().__init__()
        self.post_process = post_process
        self.embedding = torch.nn.Parameter(torch.randn(6, 4))
        self.output_layer = OutputLayer(6, 4, own_weight=not tied, sequence_parallel=sequence_parallel) \
            if post_process else None
        self.tied, self.mtp_heads = tied, mtp_heads

    def forward(self, hidden, call="weight_keyword"):  # [s, 1, H] -> [1, s, V], MTP heads first, as GPTModel
        weight = self.embedding if self.tied else None
        for head in range(self.mtp_heads):  # slime's Megatron builds these calls with keywords only
            self.output_layer(input_=hidden + head + 1, weight=weight)
        if call == "keywords":
            return self.output_layer(input_=hidden, weight=weight)[0].transpose(0, 1)
        if call == "positional":
            return self.output_layer(hidden, weight)[0].transpose(0, 1)
        return self.output_layer(hidden, weight=weight)[0].transpose(0, 1)


class Wrapper(torch.nn.Module):  # DDP / Float16Module: the model under .module
    def __init__(self, module):
        super().__init__()
        self.module = module


class VisionLanguage(torch.nn.Module):  # slime_plugins' Qwen3.5-VL: the language model under .language_model
    def __init__(self, language_model):
        super().__init__()
        self.vision = torch.nn.Linear(2, 2)
        self.language_model = language_model


def test_the_logits_module_is_found_under_megatrons_wrappers_on_the_last_stage_only():
    model = Model()
    assert logits_module([Wrapper(Wrapper(model))]) is model
    assert logits_module([Wrapper(Wrapper(VisionLanguage(model)))]) is model
    first_stage = Model(post_process=False)
    assert logits_module([Wrapper(first_stage)]) is None  # a pipeline stage without an output layer
    # virtual pipeline: the chunks of the last stage, the logits in the last one
    assert logits_module([Wrapper(Model(post_process=False)), Wrapper(model)]) is model
    assert logits_module([Wrapper(torch.nn.Linear(2, 2))]) is None
    assert describe_chunks([Wrapper(Wrapper(torch.nn.Linear(2, 2)))]) == "Wrapper > Wrapper > Linear"


@pytest.mark.parametrize("call", ["weight_keyword", "keywords", "positional"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mtp_heads", [0, 2])
def test_the_main_heads_input_and_weight_are_captured_after_the_mtp_heads(tied, mtp_heads, call):
    model = Model(tied=tied, mtp_heads=mtp_heads)
    hidden = torch.randn(5, 1, 4)
    with OutputLayerCapture([Wrapper(model)]) as capture:
        logits = model(hidden, call)
        taken = capture.take(5)
        assert torch.equal(taken, hidden.transpose(0, 1))  # the main head's input, batch-first like the logits
        expected_weight = model.embedding if tied else model.output_layer.weight
        assert capture.weight is expected_weight
        torch.testing.assert_close(taken[0] @ capture.weight.t(), logits[0])
        with pytest.raises(RuntimeError, match="without calling the model's output_layer"):
            capture.take(5)  # each forward pass is taken once
        copy = capture.weight_copy()
        assert torch.equal(copy, expected_weight) and copy.data_ptr() != expected_weight.data_ptr()
    model(hidden)  # the hook is gone after the pass
    assert not model.output_layer._forward_pre_hooks
    with pytest.raises(RuntimeError, match=r"has shape \(5, 1, 4\), expected \[7, 1, H\]"):
        with OutputLayerCapture([model]) as capture:
            model(hidden)
            capture.take(7)


def test_a_stage_without_output_layer_captures_nothing():
    with OutputLayerCapture([Model(post_process=False)]) as capture:
        pass
    assert capture.weight is None and capture.weight_copy() is None


def test_logits_changed_after_the_output_layer_are_caught():
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(12, 16, generator=generator), torch.randn(40, 16, generator=generator)
    logits = hidden @ weight.t()
    check_recomputed_logits(hidden, weight, logits)
    # bf16: the logits as a bf16 output layer rounds them, in another accumulation order
    check_recomputed_logits(hidden.bfloat16(), weight.bfloat16(), (hidden.bfloat16() @ weight.bfloat16().t()).float())
    check_recomputed_logits(hidden[:0], weight, logits[:0])  # no row: nothing to compare
    for changed in (0.5 * logits, 30 * torch.tanh(logits / 30), logits + 1.0):  # MuP scale, soft-cap, a bias
        with pytest.raises(RuntimeError, match="not its output layer's product"):
            check_recomputed_logits(hidden, weight, changed)


@needs_slime
@pytest.mark.parametrize("tied", [False, True])
def test_the_real_gpt_model_in_float16_module_is_found_and_its_logits_recomputed(slime_megatron, monkeypatch, tied):
    """megatron-core's own GPTModel (bf16, in its Float16Module, as slime builds it) on CPU: the capture finds its
    output layer, reads the weight it multiplied by (the embedding's when tied) and the loss's recomputation gives
    its logits. CUDA-only pieces of megatron-core are replaced: the RNG tracker's fork, the causal mask, the global
    memory buffer (tests/megatron_gpt.py)."""
    import contextlib

    from megatron.core import parallel_state
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer import utils as transformer_utils
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from slime_self_distill.core.teacher_logits import TeacherHiddenStates
    from tests.megatron_gpt import CpuMemoryBuffer, install_cpu_workarounds

    install_cpu_workarounds()
    buffer = CpuMemoryBuffer()
    monkeypatch.setattr(parallel_state, "get_global_memory_buffer", lambda: buffer)
    monkeypatch.setattr(megatron_random.get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext())
    causal_mask = lambda length: torch.triu(torch.ones(length, length), diagonal=1).bool()  # noqa: E731
    monkeypatch.setattr(transformer_utils, "get_default_causal_mask", causal_mask)
    monkeypatch.setattr(fused_softmax, "get_default_causal_mask", causal_mask)

    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                               bf16=True, params_dtype=torch.bfloat16, normalization="RMSNorm")
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=64, max_sequence_length=64, share_embeddings_and_output_weights=tied,
                     parallel_output=True)
    wrapped = Float16Module(config, model)
    assert logits_module([wrapped]) is model
    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), OutputLayerCapture([wrapped]) as capture:
        logits = wrapped(input_ids=tokens, position_ids=torch.arange(16).unsqueeze(0), attention_mask=None)
        hidden = capture.take(16)
    assert logits.dtype == torch.float32 and hidden.dtype == torch.bfloat16
    assert capture.weight is (model.embedding.word_embeddings.weight if tied else model.output_layer.weight)
    check_recomputed_logits(hidden[0], capture.weight, logits[0])
    recomputed = TeacherHiddenStates(hidden[0], capture.weight_copy()).logits_into(slice(0, 16), torch.empty(16, 64))
    torch.testing.assert_close(recomputed, logits[0], rtol=0, atol=1e-2)


def _sequence_parallel_worker(rank, port):
    init_gloo(rank, 2, port)
    group = dist.group.WORLD
    full = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 1, 4)
    local = full[rank * 3:(rank + 1) * 3]  # this TP rank's positions of the sequence
    assert torch.equal(gather_sequence_parallel(local, group), full)
    model = Model(sequence_parallel=True)
    with OutputLayerCapture([model], group) as capture:
        model(local)
        assert torch.equal(capture.take(6), full.transpose(0, 1))
    assert gather_sequence_parallel(local, None) is local
    dist.destroy_process_group()


@pytest.mark.distributed
def test_sequence_parallel_shards_are_gathered_in_rank_order():
    mp.spawn(_sequence_parallel_worker, args=(free_port(),), nprocs=2)
