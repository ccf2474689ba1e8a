"""Linear probe: L2-regularised multinomial logistic regression with CoOp's C search (spec §3.1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt.data.sets import LabeledFeatures, TextFeatures, TrainSet, ValidationSet
from clipadapt.engine.search import accuracy, grid_search
from clipadapt.exceptions import TrainingError
from clipadapt.methods.base import Adapter, MethodCard, register_method
from clipadapt.methods.constraints import count, flag, list_of, positive, positive_int

COARSE_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


def fit_logistic(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    inverse_reg: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimise ``mean_i CE_i + ||W||_F² / (2 · C_reg · N)`` (bias unpenalised) with L-BFGS.

    This is scikit-learn's ``LogisticRegression(C=C_reg, multi_class="multinomial")`` objective
    divided by ``C_reg · N``, solved full-batch in float32 with a strong-Wolfe line search.

    Args:
        features: (N, D) float32 rows. labels: (N,) int64 in [0, num_classes).
        inverse_reg: sklearn's ``C`` (larger = weaker regularisation).
        max_iter: L-BFGS iterations. tol: gradient tolerance (max-abs) for convergence.
        init: optional (W (C, D), b (C,)) start point; the problem is strictly convex, so this
            only changes the number of iterations, not the optimum.

    Returns:
        (W (C, D), b (C,)) float32 on the device of ``features``.
    """
    n, d = features.shape
    if init is None:
        weight = torch.zeros(num_classes, d, device=features.device)
        bias = torch.zeros(num_classes, device=features.device)
    else:
        weight, bias = (t.detach().clone() for t in init)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    penalty = 1.0 / (2.0 * inverse_reg * n)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(features @ weight.T + bias, labels)
        loss = loss + penalty * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        loss = optimizer.step(closure)
    if not torch.isfinite(loss):
        raise TrainingError(f"linear_probe: L-BFGS diverged at C={inverse_reg:g} (loss {loss})")
    return weight.detach(), bias.detach()


@register_method
class LinearProbe(Adapter):
    """Linear-probe CLIP (Radford et al. 2021, CoOp's protocol; baselines spec §3.1).

    Multinomial logistic regression on the image features, ``logits = f Wᵀ + b``, with an L2
    penalty on W whose strength ``C`` is chosen on the validation features: a coarse grid
    ``{1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6}`` (first best wins), then ``refine_steps`` bisection
    steps in log10 space between ``C*/10`` and ``C*·10`` (ties go to the smaller C); the model
    of the last step's winner is kept. Each fit solves the objective to convergence with
    full-batch L-BFGS, warm-started from the nearest C already fitted (the objective is strictly
    convex, so this changes the iteration count, not the optimum beyond the tolerance).

    The method ignores text features: it is image-only. Features are the bundle's L2-normalised
    rows (the spec's reference uses raw embeddings; bundles store normalised rows, and the
    wide C grid absorbs the scale difference). Stored augmented views are not used (CoOp's probe
    uses clean views).

    Args:
        C: inverse regularisation used when there is no validation data or ``search`` is off
            (1.0, scikit-learn's default).
        search: choose C on validation data when given.
        coarse_grid: the coarse C grid, searched in the given order.
        refine_steps: bisection steps after the coarse grid (8 in CoOp's script).
        max_iter: L-BFGS iterations per fit (1000, as CoOp's sklearn call).
        tol: gradient tolerance of L-BFGS.
    """

    card = MethodCard(
        name="linear_probe",
        summary="Linear probe: L2 logistic regression on image features, C searched on val",
        paper="Radford et al., Learning Transferable Visual Models From Natural Language "
        "Supervision, ICML 2021 (protocol of Zhou et al., CoOp, IJCV 2022)",
        arxiv="2103.00020",
        needs=("train",),
        trainable=True,
        searched={"C": "coarse {1e6,…,1e-6} then 8 log-bisection steps around the best"},
        param_formula="C * D + C",
        max_tiny_seconds=30,
        constraints={
            "C": positive(),
            "search": flag(),
            "coarse_grid": list_of(positive()),
            "refine_steps": count(),
            "max_iter": positive_int(),
            "tol": positive(),
        },
    )

    def __init__(
        self,
        C: float = 1.0,
        search: bool = True,
        coarse_grid: tuple[float, ...] = COARSE_GRID,
        refine_steps: int = 8,
        max_iter: int = 1000,
        tol: float = 1e-6,
    ) -> None:
        self._init_params(locals())

    def _solve(
        self, train: LabeledFeatures, num_classes: int, c: float, init: tuple | None
    ) -> tuple[Tensor, Tensor]:
        return fit_logistic(
            train.features, train.labels, num_classes, c, self.max_iter, self.tol, init
        )

    def _search(
        self, train: TrainSet, val: ValidationSet, fitted: dict[float, tuple[Tensor, Tensor]]
    ) -> tuple[dict[str, float], float]:
        """CoOp's C search: the coarse grid, then log-bisection steps, each a grid search.

        ``fitted`` receives the model of every C tried (the latest fit of a C tried twice).

        Returns:
            ({"C": the chosen C, "n_fits": the number of fits}, its validation accuracy).
        """
        num_classes = self.n_classes_
        fits: list[float] = []

        def score(point: dict[str, float], val: ValidationSet) -> float:
            # warm start from the nearest C fitted so far (a regularisation path): far fewer
            # L-BFGS iterations than starting from zero, same optimum
            c = point["C"]
            near = min(fitted, key=lambda k: abs(math.log10(k) - math.log10(c)), default=None)
            model = self._solve(train, num_classes, c, None if near is None else fitted[near])
            fitted[c] = model
            fits.append(c)
            return accuracy(val.features @ model[0].T + model[1], val.labels)

        # fit the coarse grid from strong to weak regularisation (cheap warm starts), then pick
        # the first best in the declared grid order
        coarse = [float(c) for c in self.coarse_grid]
        scores = {c: score({"C": c}, val) for c in sorted(coarse)}
        best, acc = grid_search(lambda point, _: scores[point["C"]], {"C": coarse}, val)
        lo, hi = math.log10(best["C"]) - 1.0, math.log10(best["C"]) + 1.0
        for _ in range(self.refine_steps):
            c_lo, c_hi = 10.0**lo, 10.0**hi
            best, acc = grid_search(score, {"C": [c_lo, c_hi]}, val)  # a tie keeps the smaller C
            mid = (lo + hi) / 2.0
            if best["C"] == c_hi:
                lo = mid
            else:
                hi = mid
        return {**best, "n_fits": len(fits)}, acc

    def _fit(self, train: TrainSet, text: TextFeatures | None, val: ValidationSet | None) -> None:
        # C is set by Adapter.fit from text or the bundle; the text itself is unused
        fitted: dict[float, tuple[Tensor, Tensor]] = {}
        chosen = self._choose(
            val,
            lambda val: self._search(train, val, fitted),
            {"C": float(self.C)},
            disabled=None if self.search else "search disabled",
        )
        if fitted:
            weight, bias = fitted[chosen["C"]]
        else:
            weight, bias = self._solve(train, self.n_classes_, chosen["C"], None)
        # parameters (not plain tensors) so the parameter count and gradient checks see them
        self.weight_ = nn.Parameter(weight.clone())
        self.bias_ = nn.Parameter(bias.clone())

    def _logits(self, features: Tensor) -> Tensor:
        return features @ self.weight_.T + self.bias_

    def _set_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        super()._set_state(tensors, meta)
        self.weight_ = nn.Parameter(self.weight_.float())
        self.bias_ = nn.Parameter(self.bias_.float())
