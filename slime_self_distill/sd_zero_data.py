"""SD-Zero phase 1 data: ``python -m slime_self_distill.sd_zero_data --input d_revision.json --output-dir DIR``.

Splits collected self-revision tuples into the official two SFT stages (generation, revision) as slime SFT rows;
the implementation and its account of the official code are in ``slime_self_distill.data.sd_zero_split``.
"""

from slime_self_distill.data.sd_zero_split import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
