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


def train(inputs: list[Path], vocab_size: int, out: Path, json_key: str = "text",
          max_sentences: int = 200_000, seed: int = 0) -> Path:
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp:  # same filesystem: renames are atomic
        corpus = Path(tmp) / "corpus.txt"
        n = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for path in inputs:
                for doc in iter_documents(path, json_key=json_key):
                    for line in doc.text.split("\n"):
                        if line.strip():
                            f.write(line + "\n")
                            n += 1
        if n == 0:
            raise SystemExit(f"train_tokenizer: no text found in {', '.join(map(str, inputs))}")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "sp"), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=0.9995,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, seed_sentencepiece_size=100_000,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=os.cpu_count() or 1,
            split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", minloglevel=2,
        )
        stage = Path(tmp) / "hf"
        stage.mkdir()
        (stage / "tokenizer.model").write_bytes((Path(tmp) / "sp.model").read_bytes())
        # from_pretrained converts the SentencePiece model into a fast tokenizer with the
        # same ids; save_pretrained adds tokenizer.json and the config AutoTokenizer needs.
        LlamaTokenizer.from_pretrained(str(stage), local_files_only=True).save_pretrained(str(stage))
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, type=Path)
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--max-sentences", type=int, default=200_000, help="lines sampled for training")
    args = ap.parse_args(argv)
    for p in args.input:
        if not p.is_file():
            ap.error(f"--input {p}: no such file")
    train(args.input, args.vocab_size, args.out, args.json_key, args.max_sentences)
    print(f"train_tokenizer: wrote {args.out} (vocab {args.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
