"""Markers for tests that run slime's real code: they skip cleanly, with the reason, when slime is absent."""

import importlib.util

import pytest

SLIME_AVAILABLE = importlib.util.find_spec("slime") is not None
SKIP_REASON = (
    "slime is not importable; install a THUDM/slime checkout to run these tests "
    "(README section 'Testing against slime')"
)
requires_slime = [pytest.mark.slime, pytest.mark.skipif(not SLIME_AVAILABLE, reason=SKIP_REASON)]


def needs_slime(test):
    """Decorator form of ``requires_slime``."""
    for mark in requires_slime:
        test = mark(test)
    return test
