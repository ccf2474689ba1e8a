"""CoOp: learned prompt context vectors trained through the frozen text tower (spec §5.4)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt.data.sets import TextFeatures, TrainSet, ValidationSet, normalize_rows
from clipadapt.engine.train import DASSL_SGD, OptimizerParams, ViewSampler, train_loop
from clipadapt.exceptions import ConfigError
from clipadapt.methods.base import Adapter, MethodCard, register_method
from clipadapt.methods.constraints import (
    Constraint,
    between,
    common,
    count,
    flag,
    optional,
    positive,
    positive_int,
)

PLACEHOLDER = "X"
#: CoOp's batch size and context length: ``cost_scale`` measures the paper schedule with them.
PAPER_BATCH = 32
PAPER_N_CTX = 16

# The shared check fixture (clipadapt.testing.make_fixture) has no text tower, so every check
# that fits fails with MissingTensorError; tests/methods/test_coop.py runs the same properties
# with a tiny open_clip tower instead.
_NEEDS_TOWER = (
    "check_fit_returns_self",
    "check_inputs_not_mutated",
    "check_missing_tensor_message",
    "check_logits_shape_dtype",
    "check_batch_invariance",
    "check_k1",
    "check_fp16_input",
    "check_input_validation",
    "check_learns_easy_problem",
    "check_more_shots_not_worse",
    "check_deterministic_with_seed",
    "check_fit_idempotent",
    "check_no_global_side_effects",
    "check_save_load_roundtrip",
    "check_clone_is_unfitted",
    "check_no_test_in_fit",
    "check_search_is_val_only",
    "check_trainable_param_count",
    "check_backward_reaches_all_params",
    "check_runs_on_cpu",
    "check_views_optional",
    "check_tiny_budget",
)
_TOWER_REASON = (
    "the shared fixture has no text tower (coop needs text_encoder); the property is tested "
    "with a tiny open_clip tower in tests/methods/test_coop.py"
)


def epochs_for_shots(shots: int) -> int:
    """CoOp's schedule: 50 epochs for 1 shot, 100 for 2-4, 200 for 8+ (ImageNet: 50, preset)."""
    if shots <= 1:
        return 50
    return 100 if shots <= 4 else 200


def _prompts(classnames: tuple[str, ...], n_ctx: int) -> list[str]:
    """``"X X … X <name>."`` per class: n_ctx placeholders, then the name ("_" read as space)."""
    return [" ".join([PLACEHOLDER] * n_ctx) + f" {name.replace('_', ' ')}." for name in classnames]


def prompt_length(tower: Any, classnames: tuple[str, ...], n_ctx: int) -> int:
    """Positions the text tower runs per prompt with ``n_ctx`` context tokens (the longest
    prompt's, see ``TextTower.used_length``): a step's work is about proportional to it."""
    with torch.no_grad():
        return tower.used_length(tower.tokenize(_prompts(classnames, n_ctx)))


def _init_words(tower: Any, words: str, n_ctx: int) -> Tensor:
    """(n_ctx, W) token embeddings of ``words`` (CoOp's context initialisation from a phrase)."""
    with torch.no_grad():
        tokens = tower.tokenize([words.replace("_", " ")])
        found = int(tokens.argmax(-1)[0]) - 1  # the tokens between the start and end tokens
        if found != n_ctx:
            raise ConfigError(
                f"coop: ctx_init {words!r} is {found} token(s) of this text tower, n_ctx is "
                f"{n_ctx}; set n_ctx={found}"
            )
        return tower.token_embedding(tokens)[0, 1 : 1 + n_ctx].float().cpu()


class PromptLearner(nn.Module):
    """Builds ``[SOS] v_1 … v_M [class tokens] . [EOS]`` embeddings for every class.

    The prompts ``"X X … X <name>."`` are tokenised once; the embeddings of the M placeholder
    positions are replaced by the learnable context ``ctx`` ((M, W) shared, or (C, M, W)
    class-specific). Everything else (token prefix/suffix, the tower) is frozen.

    Args:
        tower: a text tower (``tokenize``, ``token_embedding``, ``encode_embeddings``, ``width``).
        classnames: C class names ("_" is read as a space).
        n_ctx: M context tokens. class_specific: one context per class.
        init_std: standard deviation of the normal initialisation.
        generator: private RNG for the initialisation.
        ctx_init: words whose token embeddings initialise the context instead (CoOp's
            "a photo of a" variant; they must be exactly ``n_ctx`` tokens).
    """

    def __init__(
        self,
        tower: Any,
        classnames: tuple[str, ...],
        n_ctx: int,
        class_specific: bool,
        init_std: float,
        generator: torch.Generator,
        ctx_init: str | None = None,
    ) -> None:
        super().__init__()
        prompts = _prompts(classnames, n_ctx)
        with torch.no_grad():
            tokens = tower.tokenize(prompts)
            embedded = tower.token_embedding(tokens).float()
        if int(tokens.argmax(-1).min()) <= n_ctx + 1:
            raise ConfigError(
                f"coop: prompts of {n_ctx} context tokens plus the class name do not fit the "
                f"text tower's context length {tokens.shape[1]}; lower n_ctx"
            )
        # the positions after the longest prompt's end token cannot change any class feature
        # (causal tower), so the tower runs only up to it: the work follows the prompt length
        used = tower.used_length(tokens)
        tokens, embedded = tokens[:, :used], embedded[:, :used]
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)
        shape = (len(classnames), n_ctx, tower.width) if class_specific else (n_ctx, tower.width)
        ctx = torch.randn(shape, generator=generator) * init_std
        if ctx_init is not None:
            ctx = _init_words(tower, ctx_init, n_ctx).to(ctx.device).expand(shape).clone()
        self.ctx = nn.Parameter(ctx.to(embedded.device))
        self.tower = tower

    def embeddings(self) -> Tensor:
        """(C, L, W) prompt embeddings with the current context."""
        num_classes = self.prefix.shape[0]
        ctx = self.ctx if self.ctx.ndim == 3 else self.ctx.expand(num_classes, -1, -1)
        return torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)

    def forward(self) -> Tensor:
        """(C, D) normalised class text features."""
        return normalize_rows(self.tower.encode_embeddings(self.embeddings(), self.tokens))


@register_method
class CoOp(OptimizerParams, Adapter):
    """CoOp (Zhou et al., IJCV 2022): M learnable context vectors, class token at the end.

    Class text features are ``t_c(V) = text_tower([SOS] v_1 … v_M name_c . [EOS])`` and
    ``logits = s · norm(f) · norm(t_c)ᵀ``; cross-entropy trains only V (default: one shared
    (M, W) context, initialised N(0, 0.02²)). Images come from the feature cache; the text tower
    (``text.text_encoder``, a ``TextTower``) runs every step for all C classes. SGD lr 0.002,
    momentum 0.9, weight decay 5e-4, batch 32, one constant warmup epoch at 1e-5 then cosine
    per epoch, last epoch kept; with stored views each epoch uses one view per image. Training
    runs in float32 on the CPU and bfloat16 autocast on CUDA (the original used fp16).

    After training the class features are computed once and stored, so ``logits`` and a saved
    adapter need no text tower.

    Args:
        n_ctx: M, context tokens (16).
        class_specific: one context per class (False: CoOp's unified context).
        init_std: 0.02.
        ctx_init: None (random context), or words whose token embeddings initialise it
            (CoOp's ``"a photo of a"`` variant, spec §5.4); they must tokenise to exactly
            ``n_ctx`` tokens (``ConfigError`` otherwise).
        epochs: None means CoOp's rule from the shots (max rows per class): 50 for 1 shot,
            100 for 2-4, 200 for 8+; ImageNet uses 50 for every K (``presets/coop.yaml``).
        epoch_scale: the epochs actually trained are ``ceil(epoch_scale · epochs)`` (1.0: as
            given or from the rule), so a shortened schedule keeps the rule's dependence on the
            shots.
        cost_scale: None (train the epochs above), or the fraction of the paper schedule's
            text-tower work this fit may spend: ``max(1, ⌊cost_scale · S · L₁₆ / L⌋)``
            optimiser steps, where ``S = epochs · ⌈N / 32⌉`` is the paper schedule's step count
            (N training rows, CoOp's batch of 32) and ``L₁₆``, ``L`` the positions the tower
            runs per prompt with CoOp's 16 context tokens and with ``n_ctx`` (a step's work is
            about proportional to them; the attention's part grows faster, so a shorter prompt
            costs less than this counts). The steps are taken as whole epochs at
            ``batch_size`` (rounded down, at least one); with ``batch_size`` at least N every
            step sees all rows and the steps are the epochs (the ``fast`` preset). Set either
            this or ``epoch_scale``, not both.
        lr: 0.002. batch_size: 32 (a larger batch costs about the same per step: the text
            tower's pass over the C prompts dominates a step). momentum: 0.9. weight_decay:
            5e-4. warmup_lr: 1e-5.
        warmup_epochs: epochs at the constant ``warmup_lr`` before the cosine schedule (1, as
            Dassl).
        logit_scale: 100. use_views: sample stored augmented views per epoch.
        seed: initialisation, shuffling and view-sampling seed.

    Raises:
        MissingTensorError: ``text.text_encoder`` is None (a feature bundle alone has no text
            tower; run on an image dataset so the encoder is loaded).
    """

    card = MethodCard(
        name="coop",
        summary="CoOp: 16 learned prompt context vectors trained through the frozen text tower",
        paper="Zhou et al., Learning to Prompt for Vision-Language Models, IJCV 2022",
        arxiv="2109.01134",
        needs=("train", "text", "text_encoder"),
        trainable=True,
        searched={},
        uses_views=True,
        # the shared context has n_ctx × (text width) scalars; the width equals D for the
        # ViT-B CLIP models and the check-suite tower (RN50: width 512, D 1024)
        param_formula="n_ctx * D",
        max_tiny_seconds=60,
        expected_failed_checks=dict.fromkeys(_NEEDS_TOWER, _TOWER_REASON),
        constraints={
            "n_ctx": positive_int(),
            "class_specific": flag(),
            "init_std": positive(),
            "ctx_init": optional(Constraint("str"), "random N(0, init_std²) context"),
            "epochs": optional(count(), "CoOp's rule from the shots"),
            "epoch_scale": between(0.0, 1.0, open_low=True),
            "cost_scale": optional(between(0.0, 1.0, open_low=True), "train by epochs"),
            **common("lr", "batch_size", "momentum", "weight_decay", "warmup_lr"),
            **common("warmup_epochs"),
            **common("logit_scale", "use_views", "seed"),
        },
    )
    train_recipe = DASSL_SGD

    def __init__(
        self,
        n_ctx: int = 16,
        class_specific: bool = False,
        init_std: float = 0.02,
        ctx_init: str | None = None,
        epochs: int | None = None,
        epoch_scale: float = 1.0,
        cost_scale: float | None = None,
        lr: float = 0.002,
        batch_size: int = PAPER_BATCH,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_lr: float = 1e-5,
        warmup_epochs: int = 1,
        logit_scale: float = 100.0,
        use_views: bool = True,
        seed: int = 1,
    ) -> None:
        self._init_params(locals())

    def _fit(self, train: TrainSet, text: TextFeatures, val: ValidationSet | None) -> None:
        tower = text.require("text_encoder", "coop")
        if self.cost_scale is not None and self.epoch_scale != 1.0:
            raise ConfigError(
                f"coop: cost_scale={self.cost_scale} and epoch_scale={self.epoch_scale} both "
                "shorten the schedule; set only one of them"
            )
        learner = PromptLearner(
            tower,
            text.classnames,
            self.n_ctx,
            self.class_specific,
            self.init_std,
            self._generator(),
            self.ctx_init,
        )
        length_ratio = 1.0
        if self.cost_scale is not None:  # the paper schedule's prompt length over this one's
            paper_length = prompt_length(tower, text.classnames, PAPER_N_CTX)
            length_ratio = paper_length / int(learner.tokens.shape[1])
        epochs = self._epochs(train, length_ratio)
        sampler = ViewSampler(train.features, train.views if self.use_views else None, self.seed)
        labels = train.labels

        def batch_loss(index: Tensor, epoch: int) -> Tensor:
            class_features = learner().to(train.device)
            logits = self.logit_scale * sampler(epoch)[index] @ class_features.T
            return F.cross_entropy(logits.float(), labels[index])

        history = train_loop(
            [learner.ctx],
            batch_loss,
            len(train),
            self._train_config(epochs=epochs),
            device=train.device,
            what="coop training",
        )
        self._learner = learner
        self.ctx_ = learner.ctx
        with torch.no_grad():
            self.class_features_ = learner().float().to(train.device)
        self.train_loss_ = [float(x) for x in history.loss]
        self._record_fixed({"epochs": epochs}, "CoOp searches nothing on validation data")

    def _epochs(self, train: TrainSet, length_ratio: float = 1.0) -> int:
        """The epochs of this fit: ``epochs`` or the shots rule, shortened by ``epoch_scale``
        or, with ``cost_scale``, to that share of the paper schedule's work (``length_ratio``:
        its prompt length over this fit's, ``L₁₆ / L``)."""
        shots = int(torch.bincount(train.labels).max())
        epochs = int(self.epochs) if self.epochs is not None else epochs_for_shots(shots)
        if self.cost_scale is None:
            # the tolerance keeps float products such as 0.1 * 30 = 3.0000000000000004 at 3
            return math.ceil(self.epoch_scale * epochs - 1e-9)
        paper_steps = epochs * math.ceil(len(train) / PAPER_BATCH)
        if paper_steps == 0:
            return 0
        steps = max(1, math.floor(self.cost_scale * paper_steps * length_ratio + 1e-9))
        return max(1, steps // math.ceil(len(train) / int(self.batch_size)))

    def _logits(self, features: Tensor) -> Tensor:
        return self.logit_scale * features @ self.class_features_.T

    def _grad_logits(self, features: Tensor) -> Tensor:
        learner = getattr(self, "_learner", None)
        if learner is None:  # loaded from disk: no tower, the stored class features are used
            return self._logits(features)
        return self.logit_scale * features @ learner().to(features.device).T

    def _trainable_parameters(self) -> list[nn.Parameter]:
        # only the context; the learner module shares it and the tower is frozen
        ctx = getattr(self, "ctx_", None)
        return [ctx] if isinstance(ctx, nn.Parameter) and ctx.requires_grad else []

    def _reset(self) -> None:
        super()._reset()
        self._learner = None

    def _set_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        super()._set_state(tensors, meta)
        self.ctx_ = nn.Parameter(self.ctx_.float())
