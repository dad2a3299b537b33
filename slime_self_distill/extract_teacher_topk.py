"""``python -m slime_self_distill.extract_teacher_topk``: a teacher's top-K log-probabilities for offline top-K
distillation (``slime_self_distill.offline.extraction``); ``torchrun --nproc-per-node N -m
slime_self_distill.extract_teacher_topk ...`` runs it data-parallel."""

import sys
from typing import Optional

from slime_self_distill.data.cli import run_cli
from slime_self_distill.offline.extraction import build_parser, run


def main(argv: Optional[list] = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: the finished part files are kept in <output-dir>/.parts; run the same command again to "
              "continue from them", file=sys.stderr)
        sys.exit(130)
