"""Linear probe: L2-regularised multinomial logistic regression with CoOp's C search (spec §3.1)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt.data.sets import LabeledFeatures, TextFeatures, TrainSet, ValidationSet
from clipadapt.engine.search import accuracy, grid_search
from clipadapt.exceptions import ConfigError, TrainingError
from clipadapt.methods.base import Adapter, MethodCard, register_method
from clipadapt.methods.constraints import (
    count,
    flag,
    list_of,
    optional,
    positive,
    positive_int,
)

COARSE_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


def fit_logistic(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    inverse_reg: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: tuple[Tensor, Tensor] | None = None,
    basis: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimise ``mean_i CE_i + ||W||_F² / (2 · C_reg · N)`` (bias unpenalised) with L-BFGS.

    This is scikit-learn's ``LogisticRegression(C=C_reg, multi_class="multinomial")`` objective
    divided by ``C_reg · N``, solved full-batch in float32 with a strong-Wolfe line search.

    Args:
        features: (N, D) float32 rows. labels: (N,) int64 in [0, num_classes).
        inverse_reg: sklearn's ``C`` (larger = weaker regularisation).
        max_iter: L-BFGS iterations (0: the start point is returned). tol: gradient
            tolerance (max-abs) for convergence, in the
            coordinates L-BFGS works in (the preconditioned ones when ``basis`` is given).
        init: optional (W (C, D), b (C,)) start point; the problem is strictly convex, so this
            only changes the number of iterations, not the optimum.
        basis: optional ``feature_basis(features)``: L-BFGS then works in preconditioned
            coordinates (see :func:`_fit_preconditioned`); the objective and its optimum are
            the same, the iterates are not.

    Returns:
        (W (C, D), b (C,)) float32 on the device of ``features``.
    """
    if basis is not None:
        return _fit_preconditioned(
            features, labels, num_classes, inverse_reg, max_iter, tol, init, basis
        )
    n, d = features.shape
    if init is None:
        weight = torch.zeros(num_classes, d, device=features.device)
        bias = torch.zeros(num_classes, device=features.device)
    else:
        weight, bias = (t.detach().clone() for t in init)
    if max_iter == 0:
        return weight, bias
    penalty = 1.0 / (2.0 * inverse_reg * n)
    return _lbfgs(
        weight,
        bias,
        features,
        labels,
        lambda w: penalty * w.square().sum(),
        max_iter,
        tol,
        inverse_reg,
    )


def _lbfgs(
    weight: Tensor,
    bias: Tensor,
    rows: Tensor,
    labels: Tensor,
    penalty_of: Callable[[Tensor], Tensor],
    max_iter: int,
    tol: float,
    inverse_reg: float,
) -> tuple[Tensor, Tensor]:
    """Minimise ``CE(rows Wᵀ + b) + penalty_of(W)`` from (``weight``, ``bias``) with L-BFGS
    (strong Wolfe line search); the fitted (W, b), detached."""
    weight.requires_grad_(True)
    bias.requires_grad_(True)
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
        loss = F.cross_entropy(rows @ weight.T + bias, labels)
        loss = loss + penalty_of(weight)
        loss.backward()
        return loss

    with torch.enable_grad():
        loss = optimizer.step(closure)
    if not torch.isfinite(loss):
        raise TrainingError(f"linear_probe: L-BFGS diverged at C={inverse_reg:g} (loss {loss})")
    return weight.detach(), bias.detach()


def feature_basis(features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What :func:`fit_logistic` preconditions with: (mean μ (D,), eigenvalues e (D,),
    eigenvectors U (D, D)) of the centred second moment ``(X - μ)ᵀ(X - μ) / N`` of the training
    rows, and the rows in that basis, ``(X - μ) U`` (N, D)."""
    mean = features.mean(0)
    centred = features - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(features))
    return mean, eigenvalues.clamp_min(0.0), eigenvectors, centred @ eigenvectors


def _line_minimum(objective: Callable[[float], float], low: float, high: float) -> float:
    """argmin of a unimodal 1-D function on [10**low, 10**high], by golden-section search in
    log10 (40 steps: the bracket shrinks to 0.618**40 ≈ 4e-9 of its width)."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = low, high
    x1, x2 = b - ratio * (b - a), a + ratio * (b - a)
    f1, f2 = objective(10.0**x1), objective(10.0**x2)
    for _ in range(40):
        if f1 < f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - ratio * (b - a)
            f1 = objective(10.0**x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + ratio * (b - a)
            f2 = objective(10.0**x2)
    return 10.0 ** ((a + b) / 2.0)


def _fit_preconditioned(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    inverse_reg: float,
    max_iter: int,
    tol: float,
    init: tuple[Tensor, Tensor] | None,
    basis: tuple[Tensor, Tensor, Tensor, Tensor],
) -> tuple[Tensor, Tensor]:
    """:func:`fit_logistic`'s objective, solved by L-BFGS in the variables ``(V, b')`` with
    ``W = V diag(s) Uᵀ`` and ``b = b' - W μ``: an exact change of variables (the bias is not
    penalised, so centring the rows only moves it), so the optimum is the same.

    ``s_j = sqrt(C / (e_j + λ))`` with ``λ = C / (C_reg · N)`` (C classes here) makes the
    objective's Hessian at ``W = 0`` (uniform softmax) the identity on the class-centred
    weights: ``(1/C)(e_j + λ) s_j² = 1``. Without it, the feature directions of small variance
    are the slow ones. The penalty stays elementwise, ``Σ (V diag(s))²`` (U is orthogonal), so
    an evaluation costs the same two (N, D) x (D, C) products as the plain solver.

    Without ``init`` the start is the Newton step of the objective's quadratic model at zero,
    ``V = -∇_V`` (class sums of the rotated rows, no product), scaled by an exact line search
    along it: one (N, D) x (D, C) product, then elementwise work only (the objective is convex
    along the ray). L-BFGS's own first step from zero would spend several evaluations on
    finding that length.
    """
    n = len(features)
    mean, eigenvalues, eigenvectors, rotated = basis
    lam = num_classes / (inverse_reg * n)
    scale = (num_classes / (eigenvalues + lam)).sqrt()
    rows = rotated * scale
    penalty = 1.0 / (2.0 * inverse_reg * n)
    scale_sq = scale.square()
    if init is None:
        # minus the gradient at zero (class sums of the rotated rows, no product), which the
        # Hessian there (the identity) makes the Newton step; its length by an exact line
        # search of the objective along it
        weight = torch.zeros(num_classes, len(scale), device=features.device)
        weight = weight.index_add_(0, labels, rotated) * (scale / n)
        bias = torch.zeros(num_classes, device=features.device)
        along = rows @ weight.T
        step_penalty = float(penalty * (weight.square() * scale_sq).sum())

        def on_ray(a: float) -> float:
            return float(F.cross_entropy(a * along, labels)) + a * a * step_penalty

        weight = _line_minimum(on_ray, -4.0, 4.0) * weight
    else:
        w0, b0 = (t.detach() for t in init)
        weight = (w0 @ eigenvectors) / scale
        bias = b0 + w0 @ mean
    if max_iter == 0:
        w = (weight * scale) @ eigenvectors.T
        return w, bias - w @ mean
    weight, bias = _lbfgs(
        weight,
        bias,
        rows,
        labels,
        lambda w: penalty * (w.square() * scale_sq).sum(),
        max_iter,
        tol,
        inverse_reg,
    )
    w = (weight * scale) @ eigenvectors.T
    return w, bias - w @ mean


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
        search_max_iter: L-BFGS iterations of each fit of the C search. None (CoOp): max_iter,
            and the search's fit of the chosen C is the model. With a number, the search fits
            are short (0: their start point, see ``precondition``) and the chosen C is then
            fitted on from its search model for ``max_iter`` iterations.
        precondition: solve each fit in the eigenbasis of the centred training rows, scaled so
            the objective's Hessian at zero is the identity (an exact change of variables: the
            same objective and optimum, fewer iterations to reach it; the iterates, and so a fit
            stopped by ``max_iter`` or ``tol``, differ). Off by default (CoOp's plain solver);
            the ``fast`` preset uses it.
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
            "precondition": flag(),
            "search_max_iter": optional(count(), "max_iter: every search fit is a full fit"),
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
        precondition: bool = False,
        search_max_iter: int | None = None,
    ) -> None:
        self._init_params(locals())

    def _solve(
        self,
        train: LabeledFeatures,
        num_classes: int,
        c: float,
        init: tuple | None,
        basis: tuple[Tensor, Tensor, Tensor, Tensor] | None,
        max_iter: int,
    ) -> tuple[Tensor, Tensor]:
        return fit_logistic(
            train.features, train.labels, num_classes, c, max_iter, self.tol, init, basis
        )

    def _search(
        self,
        train: TrainSet,
        val: ValidationSet,
        fitted: dict[float, tuple[Tensor, Tensor]],
        basis: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    ) -> tuple[dict[str, float], float]:
        """CoOp's C search: the coarse grid, then log-bisection steps, each a grid search.

        ``fitted`` receives the model of every C tried (the latest fit of a C tried twice);
        ``basis`` is :func:`feature_basis` of the training rows when preconditioning, else None.

        Returns:
            ({"C": the chosen C, "n_fits": the number of fits}, its validation accuracy).
        """
        num_classes = self.n_classes_
        fits: list[float] = []
        max_iter = self.max_iter if self.search_max_iter is None else self.search_max_iter

        def score(point: dict[str, float], val: ValidationSet) -> float:
            # warm start from the nearest C fitted so far (a regularisation path): far fewer
            # L-BFGS iterations than starting from zero, same optimum. Preconditioned fits start
            # from their own C's Newton step instead: as cheap, and a short search fit from a
            # neighbour's model would only rescale that model, not show this C's
            c = point["C"]
            near = min(fitted, key=lambda k: abs(math.log10(k) - math.log10(c)), default=None)
            start = None if near is None or basis is not None else fitted[near]
            model = self._solve(train, num_classes, c, start, basis, max_iter)
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
        if self.search_max_iter == 0 and not self.precondition:
            raise ConfigError(
                "linear_probe: search_max_iter=0 scores each C's start point, which is a model "
                "only with precondition=true (zero weights otherwise); set precondition=true "
                "or search_max_iter >= 1"
            )
        fitted: dict[float, tuple[Tensor, Tensor]] = {}
        # one eigendecomposition serves every C of the search
        basis = feature_basis(train.features) if self.precondition else None
        chosen = self._choose(
            val,
            lambda val: self._search(train, val, fitted, basis),
            {"C": float(self.C)},
            disabled=None if self.search else "search disabled",
        )
        if not fitted:
            weight, bias = self._solve(
                train, self.n_classes_, chosen["C"], None, basis, self.max_iter
            )
        elif self.search_max_iter is None:
            weight, bias = fitted[chosen["C"]]
        else:  # short search fits: fit the chosen C on from its search model
            start = fitted[chosen["C"]]
            weight, bias = self._solve(
                train, self.n_classes_, chosen["C"], start, basis, self.max_iter
            )
        # parameters (not plain tensors) so the parameter count and gradient checks see them
        self.weight_ = nn.Parameter(weight.clone())
        self.bias_ = nn.Parameter(bias.clone())

    def _logits(self, features: Tensor) -> Tensor:
        return features @ self.weight_.T + self.bias_

    def _set_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        super()._set_state(tensors, meta)
        self.weight_ = nn.Parameter(self.weight_.float())
        self.bias_ = nn.Parameter(self.bias_.float())
