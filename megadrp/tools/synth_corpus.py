"""The embedded default corpus: six synthetic domains that differ in kind and difficulty.

No download is possible on the machines megadrp is tested on, yet DRPruning only shows its
effect when domains differ in how hard (and how learnable) they are. Each generator below
is a small stochastic grammar; docs/corpus.md records the design and the measured losses.

    megadrp synth-corpus --out DIR [--seed N] [--docs-per-domain N] [--variants N]

writes DIR/<domain>.jsonl, one {"text": ...} per line. Deterministic for a seed.

`--variants N` (N ≥ 2) writes N fine domains per generator, `<domain>_v1` … `<domain>_vN`: the same
grammar drawn with another seed, so each has its own lexicon, identifiers and parameters (words of
`prose_v1` are not those of `prose_v2`) — fine domains that group naturally by generator, for the
coarse-vs-fine study (`benchmarks/granularity.py`, `domain_groups`).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable

from megadrp.runtime.files import atomic_open

_CONS = "bcdfghjklmnprstvwz"
_VOW = "aeiou"
_GREEK_CONS = "βγδζθκλμνξπρστφχψ"
_GREEK_VOW = "αεηιουω"


def _lexicon(rng: random.Random, n: int, cons: str, vow: str, syl: tuple[int, int]) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        k = rng.randint(*syl)
        words.add("".join(rng.choice(cons) + rng.choice(vow) for _ in range(k)))
    return sorted(words)


def _zipf_cum(n: int, s: float = 1.1) -> list[float]:
    w = [1.0 / (i + 1) ** s for i in range(n)]
    tot = sum(w)
    acc, out = 0.0, []
    for x in w:
        acc += x / tot
        out.append(acc)
    return out


class _Zipf:
    """Draws from a word list with Zipfian frequencies (natural-language-like)."""

    def __init__(self, rng: random.Random, words: list[str], s: float = 1.1) -> None:
        self.rng, self.words, self.cum = rng, words, _zipf_cum(len(words), s)

    def __call__(self) -> str:
        return self.rng.choices(self.words, cum_weights=self.cum, k=1)[0]


def _doc_len(rng: random.Random, mean: float) -> int:
    """Lognormal lengths: many short documents, a few long ones."""
    return max(1, int(rng.lognormvariate(math.log(mean), 0.6)))


def gen_prose(rng: random.Random) -> Callable[[], str]:
    """English-like prose from a phrase grammar over a 6000-word Zipfian lexicon; agreement
    between subject and verb makes part of it predictable, the lexicon keeps entropy high."""
    nouns = _Zipf(rng, _lexicon(rng, 3000, _CONS, _VOW, (1, 3)))
    verbs = _Zipf(rng, _lexicon(rng, 1500, _CONS, _VOW, (1, 3)))
    adjs = _Zipf(rng, _lexicon(rng, 1500, _CONS, _VOW, (2, 3)))
    dets_sg, dets_pl = ["the", "a", "this", "every"], ["the", "some", "these", "many"]
    preps = ["in", "on", "with", "under", "near", "for", "from"]

    def np_(plural: bool) -> str:
        det = rng.choice(dets_pl if plural else dets_sg)
        adj = f"{adjs()} " if rng.random() < 0.4 else ""
        return f"{det} {adj}{nouns()}{'s' if plural else ''}"

    def sentence() -> str:
        pl = rng.random() < 0.4
        s = f"{np_(pl)} {verbs()}{'' if pl else 's'} {np_(rng.random() < 0.4)}"
        if rng.random() < 0.5:
            s += f" {rng.choice(preps)} {np_(rng.random() < 0.4)}"
        if rng.random() < 0.2:
            s += f" and {np_(rng.random() < 0.5)}"
        return s[0].upper() + s[1:] + "."

    def doc() -> str:
        n = _doc_len(rng, 14)
        paras = []
        while n > 0:
            k = min(n, rng.randint(3, 7))
            paras.append(" ".join(sentence() for _ in range(k)))
            n -= k
        return "\n\n".join(paras)

    return doc


def gen_code(rng: random.Random) -> Callable[[], str]:
    """Python-like code: nested blocks, indentation, and names that must be recalled from
    earlier in the document (long-range references)."""
    idents = _lexicon(rng, 400, _CONS, _VOW, (1, 3))
    ops = ["+", "-", "*", "//", "%"]

    def expr(scope: list[str]) -> str:
        a = rng.choice(scope)
        if rng.random() < 0.5:
            return f"{a} {rng.choice(ops)} {rng.choice(scope) if rng.random() < 0.6 else rng.randint(1, 99)}"
        return f"{rng.choice(idents)}({a})" if rng.random() < 0.3 else a

    def block(scope: list[str], depth: int, lines: list[str], budget: list[int]) -> None:
        ind = "    " * depth
        for _ in range(rng.randint(1, 4)):
            if budget[0] <= 0:
                break
            budget[0] -= 1
            r = rng.random()
            if r < 0.35 or depth >= 4:
                v = rng.choice(idents)
                lines.append(f"{ind}{v} = {expr(scope)}")
                scope.append(v)
            elif r < 0.6:
                lines.append(f"{ind}if {rng.choice(scope)} > {rng.randint(0, 50)}:")
                block(list(scope), depth + 1, lines, budget)
            elif r < 0.8:
                it = rng.choice("ijk")
                lines.append(f"{ind}for {it} in range({rng.choice(scope)}):")
                block(scope + [it], depth + 1, lines, budget)
            else:
                lines.append(f"{ind}{rng.choice(scope)} += {expr(scope)}")
        lines.append(f"{ind}return {expr(scope)}" if depth == 1 else f"{ind}pass")

    def doc() -> str:
        out = []
        for _ in range(max(1, _doc_len(rng, 3))):
            name = rng.choice(idents)
            args = rng.sample(idents, rng.randint(1, 3))
            lines = [f"def {name}({', '.join(args)}):"]
            block(list(args), 1, lines, [rng.randint(4, 20)])
            out.append("\n".join(lines))
        return "\n\n\n".join(out)

    return doc


def gen_math(rng: random.Random) -> Callable[[], str]:
    """Arithmetic with computed answers: the questions are random, the answers are a
    function of them, so a model that learns to add gets them right."""

    def problem() -> str:
        r = rng.random()
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        if r < 0.3:
            return f"{a} + {b} = {a + b}"
        if r < 0.55:
            return f"{a} - {b} = {a - b}"
        if r < 0.8:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            return f"{a} * {b} = {a * b}"
        x = rng.randint(1, 50)
        c = rng.randint(1, 20)
        return f"Let x = {x}. Then x * {c} + {b} = {x * c + b}."

    def doc() -> str:
        return "\n".join(problem() for _ in range(_doc_len(rng, 25)))

    return doc


def gen_records(rng: random.Random) -> Callable[[], str]:
    """Structured records (CSV with a header per document): a fixed schema and small
    value sets make it the easiest domain."""
    first = _lexicon(rng, 200, _CONS, _VOW, (2, 3))
    cities = _lexicon(rng, 60, _CONS, _VOW, (2, 4))
    cols = ["id", "name", "age", "city", "score", "active"]

    def doc() -> str:
        schema = cols if rng.random() < 0.7 else rng.sample(cols, 4)
        rows = [",".join(schema)]
        start = rng.randint(1, 100000)
        for i in range(_doc_len(rng, 30)):
            vals = {
                "id": str(start + i),
                "name": rng.choice(first).capitalize(),
                "age": str(rng.randint(18, 90)),
                "city": rng.choice(cities).capitalize(),
                "score": f"{rng.randint(0, 100)}.{rng.randint(0, 9)}",
                "active": rng.choice(["true", "false"]),
            }
            rows.append(",".join(vals[c] for c in schema))
        return "\n".join(rows)

    return doc


def gen_lang2(rng: random.Random) -> Callable[[], str]:
    """A second language in Greek script: its own lexicon, verb-final order and case
    endings, so its tokens share nothing with the other domains."""
    nouns = _Zipf(rng, _lexicon(rng, 2500, _GREEK_CONS, _GREEK_VOW, (1, 3)), s=1.0)
    verbs = _Zipf(rng, _lexicon(rng, 1200, _GREEK_CONS, _GREEK_VOW, (2, 3)), s=1.0)
    cases = ["ος", "ου", "ον", "ε", "οι", "ων"]

    def sentence() -> str:
        n = rng.randint(1, 3)
        words = [nouns() + rng.choice(cases) for _ in range(n)]
        return " ".join(words + [verbs() + rng.choice(["ει", "ουν", "ησε"])]) + "·"

    def doc() -> str:
        return " ".join(sentence() for _ in range(_doc_len(rng, 40)))

    return doc


def gen_dna(rng: random.Random) -> Callable[[], str]:
    """Nucleotide strings with planted repeated motifs: mostly irreducible entropy
    (2 bits a base), the hardest domain in absolute loss, with a little to learn."""
    motifs = ["".join(rng.choice("ACGT") for _ in range(rng.randint(6, 12))) for _ in range(40)]

    def doc() -> str:
        parts, n = [], _doc_len(rng, 900)
        size = 0
        while size < n:
            if rng.random() < 0.3:
                s = rng.choice(motifs)
            else:
                s = "".join(rng.choices("ACGT", k=rng.randint(5, 30)))
            parts.append(s)
            size += len(s)
        seq = "".join(parts)
        return "\n".join(seq[i : i + 60] for i in range(0, len(seq), 60))

    return doc


DOMAINS: dict[str, Callable[[random.Random], Callable[[], str]]] = {
    "prose": gen_prose,
    "code": gen_code,
    "math": gen_math,
    "records": gen_records,
    "lang2": gen_lang2,
    "dna": gen_dna,
}


def variant_names(variants: int = 1) -> dict[str, list[str]]:
    """{generator: [its domains]}: the generator's own name, or `<name>_v1` … with variants."""
    return {name: [name] if variants <= 1 else [f"{name}_v{j + 1}" for j in range(variants)] for name in DOMAINS}


def write_corpus(out: Path, seed: int = 0, docs_per_domain: int = 2000, variants: int = 1) -> dict[str, int]:
    """Writes each domain atomically (tmp file + rename); returns bytes per domain. Variant j of
    a generator draws from its own seed (variant 1 is the single-variant corpus's domain)."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for i, (name, make) in enumerate(DOMAINS.items()):
        for j, fine in enumerate(variant_names(variants)[name]):
            doc = make(random.Random(seed * 1000003 + i + 7919 * j))
            with atomic_open(out / f"{fine}.jsonl", "w", encoding="utf-8") as f:
                for _ in range(docs_per_domain):
                    f.write(json.dumps({"text": doc()}, ensure_ascii=False) + "\n")
            sizes[fine] = (out / f"{fine}.jsonl").stat().st_size
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="output directory (created)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--docs-per-domain", type=int, default=2000)
    ap.add_argument("--variants", type=int, default=1, help="fine domains per generator (<name>_v1 …; default 1)")
    args = ap.parse_args(argv)
    if args.variants < 1:
        ap.error("--variants must be at least 1")
    if args.docs_per_domain < 2:
        ap.error("--docs-per-domain must be at least 2 (one train and one eval document)")
    t0 = time.time()
    sizes = write_corpus(args.out, args.seed, args.docs_per_domain, args.variants)
    for name, size in sizes.items():
        print(f"{args.out / (name + '.jsonl')}: {args.docs_per_domain} docs, {size / 1e6:.2f} MB")
    print(f"synth_corpus: {len(sizes)} domains in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
