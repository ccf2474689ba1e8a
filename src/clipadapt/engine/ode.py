"""Solving ODEs with torchdiffeq, its options passed straight through.

A method that integrates a learned flow (NODE-Adapter) names a torchdiffeq solver and hands
torchdiffeq's own settings through unchanged: ``rtol``/``atol`` (arguments of every solver),
the solver's ``options`` dict (``step_size``, ``grid_constructor``, ``max_num_steps``, ...) and,
for adjoint back-propagation, ``adjoint_options``. Nothing here re-lists what torchdiffeq
accepts; the valid solver names are read from torchdiffeq itself. What is added: the adjoint's
parameter list for a module, and torchdiffeq's bare assertions turned into errors that say what
to change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from clipadapt.exceptions import TrainingError

#: ``max_num_steps`` given to adaptive solvers unless the options say otherwise: a run that
#: would take more steps fails loudly instead of running for hours (torchdiffeq's own limit is
#: 2**31 - 1).
DEFAULT_MAX_NUM_STEPS = 10_000


def solver_names() -> tuple[str, ...]:
    """The solver names torchdiffeq accepts (``odeint(method=...)``), sorted."""
    from torchdiffeq._impl.odeint import SOLVERS

    return tuple(sorted(SOLVERS))


def solver_kind(solver: str) -> str:
    """``"fixed_grid"``, ``"adaptive"`` or ``"other"`` (e.g. scipy_solver), from torchdiffeq's
    class of the solver.

    Raises:
        ValueError: an unknown solver name (the message lists the valid ones).
    """
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.solvers import AdaptiveStepsizeODESolver, FixedGridODESolver

    if solver not in SOLVERS:
        raise ValueError(
            f"unknown ODE solver {solver!r}; torchdiffeq has {', '.join(solver_names())}"
        )
    cls = SOLVERS[solver]
    if issubclass(cls, FixedGridODESolver):
        return "fixed_grid"
    if issubclass(cls, AdaptiveStepsizeODESolver):
        return "adaptive"
    return "other"


def solver_options(
    solver: str, given: Mapping[str, Any] | None, *, step_size: float | None = None
) -> dict[str, Any]:
    """torchdiffeq's ``options`` for ``solver``: ``given`` over a default for the solver's kind.

    Fixed-grid solvers get ``step_size`` unless ``given`` sets a step or a
    ``grid_constructor``; adaptive ones get ``max_num_steps`` = :data:`DEFAULT_MAX_NUM_STEPS`.
    """
    options = dict(given or {})
    kind = solver_kind(solver)
    defaults: dict[str, Any] = {}
    if kind == "fixed_grid" and step_size is not None:
        if not {"step_size", "grid_constructor"} & set(options):
            defaults["step_size"] = step_size
    elif kind == "adaptive":
        defaults["max_num_steps"] = DEFAULT_MAX_NUM_STEPS
    return {**defaults, **options}


@contextlib.contextmanager
def solver_errors(what: str, solver: str, rtol: float, atol: float) -> Iterator[None]:
    """Turn torchdiffeq's assertion failures (forward or adjoint solve) into TrainingError."""
    try:
        yield
    except AssertionError as error:
        message = str(error)
        if "underflow" in message:
            hint = (
                f"the adaptive solver {solver!r} hit a step-size underflow ({message}); loosen "
                f"`rtol`/`atol` (now {rtol:g}/{atol:g}) or use a fixed-grid solver (solver=rk4)"
            )
        elif "max_num_steps" in message:
            hint = (
                f"the adaptive solver {solver!r} ran out of steps ({message}); raise "
                "`solver_options` max_num_steps, loosen `rtol`/`atol` or use a fixed-grid solver "
                "(solver=rk4)"
            )
        else:
            hint = f"the ODE solver failed ({message}); check `solver` and `solver_options`"
        raise TrainingError(f"{what}: {hint}") from None


def solve_endpoint(
    func: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t_end: float,
    *,
    solver: str,
    options: Mapping[str, Any] | None = None,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    adjoint: bool = False,
    adjoint_options: Mapping[str, Any] | None = None,
    adjoint_params: Sequence[Tensor] | None = None,
    what: str = "ODE solve",
) -> Tensor:
    """The state at ``t_end`` of ``dy/dt = func(t, y)``, ``y(0) = y0``.

    Args:
        func: the flow, called as ``func(t, y)`` (torchdiffeq's order).
        y0: the initial state; the result has its shape and dtype.
        t_end: the end of the interval [0, t_end].
        solver: a torchdiffeq method name (:func:`solver_names`).
        options: passed to the solver as torchdiffeq's ``options`` (copied).
        rtol, atol: torchdiffeq's tolerances.
        adjoint: back-propagate with ``odeint_adjoint`` (when gradients are enabled); ``func``
            must then be an ``nn.Module`` whose trainable parameters are the adjoint's.
        adjoint_options: torchdiffeq's ``adjoint_options`` (None: the forward options).
        adjoint_params: the tensors the adjoint differentiates (None: ``func``'s trainable
            parameters). A flow that derives tensors from its weights once per solve passes
            those instead of the weights, so the adjoint accumulates their gradients over the
            whole backward solve and autograd carries them into the weights once.
        what: names the caller in error messages.

    Raises:
        TrainingError: the solver failed (the message says which setting to change).
    """
    from torchdiffeq import odeint, odeint_adjoint

    t = torch.tensor([0.0, float(t_end)], dtype=y0.dtype, device=y0.device)
    kwargs: dict[str, Any] = {"rtol": rtol, "atol": atol, "method": solver}
    kwargs["options"] = dict(options) if options is not None else None
    with solver_errors(what, solver, rtol, atol):
        if adjoint and torch.is_grad_enabled():
            if not isinstance(func, nn.Module):
                raise TypeError(f"{what}: adjoint back-propagation needs the flow as an nn.Module")
            # Without an explicit list: the leaf parameters. A flow that caches tensors computed
            # from its weights (inside the autograd graph) is then reached through that retained
            # graph; listing the cached tensors as well would count those paths twice.
            if adjoint_params is None:
                params = tuple(p for p in func.parameters() if p.requires_grad)
            else:
                params = tuple(adjoint_params)
            adjoint_kwargs = {"adjoint_params": params}
            if adjoint_options is not None:
                adjoint_kwargs["adjoint_options"] = dict(adjoint_options)
            path = odeint_adjoint(func, y0, t, **kwargs, **adjoint_kwargs)
        else:
            path = odeint(func, y0, t, **kwargs)
    return path[-1]
