"""The single-process trainer: rollouts with ``generate``, the shared converter, the teacher pass and optimizer steps
of ``local.step``, frozen / live / EMA teachers, checkpoints, evaluation and reports.

Per rollout, as slime's loop: sample ``--rollout-batch-size`` prompts x ``--n-samples-per-prompt`` responses with the
student, score them when a reward function is given, build the train data (teacher views, masks, weights), run the
teacher pass with the teacher's weights of that moment, then ``rollout / --global-batch-size`` optimizer steps; the
EMA follows after every step or every rollout (``--self-distill-ema-update-interval``).

Teachers: ``frozen`` is the ``--hf-checkpoint`` weights (also after a resume), ``live`` the student itself (its
weights when the rollout's teacher pass runs), ``ema`` an fp32 average of the student (``ema_update_``, as on slime)
copied into a teacher model after every rollout, and saved with every checkpoint. The models run in eval mode
(no dropout), as slime's recipes run Megatron with dropout 0.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import shutil
import sys
import time
from typing import Optional

import torch

from slime_self_distill.config import SelfDistillConfig
from slime_self_distill.data.files import write_atomically
from slime_self_distill.data_source import PLUGIN_METADATA_KEY, TEACHER_PROMPT_TEXT_KEY
from slime_self_distill.local.options import LocalOptions
from slime_self_distill.local.report import MetricsLog, plot_metrics
from slime_self_distill.local.rollout import (
    PromptOrder,
    generate,
    load_prompt_rows,
    reward_function,
    sample_rollout,
    score,
    step_slices,
    train_data_of,
)
from slime_self_distill.local.step import StepSettings, optimizer_step, teacher_output_spec, teacher_pass
from slime_self_distill.trainer.teacher_weights import ema_update_

LATEST_FILE = "latest"
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
STATE_FORMAT = "slime_self_distill.local_train.v1"


def pick_device(options: LocalOptions) -> torch.device:
    if options.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(options.device)


def pick_dtype(options: LocalOptions, device: torch.device) -> torch.dtype:
    if options.dtype != "auto":
        return getattr(torch, options.dtype)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_model(path: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # a bar per load of a small model; the trainer prints its own progress

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def adamw(model: torch.nn.Module, options: LocalOptions) -> torch.optim.Optimizer:
    """AdamW with Megatron's parameter groups: no weight decay on biases and 1-D parameters (norms)."""
    decayed, plain = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (plain if parameter.ndim == 1 or name.endswith(".bias") else decayed).append(parameter)
    groups = [{"params": decayed, "weight_decay": options.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=options.lr,
                             betas=(options.adam_beta1, options.adam_beta2), eps=options.adam_eps)


class Teacher:
    """The teacher model of ``--self-distill-teacher`` (module docstring)."""

    def __init__(self, kind: str, student: torch.nn.Module, *, frozen: Optional[torch.nn.Module] = None,
                 ema_rate: float = 0.01, ema_interval: str = "step", shadow: Optional[dict] = None):
        self.kind, self.student, self.ema_rate, self.ema_interval = kind, student, ema_rate, ema_interval
        self.shadow: Optional[dict] = None
        if kind == "live":
            self.model = student
        elif kind == "frozen":
            self.model = frozen if frozen is not None else copy.deepcopy(student)
        else:
            self.model = copy.deepcopy(student)
            self.shadow = shadow if shadow is not None else {
                name: p.detach().to("cpu", torch.float32, copy=True) for name, p in student.named_parameters()}
            self._write_teacher()
        if self.model is not student:
            self.model.requires_grad_(False)

    def _write_teacher(self) -> None:
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                parameter.copy_(self.shadow[name])

    @torch.no_grad()
    def _update_ema(self) -> None:
        for name, parameter in self.student.named_parameters():
            ema_update_(self.shadow[name], parameter, self.ema_rate)

    def after_optimizer_step(self) -> None:
        if self.kind == "ema" and self.ema_interval == "step":
            self._update_ema()

    def after_rollout(self) -> None:
        if self.kind == "ema":
            if self.ema_interval == "rollout":
                self._update_ema()
            self._write_teacher()


def teacher_prompt_ids(row, tokenizer) -> Optional[list]:
    text = row.metadata.get(PLUGIN_METADATA_KEY, {}).get(TEACHER_PROMPT_TEXT_KEY)
    return None if text is None else list(tokenizer.encode(text, add_special_tokens=False))


def exact_match_accuracy(model, tokenizer, prompts: list, labels: list, max_new_tokens: int,
                         batch_size: int) -> float:
    """Greedy answers scored by exact match (special tokens skipped, surrounding spaces stripped) with the labels."""
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, greedy=True, batch_size=batch_size)
    hits = [tokenizer.decode(ids, skip_special_tokens=True).strip() == str(label).strip()
            for (ids, _, _), label in zip(answers, labels, strict=True)]
    return sum(hits) / len(hits)


class LocalTrainer:
    def __init__(self, options: LocalOptions, config: SelfDistillConfig, *, out=None):
        self.options, self.config, self.out = options, config, out or sys.stdout
        if options.hf_checkpoint is None or options.prompt_data is None:
            raise ValueError("--hf-checkpoint and --prompt-data are required (or run the demo: --demo)")
        torch.manual_seed(options.seed)
        self.device = pick_device(options)
        self.dtype = pick_dtype(options, self.device)
        self.tokenizer = load_tokenizer(options.hf_checkpoint)
        self.rows = load_prompt_rows(options.prompt_data, options, config, self.tokenizer)
        self.eval_sets = {name: load_prompt_rows(path, options, config, self.tokenizer)
                          for name, path in zip(options.eval_prompt_data[::2], options.eval_prompt_data[1::2])
                          } if options.eval_prompt_data else {}
        for name, rows in self.eval_sets.items():
            if any(row.label is None for row in rows):
                raise ValueError(f"--eval-prompt-data {name}: rows without a label (--label-key "
                                 f"{options.label_key}); evaluation scores answers against the label")
        self.reward = reward_function(options)
        if self.reward is None and (config.builds_sdpo_context or config.builds_self_revision_context):
            raise ValueError(f"--self-distill-teacher-context {config.teacher_context} needs rewards: give "
                             "--custom-rm-path (e.g. slime_self_distill.local.rewards.exact_match with --label-key) "
                             "or --rm-type")
        self.num_rollout = options.rollouts_for(len(self.rows))
        self.total_steps = self.num_rollout * options.steps_per_rollout
        self.save_dir = options.save or os.path.join(options.output_dir, "checkpoints")
        self.settings = StepSettings(options.rollout_temperature, options.calculate_per_token_loss,
                                     options.micro_batch_size, options.clip_grad)
        self._build_models()
        self.log = MetricsLog(options, start_rollout=self.start_rollout, out=self.out)

    # ------------------------------------------------------------------ models, resume
    def _build_models(self) -> None:
        options, config = self.options, self.config
        resume = options.load or (self.save_dir if os.path.exists(os.path.join(self.save_dir, LATEST_FILE)) else None)
        state = None
        if resume is not None:
            checkpoint = latest_checkpoint(resume)
            state = torch.load(os.path.join(checkpoint, STATE_FILE), weights_only=False)
            if state.get("format") != STATE_FORMAT:
                raise ValueError(f"{checkpoint}: not a checkpoint of the single-process trainer")
            self.student = load_model(os.path.join(checkpoint, MODEL_DIR), self.device, self.dtype)
            print(f"resuming from {checkpoint} (rollout {state['rollout']}, step {state['step']})", file=self.out)
        else:
            self.student = load_model(options.hf_checkpoint, self.device, self.dtype)
        frozen = None
        if config.teacher == "frozen" and state is not None:  # the initial weights, not the resumed student's
            frozen = load_model(options.hf_checkpoint, self.device, self.dtype)
        self.teacher = Teacher(config.teacher, self.student, frozen=frozen, ema_rate=config.ema_rate,
                               ema_interval=config.ema_update_interval,
                               shadow=None if state is None else state.get("ema_shadow"))
        self.optimizer = adamw(self.student, options)
        self.spec = teacher_output_spec(self.student, config, options.rollout_temperature)
        self.order = PromptOrder(len(self.rows), options.rollout_batch_size, options.rollout_shuffle,
                                 options.rollout_seed)
        self.start_rollout, self.step = 0, 0
        if state is not None:
            check_same_run(state.get("run", {}), run_identity(options, config), checkpoint)
            self.optimizer.load_state_dict(state["optimizer"])
            self.order.position, self.start_rollout, self.step = state["prompt_position"], state["rollout"], \
                state["step"]
            torch.set_rng_state(state["torch_rng"])

    def save(self, rollout: int) -> str:
        """``SAVE/rollout_<n>/`` (model, tokenizer, trainer state) written under a temporary name and renamed, then
        ``SAVE/latest`` (atomically); earlier checkpoints are kept."""
        name = f"rollout_{rollout:06d}"
        final = os.path.join(self.save_dir, name)
        temporary = os.path.join(self.save_dir, f".{name}.tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
        self.student.save_pretrained(os.path.join(temporary, MODEL_DIR))
        self.tokenizer.save_pretrained(os.path.join(temporary, MODEL_DIR))
        state = {"format": STATE_FORMAT, "rollout": rollout, "step": self.step,
                 "prompt_position": self.order.position, "optimizer": self.optimizer.state_dict(),
                 "ema_shadow": self.teacher.shadow, "torch_rng": torch.get_rng_state(),
                 "run": run_identity(self.options, self.config)}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomically(os.path.join(temporary, STATE_FILE), lambda f: f.write(buffer.getvalue()))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        write_atomically(os.path.join(self.save_dir, LATEST_FILE), lambda f: f.write(name.encode()))
        return final

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """Per evaluation set: the student's exact-match accuracy on the plain prompts, and the teacher's on its
        prompts (rows with a teacher prompt of their own)."""
        results = {}
        max_new = self.options.eval_max_response_len or self.options.rollout_max_response_len
        for name, rows in self.eval_sets.items():
            labels = [row.label for row in rows]
            results[f"eval/{name}/student_accuracy"] = exact_match_accuracy(
                self.student, self.tokenizer, [row.prompt_ids for row in rows], labels, max_new,
                self.options.generate_batch_size)
            teacher_prompts = [teacher_prompt_ids(row, self.tokenizer) for row in rows]
            if all(ids is not None for ids in teacher_prompts):
                results[f"eval/{name}/teacher_accuracy"] = exact_match_accuracy(
                    self.teacher.model, self.tokenizer, teacher_prompts, labels, max_new,
                    self.options.generate_batch_size)
        return results

    # ------------------------------------------------------------------ training
    def train_rollout(self, rollout: int) -> dict:
        options = self.options
        indices = self.order.next_rollout()
        samples = sample_rollout(self.student, self.tokenizer, self.rows, indices, options,
                                 first_index=rollout * options.rollout_batch_size * options.n_samples_per_prompt,
                                 seed=options.rollout_seed + rollout)
        if self.reward is not None:
            score(self.reward, options.slime_args(), samples)
        train_data, context_metrics = train_data_of(samples, options, self.config, self.tokenizer)
        teacher = teacher_pass(self.teacher.model, train_data, self.spec, options.micro_batch_size)
        step_metrics = []
        for start, step_data in zip(range(0, len(samples), options.step_samples),
                                    step_slices(train_data, options.step_samples)):
            lr = options.learning_rate(self.step, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            step_teacher = dataclasses.replace(teacher, outputs=teacher.outputs[start:start + options.step_samples])
            metrics = optimizer_step(self.student, step_data, step_teacher, self.config, self.spec, self.settings,
                                     self.optimizer)
            self.teacher.after_optimizer_step()
            self.step += 1
            step_metrics.append({**metrics, "lr": lr})
        self.teacher.after_rollout()
        record = {name: sum(m[name] for m in step_metrics) / len(step_metrics) for name in step_metrics[0]}
        record["response_length"] = sum(s.response_length for s in samples) / len(samples)
        record["truncated_fraction"] = sum(s.truncated for s in samples) / len(samples)
        record["distilled_sample_fraction"] = sum(v.has_teacher for v in train_data["prompt"]) / len(samples)
        if self.reward is not None:
            rewards = [float(s.reward[options.reward_key] if options.reward_key else s.reward) for s in samples]
            record["reward"] = sum(rewards) / len(rewards)
        if context_metrics:
            record.update({f"context/{k}": v for k, v in context_metrics.items()})
        return record

    def run(self) -> dict:
        options = self.options
        print(f"single-process self-distillation: {self.num_rollout} rollouts x {options.steps_per_rollout} step(s), "
              f"{len(self.rows)} prompts, teacher {self.config.teacher}, {self.config.kl_scope} "
              f"{self.config.divergence} ({self.config.describe()}), {self.device} {self.dtype}", file=self.out)
        started = time.monotonic()
        if self.start_rollout >= self.num_rollout:
            print(f"nothing to train: the run in {self.save_dir} finished its {self.num_rollout} rollouts (give a "
                  "larger --num-rollout to go on, or another --output-dir / --save for a new run)", file=self.out)
        first_eval = None
        if self.eval_sets and self.start_rollout == 0:
            first_eval = self.evaluate()
            self.log.write({"rollout": 0, "step": 0, **first_eval})
        progress = self.log.progress(self.start_rollout, self.num_rollout)
        for rollout in range(self.start_rollout, self.num_rollout):
            record = self.train_rollout(rollout)
            done = rollout + 1
            if self.eval_sets and (done == self.num_rollout or (options.eval_interval and done % options.eval_interval
                                                                 == 0)):
                record.update(self.evaluate())
            self.log.write({"rollout": done, "step": self.step, **record, "elapsed_s": time.monotonic() - started})
            progress.update(record)
            if done == self.num_rollout or (options.save_interval and done % options.save_interval == 0):
                self.save(done)
        progress.close()
        summary = self.log.summary(first_eval)
        plot_metrics(self.log.records(), os.path.join(options.output_dir, "training.png"), self.config, out=self.out)
        summary["seconds"] = time.monotonic() - started
        write_atomically(os.path.join(options.output_dir, "summary.json"),
                         lambda f: f.write(json.dumps(summary, indent=2).encode()))
        return summary


# What a resumed run must share with the run that saved the checkpoint (the number of rollouts, evaluation, logging
# and checkpoint intervals may change).
RUN_IDENTITY_OPTIONS = ("hf_checkpoint", "prompt_data", "input_key", "apply_chat_template", "rollout_batch_size",
                        "n_samples_per_prompt", "global_batch_size", "rollout_shuffle", "rollout_seed",
                        "rollout_temperature", "calculate_per_token_loss")


def run_identity(options: LocalOptions, config: SelfDistillConfig) -> dict:
    return {**{name: getattr(options, name) for name in RUN_IDENTITY_OPTIONS}, **config.to_args_dict()}


def check_same_run(saved: dict, current: dict, checkpoint: str) -> None:
    changed = sorted(name for name in set(saved) | set(current) if saved.get(name) != current.get(name))
    if changed:
        details = ", ".join(f"{name}: {saved.get(name)!r} -> {current.get(name)!r}" for name in changed)
        raise ValueError(f"{checkpoint} was saved by a run with other settings ({details}); resume with the same "
                         "ones, or give another --save / --output-dir to start a new run")


def latest_checkpoint(directory: str) -> str:
    pointer = os.path.join(directory, LATEST_FILE)
    if os.path.isfile(os.path.join(directory, STATE_FILE)):
        return directory
    if not os.path.isfile(pointer):
        raise FileNotFoundError(f"--load {directory}: no checkpoint (neither {STATE_FILE} nor {LATEST_FILE} in it)")
    with open(pointer) as f:
        return os.path.join(directory, f.read().strip())

