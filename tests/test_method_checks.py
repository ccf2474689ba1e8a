"""The shared check suite (``style.md`` §7) over every registered method (timm-style).

Registering a method enrols it here: the test is parametrised over ``clipadapt.list_methods()``.
Exemptions live on the method's card (``expected_failed_checks``) and show up as xfail.

``FAST_PARAMS`` keeps the suite fast: hyperparameter overrides used by every check of a method
(fewer epochs, coarser search grids). They change only how much work a fit does on the tiny
separable fixture, never what the method computes; a method absent from the table runs with its
defaults.
"""

from __future__ import annotations

import clipadapt
from clipadapt.testing import CHECKS, parametrize_with_checks

FAST_PARAMS: dict[str, dict[str, object]] = {
    # 20x20 instead of 20x200 (alpha, beta) grid points
    "tip_adapter": {"search_steps_beta": 20},
    "tip_adapter_f": {"search_steps_beta": 20, "epochs": 5},
    # 3 coarse C values and 1 refinement step instead of 7 + 8, at most 100 L-BFGS iterations
    "linear_probe": {"coarse_grid": (1e4, 1.0, 1e-2), "refine_steps": 1, "max_iter": 100},
    # 10 epochs at lr 1e-2 instead of 100 at 1e-3 (the fixture has 20 rows: one step per epoch)
    "graph_adapter": {"epochs": 10, "lr": 1e-2},
    "hegraph_adapter": {"epochs": 5},
    "clip_adapter": {"epochs": 5, "lr": 1e-2, "ratio_grid": (0.6,)},
    "taskres": {"epochs": 10, "lr": 5e-2},
    "zs_linear_probe": {"epochs": 20},
    # a small ODE field, few solver steps, one grid point
    "node_adapter": {
        "epochs": 3,
        "blend_init_grid": (0.5,),
        "gamma_init_grid": (1.0,),
        "steps": 2,
        "hidden": 32,
        "heads": 2,
        "head_dim": 8,
        "adjoint": False,
    },
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
