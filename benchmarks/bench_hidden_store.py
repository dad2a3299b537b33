"""The hidden-state teacher store's cost in the loss, as ratios against plain cross-entropy in the same process.

    PYTHONPATH=. python benchmarks/bench_hidden_store.py [--rows 2048] [--hidden 1024] [--vocab 32000] [--topk 64]

Forward + backward on the same student hidden states ``[R, H]`` and output weights ``[V, H]`` (both trained: the
gradient reaches them), with the teacher kept as its final hidden states ``[R, H]`` and its own output weights:
* baseline: the student's output layer (``h W^T``) + ``torch.nn.functional.cross_entropy``;
* each case: the student's output layer + the self-distillation loss with the teacher's logits recomputed from its
  stored hidden states chunk by chunk (``core.teacher_logits``), full vocabulary and every top-K support; and, for
  comparison, the teacher's own top-K read from a stored ``[R, K]`` top-K (the store the teacher support keeps when
  K entries are smaller than a hidden state).
Reported: median wall time / the baseline's median (measured interleaved in this process), the peak resident memory
above the baseline's peak in logits-sized ``[R, V]`` fp32 buffers (negative: less than cross-entropy, whose
log-softmax and gradient are whole ``[R, V]`` tensors), and the teacher bytes kept per response token (the hidden state
in the benchmark's dtype, or K values + ids, plus the sampled token's log-prob).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from benchmarks.bench_loss import measure
from slime_self_distill.config import SelfDistillConfig
from slime_self_distill.core.divergences import full_vocab_divergence, topk_divergence
from slime_self_distill.core.teacher_logits import TeacherHiddenStates, teacher_support
from slime_self_distill.trainer.teacher_outputs import teacher_bytes_per_token

TARGET = 1.6  # the full-vocabulary case, against the baseline


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the median over rounds is shown")
    parser.add_argument("--chunk-size", type=int, default=SelfDistillConfig().chunk_size)
    parser.add_argument("--divergence", default="alpha_js", choices=["forward_kl", "reverse_kl", "alpha_js"],
                        help="of the top-K cases (the full-vocabulary case runs all three)")
    parser.add_argument("--only", default="", help="run only cases whose name contains this text")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    scale = args.hidden ** -0.5
    student_hidden = torch.randn(args.rows, args.hidden).requires_grad_(True)
    student_weight = (3 * scale * torch.randn(args.vocab, args.hidden)).requires_grad_(True)
    teacher = TeacherHiddenStates(torch.randn(args.rows, args.hidden), 3 * scale * torch.randn(args.vocab, args.hidden))
    tokens = torch.randint(0, args.vocab, (args.rows,))
    stored_values, stored_ids = teacher.log_probs(chunk_size=args.chunk_size).topk(args.topk, -1)
    logits_bytes = args.rows * args.vocab * 4

    def step(loss_of_logits):
        def run():
            logits = student_hidden @ student_weight.t()
            loss_of_logits(logits).backward()
            student_hidden.grad = student_weight.grad = None
        return run

    def full_vocab(divergence):
        def loss(logits):
            return full_vocab_divergence(logits, tokens, teacher, divergence=divergence, alpha=0.5,
                                         chunk_size=args.chunk_size).loss_terms.sum()
        return loss

    def topk_from_hidden(support):
        def loss(logits):
            chosen = teacher_support(logits.detach(), teacher, support, args.topk, chunk_size=args.chunk_size)
            return topk_divergence(logits, tokens, chosen.teacher_log_probs, chosen.ids, present=chosen.present,
                                   divergence=args.divergence, alpha=0.5, chunk_size=args.chunk_size).loss_terms.sum()
        return loss

    def topk_stored(logits):
        return topk_divergence(logits, tokens, stored_values, stored_ids, divergence=args.divergence, alpha=0.5,
                               chunk_size=args.chunk_size).loss_terms.sum()

    def stored_bytes(**settings):
        return teacher_bytes_per_token(SelfDistillConfig(topk=args.topk, **settings), args.hidden, 4)

    hidden_bytes = stored_bytes(kl_scope="full_vocab")
    cases = [(f"full_vocab {divergence} (recomputed)", step(full_vocab(divergence)), hidden_bytes)
             for divergence in ("forward_kl", "reverse_kl", "alpha_js")]
    cases += [
        ("topk teacher support (recomputed)", step(topk_from_hidden("teacher")), hidden_bytes),
        ("topk student support (recomputed)", step(topk_from_hidden("student")),
         stored_bytes(kl_scope="topk", topk_support="student")),
        ("topk union support (recomputed)", step(topk_from_hidden("union")),
         stored_bytes(kl_scope="topk", topk_support="union")),
        ("topk teacher support (stored top-K)", step(topk_stored), args.topk * 8 + 4),
    ]
    cases = [case for case in cases if args.only in case[0]]
    baseline = step(lambda logits: F.cross_entropy(logits, tokens, reduction="sum"))
    print(f"[{args.rows}, {args.hidden}] hidden states, [{args.vocab}, {args.hidden}] output weights, K {args.topk}, "
          f"top-K cases {args.divergence}, chunk {args.chunk_size}, {torch.get_num_threads()} threads")
    ratios = {name: [] for name, *_ in cases}
    memory = {}
    baseline_times = []
    for _ in range(args.rounds):
        base_time, base_peak = measure(baseline, args.repeats)
        baseline_times.append(base_time)
        for name, run, _ in cases:
            seconds, peak = measure(run, args.repeats)
            ratios[name].append(seconds / base_time)
            if peak is not None and base_peak is not None:
                memory[name] = (peak - base_peak) / logits_bytes
    print(f"baseline: student output layer + cross_entropy, {statistics.median(baseline_times):.3f} s")
    for name, _, per_token in cases:
        extra = f"{memory[name]:+.2f}" if name in memory else "n/a"
        print(f"{name:40s} time ratio {statistics.median(ratios[name]):5.2f}   peak vs baseline {extra} logits   "
              f"teacher bytes/token {per_token}")
    full = [statistics.median(v) for name, v in ratios.items() if name.startswith("full_vocab")]
    if full:
        print(f"full_vocab target: at most {TARGET}x ({'met' if max(full) <= TARGET else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
