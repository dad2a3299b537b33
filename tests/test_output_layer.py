"""The capture of the teacher's final hidden states and output weight: which module, which call, which tensors.

The real megatron-core model goes through slime's forward_only in tests/test_megatron_hooks.py; here, the rules on
small stand-in modules: the wrappers Megatron puts around a GPTModel, pipeline stages without an output layer, the
multi-token-prediction calls, sequence-parallel shards (with two gloo ranks) and the errors.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime_self_distill.trainer.output_layer import OutputLayerCapture, gather_sequence_parallel, logits_module
from tests.slime_cpu_harness import free_port, init_gloo


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

    def forward(self, hidden):  # [s, 1, H] -> [1, s, V], MTP heads first, as GPTModel._postprocess
        weight = self.embedding if self.tied else None
        for head in range(self.mtp_heads):
            self.output_layer(hidden + head + 1, weight=weight)
        return self.output_layer(hidden, weight=weight)[0].transpose(0, 1)


class Wrapper(torch.nn.Module):  # DDP / Float16Module: the model under .module
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_the_logits_module_is_found_under_megatrons_wrappers_on_the_last_stage_only():
    model = Model()
    assert logits_module([Wrapper(Wrapper(model))]) is model
    first_stage = Model(post_process=False)
    assert logits_module([Wrapper(first_stage)]) is None  # a pipeline stage without an output layer
    # virtual pipeline: the chunks of the last stage, the logits in the last one
    assert logits_module([Wrapper(Model(post_process=False)), Wrapper(model)]) is model


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mtp_heads", [0, 2])
def test_the_main_heads_input_and_weight_are_captured_after_the_mtp_heads(tied, mtp_heads):
    model = Model(tied=tied, mtp_heads=mtp_heads)
    hidden = torch.randn(5, 1, 4)
    with OutputLayerCapture([Wrapper(model)]) as capture:
        logits = model(hidden)
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
