"""NODE-Adapter's support-loss gradient term, its back-propagation path and option plumbing.

The pieces of :mod:`clipadapt.methods.node_adapter` that are not f_θ itself:

- :class:`SupportLossGradient`, ``g(P)``: minus the gradient, divided by τ, of the cross-entropy
  of the cosine prototype classifier on the support rows (spec §2.7, class-balanced), each row's
  softmax taken over its class and that class's ``m`` nearest classes at the start. The vector
  field gains ``s(t) · η · g(P)`` (option ``gradient_gain``): the discriminative part of the
  loss gradient (rows of the other classes pull with weight ``-π``), which the per-class
  estimator (★) cannot express.
- :func:`staged_search`: the validation search of the start (λ, γ) and of η in two stages, and
  :func:`beats_start` (from :func:`disagreements`), the bar the flow's best point must clear against the no-ODE start.
- :func:`activation_bytes` and :func:`loss_bytes`: what back-propagating through the solver
  and the training loss would keep, and :data:`RESIDENT_PER_SAVED_BYTE`, what that costs the
  process, so that the method can choose direct back-propagation when it fits a memory budget
  and the adjoint otherwise.
- :data:`CONSTRAINTS` and :class:`NodeOptions`: the option checks, and the glue from the
  options to the start search, the solver and the back-propagation path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clipadapt.data.sets import ValidationSet
from clipadapt.engine.ode import (
    DEFAULT_MAX_NUM_STEPS,
    solve_endpoint,
    solver_names,
    solver_options,
)
from clipadapt.engine.search import accuracy, grid_search
from clipadapt.exceptions import ConfigError, TrainingError
from clipadapt.methods.constraints import (
    between,
    common,
    count,
    finite,
    flag,
    list_of,
    mapping,
    non_negative,
    one_of,
    optional,
    positive,
    positive_int,
)

TEXT_PROTOTYPES = ("auto", "class", "prompts", "descriptions", "all")
PROTOTYPES = ("blend", "text", "visual")
BLENDS = ("vector", "elementwise", "scalar")
DYNAMICS = ("metanode", "mlp")
LOSS_PROTOTYPES = ("full", "loo")

#: f_θ evaluations per step of the fixed-grid solvers whose count is known.
EVALUATIONS_PER_STEP = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}

#: Resident bytes of the process per byte autograd keeps on the direct path, over a fit's
#: steps: the C allocator keeps the pages of a step's freed activations, and the next step
#: allocates beside them instead of in them (glibc, 1000 x 16 x 1024, fast preset, 16 of 40
#: evaluations recomputed: 4.5 GiB live at the peak of each step; the process grew by 6.0 GiB
#: in the first step and 7.6 GiB by the second, 3.1 GiB of it free heap; 2.1x live with 29
#: recomputed; benchmarks/node_memory.py, docs/methods/node_adapter.md, "Efficiency").
RESIDENT_PER_SAVED_BYTE = 2.0


class _CandidateLogits(torch.autograd.Function):
    """``cos[c, k, m] = x[c, k] · p̂[idx[c, m]]``; keeps p̂ (C, D), not the (C, m, D) gather."""

    @staticmethod
    def forward(ctx, x: Tensor, ph: Tensor, idx: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, ph, idx)
        return torch.einsum("ckd,cmd->ckm", x, ph[idx])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:  # noqa: ANN001
        x, ph, idx = ctx.saved_tensors
        per_pair = torch.einsum("ckm,ckd->cmd", grad, x).reshape(-1, ph.shape[1])
        return None, torch.zeros_like(ph).index_add_(0, idx.reshape(-1), per_pair), None


class _ScatterRows(torch.autograd.Function):
    """``A[j] = Σ_{(c, m): idx[c, m] = j} Σ_k r[c, k, m] x[c, k]``; x is a constant of the fit."""

    @staticmethod
    def forward(ctx, r: Tensor, x: Tensor, idx: Tensor, classes: int) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, idx)
        per_pair = torch.einsum("ckm,ckd->cmd", r, x).reshape(-1, x.shape[-1])
        out = x.new_zeros(classes, x.shape[-1])
        return out.index_add_(0, idx.reshape(-1), per_pair)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: ANN001
        x, idx = ctx.saved_tensors
        return torch.einsum("cmd,ckd->ckm", grad[idx], x), None, None, None


def nearest_classes(prototypes: Tensor, count: int) -> Tensor:
    """(C, m + 1) class indices: each class itself first, then its ``count`` nearest classes by
    the cosine of ``prototypes`` (all classes when ``count`` + 1 >= C or ``count`` is 0)."""
    c = prototypes.shape[0]
    if count <= 0 or count + 1 >= c:
        others = torch.arange(c, device=prototypes.device).expand(c, c)
        own = torch.arange(c, device=prototypes.device)[:, None]
        # own class first, then the others in index order
        rest = others[others != own].view(c, c - 1)
        return torch.cat([own, rest], dim=1)
    unit = F.normalize(prototypes, dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(float("inf"))
    return sim.topk(count + 1, dim=1).indices


class SupportLossGradient:
    """``g(P) = -(1/τ) ∇_P L(P)``, L the class-balanced support cross-entropy of spec §2.7.

    ``L = Σ_c (1/K_c) Σ_k -log softmax_{j ∈ cand(c)}(τ cos(x_ck, p_j))_c`` with ``cand(c)`` the
    class ``c`` and its nearest classes (:func:`nearest_classes`); with every class as a
    candidate this is the exact gradient. Written out (no autograd inside the flow):
    ``g_j = Σ_{c,k: j ∈ cand(c)} r_ckj (x_ck - (x_ck·p̂_j) p̂_j) / ‖p_j‖`` with
    ``r = (1[j = c] - π_ckj) / K_c``. Classes without support rows do not move.

    Two evaluations of the same maths: dense (M, C) logits masked to the candidates when K·C is
    small (a GEMM is faster than a gather there), the gathered (C, K, m) pairs otherwise.

    Args:
        support: (C, K, D) rows (zero padding); mask: (C, K) which rows exist.
        candidates: (C, m) from :func:`nearest_classes`.
        tau: the logit scale τ.
    """

    def __init__(self, support: Tensor, mask: Tensor, candidates: Tensor, tau: float) -> None:
        c, k, _ = support.shape
        self.x, self.idx, self.tau = support, candidates, float(tau)
        self.counts = mask.sum(dim=1).clamp_min(1).to(support.dtype)
        self.row_weight = mask.to(support.dtype) / self.counts[:, None]  # (C, K): 1/K_c or 0
        self.has = mask.any(dim=1).to(support.dtype)[:, None]
        self.dense = dense_logits(c, k, candidates.shape[1])
        if self.dense:
            self.labels = torch.arange(c, device=support.device).repeat_interleave(k)
            allowed = torch.zeros(c, c, dtype=torch.bool, device=support.device)
            allowed.scatter_(1, candidates, True)
            self.blocked = None if bool(allowed.all()) else ~allowed[self.labels]
            self.target = F.one_hot(self.labels, c).to(support.dtype)

    def __call__(self, p: Tensor) -> Tensor:
        norm = p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = p / norm
        if self.dense:
            rows = self.x.reshape(-1, self.x.shape[-1])
            cos = rows @ unit.T  # (M, C)
            logits = self.tau * cos
            if self.blocked is not None:
                logits = logits.masked_fill(self.blocked, float("-inf"))
            r = (self.target - torch.softmax(logits, dim=-1)) * self.row_weight.reshape(-1, 1)
            pull = r.T @ rows
            along = (r * cos).sum(dim=0)[:, None]
        else:
            cos = _CandidateLogits.apply(self.x, unit, self.idx)  # (C, K, m)
            pi = torch.softmax(self.tau * cos, dim=-1)
            own = torch.zeros_like(pi)
            own[..., 0] = 1.0  # the class itself is candidate 0
            r = (own - pi) * self.row_weight[..., None]
            pull = _ScatterRows.apply(r, self.x, self.idx, p.shape[0])
            along = p.new_zeros(p.shape[0]).index_add_(
                0, self.idx.reshape(-1), (r * cos).sum(dim=1).reshape(-1)
            )[:, None]
        return self.has * (pull - along * unit) / norm


def dense_logits(classes: int, shots: int, candidates: int) -> bool:
    """Whether :class:`SupportLossGradient` evaluates through dense (C·K, C) logits (faster than
    gathering the (C, K, m) pairs while K·C < 75 m on a 2-core CPU; the same maths either way)."""
    return shots * classes < 75 * candidates


def activation_bytes(
    *,
    classes: int,
    shots: int,
    dim: int,
    hidden: int,
    attention_width: int,
    evaluations: int,
    candidates: int,
    dtype_bytes: int = 4,
) -> int:
    """Bytes autograd keeps to back-propagate through ``evaluations`` evaluations of f_θ.

    Per support row and evaluation: 5 hidden-wide tensors and 4.5 attention-wide ones (q, k, v,
    the attention output and its copy) when the weight generator runs (K > 1), one hidden-wide
    tensor for γ otherwise (each ELU keeps its output, which its next layer keeps anyway), and
    3.5 per logit the loss-gradient term keeps (``candidates`` = m + 1 with gathered pairs, C
    with dense logits, 0 when the term is off); per class 2 D-wide states. The coefficients
    were read off ``torch.autograd.graph.saved_tensors_hooks`` on small
    problems; tests/methods/test_node_adapter.py checks the estimate against that count.
    """
    rows = classes * shots
    per_row = (5 * hidden + 4.5 * attention_width) if shots > 1 else hidden
    if candidates:
        per_row += 3.5 * (classes if dense_logits(classes, shots, candidates) else candidates)
    return int(dtype_bytes * evaluations * (rows * per_row + classes * 2 * dim))


def loss_bytes(*, rows: int, classes: int, dim: int, dtype_bytes: int = 4) -> int:
    """Bytes the training loss keeps for back-propagation over ``rows`` scored rows: the rows
    themselves (a fresh (B, D) gather per step, kept by the logits' matrix product), their
    (B, C) log-softmax and int64 labels (kept by the cross-entropy). Read off
    ``torch.autograd.graph.saved_tensors_hooks`` like :func:`activation_bytes` (tested); at
    1000 x 16 x 1024 with the whole support set in one batch: 0.12 GiB."""
    return int(rows * (dtype_bytes * (dim + classes) + 8))


def staged_search(
    score: Callable[[dict[str, Any], ValidationSet], tuple[float, float]],
    space: dict[str, list[Any]],
    val: ValidationSet,
) -> tuple[dict[str, float], tuple[float, float]]:
    """The start search in two stages (scores: (validation accuracy, -validation loss)).

    Stage 1: every (λ, γ) of ``space`` at the grid's first gain (η = 0 when the grid has it:
    the closed-form untrained flow). Stage 2: each other η with every λ and stage 1's γ (the
    support term's solves are numeric, so γ is not searched again: 32 solves instead of 128
    with the default grids; a full grid measured no better on the world tasks). Stage 1's point
    wins ties. Without ``gradient_gain`` in ``space`` this is one grid search.
    """
    space = dict(space)
    grid = list(space.pop("gradient_gain", []))
    if not grid:
        point, best = grid_search(score, space, val)
        return {k: float(v) for k, v in point.items()}, best
    first = 0.0 if 0.0 in grid else grid[0]
    point, best = grid_search(score, {**space, "gradient_gain": [first]}, val)
    others = [g for g in grid if g != first]
    if others:
        fixed = {k: point[k] for k in ("gamma_init",) if k in point}
        stage2 = {k: v for k, v in space.items() if k != "gamma_init"}

        def score2(p2: dict[str, Any], val: ValidationSet) -> tuple[float, float]:
            return score({**fixed, **p2}, val)

        point2, best2 = grid_search(score2, {"gradient_gain": others, **stage2}, val)
        if best2 > best:
            point, best = {**fixed, **point2}, best2
    return {k: float(v) for k, v in point.items()}, best


def disagreements(flow_right: Tensor, start_right: Tensor) -> tuple[int, int]:
    """(b, c) of two classifiers on the same rows (``*_right``: which rows each gets right):
    b rows only the flow gets right, c rows only the start gets right."""
    return int((flow_right & ~start_right).sum()), int((start_right & ~flow_right).sum())


def beats_start(b: int, c: int, margin: int, sigmas: float) -> bool:
    """Whether the flow beats the start on the same validation rows, from their
    :func:`disagreements` ``b`` and ``c``: its lead ``b - c`` must exceed ``margin`` rows and
    ``sigmas`` standard deviations of that lead under "no difference", ``sqrt(b + c)``
    (McNemar's paired comparison: rows both get right or wrong say nothing about which is
    better)."""
    return b - c > margin and b - c > sigmas * math.sqrt(b + c)


def solver_evaluations(
    solver: str, solver_options: dict[str, Any] | None, steps: int, t_end: float
) -> int | None:
    """Evaluations of f_θ in one solve, or None when not known in advance (adaptive solvers,
    a custom grid)."""
    per_step = EVALUATIONS_PER_STEP.get(solver)
    given = solver_options or {}
    if per_step is None or "grid_constructor" in given:
        return None
    step_size = given.get("step_size")
    n_steps = steps if step_size is None else math.ceil(t_end / step_size)
    return n_steps * per_step


def backprop_estimate(
    *,
    solver: str,
    solver_options: dict[str, Any] | None,
    steps: int,
    t_end: float,
    metanode: bool,
    classes: int,
    shots: int,
    dim: int,
    hidden: int,
    attention_width: int,
    candidates: int,
) -> int | None:
    """Activation bytes of direct back-propagation through one solve, or None when the number
    of evaluations is not known in advance (adaptive solvers, a custom grid)."""
    evaluations = solver_evaluations(solver, solver_options, steps, t_end)
    if evaluations is None:
        return None
    if not metanode:  # the MLP dynamics: a few hidden-wide tensors per class
        return 4 * evaluations * classes * (4 * hidden + 6 * dim)
    return activation_bytes(
        classes=classes,
        shots=shots,
        dim=dim,
        hidden=hidden,
        attention_width=attention_width,
        evaluations=evaluations,
        candidates=candidates,
    )


def recomputed_evaluations(
    estimate: int, evaluations: int, budget: float, fixed: int = 0
) -> int | None:
    """How many of a solve's ``evaluations`` must recompute their activations in the backward
    pass (instead of keeping them) for direct back-propagation to take at most ``budget``
    resident bytes, :data:`RESIDENT_PER_SAVED_BYTE` per byte autograd keeps: 0 when the whole
    ``estimate`` (saved bytes, of which ``fixed`` do not scale with the evaluations: the
    loss's) fits, None when not even one evaluation's activations fit (then only the adjoint
    does). A recomputed evaluation keeps only its inputs; while its backward runs, its
    activations exist once more, hence the ``+ 1``."""
    room = budget / RESIDENT_PER_SAVED_BYTE
    if estimate <= room:
        return 0
    room -= fixed
    per_evaluation = (estimate - fixed) / evaluations
    if per_evaluation > room:
        return None
    return min(evaluations, math.ceil(evaluations + 1 - room / per_evaluation))


def recomputing(flow: Callable[[Tensor, Tensor], Tensor], count: int) -> Callable:
    """``flow`` whose first ``count`` evaluations of each solve keep only their inputs and
    run again in the backward pass (activation checkpointing): the same values and gradients
    for an extra forward evaluation each. Build one per solve."""
    from torch.utils.checkpoint import checkpoint

    calls = [0]

    def field(t: Tensor, p: Tensor) -> Tensor:
        calls[0] += 1
        if calls[0] <= count:
            return checkpoint(flow, t, p, use_reentrant=False)
        return flow(t, p)

    return field


#: NodeAdapter's option checks (``MethodCard.constraints``).
CONSTRAINTS = {
    "text_prototype": one_of(TEXT_PROTOTYPES),
    "prototype": one_of(PROTOTYPES),
    "blend": one_of(BLENDS),
    "blend_init": between(0.0, 1.0, open_low=True, open_high=True),
    "blend_init_grid": list_of(between(0.0, 1.0, open_low=True, open_high=True)),
    "gamma_init": between(0.0, 2.0, open_high=True),
    "gamma_init_grid": list_of(between(0.0, 2.0, open_high=True)),
    "dynamics": one_of(DYNAMICS),
    "hidden": positive_int(),
    "heads": positive_int(),
    "head_dim": positive_int(),
    "s0": positive(),
    "rho": positive(),
    "gradient_gain": non_negative(),
    "gradient_gain_grid": list_of(non_negative()),
    "gradient_classes": count(),
    "gradient_min_shots": positive_int(),
    "start_bar": flag(),
    "start_margin": count(),
    "start_sigmas": non_negative(),
    "t_end": non_negative(),
    "solver": one_of(solver_names),
    "solver_options": optional(mapping(), "the defaults for the solver"),
    "steps": positive_int(),
    "rtol": positive(),
    "atol": positive(),
    "adjoint": optional(flag(), "chosen from the activation-memory estimate"),
    "memory_budget_gb": positive(),
    "recompute": optional(between(0.0, 1.0), "the smallest share within memory_budget_gb"),
    "adjoint_options": optional(mapping(), "the solver's options"),
    "loss_prototypes": one_of(LOSS_PROTOTYPES),
    "residual": finite(),
    **common("search", "epochs", "batch_size", "lr", "weight_decay", "eps"),
    **common("select_on_val", "use_views", "logit_scale", "seed"),
}


class NodeOptions:
    """Option plumbing of :class:`~clipadapt.methods.node_adapter.NodeAdapter` (a mixin).

    Saved options of earlier versions, the starts a validation search chooses and that search,
    the solver call with its options and the choice of the back-propagation path.
    """

    @classmethod
    def _upgrade_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        # before torchdiffeq's options were passed through: `max_steps` was max_num_steps
        max_steps = params.pop("max_steps", None)
        if max_steps is not None and max_steps != DEFAULT_MAX_NUM_STEPS:
            params["solver_options"] = {
                "max_num_steps": max_steps,
                **(params.get("solver_options") or {}),
            }
        return params

    def search_space(self) -> dict[str, list[Any]]:
        """The hyperparameters chosen on validation data and their candidates (with the start
        bar on, γ = 0 too: the no-ODE start, see :meth:`_start_space`)."""
        if not self.search:
            return {}
        space = self._flow_space()
        if self._start_space() and 0.0 not in space["gamma_init"]:
            space["gamma_init"] = [0.0, *space["gamma_init"]]
        return space

    def _flow_space(self) -> dict[str, list[Any]]:
        """The declared initial values and their grids: the flow's candidates."""
        return {name: list(getattr(self, f"{name}_grid")) for name in self._declared_inits()}

    def _start_space(self) -> dict[str, list[Any]]:
        """The no-ODE start's candidates when the start bar is on (``start_bar``, the MetaNODE
        dynamics, t_end > 0), else {}: every λ at γ = 0 and η = 0, where the untrained
        flow only rescales P(0), so it classifies exactly as the t_end = 0 blend."""
        if not self.start_bar or "gamma_init" not in self._declared_inits():
            return {}
        space: dict[str, list[Any]] = {}
        if self.prototype == "blend":
            space["blend_init"] = list(self.blend_init_grid)
        space["gamma_init"] = [0.0]
        if self._gradient_term_allowed():
            space["gradient_gain"] = [0.0]
        return space

    def _declared_inits(self) -> list[str]:
        """The initial values that matter for this configuration (recorded in best_params_)."""
        names = []
        if self.prototype == "blend":
            names.append("blend_init")
        if self.t_end > 0 and self.dynamics == "metanode":
            names.append("gamma_init")
        if self._gradient_term_allowed():
            names.append("gradient_gain")
        return names

    def _gradient_term_allowed(self) -> bool:
        # the term couples all classes through the softmax; the leave-one-out loss refines
        # extra prototype instances that have no place in that softmax, so it keeps f_θ alone
        return self.t_end > 0 and self.loss_prototypes == "full"

    def _init_values(self) -> dict[str, float]:
        """The initial λ, γ and η in use: the searched ones when recorded, else the options."""
        best = getattr(self, "best_params_", {}) or {}
        return {
            "blend_init": float(best.get("blend_init", self.blend_init)),
            "gamma_init": float(best.get("gamma_init", self.gamma_init)),
            "gradient_gain": float(best.get("gradient_gain", self.gradient_gain)),
        }

    def _solve(
        self, flow: Callable[[Tensor, Tensor], Tensor], p0: Tensor, adjoint: bool = True
    ) -> Tensor:
        """P(t_end) = ODESolve(f_θ, P(0), 0, t_end) with the configured solver (spec §2.8-2.9).

        With ``adjoint`` (and the path chosen for this fit being the adjoint), the flow's
        :meth:`solve_inputs` are what the adjoint differentiates.
        """
        use_adjoint = adjoint and self._adjoint_path()
        inputs = None
        if use_adjoint and torch.is_grad_enabled() and hasattr(flow, "solve_inputs"):
            inputs = flow.solve_inputs()
        field = flow
        recompute = int(getattr(self, "_recomputed", 0))
        if not use_adjoint and recompute and torch.is_grad_enabled():
            field = recomputing(flow, recompute)
        end = solve_endpoint(
            field,
            p0,
            float(self.t_end),
            solver=self.solver,
            options=solver_options(
                self.solver, self.solver_options, step_size=float(self.t_end) / int(self.steps)
            ),
            rtol=self.rtol,
            atol=self.atol,
            adjoint=use_adjoint,
            adjoint_options=self.adjoint_options,
            adjoint_params=inputs,
            what=self.card.name,
        )
        if not torch.isfinite(end).all():
            raise TrainingError(
                f"{self.card.name}: the ODE state became non-finite at t_end={self.t_end:g} "
                f"with solver={self.solver!r}; use more `steps` (now {self.steps}), an adaptive "
                "solver (solver=dopri5), a smaller `s0` or a lower `lr`"
            )
        return end

    def _adjoint_path(self) -> bool:
        """Whether back-propagation goes through the adjoint in this fit (see ``adjoint``)."""
        if self.adjoint is not None:
            return bool(self.adjoint)
        return bool(getattr(self, "_auto_adjoint", True))

    def _choose_backprop(
        self, classes: int, shots: int, dim: int, batch_rows: int, loss_rows: int
    ) -> None:
        """Estimate the activations of direct back-propagation (the solve over ``classes`` +
        ``batch_rows`` prototype instances and the loss over ``loss_rows`` rows), choose the
        path and how many evaluations recompute their activations, record all three."""
        gain_on = self._init_values()["gradient_gain"] > 0
        loss = loss_bytes(rows=loss_rows, classes=classes, dim=dim)
        estimate = backprop_estimate(
            solver=self.solver,
            solver_options=self.solver_options,
            steps=int(self.steps),
            t_end=float(self.t_end),
            metanode=self.dynamics == "metanode",
            classes=classes + batch_rows,
            shots=shots,
            dim=dim,
            hidden=self.hidden,
            attention_width=self.heads * self.head_dim,
            candidates=min(classes, self.gradient_classes + 1 if self.gradient_classes else classes)
            if gain_on
            else 0,
        )
        if estimate is not None:
            estimate += loss
        evaluations = solver_evaluations(
            self.solver, self.solver_options, int(self.steps), float(self.t_end)
        )
        needed = None
        if estimate is not None and evaluations:
            needed = recomputed_evaluations(
                estimate, evaluations, float(self.memory_budget_gb) * 2**30, fixed=loss
            )
        self._auto_adjoint = needed is None
        self._recomputed = 0
        if not self._adjoint_path() and evaluations:
            if self.recompute is not None:
                self._recomputed = math.ceil(float(self.recompute) * evaluations - 1e-9)
            elif needed is not None:
                self._recomputed = needed
        self.best_params_["adjoint"] = self._adjoint_path()
        if estimate is not None:
            self.best_params_["activation_gib"] = float(f"{estimate / 2**30:.4g}")
        if not self._adjoint_path():
            self.best_params_["recomputed_evaluations"] = int(self._recomputed)

    def _check_gradient_gain(self) -> None:
        """A one-line error for a loss-gradient term this configuration cannot use."""
        if self.gradient_gain > 0 and not self._gradient_term_allowed():
            raise ConfigError(
                f"{self.card.name}: gradient_gain={self.gradient_gain:g} needs t_end > 0 and "
                f"loss_prototypes='full' (now t_end={self.t_end:g}, "
                f"loss_prototypes={self.loss_prototypes!r}); set gradient_gain=0"
            )

    def _search_starts(self, ctx: dict[str, Tensor], val: ValidationSet | None) -> bool:
        """Choose the start (λ, γ, η) on ``val`` with :func:`staged_search` (or record the
        options' values without validation data or a search).

        With ``start_bar``, the flow's best point must beat the no-ODE start (the blend
        at its own validation-chosen λ, :meth:`_start_space`) by more than ``start_margin``
        validation rows, else the start is kept. Returns whether it was kept.
        """
        t_bar = ctx["text"]
        shots = int(ctx["support"].shape[1])
        kept: dict[str, Any] = {}

        def logits_at(point: dict[str, Any], val: ValidationSet) -> Tensor:
            # the untrained model at this start: uniform shot weights and a constant γ, so the
            # search chooses how far the start leans to the images and how hard g pushes
            init = {**self._init_values(), **{k: float(v) for k, v in point.items()}}
            with torch.no_grad():
                protos = self._untrained_endpoint(ctx, init)
                return self._prototype_logits(val.features, protos, t_bar)

        def score(point: dict[str, Any], val: ValidationSet) -> tuple[float, float]:
            # accuracy ties go to the lower validation cross-entropy
            logits = logits_at(point, val)
            if not torch.isfinite(logits).all():
                return (-1.0, -math.inf)
            return accuracy(logits, val.labels), -float(F.cross_entropy(logits, val.labels))

        def search(val: ValidationSet) -> tuple[dict[str, float], float]:
            space = self._flow_space()
            if "gradient_gain" in space and shots < self.gradient_min_shots:
                # below gradient_min_shots the loss-gradient term is not searched
                space["gradient_gain"] = [0.0]
            point, best = staged_search(score, space, val)
            start_space = self._start_space()
            if start_space:
                start, start_best = grid_search(score, start_space, val)
                kept["val"] = start_best[0]
                b, c = disagreements(
                    logits_at(point, val).argmax(-1) == val.labels,
                    logits_at(start, val).argmax(-1) == val.labels,
                )
                kept["disagree"] = [b, c]
                if not beats_start(b, c, int(self.start_margin), float(self.start_sigmas)):
                    point, best = {k: float(v) for k, v in start.items()}, start_best
                    kept["start"] = True
            return point, best[0]

        disabled = None
        if not self.search_space():
            disabled = "search disabled" if not self.search else "nothing to search here"
        defaults = {key: float(getattr(self, key)) for key in self._declared_inits()}
        self._choose(val, search, defaults, disabled=disabled)
        if "val" in kept:
            self.best_params_["start_val_accuracy"] = kept["val"]
            self.best_params_["start"] = "kept" if kept.get("start") else "beaten"
            # validation rows only the flow's point / only the start gets right
            self.best_params_["start_disagreement"] = kept["disagree"]
        return bool(kept.get("start"))
