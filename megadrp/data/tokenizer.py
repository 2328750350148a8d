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
