"""Start-up check that the slime functions the plugin wraps or calls are the ones it was written against.

The Megatron hooks replace module globals of slime and rely on a few facts of slime's control flow (which tag
triggers the teacher pass, with which store prefix, in which order things run). A slime release that renames a
function, changes its parameters or moves those calls would otherwise break the plugin silently or deep inside
a training step. ``verify()`` runs in every training actor before any patch is installed and stops with one
message listing every difference, the installed slime version and the commit this module was checked against.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

CHECKED_SLIME_COMMIT = "624b824a898ab0ec1fcb4d373004c7f3852bf515"
CHECKED_SLIME_VERSION = "0.3.1"

_ACTOR = "slime.backends.megatron_utils.actor"
_MODEL = "slime.backends.megatron_utils.model"
_DATA = "slime.backends.megatron_utils.data"
_LOSS = "slime.backends.megatron_utils.loss"
_BACKUPER = "slime.utils.tensor_backper"
_METRICS = "slime.observability.train_metric_utils"
_DEBUG_DUMP = "slime.observability.train_data_utils"
_DISTRIBUTED = "slime.utils.distributed_utils"
_ROLLOUT_MANAGER = "slime.ray.rollout"
_LOGGING = "slime.observability.logging_utils"
_SAMPLE_HOOKS = "slime.rollout.sample_hooks"


@dataclass(frozen=True)
class ExpectedFunction:
    module: str
    qualname: str  # attribute path inside the module, e.g. "TensorBackuper.create"
    signature: str  # parameters as ``str(inspect.signature)`` prints them, annotations left out
    use: str  # what the plugin does with it


EXPECTED_FUNCTIONS = (
    ExpectedFunction(_ACTOR, "forward_only",
                     "(f, args, model, data_iterator, num_microbatches, store_prefix='', "
                     "use_rollout_top_p_replay=False)",
                     "wrapped: runs the teacher pass on the teacher sequences"),
    ExpectedFunction(_MODEL, "get_batch", "(data_iterator, keys, pad_multiplier=128, allgather_cp=False)",
                     "wrapped: adds the teacher tensors and loss weights to training batches"),
    ExpectedFunction(_MODEL, "train_one_step",
                     "(args, rollout_id, step_id, data_iterator, model, optimizer, opt_param_scheduler, "
                     "num_microbatches, step_global_batch_size, microbatch_pbar=None)",
                     "wrapped: updates the EMA teacher after each optimizer step"),
    ExpectedFunction(_ACTOR, "train",
                     "(rollout_id, model, optimizer, opt_param_scheduler, data_iterator, num_microbatches, "
                     "global_batch_sizes)",
                     "wrapped: writes the EMA teacher into the 'teacher' tag after each rollout's training"),
    ExpectedFunction(_BACKUPER, "TensorBackuper.create", "(source_getter, single_tag)",
                     "wrapped: checks host memory, sets up the teacher and hands slime the teacher-aware backuper"),
    ExpectedFunction(_BACKUPER, "_TensorBackuperNormal.backup", "(self, tag)", "called: copies weights into a tag"),
    ExpectedFunction(_BACKUPER, "_TensorBackuperNormal.get", "(self, tag)", "called: a tag's tensor dict"),
    ExpectedFunction(_BACKUPER, "_TensorBackuperNormal.restore", "(self, tag)",
                     "called: copies a tag's weights into the model"),
    ExpectedFunction(_BACKUPER, "_TensorBackuperNormal.copy", "(self, *, src_tag, dst_tag)",
                     "called: copies one tag into another"),
    ExpectedFunction(_MODEL, "initialize_model_and_optimizer", "(args, role='actor')",
                     "wrapped: records which checkpoint slime loaded (an EMA teacher resumes from it)"),
    ExpectedFunction(_MODEL, "save", "(iteration, model, optimizer, opt_param_scheduler)",
                     "wrapped: writes the EMA teacher beside each checkpoint, before slime's"),
    ExpectedFunction(_DISTRIBUTED, "get_gloo_group", "()",
                     "called: the all-ranks CPU group of the start-up checks and the teacher pass schedule"),
    ExpectedFunction(_DATA, "DataIterator.__init__", "(self, rollout_data, micro_batch_indices)",
                     "called: iterates the teacher sequences with the student's micro-batch schedule"),
    ExpectedFunction(_LOSS, "get_responses",
                     "(logits, *, args, unconcat_tokens, total_lengths, response_lengths, apply_temperature=True)",
                     "called: extracts the teacher's response logits and hidden-state rows"),
    ExpectedFunction(_LOSS, "policy_loss_function", "(args, batch, logits, sum_of_sample_mean)",
                     "called: slime's policy loss, combined with the distillation loss under "
                     "--self-distill-rl-combination hybrid or additive"),
    ExpectedFunction(_LOGGING, "log", "(args, metrics, step_key)",
                     "called by the converter: logs the teacher-context metrics of each rollout"),
    ExpectedFunction("slime.observability.metric_utils", "compute_rollout_step", "(args, rollout_id)",
                     "called by the converter: the step of the teacher-context metrics"),
    ExpectedFunction(_METRICS, "log_rollout_data", "(rollout_id, args, rollout_data)",
                     "wrapped: sees rollout data without the plugin's keys"),
    ExpectedFunction(_DEBUG_DUMP, "save_debug_train_data", "(args, *, rollout_id, rollout_data)",
                     "wrapped: dumps rollout data without the plugin's keys"),
    ExpectedFunction("slime.backends.megatron_utils.cp_utils", "slice_log_prob_with_cp",
                     "(log_prob, total_length, response_length)",
                     "called: the loss masks and the stored teacher top-K rows of this context-parallel rank"),
    ExpectedFunction("slime.utils.mask_utils", "MultiTurnLossMaskGenerator.get_loss_mask", "(self, messages, tools=None)",
                     "reproduced: extract_teacher_topk tokenizes each row as slime's SFT rollout does "
                     "(data/sft_tokens.py; the converter checks every row's digest)"),
)

# Module globals that slime's callers look up at call time; the plugin replaces them by these names.
SAME_OBJECTS = (
    ((_ACTOR, "forward_only"), (_MODEL, "forward_only")),
    ((_ACTOR, "train"), (_MODEL, "train")),
    ((_MODEL, "get_batch"), (_DATA, "get_batch")),
    ((_ACTOR, "TensorBackuper"), (_BACKUPER, "TensorBackuper")),
    ((_ACTOR, "initialize_model_and_optimizer"), (_MODEL, "initialize_model_and_optimizer")),
    ((_ACTOR, "save"), (_MODEL, "save")),
    ((_ACTOR, "train_metric_utils"), (_METRICS, None)),
    ((_ACTOR, "train_data_utils"), (_DEBUG_DUMP, None)),
)

# Facts of slime's control flow the hooks rely on, as (module, function, snippets in the order they must appear).
SOURCE_FACTS = (
    (_ACTOR, "MegatronTrainRayActor.init",
     ("initialize_model_and_optimizer(", "TensorBackuper.create(", 'self.weights_backuper.backup("actor")',
      'self.load_other_checkpoint("ref"', 'self.load_other_checkpoint("teacher"'),
     "the backuper is created once slime loaded --load into the model, before any backup and before the reference "
     "and OPD teacher checkpoints load"),
    (_ACTOR, "MegatronTrainRayActor.load_other_checkpoint", ("load_checkpoint(", "self.weights_backuper.backup("),
     "another checkpoint is loaded into the model, then backed up under its tag (the model keeps it)"),
    (_ACTOR, "MegatronTrainRayActor.train_actor",
     ('"teacher" in self.weights_backuper.backup_tags', 'self._switch_model("teacher")', 'store_prefix="teacher_"',
      'self._switch_model("old_actor" if self.args.keep_old_actor else "actor")',
      "compute_advantages_and_returns(", "train_metric_utils.log_rollout_data(", "train(",
      "train_data_utils.save_debug_train_data(", 'self.weights_backuper.backup("actor")'),
     "a 'teacher' tag triggers the teacher pass (store prefix 'teacher_'), then the swap back to the student, before "
     "metrics and training; the student is backed up after training"),
    (_ACTOR, "MegatronTrainRayActor.save_model", ("save(",), "checkpoints go through the module global save"),
    (_ACTOR, "MegatronTrainRayActor.compute_log_prob", ("forward_only(",),
     "log-prob passes go through the module global forward_only"),
    (_MODEL, "forward_only", ("get_batch(", "forward_backward_func(", 'rollout_data[f"{store_prefix}{key}"]'),
     "forward_only stores its post-processor's outputs under store_prefix + key"),
    (_MODEL, "train_one_step", ("get_batch(", '"teacher_log_probs"', "optimizer.step()"),
     "training batches request teacher_log_probs through the module global get_batch"),
    (_MODEL, "train", ("train_one_step(",), "train runs the module global train_one_step per optimizer step"),
    (_SAMPLE_HOOKS, "set_current_rollout_id", ("global _current_rollout_id", "_current_rollout_id = rollout_id"),
     "the current rollout id is the module global _current_rollout_id (the converter reads it for its metrics' step)"),
    (_ROLLOUT_MANAGER, "RolloutManager.generate",
     ("set_current_rollout_id(rollout_id)", "log_rollout_data(", "self._convert_samples_to_train_data("),
     "the rollout id is set before the rollout, and slime logs the rollout's metrics before the converter runs "
     "(so the converter logs the teacher-context metrics itself, at the same step)"),
)


class SlimeCompatibilityError(RuntimeError):
    """The installed slime differs from the one the plugin was checked against."""


def installed_slime_version() -> str:
    """slime's version from its package metadata (slime defines no ``__version__``) and where it is installed."""
    from importlib import metadata

    try:
        version = metadata.version("slime")
    except metadata.PackageNotFoundError:
        version = "unknown (no package metadata)"
    try:
        location = importlib.import_module("slime").__file__
    except ImportError:
        location = "not importable"
    return f"{version} ({location})"


def _resolve(module_name: str, qualname: str | None):
    obj = importlib.import_module(module_name)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


def signature_text(function) -> str:
    """``str(inspect.signature(function))`` without annotations or return annotation."""
    signature = inspect.signature(function)
    parameters = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty))


def find_incompatibilities() -> list[str]:
    """Every difference between the installed slime and the checked one, as readable lines (empty: compatible)."""
    problems = []
    for expected in EXPECTED_FUNCTIONS:
        name = f"{expected.module}.{expected.qualname}"
        try:
            found = signature_text(_resolve(expected.module, expected.qualname))
        except (ImportError, AttributeError) as error:
            problems.append(f"{name} is missing ({error}); the plugin {expected.use}")
            continue
        except (TypeError, ValueError) as error:
            problems.append(f"{name} has no inspectable signature ({error}); the plugin {expected.use}")
            continue
        if found != expected.signature:
            problems.append(
                f"{name}{found} differs from the checked {name}{expected.signature}; the plugin {expected.use}"
            )
    for (module_a, name_a), (module_b, name_b) in SAME_OBJECTS:
        try:
            same = _resolve(module_a, name_a) is _resolve(module_b, name_b)
        except (ImportError, AttributeError) as error:
            problems.append(f"{module_a}.{name_a} cannot be resolved ({error})")
            continue
        if not same:
            target = f"{module_b}.{name_b}" if name_b else module_b
            problems.append(
                f"{module_a}.{name_a} is no longer {target} (or a plugin replaced it before this check); the hooks "
                f"replace {module_a}.{name_a} as the name slime calls"
            )
    for module_name, qualname, snippets, fact in SOURCE_FACTS:
        name = f"{module_name}.{qualname}"
        try:
            source = inspect.getsource(_resolve(module_name, qualname))
        except (ImportError, AttributeError, OSError, TypeError) as error:
            problems.append(f"cannot read the source of {name} ({error}); needed to check that {fact}")
            continue
        position = 0
        for snippet in snippets:
            found_at = source.find(snippet, position)
            if found_at < 0:
                problems.append(f"{name} no longer contains {snippet!r} (in this order); the hooks rely on: {fact}")
                break
            position = found_at + len(snippet)
    return problems


def verify() -> str:
    """Raise ``SlimeCompatibilityError`` naming every difference, the installed slime and the checked commit;
    return the installed slime's version (for the start-up log) when there is none."""
    problems = find_incompatibilities()
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise SlimeCompatibilityError(
            f"slime_self_distill's Megatron hooks were checked against slime {CHECKED_SLIME_VERSION} at commit "
            f"{CHECKED_SLIME_COMMIT}; the installed slime {installed_slime_version()} differs:\n{listing}\n"
            f"Install slime at that commit, or re-check the hooks (slime_self_distill/megatron_hooks.py) against "
            f"this slime and update slime_self_distill/trainer/slime_compat.py."
        )
    return installed_slime_version()
