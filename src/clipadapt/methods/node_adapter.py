"""NODE-Adapter: cross-modal prototypes refined by a neural ODE (Zhang et al., arXiv 2407.08672).

The method, as implemented (``docs/methods/node_adapter.md`` has the full page):

1. **Textual prototype** ``t̄_j``: the normalised mean of the class's text features (prompt
   templates and/or CuPL descriptions, option ``text_prototype``).
2. **Visual prototype** ``v̄_j``: the normalised mean of the class's K-shot features.
3. **Cross-modal blend** ``p_j(0) = λ_j v̄_j + (1 - λ_j) t̄_j`` with ``λ_j = σ(v̄_jᵀ u + b)``,
   ``u ∈ R^D`` learnable (init 0) and ``b = logit(blend_init)`` a fixed prior (0 for the spec's
   neutral start λ = 0.5).
4. **Neural ODE** ``dP/dt = f_θ(P, t)`` on ``[0, t_end]`` (torchdiffeq; adjoint back-propagation
   by default), with the MetaNODE-style gradient estimator (spec §2.6)::

       f_θ(P, t)_j = s(t) Σ_k w_jk (γ_jk x_jk - p_j),   s(t) = s0 ρ^(t / t_end)

   where the weight generator scores pair descriptors ``[p⊙x; p⊙p; x⊙x; p; x]`` through
   Linear-ELU-LayerNorm, 8-head self-attention over the shots of the class and a linear score
   (softmax over shots), and the scale generator gives ``γ = 2σ(MLP([x; p]))``.
5. **Logits** ``τ cos(f, p_j(t_end))`` (+ an optional zero-shot residual), trained with
   cross-entropy on the K-shot rows (or their augmented views) by the shared training loop.

Engineering points the paper leaves open are options; see :class:`NodeAdapter`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet, normalize_rows
from clipadapt.engine.ode import solver_errors
from clipadapt.engine.search import accuracy
from clipadapt.engine.train import OptimizerParams, TrainHistory, ViewSampler, train_loop
from clipadapt.exceptions import NotFittedError
from clipadapt.methods._node import (
    CrossModalBlend,
    GradientFlow,
    MLPFlow,
    NodeAdapterModel,
    group_by_class,
    masked_mean_direction,
    text_prototypes,
    untrained_endpoint,
)
from clipadapt.methods._node_support import (
    CONSTRAINTS,
    NodeOptions,
    SupportLossGradient,
    nearest_classes,
)
from clipadapt.methods.base import Adapter, MethodCard, register_method

# ---------------------------------------------------------------------------------- method


@register_method
class NodeAdapter(NodeOptions, OptimizerParams, Adapter):
    """NODE-Adapter (Zhang et al., 2024): cross-modal prototypes refined by a neural ODE.

    The paper's body was not available, so most defaults are inferred values (the method's
    documentation page lists which, and why).

    Args:
        text_prototype: how t̄_j is formed: ``"auto"`` (mean over the prompt templates
            ``text_features_all`` when the bundle has them, else ``text_features``), ``"class"``,
            ``"prompts"``, ``"descriptions"`` (CuPL) or ``"all"`` (templates + descriptions).
        prototype: initial prototype, ``"blend"`` (the method), or the ablations ``"text"``
            (λ = 0) and ``"visual"`` (λ = 1).
        blend: blend form (spec A1): ``"vector"`` λ_j = σ(v̄_jᵀu + b) (default), ``"elementwise"``
            σ(u + b) ⊙ v̄ + …, or ``"scalar"``.
        blend_init: initial λ, i.e. b = logit(blend_init) with u = 0 (spec: 0.5, the neutral
            start). Chosen on validation data from ``blend_init_grid`` when ``search`` is on.
        blend_init_grid: candidates for ``blend_init`` (inferred): CLIP's modality gap makes
            image-image cosines much larger than image-text ones, so a 50/50 blend is dominated
            by the (one- or few-shot) visual side; the grid lets validation data pick the prior.
            It reaches past 0.5 (0.7, 0.9) because with many shots or a weak text side the best
            start leans to the images (the benchmarks' synthetic problem: λ 0.5 -> 51 %,
            0.7 -> 66 %).
        gamma_init, gamma_init_grid: the constant γ of the untrained flow (spec A17: 1) and its
            candidates. 0 means no pull: γ ≡ 0, the flow only rescales P, so the model
            classifies as the t_end = 0 blend (the start that ``start_bar`` compares with).
        search: choose ``blend_init``, ``gamma_init`` and ``gradient_gain`` on the validation
            rows (scored with the untrained model, ODE included) before training, in two
            stages: (λ, γ) without the loss-gradient term (closed form), then every η > 0 of
            ``gradient_gain_grid`` with each λ and the chosen γ. The first best point by
            validation accuracy wins, accuracy ties going to the lower validation
            cross-entropy; with ``start_bar``, that point must then beat the no-ODE
            start on the validation rows (``start_margin``, ``start_sigmas``). Without
            validation data the options' values are used.
        dynamics: f_θ, ``"metanode"`` (spec §2.6 (★), default) or ``"mlp"`` (the fallback).
        hidden: width H of f_θ (spec: 256).
        heads, head_dim: self-attention heads and per-head width (MetaNODE: 8 x 16).
        s0, rho: the flow's step-size schedule s(t) = s0 ρ^(t / t_end) (MetaNODE: 0.1, 0.1).
        gradient_gain: η, the gain of the support-loss gradient term added to the vector field,
            ``f = f_θ + s(t) η g(P)`` with g = -(1/τ)∇_P of the support cross-entropy (spec
            §2.7, the loss the flow imitates; clipadapt's option, not the spec's f_θ). 0 is the
            spec's dynamics. Used as is without a search; chosen from ``gradient_gain_grid``
            with one.
        gradient_gain_grid: candidates for η (0 keeps the spec's dynamics; ties keep it).
        gradient_min_shots: the search tries η > 0 only with at least this many shots per
            class (default 2: at K = 1 a class's one support row is its visual prototype, the
            support loss that g follows is degenerate, and on the world tasks the term chose
            below the start at 1 shot; 1 searches it at every K).
        start_bar: clipadapt's rule (False: off, the flow's best point is always kept, the
            behaviour before it). The no-ODE start, the blend at its own validation-chosen λ
            (searched as γ = 0, η = 0: the untrained flow then only rescales P(0)), is kept
            unless the flow's best point beats it on the validation rows: its lead ``b - c``
            (rows only the flow gets right minus rows only the start gets right) must exceed
            ``start_margin`` rows and ``start_sigmas`` times ``sqrt(b + c)``, the spread of
            that lead when the two are equally good (McNemar's paired comparison). A kept
            start is the fit (no training); ``best_params_`` records ``start`` (kept / beaten)
            and ``start_disagreement`` ([b, c]). A trained epoch likewise replaces the
            untrained model only when it beats it by more than ``start_margin`` rows.
        start_margin: validation rows of that bar. 1 (default): a one-row win is the
            resolution of the comparison, not evidence.
        start_sigmas: the bar's spread multiple. 1 (default): a lead within one standard
            deviation of "no difference" keeps the start (on real ImageNet at 2 shots the
            flow led by 4 rows with 20 disagreeing, 0.89 of it, and scored 0.12 below the
            start on test); 0 is the margin-only bar. Measured in
            docs/methods/node_adapter.md ("Below its start": how it is judged, and the start bar).
        gradient_classes: m, the classes each support row's softmax in g runs over besides its
            own: its class's m nearest classes at the start (0: all classes, the exact
            gradient). With τ = 100 the softmax mass sits on a few classes, so m = 32 keeps g
            close to exact while its cost stays O(C·K·m·D) per evaluation.
        t_end: integration interval [0, t_end] (spec A6: 10). 0 disables the ODE (ablation:
            the cross-modal prototype classifier).
        solver: a torchdiffeq method, passed through: fixed grid (``euler``, ``midpoint``,
            ``rk4``, ...) or adaptive (``dopri5``, ``bosh3``, ...). Default ``rk4``.
        solver_options: torchdiffeq's ``options`` for the solver, passed through (e.g.
            ``{"step_size": 0.5}``, ``{"max_num_steps": 100}``). Unset keys default to
            ``step_size = t_end / steps`` for fixed-grid solvers (unless a
            ``grid_constructor`` is given) and ``max_num_steps = 10000`` for adaptive ones.
        steps: fixed-grid steps over [0, t_end] when ``solver_options`` sets no step size
            (spec: 10).
        rtol, atol: torchdiffeq's tolerances, passed to every solver (spec: 1e-3, 1e-4; the
            explicit fixed-grid solvers ignore them).
        adjoint: back-propagate with ``odeint_adjoint`` (True, the paper; O(1) memory in the
            steps) or through the solver's operations (False: exact gradients of the discrete
            solve, about a third fewer FLOPs, memory growing with C·K and the evaluations).
            None (default) chooses direct back-propagation, recomputing as many evaluations
            as ``memory_budget_gb`` needs (see there), and the adjoint only when not even one
            evaluation's activations fit or the solver's number of evaluations is not known in
            advance (adaptive solvers); the choice is recorded in ``best_params_``
            (``adjoint``, ``activation_gib``).
        memory_budget_gb: the resident memory (GiB) direct back-propagation may take,
            estimated as twice the bytes autograd keeps for the solve and the loss (the C
            allocator keeps the pages of a step's freed activations while the next step
            allocates beside them; docs/methods/node_adapter.md, Efficiency). When the
            estimate is above it, the first evaluations of each solve keep only their inputs
            and run again in the backward pass (activation checkpointing: the same gradients
            for one more forward evaluation each), as many as it takes to fit; the adjoint
            is chosen (with ``adjoint=None``) only when not even that fits. Recorded in
            ``best_params_`` (``recomputed_evaluations``).
        recompute: the share of each solve's evaluations that recompute their activations in
            the backward pass on the direct path (0 to 1; None, the default: the smallest
            share that fits ``memory_budget_gb``).
        adjoint_options: torchdiffeq's ``adjoint_options`` (None: the solver's options).
        loss_prototypes: the prototypes the training loss scores a support row against:
            ``"full"`` (spec A8: the prototypes built from all support rows, the row's own
            included) or ``"loo"`` (inferred option: the row's own class uses the prototype
            built without that image, so the loss cannot be lowered by copying the row into
            its prototype; at K = 1 that class falls back to its text prototype).
        residual: weight of zero-shot logits added to the prototype logits (spec A10, 0 = none).
        epochs, batch_size, lr, weight_decay, eps: AdamW with a cosine schedule (spec A12:
            20, 256, 1e-3, 1e-4, 1e-4). One ODE solve per batch.
        select_on_val: keep the epoch (or the untrained start) with the best validation
            accuracy (inferred; the spec's default is the last epoch).
        use_views: train on the augmented views of the support rows when the bundle has them,
            one view per image per epoch, drawn with a per-epoch seed (the visual prototype
            always uses the un-augmented rows, spec §3).
        logit_scale: τ (CLIP's 100).
        seed: seeds the initialisation and the batch order.

    Example:
        >>> method = create_method("node_adapter", solver="euler", steps=8)  # doctest: +SKIP
        >>> method.fit(train, text, val).predict(test_features)  # doctest: +SKIP
    """

    card = MethodCard(
        name="node_adapter",
        summary="NODE-Adapter: text/visual prototype blend refined by a neural ODE (torchdiffeq)",
        paper="Zhang et al., NODE-Adapter: Neural Ordinary Differential Equations for Better "
        "Vision-Language Reasoning, 2024",
        arxiv="2407.08672",
        needs=("train", "text"),
        trainable=True,
        searched={
            "blend_init": "blend_init_grid (initial λ), scored untrained on val",
            "gamma_init": "gamma_init_grid (initial γ), scored untrained on val",
            "gradient_gain": "gradient_gain_grid (η of the loss-gradient term), untrained on val",
        },
        uses_views=True,
        deterministic=True,
        max_tiny_seconds=60.0,
        # u (D) + f_θ: pair 5DH, γ-MLP 2DH + H, LayerNorms 2H + H, attention 4·H·heads·head_dim,
        # score H (the default configuration: vector blend, metanode dynamics, t_end > 0)
        param_formula="D + 7 * D * hidden + 5 * hidden + 4 * hidden * heads * head_dim",
        constraints=CONSTRAINTS,
    )
    # the ODE and its adjoint stay in float32 (spec §7.5)
    train_recipe = {"amp": False}

    def __init__(
        self,
        text_prototype: str = "auto",
        prototype: str = "blend",
        blend: str = "vector",
        blend_init: float = 0.5,
        blend_init_grid: tuple[float, ...] = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.7, 0.9),
        gamma_init: float = 1.0,
        gamma_init_grid: tuple[float, ...] = (1.0, 0.5, 0.2, 0.05),
        search: bool = True,
        dynamics: str = "metanode",
        hidden: int = 256,
        heads: int = 8,
        head_dim: int = 16,
        s0: float = 0.1,
        rho: float = 0.1,
        gradient_gain: float = 0.0,
        gradient_gain_grid: tuple[float, ...] = (0.0, 1.0, 3.0, 10.0, 30.0),
        gradient_classes: int = 32,
        gradient_min_shots: int = 2,
        start_bar: bool = True,
        start_margin: int = 1,
        start_sigmas: float = 1.0,
        t_end: float = 10.0,
        solver: str = "rk4",
        solver_options: dict[str, Any] | None = None,
        steps: int = 10,
        rtol: float = 1e-3,
        atol: float = 1e-4,
        adjoint: bool | None = None,
        memory_budget_gb: float = 4.0,
        recompute: float | None = None,
        adjoint_options: dict[str, Any] | None = None,
        loss_prototypes: str = "full",
        residual: float = 0.0,
        epochs: int = 20,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        eps: float = 1e-4,
        select_on_val: bool = True,
        use_views: bool = True,
        logit_scale: float = 100.0,
        seed: int = 1,
    ) -> None:
        self._init_params(locals())

    # ------------------------------------------------------------------ building
    def _build_modules(self) -> None:
        """Recreate ``model_`` (shapes from ``dim_`` and the hyperparameters) before loading."""
        self.model_ = self._new_model(int(self.dim_), self._init_values())

    def _new_model(self, dim: int, init: dict[str, float]) -> NodeAdapterModel:
        blend = None
        if self.prototype == "blend":
            lam = init["blend_init"]
            blend = CrossModalBlend(dim, self.blend, math.log(lam / (1.0 - lam)))
        flow: nn.Module | None = None
        if self.t_end > 0:
            if self.dynamics == "metanode":
                flow = GradientFlow(
                    dim,
                    self.hidden,
                    self.heads,
                    self.head_dim,
                    self.s0,
                    self.rho,
                    self.t_end,
                    gamma_init=init["gamma_init"],
                )
            else:
                flow = MLPFlow(dim, self.hidden, self.s0, self.rho, self.t_end)
            flow.reset_parameters(self._generator("cpu", offset=1))
        return NodeAdapterModel(blend, flow)

    # ------------------------------------------------------------------ the maths
    def _initial(
        self, visual: Tensor, text: Tensor, has_support: Tensor, model: NodeAdapterModel
    ) -> Tensor:
        """P(0) for M prototype instances (spec §2.4; the ablations pick one side)."""
        if self.prototype == "text":
            return text
        if self.prototype == "visual":
            return torch.where(has_support[:, None], visual, text)
        return model.blend(visual, text, has_support)

    def _refine(
        self,
        model: NodeAdapterModel,
        support: Tensor,
        mask: Tensor,
        text: Tensor,
        visual: Tensor | None = None,
    ) -> Tensor:
        """P(t_end) for M prototype instances, each with its own support rows (M, K, D) + mask
        (``visual``: their visual prototypes when already known)."""
        if visual is None:
            visual = masked_mean_direction(support, mask)
        has = mask.any(dim=1)
        p0 = self._initial(visual, text, has, model)
        if model.flow is None:
            return p0
        model.flow.set_context(support, mask, visual=visual, text=text)
        return self._solve(model.flow, p0)

    def _prototype_logits(
        self, features: Tensor, prototypes: Tensor, text: Tensor | None
    ) -> Tensor:
        logits = self.logit_scale * features @ F.normalize(prototypes, dim=-1).T
        if self.residual and text is not None:
            logits = logits + self.residual * self.logit_scale * features @ text.T
        return logits

    # ------------------------------------------------------------------ fit / logits
    def _fit(self, train: TrainSet, text: TextFeatures, val: ValidationSet | None) -> None:
        num_classes, dim = text.num_classes, text.dim
        device = train.device
        t_bar = text_prototypes(text, self.text_prototype).to(device)
        support, mask, slot = group_by_class(train.features, train.labels, num_classes)
        # constants of the fit: computed here once, not per solve
        visual = masked_mean_direction(support, mask)
        ctx = {"support": support, "mask": mask, "slot": slot, "text": t_bar, "visual": visual}
        self._check_gradient_gain()
        self._candidates: dict[float, Tensor] = {}

        start_kept = self._search_starts(ctx, val)

        init = self._init_values()
        model = self._new_model(dim, init).to(device)
        if model.flow is not None and init["gradient_gain"] > 0:
            model.flow.support_term = self._support_term(ctx, init["blend_init"])
            model.flow.gain = init["gradient_gain"]
        self.model_ = model
        self._context = ctx
        # the no-ODE start kept by the search is the fit: the flow did not earn its place
        train_flow = self.epochs > 0 and not start_kept
        if self.t_end > 0 and train_flow:
            rows = min(len(train), self.batch_size)
            extra = rows if self.loss_prototypes == "loo" else 0
            self._choose_backprop(num_classes, support.shape[1], dim, extra, rows)
        history = self._train(model, train, ctx, val) if train_flow else None
        if start_kept:
            self.best_params_["epochs_run"] = 0
        if history is not None:
            self.best_params_["epochs_run"] = len(history.loss)
            if history.best_epoch is not None:
                # -1: the untrained start scored best on validation data
                self.best_params_["epoch"] = history.best_epoch
        with torch.no_grad():
            prototypes = self._refine(model, support, mask, t_bar, visual)
        self.prototypes_ = normalize_rows(prototypes).detach()
        self.text_weights_ = t_bar.clone() if self.residual else None
        if self.prototype == "blend" and model.blend is not None:
            with torch.no_grad():
                lam = model.blend.weight(visual)
            self.best_params_["mean_lambda"] = float(lam.mean())

    def _support_term(self, ctx: dict[str, Tensor], lam: float) -> SupportLossGradient:
        """g for this fit: candidates from the start prototypes at λ (kept per λ)."""
        if lam not in self._candidates:
            text, visual = ctx["text"], ctx["visual"]
            has = ctx["mask"].any(dim=1)[:, None]
            start = {"text": text, "visual": torch.where(has, visual, text)}.get(
                self.prototype, torch.where(has, lam * visual + (1.0 - lam) * text, text)
            )
            self._candidates[lam] = nearest_classes(start, int(self.gradient_classes))
        return SupportLossGradient(
            ctx["support"], ctx["mask"], self._candidates[lam], self.logit_scale
        )

    def _untrained_endpoint(self, ctx: dict[str, Tensor], init: dict[str, float]) -> Tensor:
        """P(t_end) of the untrained model for the start ``init`` (:func:`untrained_endpoint`)."""
        lam = {"text": None, "visual": 1.0}.get(self.prototype, init["blend_init"])
        gain = init.get("gradient_gain", 0.0) if self._gradient_term_allowed() else 0.0
        term = self._support_term(ctx, init["blend_init"]) if gain > 0 else None
        return untrained_endpoint(
            ctx["support"],
            ctx["mask"],
            ctx["text"],
            lam=lam,
            gamma=init["gamma_init"],
            schedule=(self.s0, self.rho, float(self.t_end)) if self.t_end > 0 else None,
            solve=lambda flow, y0: self._solve(flow, y0, adjoint=False),
            pull=self.dynamics == "metanode",  # an MLP output starts at zero
            support_term=term,
            gain=gain,
        )

    def _train(
        self,
        model: NodeAdapterModel,
        train: TrainSet,
        ctx: dict[str, Tensor],
        val: ValidationSet | None,
    ) -> TrainHistory | None:
        params = [p for p in model.parameters() if p.requires_grad]
        if self.epochs == 0 or not params:
            return None
        # An epoch is one pass over the support images, each seen as one of its stored views
        # (drawn per epoch): the Tip-Adapter-F convention the spec's schedule (20 epochs,
        # batch 256) comes from, and the one the other trained methods here follow.
        sampler = ViewSampler(train.features, train.views if self.use_views else None, self.seed)
        labels, slots = train.labels, ctx["slot"]
        support, mask, t_bar, visual = ctx["support"], ctx["mask"], ctx["text"], ctx["visual"]
        k = support.shape[1]

        def batch_loss(index: Tensor, epoch: int) -> Tensor:
            rows = sampler(epoch)
            with torch.autocast(device_type=rows.device.type, enabled=False):
                y = labels[index]
                if self.loss_prototypes != "loo":
                    protos = self._refine(model, support, mask, t_bar, visual)
                    logits = self._prototype_logits(rows[index], protos, t_bar)
                    return F.cross_entropy(logits, y)
                # one extra prototype instance per distinct left-out support image in the batch
                key, inverse = torch.unique(y * k + slots[index], return_inverse=True)
                cls, held = key // k, key % k
                loo_mask = mask[cls].clone()
                loo_mask[torch.arange(len(key), device=key.device), held] = False
                protos = self._refine(
                    model,
                    torch.cat([support, support[cls]]),
                    torch.cat([mask, loo_mask]),
                    torch.cat([t_bar, t_bar[cls]]),
                )
                full, own = protos[: len(t_bar)], protos[len(t_bar) :]
                feats = rows[index]
                logits = self._prototype_logits(feats, full, t_bar)
                own_logit = self.logit_scale * (feats * F.normalize(own, dim=-1)[inverse]).sum(-1)
                if self.residual:
                    own_logit = own_logit + self.residual * self.logit_scale * (
                        feats * t_bar[y]
                    ).sum(-1)
                logits = logits.scatter(1, y[:, None], own_logit[:, None])
                return F.cross_entropy(logits, y)

        val_score = None
        if self.select_on_val and val is not None and len(val) > 0:

            def val_score() -> float:
                with torch.no_grad():
                    protos = self._refine(model, support, mask, t_bar, visual)
                    return accuracy(self._prototype_logits(val.features, protos, t_bar), val.labels)

        # an epoch must beat the untrained start by more than start_margin validation rows
        margin = 0.0
        if val_score is not None and self.start_bar:
            margin = 100.0 * (self.start_margin + 0.5) / len(val)
        config = self._train_config(
            select_on_val=val_score is not None, keep_start=True, start_margin=margin
        )
        # torchdiffeq's checks during the adjoint's backward solve surface here
        with solver_errors(self.card.name, self.solver, self.rtol, self.atol):
            return train_loop(
                params,
                batch_loss,
                len(train),
                config,
                val_score=val_score,
                device=train.device,
                what=f"{self.card.name} training",
            )

    def _logits(self, features: Tensor) -> Tensor:
        return self._prototype_logits(features, self.prototypes_, self.text_weights_)

    def _grad_logits(self, features: Tensor) -> Tensor:
        """Logits with the autograd graph through the ODE (for gradient checks)."""
        ctx = getattr(self, "_context", None)
        if ctx is None:
            raise NotFittedError(
                f"{self.card.name}: the support set is not kept after load(); refit"
            )
        protos = self._refine(self.model_, ctx["support"], ctx["mask"], ctx["text"])
        return self._prototype_logits(features, protos, ctx["text"] if self.residual else None)
