"""data_tools/debian_corpus.py on a fake root laid out like a Debian system (the real / is
used by the schedules benchmark; here every count is known)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import PY, run


def _fake_root(root: Path, n: int = 6) -> None:
    for i in range(n):
        doc = root / "usr/share/doc" / f"pkg{i}"
        doc.mkdir(parents=True)
        (doc / "changelog.Debian.gz").write_bytes(gzip.compress(f"pkg{i} (1.{i}) unstable; urgency=low\n".encode()))
        (doc / "copyright").write_text(f"Files: *\nCopyright: {2000 + i} Someone\nLicense: GPL-2+\n")
        twin = root / "usr/share/doc" / f"pkg{i}-common"  # one source package, two binaries: same file
        twin.mkdir()
        (twin / "copyright").write_text((doc / "copyright").read_text())
        man = root / "usr/share/man/man1"
        man.mkdir(parents=True, exist_ok=True)
        (man / f"tool{i}.1.gz").write_bytes(gzip.compress(f".TH TOOL{i} 1\n.SH NAME\ntool{i}\n".encode()))
        perl = root / "usr/share/perl/5.36"
        perl.mkdir(parents=True, exist_ok=True)
        (perl / f"Mod{i}.pm").write_text(f"package Mod{i};\n=head1 NAME\n\nMod{i}\n=cut\n1;\n")
        py = root / "usr/lib/python3.11"
        py.mkdir(parents=True, exist_ok=True)
        (py / f"mod{i}.py").write_text(f'"""Module {i}."""\nX = {i}\n')
    (root / "usr/share/doc/pkg0/binary.gz").write_bytes(b"\0\1\2")  # not a changelog: ignored anyway
    status = root / "var/lib/dpkg"
    status.mkdir(parents=True)
    (status / "status").write_text("".join(
        f"Package: pkg{i}\nStatus: install ok installed\nDescription: tool number {i}\n more about it\n .\n"
        f" a second paragraph\n\n" for i in range(n)))


def test_builds_every_domain_deterministically(tmp_path):
    root = tmp_path / "root"
    _fake_root(root)
    out = tmp_path / "a"
    run([PY, "data_tools/debian_corpus.py", "--out", str(out), "--root", str(root), "--min-docs", "3",
         "--max-docs-per-domain", "4"])
    src = json.loads((out / "sources.json").read_text())
    assert set(src["domains"]) == {"changelog", "copyright", "manpage", "perl", "packages", "python"}
    assert src["left_out"] == {"shell": "0 documents, fewer than --min-docs=3"}
    assert all(v["documents"] == 4 for v in src["domains"].values())  # 6 found, 4 spread over them
    texts = [json.loads(x)["text"] for x in (out / "copyright.jsonl").read_text().splitlines()]
    assert len(set(texts)) == len(texts)  # the twins' identical files count once
    pkgs = [json.loads(x)["text"] for x in (out / "packages.jsonl").read_text().splitlines()]
    assert pkgs[0] == "pkg0: tool number 0\nmore about it\n\na second paragraph"
    assert ".TH TOOL0 1" in (out / "manpage.jsonl").read_text()  # gunzipped
    again = tmp_path / "b"
    run([PY, "data_tools/debian_corpus.py", "--out", str(again), "--root", str(root), "--min-docs", "3",
         "--max-docs-per-domain", "4"])
    for f in out.glob("*.jsonl"):
        assert f.read_bytes() == (again / f.name).read_bytes(), f.name
    # a rebuild with fewer domains leaves no file of the old ones behind (each *.jsonl is a domain)
    run([PY, "data_tools/debian_corpus.py", "--out", str(out), "--root", str(root), "--min-docs", "3",
         "--domains", "changelog,perl"])
    assert sorted(f.name for f in out.glob("*.jsonl")) == ["changelog.jsonl", "perl.jsonl"]


@pytest.mark.parametrize("args,needle", [
    (["--min-docs", "7"], "only 0 domains with at least 7 documents"),
    (["--domains", "changelog,bogus"], "unknown bogus"),
    (["--max-doc-bytes", "0"], "--max-doc-bytes=0: must be at least 1"),
])
def test_too_few_domains_or_bad_flags_exit_2(tmp_path, args, needle):
    root = tmp_path / "root"
    _fake_root(root)
    p = run([PY, "data_tools/debian_corpus.py", "--out", str(tmp_path / "o"), "--root", str(root), *args], check=False)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "o").exists()  # nothing written


def _fine_root(root: Path) -> None:
    """Two of each fine kind, plus one changelog shipped identically by a library and a tool, and
    a `lib*`-named package that dpkg files under `perl` (not a library: the section decides)."""
    for i in range(2):
        for pkg, text in ((f"libfoo{i}", f"libfoo{i} (1.{i}) lib change"), (f"tool{i}", f"tool{i} (2.{i}) change")):
            d = root / "usr/share/doc" / pkg
            d.mkdir(parents=True)
            (d / "changelog.Debian.gz").write_bytes(gzip.compress(text.encode()))
        (root / "usr/share/doc" / f"libfoo{i}" / "copyright").write_text(f"Format: https://dep5\nFiles: *\nLicense: {i}\n")
        (root / "usr/share/doc" / f"tool{i}" / "copyright").write_text(f"This package was debianized by {i}\n")
        for sec in "1358":
            man = root / f"usr/share/man/man{sec}"
            man.mkdir(parents=True, exist_ok=True)
            (man / f"page{i}.{sec}.gz").write_bytes(gzip.compress(f".TH PAGE{i} {sec}\n".encode()))
        for place, name in (("usr/share/perl/5.36", "Core"), ("usr/lib/x86_64-linux-gnu/perl-base", "Base"),
                            ("usr/share/perl5", "Vendor"), ("usr/lib/x86_64-linux-gnu/perl5/5.36", "Arch")):
            (root / place).mkdir(parents=True, exist_ok=True)
            (root / place / f"{name}{i}.pm").write_text(f"package {name}{i};\n1;\n")
        for place in ("usr/lib/python3.11", "usr/lib/python3/dist-packages"):
            (root / place).mkdir(parents=True, exist_ok=True)
            (root / place / f"m{i}.py").write_text(f"# {place} {i}\n")
    twin = root / "usr/share/doc/libtwin"
    twin.mkdir()
    (twin / "changelog.Debian.gz").write_bytes(gzip.compress(b"twin (1) shared by two binaries"))
    (root / "usr/share/doc/twin-utils").mkdir()
    (root / "usr/share/doc/twin-utils/changelog.Debian.gz").write_bytes(gzip.compress(b"twin (1) shared by two binaries"))
    (root / "usr/share/doc/libwww-perl").mkdir()
    (root / "usr/share/doc/libwww-perl/changelog.Debian.gz").write_bytes(gzip.compress(b"libwww-perl (6) perl module"))
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text("".join(
        f"Package: {p}{i}\nSection: {s}\nDescription: {p} {i}\n\n"
        for i in range(2) for p, s in (("libbar", "libs"), ("libbar-dev", "libdevel"), ("baz", "utils")))
        + "Package: libfoo0\nSection: libs\n\nPackage: libfoo1\nSection: main/libdevel\n\n"
        "Package: libtwin\nSection: libs\n\nPackage: libwww-perl\nSection: perl\n")


def test_fine_domains_split_each_kind_by_place_section_or_header(tmp_path):
    from megadrp.tools.debian_corpus import FINE, FINE_GROUPS

    grouped = [d for members in FINE_GROUPS.values() for d in members]
    assert sorted(grouped) == sorted(FINE)  # every fine domain in exactly one coarse group
    root = tmp_path / "root"
    _fine_root(root)
    out = tmp_path / "fine"
    run([PY, "data_tools/debian_corpus.py", "--fine", "--out", str(out), "--root", str(root), "--min-docs", "1"])
    src = json.loads((out / "sources.json").read_text())
    assert src["fine"] is True and src["left_out"] == {"shell": "0 documents, fewer than --min-docs=1"}
    docs = {n: [json.loads(x)["text"] for x in (out / f"{n}.jsonl").read_text().splitlines()] for n in src["domains"]}
    assert docs["changelog_lib"] == ["libfoo0 (1.0) lib change", "libfoo1 (1.1) lib change",
                                     "twin (1) shared by two binaries"]
    # the twin counted once; a lib*-named package outside the library sections is "other"
    assert docs["changelog_other"] == ["libwww-perl (6) perl module", "tool0 (2.0) change", "tool1 (2.1) change"]
    assert all(d.startswith("Format:") for d in docs["copyright_dep5"]) and len(docs["copyright_dep5"]) == 2
    assert all(d.startswith("This package") for d in docs["copyright_free"]) and len(docs["copyright_free"]) == 2
    assert [d.split()[-1] for d in docs["manpage_commands"]] == ["1", "1", "8", "8"]  # sorted by path
    assert {d.split()[-1] for d in docs["manpage_api"]} == {"3"} and {d.split()[-1] for d in docs["manpage_files"]} == {"5"}
    pm = lambda name: [f"package {name}{i};\n1;\n" for i in range(2)]  # noqa: E731
    assert docs["perl_core"] == pm("Base") + pm("Core")  # perl-base is perl's own core, sorted by path
    assert docs["perl_vendor"] == pm("Vendor") and docs["perl_arch"] == pm("Arch")
    assert docs["python_stdlib"] == [f"# usr/lib/python3.11 {i}\n" for i in range(2)]
    assert docs["python_dist"] == [f"# usr/lib/python3/dist-packages {i}\n" for i in range(2)]
    assert sorted(docs["packages_libs"]) == ["libbar-dev0: libbar-dev 0", "libbar-dev1: libbar-dev 1",
                                             "libbar0: libbar 0", "libbar1: libbar 1"]
    assert docs["packages_other"] == ["baz0: baz 0", "baz1: baz 1"]
    p = run([PY, "data_tools/debian_corpus.py", "--out", str(tmp_path / "x"), "--root", str(root),
             "--domains", "perl_core"], check=False)
    assert p.returncode == 2 and "pass --fine" in p.stderr, p.stderr


def test_library_packages_are_parsed_once_per_version_of_the_status_file(tmp_path, monkeypatch):
    """Four fine domains ask which packages are libraries; the status file is parsed once, and
    again only when it changes (a cache keyed by the path alone would keep a stale answer)."""
    from megadrp.tools import debian_corpus as dc

    root = tmp_path / "root"
    _fine_root(root)
    parses = []
    real = dc._status
    monkeypatch.setattr(dc, "_status", lambda r: parses.append(r) or real(r))
    first = dc._lib_packages(root)
    assert dc._lib_packages(root) is first and len(parses) == 1
    assert {"libbar0", "libbar-dev1", "libfoo1", "libtwin"} <= first and "libwww-perl" not in first
    status = root / "var/lib/dpkg/status"
    status.write_text(status.read_text() + "\nPackage: libnew\nSection: libs\n")
    assert "libnew" in dc._lib_packages(root) and len(parses) == 2
