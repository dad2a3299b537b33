"""What the single-process trainer reports: one JSON line per rollout (``OUTPUT_DIR/metrics.jsonl``, with TensorBoard
or wandb beside it when asked for), a progress bar (or a line every few seconds when the output is not a terminal),
a summary of the evaluations before and after, and a PNG plot of the loss, the student-teacher divergence and the
accuracies."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Optional

from slime_self_distill.config import SelfDistillConfig
from slime_self_distill.data.files import write_atomically
from slime_self_distill.local.options import LocalOptions

METRICS_FILE = "metrics.jsonl"
LOG_LINE_SECONDS = 10.0


class Progress:
    """tqdm on a terminal; otherwise a line at the first rollout, the last, and at most every LOG_LINE_SECONDS."""

    def __init__(self, start: int, total: int, quiet: bool, out):
        self.total, self.done, self.quiet, self.out = total, start, quiet, out
        self.bar, self.last_line = None, 0.0
        if not quiet and getattr(out, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="rollout", file=out, dynamic_ncols=True)

    def update(self, record: dict) -> None:
        self.done += 1
        shown = {k: record[k] for k in record if k == "loss" or k.startswith(("self_distill_", "reward", "eval/"))
                 and isinstance(record[k], float)}
        text = " ".join(f"{k.removeprefix('self_distill_')}={v:.4g}" for k, v in list(shown.items())[:5])
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif not self.quiet and (self.done in (1, self.total) or time.monotonic() - self.last_line >= LOG_LINE_SECONDS):
            self.last_line = time.monotonic()
            print(f"rollout {self.done}/{self.total} {text}", file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    """``metrics.jsonl`` (a resumed run keeps the lines of the rollouts before its start, rewritten atomically) and
    the optional TensorBoard / wandb writers."""

    def __init__(self, options: LocalOptions, start_rollout: int = 0, out=None):
        self.options, self.out = options, out or sys.stdout
        os.makedirs(options.output_dir, exist_ok=True)
        self.path = os.path.join(options.output_dir, METRICS_FILE)
        self._records = [r for r in self._read() if r["rollout"] <= start_rollout] if start_rollout else []
        write_atomically(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in self._records).encode()))
        self.tensorboard = self.wandb = None
        if options.use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ValueError(f"--use-tensorboard: TensorBoard is not installed ({error}); pip install tensorboard"
                                 ) from None
            self.tensorboard = SummaryWriter(os.path.join(options.output_dir, "tensorboard"))
        if options.use_wandb:
            try:
                import wandb
            except ImportError as error:
                raise ValueError(f"--use-wandb: wandb is not installed ({error}); pip install wandb") from None
            self.wandb = wandb.init(project=options.wandb_project, config=vars(options.slime_args()), resume="allow")

    def _read(self) -> list:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def records(self) -> list:
        return list(self._records)

    def write(self, record: dict) -> None:
        self._records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("rollout", "step")}
        if self.tensorboard is not None:
            for name, value in numbers.items():
                self.tensorboard.add_scalar(name, value, record["rollout"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({**numbers, "rollout": record["rollout"]}, step=record["rollout"])

    def progress(self, start: int, total: int) -> Progress:
        return Progress(start, total, self.options.quiet, self.out)

    def summary(self, first_eval: Optional[dict]) -> dict:
        """The evaluations before the first rollout and after the last, printed as a table."""
        if first_eval is None:  # a resumed run: the evaluation before its first rollout is in the log
            first_eval = next((r for r in self._records if r["rollout"] == 0), None)
            first_eval = None if first_eval is None else {k: v for k, v in first_eval.items() if k.startswith("eval/")}
        last = self._records[-1] if self._records else {}
        final_eval = {k: v for k, v in last.items() if k.startswith("eval/")}
        summary = {"before": first_eval or {}, "after": final_eval, "final": {
            k: v for k, v in last.items() if not k.startswith("eval/")}}
        if final_eval:
            print("held-out exact-match accuracy      before    after", file=self.out)
            for name, value in final_eval.items():
                before = (first_eval or {}).get(name)
                before_text = "       -" if before is None else f"{before:8.3f}"
                print(f"  {name:<32}{before_text} {value:8.3f}", file=self.out)
        return summary


def divergence_key(config: SelfDistillConfig) -> str:
    return f"self_distill_{config.kl_scope}_{config.divergence}"


def plot_metrics(records: list, path: str, config: SelfDistillConfig, out=None) -> Optional[str]:
    """The loss, the student-teacher divergence and the evaluation accuracies per rollout, as a PNG (matplotlib, from
    the ``local`` extra); without matplotlib, says so and writes nothing."""
    out = out or sys.stdout
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: matplotlib is not installed (pip install -e '.[local]'); the metrics are in "
              f"{os.path.join(os.path.dirname(path), METRICS_FILE)}", file=out)
        return None
    trained = [r for r in records if "loss" in r]
    evaluated = [r for r in records if any(k.startswith("eval/") for k in r)]
    panels = 3 if evaluated else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    x = [r["rollout"] for r in trained]
    axes[0].plot(x, [r["loss"] for r in trained])
    axes[0].set(title="loss", xlabel="rollout")
    key = divergence_key(config)
    axes[1].plot(x, [r.get(key, float("nan")) for r in trained], label=key.removeprefix("self_distill_"))
    # the mean of log S - log T on the student's own tokens estimates KL(S || T)
    axes[1].plot(x, [-r.get("self_distill_teacher_minus_student_log_prob", float("nan")) for r in trained],
                 label="log S - log T on sampled tokens")
    axes[1].set(title="student-teacher divergence (nats/token)", xlabel="rollout")
    axes[1].legend(fontsize=8)
    if evaluated:
        for name in sorted({k for r in evaluated for k in r if k.startswith("eval/")}):
            points = [(r["rollout"], r[name]) for r in evaluated if name in r]
            label = name.removeprefix("eval/").replace("student_accuracy", "student (plain prompt)").replace(
                "teacher_accuracy", "teacher (its prompt)")
            axes[2].plot(*zip(*points), marker="o", label=label)
        axes[2].set(title="held-out exact-match accuracy", xlabel="rollout", ylim=(-0.02, 1.02))
        axes[2].legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_atomically(path, lambda f: f.write(buffer.getvalue()))
    print(f"plot: {path}", file=out)
    return path
