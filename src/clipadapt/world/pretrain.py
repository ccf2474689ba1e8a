"""Contrastive pre-training of the small world CLIP, and loading the shipped checkpoint.

The model is open_clip's ``CLIP`` built from ``encoders/model_configs/clipadapt-world-rn32.json``
(a modified-ResNet image tower, layers [1, 1, 1, 1], width 16, 64-pixel input; a 3-layer
width-128 text transformer over the word vocabulary of :mod:`clipadapt.world.texts`), trained
with ``open_clip.ClipLoss`` on (image, caption) pairs drawn on the fly from
:class:`~clipadapt.world.generator.WorldGenerator`: batch ``b`` of step ``s`` is drawn with
seed ``seed * 1_000_003 + s``, so a run is reproducible from its arguments (on CPU).

Example:
    >>> model, preprocess, tokenizer = load_world_model()  # doctest: +SKIP
    >>> text = model.encode_text(tokenizer(["a photo of a red circle."]))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipadapt.exceptions import CheckpointError, ConfigError
from clipadapt.world.generator import TWIN_KINDS, WorldGenerator
from clipadapt.world.texts import world_tokenizer
from clipadapt.world.tokenizer import WordTokenizer, tokenizer_from_card

log = logging.getLogger(__name__)

MODEL_NAME = "clipadapt-world-rn32"
# open_clip's default (OpenAI) normalisation: any open_clip-based encoder that falls back to the
# architecture's default preprocessing then feeds the world model exactly what it was trained on.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def model_config_dir() -> Path:
    """Folder of clipadapt's open_clip model configs (``encoders/model_configs``)."""
    return Path(str(resources.files("clipadapt") / "encoders" / "model_configs"))


def assets_dir() -> Path:
    """Folder of the shipped world checkpoint and model card."""
    return Path(str(resources.files("clipadapt") / "world" / "assets"))


def default_card_path() -> Path:
    return assets_dir() / "world_clip.json"


def create_world_model(model_name: str = MODEL_NAME) -> torch.nn.Module:
    """A randomly initialised open_clip model from clipadapt's registered configs."""
    import open_clip

    open_clip.add_model_config(model_config_dir())
    return open_clip.create_model(model_name, output_dict=True)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, normalised with :data:`MEAN`/:data:`STD`."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def save_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Write the state dict as float16 safetensors, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the shipped file private
    save_file(state, tmp)
    os.replace(tmp, path)


def pretrain(
    out_path: str | Path,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    warmup: int = 100,
    weight_decay: float = 0.1,
    log_every: int = 50,
    save_every: int = 100,
    threads: int | None = None,
    command: str | None = None,
    init: str | Path | None = None,
    step_offset: int = 0,
    twin_prob: float = 0.0,
    family_size: int = 2,
    twin_weights: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Train the world CLIP contrastively and write its checkpoint and model card.

    Args:
        out_path: the ``.safetensors`` checkpoint to write; the card goes next to it with a
            ``.json`` suffix. Both are rewritten every ``save_every`` steps, so an interrupted
            run leaves a usable (card-marked partial) checkpoint.
        steps: optimisation steps (the cosine schedule spans them).
        batch_size: (image, caption) pairs per step.
        lr: peak AdamW learning rate (linear warm-up for ``warmup`` steps, then cosine to 0).
        seed: model initialisation and data stream seed.
        weight_decay: AdamW decay on matrices and convolutions (not on norms, biases, scale).
        log_every: steps per loss-curve point (mean loss over the window).
        threads: torch CPU threads (None: torch's default).
        command: the command line recorded in the card as the way to reproduce the run.
        init: continue from this checkpoint (a ``.safetensors`` written by :func:`pretrain`;
            its card, if beside it, is kept in the new card as ``"init_card"``) instead of a
            random initialisation. The optimizer state starts fresh.
        step_offset: added to the step number in the data seed, so a continuation draws
            batches the first run never saw (use the first run's ``steps``).
        twin_prob: share of scenes followed by a minimal-pair twin in their batch (see
            :class:`~clipadapt.world.generator.WorldGenerator`).
        family_size: scenes per twin family, the original included (2: a single twin).
        twin_weights: relative weights of the twin kinds, in
            :data:`~clipadapt.world.generator.TWIN_KINDS` order (None: uniform).

    Returns:
        The model card (also written as JSON).

    Raises:
        ConfigError: non-positive ``steps``/``batch_size`` or ``lr``.
    """
    import open_clip

    if steps <= 0 or batch_size <= 1 or lr <= 0:
        raise ConfigError(
            f"pretrain needs steps > 0, batch_size > 1 and lr > 0; "
            f"got steps={steps}, batch_size={batch_size}, lr={lr}"
        )
    if threads:
        torch.set_num_threads(threads)
    out_path = Path(out_path)
    card_path = out_path.with_suffix(".json")
    torch.manual_seed(seed)
    model = create_world_model()
    init_card = None
    if init is not None:
        from safetensors.torch import load_file

        init = Path(init)
        if not init.is_file():
            raise ConfigError(f"--init checkpoint {init} does not exist")
        model.load_state_dict({k: v.float() for k, v in load_file(str(init)).items()})
        if init.with_suffix(".json").is_file():
            init_card = json.loads(init.with_suffix(".json").read_text())
            init_card.pop("evaluation", None)
            init_card.pop("zero_shot_accuracy", None)
    model.train()
    tokenizer = world_tokenizer()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    loss_fn = open_clip.ClipLoss()
    gen = WorldGenerator(twin_prob=twin_prob, family_size=family_size, twin_weights=twin_weights)
    curve: list[dict[str, float]] = []
    window: list[float] = []
    start = time.perf_counter()
    card: dict[str, Any] = {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        images, captions, _ = gen.batch(batch_size, seed=seed * 1_000_003 + step_offset + step)
        out = model(images_to_tensor(images), tokenizer(captions))
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        if not torch.isfinite(loss):
            raise ConfigError(f"pretraining diverged at step {step} (loss {float(loss)}); lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # CLIP's clamp of the learned temperature
            model.logit_scale.clamp_(0, math.log(100))
        window.append(loss.item())
        done = step + 1
        if done % log_every == 0 or done == steps:
            elapsed = time.perf_counter() - start
            curve.append({"step": done, "loss": float(np.mean(window)), "seconds": elapsed})
            log.info("step %d/%d loss %.4f (%.1f s)", done, steps, np.mean(window), elapsed)
            window = []
        if done % save_every == 0 or done == steps:
            card = _card(
                tokenizer,
                steps=steps,
                done=done,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                warmup=warmup,
                weight_decay=weight_decay,
                curve=curve,
                seconds=time.perf_counter() - start,
                checkpoint=out_path.name,
                parameters=sum(p.numel() for p in model.parameters()),
                command=command,
                step_offset=step_offset,
                init_card=init_card,
                twin_prob=twin_prob,
                family_size=family_size,
                twin_weights=twin_weights,
            )
            save_checkpoint(model, out_path)
            write_card(card, card_path)
    return card


def _card(tokenizer: WordTokenizer, **run: Any) -> dict[str, Any]:
    import open_clip

    open_clip.add_model_config(model_config_dir())
    return {
        "model_name": MODEL_NAME,
        "checkpoint": run["checkpoint"],
        "tokenizer": tokenizer.to_dict(),
        "image_size": 64,
        "mean": list(MEAN),
        "std": list(STD),
        "config": open_clip.get_model_config(MODEL_NAME),
        "parameters": run["parameters"],
        "seed": run["seed"],
        "steps": run["steps"],
        "steps_done": run["done"],
        "complete": run["done"] == run["steps"],
        "optimizer": {
            "name": "AdamW",
            "lr": run["lr"],
            "betas": [0.9, 0.98],
            "eps": 1e-6,
            "weight_decay": run["weight_decay"],
            "schedule": f"linear warm-up {run['warmup']} steps, cosine to 0",
            "grad_clip": 1.0,
            "batch_size": run["batch_size"],
        },
        "loss": "open_clip.ClipLoss (symmetric InfoNCE, learned temperature clamped at 100)",
        "data_recipe": (
            f"WorldGenerator(twin_prob={run['twin_prob']}, family_size={run['family_size']}, "
            f"twin_weights={run['twin_weights']}): 1-4 objects (weights "
            ".4/.3/.15/.15), 30 % of multi-object scenes are groups of identical objects, each "
            "scene followed with probability twin_prob by up to family_size - 1 minimal-pair "
            "twins that all change the same attribute (shape, texture, stripe orientation or "
            "the two objects' relative position; kind drawn with twin_weights); captions from "
            "clipadapt.world.captions.caption defaults; batch of step s drawn with seed = "
            "seed * 1000003 + step_offset + s"
        ),
        "twin_prob": run["twin_prob"],
        "twin_kinds": list(TWIN_KINDS),
        "family_size": run["family_size"],
        "twin_weights": None if run["twin_weights"] is None else list(run["twin_weights"]),
        "command": run["command"],
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "train_seconds": round(run["seconds"], 1),
        "loss_curve": run["curve"],
        "step_offset": run["step_offset"],
        "init_card": run["init_card"],
    }


def write_card(card: dict[str, Any], path: str | Path) -> None:
    """Write a model card atomically (pretty JSON)."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=1) + "\n")
    os.replace(tmp, path)


def read_card(card_path: str | Path | None = None) -> dict[str, Any]:
    """The model card at ``card_path`` (default: the shipped one)."""
    path = Path(card_path) if card_path else default_card_path()
    if not path.is_file():
        raise CheckpointError(
            f"world model card not found: {path}; run `clipadapt world pretrain --out FILE`"
        )
    return json.loads(path.read_text())


def load_world_model(
    card_path: str | Path | None = None,
) -> tuple[torch.nn.Module, Any, WordTokenizer]:
    """Load a world CLIP through open_clip from its model card.

    Args:
        card_path: a card written by :func:`pretrain`; default the shipped
            ``world/assets/world_clip.json``. Its ``checkpoint`` is resolved next to it.

    Returns:
        (open_clip model in eval mode, float32 on CPU; the eval image transform for PIL images;
        the word tokenizer).

    Raises:
        CheckpointError: missing card or checkpoint, or weights that do not fit the config.
    """
    import open_clip
    from safetensors.torch import load_file

    path = Path(card_path) if card_path else default_card_path()
    card = read_card(path)
    ckpt = path.parent / card["checkpoint"]
    if not ckpt.is_file():
        raise CheckpointError(f"checkpoint {ckpt} named by {path} does not exist")
    open_clip.add_model_config(model_config_dir())
    model = open_clip.create_model(card["model_name"])
    state = load_file(str(ckpt))
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt} does not match {card['model_name']}: {exc}") from exc
    model.eval()
    preprocess = open_clip.image_transform(
        card["image_size"], is_train=False, mean=tuple(card["mean"]), std=tuple(card["std"])
    )
    return model, preprocess, tokenizer_from_card(card["tokenizer"], path.parent)
