"""The single-process trainer's settings: slime's flags it understands (same names, meanings and defaults as slime's and
Megatron's), plus a few of its own (``--output-dir``, ``--device``...). Self-distillation knobs stay in
``SelfDistillConfig`` (``--self-distill-*`` flags and the recipes' YAML keys).

A recipe (``--custom-config-path``) is read as the slime launcher reads it: its ``self_distill_*`` keys, then its
``slime_args`` before the command line's flags (a flag given wins). slime flags that only shape a cluster run
(parallelism, SGLang, Ray, offloading) or only slime's policy loss are accepted and listed as not applying here;
any other flag is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from slime_self_distill.config import ConfigError, SelfDistillConfig, add_self_distill_arguments

CUSTOM_CONFIG_FLAG = "--custom-config-path"
LR_DECAY_STYLES = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")

# slime flags with no meaning in one process, or used by slime's policy loss only (the single-process trainer runs
# the distillation loss alone): accepted, with their values, and listed at start-up.
NOT_APPLYING_PREFIXES = (
    "--tensor-model-parallel", "--pipeline-model-parallel", "--context-parallel", "--expert-", "--sequence-parallel",
    "--sglang-", "--actor-num-", "--rollout-num-gpus", "--num-gpus-per-node", "--colocate", "--offload",
    "--use-dynamic-batch-size", "--max-tokens-per-gpu", "--recompute-", "--attention-dropout", "--hidden-dropout",
    "--bf16", "--fp16", "--use-distributed-optimizer", "--accumulate-allreduce-grads-in-fp32", "--ref-load",
    "--advantage-estimator", "--disable-rewards-normalization", "--disable-grpo-std-normalization", "--use-kl-loss",
    "--kl-loss-coef", "--kl-loss-type", "--entropy-coef", "--eps-clip", "--use-rollout-logprobs", "--megatron-to-hf",
)


def _option(help: str, choices: Optional[tuple] = None, **extra) -> dict:
    return {"metadata": {"help": help, "choices": choices, **extra}}


@dataclass
class LocalOptions:
    # --- model and data (slime's names)
    hf_checkpoint: Optional[str] = field(default=None, **_option(
        "Hugging Face model directory (weights, config, tokenizer) of the student; a frozen teacher keeps these "
        "weights."))
    prompt_data: Optional[str] = field(default=None, **_option(
        "Prompt rows prepared by python -m slime_self_distill.prepare_dataset (JSON lines, JSON or Parquet)."))
    input_key: str = field(default="input", **_option("The row's prompt column (slime's --input-key)."))
    label_key: Optional[str] = field(default=None, **_option("The row's label column, given to the reward function."))
    metadata_key: str = field(default="metadata", **_option("The row's metadata column (slime's --metadata-key)."))
    tool_key: Optional[str] = field(default="tools", **_option("The row's tools column (slime's --tool-key)."))
    apply_chat_template: bool = field(default=False, **_option(
        "Render prompts with the tokenizer's chat template, as slime's Dataset does.", flag_kind="switch"))
    apply_chat_template_kwargs: Optional[dict] = field(default=None, **_option(
        "JSON object of extra chat-template arguments (slime's --apply-chat-template-kwargs).", flag_kind="json"))
    rollout_max_prompt_len: Optional[int] = field(default=None, **_option(
        "Rows whose rendered prompt is longer (in tokens) are left out, as slime's Dataset leaves them out."))
    # --- rollouts
    rollout_batch_size: Optional[int] = field(default=None, **_option("Prompts per rollout (required)."))
    n_samples_per_prompt: int = field(default=1, **_option("Responses sampled per prompt."))
    rollout_temperature: float = field(default=1.0, **_option("Sampling temperature (the loss divides by it too)."))
    rollout_top_p: float = field(default=1.0, **_option("Nucleus sampling threshold."))
    rollout_top_k: int = field(default=-1, **_option("Top-k sampling (-1: off)."))
    rollout_max_response_len: int = field(default=1024, **_option("Most new tokens per response."))
    rollout_shuffle: bool = field(default=False, **_option("Shuffle the prompts every epoch.", flag_kind="switch"))
    rollout_seed: int = field(default=42, **_option("Seed of the prompt order and of sampling."))
    num_rollout: Optional[int] = field(default=None, **_option("Rollouts to train on (else from --num-epoch)."))
    num_epoch: Optional[int] = field(default=None, **_option("Passes over the prompts (when --num-rollout is unset)."))
    generate_batch_size: int = field(default=64, **_option("Sequences per generate call (memory only)."))
    # --- rewards (the SDPO and self-revision contexts need them; logged otherwise)
    custom_rm_path: Optional[str] = field(default=None, **_option(
        "module.function(args, sample) -> reward (async or not), slime's contract; e.g. "
        "slime_self_distill.local.rewards.exact_match."))
    rm_type: Optional[str] = field(default=None, **_option("slime's rule-based reward (needs slime importable)."))
    reward_key: Optional[str] = field(default=None, **_option("The reward dict's entry that is the reward."))
    # --- optimisation (Megatron's defaults)
    global_batch_size: Optional[int] = field(default=None, **_option(
        "Samples per optimizer step (default: the whole rollout, one step)."))
    micro_batch_size: int = field(default=1, **_option("Samples per forward/backward (gradient accumulation)."))
    calculate_per_token_loss: bool = field(default=False, **_option(
        "Mean over the step's loss tokens instead of the mean of per-sample means.", flag_kind="switch"))
    lr: Optional[float] = field(default=None, **_option("Peak learning rate (required)."))
    min_lr: float = field(default=0.0, **_option("Learning rate at the end of the decay."))
    lr_decay_style: str = field(default="linear", **_option("Decay after the warm-up.", LR_DECAY_STYLES))
    lr_warmup_iters: int = field(default=0, **_option("Warm-up steps (linear from --lr-warmup-init)."))
    lr_warmup_fraction: Optional[float] = field(default=None, **_option("Warm-up as a fraction of all steps."))
    lr_warmup_init: float = field(default=0.0, **_option("Learning rate at the start of the warm-up."))
    weight_decay: float = field(default=0.01, **_option("AdamW weight decay (not on biases and norms, as Megatron)."))
    adam_beta1: float = field(default=0.9, **_option("AdamW beta1."))
    adam_beta2: float = field(default=0.999, **_option("AdamW beta2."))
    adam_eps: float = field(default=1e-8, **_option("AdamW epsilon."))
    clip_grad: float = field(default=1.0, **_option("Gradient norm clip (0: none)."))
    seed: int = field(default=1234, **_option("Seed of torch."))
    # --- checkpoints, evaluation, logging
    save: Optional[str] = field(default=None, **_option("Checkpoint directory (default: OUTPUT_DIR/checkpoints)."))
    save_interval: Optional[int] = field(default=None, **_option("Save every N rollouts (and at the end)."))
    load: Optional[str] = field(default=None, **_option(
        "Resume from this checkpoint directory (default: --save when it holds a checkpoint)."))
    eval_prompt_data: Optional[list] = field(default=None, **_option(
        "NAME PATH [NAME PATH ...]: prepared rows with labels; greedy answers of the student (plain prompt) and of "
        "the teacher (its prompt) are scored by exact match with the label.", flag_kind="pairs"))
    eval_interval: Optional[int] = field(default=None, **_option("Evaluate every N rollouts (and before/after)."))
    eval_max_response_len: Optional[int] = field(default=None, **_option(
        "Most new tokens of an evaluation answer (default: --rollout-max-response-len)."))
    use_tensorboard: bool = field(default=False, **_option("Also log to TensorBoard (OUTPUT_DIR/tensorboard).",
                                                           flag_kind="switch"))
    use_wandb: bool = field(default=False, **_option("Also log to Weights & Biases.", flag_kind="switch"))
    wandb_project: Optional[str] = field(default=None, **_option("The wandb project."))
    # --- the single-process trainer's own
    output_dir: str = field(default="out/local_train", **_option(
        "Where metrics.jsonl, the plot, the summary and (by default) checkpoints go."))
    device: str = field(default="auto", **_option("auto: cuda when available, else cpu.", DEVICES))
    dtype: str = field(default="auto", **_option("Weights' dtype (auto: bfloat16 on a GPU that has it, else float32).",
                                                 DTYPES))
    quiet: bool = field(default=False, **_option("No progress bar.", flag_kind="switch"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(condition: bool, flag: str, problem: str) -> None:
            if not condition:
                raise ConfigError(f"--{flag}: {problem}")

        for name in ("rollout_batch_size", "lr"):
            need(getattr(self, name) is not None, name.replace("_", "-"), "required (a recipe's slime_args or a flag)")
        need(self.rollout_batch_size > 0, "rollout-batch-size", "must be > 0")
        need(self.n_samples_per_prompt > 0, "n-samples-per-prompt", "must be > 0")
        need(self.micro_batch_size > 0, "micro-batch-size", "must be > 0")
        need(self.rollout_temperature > 0, "rollout-temperature", "must be > 0")
        need(0 < self.rollout_top_p <= 1, "rollout-top-p", "must be in (0, 1]")
        need(self.rollout_max_response_len > 0, "rollout-max-response-len", "must be > 0")
        need(self.generate_batch_size > 0, "generate-batch-size", "must be > 0")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.clip_grad >= 0, "clip-grad", "must be >= 0")
        need(self.lr_warmup_fraction is None or 0 <= self.lr_warmup_fraction < 1, "lr-warmup-fraction",
             "must be in [0, 1)")
        need(self.num_rollout is None or self.num_rollout > 0, "num-rollout", "must be > 0")
        need(self.num_epoch is None or self.num_epoch > 0, "num-epoch", "must be > 0")
        need(self.save_interval is None or self.save_interval > 0, "save-interval", "must be > 0")
        need(self.eval_interval is None or self.eval_interval > 0, "eval-interval", "must be > 0")
        need(self.eval_prompt_data is None or (len(self.eval_prompt_data) % 2 == 0 and self.eval_prompt_data),
             "eval-prompt-data", "takes NAME PATH pairs")
        need(not (self.custom_rm_path and self.rm_type), "custom-rm-path",
             "give --custom-rm-path or --rm-type, not both")
        rollout = self.rollout_batch_size * self.n_samples_per_prompt
        step = self.step_samples
        need(step > 0 and rollout % step == 0, "global-batch-size",
             f"{step} must divide the rollout's {rollout} samples (--rollout-batch-size x --n-samples-per-prompt)")
        need(step % self.micro_batch_size == 0, "micro-batch-size",
             f"{self.micro_batch_size} must divide the step's {step} samples (--global-batch-size)")

    @property
    def step_samples(self) -> int:
        return self.global_batch_size or self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def steps_per_rollout(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt // self.step_samples

    def rollouts_for(self, num_rows: int) -> int:
        """--num-rollout, or --num-epoch passes over ``num_rows`` prompts (slime's rule: whole rollouts)."""
        if self.num_rollout is not None:
            return self.num_rollout
        if self.num_epoch is None:
            raise ConfigError("give --num-rollout or --num-epoch (a recipe's slime_args or a flag)")
        return max(1, self.num_epoch * num_rows // self.rollout_batch_size)

    def warmup_steps(self, total_steps: int) -> int:
        if self.lr_warmup_fraction is not None:
            return int(self.lr_warmup_fraction * total_steps)
        return self.lr_warmup_iters

    def learning_rate(self, step: int, total_steps: int) -> float:
        """Megatron's schedule: linear warm-up from --lr-warmup-init, then constant, linear or cosine decay to
        --min-lr at the last step."""
        warmup = self.warmup_steps(total_steps)
        if warmup and step < warmup:
            return self.lr_warmup_init + (self.lr - self.lr_warmup_init) * step / warmup
        if self.lr_decay_style == "constant" or total_steps <= warmup:
            return self.lr
        ratio = min(1.0, (step - warmup) / (total_steps - warmup))
        coefficient = 1.0 - ratio if self.lr_decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coefficient * (self.lr - self.min_lr)

    def slime_args(self) -> argparse.Namespace:
        """What the shared rollout-side functions read of slime's args."""
        return argparse.Namespace(**dataclasses.asdict(self))


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_local_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(LocalOptions):
        meta = f.metadata
        kind = meta.get("flag_kind")
        common = dict(dest=f.name, default=None, help=meta["help"])
        if kind == "switch":
            parser.add_argument(flag_of(f.name), action="store_const", const=True, **common)
        elif kind == "json":
            parser.add_argument(flag_of(f.name), type=json.loads, **common)
        elif kind == "pairs":
            parser.add_argument(flag_of(f.name), nargs="+", **common)
        else:
            kind_type = {int: int, float: float}.get(_scalar_type(f), str)
            parser.add_argument(flag_of(f.name), type=kind_type, choices=meta["choices"], **common)


def _scalar_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    return int if "int" in text else float if "float" in text else str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m slime_self_distill.local_train", allow_abbrev=False,
        description="Self-distillation in one process on a Hugging Face causal LM (GPU or CPU), with the plugin's "
                    "recipes, teacher contexts and loss. --demo runs the CPU demo (README's first command).")
    parser.add_argument("--demo", action="store_true",
                        help="Train a tiny model on the fly and self-distil it on the shipped key-value task "
                             "(with configs/local_kv_demo.yaml; flags given beside it win).")
    parser.add_argument(CUSTOM_CONFIG_FLAG, dest="custom_config_path", default=None,
                        help="A recipe (configs/*.yaml): self_distill_* keys and slime_args.")
    add_local_arguments(parser)
    add_self_distill_arguments(parser)
    return parser


@dataclass
class ParsedRun:
    options: LocalOptions
    config: SelfDistillConfig
    not_applying: list  # slime flags accepted that shape nothing here


def split_not_applying(argv: Sequence[str]) -> tuple[list, list]:
    """(the other arguments, the flags of NOT_APPLYING_PREFIXES with their values)."""
    kept, dropped, dropping = [], [], False
    for token in argv:
        if token.startswith("--"):
            dropping = token.startswith(NOT_APPLYING_PREFIXES)
        (dropped if dropping else kept).append(token)
    return kept, dropped


def parse_run(argv: Sequence[str], recipe_defaults: Optional[Sequence[str]] = None) -> ParsedRun:
    """The command line (after the recipe's ``slime_args`` and ``recipe_defaults``) into options and configuration.
    Unknown flags are an error naming them."""
    from slime_self_distill.train import load_custom_config, recipe_slime_args

    parser = build_parser()
    first, _ = parser.parse_known_args(list(argv))
    recipe, recipe_argv = {}, []
    if first.custom_config_path:
        recipe = load_custom_config(first.custom_config_path)
        recipe_argv = recipe_slime_args(recipe, first.custom_config_path)
        unknown_keys = sorted(k for k in recipe if k != "slime_args" and not k.startswith("self_distill_"))
        if unknown_keys:
            raise ConfigError(f"{CUSTOM_CONFIG_FLAG} {first.custom_config_path}: unknown keys {unknown_keys}")
    arguments, not_applying = split_not_applying([*(recipe_defaults or []), *recipe_argv, *argv])
    parsed, unknown = parser.parse_known_args(arguments)
    if unknown:
        raise ConfigError(
            f"not understood by the single-process trainer: {' '.join(unknown)} (python -m "
            "slime_self_distill.local_train --help lists its flags; slime-only features need the slime launcher, "
            "python -m slime_self_distill.train)")
    values = vars(parsed)
    option_names = {f.name for f in dataclasses.fields(LocalOptions)}
    options = LocalOptions(**{k: v for k, v in values.items() if k in option_names and v is not None})
    settings = {k: v for k, v in recipe.items() if k.startswith("self_distill_")}
    settings.update({k: v for k, v in values.items() if k.startswith("self_distill_") and v is not None})
    config = SelfDistillConfig.from_args(argparse.Namespace(**settings))
    check_supported(config)
    return ParsedRun(options, config, not_applying)


def check_supported(config: SelfDistillConfig) -> None:
    """What only slime runs."""
    if config.rl_combination != "none":
        raise ConfigError(
            "--self-distill-rl-combination needs slime's policy loss (GRPO and friends), which the single-process "
            "trainer does not run; use --self-distill-rl-combination none, or the slime launcher")
    if config.offline:
        raise ConfigError("offline top-K distillation (--self-distill-offline-topk-path) runs on slime's SFT path; use "
                          "python -m slime_self_distill.train")
    if config.collects_revisions:
        raise ConfigError("SD-Zero's collection (--self-distill-revision-output) runs on slime's rollout; use "
                          "python -m slime_self_distill.train")
    if config.teacher_context_path is not None:
        raise ConfigError("--self-distill-teacher-context-path (a builder of slime samples) runs on slime's rollout; "
                          "the single-process trainer builds the static, sdpo and self_revision contexts")
