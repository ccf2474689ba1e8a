"""The shared check suite (``style.md`` §7) over every registered method (timm-style).

Registering a method enrols it here: the test is parametrised over ``clipadapt.list_methods()``.
Exemptions live on the method's card (``expected_failed_checks``) and show up as xfail.

``FAST_PARAMS`` keeps the suite fast: hyperparameter overrides used by every check of a method
(fewer epochs, coarser search grids). They change only how much work a fit does on the tiny
separable fixture, never what the method computes; a method absent from the table runs with its
defaults.
"""

from __future__ import annotations

import pytest

import clipadapt
from clipadapt.testing import CHECKS, check_method, make_fixture, parametrize_with_checks

FAST_PARAMS: dict[str, dict[str, object]] = {
    "tip_adapter": {"search_steps_beta": 20},
    "tip_adapter_f": {"search_steps_beta": 20, "epochs": 5},
}


@parametrize_with_checks(clipadapt.list_methods(), params=FAST_PARAMS)
def test_method_checks(check) -> None:
    check()


def test_every_method_is_enrolled() -> None:
    names = clipadapt.list_methods()
    assert "zeroshot" in names and "tip_adapter" in names
    unknown = sorted(set(FAST_PARAMS) - set(names))
    assert not unknown, f"FAST_PARAMS names unregistered methods: {unknown}"


def test_suite_has_all_25_checks() -> None:
    assert len(CHECKS) == 25
    assert all(name.startswith("check_") for name in CHECKS)
