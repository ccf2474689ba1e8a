"""Measure a world CLIP on the world datasets: zero-shot per text source and 16-shot probes.

Zero-shot uses three text sources where the dataset has them: the class name in the dataset's
template (``name``), the mean over its template list (``templates``) and the mean over the
CuPL-style description sentences (``descriptions``). The ``best`` text is chosen on the
validation split (never on test); style-shifted sets use their source dataset's choice.

Few-shot baselines on the 16-shot training split: a prototype classifier (cosine to the class
mean) and an L2-regularised logistic-regression linear probe whose weight decay is chosen on
validation from a small grid. Style-shifted sets are scored with the source dataset's probes
(the domain-generalisation protocol).

Example:
    >>> report = evaluate_world_model(data_root="data/world")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from clipadapt.world.datasets import generate_world_datasets, read_dataset
from clipadapt.world.pretrain import default_card_path, load_world_model, read_card, write_card
from clipadapt.world.tokenizer import WordTokenizer

PROBE_DECAYS: tuple[float, ...] = (1e-4, 1e-3, 1e-2)


@torch.no_grad()
def encode_split(
    model: torch.nn.Module, preprocess: Any, folder: Path, rows: list[list[Any]], batch: int = 256
) -> tuple[Tensor, Tensor]:
    """L2-normalised image features (N, D) and labels (N,) of one split's rows."""
    feats = []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        x = torch.stack([preprocess(Image.open(folder / r[0]).convert("RGB")) for r in chunk])
        feats.append(F.normalize(model.encode_image(x).float(), dim=-1))
    labels = torch.tensor([r[1] for r in rows], dtype=torch.long)
    dim = model.text_projection.shape[1]
    return (torch.cat(feats) if feats else torch.empty(0, dim)), labels


@torch.no_grad()
def text_classifier(
    model: torch.nn.Module, tokenizer: WordTokenizer, prompts: list[list[str]]
) -> Tensor:
    """(C, D) unit class vectors: the mean of each class's normalised prompt embeddings."""
    flat = [p for ps in prompts for p in ps]
    emb = F.normalize(model.encode_text(tokenizer(flat)).float(), dim=-1)
    sizes = torch.tensor([len(ps) for ps in prompts])
    owner = torch.repeat_interleave(torch.arange(len(prompts)), sizes)
    sums = torch.zeros(len(prompts), emb.shape[1]).index_add_(0, owner, emb)
    return F.normalize(sums / sizes[:, None], dim=-1)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(-1) == labels).float().mean() * 100) if len(labels) else 0.0


def fit_linear_probe(
    x: Tensor, y: Tensor, n_classes: int, decay: float, steps: int = 100
) -> Tensor:
    """Multinomial logistic regression (weights (D+1, C), bias last) by full-batch L-BFGS."""
    torch.manual_seed(0)
    xb = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    w = torch.zeros(xb.shape[1], n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        # Features are unit vectors; scale 10 keeps logits in a useful range at small decay.
        loss = F.cross_entropy(10 * xb @ w, y) + decay * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def probe_logits(w: Tensor, x: Tensor) -> Tensor:
    return 10 * torch.cat([x, torch.ones(len(x), 1)], dim=1) @ w


def _relation_scenes(rng: Any, n: int) -> tuple[list[Any], list[str]]:
    """Two-object scenes with two different colours and a clear relation, labelled with the
    relation of the object whose colour name sorts first to the other one."""
    from clipadapt.world.captions import clear_relation
    from clipadapt.world.generator import BACKGROUNDS, Scene, place, random_object, sample_sizes

    scenes, labels = [], []
    while len(scenes) < n:
        sizes = sample_sizes(rng, 2)
        corners = place(rng, sizes)
        if corners is None:
            continue
        a, b = (random_object(rng, z, *c) for z, c in zip(sizes, corners, strict=True))
        first, second = (a, b) if a.colour < b.colour else (b, a)
        rel = clear_relation(first, second)
        if a.colour == b.colour or rel is None:
            continue
        scenes.append(Scene(rng.choice(BACKGROUNDS), rng.randrange(8), (first, second)))
        labels.append(rel)
    return scenes, labels


def _bigger_scenes(rng: Any, n: int) -> tuple[list[Any], list[str]]:
    """Two-object scenes, one large and one small, in two different colours, labelled with
    whether the object whose colour name sorts first is the ``larger`` or the ``smaller``."""
    from clipadapt.world.generator import BACKGROUNDS, Scene, place, random_object

    scenes, labels = [], []
    while len(scenes) < n:
        corners = place(rng, ["large", "small"])
        if corners is None:
            continue
        big = random_object(rng, "large", *corners[0])
        small = random_object(rng, "small", *corners[1])
        if big.colour == small.colour:
            continue
        scenes.append(Scene(rng.choice(BACKGROUNDS), rng.randrange(8), (big, small)))
        labels.append("larger" if big.colour < small.colour else "smaller")
    return scenes, labels


@torch.no_grad()
def attribute_probes(
    model: torch.nn.Module, n_images: int = 6000, seed: int = 5
) -> dict[str, dict[str, float]]:
    """What the image features carry: a linear probe per attribute on generated scenes.

    ``n_images`` one-object scenes for the object attributes and the background, and half as
    many scenes for each of three scene attributes: the object count (1-4 objects), the
    relation between two objects of different colours (of the object whose colour name sorts
    first to the other; the shapes vary freely, so only a binding of colour and position
    tells it), and ``bigger``, the size relation of a large and a small object of two colours
    (is the object whose colour name sorts first the larger one; only a binding of colour and
    size tells it). In each set the first two thirds train and the rest are scored. Each
    attribute gets a 16-shot probe and one on every training image (orientation: striped objects only).
    The better of two weight decays on the scored part is reported: an upper bound meant for
    diagnosis (does the tower carry the attribute at all?), never a method comparison, and
    these scenes are not any dataset's test split.
    """
    import random

    import numpy as np

    from clipadapt.world.generator import render, sample_scene
    from clipadapt.world.pretrain import images_to_tensor

    def encode(scenes: list[Any]) -> Tensor:
        x = images_to_tensor(np.stack([render(sc, "normal", i) for i, sc in enumerate(scenes)]))
        return torch.cat(
            [
                F.normalize(model.encode_image(x[i : i + 500]).float(), dim=-1)
                for i in range(0, len(x), 500)
            ]
        )

    rng = random.Random(seed)
    singles = [sample_scene(rng, 1) for _ in range(n_images)]
    counted = [sample_scene(rng, rng.randint(1, 4)) for _ in range(n_images // 2)]
    pairs, relations = _relation_scenes(rng, n_images // 2)
    # drawn last, so the probes above see the same scenes as before this one existed
    sized, bigger = _bigger_scenes(rng, n_images // 2)
    single_feats = encode(singles)
    objects = [sc.objects[0] for sc in singles]
    groups: dict[str, tuple[Tensor, list[Any]]] = {
        "colour": (single_feats, [o.colour for o in objects]),
        "shape": (single_feats, [o.shape for o in objects]),
        "texture": (single_feats, [o.texture for o in objects]),
        "size": (single_feats, [o.size for o in objects]),
        "shade": (single_feats, [o.shade for o in objects]),
        "background": (single_feats, [sc.background for sc in singles]),
        "orientation": (
            single_feats,
            [o.orientation if o.texture == "striped" else None for o in objects],
        ),
        "count": (encode(counted), [len(sc.objects) for sc in counted]),
        "relation": (encode(pairs), relations),
        "bigger": (encode(sized), bigger),
    }
    out = {}
    for name, (feats, vals) in groups.items():
        keep = torch.tensor([i for i, v in enumerate(vals) if v is not None])
        classes = sorted({v for v in vals if v is not None})
        y = torch.tensor([classes.index(vals[i]) for i in keep.tolist()])
        f = feats[keep]
        n_train = len(y) * 2 // 3
        y_tr, f_te, y_te = y[:n_train], f[n_train:], y[n_train:]
        few = torch.cat([torch.nonzero(y_tr == c).flatten()[:16] for c in range(len(classes))])
        res = {"classes": len(classes), "chance": round(100 / len(classes), 1)}
        for label, idx in (("probe_16", few), ("probe_all", torch.arange(n_train))):
            res[label] = round(
                max(
                    accuracy(
                        probe_logits(fit_linear_probe(f[idx], y[idx], len(classes), d), f_te), y_te
                    )
                    for d in PROBE_DECAYS[:2]
                ),
                1,
            )
        out[name] = res
    return out


def _prompts(meta: dict[str, Any], folder: Path) -> dict[str, list[list[str]]]:
    names = meta["classnames"]
    out = {
        "name": [[meta["template"].format(c)] for c in names],
        "templates": [
            [t.format(c) for t in meta.get("templates", [meta["template"]])] for c in names
        ],
    }
    if meta.get("descriptions"):
        desc = json.loads((folder / meta["descriptions"]).read_text())
        out["descriptions"] = [desc[c] for c in names]
    return out


def evaluate_world_model(
    card_path: str | Path | None = None,
    data_root: str | Path = "world-data",
    size: str = "default",
    seed: int = 0,
    update_card: bool = False,
    names: list[str] | None = None,
    threads: int | None = 1,
    probe_attributes: bool = True,
) -> dict[str, Any]:
    """Zero-shot and 16-shot accuracies of a world CLIP on every world dataset.

    Args:
        card_path: model card (default: the shipped one).
        data_root: where the world datasets are (generated there, cached, when missing).
        size, seed: the datasets' recipe (see :func:`generate_world_datasets`).
        update_card: write the result into the card as ``"evaluation"`` and
            ``"zero_shot_accuracy"``.
        names: only these datasets (shifted sets need their source in the list).
        threads: torch CPU threads while evaluating (restored afterwards); 1 by default because
            on a shared CPU more threads were several times slower; None keeps torch's.
        probe_attributes: add :func:`attribute_probes` (about 30 s) as ``"attribute_probes"``.

    Returns:
        ``{"datasets": {name: {...}}, "summary": {...}, "recipe": {...}, "attribute_probes":
        {...} (with ``probe_attributes``), "seconds": float}``.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _evaluate(card_path, data_root, size, seed, update_card, names, probe_attributes)
    finally:
        torch.set_num_threads(previous)


def _evaluate(
    card_path: str | Path | None,
    data_root: str | Path,
    size: str,
    seed: int,
    update_card: bool,
    names: list[str] | None,
    probe_attributes: bool,
) -> dict[str, Any]:
    start = time.perf_counter()
    path = Path(card_path) if card_path else default_card_path()
    model, preprocess, tokenizer = load_world_model(path)
    folders = generate_world_datasets(data_root, size=size, seed=seed, names=names)
    results: dict[str, Any] = {}
    probes: dict[str, tuple[Tensor, Tensor, Tensor, str, str]] = {}
    for folder in folders:
        meta, split = read_dataset(folder)
        n_classes = len(meta["classnames"])
        feats = {s: encode_split(model, preprocess, folder, split[s]) for s in split if split[s]}
        heads = {k: text_classifier(model, tokenizer, p) for k, p in _prompts(meta, folder).items()}
        x_te, y_te = feats["test"]
        res: dict[str, Any] = {
            "classes": n_classes,
            "test_images": len(y_te),
            "zero_shot": {k: round(accuracy(x_te @ h.T, y_te), 2) for k, h in heads.items()},
        }
        source = meta.get("domain_of")
        if source is None:
            x_va, y_va = feats["val"]
            val_acc = {k: accuracy(x_va @ h.T, y_va) for k, h in heads.items()}
            best_text = max(val_acc, key=val_acc.get)
            x_tr, y_tr = feats["train"]
            protos = F.normalize(
                torch.zeros(n_classes, x_tr.shape[1]).index_add_(0, y_tr, x_tr), dim=-1
            )
            fits = {d: fit_linear_probe(x_tr, y_tr, n_classes, d) for d in PROBE_DECAYS}
            decay = max(fits, key=lambda d: accuracy(probe_logits(fits[d], x_va), y_va))
            proto_val = accuracy(x_va @ protos.T, y_va)
            probe_val = accuracy(probe_logits(fits[decay], x_va), y_va)
            best_fs = "linear_probe" if probe_val >= proto_val else "prototype"
            w = fits[decay]
            probes[meta["name"]] = (protos, w, torch.tensor(decay), best_text, best_fs)
            res["shots"] = int(len(y_tr) // n_classes)
            res["probe_weight_decay"] = decay
        else:
            protos, w, _, best_text, best_fs = probes[source]
            res["domain_of"] = source
        res["best_text"] = best_text
        res["zero_shot_best"] = res["zero_shot"][best_text]
        res["prototype_16"] = round(accuracy(x_te @ protos.T, y_te), 2)
        res["linear_probe_16"] = round(accuracy(probe_logits(w, x_te), y_te), 2)
        res["best_16"] = res[f"{best_fs}_16"]
        res["best_16_method"] = best_fs
        results[meta["name"]] = res
    src = [r for r in results.values() if "domain_of" not in r]
    summary = {
        "mean_zero_shot_best": round(sum(r["zero_shot_best"] for r in src) / len(src), 2),
        "mean_best_16": round(sum(r["best_16"] for r in src) / len(src), 2),
        "datasets_zero_shot_in_30_70": sum(30 <= r["zero_shot_best"] <= 70 for r in src),
        "source_datasets": len(src),
    }
    summary["mean_gain_16_over_zero_shot"] = round(
        summary["mean_best_16"] - summary["mean_zero_shot_best"], 2
    )
    report = {
        "datasets": results,
        "summary": summary,
        "recipe": {"size": size, "seed": seed},
    }
    if probe_attributes:
        report["attribute_probes"] = attribute_probes(model)
    report["seconds"] = round(time.perf_counter() - start, 1)
    if update_card:
        card = read_card(path)
        card["evaluation"] = report
        card["zero_shot_accuracy"] = {k: v["zero_shot"] for k, v in results.items()}
        write_card(card, path)
    return report
