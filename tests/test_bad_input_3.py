"""Bad input, third round (#43): the tokenizer compared wherever a model meets data, the commands
that lost work or printed tracebacks, settings that were silently accepted, Ctrl-C on the demo.
Each refusal is exit 2 with one line naming the key, file or flag, and changes nothing written."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PY, ROOT, run, tiny_run_config, write_config


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _megadrp(*args: str, cwd: Path = ROOT, check: bool = False) -> subprocess.CompletedProcess:
    return run([PY, "-m", "megadrp", *args], check=check, cwd=cwd)


@pytest.fixture(scope="module")
def other_tokenizer(corpus, tmp_path_factory) -> Path:
    """A tokenizer of the same size (1024) as the suite's, trained on other text: another
    vocabulary behind the same ids, as Llama-2's and Mistral's are."""
    out = tmp_path_factory.mktemp("tok2") / "tok"
    _megadrp("tokenizer", "--input", str(corpus / "code.jsonl"), str(corpus / "math.jsonl"), "--vocab-size", "1024",
             "--out", str(out), check=True)
    return out


def test_tokenizer_tool_refuses_without_leaving_anything(tmp_path, corpus):
    text = corpus / "code.jsonl"
    p = _megadrp("tokenizer", "--input", str(text), "--vocab-size", "64000", "--out", str(tmp_path / "t"))
    assert p.returncode == 2 and "supports at most" in p.stderr and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary left
    for bad in ("0", "-5"):
        p = _megadrp("tokenizer", "--input", str(text), "--vocab-size", bad, "--out", str(tmp_path / "t"))
        assert p.returncode == 2 and f"--vocab-size {bad}: at least 300" in p.stderr
    (tmp_path / "file").write_text("keep me")
    p = _megadrp("tokenizer", "--input", str(text), "--vocab-size", "500", "--out", str(tmp_path / "file"))
    assert p.returncode == 2 and "a file, not a directory" in p.stderr and (tmp_path / "file").read_text() == "keep me"
    _megadrp("tokenizer", "--input", str(text), "--vocab-size", "500", "--out", str(tmp_path / "t"), check=True)
    before = _digest(tmp_path)
    p = _megadrp("tokenizer", "--input", str(text), "--vocab-size", "600", "--out", str(tmp_path / "t"))
    assert p.returncode == 2 and "pass --overwrite" in p.stderr and _digest(tmp_path) == before
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text(text.read_text() + "{not json\n")
    p = _megadrp("tokenizer", "--input", str(bad_lines), "--vocab-size", "500", "--out", str(tmp_path / "u"))
    assert p.returncode == 2 and "--skip-bad" in p.stderr and not (tmp_path / "u").exists()
    p = _megadrp("tokenizer", "--input", str(bad_lines), "--vocab-size", "500", "--out", str(tmp_path / "u"),
                 "--skip-bad")
    assert p.returncode == 0 and "skipped 1 bad line" in p.stderr


def test_the_tokenizer_is_compared_where_a_model_meets_data(tmp_path, data_dir, base_model, other_tokenizer):
    """Same vocabulary size, other tokens: `megadrp eval` and training refuse, naming both sides,
    unless told (`--allow-tokenizer-mismatch`, `allow_tokenizer_mismatch: true`); a model with
    the data's own tokenizer passes; a DATA_DIR of an older megadrp is read with a warning."""
    from megadrp.data.manifest import load_manifest
    from megadrp.data.tokenizer import fingerprint_of

    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    for f in other_tokenizer.iterdir():
        shutil.copy2(f, model / f.name)
    assert fingerprint_of(model) != load_manifest(data_dir).tokenizer_fingerprint is not None
    ev = ["eval", "--model", str(model), "--data", str(data_dir), "--tokens-per-domain", "64", "--seq-len", "16"]
    p = _megadrp(*ev)
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("evaluate:")][-1]
    assert p.returncode == 2 and f"--model {model}" in line and str(data_dir) in line and "different tokenizers" in line
    assert _megadrp(*ev, "--allow-tokenizer-mismatch").returncode == 0
    cfg = tiny_run_config(tmp_path, data_dir, "continue", "c", model={"init": str(model)})
    path = write_config(tmp_path / "c.yaml", **cfg)
    p = run([PY, "megadrp/train.py", "--config", str(path), "--dry-run"], check=False)
    assert p.returncode == 2 and f"model.init {model}" in p.stderr and "allow_tokenizer_mismatch" in p.stderr
    assert run([PY, "megadrp/train.py", "--config", str(path), "--dry-run", "allow_tokenizer_mismatch=true"],
               check=False).returncode == 0
    same = tmp_path / "same"
    shutil.copytree(base_model, same)
    for f in (data_dir / "tokenizer").iterdir():
        shutil.copy2(f, same / f.name)
    assert _megadrp("eval", "--model", str(same), "--data", str(data_dir), "--tokens-per-domain", "64",
                    "--seq-len", "16").returncode == 0
    old = tmp_path / "old"
    shutil.copytree(data_dir, old)
    man = json.loads((old / "manifest.json").read_text())
    del man["tokenizer_fingerprint"]
    (old / "manifest.json").write_text(json.dumps(man))
    p = _megadrp("eval", "--model", str(model), "--data", str(old), "--tokens-per-domain", "64", "--seq-len", "16")
    assert p.returncode == 0 and "records no tokenizer fingerprint" in p.stderr


def test_merge_refuses_an_existing_manifest_and_another_tokenizer(tmp_path, corpus, tokenizer, other_tokenizer):
    parts = {}
    for name, tok in (("a", tokenizer), ("b", tokenizer), ("c", other_tokenizer)):
        parts[name] = tmp_path / name
        _megadrp("preprocess", "--input", f"{name}dom={corpus / 'prose.jsonl'}", "--tokenizer", str(tok),
                 "--out", str(parts[name]), "--eval-docs", "5", check=True)
    out = tmp_path / "merged"
    _megadrp("merge", "--out", str(out), str(parts["a"]), check=True)
    before = _digest(out)
    p = _megadrp("merge", "--out", str(out), str(parts["a"]), str(parts["b"]))
    assert p.returncode == 2 and "pass --overwrite" in p.stderr and _digest(out) == before
    p = _megadrp("merge", "--out", str(out), "--overwrite", str(parts["a"]), str(parts["c"]))
    assert p.returncode == 2 and "tokenizer_fingerprint" in p.stderr and _digest(out) == before
    assert _megadrp("merge", "--out", str(out), "--overwrite", str(parts["a"]), str(parts["b"])).returncode == 0
    assert set(json.loads((out / "manifest.json").read_text())["domains"]) == {"adom", "bdom"}


@pytest.mark.parametrize("over,needle", [
    (["dro.reference_loss={code: 2, dna: 2, lang2: 2, math: 2, prose: 2, records: 2, wiki: 2}"],
     "dro.reference_loss has an entry for 'wiki', which is not one of the run's domains"),
    (["dro.reference_loss={code: 2, dna: -1, lang2: 2, math: 2, prose: 2, records: 2}"],
     "dro.reference_loss: 'dna' has -1.0; a loss is never negative"),
    (["domain_groups={code: [math], rest: [code, dna, lang2, prose, records]}", "dro.initial_proportion=uniform"],
     "domain_groups.code: named like the domain 'code', which is in group 'rest'"),
])
def test_settings_that_were_silently_accepted_are_refused(over, needle, tmp_path, data_dir, base_model, capsys):
    from megadrp.train import main

    cfg = tiny_run_config(tmp_path, data_dir, "continue", "c", model={"init": str(base_model)})
    path = write_config(tmp_path / "c.yaml", **cfg)
    assert main(["--config", str(path), "--dry-run", *over]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("train:")]
    assert len(err) == 1 and needle in err[0], err


def test_a_warmup_longer_than_the_run_is_said(tmp_path, data_dir, base_model, capsys):
    from megadrp.train import main

    cfg = tiny_run_config(tmp_path, data_dir, "continue", "c", model={"init": str(base_model)})
    path = write_config(tmp_path / "c.yaml", **cfg)
    assert main(["--config", str(path), "--dry-run", "train.warmup_steps=50"]) == 0
    assert "note: train.warmup_steps=50 is more than train.steps=12" in capsys.readouterr().out


def test_eval_checks_its_out_before_work_and_caps_what_the_split_holds(tmp_path, data_dir, base_model):
    p = _megadrp("eval", "--model", str(base_model), "--data", str(data_dir), "--out", str(tmp_path))
    assert p.returncode == 2 and "a directory; give the path of the JSON file" in p.stderr
    p = _megadrp("eval", "--model", str(base_model), "--data", str(data_dir), "--tokens-per-domain", "100000000",
                 "--seq-len", "32", "--out", str(tmp_path / "e.json"), check=True)
    res = json.loads((tmp_path / "e.json").read_text())
    assert set(res["capped"]) == set(res["windows"]) and all(res["capped"][d] == 32 * n for d, n in res["windows"].items())
    assert p.stderr.count("fewer than --tokens-per-domain 100000000 asks") == len(res["windows"])


def test_extensions_folder_is_per_environment(monkeypatch):
    from megadrp.runtime.build_locks import pin_extensions_dir

    env: dict[str, str] = {"PATH": "/usr/bin:/bin"}
    here = pin_extensions_dir(env)
    assert env["TORCH_EXTENSIONS_DIR"] == here and "/torch_extensions/megadrp-" in here
    own = Path(sys.executable).parent
    if (own / "ninja").is_file():  # this environment's ninja builds, whatever the shell's PATH says
        assert env["PATH"].split(os.pathsep)[0] == str(own)
    monkeypatch.setattr(sys, "prefix", "/another/venv")
    assert pin_extensions_dir({}) != here
    assert pin_extensions_dir({"TORCH_EXTENSIONS_DIR": "/mine"}) == "/mine"  # the user's own wins


def test_data_dir_follows_the_umask(tmp_path, corpus, tokenizer):
    old = os.umask(0o022)
    try:
        _megadrp("preprocess", "--input", f"p={corpus / 'prose.jsonl'}", "--tokenizer", str(tokenizer),
                 "--out", str(tmp_path / "d"), "--eval-docs", "5", check=True)
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


@pytest.mark.slow
def test_ctrl_c_on_the_demo_stops_every_rank_and_says_so(tmp_path):
    """SIGINT to the demo's process group (what Ctrl-C sends) once a stage's ranks are starting:
    the stage stops, the demo waits for it, exits 130 with one line, no traceback, and no rank is
    left running; the launcher's INFO lines were not on the console."""
    # SIGINT as a terminal leaves it: a test run started in the background (`cmd &` in a script)
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    p = subprocess.Popen([PY, "-m", "megadrp", "demo", "--out", str(tmp_path / "d"), "--scale", "0.2"], cwd=ROOT,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    lines = []
    deadline = time.time() + 600
    while time.time() < deadline:
        line = p.stderr.readline()
        lines.append(line)
        if "pretrain: training" in line:  # the launcher is starting the ranks
            time.sleep(5)  # into their start-up (the stop handlers are installed first thing)
            break
    os.killpg(p.pid, signal.SIGINT)
    _, rest = p.communicate(timeout=300)
    err = "".join(lines) + rest
    assert p.returncode == 130 and "interrupted; rerun the same command" in err, err[-3000:]
    assert "Traceback" not in err and "[INFO]" not in err, err[-3000:]
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "d")], capture_output=True, text=True).stdout.split()
    assert left == [], (left, err[-2000:])
