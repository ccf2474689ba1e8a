"""Testing utilities: the shared method check suite and its fixture bundle.

See :mod:`clipadapt.testing.checks` and ``docs/method-checks.md``.
"""

from __future__ import annotations

from clipadapt.testing.checks import (
    CHECKS,
    CheckFixture,
    check_method,
    make_fixture,
    parametrize_with_checks,
    yield_checks,
)

__all__ = [
    "CHECKS",
    "CheckFixture",
    "check_method",
    "make_fixture",
    "parametrize_with_checks",
    "yield_checks",
]
