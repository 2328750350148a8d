"""A second, real-text corpus from files every Debian machine carries: no download needed.

The embedded corpus (synth_corpus.py) is synthetic by design; a schedule comparison should
also hold on real text whose domains differ in kind. A Debian installation has several
kinds of human-written text on disk (docs/corpus.md):

    changelog   /usr/share/doc/*/changelog.Debian.gz   package maintainers' change notes
    copyright   /usr/share/doc/*/copyright              licence and legal text
    manpage     /usr/share/man/man*/*.gz                roff-formatted manual pages
    perl        *.pm under /usr/share/perl*, /usr/lib/*/perl*   Perl modules and their POD
    packages    /var/lib/dpkg/status                     package descriptions, one per package
    python      /usr/lib/python3*/**/*.py                Python standard library source
    shell       shell scripts in /usr/bin, /usr/sbin, /etc/init.d

    megadrp debian-corpus --out DIR [--max-docs-per-domain 2000] [--min-docs 100]
        [--max-doc-bytes 65536] [--domains changelog,copyright,...] [--root /] [--fine]

`--fine` splits the seven kinds into 15 finer domains, each by something the file's place or
header says, not by its words: changelog and package description by whether the package is a
library (dpkg's `libs`/`libdevel`/`oldlibs` sections), copyright by machine-readable (DEP-5
`Format:`) or free-form, man pages by section (commands 1/6/8, programming interfaces 2/3, files
and conventions 4/5/7), Perl by where it is installed (perl's own core, vendor perl5,
arch-specific), Python by standard library or dist-packages; shell stays one. FINE_GROUPS puts
them back into four coarse groups (notes, legal, docs, code) for the granularity study.

writes DIR/<domain>.jsonl (one {"text": ...} per line, each file written atomically) and
DIR/sources.json (documents and bytes per domain, files skipped and why). Deterministic for
a machine: files are taken in sorted order, the sample spread evenly over that order. A
domain with fewer than --min-docs documents is left out and said; fewer than 5 domains left
(or than --domains names, if fewer) is an error (exit 2), since the comparison needs several
kinds of text. Identical files (one source package's copyright in many binary packages) count
once, in the first kept domain (in the table's order) that has them, so no document lands in two
splits or two domains.
"""
from __future__ import annotations

import argparse
import functools
import gzip
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from megadrp.runtime.files import atomic_open, atomic_write_text

MIN_DOMAINS = 5


def _read(path: Path, max_bytes: int) -> str | None:
    """The file's text (gunzipped for .gz), or None when unreadable, binary or too large."""
    try:
        if path.stat().st_size > max_bytes * (8 if path.suffix == ".gz" else 1):
            return None
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if len(raw) > max_bytes or b"\0" in raw[:4096]:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text if text.strip() else None


def _files(root: Path, patterns: list[str]) -> list[Path]:
    found: set[Path] = set()
    for pat in patterns:
        found.update(p for p in root.glob(pat) if p.is_file() and not p.is_symlink())
    return sorted(found)


def _shell_scripts(root: Path) -> list[Path]:
    out = []
    for d in ("usr/bin", "usr/sbin", "etc/init.d"):
        for p in sorted((root / d).glob("*")) if (root / d).is_dir() else []:
            try:
                if p.is_file() and not p.is_symlink():
                    with open(p, "rb") as f:
                        head = f.read(64)
                    if head.startswith(b"#!") and (b"sh" in head.split(b"\n")[0]):
                        out.append(p)
            except OSError:
                continue
    return out


LIB_SECTIONS = frozenset({"libs", "libdevel", "oldlibs"})


def _status(root: Path) -> Iterator[dict[str, str]]:
    """The fields of each package paragraph of dpkg's status file (continuation lines joined)."""
    status = root / "var/lib/dpkg/status"
    text = _read(status, 1 << 30) if status.is_file() else None
    for para in (text or "").split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        yield fields


def _is_lib(fields: dict[str, str]) -> bool:
    """A library package, by its dpkg section (`libs`, `libdevel`, `oldlibs`, in any archive area)."""
    return fields.get("Section", "").rsplit("/", 1)[-1] in LIB_SECTIONS


def _lib_packages(root: Path) -> frozenset[str]:
    """The library packages by dpkg section. Four fine domains ask for them; the status file is
    parsed once per version of it (keyed by its path, size and mtime, so an edited file is read again)."""
    status = root / "var/lib/dpkg/status"
    st = status.stat() if status.is_file() else None
    return _lib_packages_of(root, (st.st_size, st.st_mtime_ns) if st else None)


@functools.lru_cache(maxsize=4)
def _lib_packages_of(root: Path, version: tuple[int, int] | None) -> frozenset[str]:
    return frozenset(f["Package"] for f in _status(root) if "Package" in f and _is_lib(f))


def _package_descriptions(root: Path, max_bytes: int, libs: bool | None = None) -> Iterator[str]:
    """One document per package in dpkg's status file: its name, then its description; with
    `libs`, only the packages in (True) or out of (False) a library section."""
    for fields in _status(root):
        if libs is not None and _is_lib(fields) != libs:
            continue
        if "Package" in fields and fields.get("Description"):
            body = "\n".join("" if line == "." else line for line in fields["Description"].split("\n"))
            doc = f"{fields['Package']}: {body}"
            if len(doc.encode()) <= max_bytes:
                yield doc


def _from_files(paths: Callable[[Path], list[Path]],
                keep: Callable[[str], bool] | None = None) -> Callable[[Path, int], Iterator[str]]:
    def docs(root: Path, max_bytes: int) -> Iterator[str]:
        for p in paths(root):
            text = _read(p, max_bytes)
            if text is not None and (keep is None or keep(text)):
                yield text
    return docs


def _glob(*patterns: str, lib: bool | None = None) -> Callable[[Path], list[Path]]:
    """The files matching any pattern; with `lib`, only those whose package folder (the binary
    package's, under usr/share/doc) is (True) or is not (False) a library package's by its dpkg
    section, the package descriptions' criterion (a folder dpkg does not list is not a library's)."""
    def paths(root: Path) -> list[Path]:
        found = _files(root, list(patterns))
        if lib is None:
            return found
        libs = _lib_packages(root)
        return [p for p in found if (p.parent.name in libs) == lib]
    return paths


def _dep5(text: str) -> bool:
    """A machine-readable copyright file (DEP-5) starts with its Format: field (or the
    Format-Specification: of its drafts)."""
    return text.lstrip().startswith(("Format:", "Format-Specification:"))


def _man(sections: str) -> list[str]:
    return [f"usr/share/man/man{s}/*.gz" for s in sections]


DOMAINS: dict[str, Callable[[Path, int], Iterator[str]]] = {
    "changelog": _from_files(lambda r: _files(r, ["usr/share/doc/*/changelog.Debian.gz"])),
    "copyright": _from_files(lambda r: _files(r, ["usr/share/doc/*/copyright"])),
    "manpage": _from_files(lambda r: _files(r, ["usr/share/man/man[1-8]/*.gz"])),
    "perl": _from_files(lambda r: _files(r, ["usr/share/perl*/**/*.pm", "usr/lib/*/perl*/**/*.pm"])),
    "packages": _package_descriptions,
    "python": _from_files(lambda r: _files(r, ["usr/lib/python3*/**/*.py"])),
    "shell": _from_files(_shell_scripts),
}


FINE: dict[str, Callable[[Path, int], Iterator[str]]] = {
    "changelog_lib": _from_files(_glob("usr/share/doc/*/changelog.Debian.gz", lib=True)),
    "changelog_other": _from_files(_glob("usr/share/doc/*/changelog.Debian.gz", lib=False)),
    "copyright_dep5": _from_files(_glob("usr/share/doc/*/copyright"), keep=_dep5),
    "copyright_free": _from_files(_glob("usr/share/doc/*/copyright"), keep=lambda t: not _dep5(t)),
    "manpage_commands": _from_files(_glob(*_man("168"))),
    "manpage_api": _from_files(_glob(*_man("23"))),
    "manpage_files": _from_files(_glob(*_man("457"))),
    "perl_core": _from_files(_glob("usr/share/perl/**/*.pm", "usr/lib/*/perl-base/**/*.pm")),
    "perl_vendor": _from_files(_glob("usr/share/perl5/**/*.pm")),
    "perl_arch": _from_files(_glob("usr/lib/*/perl/**/*.pm", "usr/lib/*/perl5/**/*.pm")),
    "packages_libs": lambda root, max_bytes: _package_descriptions(root, max_bytes, libs=True),
    "packages_other": lambda root, max_bytes: _package_descriptions(root, max_bytes, libs=False),
    "python_stdlib": _from_files(_glob("usr/lib/python3.*/**/*.py")),
    "python_dist": _from_files(_glob("usr/lib/python3/dist-packages/**/*.py")),
    "shell": DOMAINS["shell"],
}

# The coarse groups of the fine domains (benchmarks/granularity.py): short English about
# packages, legal text, roff documentation, program source.
FINE_GROUPS: dict[str, tuple[str, ...]] = {
    "notes": ("changelog_lib", "changelog_other", "packages_libs", "packages_other"),
    "legal": ("copyright_dep5", "copyright_free"),
    "docs": ("manpage_commands", "manpage_api", "manpage_files"),
    "code": ("perl_core", "perl_vendor", "perl_arch", "python_stdlib", "python_dist", "shell"),
}


def _unique(docs: Iterator[str], taken: set[str]) -> list[str]:
    """Each text once, in first-seen order, and none that an earlier domain took (`taken`):
    packages built from one source ship identical copyright files and changelogs (half of all
    copyright files on a typical system), and a duplicate would put the same document in both
    the train and the eval split, or in two domains."""
    seen: set[str] = set()
    return [d for d in docs if not (d in taken or d in seen or seen.add(d))]


def _spread(docs: list[str], k: int) -> list[str]:
    """k documents spread evenly over the sorted order (all when there are fewer)."""
    if len(docs) <= k:
        return docs
    return [docs[i * len(docs) // k] for i in range(k)]


def build(out: Path, root: Path = Path("/"), max_docs: int = 2000, min_docs: int = 100,
          max_doc_bytes: int = 65536, domains: list[str] | None = None, fine: bool = False) -> dict:
    table = FINE if fine else DOMAINS
    unknown = [n for n in domains or [] if n not in table]
    if unknown:
        raise ValueError(f"--domains: unknown {', '.join(unknown)}; choose from {', '.join(table)}"
                         + ("" if fine else " (or pass --fine for the finer domains)"))
    names = [n for n in table if not domains or n in domains]  # the table's order, whatever --domains says
    collected, report = {}, {"root": str(root), "fine": fine, "domains": {}, "left_out": {}}
    taken: set[str] = set()  # the texts of the domains kept so far: a text lands in one domain only
    for name in names:
        t0 = time.time()
        unique = _unique(table[name](root, max_doc_bytes), taken)
        docs = _spread(unique, max_docs)
        print(f"debian_corpus: {name}: {len(docs)} documents ({time.time() - t0:.1f}s)", file=sys.stderr)
        if len(docs) < min_docs:
            report["left_out"][name] = f"{len(docs)} documents, fewer than --min-docs={min_docs}"
            continue
        collected[name] = docs
        taken.update(unique)
    need = min(MIN_DOMAINS, len(names))  # --domains with fewer names asks for just those
    if len(collected) < need:
        raise ValueError(f"{root}: only {len(collected)} domains with at least {min_docs} documents "
                         f"({', '.join(collected) or 'none'}; left out: {report['left_out']}); "
                         f"need {need}: lower --min-docs or install documentation (man pages, /usr/share/doc)")
    out.mkdir(parents=True, exist_ok=True)
    # A domain file from an earlier build that this one left out would still be read as a
    # domain by preprocess (every *.jsonl is one): remove it.
    for name in {**DOMAINS, **FINE}:
        if name not in collected:
            (out / f"{name}.jsonl").unlink(missing_ok=True)
    for name, docs in collected.items():
        with atomic_open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        report["domains"][name] = {"documents": len(docs), "bytes": sum(len(d.encode()) for d in docs)}
    atomic_write_text(out / "sources.json", json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="output directory (created)")
    ap.add_argument("--root", type=Path, default=Path("/"), help="filesystem root to read (default /)")
    ap.add_argument("--max-docs-per-domain", type=int, default=2000)
    ap.add_argument("--min-docs", type=int, default=100, help="leave out a domain with fewer documents")
    ap.add_argument("--max-doc-bytes", type=int, default=65536, help="skip larger files (after gunzip)")
    ap.add_argument("--domains", default=None, help=f"comma-separated subset of {', '.join(DOMAINS)} (with --fine: "
                    f"of {', '.join(FINE)})")
    ap.add_argument("--fine", action="store_true", help="the 15 finer domains (module docstring) instead of the 7 kinds")
    args = ap.parse_args(argv)
    for flag, v in (("--max-docs-per-domain", args.max_docs_per_domain), ("--min-docs", args.min_docs),
                    ("--max-doc-bytes", args.max_doc_bytes)):
        if v < 1:
            ap.error(f"{flag}={v}: must be at least 1")
    try:
        report = build(args.out, args.root, args.max_docs_per_domain, args.min_docs, args.max_doc_bytes,
                       args.domains.split(",") if args.domains else None, args.fine)
    except ValueError as e:
        print(f"debian_corpus: error: {e}", file=sys.stderr)
        return 2
    for name, r in report["domains"].items():
        print(f"{args.out / (name + '.jsonl')}: {r['documents']} docs, {r['bytes'] / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
