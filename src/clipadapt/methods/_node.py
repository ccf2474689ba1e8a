"""NODE-Adapter's building blocks: prototypes, the cross-modal blend and the ODE dynamics.

The maths of :mod:`clipadapt.methods.node_adapter` that is not the method's interface: how the
textual and visual prototypes are formed, the blend ``p(0) = λ v̄ + (1 - λ) t̄`` and the learned
gradient flows f_θ integrated by the ODE solver (``docs/methods/node_adapter.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt.data.sets import TextFeatures, normalize_rows
from clipadapt.exceptions import ConfigError
from clipadapt.methods._node_support import TEXT_PROTOTYPES, SupportLossGradient

# ---------------------------------------------------------------------------------- helpers


def group_by_class(
    features: Tensor, labels: Tensor, num_classes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Scatter rows into a padded per-class tensor without a Python loop over classes.

    Args:
        features: (M, D) support features.
        labels: (M,) class of each row.
        num_classes: C.

    Returns:
        ``X`` (C, K, D) with K the largest class count (zero padding), ``mask`` (C, K) bool
        (True where a row exists) and ``slot`` (M,) the position of each row in its class.
    """
    counts = torch.bincount(labels, minlength=num_classes)
    k = max(int(counts.max()), 1) if labels.numel() else 1
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(labels)
    slot[order] = torch.arange(labels.numel(), device=labels.device) - starts[labels[order]]
    x = features.new_zeros(num_classes, k, features.shape[1])
    x[labels, slot] = features
    mask = torch.zeros(num_classes, k, dtype=torch.bool, device=features.device)
    mask[labels, slot] = True
    return x, mask, slot


def masked_mean_direction(x: Tensor, mask: Tensor) -> Tensor:
    """Normalised sum of the rows selected by ``mask`` (zeros where a class has none).

    Args:
        x: (M, K, D); mask: (M, K) bool.
    """
    total = (x * mask[..., None]).sum(dim=1)
    return total / total.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def text_prototypes(text: TextFeatures, source: str) -> Tensor:
    """Per-class textual prototypes t̄ (C, D): the normalised mean of normalised text features.

    Args:
        text: the class text features.
        source: ``"class"`` (``text_features``), ``"prompts"`` (mean over the template
            ensemble ``text_features_all``), ``"descriptions"`` (masked mean of the CuPL
            descriptions), ``"all"`` (templates and descriptions together, each feature one
            vote), ``"auto"`` (templates when present, else ``text_features``).

    Raises:
        MissingTensorError: the chosen source is not in the bundle (the message names it).
    """
    if source not in TEXT_PROTOTYPES:
        raise ConfigError(
            f"node_adapter: text_prototype={source!r} is not one of {', '.join(TEXT_PROTOTYPES)}"
        )
    if source == "auto":
        source = "prompts" if text.prompt_features is not None else "class"
    if source == "class":
        return text.class_features
    parts: list[tuple[Tensor, Tensor]] = []
    if source in ("prompts", "all"):
        prompts = text.require("prompt_features", "node_adapter (text_prototype=prompts)")
        parts.append(
            (prompts, torch.ones(prompts.shape[:2], dtype=torch.bool, device=prompts.device))
        )
    if source in ("descriptions", "all"):
        desc = text.require("description_features", "node_adapter (text_prototype=descriptions)")
        parts.append((desc, text.description_mask))
    feats = torch.cat([p for p, _ in parts], dim=1)
    mask = torch.cat([m for _, m in parts], dim=1)
    return masked_mean_direction(normalize_rows(feats), mask)


def _init_linear(layer: nn.Linear, generator: torch.Generator, zero: bool = False) -> None:
    """PyTorch's default Linear init, drawn from a private generator (no global RNG use)."""
    with torch.no_grad():
        if zero:
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
            return
        bound = 1.0 / math.sqrt(layer.weight.shape[1])
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
        if layer.bias is not None:
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=generator) * 2 * bound - bound)


def sinusoidal_time(t: Tensor, width: int, t_end: float) -> Tensor:
    """A (width,) sinusoidal embedding of the time ``t / t_end`` (MLP dynamics only)."""
    half = width // 2
    freqs = torch.exp(
        torch.arange(half, dtype=t.dtype, device=t.device) * (-math.log(100.0) / max(half, 1))
    )
    angle = (t / max(t_end, 1e-12)) * math.pi * freqs * 10
    return torch.cat([torch.sin(angle), torch.cos(angle)])


# ---------------------------------------------------------------------------------- modules


class CrossModalBlend(nn.Module):
    """The adaptive blend ``p(0) = λ v̄ + (1 - λ) t̄`` (spec §2.4).

    Args:
        dim: D.
        mode: ``"vector"`` (spec: λ_j = σ(v̄_jᵀu + b), u ∈ R^D), ``"elementwise"`` (a per-dimension
            gate σ(u + b) ∈ R^D) or ``"scalar"`` (one λ for all classes).
        prior: b, the fixed logit offset (``logit(blend_init)``).
    """

    def __init__(self, dim: int, mode: str, prior: float) -> None:
        super().__init__()
        self.mode = mode
        self.u = nn.Parameter(torch.zeros(1 if mode == "scalar" else dim))
        self.register_buffer("prior", torch.tensor(float(prior)))

    def weight(self, visual: Tensor) -> Tensor:
        """λ, (M, 1) for the vector/scalar modes, (1, D) for the element-wise one."""
        if self.mode == "vector":
            return torch.sigmoid(visual @ self.u + self.prior)[:, None]
        return torch.sigmoid(self.u + self.prior)[None]

    def forward(self, visual: Tensor, text: Tensor, has_support: Tensor) -> Tensor:
        lam = self.weight(visual) * has_support[:, None].to(visual.dtype)
        return lam * visual + (1.0 - lam) * text


def _elu_forward(x: Tensor) -> Tensor:
    """ELU as ``max(x, exp(min(x, 0)) - 1)``: ``e^x - 1 ≥ x`` everywhere, so the maximum picks
    x for x > 0 and the exponential branch otherwise. This build's CPU ``expm1`` (behind
    ``F.elu``) is not vectorised and ran about 10x slower than ``exp`` on (16,000 x 256) tensors
    (docs/methods/node_adapter.md); the difference from ``expm1`` is at most one float32
    rounding step of 1 (6e-8), absolute."""
    y = x.clamp_max(0.0).exp_().sub_(1.0)
    return torch.maximum(y, x, out=y)


class _Elu(torch.autograd.Function):
    """ELU (α = 1) for the weight and scale generators, keeping its output for the backward
    pass (the next layer keeps the same tensor, so autograd stores it once):
    ``dy/dx = 1`` where y > 0, ``y + 1 = e^x`` elsewhere."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        y = _elu_forward(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        (y,) = ctx.saved_tensors
        return y.clamp_max(0.0).add_(1.0).mul_(grad)


def elu(x: Tensor) -> Tensor:
    """``F.elu(x)`` (α = 1) through ``exp``; see :func:`_elu_forward`."""
    return _Elu.apply(x)


class _PairProduct(torch.autograd.Function):
    """``(x ⊙ p[:, None]) @ w`` for the pair layer's first block, keeping p and w for the
    backward pass instead of the (M, K, D) product (x is a constant of the fit): back-propagating
    through the solver keeps one of these per evaluation.

    ``scratch`` (x's shape, or None) is a work buffer for the (M, K, D) temporaries of both
    passes. They are the largest tensors of a step (64 MiB at 1000 x 16 x 1024), and a fresh
    allocation that large is new memory the kernel must fault in page by page: a
    multiplication into a reused buffer ran 5x faster than into a fresh one (7 vs 39 ms,
    one thread; docs/methods/node_adapter.md). Each pass fills the buffer and consumes it
    before it returns, so one buffer serves every evaluation of a solve, forward and backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: Tensor, w: Tensor, scratch: Tensor | None) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, p, w)
        if scratch is not None and scratch.dtype != torch.result_type(x, p):
            scratch = None  # mixed precision: let the products take their promoted type
        ctx.scratch = scratch
        return torch.matmul(torch.mul(x, p[:, None], out=scratch), w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None, None]:  # noqa: ANN001
        x, p, w = ctx.saved_tensors
        scratch = ctx.scratch
        grad_p = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_p = torch.matmul(grad, w.T, out=scratch).mul_(x).sum(dim=1)
        if ctx.needs_input_grad[2]:
            m, k, d = x.shape
            product = torch.mul(x, p[:, None], out=scratch)
            grad_w = product.reshape(m * k, d).T @ grad.reshape(m * k, -1)
        return None, grad_p, grad_w, None


class GradientFlow(nn.Module):
    """f_θ, the learned gradient estimator of spec §2.6 (MetaNODE-style, per class).

    ``f(P, t)_j = s(t) Σ_k w_jk (γ_jk x_jk - p_j)`` over the support rows ``x_jk`` of class j;
    ``w`` comes from the weight generator (pair descriptor -> Linear -> ELU -> LayerNorm ->
    multi-head self-attention over the shots -> linear score -> masked softmax over shots),
    ``γ = 2σ(Linear(ELU(Linear([x; p]))))`` from the scale generator. The pair layer is applied
    block-wise, ``W[p⊙x; p⊙p; x⊙x; p; x] = W₁(p⊙x) + W₂(p⊙p) + W₃(x⊙x) + W₄p + W₅x``, so the
    (M, K, 5D) descriptor is never built and the x-only blocks are computed once per solve.

    Call :meth:`set_context` before solving; ``forward(t, P)`` follows torchdiffeq's order.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        heads: int,
        head_dim: int,
        s0: float,
        rho: float,
        t_end: float,
        gamma_init: float = 1.0,
    ) -> None:
        super().__init__()
        # fixed logit offset of γ so that γ = gamma_init while the output layer is zero; at
        # gamma_init = 0 it is -inf: γ ≡ 0 whatever the layer says, so the flow only rescales
        # each prototype (f = -s(t) p) and P(t_end) points where P(0) does (the no-ODE start)
        prior = -math.inf if gamma_init == 0 else math.log(gamma_init / (2.0 - gamma_init))
        self.register_buffer("gamma_prior", torch.tensor(prior))
        self.dim, self.hidden, self.heads, self.head_dim = dim, hidden, heads, head_dim
        self.s0, self.rho, self.t_end = s0, rho, t_end
        self.pair = nn.Linear(5 * dim, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        self.attn_out = nn.Linear(heads * head_dim, hidden, bias=False)
        self.norm2 = nn.LayerNorm(hidden, bias=False)  # a shift here cancels in the softmax
        self.score = nn.Linear(hidden, 1, bias=False)  # a bias cancels in the softmax
        self.gamma_in = nn.Linear(2 * dim, hidden, bias=False)
        self.gamma_out = nn.Linear(hidden, 1, bias=False)
        self.nfe = 0
        self._ctx: dict[str, Tensor] = {}
        self._rows: dict[str, Tensor] | None = None
        self._solve: dict[str, Tensor] = {}
        #: the support-loss gradient term g and its gain η (None / 0: the spec's f_θ alone)
        self.support_term: SupportLossGradient | None = None
        self.gain = 0.0

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Default init; the score and γ output layers start at zero (spec A17: w = 1/K, γ = 1)."""
        for layer in (self.pair, self.qkv, self.attn_out, self.gamma_in):
            _init_linear(layer, generator)
        _init_linear(self.score, generator, zero=True)
        _init_linear(self.gamma_out, generator, zero=True)

    def set_context(self, support: Tensor, mask: Tensor, **_: Tensor) -> None:
        """Fix the support rows (M, K, D) and their mask (M, K) for the next solve.

        What depends on the rows only (masks, ``x ⊙ x``) is kept until other rows come (once
        per fit). What depends on the weights too is computed here, once per solve, inside the
        autograd graph: the x-only products (``pair_x``, ``gamma_x``) and the weight blocks the
        evaluations use. :meth:`solve_inputs` hands exactly these tensors to the adjoint, which
        accumulates their gradients over the whole backward solve; autograd then carries them
        into the weights once, instead of once per vector-Jacobian product.
        """
        cached = self._rows
        if cached is None or cached["x"] is not support or cached["mask"] is not mask:
            has = mask.any(dim=1)
            cached = {
                "x": support,
                "mask": mask,
                # empty classes attend to padding, then get w = 0
                "key_mask": mask | ~has[:, None],
                "has": has.to(support.dtype),
            }
            if support.shape[1] > 1:
                cached["xx"] = support * support
                cached["scratch"] = torch.empty_like(support)
            self._rows = cached
        d = self.dim
        w_pair, w_gamma = self.pair.weight, self.gamma_in.weight
        solve = {"gamma_x": support @ w_gamma[:, :d].T, "gamma_p": w_gamma[:, d:].T}
        if support.shape[1] > 1:  # with one shot the weight generator is not evaluated
            solve["pair_x"] = cached["xx"] @ w_pair[:, 2 * d : 3 * d].T + (
                support @ w_pair[:, 4 * d :].T
            )
            solve["pair_px"] = w_pair[:, :d].T
            solve["pair_pp"] = w_pair[:, d : 2 * d].T
            solve["pair_p"] = w_pair[:, 3 * d : 4 * d].T
        self._solve = solve
        self._ctx = {**cached, **solve}

    def solve_inputs(self) -> tuple[Tensor, ...]:
        """What the adjoint differentiates: the per-solve tensors of :meth:`set_context` and
        the parameters an evaluation uses directly (never ``pair``/``gamma_in``, which it only
        reaches through the per-solve tensors: listing them too would count paths twice)."""
        direct = [self.gamma_out.weight]
        if "pair_x" in self._solve:
            direct += [
                self.norm1.weight,
                self.norm1.bias,
                self.qkv.weight,
                self.attn_out.weight,
                self.norm2.weight,
                self.score.weight,
            ]
        derived = tuple(t for t in self._solve.values() if t.requires_grad)
        return derived + tuple(p for p in direct if p.requires_grad)

    def forward(self, t: Tensor, p: Tensor) -> Tensor:
        self.nfe += 1
        ctx = self._ctx
        x = ctx["x"]
        m, k, _ = x.shape
        if k == 1:
            # a softmax over one shot is 1 whatever the scores: skip the weight generator
            w = ctx["has"][:, None]
        else:
            w = self._shot_weights(p, x, m, k)
        gamma_hidden = elu(ctx["gamma_x"] + (p @ ctx["gamma_p"])[:, None])
        gamma = 2.0 * torch.sigmoid(self.gamma_out(gamma_hidden).squeeze(-1) + self.gamma_prior)
        drive = torch.einsum("mk,mkd->md", w * gamma, x) - w.sum(dim=-1, keepdim=True) * p
        if self.support_term is not None:
            drive = drive + self.gain * self.support_term(p)
        return self.step_scale(t) * drive

    def _shot_weights(self, p: Tensor, x: Tensor, m: int, k: int) -> Tensor:
        """w (M, K): the weight generator's softmax over the shots of each prototype."""
        ctx = self._ctx
        per_class = (p * p) @ ctx["pair_pp"] + p @ ctx["pair_p"]
        e = _PairProduct.apply(x, p, ctx["pair_px"], ctx.get("scratch"))
        # in place: the product is a fresh tensor nothing keeps, and a (M, K, hidden) sum into
        # new memory costs about 4x one into memory already resident
        e = e.add_(per_class[:, None]).add_(ctx["pair_x"])
        e = self.norm1(elu(e))
        q, key, v = self.qkv(e).view(m, k, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(
            q, key, v, attn_mask=ctx["key_mask"][:, None, None, :]
        )
        attended = attended.transpose(1, 2).reshape(m, k, self.heads * self.head_dim)
        e = self.norm2(e + self.attn_out(attended))
        # rows of classes without support attend over padding (finite) and get w = 0 below
        scores = self.score(e).squeeze(-1).masked_fill(~ctx["key_mask"], float("-inf"))
        return torch.softmax(scores, dim=-1) * ctx["has"][:, None]

    def step_scale(self, t: Tensor) -> Tensor:
        """s(t) = s0 · ρ^(t / t_end), the decaying 'learning rate' of the flow (spec A5)."""
        return self.s0 * self.rho ** (t / max(self.t_end, 1e-12))


class MLPFlow(nn.Module):
    """The lightweight fallback dynamics of spec §2.6: ``f = MLP([p; v̄; t̄; φ(t)])``.

    Two SiLU layers of width ``hidden``; the output layer starts at zero, so the flow starts as
    the identity map.
    """

    time_width = 16

    def __init__(self, dim: int, hidden: int, s0: float, rho: float, t_end: float) -> None:
        super().__init__()
        self.dim, self.t_end = dim, t_end
        self.s0, self.rho = s0, rho
        self.inp = nn.Linear(3 * dim + self.time_width, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, dim)
        self.nfe = 0
        self._ctx: dict[str, Tensor] = {}
        self.support_term: SupportLossGradient | None = None
        self.gain = 0.0

    def reset_parameters(self, generator: torch.Generator) -> None:
        _init_linear(self.inp, generator)
        _init_linear(self.mid, generator)
        _init_linear(self.out, generator, zero=True)

    def set_context(self, support: Tensor, mask: Tensor, *, visual: Tensor, text: Tensor) -> None:
        """Per solve: the constant inputs' share of the first layer and its p and time blocks
        (handed to the adjoint by :meth:`solve_inputs`, as for :class:`GradientFlow`)."""
        d = self.dim
        w = self.inp.weight
        self._ctx = {
            "static": visual @ w[:, d : 2 * d].T + text @ w[:, 2 * d : 3 * d].T,
            "w_p": w[:, :d].T,
            "w_time": w[:, 3 * d :].T,
        }

    def solve_inputs(self) -> tuple[Tensor, ...]:
        """The per-solve tensors and the parameters an evaluation uses directly."""
        direct = (self.inp.bias, self.mid.weight, self.mid.bias, self.out.weight, self.out.bias)
        derived = tuple(t for t in self._ctx.values() if t.requires_grad)
        return derived + tuple(p for p in direct if p.requires_grad)

    def forward(self, t: Tensor, p: Tensor) -> Tensor:
        self.nfe += 1
        ctx = self._ctx
        phi = sinusoidal_time(t, self.time_width, self.t_end).to(p.dtype)
        h = p @ ctx["w_p"] + ctx["static"] + phi @ ctx["w_time"]
        h = F.silu(self.mid(F.silu(h + self.inp.bias)))
        out = self.out(h)
        if self.support_term is not None:
            out = out + self.gain * self.support_term(p)
        return self.s0 * self.rho ** (t / max(self.t_end, 1e-12)) * out


class NodeAdapterModel(nn.Module):
    """The trainable parts: the blend (u) and the dynamics (θ)."""

    def __init__(self, blend: CrossModalBlend | None, flow: nn.Module | None) -> None:
        super().__init__()
        self.blend = blend
        self.flow = flow


def untrained_endpoint(
    support: Tensor,
    mask: Tensor,
    text: Tensor,
    *,
    lam: float | None,
    gamma: float,
    schedule: tuple[float, float, float] | None,
    solve: Callable[[Callable[[Tensor, Tensor], Tensor], Tensor], Tensor],
    pull: bool = True,
    support_term: SupportLossGradient | None = None,
    gain: float = 0.0,
) -> Tensor:
    """P(t_end) of the untrained model.

    Untrained, u = 0 (so λ is the prior for every class), the shot weights are uniform and γ is
    a constant: f_θ is ``s(t) (γ x̄ - p)`` (x̄ the plain mean of the shots; ``pull=False`` for the
    MLP dynamics, whose output starts at zero). Without the loss-gradient term this is a linear
    ODE whose solution is ``p(t_end) = a p(0) + b γ x̄``, the scalars (a, b) given by the same
    solver on a 2-dimensional copy of it: identical to a full solve on a fixed grid, at the cost
    of a few vector operations. With it (``gain`` > 0), the (C, D) field
    ``s(t) (γ x̄ - p + η g(p))`` is solved by the same solver.

    Args:
        support: (C, K, D) support rows; mask: (C, K) which exist; text: (C, D) t̄.
        lam: λ of the blend ``p(0) = λ v̄ + (1 - λ) t̄``; None starts from t̄.
        gamma: the constant γ of the untrained flow.
        schedule: (s0, ρ, t_end) of s(t), or None without an ODE.
        solve: solves a flow ``f(t, y)`` from a start ``y0`` to t_end (the method's solver).
        pull: whether the untrained f_θ pulls towards γ x̄ (the MetaNODE dynamics).
        support_term, gain: the loss-gradient term g and its gain η.

    Returns:
        (C, D) prototypes (not normalised).
    """
    visual = masked_mean_direction(support, mask)
    has = mask.any(dim=1)[:, None]
    p0 = text if lam is None else torch.where(has, lam * visual + (1.0 - lam) * text, text)
    moves = pull or (support_term is not None and gain > 0)
    if schedule is None or not moves:
        return p0
    s0, rho, t_end = schedule
    counts = mask.sum(dim=1, keepdim=True).clamp_min(1).to(p0.dtype)
    mean = (support * mask[..., None]).sum(dim=1) / counts
    if support_term is not None and gain > 0:
        weight = has.to(p0.dtype) * float(pull)

        def field(t: Tensor, p: Tensor) -> Tensor:
            drive = weight * (gamma * mean - p) + gain * support_term(p)
            return s0 * rho ** (t / t_end) * drive

        return solve(field, p0)

    def scalar_flow(t: Tensor, y: Tensor) -> Tensor:
        return s0 * rho ** (t / t_end) * (target - y)

    target = torch.tensor([0.0, 1.0], dtype=p0.dtype, device=p0.device)
    start = torch.tensor([1.0, 0.0], dtype=p0.dtype, device=p0.device)
    a, b = solve(scalar_flow, start)
    return torch.where(has, a * p0 + b * gamma * mean, p0)
