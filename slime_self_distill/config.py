"""Every self-distillation knob: its type, default, help text and validation, in one place.

The same definitions serve three ways in:

* command line: ``add_self_distill_arguments(parser)`` registers ``--self-distill-*`` flags (usable as slime's
  ``parse_args(add_custom_arguments=...)``);
* YAML for slime's ``--custom-config-path``: keys are the flag names with underscores
  (``self_distill_kl_scope: topk``); slime sets them on ``args`` without type checks, so
  ``SelfDistillConfig.from_args`` checks them;
* Python: ``SelfDistillConfig(kl_scope="topk", topk=20)``.

A configuration is validated when it is built; an invalid value or combination raises ``ConfigError`` naming
the flag and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from slime_self_distill.core.divergences import DEFAULT_CHUNK_SIZE
from slime_self_distill.data.templates import TemplateError, check_template

ARG_PREFIX = "self_distill_"

KL_SCOPES = ("full_vocab", "topk", "sampled_token")
DIVERGENCES = ("forward_kl", "reverse_kl", "alpha_js", "mixed_kl")
TOPK_TAILS = ("bucket", "renormalize")
TOPK_SUPPORTS = ("teacher", "student", "union")
IMPORTANCE_CORRECTIONS = ("off", "token", "sequence")
TEACHER_KINDS = ("frozen", "live", "ema")
EMA_UPDATE_INTERVALS = ("step", "rollout")
TEACHER_OVERFLOW_POLICIES = ("error", "drop", "truncate_demonstration")
MISSING_TEACHER_POLICIES = ("error", "exclude")
FULL_VOCAB_STORAGE_DTYPES = ("float32", "bfloat16", "float16")
TEACHER_CONTEXTS = ("static", "sdpo", "self_revision")
FEEDBACK_USES = ("off", "without_solution", "always")
RL_COMBINATIONS = ("none", "hybrid", "additive")
KD_TOKEN_WEIGHTS = ("uniform", "teacher_target_prob")

# SDPO's templates as the official runs use them: the YAML block scalars of lasgroup/SDPO
# verl/trainer/config/actor/actor.yaml (``|-``: no trailing newline, the leading empty line kept). The dataclass
# defaults of verl/workers/config/actor.py add trailing newlines; no official script uses those.
SDPO_REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
SDPO_SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{successful_previous_attempt}"
SDPO_FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}"


class ConfigError(ValueError):
    """An invalid self-distillation setting; the message names the flag and the fix."""


def flag_name(field_name: str) -> str:
    return "--" + (ARG_PREFIX + field_name).replace("_", "-")


def _knob(help: str, choices: Optional[tuple] = None) -> dict:
    return {"help": help, "choices": choices}


@dataclass(frozen=True)
class SelfDistillConfig:
    kl_scope: str = field(
        default="full_vocab",
        metadata=_knob(
            "Where the divergence is computed: 'full_vocab' (exact, over the whole vocabulary; the teacher pass keeps "
            "the teacher's final hidden states and the loss recomputes its logits), 'topk' (K tokens per position, "
            "--self-distill-topk-support, plus one tail bucket or renormalized), 'sampled_token' (score-function "
            "surrogate on the student's sampled token only).",
            KL_SCOPES,
        ),
    )
    divergence: str = field(
        default="forward_kl",
        metadata=_knob(
            "forward_kl = KL(teacher || student), reverse_kl = KL(student || teacher), alpha_js = generalized "
            "Jensen-Shannon with --self-distill-alpha (alpha 0 is forward_kl, alpha 1 is reverse_kl), mixed_kl = "
            "(1 - alpha) * forward_kl + alpha * reverse_kl (topk scope; SD-Zero's 'mixed').",
            DIVERGENCES,
        ),
    )
    alpha: float = field(
        default=0.5,
        metadata=_knob("Teacher weight of the alpha_js mixture M = alpha*T + (1-alpha)*S, or the reverse-KL weight of "
                       "mixed_kl, in [0, 1]."),
    )
    topk: int = field(
        default=64,
        metadata=_knob("K of the 'topk' scope: how many tokens per position its support holds (>= 1)."),
    )
    topk_support: str = field(
        default="teacher",
        metadata=_knob(
            "Which K tokens per position the 'topk' scope compares: 'teacher' (the teacher's K most likely; "
            "SD-Zero's), 'student' (the current student's K most likely, the teacher's log-probabilities at the same "
            "ids; SDPO's and TRL's) or 'union' (both sets, up to 2K tokens). All exact: the teacher's values come "
            "from its full log-softmax, the student's gradient flows through its full log-sum-exp.",
            TOPK_SUPPORTS,
        ),
    )
    topk_tail: str = field(
        default="bucket",
        metadata=_knob(
            "The mass outside the top-K tokens: 'bucket' (one more category holding each side's remaining mass; a "
            "lower bound of the full divergence, gradient through the student's full log-softmax) or 'renormalize' "
            "(both sides renormalized over the K tokens, as SD-Zero's official loss).",
            TOPK_TAILS,
        ),
    )
    teacher_prompt_key: str = field(
        default="teacher_prompt",
        metadata=_knob("Metadata key of each dataset row that holds the teacher prompt (string or chat messages)."),
    )
    top_entropy_quantile: float = field(
        default=1.0,
        metadata=_knob(
            "Keep only this top fraction of completion tokens by student entropy, in (0, 1]; 1.0 keeps all."
        ),
    )
    num_loss_tokens_to_skip: int = field(
        default=0,
        metadata=_knob("Leave the first N completion tokens of each sample out of the loss, numerator and "
                       "denominators: the converter zeroes their loss mask (>= 0)."),
    )
    importance_correction: str = field(
        default="off",
        metadata=_knob(
            "Truncated importance weight min(exp(log p_train - log p_rollout), cap), detached, correcting the "
            "rollout-engine/trainer mismatch: 'token' (per token), 'sequence' (per sequence: the mean of the "
            "clipped token weights over its loss tokens) or 'off'.",
            IMPORTANCE_CORRECTIONS,
        ),
    )
    importance_cap: float = field(
        default=2.0,
        metadata=_knob("Upper bound of the truncated importance weight (> 0)."),
    )
    sampled_ratio_cap: float = field(
        default=10.0,
        metadata=_knob(
            "sampled_token + forward_kl only: the teacher/student probability ratio T/S of the score-function "
            "surrogate is clipped at this value (> 0) to bound its variance."
        ),
    )
    teacher: str = field(
        default="frozen",
        metadata=_knob(
            "Teacher weights: 'frozen' (a checkpoint that stays the teacher across restarts: slime's "
            "--opd-teacher-load, which the launcher fills from --ref-load), 'live' (the current student weights) or "
            "'ema' (an fp32 moving average of the student, saved with every checkpoint).",
            TEACHER_KINDS,
        ),
    )
    ema_rate: float = field(
        default=0.01,
        metadata=_knob("EMA teacher update: teacher <- (1 - rate) * teacher + rate * student, rate in (0, 1]."),
    )
    ema_update_interval: str = field(
        default="step",
        metadata=_knob("When the EMA teacher is updated: after every optimizer 'step' or every 'rollout'.",
                       EMA_UPDATE_INTERVALS),
    )
    max_teacher_prompt_len: Optional[int] = field(
        default=None,
        metadata=_knob(
            "Token budget of the teacher prompt (its own budget, separate from --rollout-max-prompt-len); "
            "unset means no limit."
        ),
    )
    teacher_overflow: str = field(
        default="error",
        metadata=_knob(
            "What to do with a teacher prompt over --self-distill-max-teacher-prompt-len: 'error', 'drop' (the "
            "sample is excluded from distillation) or 'truncate_demonstration' (shorten only the demonstration, "
            "never the question).",
            TEACHER_OVERFLOW_POLICIES,
        ),
    )
    missing_teacher: str = field(
        default="error",
        metadata=_knob(
            "A sample whose metadata lacks a teacher prompt: 'error' stops the run naming the sample, 'exclude' "
            "keeps it for rollout but leaves it out of the distillation loss (numerator and denominator).",
            MISSING_TEACHER_POLICIES,
        ),
    )
    chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata=_knob(
            "Rows (completion tokens) per chunk of the full-vocabulary and top-K computations; peak extra memory "
            "is a small multiple of chunk_size x vocabulary shard (>= 1)."
        ),
    )
    host_memory_budget_gb: Optional[float] = field(
        default=None,
        metadata=_knob(
            "Host memory (GiB per node) the training ranks may keep: weight backups, EMA shadow, teacher store, "
            "offloaded optimizer state (checked when the actors start); unset means 90% of the memory available on "
            "the node then (MemAvailable, or the container's cgroup room if smaller)."
        ),
    )
    vocab_term_clip: Optional[float] = field(
        default=None,
        metadata=_knob(
            "full_vocab + forward_kl only: clamp each vocabulary entry's term T_v (log T_v - log S_v) at this value "
            "before the sum over the vocabulary, as OPSD's jsd_token_clip does (clamped entries give no gradient, "
            "and the per-token loss can go negative); unset means no clamp."
        ),
    )
    teacher_chat_template_kwargs: Optional[dict] = field(
        default=None,
        metadata=_knob(
            "JSON object of chat-template arguments for rendering the teacher prompt (e.g. "
            "'{\"enable_thinking\": true}', as OPSD's teacher reads its prompt in thinking mode); unset means the "
            "student's --apply-chat-template-kwargs."
        ),
    )

    teacher_context: str = field(
        default="static",
        metadata=_knob(
            "How each sample's teacher prompt is built: 'static' (the row's own teacher prompt, "
            "--self-distill-teacher-prompt-key), 'sdpo' (SDPO's reprompt from the rollout group after rewards: a "
            "successful sibling's response and/or the reward function's feedback) or 'self_revision' (SD-Zero's: the "
            "student's own prompt and response, then a revision phrase chosen by its reward, then the response "
            "again).",
            TEACHER_CONTEXTS,
        ),
    )
    teacher_context_path: Optional[str] = field(
        default=None,
        metadata=_knob(
            "module.function of your own teacher-context builder, fn(args, group) -> one teacher prompt (a string "
            "or chat messages, rendered like the student's) or None (no teacher) per sample of the group (the samples "
            "sharing group_index, after rewards); replaces --self-distill-teacher-context."
        ),
    )
    success_threshold: float = field(
        default=1.0,
        metadata=_knob("sdpo and self_revision (and the SD-Zero collection): a response is successful / correct when "
                       "its reward (slime's, --reward-key honoured) is >= this."),
    )
    dont_reprompt_on_self_success: bool = field(
        default=True,
        metadata=_knob("sdpo: a response's solution is the first successful response of its group other than itself "
                       "(false: the first successful one, possibly itself)."),
    )
    remove_thinking: bool = field(
        default=True,
        metadata=_knob("sdpo: remove every <think>...</think> block and the whitespace after it from the solution."),
    )
    feedback: str = field(
        default="without_solution",
        metadata=_knob(
            "sdpo: when the reward function's feedback (a non-empty string in the reward dict's 'feedback' or in "
            "sample.metadata['feedback']) goes into the reprompt: 'off', 'without_solution' (only for a response "
            "that has no solution) or 'always'.",
            FEEDBACK_USES,
        ),
    )
    reprompt_template: str = field(
        default=SDPO_REPROMPT_TEMPLATE,
        metadata=_knob("sdpo: the teacher's last user message; fields {prompt} (the student's last user message), "
                       "{solution} and {feedback} (the sections below, or empty)."),
    )
    solution_template: str = field(
        default=SDPO_SOLUTION_TEMPLATE,
        metadata=_knob("sdpo: the solution section; field {successful_previous_attempt}."),
    )
    feedback_template: str = field(
        default=SDPO_FEEDBACK_TEMPLATE,
        metadata=_knob("sdpo: the feedback section; field {feedback_raw}."),
    )
    revision_phrase_correct: str = field(
        default="Let me rephrase the above solution.",
        metadata=_knob("self_revision: the phrase P_r after a response whose reward is >= --self-distill-success-"
                       "threshold (SD-Zero's, for Qwen models)."),
    )
    revision_phrase_wrong: str = field(
        default="Wait, this response is wrong. Let me correct it.",
        metadata=_knob("self_revision: the phrase P_r after a response below the threshold (SD-Zero's, for Qwen "
                       "models; its OLMo phrase is 'Wrong. I need to redo all.')."),
    )
    revision_output: Optional[str] = field(
        default=None,
        metadata=_knob("SD-Zero phase 1 collection (slime_self_distill.sd_zero_collect): the JSON-lines file the kept "
                       "self-revision tuples are written to, rewritten atomically after every rollout and resumed when "
                       "it exists."),
    )
    revision_target: int = field(
        default=6000,
        metadata=_knob("SD-Zero phase 1 collection: stop after this many kept tuples (the official 6000; >= 1)."),
    )
    revisions_per_attempt: int = field(
        default=3,
        metadata=_knob("SD-Zero phase 1 collection: revisions sampled per revised first attempt (the official "
                       "script's 3; >= 1)."),
    )
    revise_correct: bool = field(
        default=False,
        metadata=_knob("SD-Zero phase 1 collection: revise correct first attempts too (with the 'correct' phrase); "
                       "the official default revises wrong ones only."),
    )
    rl_combination: str = field(
        default="none",
        metadata=_knob(
            "How the distillation loss D meets slime's own policy loss P (--advantage-estimator, e.g. grpo): "
            "'none' (D only, as the official SDPO), 'hybrid' ((1 - w) * P + w * D, the form of TRL's SDPO) or "
            "'additive' (P + w * D), w = --self-distill-weight; D is the mean over the samples with a teacher.",
            RL_COMBINATIONS,
        ),
    )
    weight: float = field(
        default=1.0,
        metadata=_knob("w of --self-distill-rl-combination hybrid (in [0, 1]) or additive (>= 0)."),
    )

    offline_topk_path: Optional[str] = field(
        default=None,
        metadata=_knob(
            "Offline top-K distillation: the teacher top-K file written by python -m "
            "slime_self_distill.extract_teacher_topk. Training then runs slime's SFT rollout over the data file "
            "written beside it, and the loss is cross-entropy (slime's sft_loss) + --self-distill-kd-weight x the "
            "top-K divergence to the stored teacher; no teacher runs in training."
        ),
    )
    kd_weight: float = field(
        default=1.0,
        metadata=_knob("lambda of offline top-K distillation's loss, cross-entropy + lambda x KD (>= 0)."),
    )
    kd_token_weight: str = field(
        default="uniform",
        metadata=_knob(
            "Per-token weight of the KD term of offline top-K distillation: 'uniform', or 'teacher_target_prob' (the "
            "teacher's probability of the data's target token, detached: the KD term counts where the teacher agrees "
            "with the target; 0 where the target is outside the stored top-K).",
            KD_TOKEN_WEIGHTS,
        ),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_type(f, value)
            if value is not None and _scalar_type(f) is float:
                object.__setattr__(self, f.name, float(value))  # YAML may give 1 for 1.0
        _validate(self)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_args(cls, args: Any) -> "SelfDistillConfig":
        """Build from slime's ``args``: flags or YAML keys; defaults fill anything absent.

        A ``self_distill_*`` attribute that is not a knob (a misspelt YAML key) is an error, because slime would
        otherwise carry it silently.
        """
        retired = sorted(k for k in vars(args) if k in RETIRED_SETTINGS and getattr(args, k) is not None)
        if retired:
            raise ConfigError("; ".join(retired_setting_message(k) for k in retired))
        unknown = sorted(k for k in vars(args) if looks_like_a_setting(k) and k not in SETTING_KEYS
                         and k not in RETIRED_SETTINGS)
        if unknown:
            hints = "; ".join(f"{key!r}: did you mean {closest_setting(key)!r}?" for key in unknown)
            raise ConfigError(
                f"unknown self-distillation setting(s) (from a flag or --custom-config-path YAML key): {hints} "
                f"Valid keys: {', '.join(sorted(SETTING_KEYS))}"
            )
        values = {}
        for f in dataclasses.fields(cls):
            value = getattr(args, ARG_PREFIX + f.name, None)
            if value is not None:
                values[f.name] = value
        return cls(**values)

    def to_args_dict(self) -> dict:
        """``{'self_distill_<name>': value}``: the YAML keys / ``args`` attributes of this configuration."""
        return {ARG_PREFIX + k: v for k, v in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        """The settings that differ from the defaults, as ``name=value`` (for start-up lines)."""
        changed = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return ", ".join(changed) or "all defaults"

    @staticmethod
    def explicit_settings(args: Any) -> set:
        """The knobs ``args`` sets (flags given or YAML keys), as field names."""
        return {f.name for f in dataclasses.fields(SelfDistillConfig)
                if getattr(args, ARG_PREFIX + f.name, None) is not None}

    def ineffective_settings(self, explicit: set) -> list:
        """Warnings for knobs that were set but do nothing in this configuration (e.g. topk with full_vocab)."""
        why_not = {
            "topk": None if self.kl_scope == "topk" else f"{flag_name('kl_scope')} is {self.kl_scope}",
            "alpha": None if self.divergence in ("alpha_js", "mixed_kl")
            else f"{flag_name('divergence')} is {self.divergence}",
            "topk_tail": None if self.kl_scope == "topk" else f"{flag_name('kl_scope')} is {self.kl_scope}",
            "sampled_ratio_cap": None if (self.kl_scope, self.divergence) == ("sampled_token", "forward_kl")
            else "it applies to sampled_token with forward_kl only",
            "ema_rate": None if self.teacher == "ema" else f"{flag_name('teacher')} is {self.teacher}",
            "ema_update_interval": None if self.teacher == "ema" else f"{flag_name('teacher')} is {self.teacher}",
            "importance_cap": None if self.importance_correction != "off"
            else f"{flag_name('importance_correction')} is off",
            "topk_support": None if self.kl_scope == "topk" else f"{flag_name('kl_scope')} is {self.kl_scope}",
            "chunk_size": None if self.kl_scope != "sampled_token" else f"{flag_name('kl_scope')} is sampled_token",
            "teacher_overflow": None if self.max_teacher_prompt_len is not None
            else f"{flag_name('max_teacher_prompt_len')} is unset",
            "weight": None if self.rl_combination != "none" else f"{flag_name('rl_combination')} is none",
        }
        uses_row_prompt = self.teacher_context == "static" and self.teacher_context_path is None
        for name in ("teacher_prompt_key", "missing_teacher"):
            why_not[name] = None if uses_row_prompt else (
                "the teacher prompt is built after rewards, not read from the row")
        for name in SDPO_SETTINGS:
            why_not[name] = None if self.builds_sdpo_context else "the teacher context is not sdpo"
        for name in ("revision_phrase_correct", "revision_phrase_wrong"):
            why_not[name] = None if self.builds_self_revision_context else "the teacher context is not self_revision"
        if self.builds_self_revision_context:
            why_not["success_threshold"] = None
        if self.offline:  # no teacher runs in training, and the data are slime's SFT rows
            for name in ONLINE_TEACHER_SETTINGS:
                why_not[name] = f"{flag_name('offline_topk_path')} is set: the teacher is the stored top-K"
        return [f"{flag_name(name)} has no effect: {reason}" for name, reason in why_not.items()
                if reason is not None and name in explicit]

    def check_explicit(self, explicit: set) -> None:
        """What only the set of knobs given reveals: offline distillation's knobs without its file."""
        offline_only = sorted(name for name in explicit & set(OFFLINE_SETTINGS))
        if offline_only and not self.offline:
            raise ConfigError(
                f"{', '.join(flag_name(name) for name in offline_only)} belong{'s' if len(offline_only) == 1 else ''} "
                f"to offline top-K distillation: give {flag_name('offline_topk_path')} <the teacher_topk.parquet "
                "written by python -m slime_self_distill.extract_teacher_topk>, or drop them"
            )

    @property
    def offline(self) -> bool:
        """Offline top-K distillation (``--self-distill-offline-topk-path``): SFT + KD on a stored teacher."""
        return self.offline_topk_path is not None

    @property
    def builds_sdpo_context(self) -> bool:
        return self.teacher_context == "sdpo" and self.teacher_context_path is None

    @property
    def builds_self_revision_context(self) -> bool:
        return self.teacher_context == "self_revision" and self.teacher_context_path is None

    @property
    def needs_raw_student_prompt(self) -> bool:
        """The context rewrites the student's raw prompt (SDPO), may read it (a user-defined builder), or SD-Zero's
        collection records it with each tuple."""
        return self.builds_sdpo_context or self.teacher_context_path is not None or self.revision_output is not None

    @property
    def collects_revisions(self) -> bool:
        """An SD-Zero phase-1 collection run (``--self-distill-revision-output``): no teacher reads the rollouts."""
        return self.revision_output is not None

    @property
    def teacher_prompt_from_row(self) -> bool:
        """The teacher prompt is the row's own (``static``), rather than built from the rollout group."""
        return self.teacher_context == "static" and self.teacher_context_path is None

    @property
    def alpha_js_weight(self) -> float:
        """The effective alpha: forward_kl is alpha 0, reverse_kl is alpha 1 (the GKD/TRL special cases)."""
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.divergence, self.alpha)


OFFLINE_SETTINGS = ("kd_weight", "kd_token_weight")
# What only an online teacher (one that runs in training, on a teacher prompt) reads.
ONLINE_TEACHER_SETTINGS = ("teacher", "ema_rate", "ema_update_interval", "teacher_prompt_key", "max_teacher_prompt_len",
                           "teacher_overflow", "missing_teacher", "teacher_chat_template_kwargs", "teacher_context",
                           "teacher_context_path", "num_loss_tokens_to_skip", "top_entropy_quantile",
                           "host_memory_budget_gb")
SDPO_SETTINGS = ("success_threshold", "dont_reprompt_on_self_success", "remove_thinking", "feedback",
                 "reprompt_template", "solution_template", "feedback_template")
SDPO_TEMPLATE_FIELDS = {
    "reprompt_template": (("prompt",), ("solution", "feedback")),  # (required, optional)
    "solution_template": (("successful_previous_attempt",), ()),
    "feedback_template": (("feedback_raw",), ()),
}

# (args, its config): slime passes one args object per process. The object itself is held and compared, not its id(),
# which a new object can reuse once the old one is freed (tests build many).
_config_of_args: Optional[tuple] = None


def config_of(args: Any) -> "SelfDistillConfig":
    """``SelfDistillConfig.from_args(args)``, parsed once per args object (for hooks slime calls per sample or per
    micro-batch)."""
    global _config_of_args
    if _config_of_args is None or _config_of_args[0] is not args:
        _config_of_args = (args, SelfDistillConfig.from_args(args))
    return _config_of_args[1]


SETTING_KEYS = frozenset(ARG_PREFIX + f.name for f in dataclasses.fields(SelfDistillConfig))
# Settings that existed once: giving one is an error that says what replaced it (not an "unknown setting").
RETIRED_SETTINGS = {
    ARG_PREFIX + "full_vocab_storage_dtype": (
        "is gone: the full_vocab scope no longer stores the teacher's log-probabilities; it keeps the teacher's "
        "final hidden states (in the model's dtype) and recomputes the exact logits in the loss; remove the setting"
    ),
}


def retired_setting_message(key: str) -> Optional[str]:
    """What replaced a retired setting, given as its YAML key / args attribute or its flag; None for any other key."""
    attribute = key[2:].replace("-", "_") if key.startswith("--") else key
    if attribute not in RETIRED_SETTINGS:
        return None
    return f"{attribute} ({flag_name(attribute.removeprefix(ARG_PREFIX))}) {RETIRED_SETTINGS[attribute]}"


def looks_like_a_setting(key: str) -> bool:
    """A name meant as a self-distillation setting: it starts with 'self' or mentions 'distil' (any spelling)."""
    normalized = key.lower().replace("-", "_")
    return normalized.startswith("self") or "distil" in normalized


def closest_name(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> Optional[str]:
    """The candidate a misspelt ``name`` most likely means (for "did you mean" hints), or None."""
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=cutoff)
    return close[0] if close else None


def closest_setting(key: str) -> Optional[str]:
    """The setting key a misspelt or unprefixed key most likely means (``topk`` -> ``self_distill_topk``)."""
    normalized = key.lower().replace("-", "_")
    if ARG_PREFIX + normalized in SETTING_KEYS:
        return ARG_PREFIX + normalized
    return closest_name(normalized, SETTING_KEYS)


def add_self_distill_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register every ``--self-distill-*`` flag; returns the parser (slime's ``add_custom_arguments`` contract).

    Flags default to ``None`` so that ``SelfDistillConfig.from_args`` can tell "not given" from a value and fill
    the configuration's own default.
    """
    group = parser.add_argument_group("self-distillation (slime_self_distill)")
    for f in dataclasses.fields(SelfDistillConfig):
        default = f.default
        shown = "unset" if default is None else default
        if isinstance(default, str) and "\n" in default:
            shown = repr(default)  # a template: its newlines visible
        group.add_argument(
            flag_name(f.name),
            dest=ARG_PREFIX + f.name,
            type=_argparse_type(f),
            choices=f.metadata["choices"],
            default=None,
            help=f"{f.metadata['help']} (default: {shown})".replace("%", "%%"),  # argparse %-formats help
        )
    for key in RETIRED_SETTINGS:  # accepted, so that from_args can say what replaced them
        group.add_argument(flag_name(key.removeprefix(ARG_PREFIX)), dest=key, default=None, help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------- validation
_SCALAR_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "Optional[int]": int,
                 "Optional[float]": float, "Optional[str]": str, "Optional[dict]": dict}
_TRUE_WORDS, _FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _scalar_type(f: dataclasses.Field) -> type:
    return _SCALAR_TYPES[f.type]  # annotations are strings (``from __future__ import annotations``)


def json_object(text: str) -> dict:
    """argparse type of a dict knob: a JSON object on the command line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def boolean(text: str) -> bool:
    """argparse type of a bool knob: true/false (also 1/0, yes/no, on/off)."""
    if text.lower() in _TRUE_WORDS:
        return True
    if text.lower() in _FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _argparse_type(f: dataclasses.Field):
    scalar = _scalar_type(f)
    return {dict: json_object, bool: boolean}.get(scalar, scalar)


def _check_type(f: dataclasses.Field, value: Any) -> None:
    if value is None and "Optional" in str(f.type):
        return
    expected = _scalar_type(f)
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected) and not isinstance(value, bool)
    if not ok:
        hint = f"write it as a plain {expected.__name__} in the YAML file"
        if expected is bool:
            hint = "write true or false (unquoted) in the YAML file"
        if isinstance(value, bool) and expected is str:
            hint = f"YAML reads off/on/yes/no as booleans: quote it ('{'on' if value else 'off'}')"
        raise ConfigError(
            f"{flag_name(f.name)} (YAML key {ARG_PREFIX + f.name}) must be {expected.__name__}, got "
            f"{value!r} of type {type(value).__name__}; {hint}"
        )


def _fail(name: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{flag_name(name)}: {problem}; {fix}")


def _validate(c: SelfDistillConfig) -> None:
    for f in dataclasses.fields(c):
        choices = f.metadata["choices"]
        if choices and getattr(c, f.name) not in choices:
            _fail(f.name, f"got {getattr(c, f.name)!r}", f"choose one of {', '.join(choices)}")
    if not 0.0 <= c.alpha <= 1.0:
        _fail("alpha", f"got {c.alpha}, outside [0, 1]", "use 0 for forward KL, 1 for reverse KL, 0.5 for JSD")
    if c.divergence == "mixed_kl" and c.kl_scope != "topk":
        _fail("divergence", f"mixed_kl with {flag_name('kl_scope')} {c.kl_scope}",
              "mixed_kl is computed on the top-K support: use --self-distill-kl-scope topk, or alpha_js")
    if c.topk < 1:
        _fail("topk", f"got {c.topk}", "use K >= 1 (e.g. 20 or 64)")
    if not c.teacher_prompt_key:
        _fail("teacher_prompt_key", "is empty", "name the metadata key that holds the teacher prompt")
    if not 0.0 < c.top_entropy_quantile <= 1.0:
        _fail("top_entropy_quantile", f"got {c.top_entropy_quantile}, outside (0, 1]",
              "use 1.0 to keep every token, or e.g. 0.2 to keep the 20% highest-entropy tokens")
    if c.num_loss_tokens_to_skip < 0:
        _fail("num_loss_tokens_to_skip", f"got {c.num_loss_tokens_to_skip}", "use 0 or a positive count")
    if c.importance_cap <= 0:
        _fail("importance_cap", f"got {c.importance_cap}", "use a cap > 0 (the SDFT default is 2)")
    if c.sampled_ratio_cap <= 0:
        _fail("sampled_ratio_cap", f"got {c.sampled_ratio_cap}", "use a cap > 0 (e.g. 10)")
    if not 0.0 < c.ema_rate <= 1.0:
        _fail("ema_rate", f"got {c.ema_rate}, outside (0, 1]", "use e.g. 0.01 (SDFT) or 0.05 (SDPO)")
    if c.max_teacher_prompt_len is not None and c.max_teacher_prompt_len < 1:
        _fail("max_teacher_prompt_len", f"got {c.max_teacher_prompt_len}",
              "use a positive token count or leave it unset")
    if c.teacher_overflow == "truncate_demonstration" and c.max_teacher_prompt_len is None:
        _fail("teacher_overflow", "'truncate_demonstration' needs a budget",
              f"also set {flag_name('max_teacher_prompt_len')}")
    if c.chunk_size < 1:
        _fail("chunk_size", f"got {c.chunk_size}", "use a positive number of rows (e.g. 256)")
    if c.host_memory_budget_gb is not None and c.host_memory_budget_gb <= 0:
        _fail("host_memory_budget_gb", f"got {c.host_memory_budget_gb}", "use a positive size in GiB or leave it unset")
    if c.vocab_term_clip is not None:
        if not (c.kl_scope == "full_vocab" and c.divergence == "forward_kl"):
            _fail("vocab_term_clip", f"is set with {flag_name('kl_scope')} {c.kl_scope} and {flag_name('divergence')} "
                  f"{c.divergence}", "it clamps the per-entry terms of the full-vocabulary forward KL only: use "
                  "full_vocab with forward_kl, or leave it unset")
        if c.vocab_term_clip <= 0:
            _fail("vocab_term_clip", f"got {c.vocab_term_clip}", "use a positive clamp (OPSD uses 0.05) or leave it unset")
    if c.teacher_context_path is not None:
        if c.teacher_context != "static":
            _fail("teacher_context_path", f"is set together with {flag_name('teacher_context')} {c.teacher_context}",
                  "a user-defined builder replaces the built-in contexts: drop one of the two")
        if "." not in c.teacher_context_path.strip("."):
            _fail("teacher_context_path", f"got {c.teacher_context_path!r}",
                  "give module.function, e.g. my_pkg.contexts.build")
        if c.teacher_overflow == "truncate_demonstration":
            _fail("teacher_overflow", "'truncate_demonstration' cannot shorten a prompt a user-defined builder made",
                  f"use error or drop with {flag_name('teacher_context_path')}")
    if c.teacher_context == "self_revision" and c.teacher_overflow == "truncate_demonstration":
        _fail("teacher_overflow", "'truncate_demonstration' with the self_revision context, whose teacher prompt "
              "is the student's prompt and response", "use error or drop")
    if c.revision_target < 1:
        _fail("revision_target", f"got {c.revision_target}", "use a positive number of tuples (the official 6000)")
    if c.revisions_per_attempt < 1:
        _fail("revisions_per_attempt", f"got {c.revisions_per_attempt}", "use 1 or more (the official script's 3)")
    if c.revision_output is not None and not c.revision_output.strip():
        _fail("revision_output", "is empty", "give the path of the JSON-lines file of kept tuples")
    for name in ("revision_phrase_correct", "revision_phrase_wrong"):
        if not getattr(c, name).strip():
            _fail(name, "is empty", "give the revision phrase the teacher reads between the two copies of the response")
    for name, (required, optional) in SDPO_TEMPLATE_FIELDS.items():
        try:
            check_template(getattr(c, name), origin=flag_name(name), fields=required, optional=optional)
        except TemplateError as error:
            raise ConfigError(str(error)) from None
    if c.rl_combination == "hybrid" and not 0.0 <= c.weight <= 1.0:
        _fail("weight", f"got {c.weight}, outside [0, 1] for hybrid",
              "hybrid mixes (1 - w) * policy + w * distillation")
    if c.weight < 0:
        _fail("weight", f"got {c.weight}", "use a weight >= 0")
    if c.kd_weight < 0:
        _fail("kd_weight", f"got {c.kd_weight}", "use a weight >= 0 (0 trains on the cross-entropy alone)")
    if c.offline_topk_path is not None:
        if not c.offline_topk_path.strip():
            _fail("offline_topk_path", "is empty", "give the teacher_topk.parquet written by extract_teacher_topk")
        if c.kl_scope != "topk":
            _fail("offline_topk_path", f"is set with {flag_name('kl_scope')} {c.kl_scope}",
                  f"the stored teacher is its top-K: set {flag_name('kl_scope')} topk (configs/offline_topk_kd.yaml)")
        if c.topk_support != "teacher":
            _fail("topk_support", f"is {c.topk_support} with {flag_name('offline_topk_path')}",
                  "the stored top-K is the teacher's: use teacher")
        if c.rl_combination != "none":
            _fail("rl_combination", f"is {c.rl_combination} with {flag_name('offline_topk_path')}",
                  "offline distillation trains on SFT data, which has no rewards: use none")
        if c.importance_correction != "off":
            _fail("importance_correction", f"is {c.importance_correction} with {flag_name('offline_topk_path')}",
                  "SFT data is not sampled by the rollout engine: use off")
    if c.rl_combination != "none" and c.num_loss_tokens_to_skip:
        _fail("num_loss_tokens_to_skip", f"is {c.num_loss_tokens_to_skip} with {flag_name('rl_combination')} "
              f"{c.rl_combination}", "the skipped tokens would leave slime's policy loss too (they leave the loss "
              "mask): use 0 when combining with the policy loss")
