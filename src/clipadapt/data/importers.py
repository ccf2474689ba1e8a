"""Bring features made elsewhere into a feature bundle: Tip-Adapter caches and numpy arrays.

Both importers read only data, never code: torch files with ``torch.load(weights_only=True)``
(the restricted unpickler that accepts tensors and plain containers and refuses everything
else), numpy files with ``allow_pickle=False``. They write a bundle (``docs/bundle-format.md``)
atomically and read it back through :func:`clipadapt.load_bundle` before returning, so what
they write is what every method reads. Bad input is one :class:`~clipadapt.exceptions.BundleError`
(or :class:`~clipadapt.exceptions.ConfigError` for arguments) naming the file and the fix.

**Tip-Adapter's cache folder** (its ``build_cache_model`` / ``pre_load_features``):

- ``keys_{k}shots.pt``: (D, N) float, the cache keys, i.e. the L2-normalised mean of the image
  features over its augmentation epochs, one column per training image;
- ``values_{k}shots.pt``: (N, C) one-hot float, the keys' labels;
- ``{val,test}_f.pt``: (M, D) normalised features; ``{val,test}_l.pt``: (M,) integer labels
  (``val_*`` is absent for ImageNet).

They become ``train_{k}shot_features`` (the keys, transposed) / ``train_{k}shot_labels``,
``val_*`` and ``test_*``. Tip-Adapter does not store its text classifier; pass it as a separate
file ((D, C) as its ``clip_classifier`` returns it, or (C, D)) to fit methods that need text.

**Arrays**: groups from ``.npy`` files (``FILE.npz:KEY`` picks an array inside an ``.npz``), or
one ``.npz`` whose arrays carry bundle names (``train_features``, ``train_labels``,
``test_features``, ..., ``text_features``, and ``classnames`` as a string array). Labels are
class indices (N,) or one-hot rows (N, C).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clipadapt.data.bundle import FeatureBundle, load_bundle, save_bundle
from clipadapt.exceptions import BundleError, ConfigError

_GROUP_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
_TIP_KEYS = re.compile(r"^keys_(\d+)shots\.pt$")
_NPZ_GROUP = re.compile(r"^(?P<group>[a-z][a-z0-9_]*?)_(?P<kind>features|labels|features_views)$")
_RESERVED = ("text", "negative_text", "description")

ArrayLike = np.ndarray | Tensor


# ---------------------------------------------------------------------------------- reading


def load_tensor_file(path: str | Path) -> Tensor:
    """One tensor from a torch file, loaded weights-only (nothing is unpickled).

    Raises:
        BundleError: missing, refused by the weights-only loader, or not a single tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: file not found")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler raises many types for refused payloads
        raise BundleError(
            f"{path}: refused by weights-only loading ({type(error).__name__}); it must hold a "
            "plain tensor (torch.save(tensor, path)); clipadapt never unpickles objects"
        ) from None
    if not isinstance(value, Tensor):
        raise BundleError(
            f"{path}: holds a {type(value).__name__}, not a tensor; save the tensor itself "
            "(torch.save(tensor, path))"
        )
    return value.detach()


def load_array(spec: str | Path) -> np.ndarray:
    """A numeric array from ``FILE.npy``, ``FILE.npz:KEY`` or a weights-only torch file.

    Raises:
        BundleError: the file or key is missing, or the array holds Python objects (pickled).
    """
    text = str(spec)
    key = None
    if ".npz:" in text:
        text, key = text.rsplit(":", 1)
    path = Path(text)
    if path.suffix in (".pt", ".pth"):
        return _tensor_to_numpy(path)
    if not path.is_file():
        raise BundleError(f"{path}: file not found")
    if path.suffix == ".npz" and key is None:
        raise BundleError(f"{path}: name the array inside the .npz as {path}:KEY")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                if key not in loaded.files:
                    raise BundleError(
                        f"{path}: no array {key!r} (arrays: {', '.join(loaded.files) or 'none'})"
                    )
                return loaded[key]
        return loaded
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise BundleError(
                f"{path}{':' + key if key else ''}: holds Python objects (a pickled array), "
                "which clipadapt never loads; save a numeric array, e.g. "
                "np.save(path, np.asarray(x, dtype=np.float32))"
            ) from None
        raise BundleError(f"{path}: not a readable numpy file ({error})") from None
    except OSError as error:
        raise BundleError(f"{path}: not a readable numpy file ({error})") from None


def _tensor_to_numpy(path: Path) -> np.ndarray:
    tensor = load_tensor_file(path)
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def read_classnames(source: str | Path | list[str]) -> list[str]:
    """Class names from a list, a JSON file (a list of strings) or a text file (one per line,
    line i = class i; CoOp's ``<wnid> <name>`` lines have the WNID dropped, as in
    :func:`clipadapt.data.classnames.read_classnames`).

    A text file may repeat a name (ImageNet's CLIP-curated list has two ``crane`` classes: a
    warning is logged); a list or JSON file may not.

    Raises:
        ConfigError: unreadable, not a list of strings, empty, an empty line between names, or
            a list/JSON with duplicates.
    """
    from clipadapt.data import classnames as names_files

    if isinstance(source, list):
        names, where = source, "classnames"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: class name file not found")
        if path.suffix != ".json":
            names = names_files.read_classnames(path)
            if not names:
                raise ConfigError(f"{path}: no class names (one name per line)")
            return names
        try:
            names = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not JSON ({error})") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"{where}: class names must be a non-empty list of strings (a JSON list, or one name "
            "per line)"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: class names repeat; give each class one distinct name")
    return list(names)


# ---------------------------------------------------------------------------------- conversion


def _as_numpy(value: ArrayLike, where: str) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise BundleError(f"{where}: holds Python objects; give a numeric array")
        return value
    raise BundleError(f"{where}: expected a numpy array or a tensor, got {type(value).__name__}")


def features_tensor(value: ArrayLike, where: str, *, ndim: int = 2) -> Tensor:
    """A float16/float32 feature tensor (float64 becomes float32), checked for shape and NaN.

    Raises:
        BundleError: wrong number of dimensions, a non-float dtype, empty, or non-finite values.
    """
    array = _as_numpy(value, where)
    shape = "(N, D)" if ndim == 2 else "(V, N, D)"
    if array.ndim != ndim:
        raise BundleError(f"{where}: features must be {shape}, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise BundleError(
            f"{where}: features must be floating point, got {array.dtype}; cast them with "
            ".astype(np.float32)"
        )
    if array.size == 0:
        raise BundleError(f"{where}: no feature rows")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).reshape(-1, array.shape[-1]).any(axis=1).sum())
        raise BundleError(f"{where}: {bad} row(s) contain NaN or Inf; re-extract these features")
    if array.dtype not in (np.float16, np.float32):
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))


def labels_tensor(value: ArrayLike, where: str) -> Tensor:
    """(N,) int64 class indices from indices (N,) or one-hot rows (N, C).

    Raises:
        BundleError: negative or non-integer indices, or (N, C) rows that are not one-hot.
    """
    array = _as_numpy(value, where)
    if array.ndim == 2:
        if array.shape[1] == 0:
            raise BundleError(f"{where}: one-hot labels with zero classes")
        ones = array == 1
        zeros = array == 0
        bad = ~(ones | zeros).all(axis=1) | (ones.sum(axis=1) != 1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise BundleError(
                f"{where}: (N, C) labels must be one-hot (a single 1 per row, zeros elsewhere); "
                f"row {row} is not ({int(bad.sum())} bad rows); give class indices (N,) instead"
            )
        return torch.from_numpy(ones.argmax(axis=1).astype(np.int64))
    if array.ndim != 1:
        raise BundleError(
            f"{where}: labels must be class indices (N,) or one-hot (N, C), got shape {array.shape}"
        )
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise BundleError(f"{where}: labels must be integers, got {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        if not (np.isfinite(array).all() and (array == np.round(array)).all()):
            raise BundleError(
                f"{where}: labels must be whole class indices, found fractional or NaN values"
            )
    if array.size and array.min() < 0:
        raise BundleError(f"{where}: negative label {array.min()}; labels are 0 ... C-1")
    return torch.from_numpy(array.astype(np.int64))


def text_tensor(
    value: ArrayLike, where: str, dim: int, num_classes: int | None, native: str
) -> Tensor:
    """Class text features as (C, D), accepting (D, C) when the orientation is unambiguous.

    Args:
        dim: D, the image features' width (the text's must match).
        num_classes: C when known (from class names), to orient square arrays.
        native: ``"CD"`` or ``"DC"``, the layout assumed when nothing else decides.
    """
    features = features_tensor(value, where)
    rows, cols = features.shape
    if cols == dim and rows == dim:  # square: C == D, or names decide
        transpose = native == "DC" if num_classes is None else num_classes != rows
        return features.T.contiguous() if transpose else features
    if cols == dim:
        return features
    if rows == dim:
        return features.T.contiguous()
    raise BundleError(
        f"{where}: text features of shape {tuple(features.shape)} have no side of width {dim}, "
        "the image features' width; they must come from the same backbone, one row per class"
    )


# ---------------------------------------------------------------------------------- bundles


def bundle_from_arrays(
    groups: Mapping[str, tuple[ArrayLike, ArrayLike]],
    *,
    text_features: ArrayLike | None = None,
    classnames: list[str] | None = None,
    views: Mapping[str, ArrayLike] | None = None,
    metadata: Mapping[str, str] | None = None,
    sources: Mapping[str, str] | None = None,
    text_layout: str = "CD",
) -> FeatureBundle:
    """A validated :class:`FeatureBundle` from in-memory arrays.

    Args:
        groups: group name (``train``, ``val``, ``test``, ``train_4shot``...) -> (features
            (N, D), labels (N,) indices or (N, C) one-hot).
        text_features: optional (C, D) class text features ((D, C) is accepted when
            unambiguous).
        classnames: optional C names in label order (default ``class_i``).
        views: optional group name -> (V, N, D) augmented views of that group's rows.
        metadata: extra string metadata (``backbone``, ``source``...).
        sources: names for error messages, keyed ``<group>_features`` / ``<group>_labels`` /
            ``text_features`` (default: those keys).
        text_layout: the layout assumed for square text features (``"CD"`` or ``"DC"``).

    Returns:
        The bundle (not yet written; see :func:`write_bundle`).

    Raises:
        BundleError: shapes that disagree, labels out of range, bad values (message names the
            array); ConfigError: a bad group name or class names of the wrong count.
    """
    sources = dict(sources or {})
    if not groups:
        raise ConfigError("no feature groups given; give at least one (e.g. train or test)")
    tensors: dict[str, Tensor] = {}
    widths: dict[str, int] = {}
    for group, (features, labels) in groups.items():
        if not _GROUP_RE.match(group) or group in _RESERVED:
            raise ConfigError(
                f"group name {group!r}: use lower-case words joined by '_' such as train, val, "
                "test or train_4shot"
            )
        f_where = sources.get(f"{group}_features", f"{group}_features")
        l_where = sources.get(f"{group}_labels", f"{group}_labels")
        x = features_tensor(features, f_where)
        y = labels_tensor(labels, l_where)
        if x.shape[0] != y.shape[0]:
            raise BundleError(
                f"{f_where} has {x.shape[0]} rows but {l_where} has {y.shape[0]} labels; "
                "they must describe the same images in the same order"
            )
        tensors[f"{group}_features"], tensors[f"{group}_labels"] = x, y
        widths[f_where] = int(x.shape[1])
    for group, value in (views or {}).items():
        if f"{group}_features" not in tensors:
            raise ConfigError(f"views given for {group!r}, which has no features")
        where = sources.get(f"{group}_features_views", f"{group}_features_views")
        v = features_tensor(value, where, ndim=3)
        rows = tensors[f"{group}_features"].shape
        if v.shape[1:] != rows:
            raise BundleError(
                f"{where}: views must be (V, {rows[0]}, {rows[1]}), got {tuple(v.shape)}"
            )
        tensors[f"{group}_features_views"] = v
    if len(set(widths.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in widths.items())
        raise BundleError(
            f"feature widths differ ({detail}); all features must come from one backbone"
        )
    dim = next(iter(widths.values()))
    top = max(
        int(tensors[k].max()) for k in tensors if k.endswith("_labels") and tensors[k].numel()
    )
    num_classes = None
    if text_features is not None:
        where = sources.get("text_features", "text_features")
        text = text_tensor(
            text_features, where, dim, len(classnames) if classnames else None, text_layout
        )
        tensors["text_features"] = text
        num_classes = int(text.shape[0])
    elif classnames is not None:
        num_classes = len(classnames)
    if num_classes is None:
        num_classes = top + 1
    if top >= num_classes:
        group = next(
            k
            for k in tensors
            if k.endswith("_labels") and tensors[k].numel() and int(tensors[k].max()) == top
        )
        raise BundleError(
            f"{sources.get(group, group)}: label {top} is out of range for {num_classes} classes "
            "(labels are 0 ... C-1, C from the text features or the class names)"
        )
    names = classnames if classnames is not None else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ConfigError(
            f"{sources.get('classnames', 'the class names')} has {len(names)} class names but "
            f"the text features ({sources.get('text_features', 'text_features')}) have "
            f"{num_classes} classes; give one name per class in label order"
        )
    meta = {"classnames": json.dumps(list(names)), "source": "clipadapt import"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    bundle = FeatureBundle(tensors, meta)
    for group in groups:
        bundle.group(group)  # the typed-set checks every method's input goes through
    if bundle.has_text():
        bundle.text()
    return bundle


def write_bundle(bundle: FeatureBundle, out: str | Path) -> FeatureBundle:
    """Write ``bundle`` atomically to ``out`` (``.safetensors``) and read it back validated.

    Raises:
        ConfigError: ``out`` does not end in ``.safetensors``.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must name a .safetensors file, got {out}")
    save_bundle(out, bundle.tensors, bundle.metadata)
    written = load_bundle(out)
    for group in written.groups():
        written.group(group)
    return written


# ---------------------------------------------------------------------------------- importers


def read_tip_adapter_cache(
    cache_dir: str | Path, shots: int | None = None
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, str], int]:
    """The groups of a Tip-Adapter cache folder (see the module docstring for the layout).

    Args:
        cache_dir: the folder (``caches/<dataset>`` in Tip-Adapter's scripts).
        shots: import only ``keys_{shots}shots.pt``; None imports every K present.

    Returns:
        (groups {name: (features (N, D), labels (N,))}, sources {tensor name: file}, C).

    Raises:
        BundleError: no cache, a missing companion file, or malformed tensors (names the file).
    """
    directory = Path(cache_dir)
    if not directory.is_dir():
        raise BundleError(f"{directory}: Tip-Adapter cache folder not found")
    found = {
        int(m.group(1)): directory / m.group(0)
        for m in (_TIP_KEYS.match(p.name) for p in directory.iterdir())
        if m
    }
    if shots is not None:
        if shots not in found:
            have = ", ".join(str(k) for k in sorted(found)) or "none"
            raise BundleError(
                f"{directory}: no keys_{shots}shots.pt (K present: {have}); pass one of them to "
                "--shots or leave it out"
            )
        found = {shots: found[shots]}
    if not found:
        raise BundleError(
            f"{directory}: no Tip-Adapter cache here (expected keys_{{K}}shots.pt and "
            "values_{K}shots.pt, as Tip-Adapter's build_cache_model writes them)"
        )
    groups: dict[str, tuple[Tensor, Tensor]] = {}
    sources: dict[str, str] = {}
    widths = set()
    num_classes = 0
    for k, keys_path in sorted(found.items()):
        values_path = directory / f"values_{k}shots.pt"
        if not values_path.is_file():
            raise BundleError(f"{values_path}: missing (the labels of {keys_path.name})")
        keys = load_tensor_file(keys_path)
        values = load_tensor_file(values_path)
        if values.ndim != 2:
            raise BundleError(
                f"{values_path}: expected one-hot values (N, C), got shape {tuple(values.shape)}"
            )
        if keys.ndim != 2 or keys.shape[1] != values.shape[0]:
            hint = (
                "; it looks like (N, D): Tip-Adapter stores keys as (D, N) (one column per "
                "image), so transpose it or use `clipadapt import arrays`"
                if keys.ndim == 2 and keys.shape[0] == values.shape[0]
                else ""
            )
            raise BundleError(
                f"{keys_path}: expected (D, {values.shape[0]}) keys (one column per row of "
                f"{values_path.name}), got {tuple(keys.shape)}{hint}"
            )
        group = f"train_{k}shot"
        labels = labels_tensor(values, str(values_path))
        groups[group] = (features_tensor(keys.T.contiguous(), str(keys_path)), labels)
        sources[f"{group}_features"] = str(keys_path)
        sources[f"{group}_labels"] = str(values_path)
        widths.add(int(keys.shape[0]))
        num_classes = max(num_classes, int(values.shape[1]))
    for split in ("val", "test"):
        f_path, l_path = directory / f"{split}_f.pt", directory / f"{split}_l.pt"
        if not f_path.is_file() and not l_path.is_file():
            continue
        for path in (f_path, l_path):
            if not path.is_file():
                raise BundleError(f"{path}: missing (the companion of {split}'s other file)")
        features = features_tensor(load_tensor_file(f_path), str(f_path))
        if int(features.shape[1]) not in widths:
            raise BundleError(
                f"{f_path}: feature width {features.shape[1]} differs from the cache keys' "
                f"{sorted(widths)[0]}; all files must come from one backbone"
            )
        groups[split] = (features, labels_tensor(load_tensor_file(l_path), str(l_path)))
        sources[f"{split}_features"], sources[f"{split}_labels"] = str(f_path), str(l_path)
    return groups, sources, num_classes


def import_tip_adapter(
    cache_dir: str | Path,
    out: str | Path,
    *,
    shots: int | None = None,
    text_features: str | Path | None = None,
    classnames: str | Path | list[str] | None = None,
    backbone: str | None = None,
) -> FeatureBundle:
    """Convert a Tip-Adapter cache folder into a feature bundle at ``out``.

    Args:
        cache_dir: the folder with ``keys_{k}shots.pt`` / ``values_{k}shots.pt`` /
            ``{val,test}_{f,l}.pt``.
        out: the bundle to write (``.safetensors``).
        shots: only this K (default: every K present).
        text_features: optional file of the class text features ((D, C) as Tip-Adapter's
            ``clip_classifier`` returns them, or (C, D)): ``.pt`` (weights-only), ``.npy`` or
            ``FILE.npz:KEY``.
        classnames: optional class names (a JSON list or one name per line), label order.
        backbone: optional backbone name recorded in the metadata (the cache does not say).

    Returns:
        The bundle as read back from ``out``.

    Raises:
        BundleError / ConfigError: naming the file and the fix.

    Example:
        >>> import_tip_adapter("caches/dtd", "dtd.safetensors", text_features="w.pt")  # doctest: +SKIP
    """
    groups, sources, num_classes = read_tip_adapter_cache(cache_dir, shots)
    names = read_classnames(classnames) if classnames is not None else None
    if classnames is not None and not isinstance(classnames, list):
        sources["classnames"] = str(classnames)
    text = None
    if text_features is not None:
        text = load_array(text_features)
        sources["text_features"] = str(text_features)
    if names is None and text is None:
        names = [f"class_{i}" for i in range(num_classes)]
    metadata = {
        "source": f"Tip-Adapter cache {Path(cache_dir).name} (train_Kshot rows are its cache "
        "keys: the normalised mean of its augmented views)",
    }
    if backbone:
        metadata["backbone"] = backbone
    bundle = bundle_from_arrays(
        groups,
        text_features=text,
        classnames=names,
        metadata=metadata,
        sources=sources,
        text_layout="DC",
    )
    if bundle.num_classes != num_classes:
        raise BundleError(
            f"{text_features or classnames}: {bundle.num_classes} classes, but the one-hot values "
            f"of the cache have {num_classes} columns; give one text row and one name per class"
        )
    return write_bundle(bundle, out)


def import_arrays(
    out: str | Path,
    *,
    groups: Mapping[str, tuple[str | Path, str | Path]] | None = None,
    npz: str | Path | None = None,
    text_features: str | Path | None = None,
    classnames: str | Path | list[str] | None = None,
    backbone: str | None = None,
) -> FeatureBundle:
    """Convert numpy arrays into a feature bundle at ``out``.

    Args:
        out: the bundle to write (``.safetensors``).
        groups: group name -> (features file, labels file); each file ``.npy`` or
            ``FILE.npz:KEY``.
        npz: an ``.npz`` whose arrays use bundle names: ``<group>_features``,
            ``<group>_labels``, optional ``<group>_features_views``, ``text_features``,
            ``classnames`` (a string array).
        text_features: optional (C, D) class text features file (overrides the npz's).
        classnames: optional class names (list or file; overrides the npz's).
        backbone: optional backbone name recorded in the metadata.

    Returns:
        The bundle as read back from ``out``.

    Raises:
        BundleError / ConfigError: naming the file (and array) and the fix.

    Example:
        >>> import_arrays("b.safetensors", groups={"test": ("x.npy", "y.npy")})  # doctest: +SKIP
    """
    arrays: dict[str, tuple[ArrayLike, ArrayLike]] = {}
    views: dict[str, ArrayLike] = {}
    sources: dict[str, str] = {}
    text: ArrayLike | None = None
    names = read_classnames(classnames) if classnames is not None else None
    if classnames is not None and not isinstance(classnames, list):
        sources["classnames"] = str(classnames)
    if npz is not None:
        npz_arrays, npz_text, npz_names, npz_views = _read_npz(Path(npz), sources)
        arrays.update(npz_arrays)
        views.update(npz_views)
        text = npz_text
        names = names if names is not None else npz_names
    for group, (features, labels) in (groups or {}).items():
        if group in arrays:
            raise ConfigError(f"group {group!r} is given twice (in the .npz and as a file)")
        arrays[group] = (load_array(features), load_array(labels))
        sources[f"{group}_features"], sources[f"{group}_labels"] = str(features), str(labels)
    if text_features is not None:
        text = load_array(text_features)
        sources["text_features"] = str(text_features)
    metadata = {
        "source": "arrays "
        + ", ".join(sorted({Path(s.split(".npz:")[0]).name for s in sources.values()}))
    }
    if backbone:
        metadata["backbone"] = backbone
    bundle = bundle_from_arrays(
        arrays,
        text_features=text,
        classnames=names,
        views=views,
        metadata=metadata,
        sources=sources,
    )
    return write_bundle(bundle, out)


def _read_npz(
    path: Path, sources: dict[str, str]
) -> tuple[dict[str, tuple[Any, Any]], Any, list[str] | None, dict[str, Any]]:
    if not path.is_file():
        raise BundleError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            loaded = {}
            for key in data.files:
                try:
                    loaded[key] = data[key]
                except ValueError:
                    raise BundleError(
                        f"{path}:{key}: holds Python objects (a pickled array), which clipadapt "
                        "never loads; store numbers (and class names as a string array, "
                        "np.array(names, dtype=str))"
                    ) from None
    except (OSError, ValueError) as error:
        raise BundleError(f"{path}: not a readable .npz file ({error})") from None
    found: dict[str, dict[str, Any]] = {}
    text = loaded.pop("text_features", None)
    if text is not None:
        sources["text_features"] = f"{path}:text_features"
    names = None
    if "classnames" in loaded:
        raw = loaded.pop("classnames")
        if raw.ndim != 1 or raw.dtype.kind != "U":
            raise BundleError(
                f"{path}:classnames: must be a 1-D string array (np.array(names, dtype=str))"
            )
        names = [str(n) for n in raw]
    views: dict[str, Any] = {}
    for key, value in loaded.items():
        match = _NPZ_GROUP.match(key)
        if match is None:
            raise BundleError(
                f"{path}: unknown array {key!r}; name arrays <group>_features, <group>_labels, "
                "<group>_features_views, text_features or classnames"
            )
        group, kind = match.group("group"), match.group("kind")
        sources[key] = f"{path}:{key}"
        if kind == "features_views":
            views[group] = value
        else:
            found.setdefault(group, {})[kind] = value
    groups = {}
    for group, parts in found.items():
        for kind in ("features", "labels"):
            if kind not in parts:
                raise BundleError(f"{path}: {group}_{kind} is missing (the group has only one)")
        groups[group] = (parts["features"], parts["labels"])
    return groups, text, names, views
