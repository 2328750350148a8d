"""Domain corpora → Megatron indexed shards (train + eval per domain) + manifest.json.

    python data_tools/preprocess.py --input NAME=PATH [--input NAME=PATH ...] \\
        --tokenizer DIR --out DATA_DIR [--workers N] [--eval-docs N] [--json-key text] \\
        [--overwrite] [--skip-bad] [--seed N]

PATH is a file or a glob of .jsonl / .jsonl.gz / .jsonl.zst / .txt / .parquet files
(--json-key names the JSON key, or the parquet column, that holds the text). Streaming:
the main process reads raw lines (parquet: rows, one row group at a time) and writes shards; N worker processes parse and tokenize chunks in order,
so the output is identical for any N and memory does not grow with the corpus.

Eval hold-out: --eval-docs documents per domain, chosen by a seeded draw over the
domain's non-blank lines and parquet rows (a cheap first pass counts them; parquet
files from their metadata), so the split is deterministic
and not biased toward the start of the corpus.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import multiprocessing as mp  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Iterator  # noqa: E402

import numpy as np  # noqa: E402

from data_tools.corpus_io import (  # noqa: E402
    CorpusError,
    Raw,
    count_records,
    expand_inputs,
    iter_raw_lines,
    kind_of,
    parse_line,
)
from megadrp.data.indexed import IndexedDatasetWriter, dtype_for_vocab  # noqa: E402
from megadrp.data.manifest import MANIFEST, write_manifest  # noqa: E402
from megadrp.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer  # noqa: E402

log = logging.getLogger("megadrp.preprocess")
CHUNK = 256  # lines per worker task: large enough to amortise IPC, small enough to stream


@dataclass
class Chunk:
    path: str
    kind: str
    lines: list[tuple[int, Raw]]  # (line or parquet row, raw record)


_TOK: Tokenizer | None = None
_ARGS: tuple[str, bool, int, type] = ("text", False, 0, np.int32)


def _init_worker(tokenizer_dir: str, json_key: str, skip_bad: bool, eod: int, dtype: type) -> None:
    global _TOK, _ARGS
    _TOK = load_tokenizer(tokenizer_dir)
    _ARGS = (json_key, skip_bad, eod, dtype)


def _encode_chunk(chunk: Chunk) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Parse and tokenize one chunk. Returns the chunk's documents back to back (each with
    its end-of-document id, already in the shard dtype: one buffer to pickle, not one per
    document), their lengths (-1 for a bad line skipped with --skip-bad), and the skip reasons."""
    json_key, skip_bad, eod, dtype = _ARGS
    assert _TOK is not None
    texts: list[str] = []
    lengths = np.full(len(chunk.lines), -1, dtype=np.int64)
    good_rows: list[int] = []
    bad: list[str] = []
    for row, (line, raw) in enumerate(chunk.lines):
        try:
            texts.append(parse_line(chunk.path, line, raw, chunk.kind, json_key))
            good_rows.append(row)
        except CorpusError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
    encoded = _TOK.encode_batch(texts) if texts else []
    flat = np.fromiter((t for ids in encoded for t in (*ids, eod)), dtype=np.int64,
                       count=sum(len(ids) + 1 for ids in encoded))
    if flat.size and int(flat.max()) > np.iinfo(dtype).max:
        raise CorpusError(f"{chunk.path}: token id {int(flat.max())} does not fit the shard dtype "
                          f"{np.dtype(dtype).name}; the tokenizer's vocabulary is larger than it reports")
    for row, ids in zip(good_rows, encoded):
        lengths[row] = len(ids) + 1
    return flat.astype(dtype), lengths, bad


def _chunks(files: list[Path], json_key: str) -> Iterator[Chunk]:
    for path in files:
        kind = kind_of(path)
        buf: list[tuple[int, Raw]] = []
        for item in iter_raw_lines(path, json_key):
            buf.append(item)
            if len(buf) == CHUNK:
                yield Chunk(str(path), kind, buf)
                buf = []
        if buf:
            yield Chunk(str(path), kind, buf)


def _eval_ordinals(name: str, n_docs: int, eval_docs: int, seed: int) -> np.ndarray:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(h)
    return np.sort(rng.choice(n_docs, size=eval_docs, replace=False))


def parse_inputs(specs: list[str]) -> dict[str, list[Path]]:
    domains: dict[str, list[Path]] = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not sep or not name or not pattern:
            raise CorpusError(f"--input {spec!r}: expected NAME=PATH (for example web=data/web/*.jsonl)")
        if name in domains:
            raise CorpusError(f"--input {spec!r}: domain {name!r} given twice")
        domains[name] = expand_inputs(pattern)
    return domains


class _Progress:
    """One progress bar over all domains: documents/s and tokens/s."""

    def __init__(self, total_docs: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_docs, unit="doc", dynamic_ncols=True, mininterval=1.0,
                        disable=None, file=sys.stderr)
        self.t0 = time.time()
        self.tokens = 0

    def update(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(docs)
        self.bar.set_postfix_str(f"{self.tokens / max(time.time() - self.t0, 1e-9):,.0f} tok/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def preprocess(domains: dict[str, list[Path]], tokenizer_dir: Path, out: Path, workers: int = 1,
               eval_docs: int = 100, json_key: str = "text", overwrite: bool = False,
               skip_bad: bool = False, seed: int = 0) -> dict:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass --overwrite to replace its shards")
    tok = load_tokenizer(tokenizer_dir)
    vocab, eod = tok.vocab_size, tok.eod_id
    dtype = dtype_for_vocab(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a half-replaced DATA_DIR must never look complete

    counts = {name: sum(count_records(f, json_key) for f in files) for name, files in domains.items()}
    for name, n in counts.items():
        if n == 0:
            raise CorpusError(f"domain {name!r} ({', '.join(map(str, domains[name]))}): no documents")
        if n <= eval_docs:
            raise CorpusError(f"domain {name!r}: {n} documents, need more than --eval-docs={eval_docs} "
                              "(lower --eval-docs or add data)")

    manifest: dict = {"tokenizer": "tokenizer", "vocab_size": vocab, "eod_id": eod,
                      "dtype": np.dtype(dtype).name, "domains": {}}
    progress = _Progress(sum(counts.values()))
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ctx.Pool(max(1, workers), initializer=_init_worker,
                    initargs=(str(tokenizer_dir), json_key, skip_bad, eod, dtype))
    skipped_total = 0
    try:
        for name, files in domains.items():
            held_out = set(_eval_ordinals(name, counts[name], eval_docs, seed).tolist())
            writers = {s: IndexedDatasetWriter(out / f"{name}_{s}", dtype, vocab) for s in ("train", "eval")}
            stats = {"train_tokens": 0, "eval_tokens": 0, "train_docs": 0, "eval_docs": 0}
            ordinal = skipped = 0
            try:
                for flat, lengths, bad in pool.imap(_encode_chunk, _chunks(files, json_key), chunksize=1):
                    offset = 0
                    for n in lengths.tolist():
                        split = "eval" if ordinal in held_out else "train"
                        ordinal += 1
                        if n < 0:
                            continue
                        writers[split].add_document(flat[offset:offset + n])
                        offset += n
                        stats[f"{split}_tokens"] += n
                        stats[f"{split}_docs"] += 1
                    for msg in bad:
                        log.warning("skipped: %s", msg)
                    skipped += len(bad)
                    progress.update(len(lengths), int(flat.size))
                if stats["train_docs"] == 0 or stats["eval_docs"] == 0:
                    raise CorpusError(f"domain {name!r}: no usable documents left in the "
                                      f"{'train' if stats['train_docs'] == 0 else 'eval'} split after skipping bad lines")
                for w in writers.values():
                    w.finalize()
            except BaseException:
                for w in writers.values():
                    w.abort()
                raise
            skipped_total += skipped
            manifest["domains"][name] = {"train": f"{name}_train", "eval": f"{name}_eval", **stats,
                                         "skipped_docs": skipped, "sources": [str(f) for f in files]}
    finally:
        pool.terminate()
        pool.join()
        progress.close()
    tok_dir = out / "tokenizer"
    if tok_dir.resolve() != Path(tokenizer_dir).resolve():
        staged = out / ".tokenizer.tmp"
        shutil.rmtree(staged, ignore_errors=True)
        tok.hf.save_pretrained(str(staged))
        shutil.rmtree(tok_dir, ignore_errors=True)
        staged.rename(tok_dir)
    manifest["skipped_docs"] = skipped_total
    write_manifest(out, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", action="append", required=True, metavar="NAME=PATH",
                    help="a domain and its file or glob; repeat for every domain")
    ap.add_argument("--tokenizer", required=True, type=Path, help="tokenizer directory (Hugging Face format)")
    ap.add_argument("--out", required=True, type=Path, help="DATA_DIR to create")
    ap.add_argument("--workers", type=int, default=1, help="tokenizer worker processes (default 1)")
    ap.add_argument("--eval-docs", type=int, default=100, help="documents held out per domain (default 100)")
    ap.add_argument("--json-key", default="text",
                    help="JSON key (or parquet column) that holds the text (default 'text')")
    ap.add_argument("--overwrite", action="store_true", help="replace the shards of an existing DATA_DIR")
    ap.add_argument("--skip-bad", action="store_true", help="skip malformed lines, counting them, instead of stopping")
    ap.add_argument("--seed", type=int, default=0, help="seed of the eval hold-out draw")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    if args.eval_docs < 1:
        ap.error("--eval-docs must be at least 1")
    t0 = time.time()
    try:
        domains = parse_inputs(args.input)
        manifest = preprocess(domains, args.tokenizer, args.out, args.workers, args.eval_docs,
                              args.json_key, args.overwrite, args.skip_bad, args.seed)
    except (CorpusError, TokenizerError, FileExistsError, ValueError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    dt = time.time() - t0
    total = sum(d["train_tokens"] + d["eval_tokens"] for d in manifest["domains"].values())
    for name, d in manifest["domains"].items():
        print(f"{name:>14}: train {d['train_docs']:,} docs / {d['train_tokens']:,} tokens, "
              f"eval {d['eval_docs']:,} docs / {d['eval_tokens']:,} tokens"
              + (f", skipped {d['skipped_docs']}" if d["skipped_docs"] else ""))
    print(f"preprocess: wrote {args.out / MANIFEST} ({total:,} tokens, {manifest['dtype']}) in {dt:.1f}s "
          f"({total / max(dt, 1e-9):,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
