"""Merge per-domain DATA_DIRs (e.g. from a Slurm array of preprocess.py) into one manifest.

    megadrp merge --out DATA_DIR PART_DIR [PART_DIR ...]

Shards stay where they are; the merged manifest points at them by relative path. All
parts must share one tokenizer (same vocabulary and end-of-document id).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from megadrp.data.manifest import MANIFEST, SPLITS, write_manifest
from megadrp.errors import ManifestError
from megadrp.runtime.files import read_json


def merge(out: Path, parts: list[Path], overwrite: bool = False) -> dict:
    """Every part checked before anything is written; `out`'s manifest is replaced (atomically)
    only with `overwrite`."""
    merged: dict = {"domains": {}}
    if (out / MANIFEST).exists() and not overwrite:
        raise ManifestError(f"--out {out}: already holds {MANIFEST}; pass --overwrite to replace it (its domains' "
                            "shards stay where they are), or choose another --out")
    if out.exists() and not out.is_dir():
        raise ManifestError(f"--out {out}: a file, not a directory")
    for part in parts:
        path = part / MANIFEST
        m = read_json(path, ManifestError, missing="did the preprocessing of this part finish?")
        for key in ("vocab_size", "eod_id", "dtype", "tokenizer_fingerprint"):
            if key in merged and merged[key] != m.get(key):
                first = parts[0] / MANIFEST
                raise ManifestError(f"{path}: {key}={m.get(key)} differs from {first}'s ({merged[key]}); every part "
                                    "must be made with the same tokenizer")
            merged[key] = m.get(key)
        if "tokenizer" not in merged:
            merged["tokenizer"] = part / m["tokenizer"]  # copied once every part has been checked
        rel = Path(os.path.relpath(part.resolve(), out.resolve()))
        for name, d in m["domains"].items():
            if name in merged["domains"]:
                raise ManifestError(f"{path}: domain {name!r} appears in more than one part")
            merged["domains"][name] = {**d, **{s: str(rel / d[s]) for s in SPLITS if d.get(s)}}
    out.mkdir(parents=True, exist_ok=True)
    src = merged["tokenizer"]
    if src.resolve() != (out / "tokenizer").resolve():
        shutil.copytree(src, out / "tokenizer", dirs_exist_ok=True)
    merged["tokenizer"] = "tokenizer"
    write_manifest(out, merged)
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--overwrite", action="store_true", help="replace --out's existing manifest.json")
    ap.add_argument("parts", nargs="+", type=Path)
    args = ap.parse_args(argv)
    try:
        m = merge(args.out, args.parts, args.overwrite)
    except ManifestError as e:
        print(f"merge_manifests: error: {e}", file=sys.stderr)
        return 2
    print(f"merge_manifests: {args.out / MANIFEST} with {len(m['domains'])} domains")
    return 0


if __name__ == "__main__":
    sys.exit(main())
