"""Speed and memory of the distillation divergences, as ratios against plain cross-entropy in the same process.

    python benchmarks/bench_loss.py [--rows 2048] [--vocab 32000] [--repeats 5] [--dtype float32]

For every scope x divergence, forward + backward on ``[rows, vocab]`` logits:
* time ratio: median wall time / median wall time of ``torch.nn.functional.cross_entropy`` forward + backward on the
  same logits (measured interleaved in this process);
* extra peak memory, in logits-sized buffers: (peak resident memory during the call - resident memory before it)
  / logits bytes. The peak is reset between measurements through /proc/self/clear_refs (Linux); where that is not
  permitted the memory columns say "n/a".
TRL's ``trl.experimental.sdft.loss_utils`` functions are timed too where they compute the same quantity (TRL takes
teacher logits, its top-K uses the student's support, its sampled-token loss is reverse KL only).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import time

import torch
import torch.nn.functional as F

from slime_self_distill.config import SelfDistillConfig
from slime_self_distill.core.divergences import full_vocab_divergence, sampled_token_divergence, topk_divergence

TARGETS = {"full_vocab": 2.5, "topk": 1.5, "sampled_token": 1.5}


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so that resident memory counts live buffers only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(step, repeats: int) -> tuple[float, float | None]:
    """(median seconds, extra peak bytes or None) of ``step()``, which runs forward + backward."""
    step()  # warm-up
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    gc.collect()
    _release_free_heap()
    before = _resident_bytes("VmRSS")
    peak = None
    if _reset_peak():
        step()
        peak = _resident_bytes("VmHWM") - before
    return statistics.median(times), peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--chunk-size", type=int, default=SelfDistillConfig().chunk_size,
                        help="rows per chunk (--self-distill-chunk-size)")
    parser.add_argument("--only", default="", help="run only cases whose name contains this text")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    logits = torch.randn(args.rows, args.vocab).to(dtype).requires_grad_(True)
    teacher_logits = torch.randn(args.rows, args.vocab)
    teacher_log_probs = torch.log_softmax(teacher_logits, -1)
    sampled = torch.randint(0, args.vocab, (args.rows,))
    teacher_topk_values, teacher_topk_ids = teacher_log_probs.topk(args.topk, -1)
    teacher_token = teacher_log_probs.gather(-1, sampled[:, None]).squeeze(-1)
    logits_bytes = logits.numel() * logits.element_size()

    def backward(loss):
        loss.backward()
        logits.grad = None

    def cross_entropy():
        backward(F.cross_entropy(logits.float(), sampled, reduction="sum"))

    def ours(scope, divergence, term_clip=None):
        def step():
            if scope == "full_vocab":
                out = full_vocab_divergence(logits, sampled, teacher_log_probs, divergence=divergence, alpha=0.5,
                                           chunk_size=args.chunk_size, term_clip=term_clip)
            elif scope == "topk":
                out = topk_divergence(logits, sampled, teacher_topk_values, teacher_topk_ids, divergence=divergence,
                                      alpha=0.5, chunk_size=args.chunk_size)
            else:
                out = sampled_token_divergence(logits, sampled, teacher_token, divergence=divergence, alpha=0.5,
                                               ratio_cap=10.0, chunk_size=args.chunk_size)
            backward(out.loss_terms.sum())

        return step

    cases = [(f"{scope} {div}", ours(scope, div), scope)
             for scope in ("full_vocab", "topk", "sampled_token")
             for div in ("forward_kl", "reverse_kl", "alpha_js")]
    # OPSD's per-entry clamp of the forward KL (--self-distill-vocab-term-clip)
    cases.insert(3, ("full_vocab forward_kl clamp 0.05", ours("full_vocab", "forward_kl", 0.05), "full_vocab"))
    if not args.no_trl:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        try:
            from trl.experimental.sdft import loss_utils as trl
        except ImportError:
            trl = None
        if trl is not None:
            cases += [
                ("TRL full_vocab alpha_js", lambda: backward(trl.compute_full_logit_self_distillation_loss(
                    logits.float(), teacher_logits, distillation_alpha=0.5).sum()), None),
                ("TRL topk(student support) alpha_js", lambda: backward(trl.compute_topk_self_distillation_loss(
                    logits.float(), teacher_logits, distillation_topk=args.topk, distillation_alpha=0.5,
                    distillation_add_tail=True).sum()), None),
                ("TRL sampled_token reverse_kl", lambda: backward(trl.compute_sampled_token_self_distillation_loss(
                    logits.float()[None], teacher_logits[None], sampled[None], distillation_alpha=1.0).sum()), None),
            ]

    print(f"logits [{args.rows}, {args.vocab}] {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; baseline: cross_entropy forward+backward")
    print(f"{'case':38s} {'time/CE':>8s} {'target':>7s} {'extra peak (logits buffers)':>28s} {'CE extra peak':>14s}")
    for name, step, scope in [c for c in cases if args.only in c[0]]:
        ce_time, ce_peak = measure(cross_entropy, args.repeats)
        case_time, case_peak = measure(step, args.repeats)
        target = f"{TARGETS[scope]:.1f}x" if scope else ""
        fmt = lambda b: "n/a" if b is None else f"{b / logits_bytes:.2f}"  # noqa: E731
        print(f"{name:38s} {case_time / ce_time:7.2f}x {target:>7s} {fmt(case_peak):>28s} {fmt(ce_peak):>14s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
