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
