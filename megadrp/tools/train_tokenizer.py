"""Train a SentencePiece tokenizer (BPE, byte fallback) and save it as a Hugging Face
tokenizer directory.

    megadrp tokenizer --input FILE [FILE ...] --vocab-size N --out DIR

FILE is .jsonl (the "text" key, see --json-key), .jsonl.gz or .txt (a document a line).
DIR then holds `tokenizer.model` (loads with `sentencepiece`) and the files
`transformers.AutoTokenizer.from_pretrained(DIR)` needs (a Llama tokenizer: <unk>=0,
<s>=1, </s>=2, where </s> is the end-of-document id).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from megadrp.data.corpus_io import iter_documents

MIN_VOCAB = 300  # 256 byte pieces (byte fallback), 3 special tokens and a few merges


class TokenizerToolError(ValueError):
    """A user error of `megadrp tokenizer`: one line, exit 2, nothing left behind."""


def _max_vocab(message: str) -> int | None:
    """SentencePiece's own limit, from its error: 'Vocabulary size is too high (N). Please set it
    to a value <= M.'"""
    import re

    m = re.search(r"<=\s*(\d+)", message)
    return int(m.group(1)) if m else None


def train(inputs: list[Path], vocab_size: int, out: Path, json_key: str = "text",
          max_sentences: int = 200_000, seed: int = 0, overwrite: bool = False, skip_bad: bool = False) -> Path:
    """Train in a hidden sibling of `out` and put the finished directory in its place; on any
    failure the sibling is removed and `out` is as it was."""
    import shutil

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    from megadrp.errors import CorpusError

    if out.exists() and not out.is_dir():
        raise TokenizerToolError(f"--out {out}: a file, not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TokenizerToolError(f"--out {out}: exists and is not empty; pass --overwrite to replace it, or choose "
                                 "another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tokenizer-tmp", dir=out.parent))
    try:
        corpus = stage_root / "corpus.txt"
        n = skipped = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for path in inputs:
                docs = iter_documents(path, json_key=json_key)
                while True:
                    try:
                        doc = next(docs)
                    except StopIteration:
                        break
                    except CorpusError:
                        if not skip_bad:
                            raise
                        skipped += 1
                        continue
                    for line in doc.text.split("\n"):
                        if line.strip():
                            f.write(line + "\n")
                            n += 1
        if n == 0:
            raise TokenizerToolError(f"no text found in {', '.join(map(str, inputs))}")
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(stage_root / "sp"), vocab_size=vocab_size,
                model_type="bpe", byte_fallback=True, character_coverage=0.9995,
                input_sentence_size=max_sentences, shuffle_input_sentence=True, seed_sentencepiece_size=100_000,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=os.cpu_count() or 1,
                split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                normalization_rule_name="identity", minloglevel=2,
            )
        except RuntimeError as e:
            most = _max_vocab(str(e))
            if most is None:
                raise TokenizerToolError(f"SentencePiece refused the corpus: {' '.join(str(e).split())}") from None
            raise TokenizerToolError(
                f"--vocab-size {vocab_size}: this corpus ({n:,} lines) supports at most {most:,} tokens; lower "
                "--vocab-size (a few MB of text supports some thousands; 32,000 needs tens of MB) or add "
                "text") from None
        stage = stage_root / "hf"
        stage.mkdir()
        (stage / "tokenizer.model").write_bytes((stage_root / "sp.model").read_bytes())
        # from_pretrained converts the SentencePiece model into a fast tokenizer with the
        # same ids; save_pretrained adds tokenizer.json and the config AutoTokenizer needs.
        LlamaTokenizer.from_pretrained(str(stage), local_files_only=True).save_pretrained(str(stage))
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{os.getpid()}"
            os.replace(out, old)
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if skipped:
            print(f"train_tokenizer: skipped {skipped} bad line(s) (--skip-bad)", file=sys.stderr)
        return out
    finally:
        shutil.rmtree(stage_root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, type=Path)
    ap.add_argument("--vocab-size", type=int, required=True,
                    help=f"tokens in the vocabulary (at least {MIN_VOCAB}; at most what the corpus supports: the "
                    "error says how many)")
    ap.add_argument("--out", required=True, type=Path, help="tokenizer directory to create")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out (once the new one is complete)")
    ap.add_argument("--skip-bad", action="store_true", help="skip malformed lines instead of stopping")
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--max-sentences", type=int, default=200_000, help="lines sampled for training")
    args = ap.parse_args(argv)
    for p in args.input:
        if not p.is_file():
            ap.error(f"--input {p}: no such file")
    if args.vocab_size < MIN_VOCAB:
        ap.error(f"--vocab-size {args.vocab_size}: at least {MIN_VOCAB} (256 byte pieces, 3 special tokens and merges)")
    if args.max_sentences < 1:
        ap.error(f"--max-sentences {args.max_sentences}: at least 1")
    from megadrp.errors import UserError

    try:
        train(args.input, args.vocab_size, args.out, args.json_key, args.max_sentences, overwrite=args.overwrite,
              skip_bad=args.skip_bad)
    except (TokenizerToolError, UserError, OSError) as e:
        print(f"train_tokenizer: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"train_tokenizer: wrote {args.out} (vocab {args.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
