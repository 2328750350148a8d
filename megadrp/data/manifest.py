"""DATA_DIR/manifest.json: what preprocessing produced, read by every later stage.

Each domain has a train split (what batches draw), an eval split (what a run evaluates and its
domain schedule steers by) and, where `megadrp preprocess --test-docs` made one, a test split:
what results are reported on. No training run opens the test split; only `megadrp eval`
(tools/) does, so a reported number was never feedback to the schedule that produced it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megadrp.errors import ManifestError
from megadrp.runtime.files import atomic_write_text, read_json

MANIFEST = "manifest.json"
SPLITS = ("train", "eval", "test")


@dataclass(frozen=True)
class DomainShards:
    name: str
    train: Path  # absolute prefix (no .bin/.idx)
    eval: Path
    train_tokens: int
    eval_tokens: int
    train_docs: int
    eval_docs: int
    max_token_id: int | None = None  # largest id in any split (None: a manifest from before it was recorded)
    test: Path | None = None  # None: a DATA_DIR made without --test-docs
    test_tokens: int = 0
    test_docs: int = 0

    def split(self, name: str) -> Path:
        """The prefix of split `name`; the test split only where the DATA_DIR has one."""
        if name not in SPLITS:
            raise ValueError(f"split {name!r}: choose from {', '.join(SPLITS)}")
        prefix = getattr(self, name)
        if prefix is None:
            raise ManifestError(f"domain {self.name!r} has no {name} split; make the DATA_DIR with "
                                f"`megadrp preprocess --{name}-docs N`")
        return prefix


@dataclass(frozen=True)
class Manifest:
    data_dir: Path
    tokenizer: Path
    vocab_size: int
    eod_id: int
    dtype: str
    domains: dict[str, DomainShards]
    tokenizer_fingerprint: str | None = None  # data/tokenizer.fingerprint; None: made by an older megadrp

    def check_tokenizer(self, other: str, other_fingerprint: str | None, escape: str) -> None:
        """Refuse `other` (a model, an export, another DATA_DIR) made with another tokenizer than
        this data (exit 2 naming both); warn where either side has no fingerprint to compare."""
        from megadrp.data.tokenizer import check_same

        note = check_same(f"DATA_DIR {self.data_dir}", self.tokenizer_fingerprint, other, other_fingerprint, escape)
        if note and other_fingerprint is not None:  # a model without tokenizer files has nothing to compare: quiet
            import logging

            logging.getLogger("megadrp").warning("%s", note)

    def select(self, names: list[str] | None) -> list[DomainShards]:
        """The domains a run uses, in the run's order; unknown names are an error."""
        if not names:
            return list(self.domains.values())
        missing = [n for n in names if n not in self.domains]
        if missing:
            raise ManifestError(f"{self.data_dir / MANIFEST}: no domain {', '.join(map(repr, missing))}; "
                                f"it has {', '.join(self.domains)}")
        return [self.domains[n] for n in names]

    @property
    def has_test(self) -> bool:
        """Every domain has a test split (`megadrp preprocess --test-docs`)."""
        return all(d.test is not None for d in self.domains.values())

    def check_vocab(self, model_vocab: int, names: list[str] | None = None) -> None:
        """Refuse, before any compute, data whose recorded token ids reach past the model's
        embedding (an IndexError on CPU, a device-side assert on GPU, deep in a step). Shards
        without a recorded maximum are checked window by window as they are read."""
        over = [f"{d.name} (max id {d.max_token_id})" for d in self.select(names)
                if d.max_token_id is not None and d.max_token_id >= model_vocab]
        if over:
            raise ManifestError(f"{self.data_dir / MANIFEST}: token ids of {', '.join(over)} reach past the model's "
                                f"vocab_size {model_vocab}; the data was made with another tokenizer: re-run "
                                "`megadrp preprocess` with the model's tokenizer")


def write_manifest(data_dir: Path, content: dict[str, Any]) -> Path:
    return atomic_write_text(data_dir / MANIFEST, json.dumps(content, indent=2) + "\n")


def load_manifest(data_dir: str | os.PathLike) -> Manifest:
    d = Path(data_dir)
    path = d / MANIFEST
    raw = read_json(path, ManifestError, missing="create DATA_DIR with `megadrp preprocess`")
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: the top level must be a JSON object")
    for key, typ in (("tokenizer", str), ("vocab_size", int), ("eod_id", int), ("dtype", str), ("domains", dict)):
        if not isinstance(raw.get(key), typ):
            raise ManifestError(f"{path}: key {key!r} missing or not a {typ.__name__}")
    if not raw["domains"]:
        raise ManifestError(f"{path}: no domains")
    domains = {}
    for name, v in raw["domains"].items():
        try:
            domains[name] = DomainShards(
                name=name, train=d / v["train"], eval=d / v["eval"],
                train_tokens=int(v["train_tokens"]), eval_tokens=int(v["eval_tokens"]),
                train_docs=int(v["train_docs"]), eval_docs=int(v["eval_docs"]),
                max_token_id=None if v.get("max_token_id") is None else int(v["max_token_id"]),
                test=d / v["test"] if v.get("test") else None,
                test_tokens=int(v.get("test_tokens", 0)), test_docs=int(v.get("test_docs", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{path}: domain {name!r} entry is incomplete ({e!r})") from e
    tok = Path(raw["tokenizer"])
    fp = raw.get("tokenizer_fingerprint")
    return Manifest(d, tok if tok.is_absolute() else d / tok, raw["vocab_size"], raw["eod_id"], raw["dtype"], domains,
                    fp if isinstance(fp, str) else None)
