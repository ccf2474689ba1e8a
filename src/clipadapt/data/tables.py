"""Reference tables shipped as YAML files beside this module (the CoOp dataset table, the prompt
templates). Each module that uses one reads it once, when it is imported."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_table(name: str) -> Any:
    """The parsed contents of the packaged data file ``name`` (e.g. ``"templates.yaml"``)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(Path(__file__).with_name(name).read_text(encoding="utf-8"), Loader=loader)
