"""What a pipeline stage was made from: a stamp beside every stage the demo and the benchmarks
build (`STAGE/pipeline.json`, `DATA_DIR/pipeline.json`), so a finished stage is reused only when
everything it was made from is the same, and a stage made from other inputs is rebuilt (the
demo) or refused (a benchmark reading another command's runs), never silently reused.

A stamp holds the stage's resolved config (the YAML with every override applied: steps, mode,
seed, data and model paths), the DeepSpeed config's content, the rank count, and the stamps of
the directories it read (DATA_DIR, model.init, a reference or teacher model). Those nest: a
rebuilt DATA_DIR changes the base model's stamp, which changes the prune stage's, and so on down
the chain. A directory no pipeline made (a user's model) is stamped by its files' names and
sizes and its config.json."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from megadrp.runtime.files import atomic_write_text

STAMP = "pipeline.json"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def dir_identity(path: Path) -> str:
    """A short identity of a directory a stage reads: the stamp of the pipeline stage it belongs
    to (a stage's `hf/` or a DATA_DIR), else its files' names and sizes and its config.json."""
    for stamp in (path / STAMP, path.parent / STAMP if path.name == "hf" else None):
        if stamp is not None and stamp.is_file():
            return _sha(stamp.read_bytes())
    files = sorted((p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*") if p.is_file())
    config = path / "config.json"
    return _sha(json.dumps([files, _sha(config.read_bytes()) if config.is_file() else None]).encode())


def files_identity(files: list[Path]) -> list[list]:
    """A corpus's identity: each file's name, size and modification time (a user's corpus that
    changed in place is a new corpus)."""
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(files)]


def stage_stamp(config: str, overrides: list[str], ranks: int) -> dict[str, Any]:
    """The stamp of a training stage before it runs: its resolved config (paths that name
    directories replaced by their identities' keys below), the DeepSpeed config and the inputs."""
    from megadrp.config import load_config, to_dict
    from megadrp.resources import resolve

    cfg = to_dict(load_config(config, overrides))
    for key in ("run_dir", "resume", "overwrite"):
        cfg.pop(key, None)
    inputs = {}
    for key, value in (("data_dir", cfg.get("data_dir")), ("model.init", cfg.get("model", {}).get("init")),
                       ("distill.teacher", cfg.get("distill", {}).get("teacher")),
                       ("dro.reference_loss", _model_ref(cfg.get("dro", {}).get("reference_loss")))):
        if isinstance(value, str) and Path(value).is_dir():
            inputs[key] = dir_identity(Path(value))
    ds = resolve(cfg["deepspeed"]) if cfg.get("deepspeed") else None
    return {"config": cfg, "deepspeed": _sha(ds.read_bytes()) if ds is not None and ds.is_file() else None,
            "ranks": ranks, "inputs": inputs}


def _model_ref(ref: Any) -> str | None:
    return ref[len("model:"):] if isinstance(ref, str) and ref.startswith("model:") else None


def read(stage: Path) -> dict | None:
    try:
        return json.loads((stage / STAMP).read_text())
    except (OSError, ValueError):
        return None


def write(stage: Path, stamp: dict) -> None:
    atomic_write_text(stage / STAMP, json.dumps(stamp, indent=1, sort_keys=True) + "\n")


def difference(old: dict | None, new: dict) -> str | None:
    """None when `old` is `new`; else a short phrase naming the first thing that differs (dotted
    config keys with both values)."""
    if old is None:
        return "no record of what it was made from (made before stamps, or interrupted)"
    if old == new:
        return None
    diffs: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        elif a != b:
            diffs.append(f"{key}: {a!r} then, {b!r} now" if key.startswith("config.") or key == "ranks"
                         else f"{key} differs")

    walk(old, new, "")
    shown = [d.removeprefix("config.") for d in diffs[:3]]
    return "; ".join(shown) + (f"; {len(diffs) - 3} more" if len(diffs) > 3 else "")
