"""One way to load a tokenizer for every tool: any Hugging Face tokenizer directory on disk.

`megadrp tokenizer` writes directories that this loads too, so preprocessing,
export and evaluation all agree on token ids and on the end-of-document id.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megadrp.errors import TokenizerError


@dataclass
class Tokenizer:
    """A thin adapter: batch encoding without special tokens, plus the ids we need."""

    hf: Any
    path: str

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eod_id(self) -> int:
        eos = self.hf.eos_token_id
        if eos is None:
            raise TokenizerError(f"{self.path}: tokenizer has no eos token; megadrp needs one as the end-of-document id")
        return int(eos)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    p = Path(path)
    if not p.is_dir():
        raise TokenizerError(f"{p}: tokenizer directory not found; pass a directory written by "
                             "`megadrp tokenizer` or a Hugging Face tokenizer saved on disk")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # transformers raises many types here; all mean "not a tokenizer dir"
        raise TokenizerError(f"{p}: cannot load a tokenizer from this directory ({type(e).__name__}: {e})") from e
    return Tokenizer(hf=hf, path=str(p))


def fingerprint(hf) -> str:
    """What makes two tokenizers the same for training and evaluation: every token and its id,
    and the special ids (beginning, end of document, padding, unknown). Two tokenizers of one
    vocabulary size (Llama-2's and Mistral's: 32,000 tokens, end-of-document id 2) differ here."""
    import hashlib
    import json

    special = {k: getattr(hf, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}
    blob = json.dumps([sorted(hf.get_vocab().items(), key=lambda kv: kv[1]), special], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_FINGERPRINTS: dict[tuple, str | None] = {}


def fingerprint_of(path: str | os.PathLike) -> str | None:
    """The fingerprint of the tokenizer in a directory (a DATA_DIR's `tokenizer/`, a model's or an
    export's own files), None where the directory has no tokenizer files. Cached per directory
    and its files' times."""
    from megadrp.model.hf_io import tokenizer_files

    p = Path(path)
    files = tokenizer_files(p) if p.is_dir() else []
    if not files:
        return None
    key = (str(p.resolve()), tuple(sorted((str(f), Path(p, f).stat().st_mtime_ns) for f in files)))
    if key not in _FINGERPRINTS:
        # the tokenizer files alone: in a model directory transformers picks the tokenizer class
        # by config.json's model_type over tokenizer_config.json's (a Qwen2 export of a Llama
        # tokenizer would load as Qwen2's, with a padding token added), which is not the
        # tokenizer the files describe or the data was made with
        import tempfile

        with tempfile.TemporaryDirectory(prefix="megadrp-tok-") as tmp:
            for f in files:
                os.symlink(Path(p, f).resolve(), Path(tmp, Path(f).name))
            _FINGERPRINTS[key] = fingerprint(load_tokenizer(tmp).hf)
    return _FINGERPRINTS[key]


def check_same(a: str, fa: str | None, b: str, fb: str | None, escape: str) -> str | None:
    """Refuse (TokenizerError naming both sides and `escape`) two tokenizers that differ; a note
    (returned, for a warning) where one side has no fingerprint to compare; None where they match."""
    if fa is None or fb is None:
        missing = a if fa is None else b
        return (f"{missing} records no tokenizer fingerprint (made by an older megadrp, or without tokenizer "
                f"files): cannot check that it matches {b if fa is None else a}")
    if fa != fb:
        raise TokenizerError(f"{a} and {b} were made with different tokenizers (fingerprints {fa} and {fb}: another "
                             f"vocabulary or other special ids, whatever their sizes); token ids would mean different "
                             f"text. Use the same tokenizer on both sides, or {escape} if you know they agree")
    return None
