"""data_tools: corpus → tokenizer → shards, and every bad input named clearly."""
from __future__ import annotations

import gzip
import json

from conftest import PY, ROOT, run

from megadrp.data.indexed import IndexedDataset
from megadrp.data.manifest import load_manifest
from megadrp.data.tokenizer import load_tokenizer


def test_synth_corpus_deterministic(tmp_path):
    for d in ("a", "b"):
        run([PY, "data_tools/synth_corpus.py", "--out", str(tmp_path / d), "--docs-per-domain", "20", "--seed", "3"])
    files = sorted(p.name for p in (tmp_path / "a").glob("*.jsonl"))
    assert len(files) >= 5
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        lines = (tmp_path / "a" / f).read_text().splitlines()
        assert len(lines) == 20 and all("text" in json.loads(x) for x in lines)


def test_tokenizer_loads_both_ways(tokenizer):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(tokenizer))
    text = "def foo(x):\n    return x + 12"
    assert hf(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert hf.eos_token_id == 2 and len(hf) == 1024


def test_manifest_and_shards(data_dir, corpus):
    m = load_manifest(data_dir)
    assert m.vocab_size == 1024 and m.dtype == "uint16" and m.eod_id == 2
    assert set(m.domains) == {p.stem for p in corpus.glob("*.jsonl")}
    assert m.has_test
    for d in m.domains.values():
        tr, ev, te = IndexedDataset(d.train), IndexedDataset(d.eval), IndexedDataset(d.test)
        assert len(tr) == d.train_docs and len(ev) == d.eval_docs == 20 and len(te) == d.test_docs == 20
        assert tr.num_tokens == d.train_tokens and te.num_tokens == d.test_tokens
        assert d.train_docs + d.eval_docs + d.test_docs == 300
        assert all(tr[i][-1] == m.eod_id for i in range(0, len(tr), 37))


def _prep(tmp_path, inputs, tokenizer, *extra, out="out", check=False):
    args = [a for name, path in inputs for a in ("--input", f"{name}={path}")]
    return run([PY, "data_tools/preprocess.py", *args, "--tokenizer", str(tokenizer), "--out",
                str(tmp_path / out), "--eval-docs", "2", *extra], check=check)


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_workers_do_not_change_output(tmp_path, corpus, tokenizer):
    inputs = [("code", corpus / "code.jsonl"), ("math", corpus / "math.jsonl")]
    _prep(tmp_path, inputs, tokenizer, "--workers", "1", out="w1", check=True)
    _prep(tmp_path, inputs, tokenizer, "--workers", "2", out="w2", check=True)
    for f in ("code_train.bin", "code_train.idx", "math_eval.bin", "math_eval.idx"):
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes()


def test_glob_gz_and_txt(tmp_path, tokenizer):
    (tmp_path / "src").mkdir()
    with gzip.open(tmp_path / "src" / "a.jsonl.gz", "wt") as f:
        for i in range(6):
            f.write(json.dumps({"text": f"doc {i} hello"}) + "\n")
    (tmp_path / "src" / "b.jsonl").write_text("".join(json.dumps({"text": f"more {i}"}) + "\n" for i in range(4)))
    (tmp_path / "t.txt").write_text("\n".join(f"line {i}" for i in range(8)) + "\n")
    p = _prep(tmp_path, [("g", f"{tmp_path}/src/*.jsonl*"), ("t", tmp_path / "t.txt")], tokenizer, check=True)
    m = load_manifest(tmp_path / "out")
    assert m.domains["g"].train_docs + m.domains["g"].eval_docs == 10
    assert m.domains["t"].train_docs == 6
    assert "tokens/s" in p.stdout


def test_malformed_json_names_file_and_line(tmp_path, tokenizer):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a"}\n{"text": "b"}\n{"text": broken\n{"text": "c"}\n{"text": "d"}\n')
    p = _prep(tmp_path, [("x", f)], tokenizer)
    assert p.returncode == 2 and f"{f}:3" in p.stderr and "malformed JSON" in p.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("*.bin")) and not list((tmp_path / "out").glob("*.idx"))
    p = _prep(tmp_path, [("x", f)], tokenizer, "--skip-bad", "--overwrite")
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["domains"]["x"]["skipped_docs"] == 1 and m["skipped_docs"] == 1


def test_not_utf8(tmp_path, tokenizer):
    f = tmp_path / "b.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "\xff\xfe"}\n{"text": "ok"}\n')
    p = _prep(tmp_path, [("x", f)], tokenizer)
    assert p.returncode == 2 and f"{f}:3" in p.stderr and "not UTF-8" in p.stderr


def test_missing_key_empty_domain_unknown_tokenizer_existing_out(tmp_path, tokenizer):
    f = _jsonl(tmp_path / "a.jsonl", ["x", "y", "z", "w"])
    p = _prep(tmp_path, [("x", f)], tokenizer, "--json-key", "content")
    assert p.returncode == 2 and "no key 'content'" in p.stderr and f"{f}:1" in p.stderr
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    p = _prep(tmp_path, [("e", empty)], tokenizer)
    assert p.returncode == 2 and "'e'" in p.stderr and "no documents" in p.stderr
    p = _prep(tmp_path, [("x", f)], tmp_path / "no-tokenizer")
    assert p.returncode == 2 and "no-tokenizer" in p.stderr
    p = _prep(tmp_path, [("x", f)], tokenizer, out="o2")
    assert p.returncode == 0
    before = (tmp_path / "o2" / "x_train.bin").read_bytes()
    p = _prep(tmp_path, [("x", f)], tokenizer, out="o2")
    assert p.returncode == 2 and "--overwrite" in p.stderr
    assert (tmp_path / "o2" / "x_train.bin").read_bytes() == before  # nothing lost
    p = _prep(tmp_path, [("x", tmp_path / "nothing*.jsonl")], tokenizer)
    assert p.returncode == 2 and "no input file matches" in p.stderr


def test_eval_holdout_is_deterministic_and_spread(tmp_path, tokenizer):
    f = _jsonl(tmp_path / "a.jsonl", [f"document number {i}" for i in range(200)])
    _prep(tmp_path, [("x", f)], tokenizer, "--eval-docs", "20", out="h1", check=True)
    _prep(tmp_path, [("x", f)], tokenizer, "--eval-docs", "20", out="h2", check=True)
    a = (tmp_path / "h1" / "x_eval.bin").read_bytes()
    assert a == (tmp_path / "h2" / "x_eval.bin").read_bytes()
    tok = load_tokenizer(tokenizer)
    ev = IndexedDataset(tmp_path / "h1" / "x_eval")
    nums = [int(tok.decode(ev[i][:-1].tolist()).split()[-1]) for i in range(len(ev))]
    assert len(nums) == 20 and max(nums) - min(nums) > 100  # not just the first documents


def test_inspect(data_dir):
    p = run([PY, "data_tools/inspect_data.py", str(data_dir)])
    assert "tokens" in p.stdout and "code" in p.stdout
    p = run([PY, "data_tools/inspect_data.py", str(data_dir / "code_train")])
    assert "documents" in p.stdout and "sample" in p.stdout


def test_inspect_shows_a_configs_domain_groups(data_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    base = (ROOT / "configs/tiny/prune.yaml").read_text()  # any valid config: only its groups are read
    cfg.write_text(base + "domain_groups:\n  text: [prose, lang2]\n  rest: {code: 1, dna: 1, math: 1, records: 1}\n")
    p = run([PY, "-m", "megadrp", "inspect", str(data_dir), "--sample", "0", "--config", str(cfg)])
    assert "domain_groups: 2 groups over 6 domains" in p.stdout
    assert "code 0.250, dna 0.250, math 0.250, records 0.250" in p.stdout
    cfg.write_text(base + "domain_groups:\n  text: [prose, lang2]\n")
    p = run([PY, "-m", "megadrp", "inspect", str(data_dir), "--config", str(cfg)], check=False)
    assert p.returncode == 2 and "in no group" in p.stderr


def test_test_split_is_disjoint_and_leaves_the_eval_split_as_it_was(tmp_path, tokenizer):
    """--test-docs: a third split, no document in two, every document in one; the eval split is
    the one made without it (a draw of its own), and both draws follow --seed."""
    f = _jsonl(tmp_path / "a.jsonl", [f"document number {i}" for i in range(200)])
    _prep(tmp_path, [("x", f)], tokenizer, "--eval-docs", "20", out="plain", check=True)
    _prep(tmp_path, [("x", f)], tokenizer, "--eval-docs", "20", "--test-docs", "30", out="three", check=True)
    _prep(tmp_path, [("x", f)], tokenizer, "--eval-docs", "20", "--test-docs", "30", "--seed", "1", out="s1",
          check=True)
    tok = load_tokenizer(tokenizer)

    def numbers(out: str, split: str) -> list[int]:
        ds = IndexedDataset(tmp_path / out / f"x_{split}")
        return [int(tok.decode(ds[i][:-1].tolist()).split()[-1]) for i in range(len(ds))]

    splits = {s: numbers("three", s) for s in ("train", "eval", "test")}
    assert [len(v) for v in splits.values()] == [150, 20, 30]
    assert sorted(n for v in splits.values() for n in v) == list(range(200))  # disjoint and complete
    assert (tmp_path / "three" / "x_eval.bin").read_bytes() == (tmp_path / "plain" / "x_eval.bin").read_bytes()
    assert max(splits["test"]) - min(splits["test"]) > 100  # spread, not the documents after eval's
    assert set(numbers("s1", "test")) != set(splits["test"])
    m = load_manifest(tmp_path / "three")
    assert m.has_test and m.domains["x"].test_docs == 30 and not load_manifest(tmp_path / "plain").has_test
    assert json.loads((tmp_path / "three" / "manifest.json").read_text())["holdout"] == {
        "seed": 0, "eval_docs": 20, "test_docs": 30}
    p = run([PY, "-m", "megadrp", "inspect", str(tmp_path / "three"), "--sample", "0"])
    assert "test 30 docs" in p.stdout and "no run opens it" in p.stdout
    p = _prep(tmp_path, [("x", f)], tokenizer, "--eval-docs", "100", "--test-docs", "100", out="few")
    assert p.returncode == 2 and "need more than --eval-docs=100 + --test-docs=100" in p.stderr
    assert not (tmp_path / "few").exists()


def test_the_guard_stops_a_training_process_that_opens_the_test_split(tmp_path, data_dir):
    """tests/guard (on every subprocess's path): the proof that no training run the suite starts
    reads a test shard depends on it firing."""
    script = tmp_path / "train.py"
    script.write_text("import sys, numpy as np\nnp.memmap(sys.argv[1], dtype=np.uint8, mode='r')\n")
    log = tmp_path / "opened.log"
    p = run([PY, str(script), str(data_dir / "code_test.bin")], check=False, env={"MEGADRP_GUARD_LOG": str(log)})
    assert p.returncode == 1 and "opened the test split" in p.stderr and "code_test.bin" in log.read_text()
    run([PY, str(script), str(data_dir / "code_eval.bin")], env={"MEGADRP_GUARD_LOG": str(log)})
