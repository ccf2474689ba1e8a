"""Straightforward per-batch implementations of Tip-Adapter-F, NODE-Adapter and HeGraphAdapter.

These are the baselines of the benchmark's *reference ratio*: each class is written from the
method's spec the way the papers' code is written, so that our speed-up over "the obvious
implementation" and the accuracy difference can be measured in one process on the same data.

What each one rebuilds inside every training step:

- :class:`ReferenceTipAdapterF` (baselines spec §4.4, as the official Tip-Adapter code): the
  zero-shot logits of the batch, the affinities to the trainable keys, and the cache logits as
  a dense product ``exp(-β0 (1 - A)) @ L_train`` with the one-hot (NK, C) value matrix.
- :class:`ReferenceNodeAdapter` (node_adapter spec): the textual prototypes, the support set
  grouped per class and the visual prototypes (a Python loop over classes), the cross-modal
  blend, and a full torchdiffeq solve of the prototype ODE (adjoint back-propagation) whose
  dynamics builds MetaNODE's (C, K, 5D) pair descriptor explicitly in every evaluation.
- :class:`ReferenceHeGraphAdapter` (hegraph_adapter spec): the node features (description
  means, visual class means with a Python loop over classes), the six cosine relations, their
  normalisation and aggregation, the hierarchical propagation, and the biased cache keys,
  materialised and re-normalised, with a dense one-hot cache product.

None of them uses the computation of ``clipadapt.methods``. They do reuse, so that both sides
run the same configuration and consume the same random numbers:

- the options' defaults, read from the registered method (``get_params``);
- ``clipadapt.engine.train``: ``TrainConfig`` and ``_lr_at`` (the learning-rate schedule),
  ``sample_view_rows`` (the per-epoch view draw of Tip-Adapter-F, NODE-Adapter and
  HeGraphAdapter) and
  ``_STEP_LIMIT`` (the step cap of :func:`~clipadapt.engine.train.limit_steps`);
- the test-time searches, which are not the training being compared and would dominate the
  reference's time if written naively at ImageNet size: ``engine.search.search_blend`` with
  ``tip_grid`` / ``cache_logits`` (Tip-Adapter-F's α/β grid search) and
  ``engine.search.search_logit_blend``
  (HeGraphAdapter's fusion-weight search) and ``engine.search.coordinate_search`` (the order in
  which HeGraphAdapter's meta-path search visits its points; every point is scored here by
  running the whole graph again). NODE-Adapter's search of the initial blend is
  written out here (the untrained flow is a linear ODE; its end point is solved in closed
  form on a 2-dimensional copy, the same function as a full untrained solve on a fixed grid).

The random streams follow our implementations: a CPU ``torch.Generator`` seeded with ``seed``
shuffles each epoch (``torch.randperm``), parameters are drawn from private generators seeded
with ``seed * 1_000_003 + offset`` in the same order, and the learning rate follows
``_lr_at`` over the full run even when a step cap stops training early.

Example:
    >>> ref = REFERENCES["tip_adapter_f"](epochs=2).fit(train, text, val)  # doctest: +SKIP
    >>> ref.logits(test.features).argmax(1)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet, normalize_rows
from clipadapt.engine import train as engine_train
from clipadapt.engine.search import coordinate_search, search_blend, search_logit_blend
from clipadapt.engine.train import TrainConfig, _lr_at, sample_view_rows
from clipadapt.methods.base import create_method
from clipadapt.methods.tip_adapter import cache_logits, tip_grid

__all__ = [
    "REFERENCES",
    "ReferenceHeGraphAdapter",
    "ReferenceNodeAdapter",
    "ReferenceTipAdapterF",
]


# ---------------------------------------------------------------------------------- shared


def _options(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The registered method's defaults overridden by ``params`` (unknown keys are refused)."""
    defaults = create_method(name).get_params()
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(
            f"reference {name}: unknown option(s) {unknown}; valid: {', '.join(sorted(defaults))}"
        )
    # None means "not set", as in create_method
    return {**defaults, **{k: v for k, v in params.items() if v is not None}}


def _unsupported(name: str, option: str, value: Any, supported: tuple[Any, ...]) -> None:
    if value not in supported:
        raise ValueError(
            f"reference {name}: {option}={value!r} is not implemented here (supported: "
            f"{', '.join(map(repr, supported))}); benchmark the default configuration"
        )


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean() * 100)


def _adamw(params: list[nn.Parameter], lr: float, eps: float, weight_decay: float):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=weight_decay)


def _run_training(
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[[Tensor, int], Tensor],
    num_rows: int,
    config: TrainConfig,
    val_score: Callable[[], float] | None,
    amp: bool,
) -> tuple[int, int | None, list[float]]:
    """A plain epoch/batch loop: (optimiser steps done, best epoch or None, val scores).

    Shuffling, schedule, step cap and epoch selection follow ``clipadapt.engine.train``'s
    conventions (one seeded CPU generator, ``randperm`` per epoch, the schedule of the full
    run, the best epoch restored on strictly better validation scores).
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(config.seed))
    iters_per_epoch = math.ceil(num_rows / config.batch_size)
    total = config.epochs * iters_per_epoch
    warmup = config.warmup_iters
    limit = engine_train._STEP_LIMIT  # read at call time: limit_steps() sets it
    device = params[0].device
    use_amp = amp and device.type == "cuda"
    step = 0
    best_score, best_epoch, best_state = -math.inf, None, None
    scores: list[float] = []
    for epoch in range(config.epochs):
        order = torch.randperm(num_rows, generator=generator).to(device)
        for start in range(0, num_rows, config.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, config, warmup)
            index = order[start : start + config.batch_size]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss = batch_loss(index, epoch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if limit is not None and step >= limit:
                break
        if val_score is not None:
            score = val_score()
            scores.append(score)
            if score > best_score:
                best_score, best_epoch = score, epoch
                best_state = [p.detach().clone() for p in params]
        if limit is not None and step >= limit:
            break
    if best_state is not None:
        with torch.no_grad():
            for p, saved in zip(params, best_state, strict=True):
                p.copy_(saved)
    return step, best_epoch, scores


# ---------------------------------------------------------------------------------- Tip-Adapter-F


class ReferenceTipAdapterF:
    """Tip-Adapter-F as the official code writes it (baselines spec §4.4).

    The trainable keys are the weight of a bias-free linear map; per batch the zero-shot
    logits, affinities and ``exp(-β0 (1 - A)) @ L_train`` (dense one-hot values) are computed
    from scratch. Epoch selection on validation accuracy with (α0, β0), then the α/β search.

    Args:
        params: the options of ``create_method("tip_adapter_f", ...)`` (same defaults).
    """

    name = "tip_adapter_f"

    def __init__(self, **params: Any) -> None:
        self.params = _options(self.name, params)

    def fit(
        self, train: TrainSet, text: TextFeatures, val: ValidationSet | None = None
    ) -> ReferenceTipAdapterF:
        """Train the cache keys on ``train`` and search α/β on ``val``; returns self."""
        p = self.params
        device = train.features.device
        self.text_weights_ = text.class_features.to(device)
        num_classes = self.text_weights_.shape[0]
        views = train.views if p["use_views"] else None
        if views is not None:
            init_keys = normalize_rows(views.mean(dim=0))
        else:
            init_keys = train.features
        # the adapter: a bias-free linear layer whose weight is the cache keys
        self.keys_ = nn.Parameter(init_keys.clone())
        # the cache values: a dense one-hot (NK, C) matrix, as in the official code
        self.values_ = F.one_hot(train.labels, num_classes).float()
        alpha0, beta0, scale = float(p["alpha"]), float(p["beta"]), float(p["logit_scale"])
        labels = train.labels

        def forward(features: Tensor, alpha: float, beta: float) -> Tensor:
            clip_logits = scale * features @ self.text_weights_.T
            affinity = features @ self.keys_.T
            cache_logits = torch.exp(-beta * (1.0 - affinity)) @ self.values_
            return clip_logits + alpha * cache_logits

        epoch_rows: dict[int, Tensor] = {}

        def batch_loss(index: Tensor, epoch: int) -> Tensor:
            if epoch not in epoch_rows:  # the data loader's augmentation draw of this epoch
                epoch_rows.clear()
                epoch_rows[epoch] = sample_view_rows(train.features, views, epoch, p["seed"])
            features = epoch_rows[epoch][index]
            return F.cross_entropy(forward(features, alpha0, beta0).float(), labels[index])

        use_val = val is not None and len(val) > 0 and bool(p["select_on_val"])
        val_score = None
        if use_val:

            def val_score() -> float:
                with torch.no_grad():
                    return _accuracy(forward(val.features, alpha0, beta0), val.labels)

        config = TrainConfig(
            epochs=int(p["epochs"]),
            batch_size=int(p["batch_size"]),
            lr=float(p["lr"]),
            seed=p["seed"],
        )
        optimizer = _adamw([self.keys_], float(p["lr"]), float(p["eps"]), float(p["weight_decay"]))
        self.steps_, best_epoch, _ = _run_training(
            [self.keys_], optimizer, batch_loss, len(train), config, val_score, amp=True
        )
        with torch.no_grad():
            if p["search"] and val is not None and len(val) > 0:
                affinity = val.features @ self.keys_.T
                num_classes = self.text_weights_.shape[0]
                chosen, acc = search_blend(
                    scale * val.features @ self.text_weights_.T,
                    lambda beta: cache_logits(affinity, train.labels, num_classes, beta),
                    {
                        "beta": tip_grid(p["search_scale_beta"], p["search_steps_beta"]),
                        "alpha": tip_grid(p["search_scale_alpha"], p["search_steps_alpha"]),
                    },
                    val,
                )
                self.best_params_ = {**chosen, "val_accuracy": acc}
            else:
                self.best_params_ = {"alpha": alpha0, "beta": beta0}
        self.best_params_["epoch"] = best_epoch + 1 if best_epoch is not None else int(p["epochs"])
        self._forward = forward
        return self

    def logits(self, features: Tensor, batch_size: int = 8192) -> Tensor:
        """(N, C) logits with the searched α/β (rows normalised first, chunks bound memory)."""
        x = normalize_rows(features)
        alpha, beta = float(self.best_params_["alpha"]), float(self.best_params_["beta"])
        with torch.no_grad():
            return torch.cat(
                [
                    self._forward(x[i : i + batch_size], alpha, beta)
                    for i in range(0, len(x), batch_size)
                ]
            )


# ---------------------------------------------------------------------------------- NODE-Adapter


class _MetaNodeFlow(nn.Module):
    """MetaNODE's gradient estimator (node_adapter spec §2.6), written as its model file does.

    ``f(P, t)_j = s(t) Σ_k w_jk (γ_jk x_jk - p_j)``; every evaluation builds the (C, K, 5D) pair
    descriptor ``[p⊙x; p⊙p; x⊙x; p; x]``, runs Linear-ELU-LayerNorm, multi-head self-attention
    over the shots (explicit softmax), a score layer and a masked softmax over shots, and the
    scale generator ``γ = 2σ(MLP([x; p]))``. The support set is an attribute set before each
    solve.
    """

    def __init__(self, dim: int, p: dict[str, Any], gamma_init: float) -> None:
        super().__init__()
        hidden, heads, head_dim = int(p["hidden"]), int(p["heads"]), int(p["head_dim"])
        self.heads, self.head_dim = heads, head_dim
        self.s0, self.rho, self.t_end = float(p["s0"]), float(p["rho"]), float(p["t_end"])
        self.gamma_prior = math.log(gamma_init / (2.0 - gamma_init))
        self.pair = nn.Linear(5 * dim, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        self.attn_out = nn.Linear(heads * head_dim, hidden, bias=False)
        self.norm2 = nn.LayerNorm(hidden, bias=False)
        self.score = nn.Linear(hidden, 1, bias=False)
        self.gamma_in = nn.Linear(2 * dim, hidden, bias=False)
        self.gamma_out = nn.Linear(hidden, 1, bias=False)
        self.support = torch.zeros(0)
        self.mask = torch.zeros(0, dtype=torch.bool)

    def init_weights(self, generator: torch.Generator) -> None:
        # U(±1/sqrt(fan_in)) in registration order; score and γ output start at zero
        with torch.no_grad():
            for layer in (self.pair, self.qkv, self.attn_out, self.gamma_in):
                bound = 1.0 / math.sqrt(layer.weight.shape[1])
                layer.weight.copy_(
                    torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound
                )
            self.score.weight.zero_()
            self.gamma_out.weight.zero_()

    def forward(self, t: Tensor, p: Tensor) -> Tensor:
        x, mask = self.support, self.mask
        m, k, d = x.shape
        has = mask.any(dim=1)
        pe = p[:, None, :].expand(m, k, d)
        if k == 1:
            w = has.to(x.dtype)[:, None]
        else:
            pairs = torch.cat([pe * x, pe * pe, x * x, pe, x], dim=-1)  # (C, K, 5D)
            e = self.norm1(F.elu(self.pair(pairs)))
            q, key, v = self.qkv(e).chunk(3, dim=-1)
            q, key, v = (
                z.reshape(m, k, self.heads, self.head_dim).transpose(1, 2) for z in (q, key, v)
            )
            key_mask = mask | ~has[:, None]
            att = q @ key.transpose(-1, -2) / math.sqrt(self.head_dim)
            att = att.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(dim=-1)
            out = (att @ v).transpose(1, 2).reshape(m, k, self.heads * self.head_dim)
            e = self.norm2(e + self.attn_out(out))
            scores = self.score(e).squeeze(-1).masked_fill(~key_mask, float("-inf"))
            w = scores.softmax(dim=-1) * has.to(x.dtype)[:, None]
        gamma_logit = self.gamma_out(F.elu(self.gamma_in(torch.cat([x, pe], dim=-1))))
        gamma = 2.0 * torch.sigmoid(gamma_logit.squeeze(-1) + self.gamma_prior)
        drive = ((w * gamma)[..., None] * x).sum(dim=1) - w.sum(dim=1, keepdim=True) * p
        return self.s0 * self.rho ** (t / self.t_end) * drive


class ReferenceNodeAdapter:
    """NODE-Adapter written per batch (node_adapter spec §2): prototypes and ODE every step.

    Implements the default configuration: vector blend ``λ_j = σ(v̄_jᵀu + b)``, MetaNODE
    dynamics, ``loss_prototypes="full"``, any torchdiffeq solver, optional adjoint and
    zero-shot residual, epoch selection on validation (the untrained start included). The
    start bar (``start_bar``, clipadapt's rule, not the spec's) is not written out: compare
    with ``start_bar=False`` when validation data is given.

    Args:
        params: the options of ``create_method("node_adapter", ...)`` (same defaults).
    """

    name = "node_adapter"

    def __init__(self, **params: Any) -> None:
        self.params = _options(self.name, params)
        p = self.params
        _unsupported(self.name, "blend", p["blend"], ("vector",))
        _unsupported(self.name, "dynamics", p["dynamics"], ("metanode",))
        _unsupported(self.name, "loss_prototypes", p["loss_prototypes"], ("full",))
        _unsupported(self.name, "prototype", p["prototype"], ("blend", "text", "visual"))
        # the spec's dynamics only: clipadapt's loss-gradient term is not written out here
        _unsupported(self.name, "gradient_gain", p["gradient_gain"], (0, 0.0))
        if not float(p["t_end"]) > 0:
            raise ValueError(f"reference {self.name}: t_end must be > 0 (the ODE is the point)")

    # ---------------------------------------------------------------- prototypes
    def _text_prototypes(self, text: TextFeatures) -> Tensor:
        source = self.params["text_prototype"]
        if source == "auto":
            source = "prompts" if text.prompt_features is not None else "class"
        if source == "class":
            return text.class_features
        feats = []
        if source in ("prompts", "all"):
            feats += list(normalize_rows(text.prompt_features).unbind(dim=1))
        protos = []
        for j in range(text.num_classes):
            members = [f[j] for f in feats]
            if source in ("descriptions", "all"):
                desc = normalize_rows(text.description_features[j])
                members += list(desc[text.description_mask[j]])
            protos.append(F.normalize(torch.stack(members).mean(dim=0), dim=0))
        return torch.stack(protos)

    @staticmethod
    def _support(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """The support rows grouped per class (C, K, D) with their mask, one class at a time."""
        per_class = [features[labels == j] for j in range(num_classes)]
        k = max(max(len(x) for x in per_class), 1)
        support = features.new_zeros(num_classes, k, features.shape[1])
        mask = torch.zeros(num_classes, k, dtype=torch.bool, device=features.device)
        for j, x in enumerate(per_class):
            support[j, : len(x)] = x
            mask[j, : len(x)] = True
        return support, mask

    @staticmethod
    def _shot_means(support: Tensor, mask: Tensor) -> Tensor:
        """(C, D) plain mean of each class's shots (zeros without shots), one class at a time."""
        means = []
        for j in range(support.shape[0]):
            rows = support[j][mask[j]]
            means.append(rows.mean(dim=0) if len(rows) else torch.zeros_like(support[j, 0]))
        return torch.stack(means)

    def _visual_prototypes(self, support: Tensor, mask: Tensor) -> Tensor:
        return F.normalize(self._shot_means(support, mask), dim=-1)

    def _initial(self, visual: Tensor, text: Tensor, has: Tensor, lam: Tensor) -> Tensor:
        prototype = self.params["prototype"]
        if prototype == "text":
            return text
        if prototype == "visual":
            return torch.where(has[:, None], visual, text)
        lam = lam * has[:, None].to(lam.dtype)
        return lam * visual + (1.0 - lam) * text

    def _solve(self, flow: Callable[[Tensor, Tensor], Tensor], p0: Tensor, adjoint: bool) -> Tensor:
        from torchdiffeq import odeint, odeint_adjoint

        p = self.params
        t = torch.tensor([0.0, float(p["t_end"])], dtype=p0.dtype, device=p0.device)
        given = dict(p["solver_options"] or {})
        if p["solver"] in ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"):
            kwargs: dict[str, Any] = {
                "rtol": p["rtol"],
                "atol": p["atol"],
                "options": {"max_num_steps": 10_000, **given},
            }
        else:
            kwargs = {"options": {"step_size": float(p["t_end"]) / int(p["steps"]), **given}}
        if adjoint and p["adjoint"] and torch.is_grad_enabled():
            path = odeint_adjoint(
                flow,
                p0,
                t,
                method=p["solver"],
                adjoint_params=tuple(flow.parameters()),
                adjoint_method=p["solver"],
                adjoint_rtol=p["rtol"],
                adjoint_atol=p["atol"],
                adjoint_options=dict(kwargs["options"]),
                **kwargs,
            )
        else:
            path = odeint(flow, p0, t, method=p["solver"], **kwargs)
        return path[-1]

    def _prototypes(self, train: TrainSet, text: TextFeatures) -> tuple[Tensor, Tensor]:
        """(P(t_end), t̄): every prototype rebuilt from the raw inputs, then the ODE solved."""
        t_bar = self._text_prototypes(text)
        support, mask = self._support(train.features, train.labels, text.num_classes)
        visual = self._visual_prototypes(support, mask)
        lam = torch.sigmoid(visual @ self.u_ + self.blend_prior_)[:, None]
        p0 = self._initial(visual, t_bar, mask.any(dim=1), lam)
        self.flow_.support, self.flow_.mask = support, mask
        return self._solve(self.flow_, p0, adjoint=True), t_bar

    def _class_logits(self, features: Tensor, prototypes: Tensor, t_bar: Tensor) -> Tensor:
        scale = float(self.params["logit_scale"])
        logits = scale * features @ F.normalize(prototypes, dim=-1).T
        if self.params["residual"]:
            logits = logits + float(self.params["residual"]) * scale * features @ t_bar.T
        return logits

    # ---------------------------------------------------------------- search
    def _search_start(
        self, train: TrainSet, text: TextFeatures, val: ValidationSet
    ) -> tuple[dict[str, float], float]:
        """Initial (λ, γ) scored on val with the untrained model, first best in grid order.

        Untrained, u = 0 and the score/γ output layers are zero, so the flow is the linear ODE
        ``dp/dt = s(t) (γ x̄ - p)``: ``p(t_end) = a p(0) + b γ x̄`` with (a, b) from solving the
        same scalar system with the configured solver.
        """
        p = self.params
        if any(float(g) > 0 for g in p["gradient_gain_grid"]):
            raise ValueError(
                f"reference {self.name}: gradient_gain_grid={list(p['gradient_gain_grid'])} "
                "searches the loss-gradient term, which is not implemented here; pass "
                "gradient_gain_grid=[0.0] (the spec's dynamics)"
            )
        t_bar = self._text_prototypes(text)
        support, mask = self._support(train.features, train.labels, text.num_classes)
        visual = self._visual_prototypes(support, mask)
        has = mask.any(dim=1)
        mean = self._shot_means(support, mask)
        s0, rho, t_end = float(p["s0"]), float(p["rho"]), float(p["t_end"])
        target = torch.tensor([0.0, 1.0], dtype=visual.dtype, device=visual.device)

        def scalar_flow(t: Tensor, y: Tensor) -> Tensor:
            return s0 * rho ** (t / t_end) * (target - y)

        with torch.no_grad():
            a, b = self._solve(scalar_flow, torch.tensor([1.0, 0.0]).to(visual), adjoint=False)
        names = ["blend_init"] if p["prototype"] == "blend" else []
        names.append("gamma_init")
        grids = {"blend_init": p["blend_init_grid"], "gamma_init": p["gamma_init_grid"]}
        # (accuracy, -cross-entropy): accuracy ties go to the lower validation loss
        best: tuple[dict[str, float], tuple[float, float]] = ({}, (-1.0, -math.inf))
        for values in itertools.product(*(grids[n] for n in names)):
            init = {"blend_init": float(p["blend_init"]), "gamma_init": float(p["gamma_init"])}
            init.update(dict(zip(names, map(float, values), strict=True)))
            lam = torch.full_like(visual[:, :1], init["blend_init"])
            if p["prototype"] == "visual":
                lam = torch.ones_like(lam)
            p0 = (
                t_bar
                if p["prototype"] == "text"
                else torch.where(has[:, None], lam * visual + (1 - lam) * t_bar, t_bar)
            )
            end = torch.where(has[:, None], a * p0 + b * init["gamma_init"] * mean, p0)
            logits = self._class_logits(val.features, end, t_bar)
            score = (_accuracy(logits, val.labels), -float(F.cross_entropy(logits, val.labels)))
            if score > best[1]:
                best = ({n: init[n] for n in names}, score)
        return best[0], best[1][0]

    # ---------------------------------------------------------------- fit / logits
    def fit(
        self, train: TrainSet, text: TextFeatures, val: ValidationSet | None = None
    ) -> ReferenceNodeAdapter:
        """Search the start on ``val``, then train u and f_θ with one ODE solve per batch."""
        p = self.params
        device = train.features.device
        seed = int(p["seed"])
        init = {"blend_init": float(p["blend_init"]), "gamma_init": float(p["gamma_init"])}
        if p["search"] and val is not None and len(val) > 0:
            found, score = self._search_start(train, text, val)
            init.update(found)
            self.best_params_: dict[str, Any] = {**found, "val_accuracy": score}
        else:
            self.best_params_ = dict(init)
        dim = train.features.shape[1]
        # nn.Linear's constructor draws from the global RNG; keep the caller's stream intact
        with torch.random.fork_rng(devices=[]):
            self.flow_ = _MetaNodeFlow(dim, p, init["gamma_init"])
        self.flow_.init_weights(torch.Generator().manual_seed(seed * 1_000_003 + 1))
        self.flow_.to(device)
        self.u_ = nn.Parameter(torch.zeros(dim, device=device))
        lam0 = init["blend_init"]
        self.blend_prior_ = math.log(lam0 / (1.0 - lam0))
        params = (
            [self.u_, *self.flow_.parameters()]
            if p["prototype"] == "blend"
            else [*self.flow_.parameters()]
        )

        views = train.views if p["use_views"] else None
        labels = train.labels

        def batch_loss(index: Tensor, epoch: int) -> Tensor:
            # one stored view per image per epoch, redrawn per batch (no reuse across steps)
            rows = sample_view_rows(train.features, views, epoch, seed)
            prototypes, t_bar = self._prototypes(train, text)
            return F.cross_entropy(
                self._class_logits(rows[index], prototypes, t_bar), labels[index]
            )

        val_score = None
        if p["select_on_val"] and val is not None and len(val) > 0:

            def val_score() -> float:
                with torch.no_grad():
                    logits = self._class_logits(val.features, *self._prototypes(train, text))
                return _accuracy(logits, val.labels)

        self.steps_ = 0
        if int(p["epochs"]) > 0:
            config = TrainConfig(
                epochs=int(p["epochs"]),
                batch_size=int(p["batch_size"]),
                lr=float(p["lr"]),
                seed=seed,
            )
            optimizer = _adamw(params, float(p["lr"]), float(p["eps"]), float(p["weight_decay"]))
            start = [q.detach().clone() for q in params]
            start_score = val_score() if val_score is not None else None
            self.steps_, best_epoch, scores = _run_training(
                params, optimizer, batch_loss, len(train), config, val_score, amp=False
            )
            if start_score is not None and scores and start_score >= max(scores):
                with torch.no_grad():  # the untrained start is best on validation data
                    for q, saved in zip(params, start, strict=True):
                        q.copy_(saved)
                best_epoch = -1
            self.best_params_["epoch"] = best_epoch
        with torch.no_grad():
            prototypes, self.text_weights_ = self._prototypes(train, text)
            self.prototypes_ = F.normalize(prototypes, dim=-1)
        return self

    def logits(self, features: Tensor, batch_size: int = 8192) -> Tensor:
        """(N, C) logits ``τ cos(f, p_j(t_end))`` (+ the residual), rows normalised first."""
        x = normalize_rows(features)
        with torch.no_grad():
            return torch.cat(
                [
                    self._class_logits(x[i : i + batch_size], self.prototypes_, self.text_weights_)
                    for i in range(0, len(x), batch_size)
                ]
            )


# ---------------------------------------------------------------------------------- HeGraphAdapter

_HEGRAPH_EDGES = ("pn", "vn", "pp", "vp", "np", "vv")
# the meta-path weights, in the order the prediction-time search visits them
_HEGRAPH_WEIGHTS = ("beta_pn", "beta_vn", "alpha_pp", "alpha_vp", "alpha_np_test", "gamma")
_HEGRAPH_BLOCKS = {
    "five_blocks_bias": {"pn": "n", "vn": "n", "pp": "pp", "vp": "vp", "np": "np", "vv": "v"},
    "three_W": {"pn": "n", "vn": "n", "pp": "p", "vp": "p", "np": "p", "vv": "v"},
}


class _GCN(nn.Module):
    """``tanh(H W + b)`` with W (D, D) and a per-node bias b (C, D) (GraphAdapter's block)."""

    def __init__(self, dim: int, num_nodes: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        self.bias = nn.Parameter(torch.zeros(num_nodes, dim)) if bias else None

    def forward(self, h: Tensor) -> Tensor:
        out = h @ self.weight
        if self.bias is not None:
            out = out + self.bias
        return torch.tanh(out)


class ReferenceHeGraphAdapter:
    """HeGraphAdapter written per batch (hegraph_adapter spec §2): the whole graph every step.

    Args:
        params: the options of ``create_method("hegraph_adapter", ...)`` (same defaults).
    """

    name = "hegraph_adapter"

    def __init__(self, **params: Any) -> None:
        self.params = _options(self.name, params)
        p = self.params
        _unsupported(self.name, "classifier", p["classifier"], ("both", "text"))
        _unsupported(self.name, "fusion", p["fusion"], ("prob", "logit"))
        _unsupported(self.name, "block_layout", p["block_layout"], tuple(_HEGRAPH_BLOCKS))

    def _edges(self) -> list[str]:
        p = self.params
        keep = set(p["edges"])
        if not p["negative_nodes"]:
            keep -= {"pn", "vn", "np"}
        if not p["visual_nodes"]:
            keep -= {"vn", "vp", "vv"}
        if p["classifier"] == "text":
            keep.discard("vv")
        return [e for e in _HEGRAPH_EDGES if e in keep]

    # ---------------------------------------------------------------- the graph, every step
    def _nodes(self, train: TrainSet, text: TextFeatures) -> dict[str, Tensor | None]:
        p = self.params
        if p["positive_nodes"] == "templates":
            positive = text.class_features
        else:
            mask = text.description_mask.to(text.description_features.dtype)
            positive = normalize_rows((text.description_features * mask[..., None]).sum(dim=1))
        negative = text.negative_features
        if p["negatives"] == "descriptions":
            mask = text.description_mask.to(text.negative_description_features.dtype)
            negated = text.negative_description_features * mask[..., None]
            negative = normalize_rows(negated.sum(dim=1))
        views = train.views if p["use_views"] and train.views is not None else train.features[None]
        mean_view = views.mean(dim=0)
        visual = []
        for c in range(text.num_classes):  # GraphAdapter-style: one class at a time
            rows = mean_view[train.labels == c]
            visual.append(
                F.normalize(rows.mean(dim=0), dim=0) if len(rows) else rows.new_zeros(rows.shape[1])
            )
        return {"p": positive, "n": negative, "v": torch.stack(visual)}

    def _relation(self, edge: str, nodes: dict[str, Tensor | None]) -> Tensor:
        """R[i, j], the weight of the edge from source node j into target node i."""
        source, target = nodes[edge[0]], nodes[edge[1]]
        sim = F.normalize(target, dim=-1) @ F.normalize(source, dim=-1).T
        eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        if edge in ("pp", "vv"):
            return sim.masked_fill(eye, 0.0)
        if edge in ("pn", "vn", "np"):
            own = sim.diagonal()
            own = 1.0 - own if self.params["neg_self_edge"] == "one_minus_cos" else -own
            return torch.where(eye, torch.diag_embed(own), sim)
        return sim

    def _aggregate(self, edge: str, relation: Tensor, target: Tensor, source: Tensor) -> Tensor:
        """``c X_t + Â X_s`` with the symmetric normalisation of the signed relation."""
        magnitude = relation.abs()
        deg_t = magnitude.sum(dim=1)
        deg_s = magnitude.sum(dim=0) if self.params["source_degree"] == "column" else deg_t
        adjacency = relation / torch.sqrt((deg_t + 1.0)[:, None] * (deg_s + 1.0)[None, :])
        out = adjacency @ source
        if edge != "vv":  # the visual aggregation has no self term
            out = out + (1.0 / (deg_t + 1.0))[:, None] * target
        return out

    def _propagate(
        self, train: TrainSet, text: TextFeatures, weights: dict[str, float], alpha_np: float
    ) -> tuple[Tensor, Tensor | None]:
        """Negatives, then positives (from the updated negatives), then the visual bias."""
        p = self.params
        nodes = self._nodes(train, text)
        edges = self._edges()
        mapping = _HEGRAPH_BLOCKS[p["block_layout"]]

        def message(edge: str, target: Tensor, source: Tensor) -> Tensor:
            relation = self._relation(edge, nodes)
            return self.blocks_[mapping[edge]](self._aggregate(edge, relation, target, source))

        negative = nodes["n"]
        updates = [
            w * message(e, nodes["n"], nodes[e[0]])
            for e, w in (("pn", weights["beta_pn"]), ("vn", weights["beta_vn"]))
            if e in edges
        ]
        if updates:
            negative = negative + sum(updates)
        positive = nodes["p"]
        updates = [
            w * message(e, nodes["p"], nodes[e[0]])
            for e, w in (("pp", weights["alpha_pp"]), ("vp", weights["alpha_vp"]))
            if e in edges
        ]
        if "np" in edges:
            updates.append(alpha_np * message("np", nodes["p"], negative))
        if updates:
            positive = positive + sum(updates)
        bias = message("vv", nodes["v"], nodes["v"]) if "vv" in edges else None
        return positive, bias

    def _keys(self, train: TrainSet, bias: Tensor | None, gamma: float) -> Tensor:
        """The cache keys, shifted by their class's visual bias and re-normalised."""
        if self.params["use_views"] and train.views is not None:
            keys = normalize_rows(train.views.mean(dim=0))
        else:
            keys = train.features
        if bias is None:
            return keys
        return normalize_rows(keys + gamma * bias[train.labels])

    def _two_logits(
        self, features: Tensor, positive: Tensor, keys: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        p = self.params
        z_text = float(p["logit_scale"]) * features @ normalize_rows(positive).T
        if p["classifier"] == "text":
            return z_text, None
        affinity = features @ keys.T
        weights = torch.exp(-float(p["cache_beta"]) * (1.0 - affinity))
        z_vis = float(p["cache_scale"]) * (weights @ self.values_)
        return z_text, z_vis

    # ---------------------------------------------------------------- fit / logits
    def fit(
        self, train: TrainSet, text: TextFeatures, val: ValidationSet | None = None
    ) -> ReferenceHeGraphAdapter:
        """Train the GCN projections, then choose the fusion weight on ``val``; returns self."""
        p = self.params
        device = train.features.device
        num_classes, dim = text.num_classes, text.dim
        mapping = _HEGRAPH_BLOCKS[p["block_layout"]]
        names = sorted({mapping[e] for e in self._edges()})
        bias = p["block_layout"] == "five_blocks_bias"
        self.blocks_ = nn.ModuleDict({n: _GCN(dim, num_classes, bias) for n in names}).to(device)
        generator = torch.Generator().manual_seed(int(p["seed"]) * 1_000_003)
        with torch.no_grad():
            for n in names:  # W ~ U(±1/sqrt(D)), b = 0 (GraphAdapter's init), sorted order
                bound = 1.0 / math.sqrt(dim)
                values = (torch.rand(dim, dim, generator=generator) * 2.0 - 1.0) * bound
                self.blocks_[n].weight.copy_(values.to(device))
        self.values_ = F.one_hot(train.labels, num_classes).float()
        epochs, lr = int(p["epochs"]), float(p["lr"])
        views = train.views if p["use_views"] else None
        labels = train.labels
        weights = {k: float(p[k]) for k in _HEGRAPH_WEIGHTS}
        epoch_rows: dict[int, Tensor] = {}

        def batch_loss(index: Tensor, epoch: int) -> Tensor:
            positive, bias_v = self._propagate(train, text, weights, float(p["alpha_np_train"]))
            keys = self._keys(train, bias_v, weights["gamma"])
            if epoch not in epoch_rows:  # the data loader's augmentation draw of this epoch
                epoch_rows.clear()
                if views is not None and p["view_sampling"] == "cycle":
                    epoch_rows[epoch] = views[epoch % views.shape[0]]
                else:
                    epoch_rows[epoch] = sample_view_rows(train.features, views, epoch, p["seed"])
            batch = epoch_rows[epoch][index]
            z_text, z_vis = self._two_logits(batch, positive, keys)
            loss = F.cross_entropy(z_text.float(), labels[index])
            if z_vis is not None:
                loss = loss + float(p["loss_weight"]) * F.cross_entropy(
                    z_vis.float(), labels[index]
                )
            return loss

        iters = math.ceil(len(train) / int(p["batch_size"]))
        config = TrainConfig(
            epochs=epochs,
            batch_size=int(p["batch_size"]),
            lr=lr,
            warmup_iters=min(int(p["warmup_epochs"]), epochs) * iters,
            warmup_lr=float(p["warmup_lr"]),
            seed=int(p["seed"]),
        )
        params = list(self.blocks_.parameters())
        optimizer = _adamw(params, lr, 1e-8, float(p["weight_decay"]))
        self.steps_, _, _ = _run_training(
            params, optimizer, batch_loss, len(train), config, None, amp=True
        )
        # prediction: the meta-path weights and the fusion weight, chosen on ``val`` by running
        # the whole graph again for every candidate point
        fuse = p["classifier"] != "text"
        grid = [float(w) for w in p["fusion_grid"]] if p["search_fusion"] else []
        grid = grid or [float(p["fusion_weight"])]
        names = [n for n in _HEGRAPH_WEIGHTS if self._searched(n)] if p["search_metapaths"] else []

        def predictor(point: dict[str, float]) -> tuple[Tensor, Tensor]:
            chosen = {**weights, **point}
            with torch.no_grad():
                positive, bias_v = self._propagate(train, text, chosen, chosen["alpha_np_test"])
                return normalize_rows(positive), self._keys(train, bias_v, chosen["gamma"])

        def fused_accuracy(point: dict[str, float], rows: ValidationSet) -> tuple[float, float]:
            text_weights, keys = predictor(point)
            with torch.no_grad():
                z_text, z_vis = self._two_logits(rows.features, text_weights, keys)
                if z_vis is None:
                    return _accuracy(z_text, rows.labels), 0.0
                if p["fusion"] == "prob":
                    z_text, z_vis = z_text.softmax(dim=-1), z_vis.softmax(dim=-1)
                _, j, acc = search_logit_blend(z_text, [z_vis], grid, rows)
            return acc, grid[j]

        point: dict[str, float] = {}
        self.fusion_weight_ = float(p["fusion_weight"]) if fuse else 0.0
        self.best_params_: dict[str, Any] = {"epochs": epochs, "lr": lr}
        self.best_params_.update({n: weights[n] for n in names})
        searching = bool(names) or (fuse and p["search_fusion"])
        if searching and val is not None and len(val) > 0:
            if names:
                start = {n: weights[n] for n in names}
                point, _ = coordinate_search(lambda q, rows: fused_accuracy(q, rows)[0], start, val)
            acc, self.fusion_weight_ = fused_accuracy(point, val)
            self.best_params_.update(point, val_accuracy=acc)
        self.text_weights_, self.keys_ = predictor(point)
        if fuse:
            self.best_params_["fusion_weight"] = self.fusion_weight_
        return self

    def _searched(self, name: str) -> bool:
        edges = set(self._edges())
        needs = {"beta_pn": {"pn", "np"}, "beta_vn": {"vn", "np"}, "alpha_pp": {"pp"}}
        needs.update(alpha_vp={"vp"}, alpha_np_test={"np"}, gamma={"vv"})
        return needs[name] <= edges

    def logits(self, features: Tensor, batch_size: int = 8192) -> Tensor:
        """(N, C) fused logits of the text and cache classifiers, rows normalised first."""
        x = normalize_rows(features)
        w = self.fusion_weight_
        chunks = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                z_text, z_vis = self._two_logits(
                    x[i : i + batch_size], self.text_weights_, self.keys_
                )
                if z_vis is None or w == 0.0:
                    chunks.append(z_text)
                elif self.params["fusion"] == "logit":
                    chunks.append(z_text + w * z_vis)
                else:  # log((softmax(z_text) + w softmax(z_vis)) / (1 + w)), without underflow
                    mixture = torch.logaddexp(
                        z_text.log_softmax(dim=-1), z_vis.log_softmax(dim=-1) + math.log(w)
                    )
                    chunks.append(mixture - math.log1p(w))
        return torch.cat(chunks)


REFERENCES: dict[str, type] = {
    "tip_adapter_f": ReferenceTipAdapterF,
    "node_adapter": ReferenceNodeAdapter,
    "hegraph_adapter": ReferenceHeGraphAdapter,
}
"""Registry name -> reference class (constructor takes the registered method's options)."""
