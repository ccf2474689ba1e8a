"""Prompts: hand-crafted templates, template ensembles, CuPL description files, negative prompts.

A *template* is a string with exactly one ``{}`` placeholder for the class name. Class names are
formatted with ``_`` replaced by a space, as every reference implementation does (baselines
spec §1.1).

The templates are data (``templates.yaml`` beside this module), read once on import.

Template ensembles (spec §1.6):

* ``single``: the dataset's hand-crafted CoOp prompt (``a photo of a {}.`` without a dataset);
* ``imagenet7``: the 7 templates of Tip-Adapter / CoOp's ``IMAGENET_TEMPLATES_SELECT``
  (= open_clip's ``SIMPLE_IMAGENET_TEMPLATES``), in that order;
* ``imagenet80``: OpenAI's 80 ImageNet templates, taken from ``open_clip.zero_shot_metadata``;
* names join with ``+``: ``imagenet7+single`` is the 8-prompt text base of TaskRes and CLAP.

Description files are CuPL-style JSON objects ``{classname: [sentence, ...]}``. They are matched
to a dataset's class names by normalised name (case, ``_`` and whitespace ignored) or, with
``match="position"``, by key order. ImageNet's CLIP-curated class list has duplicate names
(``missile`` twice, ``sunglasses`` twice) while the CuPL file spells them ``projectile`` and
``sunglass``, so ImageNet needs ``match="position"``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from clipadapt.data.tables import read_table
from clipadapt.exceptions import ConfigError, DatasetError

if TYPE_CHECKING:
    from clipadapt.data.datasets import ImageDataset

_TABLE = read_table("templates.yaml")

GENERIC_TEMPLATE: str = _TABLE["generic"]

#: CoOp's hand-crafted prompt of each dataset (baselines spec §1.1), by dataset key
#: (``templates.yaml``).
TEMPLATES: dict[str, str] = dict(_TABLE["datasets"])

#: Tip-Adapter's / CoOp's 7 ImageNet templates, in the order of spec §1.6 (``templates.yaml``).
IMAGENET_7_TEMPLATES: tuple[str, ...] = tuple(_TABLE["imagenet7"])

# open_clip stores its templates as one-argument callables; calling them with "{}" turns them
# back into format strings without copying the list.
ENSEMBLES: dict[str, list[str]] = {
    "single": [GENERIC_TEMPLATE],
    "imagenet7": list(IMAGENET_7_TEMPLATES),
    "imagenet80": [template("{}") for template in OPENAI_IMAGENET_TEMPLATES],
}

DEFAULT_NEGATIVE_TEMPLATE: str = _TABLE["negative"]

_PLACEHOLDER = re.compile(r"\{\}")


def check_template(template: object, where: str = "template") -> str:
    """Return ``template`` if it is a string with exactly one ``{}`` and no other braces.

    Raises:
        ConfigError: otherwise; the message shows the template and the expected form.
    """
    if not isinstance(template, str):
        raise ConfigError(f"{where}: a template must be a string, got {type(template).__name__}")
    stripped = _PLACEHOLDER.sub("", template)
    if len(_PLACEHOLDER.findall(template)) != 1 or "{" in stripped or "}" in stripped:
        raise ConfigError(
            f"{where}: template {template!r} must contain exactly one '{{}}' for the class name "
            "and no other braces, e.g. 'a photo of a {}.'"
        )
    return template


def _read_template_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read template file {path}: {error}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"{path}: not valid JSON ({error}); expected a list of templates"
            ) from None
        if not isinstance(data, list):
            raise ConfigError(
                f"{path}: expected a JSON list of templates like ['a photo of a {{}}.']"
            )
        return [check_template(t, f"{path}[{i}]") for i, t in enumerate(data)]
    lines = [line.strip() for line in text.splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    return [check_template(t, str(path)) for t in templates]


def _resolve_name(name: str, dataset: ImageDataset | None) -> list[str] | None:
    key = name.strip().lower().replace("-", "_")
    if key in ("single", "hand_crafted", "handcrafted"):
        return [dataset.template] if dataset is not None else [GENERIC_TEMPLATE]
    if key in ("dataset", "default"):
        return list(dataset.templates) if dataset is not None else [GENERIC_TEMPLATE]
    if key in ENSEMBLES:
        return list(ENSEMBLES[key])
    if key in TEMPLATES:
        return [TEMPLATES[key]]
    return None


def resolve_templates(
    spec: str | Sequence[str] | None, dataset: ImageDataset | None = None
) -> list[str]:
    """Turn a user's template choice into a list of templates.

    Args:
        spec: one of
            * None: the dataset's templates (``dataset.templates``), or the generic
              ``a photo of a {}.`` without a dataset;
            * an ensemble name: ``single`` (the dataset's hand-crafted prompt), ``dataset``
              (the dataset's own list), ``imagenet7``, ``imagenet80``, or a dataset key such as
              ``dtd`` for that dataset's CoOp prompt; names can be joined with ``+``
              (``imagenet7+single``);
            * a literal template containing ``{}``;
            * a path to a ``.txt`` (one template per line, ``#`` comments) or ``.json`` list;
            * a list of templates.
        dataset: the dataset the prompts are for.

    Returns:
        A non-empty list of validated templates, duplicates removed (first kept).

    Raises:
        ConfigError: unknown name, missing file, or a template without exactly one ``{}``.

    Example:
        >>> resolve_templates("imagenet7+single")[-1]
        'a photo of a {}.'
    """
    if spec is None:
        templates = _resolve_name("dataset", dataset) or []
    elif isinstance(spec, str):
        if "{}" in spec:
            templates = [check_template(spec)]
        elif spec.lower().endswith((".txt", ".json")) or "/" in spec or "\\" in spec:
            if not Path(spec).is_file():
                raise ConfigError(f"template file {spec} does not exist")
            templates = _read_template_file(Path(spec))
        else:
            templates = []
            for part in spec.split("+"):
                found = _resolve_name(part, dataset)
                if found is None:
                    known = sorted({"single", "dataset", *ENSEMBLES, *TEMPLATES})
                    raise ConfigError(
                        f"unknown template set {part!r}; use one of {', '.join(known)}, a "
                        "template containing '{}', or a .txt/.json file of templates"
                    )
                templates.extend(found)
    else:
        templates = [check_template(t, f"templates[{i}]") for i, t in enumerate(spec)]
    templates = [check_template(t) for t in dict.fromkeys(templates)]
    if not templates:
        raise ConfigError(
            "the template list is empty; give at least one template like 'a photo of a {}.'"
        )
    return templates


def format_prompt(template: str, classname: str) -> str:
    """Fill ``template`` with ``classname``, underscores replaced by spaces.

    Example:
        >>> format_prompt("a photo of a {}, a type of pet.", "american_bulldog")
        'a photo of a american bulldog, a type of pet.'
    """
    return template.format(classname.replace("_", " "))


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """All prompts as a (C, T) nested list: ``out[c][t] = format_prompt(templates[t], c_name)``."""
    checked = [check_template(t) for t in templates]
    return [[format_prompt(t, name) for t in checked] for name in classnames]


def negative_prompts(
    classnames: Sequence[str], template: str = DEFAULT_NEGATIVE_TEMPLATE
) -> list[str]:
    """One negative prompt per class (default ``a photo of no {}.``), as a length-C list."""
    template = check_template(template, "negative template")
    return [format_prompt(template, name) for name in classnames]


def negate_description(sentence: str, classname: str) -> str:
    """The negated form of one class description (HeGraphAdapter's negative text, spec §2.1).

    The first " of a "/" of an " becomes " of no ", else the first " of " becomes " of no "; a
    sentence with neither gets the negative prompt in front: "a photo of no {class}, {sentence}".

    Example:
        >>> negate_description("a photo of a velk, which looks like a diamond.", "velk")
        'a photo of no velk, which looks like a diamond.'
        >>> negate_description("a velk is always purple.", "velk")
        'a photo of no velk, a velk is always purple.'
    """
    for pattern in (" of a ", " of an ", " of "):
        if pattern in sentence:
            return sentence.replace(pattern, " of no ", 1)
    return f"a photo of no {classname.replace('_', ' ')}, {sentence}"


def negative_descriptions(
    descriptions: Sequence[Sequence[str]], classnames: Sequence[str]
) -> list[list[str]]:
    """Every class's descriptions negated with :func:`negate_description` (same shape)."""
    return [
        [negate_description(s, name) for s in sentences]
        for sentences, name in zip(descriptions, classnames, strict=True)
    ]


def normalize_classname(name: str) -> str:
    """The key descriptions are matched on: lower case, '_' as space, whitespace collapsed."""
    return " ".join(name.replace("_", " ").lower().split())


def _read_descriptions(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise DatasetError(f"description file {path} does not exist; pass a CuPL-style JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read description file {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{path}: not valid JSON ({error}); expected {{classname: [sentence, ...]}}"
        ) from None
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: expected a JSON object {{classname: [sentence, ...]}}, "
            f"got {type(data).__name__}"
        )
    out: dict[str, list[str]] = {}
    for key, value in data.items():
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DatasetError(f"{path}: the entry for {key!r} must be a list of strings")
        out[key] = [v.strip() for v in value if v.strip()]
    return out


def _listing(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_descriptions(
    path: str | Path,
    classnames: Sequence[str],
    match: Literal["name", "position"] = "name",
) -> list[list[str]]:
    """Read a CuPL-style description file and order it like ``classnames``.

    Args:
        path: JSON ``{classname: [sentence, ...]}`` (a single string counts as a one-item list).
        classnames: the dataset's C class names, in label order.
        match: ``"name"`` matches keys to class names after :func:`normalize_classname`;
            ``"position"`` takes the i-th key for class i (needed for ImageNet, whose
            CLIP-curated names contain duplicates and differ from CuPL's spelling).

    Returns:
        A length-C list; entry c holds class c's descriptions (at least one, stripped).

    Raises:
        DatasetError: unreadable or malformed file; with ``match="name"``: a key naming no
            class of the dataset, a class without descriptions, or duplicate names; with
            ``match="position"``: a different number of keys and classes; for both: a class
            whose list is empty.
    """
    path = Path(path)
    data = _read_descriptions(path)
    if match == "position":
        if len(data) != len(classnames):
            raise DatasetError(
                f"{path}: {len(data)} classes in the file but {len(classnames)} in the dataset; "
                "position matching needs one entry per class, in label order"
            )
        result = list(data.values())
        keys = list(data)
    elif match == "name":
        hint = (
            " (the counts agree: if the file lists the classes in label order, "
            'pass match="position")'
            if len(data) == len(classnames)
            else ""
        )
        by_name: dict[str, str] = {}
        for key in data:
            norm = normalize_classname(key)
            if norm in by_name:
                raise DatasetError(
                    f"{path}: keys {by_name[norm]!r} and {key!r} are the same class name after "
                    f"normalisation{hint}"
                )
            by_name[norm] = key
        normed = [normalize_classname(c) for c in classnames]
        seen: dict[str, int] = {}
        dupes = []
        for name in normed:
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == 2:
                dupes.append(name)
        if dupes:
            raise DatasetError(
                f"the dataset has duplicate class names ({_listing(dupes)}), so {path} cannot be "
                f"matched by name{hint}"
            )
        unknown = [key for norm, key in by_name.items() if norm not in seen]
        lacking = [c for c, norm in zip(classnames, normed, strict=True) if norm not in by_name]
        if unknown or lacking:
            parts = []
            if unknown:
                parts.append(f"{len(unknown)} class(es) the dataset lacks: {_listing(unknown)}")
            if lacking:
                parts.append(f"{len(lacking)} class(es) without descriptions: {_listing(lacking)}")
            raise DatasetError(
                f"{path} does not match the dataset's class names: {'; '.join(parts)}. Fix the "
                f"keys (matching ignores case, '_' and spacing){hint}"
            )
        keys = [by_name[norm] for norm in normed]
        result = [data[key] for key in keys]
    else:
        raise ConfigError(f'match must be "name" or "position", got {match!r}')
    empty = [key for key, sentences in zip(keys, result, strict=True) if not sentences]
    if empty:
        raise DatasetError(
            f"{path}: {len(empty)} class(es) have an empty description list ({_listing(empty)}); "
            "add at least one sentence each"
        )
    return result
