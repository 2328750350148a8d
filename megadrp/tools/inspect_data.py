"""Look inside shards: counts, a document-length histogram and a decoded sample.

    megadrp inspect PREFIX_OR_DATA_DIR [--sample N] [--config RUN.yaml]

`--config` shows the run's `domain_groups` over this DATA_DIR: each group's members, their
training tokens and their share of the group's batch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from megadrp.data.indexed import IndexedDataset
from megadrp.data.manifest import MANIFEST, load_manifest
from megadrp.errors import ConfigError, IndexedDatasetError, ManifestError


def _histogram(lengths: np.ndarray, bins: int = 8) -> str:
    if len(lengths) == 0:
        return "  (no documents)"
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, bins + 1)).astype(int))
    counts, edges = np.histogram(lengths, bins=edges if len(edges) > 1 else 1)
    width = max(counts.max(), 1)
    return "\n".join(f"  {int(lo):>7}-{int(hi):<7} {'#' * int(40 * c / width):<40} {c}"
                     for lo, hi, c in zip(edges[:-1], edges[1:], counts))


def describe(prefix: Path, tokenizer=None, sample: int = 1) -> str:
    ds = IndexedDataset(prefix)
    lines = [f"{prefix}: {len(ds):,} documents, {ds.num_tokens:,} tokens, dtype {ds.dtype.name}",
             f"  mean length {ds.lengths.mean() if len(ds) else 0:.1f}, max {ds.lengths.max() if len(ds) else 0}",
             _histogram(ds.lengths)]
    for i in range(min(sample, len(ds))):
        ids = ds[i][:64].tolist()
        text = tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
        lines.append(f"  sample {i}: {text[:300]!r}")
    return "\n".join(lines)


def describe_groups(spec, manifest, domains: list[str] | None = None) -> str:
    """The groups a config's `domain_groups` makes of the run's domains (`domains`, else the
    manifest's), or a line saying every domain is its own group."""
    from megadrp.data.groups import resolve_groups

    names = list(domains or manifest.domains)
    tokens = [manifest.domains[n].train_tokens for n in names]
    g = resolve_groups(spec, names, tokens)
    if not g.grouped:
        return "domain_groups: none (the controller weighs every domain on its own)"
    lines = [f"domain_groups: {len(g.names)} groups over {len(names)} domains"]
    total = g.tokens(tokens)
    for i, name in enumerate(g.names):
        members = [f"{n} {s:.3f}" for n, o, s in zip(names, g.of, g.share) if o == i]
        lines.append(f"  {name:>14}: {int(total[i]):,} train tokens; shares {', '.join(members)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path)
    ap.add_argument("--sample", type=int, default=1)
    ap.add_argument("--config", type=Path, default=None, help="a run config: also show its domain_groups")
    args = ap.parse_args(argv)
    try:
        if (args.path / MANIFEST).is_file():
            m = load_manifest(args.path)
            from megadrp.data.tokenizer import load_tokenizer

            tok = load_tokenizer(m.tokenizer) if m.tokenizer.is_dir() else None
            print(f"{args.path}: {len(m.domains)} domains, vocab {m.vocab_size}, eod {m.eod_id}, {m.dtype}")
            total = 0
            for d in m.domains.values():
                splits = [("train", d.train_docs, d.train_tokens), ("eval", d.eval_docs, d.eval_tokens)]
                if d.test is not None:
                    splits.append(("test", d.test_docs, d.test_tokens))
                print(f"  {d.name:>14}: " + ", ".join(f"{s} {n:,} docs / {t:,} tokens" for s, n, t in splits))
                total += sum(t for _, _, t in splits)
            print("  splits: train, eval (what runs evaluate and steer by)"
                  + (", test (what results are reported on; no run opens it)" if m.has_test else
                     "; no test split (`megadrp preprocess --test-docs N` makes one)"))
            print(f"  total {total:,} tokens")
            if args.config is not None:
                from megadrp.config import load_config

                cfg = load_config(args.config)
                print(describe_groups(cfg.domain_groups, m, cfg.domains))
            for d in m.domains.values():
                print(describe(d.train, tok, args.sample))
        else:
            tok = None
            manifest_dir = args.path.parent
            if (manifest_dir / MANIFEST).is_file():
                from megadrp.data.tokenizer import load_tokenizer

                tok = load_tokenizer(load_manifest(manifest_dir).tokenizer)
            print(describe(args.path, tok, args.sample))
    except (IndexedDatasetError, ManifestError, ConfigError) as e:
        print(f"inspect: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
