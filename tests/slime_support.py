"""Markers for tests that run slime's real code: they skip cleanly, with the reason, when slime is absent.

CI sets ``SLIME_SELF_DISTILL_REQUIRE_SLIME=1`` (``.ci/run`` installs slime first): then a missing slime fails the
session at start-up instead of skipping the slime tests (``tests/conftest.py``).
"""

import importlib.util
import os

import pytest

REQUIRE_SLIME_ENV = "SLIME_SELF_DISTILL_REQUIRE_SLIME"
SLIME_AVAILABLE = importlib.util.find_spec("slime") is not None
SLIME_REQUIRED = os.environ.get(REQUIRE_SLIME_ENV) == "1"
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
