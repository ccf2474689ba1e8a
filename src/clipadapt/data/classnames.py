"""Class names from a text file, for feature bundles that have none (``class_0`` ...).

A bundle made elsewhere (the real ImageNet feature files, for example) may carry no
``classnames`` metadata; tables and predictions then show ``class_0`` ... ``class_{C-1}``.
:func:`read_classnames` reads a names file and checks it against the class count, and
:func:`with_classnames` gives a bundle the names.

File format: one class name per line, line ``i`` is class ``i``; surrounding spaces are stripped
and blank lines at the end are ignored. CoOp's ImageNet ``classnames.txt`` (``<wnid> <name>``
per line) is accepted too: when every line starts with a WordNet ID, the ID is dropped.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from clipadapt.exceptions import ConfigError

log = logging.getLogger(__name__)

_WNID_PREFIX = re.compile(r"^n\d{8}\s+(\S.*)$")


def read_classnames(path: str | Path, expected_count: int | None = None) -> list[str]:
    """Read one class name per line.

    Args:
        path: the names file (UTF-8).
        expected_count: the number of classes the names are for (a bundle's C); None skips
            the check.

    Returns:
        The names, in file order.

    Raises:
        ConfigError: the file is missing or unreadable, has an empty line between names, or
            its name count differs from ``expected_count`` (the message names the file and
            both counts).

    Example:
        >>> names = read_classnames("imagenet_classnames.txt", 1000)  # doctest: +SKIP
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"class-name file {path} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the class-name file {path}: {error}") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [i for i, line in enumerate(lines, 1) if not line]
    if blank:
        raise ConfigError(
            f"{path}: line {blank[0]} is empty; the file needs one class name per line "
            "(line i = class i)"
        )
    matches = [_WNID_PREFIX.match(line) for line in lines]
    if lines and all(matches):
        lines = [m.group(1).strip() for m in matches if m is not None]
    if expected_count is not None and len(lines) != expected_count:
        raise ConfigError(
            f"{path} has {len(lines)} class names but {expected_count} are needed (one per "
            "class, line i = class i)"
        )
    repeated = [name for name, n in Counter(lines).items() if n > 1]
    if repeated:
        # ImageNet's CLIP-curated list repeats two names; legal, but worth knowing
        log.warning("%s: repeated class name(s) %s", path, ", ".join(repeated[:5]))
    return lines


def with_classnames(bundle: Any, names: list[str]) -> Any:
    """A copy of ``bundle`` (a :class:`~clipadapt.data.bundle.FeatureBundle`) with ``names``.

    Raises:
        ConfigError: the number of names differs from the bundle's class count.
    """
    from clipadapt.data.bundle import FeatureBundle

    if len(names) != bundle.num_classes:
        raise ConfigError(
            f"{len(names)} class names given but {bundle.where} has {bundle.num_classes} classes"
        )
    metadata = {**bundle.metadata, "classnames": json.dumps(list(names))}
    return FeatureBundle(bundle.tensors, metadata, bundle.path)


#: How a bundle key names the class-name file applied to the bundle (``<bundle>#classnames=<file>``):
#: a sweep's workers load the bundle and apply the names themselves.
CLASSNAMES_KEY = "#classnames="


def named_bundle_key(bundle_path: str | Path, classnames_file: str | Path | None) -> str:
    """The key a sweep loads a bundle by: the file, and the class-name file applied to it."""
    if not classnames_file:
        return str(bundle_path)
    return f"{bundle_path}{CLASSNAMES_KEY}{Path(classnames_file).resolve()}"


def load_named_bundle(key: str | Path) -> Any:
    """Load the bundle a :func:`named_bundle_key` names, with its class names applied.

    Raises:
        ConfigError: the names file's count differs from the bundle's (both named).
        BundleError: the bundle cannot be read.
    """
    from clipadapt.data.bundle import load_bundle

    path, _, names_file = str(key).partition(CLASSNAMES_KEY)
    bundle = load_bundle(path)
    if not names_file:
        return bundle
    return with_classnames(bundle, read_classnames(names_file, bundle.num_classes))
