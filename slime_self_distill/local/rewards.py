"""Reward functions with slime's contract (``reward(args, sample)``, here synchronous), for ``--custom-rm-path`` of
the single-process trainer or of slime itself."""

from __future__ import annotations

from typing import Any


def exact_match(args: Any, sample: Any) -> float:
    """1.0 when the response (surrounding spaces stripped) is the label, else 0.0."""
    if sample.label is None:
        raise ValueError(f"sample index={getattr(sample, 'index', None)} has no label to match: give --label-key")
    return float(str(sample.response).strip() == str(sample.label).strip())
