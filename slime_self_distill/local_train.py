"""``python -m slime_self_distill.local_train``: self-distillation in one process on a Hugging Face causal LM (a GPU
or the CPU), with the plugin's recipes, teacher contexts and loss (``slime_self_distill.local``).

``--demo`` is the README's first command: it prepares the shipped key-value task (``examples/kv_lookup_*.jsonl``)
with ``prepare_dataset``'s SDFT template, trains a tiny model on the fly to use in-context demonstrations, then
self-distils it with ``configs/local_kv_demo.yaml`` so that it answers without the demonstration, and prints the
held-out accuracies before and after.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from slime_self_distill.config import ConfigError

CHECKOUT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = CHECKOUT / "configs" / "local_kv_demo.yaml"
DEMO_OUTPUT_DIR = "out/local_demo"


def demo_arguments(argv: Sequence[str], output_dir: str) -> list:
    """The demo's data and model, made in ``output_dir``, as the flags a user would give (theirs come after)."""
    from slime_self_distill import prepare_dataset
    from slime_self_distill.local import demo

    data = os.path.join(output_dir, "data")
    prepared = {}
    for split in ("train", "heldout"):
        source = CHECKOUT / "examples" / f"kv_lookup_{split}.jsonl"
        if not source.is_file():
            raise ConfigError(f"--demo needs {source} (shipped in the repository): run it from a checkout installed "
                              "with pip install -e")
        prepared[split] = os.path.join(data, f"kv_lookup_{split}.slime.jsonl")
        status = prepare_dataset.main(["--input", str(source), "--output", prepared[split], "--template", "sdft",
                                       "--quiet"])
        if status != 0:
            raise ConfigError(f"preparing {source} failed (exit status {status})")
    checkpoint = demo.build_demo_checkpoint(os.path.join(output_dir, "base_model"))
    return ["--custom-config-path", str(DEMO_RECIPE), "--hf-checkpoint", checkpoint, "--prompt-data",
            prepared["train"], "--eval-prompt-data", "heldout", prepared["heldout"], "--output-dir", output_dir,
            *argv]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from slime_self_distill.local.options import parse_run

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--demo" in argv:
            given = argv.index("--output-dir") + 1 if "--output-dir" in argv else None
            output_dir = argv[given] if given is not None and given < len(argv) else DEMO_OUTPUT_DIR
            argv = demo_arguments([a for a in argv if a != "--demo"], output_dir)
        run = parse_run(argv)
        if run.not_applying:
            print(f"not applying in one process (accepted, unused): {' '.join(run.not_applying)}")
        from slime_self_distill.local.trainer import LocalTrainer

        LocalTrainer(run.options, run.config).run()
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint (if any) is kept; the same command resumes from it", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
