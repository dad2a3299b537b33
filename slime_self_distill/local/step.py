"""One rollout's teacher pass and one optimizer step of the single-process trainer, on a Hugging Face causal LM.

The train data is the converter's (``custom_convert.with_teacher_views``: tokens, response lengths, restricted loss
masks, ``rollout_mask_sums``, one ``TeacherView`` per sample, the sampler's log-probabilities), so the teacher
sequences are the ones slime's teacher pass reads (``megatron_hooks.build_teacher_rollout_data``). The teacher pass
keeps what slime's keeps (``trainer.teacher_outputs.compute_teacher_outputs``: the sampled token's log-probability,
plus the teacher's top-K or its final hidden states, whichever is the smaller exact signal), computed once per
rollout with the teacher's weights of that moment, as slime computes it before training on the rollout. The loss is
slime's custom loss per sample (``custom_loss.sample_rows`` and ``per_token_distillation``), reduced as slime's
``loss_function`` and Megatron's schedule reduce it:

* per-sample mean (default): ``sum_i sum_t term * mask / max(rollout_mask_sum_i, 1) / samples in the step`` (slime
  divides by the step's rollouts: the same here, where every sample is a rollout of its own);
* ``--calculate-per-token-loss``: ``sum_i sum_t term * mask / sum_i max(mask_i.sum(), 1)`` over the step.

A model is called as ``model(input_ids=[B, T], attention_mask=[B, T])`` and returns ``.logits`` ``[B, T, V]``;
batches are right-padded, so every real position sees exactly its own prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from slime_self_distill.config import SelfDistillConfig
from slime_self_distill.custom_loss import per_token_distillation, sample_rows
from slime_self_distill.megatron_hooks import build_teacher_rollout_data
from slime_self_distill.teacher_view import PAYLOAD_KEY, TEACHER_HIDDEN_STATES_KEY
from slime_self_distill.trainer.teacher_outputs import TeacherOutputSpec, compute_teacher_outputs

# The model's own logits and its output layer applied to the captured input may differ by this much (relative to
# the logits' scale) before the teacher is refused: a model that soft-caps or scales its logits after the layer.
OUTPUT_LAYER_CHECK_RTOL = 1e-3


@dataclass(frozen=True)
class StepSettings:
    """slime's flags that shape one optimizer step."""

    rollout_temperature: float  # --rollout-temperature: the student's logits are divided by it, as slime does
    calculate_per_token_loss: bool  # --calculate-per-token-loss
    micro_batch_size: int  # --micro-batch-size: samples per forward/backward (gradient accumulation)
    clip_grad: float  # --clip-grad: the gradients' global norm is clipped to it (0: no clipping)


@dataclass
class TeacherPass:
    """The teacher pass of one rollout: per sample, its outputs keyed like slime's batch keys; the teacher's output
    layer when the hidden states are kept (the loss recomputes the teacher's logits from them)."""

    outputs: list  # one dict per sample
    output_weight: Optional[torch.Tensor]


def right_padded(sequences: Sequence[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, T]`` of right-padded sequences (pad id 0: never read)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        attention_mask[row, :len(sequence)] = 1
    return input_ids.to(device), attention_mask.to(device)


def response_row_slice(total_length: int, response_length: int) -> slice:
    """The positions whose logits predict the response tokens (slime's ``get_responses``)."""
    return slice(total_length - response_length - 1, total_length - 1)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def as_token_tensors(train_data: dict) -> dict:
    """The train data with its token lists as int64 tensors, as slime's trainer holds them."""
    return {**train_data, "tokens": [torch.as_tensor(t, dtype=torch.long) for t in train_data["tokens"]]}


class OutputLayerInput:
    """Captures the input of the model's output layer (``get_output_embeddings()``) during a forward pass."""

    def __init__(self, model: torch.nn.Module):
        self.layer = model.get_output_embeddings()
        if self.layer is None or not isinstance(getattr(self.layer, "weight", None), torch.Tensor):
            raise ValueError(
                f"{type(model).__name__} has no output layer with a weight (get_output_embeddings()); the hidden-state "
                "teacher store needs it: use a top-K or sampled-token recipe"
            )
        self.captured: Optional[torch.Tensor] = None

    def __enter__(self) -> "OutputLayerInput":
        self._handle = self.layer.register_forward_pre_hook(self._keep)
        return self

    def _keep(self, module, inputs) -> None:
        self.captured = inputs[0]

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def check_logits_are_the_output_layer(logits: torch.Tensor, hidden: torch.Tensor, layer: torch.nn.Module) -> None:
    """The hidden-state store recomputes the teacher's logits as ``hidden @ W^T``: refuse a model whose logits are
    something else (an output bias, soft-capping, scaling)."""
    if getattr(layer, "bias", None) is not None:
        raise ValueError("the teacher's output layer has a bias, which the hidden-state teacher store does not keep; "
                         "use a top-K recipe with the teacher's support or a sampled-token recipe")
    recomputed = hidden.float() @ layer.weight.float().T
    scale = float(logits.float().abs().max()) or 1.0
    error = float((recomputed - logits.float()).abs().max())
    if error > OUTPUT_LAYER_CHECK_RTOL * scale:
        raise ValueError(
            f"the teacher's logits differ from its output layer applied to the layer's input by {error:.3g} (logits up "
            f"to {scale:.3g}): the model transforms its logits after the output layer (soft-capping or scaling), which "
            "the hidden-state teacher store does not reproduce; use a top-K recipe with the teacher's support or a "
            "sampled-token recipe"
        )


@torch.no_grad()
def teacher_pass(teacher: torch.nn.Module, train_data: dict, spec: TeacherOutputSpec,
                 micro_batch_size: int) -> TeacherPass:
    """The teacher's outputs at every sample's response rows, read from its teacher sequence (a sample without a
    teacher reads its own tokens: a placeholder its loss weight 0 leaves out, as in slime)."""
    data = as_token_tensors(train_data)
    sequences = build_teacher_rollout_data(data)["tokens"]
    device = model_device(teacher)
    keeps_hidden = spec.signal == "hidden"
    outputs, output_weight = [], None
    for start in range(0, len(sequences), micro_batch_size):
        batch = sequences[start:start + micro_batch_size]
        input_ids, attention_mask = right_padded(batch, device)
        if keeps_hidden:
            with OutputLayerInput(teacher) as capture:
                logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
            layer = capture.layer
            if output_weight is None:
                output_weight = layer.weight.detach().clone()
                check_logits_are_the_output_layer(logits[0, :len(batch[0])], capture.captured[0, :len(batch[0])],
                                                  layer)
        else:
            logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        for row, sequence in enumerate(batch):
            response_length = data["response_lengths"][start + row]
            rows = response_row_slice(len(sequence), response_length)
            hidden = capture.captured[row, rows] if keeps_hidden else None
            outputs.append(compute_teacher_outputs(logits[row, rows], sequence[len(sequence) - response_length:]
                                                   .to(device), spec, hidden_states=hidden))
    return TeacherPass(outputs, output_weight)


def step_normaliser(train_data: dict, calculate_per_token_loss: bool) -> tuple[list, float]:
    """(per-sample denominators, the step's divisor): slime's ``rollout_mask_sums`` (each at least 1) and the number
    of samples; or, per token, ones and the sum over samples of ``max(mask.sum(), 1)`` (slime's ``num_tokens``)."""
    masks = train_data["loss_masks"]
    if calculate_per_token_loss:
        return [1.0] * len(masks), float(sum(max(int(sum(mask)), 1) for mask in masks))
    return [max(float(total), 1.0) for total in train_data["rollout_mask_sums"]], float(len(masks))


def optimizer_step(student: torch.nn.Module, train_data: dict, teacher: TeacherPass, config: SelfDistillConfig,
                   spec: TeacherOutputSpec, settings: StepSettings, optimizer: torch.optim.Optimizer) -> dict:
    """One optimizer step on all the samples of ``train_data`` (slime's step: its ``--global-batch-size`` samples),
    ``settings.micro_batch_size`` samples per forward/backward. Returns the step's loss, metrics (reduced like the
    loss) and the gradient norm before clipping."""
    data = as_token_tensors(train_data)
    device = model_device(student)
    denominators, divisor = step_normaliser(data, settings.calculate_per_token_loss)
    views = data[PAYLOAD_KEY]
    rollout_log_probs = data.get("rollout_log_probs")
    optimizer.zero_grad(set_to_none=True)
    totals: dict = {}
    for start in range(0, len(views), settings.micro_batch_size):
        indices = range(start, min(start + settings.micro_batch_size, len(views)))
        input_ids, attention_mask = right_padded([data["tokens"][i] for i in indices], device)
        logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
        samples, scales = [], []
        for row, i in enumerate(indices):
            tokens, response_length = data["tokens"][i], data["response_lengths"][i]
            rows = logits[row, response_row_slice(len(tokens), response_length)].float()
            if settings.rollout_temperature != 1.0:
                rows = rows / settings.rollout_temperature
            outputs = {key: value.to(device) for key, value in teacher.outputs[i].items()}
            valid = torch.as_tensor(data["loss_masks"][i], device=device).bool()
            sampler = None if rollout_log_probs is None else torch.as_tensor(rollout_log_probs[i], device=device)
            samples.append(sample_rows(
                rows, tokens[len(tokens) - response_length:].to(device), valid, float(views[i].loss_weight), outputs,
                spec, None if TEACHER_HIDDEN_STATES_KEY not in outputs else teacher.output_weight.to(device), sampler))
            scales.append(valid.to(rows.dtype) / (denominators[i] * divisor))
        per_token = per_token_distillation(samples, config)
        scale = torch.cat(scales) if scales else torch.zeros(0, device=device)
        loss = (per_token.terms * scale).sum() + 0.0 * logits.sum()
        loss.backward()
        totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
        for name, value in per_token.metrics.items():
            totals[name] = totals.get(name, 0.0) + float((value.detach() * scale).sum())
    parameters = [p for p in student.parameters() if p.grad is not None]
    max_norm = settings.clip_grad if settings.clip_grad > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm) if parameters else torch.zeros(())
    optimizer.step()
    return {**totals, "grad_norm": float(grad_norm)}


def train_step(student: torch.nn.Module, teacher: torch.nn.Module, train_data: dict, config: SelfDistillConfig,
               settings: StepSettings, optimizer: torch.optim.Optimizer, hidden_size: Optional[int] = None) -> dict:
    """A rollout of one step: the teacher pass, then the optimizer step (the parity oracle's unit)."""
    spec = teacher_output_spec(student, config, settings.rollout_temperature, hidden_size)
    return optimizer_step(student, train_data, teacher_pass(teacher, train_data, spec, settings.micro_batch_size),
                          config, spec, settings, optimizer)


def teacher_output_spec(model: torch.nn.Module, config: SelfDistillConfig, temperature: float,
                        hidden_size: Optional[int] = None) -> TeacherOutputSpec:
    """slime's choice of what the teacher pass keeps, from the model's hidden size and dtype."""
    layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(layer, "weight", None)
    if hidden_size is None:
        hidden_size = int(weight.shape[1]) if isinstance(weight, torch.Tensor) else 0
    element_size = weight.element_size() if isinstance(weight, torch.Tensor) else 4
    return TeacherOutputSpec.from_config(config, temperature, hidden_size, element_size)

