"""Host memory of the training ranks: what each keeps on the host, summed per node, against what the node has.

Pure Python + torch dtypes; no slime import. The training actors call ``check_nodes`` once at start-up, when slime
creates its weights backuper: every rank then knows its own parameter shards (``TensorInfo``), nothing of the
weight backups is allocated yet, and the first rollout has not run. Per rank (``rank_host_memory``):

held for the whole run
    slime's pinned weight backups: ``"actor"`` always, ``"ref"`` with a KL term (``--kl-coef`` / ``--use-kl-loss``),
    ``"teacher"`` for a frozen (``--opd-teacher-load``) or EMA teacher, ``"old_actor"`` / ``"rollout_actor"`` with
    ``--keep-old-actor``. Each is the rank's parameter shard in the parameter dtype, allocated tensor by tensor by
    PyTorch's caching host allocator, which rounds every pinned block up to a power of two (``pinned_bytes``);
    the EMA teacher's fp32 shadow (4 B/parameter, pageable: exact);
    ``--optimizer-cpu-offload``: the fp32 gradient copies and Adam moments (12 B per offloaded element) that the first
    optimizer step allocates; the fp32 parameter copies exist already when the check runs, so they are part of the
    measured available memory, not of the estimate.
only while the actors sleep (``--offload-train``, the default with ``--colocate``)
    torch_memory_saver's CPU backup of the GPU optimizer state (fp32 main parameters + Adam moments, 12 B per element
    of the rank's optimizer shard); slime's parameter and gradient buffers are excluded from it.
only from the teacher pass to the end of training (last pipeline stage)
    the teacher store, per response token (``teacher_outputs.host_bytes_per_token``): the final hidden state (H
    values in the model's dtype) for 'full_vocab' and the student / union top-K supports, or K fp32 values + K int32
    ids for the teacher's own top-K when that is smaller; each TP rank keeps its block of 1/TP of the rows.

The node's peak is the sum over its ranks of what is held for the whole run plus the larger of the two phases. It is
compared with ``--self-distill-host-memory-budget-gb``, else with 90% of the memory available on the node when the
check runs (the larger reading of its ranks: the last rank to arrive sees the others' start-up done): MemAvailable,
or the room left in the container's cgroup when that is smaller.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from slime_self_distill.config import ConfigError, SelfDistillConfig, flag_name
from slime_self_distill.trainer.teacher_outputs import (
    host_bytes_per_token,
    model_dtype_bytes,
    teacher_signal,
)

GIB = 1 << 30
AVAILABLE_FRACTION = 0.9  # of the measured available memory, when no budget is given
ADAM_MOMENTS_BYTES = 8  # two fp32 moments per optimizer element
FP32_BYTES = 4

ALWAYS, WHILE_ASLEEP, WHILE_TRAINING = "whole run", "while the actors sleep", "teacher pass to end of training"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the rank's weight shard, as slime's weights backuper copies it."""

    name: str
    numel: int
    element_size: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_size


@dataclass(frozen=True)
class Parallel:
    """The rank's place in the parallel layout (what sizes its optimizer shard and its share of the teacher store)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    expert_dp: int = 1
    last_pipeline_stage: bool = True


@dataclass(frozen=True)
class Item:
    what: str
    nbytes: int
    phase: str = ALWAYS


@dataclass(frozen=True)
class RankHostMemory:
    items: tuple[Item, ...]

    def phase_bytes(self, phase: str) -> int:
        return sum(item.nbytes for item in self.items if item.phase == phase)


@dataclass
class NodeHostMemory:
    host: str
    ranks: list[RankHostMemory] = field(default_factory=list)
    available_bytes: int = 0

    def phase_bytes(self, phase: str) -> int:
        return sum(rank.phase_bytes(phase) for rank in self.ranks)

    @property
    def peak_bytes(self) -> int:
        return self.phase_bytes(ALWAYS) + max(self.phase_bytes(WHILE_ASLEEP), self.phase_bytes(WHILE_TRAINING))

    def by_item(self) -> dict[tuple[str, str], int]:
        totals: dict[tuple[str, str], int] = {}
        for rank in self.ranks:
            for item in rank.items:
                totals[item.what, item.phase] = totals.get((item.what, item.phase), 0) + item.nbytes
        return totals


def pinned_bytes(nbytes: int) -> int:
    """Bytes PyTorch's caching host allocator reserves for a pinned tensor of ``nbytes``: the next power of two."""
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


def weight_tags(args: Any, config: SelfDistillConfig) -> list[str]:
    """The weight backups slime's train actor keeps on this rank (``MegatronTrainRayActor.init``)."""
    tags = ["actor"]
    if getattr(args, "kl_coef", 0) != 0 or getattr(args, "use_kl_loss", False):
        tags.append("ref")
    if config.teacher == "ema" or (getattr(args, "use_opd", False) and getattr(args, "opd_type", None) == "megatron"):
        tags.append("teacher")
    if getattr(args, "keep_old_actor", False):
        tags.append("old_actor")
        if getattr(args, "update_weights_interval", 1) == 1:
            tags.append("rollout_actor")
    return tags


def optimizer_elements(tensors: Sequence[TensorInfo], args: Any, parallel: Parallel) -> int:
    """Elements of this rank's optimizer shard: the distributed optimizer splits dense parameters over the
    data-parallel (x context-parallel) ranks and expert parameters over the expert data-parallel ranks."""
    if not getattr(args, "use_distributed_optimizer", False):
        return sum(t.numel for t in tensors)
    return sum(
        -(-t.numel // (parallel.expert_dp if ".experts." in t.name else parallel.dp * parallel.cp)) for t in tensors
    )


def hidden_size_of(args: Any) -> int:
    """``--hidden-size``, which chooses and sizes the teacher store; a ConfigError without it."""
    hidden_size = getattr(args, "hidden_size", None)
    if not hidden_size:
        raise ConfigError(
            "the teacher store is chosen and sized by the model's hidden size, which slime's args do not have: set "
            "--hidden-size (slime's model scripts, e.g. scripts/models/qwen3-8B.sh, do)"
        )
    return hidden_size


def cp_rank_response_rows(args: Any, cp: int) -> int:
    """The most response rows one context-parallel rank can hold of one sample: slime's zigzag split gives each rank
    two of 2 x CP equal chunks of the whole sequence, so at most 2 x ceil((prompt + response) / (2 CP)) positions,
    and never more than the response (all of it without --rollout-max-prompt-len to bound the sequence)."""
    response = args.rollout_max_response_len
    prompt = getattr(args, "rollout_max_prompt_len", None)
    if cp == 1 or prompt is None:
        return response
    return min(response, 2 * -(-(prompt + response) // (2 * cp)))


def teacher_store_bytes(args: Any, config: SelfDistillConfig, parallel: Parallel) -> int:
    """One rank's teacher store: its data-parallel share of the rollout's samples x its tensor-parallel block of the
    most response rows its context-parallel rank can hold of one sample (``cp_rank_response_rows``) x the bytes per
    response token (0 outside the last pipeline stage and for sampled_token, whose 4 B per token stay on the
    device)."""
    if not parallel.last_pipeline_stage or config.kl_scope == "sampled_token":
        return 0
    samples = args.rollout_batch_size * args.n_samples_per_prompt
    rows = -(-samples // parallel.dp) * -(-cp_rank_response_rows(args, parallel.cp) // parallel.tp)
    return rows * host_bytes_per_token(config, hidden_size_of(args), model_dtype_bytes(args))


def store_description(args: Any, config: SelfDistillConfig) -> str:
    """What the teacher store holds, for messages: 'teacher hidden-state store' or 'top-K teacher store'."""
    signal = teacher_signal(config, hidden_size_of(args), model_dtype_bytes(args))
    return {"hidden": "teacher hidden-state store", "topk": "teacher top-K store", "token": "teacher store"}[signal]


def rank_host_memory(args: Any, config: SelfDistillConfig, tensors: Sequence[TensorInfo],
                     parallel: Parallel) -> RankHostMemory:
    """What one training rank keeps on the host (module docstring)."""
    items = []
    one_tag = sum(pinned_bytes(t.nbytes) for t in tensors)
    for tag in weight_tags(args, config):
        items.append(Item(f"slime's pinned {tag!r} weight backup", one_tag))
    if config.teacher == "ema":
        items.append(Item("EMA teacher fp32 shadow", FP32_BYTES * sum(t.numel for t in tensors)))
    elements = optimizer_elements(tensors, args, parallel)
    offload_fraction = float(getattr(args, "optimizer_offload_fraction", 1.0)) \
        if getattr(args, "optimizer_cpu_offload", False) else 0.0
    if offload_fraction:
        items.append(Item("--optimizer-cpu-offload gradients + Adam moments",
                          int(offload_fraction * elements) * (FP32_BYTES + ADAM_MOMENTS_BYTES)))
    if getattr(args, "offload_train", False):
        items.append(Item("torch_memory_saver backup of the GPU optimizer state",
                          int((1 - offload_fraction) * elements) * (FP32_BYTES + ADAM_MOMENTS_BYTES), WHILE_ASLEEP))
    store = teacher_store_bytes(args, config, parallel)
    if store:
        items.append(Item(f"{store_description(args, config)} ({config.kl_scope})", store, WHILE_TRAINING))
    return RankHostMemory(tuple(items))


# ---------------------------------------------------------------------- what the node has
def meminfo_available_bytes(meminfo_text: str) -> Optional[int]:
    for line in meminfo_text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def cgroup_room_bytes(limit_text: str, usage_text: str, stat_text: str = "") -> Optional[int]:
    """Memory a cgroup may still use: its limit minus its usage without reclaimable page cache (``inactive_file``
    of memory.stat, cgroup v2, or ``total_inactive_file``, v1). None without a limit ("max", or v1's huge value)."""
    limit = limit_text.strip()
    if not limit or limit == "max" or int(limit) >= 1 << 60:
        return None
    usage = int(usage_text.strip())
    for line in stat_text.splitlines():
        key, _, value = line.partition(" ")
        if key in ("inactive_file", "total_inactive_file"):
            usage -= int(value)
            break
    return max(int(limit) - max(usage, 0), 0)


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def _cgroup_paths(proc_self_cgroup: str) -> list[tuple[str, str, str]]:
    """(limit, usage, stat) file triples for this process's memory cgroup, v2 then v1."""
    candidates = []
    for line in proc_self_cgroup.splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        path = path.strip().lstrip("/")
        if hierarchy == "0" and controllers == "":  # cgroup v2
            for base in (os.path.join("/sys/fs/cgroup", path), "/sys/fs/cgroup"):
                candidates.append((f"{base}/memory.max", f"{base}/memory.current", f"{base}/memory.stat"))
        elif "memory" in controllers.split(","):  # cgroup v1
            for base in (os.path.join("/sys/fs/cgroup/memory", path), "/sys/fs/cgroup/memory"):
                candidates.append((f"{base}/memory.limit_in_bytes", f"{base}/memory.usage_in_bytes",
                                   f"{base}/memory.stat"))
    return candidates


def available_host_memory_bytes() -> int:
    """MemAvailable (free + reclaimable), or the room left in this process's memory cgroup if that is smaller."""
    readings = []
    meminfo = _read("/proc/meminfo")
    if meminfo is not None and meminfo_available_bytes(meminfo) is not None:
        readings.append(meminfo_available_bytes(meminfo))
    else:
        readings.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    for limit_path, usage_path, stat_path in _cgroup_paths(_read("/proc/self/cgroup") or ""):
        limit, usage = _read(limit_path), _read(usage_path)
        if limit is not None and usage is not None:
            room = cgroup_room_bytes(limit, usage, _read(stat_path) or "")
            if room is not None:
                readings.append(room)
            break
    return min(readings)


# ---------------------------------------------------------------------- per node, and the verdict
def group_by_node(reports: Iterable[tuple[str, RankHostMemory, int]]) -> list[NodeHostMemory]:
    """Per host: its ranks' estimates and the largest available-memory reading of its ranks."""
    nodes: dict[str, NodeHostMemory] = {}
    for host, rank, available in reports:
        node = nodes.setdefault(host, NodeHostMemory(host))
        node.ranks.append(rank)
        node.available_bytes = max(node.available_bytes, available)
    return list(nodes.values())


def node_budget_bytes(node: NodeHostMemory, config: SelfDistillConfig) -> int:
    if config.host_memory_budget_gb is not None:
        return int(config.host_memory_budget_gb * GIB)
    return int(AVAILABLE_FRACTION * node.available_bytes)


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / (1 << 20):.1f} MiB"


def describe_node(node: NodeHostMemory, config: SelfDistillConfig) -> str:
    lines = [f"node {node.host} ({len(node.ranks)} training ranks): peak about {_gib(node.peak_bytes)}"]
    for (what, phase), nbytes in sorted(node.by_item().items(), key=lambda entry: -entry[1]):
        lines.append(f"    {_gib(nbytes):>10}  {what} ({phase})")
    where = (f"{flag_name('host_memory_budget_gb')} {config.host_memory_budget_gb}" if config.host_memory_budget_gb
             is not None else f"{AVAILABLE_FRACTION:.0%} of {_gib(node.available_bytes)} available at start-up")
    lines.append(f"    budget {_gib(node_budget_bytes(node, config))} ({where})")
    return "\n".join(lines)


def alternatives(args: Any, config: SelfDistillConfig, parallel: Parallel) -> list[str]:
    options = []
    if config.kl_scope != "sampled_token":
        hidden = teacher_signal(config, hidden_size_of(args), model_dtype_bytes(args)) == "hidden"
        if hidden:
            topk = dataclasses.replace(config, kl_scope="topk", topk_support="teacher", topk=min(config.topk, 64))
            if teacher_signal(topk, hidden_size_of(args), model_dtype_bytes(args)) == "topk":
                options.append(
                    f"{flag_name('kl_scope')} topk {flag_name('topk_support')} teacher {flag_name('topk')} {topk.topk} "
                    f"(a teacher store of about {_gib(teacher_store_bytes(args, topk, parallel))} per rank instead of "
                    f"{_gib(teacher_store_bytes(args, config, parallel))}, but the teacher's support only)")
        options.append("fewer samples per rollout or shorter responses (--rollout-batch-size, --n-samples-per-prompt, "
                       "--rollout-max-response-len): the teacher store scales with them")
        options.append("more data or context parallelism (--context-parallel-size splits every response's rows)")
    if config.teacher == "ema":
        options.append(f"{flag_name('teacher')} frozen or live (the EMA keeps a pinned tag and an fp32 shadow: "
                       "6 B per parameter)")
    if getattr(args, "keep_old_actor", False):
        options.append("drop --keep-old-actor (two more weight backups)")
    options.append("fewer training ranks per node, or more tensor/pipeline parallelism (smaller weight shards)")
    options.append(f"{flag_name('host_memory_budget_gb')} <GiB> if the available memory was measured too low")
    return options


def check_nodes(nodes: Sequence[NodeHostMemory], args: Any, config: SelfDistillConfig, parallel: Parallel) -> None:
    """Raise ConfigError, with the numbers of every node over its budget and the alternatives, if any is."""
    over = [node for node in nodes if node.peak_bytes > node_budget_bytes(node, config)]
    if not over:
        return
    listing = "\n".join(describe_node(node, config) for node in over)
    options = "\n".join(f"  - {option}" for option in alternatives(args, config, parallel))
    raise ConfigError(
        f"the training ranks would keep more in host memory than the node has:\n{listing}\nAlternatives:\n{options}"
    )
