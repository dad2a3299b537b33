"""One optimizer step of the single-process trainer equals one step through slime's real training path.

The same sampled batch (slime ``Sample`` objects, their metadata annotated by the data source's
``annotate_teacher_prompt``, converted once by the plugin's converter) trains the same tiny network once on each side:

* slime: the converter's train data goes through slime's own data path to its one DP rank
  (``RolloutManager._split_train_data_by_dp``: ``build_dp_schedule``'s micro-batches and the tensorization;
  ``process_rollout_data``; the train actor's ``_get_rollout_data``), the teacher pass through the installed hooks
  (``compute_log_prob`` with ``store_prefix="teacher_"``), then ``train_one_step`` with ``--loss-type custom_loss``
  and the plugin's loss; both passes run under megatron-core's own no-pipelining schedule, and
  ``finalize_model_grads`` normalises the accumulated gradient, on ``MegatronTinyGPT``; the optimizer stand-in clips
  the gradients' norm and takes a plain SGD step.
* local: ``local.step.train_step`` on ``HuggingFaceTinyGPT`` (the same network and weights, called as a Hugging Face
  causal LM), with torch's SGD.

SGD, not Adam: Adam's first step is about lr * sign(g), which would hide a wrong gradient scale. Every parameter's
update, the reported loss and the gradient norm must agree within float32 rounding, for the three recipe families
(full vocabulary, top-K, sampled token), with and without --calculate-per-token-loss, over micro-batches of unequal
sizes, with one sample whose row has no teacher prompt and one that slime removed (both weigh 0 in the loss).

Besides the optimizer, only what cannot run in one CPU process is replaced: Ray's object store (objects are passed as
they are), slime's accelerator (the CPU), Megatron-LM's global args, the CUDA allocation of the schedule's token
counter, and the Megatron DDP / GPTModel methods the schedule calls on a model chunk (``ScheduledTinyGPT``).

``test_slime_step_is_sgd_on_the_sdft_objective`` guards slime's side itself against a float64 objective written from
the SDFT recipe's definition.
"""

from __future__ import annotations

import copy
import random
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slime_self_distill import megatron_hooks
from slime_self_distill.config import ARG_PREFIX, SelfDistillConfig
from slime_self_distill.custom_convert import convert_samples_to_train_data
from slime_self_distill.data_source import annotate_teacher_prompt, describe_sample, teacher_prompt_renderer
from slime_self_distill.train import load_custom_config
from tests.megatron_gpt import RMS_NORM_EPS, MegatronTinyGPT
from tests.slime_cpu_harness import make_args, point_slime_at_cpu
from tests.slime_support import requires_slime
from tests.tokenizer_factory import make_tokenizer, save_tokenizer

pytestmark = requires_slime

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOP_K = 5
RECIPES = {  # recipe file, and what the test changes in it
    "full_vocab": ("sdft.yaml", {}),
    "topk": ("sdft_topk.yaml", {"self_distill_topk": TOP_K}),  # K 64 would keep hidden states, as full_vocab does
    "sampled_token": ("sampled_token_reverse_kl.yaml", {}),
}
# The teacher keys that change how the teacher's weights evolve after a step, not the step itself: at step 0 the live,
# frozen and EMA teachers are all the initial weights. slime's side runs a live teacher (the EMA hooks wrap slime's
# model initialisation, which this test does not run).
TEACHER_EVOLUTION_KEYS = ("self_distill_teacher", "self_distill_ema_rate", "self_distill_ema_update_interval")

HIDDEN = 16  # 64 B per hidden state in float32: the top-K recipe's K 5 (40 B) is kept as a stored top-K
TEMPERATURE = 0.8  # not 1, so that a side that forgot to divide the logits by it would differ
# Large, so that the updates read back from the float32 parameters (after - before) keep their digits: each new
# parameter is rounded to its float32 spacing (1.2e-7 at |w| = 1), which at lr 0.5 is 1e-5 of the largest update.
LEARNING_RATE = 10.0
CLIP_GRAD = 1.0  # the recipes' --clip-grad: the sampled-token steps' gradient norms are over it, the others' under
NUM_SAMPLES, MICRO_BATCH_SIZE = 7, 3  # micro-batches of 3, 3 and 1 samples
WITHOUT_TEACHER_PROMPT, REMOVED = 2, 5  # a row without a teacher prompt (in micro-batch 0), a removed sample (1)
RESPONSE_LENGTHS = (6, 9, 5, 7, 8, 4, 10)  # each keeps loss tokens after the SDFT recipes' 3 skipped ones
# float32 against float32 along two code paths (packed THD batch vs right-padded batch): relative to the update's scale
RTOL, ATOL_OF_SCALE = 1e-5, 1e-5

PARAMETERS = (  # MegatronTinyGPT's parameter, its key in MegatronTinyGPT.full_weights(), HuggingFaceTinyGPT's parameter
    ("embedding.word_embeddings.weight", "embedding", "embed_tokens.weight"),
    ("decoder.context", "context", "context"),
    ("decoder.final_layernorm.weight", "norm", "norm.weight"),
    ("output_layer.weight", "output", "lm_head.weight"),
)
STUDENT_PROMPTS = ("What is 12 + 30?", "how many legs does a spider have?", "Solve the problem step by step.",
                   "def add(a, b):", "Photosynthesis converts light energy", "The quick brown fox", "answer question")
DEMONSTRATIONS = ("12 + 30 = 42.", "eight.", "A verified solution is given below.", "return a + b",
                  "into chemical energy in plants.", "jumps over the lazy dog.", "response")


# ---------------------------------------------------------------------- the two models
class ScheduledTinyGPT(MegatronTinyGPT):
    """``MegatronTinyGPT`` with what megatron-core's no-pipelining schedule and ``finalize_model_grads`` call on a
    model chunk, for one rank: GPTModel's ``set_input_tensor`` and ``decoder.layers``, Megatron DDP's
    ``finish_grad_sync`` and ``scale_gradients`` (on the parameters' own ``.grad``: the model has no DDP buffer)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.decoder.layers = torch.nn.ModuleList()  # no transformer layers to tell the current micro-batch

    def set_input_tensor(self, input_tensor) -> None:
        """One pipeline stage: its input is the token batch, never a previous stage's output."""

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        """One data-parallel rank: no gradient to reduce."""

    def scale_gradients(self, scaling) -> None:
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(scaling)


class HuggingFaceTinyGPT(torch.nn.Module):
    """``MegatronTinyGPT``'s network as a Hugging Face causal LM, ``model(input_ids=[B, T], attention_mask=[B, T])``
    -> ``.logits [B, T, V]``: h_t = RMSNorm(tanh(E[x_t] + mean_{s<=t} C[x_s])), logits_t = h_t W^T. Batches are
    right-padded, so a real position's prefix mean covers only its row's real tokens and the attention mask is not
    needed (padding positions are never read)."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        vocab_size, hidden = weights["embedding"].shape
        self.embed_tokens = torch.nn.Embedding(vocab_size, hidden)
        self.context = torch.nn.Parameter(torch.empty(vocab_size, hidden))
        self.norm = torch.nn.RMSNorm(hidden, eps=RMS_NORM_EPS)
        self.lm_head = torch.nn.Linear(hidden, vocab_size, bias=False)
        with torch.no_grad():
            for _, key, name in PARAMETERS:
                self.get_parameter(name).copy_(weights[key])

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        counts = torch.arange(1, input_ids.size(1) + 1, dtype=self.context.dtype).unsqueeze(1)
        prefix_means = self.context[input_ids].cumsum(1) / counts
        hidden = self.norm(torch.tanh(self.embed_tokens(input_ids) + prefix_means))
        return SimpleNamespace(logits=self.lm_head(hidden))


# ---------------------------------------------------------------------- the recipe and the sampled batch
def recipe_settings(scope: str) -> dict:
    """The recipe's ``self_distill_*`` keys, the test's changes, and rows without a teacher prompt kept out of the
    loss (``--self-distill-missing-teacher exclude``)."""
    file_name, changes = RECIPES[scope]
    recipe = load_custom_config(str(CONFIGS / file_name))  # the launcher's reading of --custom-config-path
    settings = {key: value for key, value in recipe.items() if key.startswith(ARG_PREFIX)}
    return {**settings, **changes, "self_distill_missing_teacher": "exclude"}


def step_args(scope: str, per_token: bool, hf_checkpoint: str) -> Namespace:
    """slime's args for the converter, the teacher pass and one training step of the whole batch."""
    settings = {key: value for key, value in recipe_settings(scope).items() if key not in TEACHER_EVOLUTION_KEYS}
    vocab_size = len(make_tokenizer())
    return make_args(
        # the converter (slime's reward post-processing and chat-template flags)
        hf_checkpoint=hf_checkpoint, advantage_estimator="grpo", rewards_normalization=True,
        grpo_std_normalization=True, reward_key=None, custom_reward_post_process_path=None,
        use_rollout_routing_replay=False, apply_chat_template=False, apply_chat_template_kwargs=None,
        rollout_batch_size=NUM_SAMPLES, n_samples_per_prompt=1,
        # slime's data path: one step of every sample, static micro-batches
        global_batch_size=NUM_SAMPLES, micro_batch_size=MICRO_BATCH_SIZE, balance_data=False, balance_by_flops=False,
        # train_one_step and loss_function
        custom_loss_function_path="slime_self_distill.custom_loss.self_distill_loss",
        calculate_per_token_loss=per_token, recompute_loss_function=False,
        custom_megatron_before_train_step_hook_path=None, save_debug_train_data=None, enable_mtp_training=False,
        decoder_seq_length=None, ci_test=False,
        # the model and the sampler
        padded_vocab_size=vocab_size, vocab_size=vocab_size, hidden_size=HIDDEN, rollout_temperature=TEMPERATURE,
        rollout_max_response_len=max(RESPONSE_LENGTHS), clip_grad=CLIP_GRAD, self_distill_teacher="live", **settings,
    )


def sampled_batch(args, model: MegatronTinyGPT, seed: int) -> dict:
    """The converter's train data of ``NUM_SAMPLES`` rollouts: prompts encoded as slime encodes them, random
    responses (two with a masked-out stretch, as a tool's output in a multi-turn response), the sampler's
    log-probabilities = the model's own at the rollout temperature plus noise (so the importance weights are not
    all 1), metadata annotated by the data source's function from each row's teacher prompt."""
    from slime.utils.types import Sample

    rng = random.Random(seed)
    tokenizer = make_tokenizer()
    config = SelfDistillConfig.from_args(args)
    render = teacher_prompt_renderer(args, config)
    samples = []
    for index, (student, demonstration, length) in enumerate(zip(STUDENT_PROMPTS, DEMONSTRATIONS, RESPONSE_LENGTHS)):
        prompt_ids = tokenizer.encode(student, add_special_tokens=False)
        response = [rng.randrange(model.vocab_size) for _ in range(length)]
        loss_mask = [1] * length
        if index % 3 == 1:
            loss_mask[length // 2 : length // 2 + 2] = [0, 0]
        row = {} if index == WITHOUT_TEACHER_PROMPT else {
            config.teacher_prompt_key: f"{student}\nThis is an example for a response to the question: {demonstration}"
                                       "\nNow answer with a response of your own."}
        sample = Sample(index=index, group_index=index, prompt=student, tokens=prompt_ids + response,
                        response_length=length, reward=rng.random(), status=Sample.Status.COMPLETED,
                        loss_mask=loss_mask, remove_sample=index == REMOVED, metadata=row)
        annotate_teacher_prompt(sample.metadata, config=config, apply_chat_template=False, render=render,
                                sample_description=describe_sample(sample))
        sample.rollout_log_probs = [value + rng.uniform(-0.3, 0.3) for value in
                                    model_token_log_probs(model, sample.tokens, length)]
        samples.append(sample)
    return convert_samples_to_train_data(args, samples)


def model_token_log_probs(model: MegatronTinyGPT, tokens: list, response_length: int) -> list:
    """The model's log-probabilities of the response tokens at the rollout temperature (float64)."""
    sequence = torch.tensor(tokens)
    logits = model.sequence_logits(sequence, torch.float64)[len(tokens) - response_length - 1 : -1] / TEMPERATURE
    response = sequence[len(tokens) - response_length :]
    return torch.log_softmax(logits, -1).gather(1, response.unsqueeze(1)).squeeze(1).tolist()


# ---------------------------------------------------------------------- slime's side
class ObjectStoreInProcess:
    """Ray's ``put`` / ``get`` for one process: the object is its own reference."""

    @staticmethod
    def put(value, **kwargs):
        return value

    @staticmethod
    def get(reference):
        return reference


class TorchWithCpuCounters:
    """``torch`` for megatron-core's schedules module, whose token counter is allocated with ``device="cuda"``."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, **kwargs)


class ClippedSgd:
    """What ``train_one_step`` calls on Megatron's optimizer: the gradients' global norm clipped to ``clip_grad`` as
    Megatron's optimizer clips it, then a plain SGD step; ``step`` returns (update successful, norm before clipping,
    zeros in the gradients)."""

    def __init__(self, model: torch.nn.Module, lr: float, clip_grad: float):
        self.parameters, self.lr, self.clip_grad = list(model.parameters()), lr, clip_grad

    def scale_loss(self, loss):  # Megatron's loss scale: 1 in float32
        return loss

    def zero_grad(self):
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self):
        with_grad = [p for p in self.parameters if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(with_grad, self.clip_grad)
        for parameter in with_grad:
            parameter.add_(parameter.grad, alpha=-self.lr)
        return True, float(grad_norm), 0


def slime_rollout_data(args, train_data: dict) -> dict:
    """The converter's train data as slime's one training rank holds it: the rollout manager's DP split and
    micro-batch schedule, then the train actor's ``_get_rollout_data``."""
    from megatron.core import mpu
    from slime.backends.megatron_utils.actor import MegatronTrainRayActor
    from slime.ray.rollout import RolloutManager

    manager = SimpleNamespace(args=args, train_parallel_config={
        "dp_size": mpu.get_data_parallel_world_size(), "cp_size": mpu.get_context_parallel_world_size(),
        "vpp_size": 1, "microbatch_group_size_per_vp_stage": 1})
    references = RolloutManager.__ray_metadata__.modified_class._split_train_data_by_dp(manager, train_data)
    return MegatronTrainRayActor._get_rollout_data(SimpleNamespace(args=args), references)


def slime_step(slime, args, model: ScheduledTinyGPT, train_data: dict, set_attribute) -> tuple[dict, float]:
    """The teacher pass and one ``train_one_step``; returns slime's reported step metrics and gradient norm."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import schedules
    from slime.ray import rollout as rollout_module
    from slime.utils import data as data_module

    point_slime_at_cpu(set_attribute)
    set_attribute(rollout_module, "ray", ObjectStoreInProcess())
    set_attribute(data_module, "ray", ObjectStoreInProcess())
    set_attribute(schedules, "torch", TorchWithCpuCounters())
    set_attribute(slime.model, "get_forward_backward_func", lambda: schedules.forward_backward_no_pipelining)
    set_attribute(slime.model, "get_args", lambda: args)  # megatron.training's global args, read by train_one_step
    model.config.calculate_per_token_loss = args.calculate_per_token_loss  # Megatron's flag, read by its schedule
    optimizer = ClippedSgd(model, LEARNING_RATE, args.clip_grad)
    # what slime's train() sets on the model config before its steps (slime/backends/megatron_utils/model.py)
    model.config.grad_scale_func = optimizer.scale_loss
    model.config.finalize_model_grads_func = finalize_model_grads

    rollout_data = slime_rollout_data(args, train_data)
    assert len(rollout_data["micro_batch_indices"]) > 1  # gradient accumulation
    megatron_hooks.install(args)
    try:
        actor = SimpleNamespace(args=args, model=[model])
        rollout_data.update(slime.actor.MegatronTrainRayActor.compute_log_prob(
            actor, slime.data.get_data_iterator(rollout_data), rollout_data["num_microbatches"],
            store_prefix="teacher_"))
        scheduler = SimpleNamespace(step=lambda increment: None)
        return slime.model.train_one_step(
            args, 0, 0, slime.data.get_data_iterator(rollout_data), [model], optimizer, scheduler,
            rollout_data["num_microbatches"][0], rollout_data["global_batch_sizes"][0])
    finally:
        megatron_hooks.uninstall()


# ---------------------------------------------------------------------- the tests
@dataclass
class SlimeStep:
    """One step on slime's side, from the initial weights and the sampled batch."""

    args: Namespace
    model: ScheduledTinyGPT  # after the step
    initial_weights: dict  # MegatronTinyGPT.full_weights() before the step (float64)
    train_data: dict  # the converter's
    metrics: dict  # train_one_step's reported step metrics
    grad_norm: float  # before clipping


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> str:
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def run_slime_step(slime, scope: str, per_token: bool, hf_checkpoint: str, set_attribute) -> SlimeStep:
    args = step_args(scope, per_token, hf_checkpoint)
    model = ScheduledTinyGPT(vocab_size=args.vocab_size, hidden=HIDDEN, seed=3)
    train_data = sampled_batch(args, model, seed=11)
    assert [view.has_teacher for view in train_data["prompt"]].count(False) == 2
    initial_weights = model.full_weights()
    metrics, grad_norm = slime_step(slime, args, model, copy.deepcopy(train_data), set_attribute)
    return SlimeStep(args, model, initial_weights, train_data, metrics, grad_norm)


def slime_updates(step: SlimeStep) -> dict:
    """Per parameter (full_weights' keys): after - before, float64."""
    after = {name: parameter.detach().double() for name, parameter in step.model.named_parameters()}
    return {key: after[name] - step.initial_weights[key] for name, key, _ in PARAMETERS}


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample_mean", "per_token_loss"])
@pytest.mark.parametrize("scope", list(RECIPES))
def test_one_local_step_equals_one_slime_step(slime_megatron, monkeypatch, hf_checkpoint, scope, per_token):
    """The module docstring's parity: every parameter's update, the step's loss and its gradient norm."""
    from slime_self_distill.local.step import StepSettings, train_step

    step = run_slime_step(slime_megatron, scope, per_token, hf_checkpoint, monkeypatch.setattr)
    student = HuggingFaceTinyGPT(step.initial_weights)
    teacher = copy.deepcopy(student).requires_grad_(False)  # at step 0 every teacher kind is the initial weights
    config = SelfDistillConfig(**{key.removeprefix(ARG_PREFIX): value for key, value in recipe_settings(scope).items()})
    settings = StepSettings(rollout_temperature=TEMPERATURE, calculate_per_token_loss=per_token,
                            micro_batch_size=MICRO_BATCH_SIZE, clip_grad=CLIP_GRAD)
    metrics = train_step(student, teacher, copy.deepcopy(step.train_data), config, settings,
                         torch.optim.SGD(student.parameters(), lr=LEARNING_RATE))

    expected = slime_updates(step)
    local = {key: student.get_parameter(name).detach().double() - step.initial_weights[key]
             for _, key, name in PARAMETERS}
    scales = {key: float(update.abs().max()) for key, update in expected.items()}
    errors = {key: float((local[key] - expected[key]).abs().max()) for key in expected}
    print(f"\nparity {scope} {'per-token' if per_token else 'per-sample'}: max abs error {max(errors.values()):.3g}, "
          f"max error relative to the update's scale {max(errors[key] / scales[key] for key in errors):.3g}, "
          f"loss {step.metrics['loss']:.6g} / {metrics['loss']:.6g}, "
          f"grad norm {step.grad_norm:.6g} / {metrics['grad_norm']:.6g}")
    for key, update in expected.items():
        assert scales[key] > 0, key
        torch.testing.assert_close(local[key], update, rtol=RTOL, atol=ATOL_OF_SCALE * scales[key],
                                   msg=lambda text: f"{key}: {text}")
    assert metrics["loss"] == pytest.approx(step.metrics["loss"], rel=RTOL)
    assert metrics["grad_norm"] == pytest.approx(step.grad_norm, rel=RTOL)


def sdft_objective(step: SlimeStep, weights: dict, per_token: bool) -> torch.Tensor:
    """The SDFT step's objective from its definition, in float64 on ``weights`` (``full_weights`` keys): per loss
    token (the converter's masks: the first 3 tokens skipped) of a sample with a teacher, KL(T || S) at the rollout
    temperature, T the initial model reading the teacher prompt, times the sample's importance weight (the mean over
    its loss tokens of min(S(y) / p_rollout(y), cap), no gradient); the mean over those samples of their token means,
    or (per token) the mean over their loss tokens."""
    config = SelfDistillConfig.from_args(step.args)
    initial = {key: value.detach() for key, value in weights.items()}
    data = step.train_data
    sums, counts = [], []
    for tokens, view, mask, rollout in zip(data["tokens"], data["prompt"], data["loss_masks"],
                                           data["rollout_log_probs"], strict=True):
        if not view.has_teacher:
            continue
        response_length = view.response_length
        student_tokens, teacher_tokens = torch.tensor(tokens), torch.tensor(view.tokens)
        student = torch.log_softmax(step.model.sequence_logits(student_tokens, torch.float64, weights)[
            len(tokens) - response_length - 1 : -1] / TEMPERATURE, -1)
        teacher = torch.log_softmax(step.model.sequence_logits(teacher_tokens, torch.float64, initial)[
            len(teacher_tokens) - response_length - 1 : -1] / TEMPERATURE, -1)
        kl = (teacher.exp() * (teacher - student)).sum(-1)
        mask = torch.tensor(mask, dtype=torch.float64)
        sampled = student.detach().gather(1, student_tokens[-response_length:].unsqueeze(1)).squeeze(1)
        ratio = (sampled - torch.tensor(rollout, dtype=torch.float64)).exp().clamp(max=config.importance_cap)
        importance = (ratio * mask).sum() / mask.sum()
        sums.append(importance * (kl * mask).sum())
        counts.append(mask.sum())
    if per_token:
        return sum(sums) / sum(counts)
    return sum(total / count for total, count in zip(sums, counts)) / len(sums)


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample_mean", "per_token_loss"])
def test_slime_step_is_sgd_on_the_sdft_objective(slime_megatron, monkeypatch, hf_checkpoint, per_token):
    """Guards slime's side itself (its data path, megatron-core's schedule and gradient normalisation, the stand-in
    optimizer): its update is -lr x the clipped gradient of the objective written from the definition."""
    step = run_slime_step(slime_megatron, "full_vocab", per_token, hf_checkpoint, monkeypatch.setattr)
    assert step.args.self_distill_importance_correction == "sequence"
    assert step.args.self_distill_num_loss_tokens_to_skip == 3
    weights = {key: value.clone().requires_grad_() for key, value in step.initial_weights.items()}
    objective = sdft_objective(step, weights, per_token)
    objective.backward()
    gradients = {key: value.grad for key, value in weights.items()}
    norm = float(torch.cat([gradient.flatten() for gradient in gradients.values()]).norm())
    clip = min(1.0, CLIP_GRAD / (norm + 1e-6))  # Megatron's clip_grad_norm_fp32 coefficient
    for key, update in slime_updates(step).items():
        expected = -LEARNING_RATE * clip * gradients[key]
        torch.testing.assert_close(update, expected, rtol=RTOL, atol=ATOL_OF_SCALE * float(expected.abs().max()),
                                   msg=lambda text: f"{key}: {text}")
    assert step.grad_norm == pytest.approx(norm, rel=RTOL)
    # the full-vocabulary KL's value loses about 1e-5 in float32 on small per-token KLs (its gradient does not)
    assert step.metrics["loss"] == pytest.approx(float(objective), rel=1e-4)
