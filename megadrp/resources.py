"""The files megadrp ships besides its code: the run recipes (`configs/`) and the DeepSpeed
JSONs (`ds_configs/`).

A recipe names its DeepSpeed JSON as `ds_configs/zero3_bf16.json`, and the docs name recipes as
`configs/tiny/prune.yaml`: paths relative to a checkout. From a checkout they are found as they
are; from anywhere else (a `pip install .` used from another directory) a path that does not
exist but names a shipped file resolves to the copy installed with the package (setup.py
installs both folders as `megadrp.configs` and `megadrp.ds_configs`). A path that exists always
wins, so a user's own `configs/x.yaml` is never shadowed.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SHIPPED = ("configs", "ds_configs")


def shipped_dir(kind: str) -> Path:
    """The installed folder of `kind` (configs or ds_configs); a checkout's own where the
    package was installed in editable mode (or not at all)."""
    assert kind in SHIPPED, kind
    try:
        spec = importlib.util.find_spec(f"megadrp.{kind}")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        found = Path(next(iter(spec.submodule_search_locations)))
        if found.is_dir():
            return found
    return Path(__file__).resolve().parents[1] / kind


def resolve(path: str | os.PathLike) -> Path:
    """`path` as given where it exists; else, if it names a shipped file (`configs/...`,
    `ds_configs/...`, with or without a leading `./`), the shipped copy; else `path` (so the
    caller's not-found error names what the user wrote)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    parts = p.parts[1:] if p.parts and p.parts[0] == "." else p.parts
    if len(parts) >= 2 and parts[0] in SHIPPED:
        candidate = shipped_dir(parts[0]).joinpath(*parts[1:])
        if candidate.exists():
            return candidate
    return p


def recipe(name: str) -> Path:
    """A shipped recipe by its path under configs/ (`tiny/prune.yaml`)."""
    return shipped_dir("configs") / name
