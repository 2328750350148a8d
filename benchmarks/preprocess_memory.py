"""Peak memory of preprocessing one huge document (issue #18: a 50 MB line took 5.1 GB).

    python benchmarks/preprocess_memory.py --tokenizer DIR [--mb 50] [--max-doc-bytes 64MiB]

Writes a corpus of a few short documents and one line of MB megabytes of words, runs
`megadrp preprocess` in a child process, and prints that child's peak RSS (the main
process: reading, writing shards) and its largest child's (a tokenizer worker), from
resource.getrusage. With the default --max-doc-bytes (16 MiB) the line is refused; pass a
larger cap to have it tokenized (in pieces).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import resource, runpy, sys
sys.argv = ["preprocess.py"] + sys.argv[1:]
code = 0
try:
    runpy.run_path(%r, run_name="__main__")
except SystemExit as e:
    code = e.code
mib = lambda who: resource.getrusage(who).ru_maxrss / 1024
print(f"exit {code}: peak RSS main {mib(resource.RUSAGE_SELF):.0f} MiB, "
      f"largest worker {mib(resource.RUSAGE_CHILDREN):.0f} MiB", file=sys.stderr)
""" % str(ROOT / "data_tools" / "preprocess.py")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, type=Path)
    ap.add_argument("--mb", type=float, default=50.0, help="size of the huge line in MB (default 50)")
    ap.add_argument("extra", nargs="*", help="more preprocess arguments, e.g. --max-doc-bytes 64MiB")
    args = ap.parse_args()
    words = "the of and a to in is was for on that with as by it at from this be or".split()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "big.jsonl"
        n = int(args.mb * 1e6)
        text = " ".join(words[(i * 7919) % len(words)] for i in range(n // 3))[:n]
        with open(corpus, "w") as f:
            for i in range(6):
                f.write(json.dumps({"text": f"small document {i}"}) + "\n")
            f.write(json.dumps({"text": text}) + "\n")
        del text
        cmd = [sys.executable, "-c", CHILD, "--input", f"big={corpus}", "--tokenizer", str(args.tokenizer),
               "--out", str(Path(tmp) / "data"), "--eval-docs", "2", *args.extra]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        print("\n".join(ln for ln in p.stderr.splitlines() if "skipped:" not in ln)[-2000:])
        print(p.stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
