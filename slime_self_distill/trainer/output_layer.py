"""The teacher's final hidden states and output-layer weights, read off the model during the teacher pass.

No slime import; torch and the model objects slime trains (megatron-core's ``GPTModel`` inside its DDP /
``Float16Module`` wrappers). ``OutputLayerCapture`` puts a forward pre-hook on the ``output_layer`` (megatron-core's
``ColumnParallelLinear``) of the model chunk that computes the logits and records, per forward pass:

* the output layer's input: the final hidden states after the final norm, ``[s, b, H]`` sequence-first; under
  sequence parallelism each TP rank gets ``s / TP`` of the positions, which are gathered here (in the order
  Megatron's own gather uses), so that every TP rank holds the rows of every position, as its logits do;
* the weight the layer multiplies by: the ``weight`` argument when GPTModel passes one (tied embeddings: the word
  embedding's shard), else the layer's own; ``[V/TP, H]``, padded vocabulary included, as the logits.

Multi-token-prediction heads call the same output layer on their own hidden states *before* the main head
(megatron-core's ``GPTModel._postprocess``), so the last call of a forward pass is the main head's; the others are
ignored. Only the last pipeline stage has the layer; elsewhere the capture records nothing.

``check_recomputed_logits`` guards the premise of the store: the logits the model returned are the output layer's
product of its input (a model that rescales or soft-caps them afterwards cannot be recomputed from hidden states).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

# Attributes under which wrappers hold the model: DDP and Float16Module's ``module``, a vision-language model's
# ``language_model`` (slime_plugins' Qwen3.5-VL).
WRAPPED_MODEL_ATTRIBUTES = ("module", "language_model")


def _wrapped(module: Any) -> Optional[Any]:
    """The model a wrapper holds, or None for a module that wraps nothing."""
    return next((getattr(module, name) for name in WRAPPED_MODEL_ATTRIBUTES if getattr(module, name, None) is not None),
                None)


def _unwrapping(chunk: Any) -> Iterator[Any]:
    """The chunk, then what it wraps, and so on (at most a few levels)."""
    module = chunk
    for _ in range(6):
        if module is None:
            return
        yield module
        module = _wrapped(module)


def logits_module(model_chunks: Sequence[Any]) -> Optional[Any]:
    """The model (chunk) that computes the logits on this rank, unwrapped from DDP / Float16Module / a
    vision-language wrapper, or None on a pipeline stage without an output layer."""
    for chunk in reversed(list(model_chunks)):
        module = next((m for m in _unwrapping(chunk) if getattr(m, "output_layer", None) is not None), None)
        if module is not None and getattr(module, "post_process", True):
            return module
    return None


def describe_chunks(model_chunks: Sequence[Any]) -> str:
    """The classes of each chunk and of what it wraps, for an error message: ``DDP > Float16Module > MyModel``."""
    return "; ".join(" > ".join(type(m).__name__ for m in _unwrapping(chunk)) for chunk in model_chunks)


def gather_sequence_parallel(hidden: torch.Tensor, tp_group) -> torch.Tensor:
    """``[s / TP, ...]`` per TP rank -> ``[s, ...]`` on every rank, rank 0's positions first."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return hidden
    parts = [torch.empty_like(hidden) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, hidden.contiguous(), group=tp_group)
    return torch.cat(parts, dim=0)


class OutputLayerCapture:
    """Use as a context manager around the teacher's forward passes; ``take()`` after each forward pass (in slime's
    post-processor) returns that pass's main-head hidden states, ``weight`` the output layer's weight."""

    def __init__(self, model_chunks: Sequence[Any], tp_group=None):
        self.module = logits_module(model_chunks)
        self.tp_group = tp_group
        self.weight: Optional[torch.Tensor] = None
        self._calls: list[tuple[torch.Tensor, Any]] = []  # (input, the TP group to gather it over, or None)
        self._handle = None

    def __enter__(self) -> "OutputLayerCapture":
        if self.module is not None:
            self._handle = self.module.output_layer.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._calls.clear()

    def _record(self, layer, args, kwargs) -> None:
        # ColumnParallelLinear.forward(input_, weight=None, runtime_gather_output=None), called either way
        hidden = args[0] if args else kwargs["input_"]
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if weight is None:
            weight = layer.weight
        if weight is None:
            raise RuntimeError("the output layer was called without a weight and has none of its own")
        self.weight = weight
        gather_group = None
        if getattr(layer, "sequence_parallel", False):  # the group the layer itself gathers its input over
            gather_group = getattr(layer, "tp_group", None) or self.tp_group
        self._calls.append((hidden.detach(), gather_group))

    def take(self, positions: int) -> torch.Tensor:
        """The main head's input of the forward pass just run, ``[1, positions, H]`` (batch-first, like slime's
        logits), sequence-parallel shards gathered."""
        if not self._calls:
            raise RuntimeError(
                "the teacher pass ran a forward without calling the model's output_layer: the hidden-state teacher "
                "store needs megatron-core's GPTModel structure (an output_layer computing the logits)"
            )
        hidden, gather_group = self._calls[-1]
        self._calls.clear()
        if gather_group is not None:
            hidden = gather_sequence_parallel(hidden, gather_group)
        if hidden.dim() != 3 or hidden.size(1) != 1 or hidden.size(0) != positions:
            raise RuntimeError(
                f"the output layer's input has shape {tuple(hidden.shape)}, expected [{positions}, 1, H] (slime's "
                f"packed micro-batch of {positions} positions, sequence-first)"
            )
        return hidden.transpose(0, 1)

    def weight_copy(self) -> Optional[torch.Tensor]:
        """A copy of the output layer's weight as the teacher pass saw it (the model's weights change after it:
        slime restores the student's, and training updates them), or None where nothing was captured."""
        return None if self.weight is None else self.weight.detach().clone()


# Rows compared per forward pass: enough to see any transformation of the logits, too few to cost anything.
CHECKED_ROWS = 8


@torch.no_grad()
def check_recomputed_logits(hidden_rows: torch.Tensor, weight: torch.Tensor, logits_rows: torch.Tensor) -> None:
    """Raise if ``hidden_rows @ weight^T`` (what the loss will recompute) is not ``logits_rows`` (what the model
    returned, raw) up to a few bf16 roundings of the largest logit (the output layer may have computed in bf16, under
    Float16Module or autocast, and in another accumulation order); a few rows."""
    hidden, logits = hidden_rows[:CHECKED_ROWS], logits_rows[:CHECKED_ROWS].float()
    if hidden.numel() == 0:
        return
    recomputed = torch.mm(hidden.to(weight.dtype), weight.t()).float()
    scale = 1.0 + float(logits.abs().max())
    tolerance = 4 * torch.finfo(torch.bfloat16).eps * scale
    difference = float((recomputed - logits).abs().max())
    if not difference <= tolerance:
        raise RuntimeError(
            f"the teacher's logits are not its output layer's product of the hidden states it read (largest "
            f"difference {difference:.4g} on logits up to {scale - 1:.4g}): the model transforms the logits after its "
            "output_layer (e.g. MuP output scaling, logit soft-capping, a custom model provider), which the "
            "hidden-state teacher store cannot reproduce; use --self-distill-kl-scope topk --self-distill-topk-support "
            "teacher (stored from the logits themselves) or --self-distill-kl-scope sampled_token"
        )
