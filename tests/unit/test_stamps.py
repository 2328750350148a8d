"""Stage stamps (megadrp/tools/stamps.py): a finished stage of the demo or a benchmark is reused
only when it was made from the same config, overrides, ranks and inputs."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megadrp.tools import pipeline, stamps

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _done_stage(path: Path, stamp: dict) -> Path:
    """A finished stage as train_stage leaves one: status done, an export, its stamp."""
    (path / "hf").mkdir(parents=True)
    (path / "hf" / "config.json").write_text("{}")
    (path / "status.json").write_text(json.dumps({"state": "done", "time": 0}))
    stamps.write(path, stamp)
    return path


def test_a_stamp_names_what_changed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    stamps.write(data, {"corpus": "embedded", "seed": 0})
    over = [f"data_dir={data}", "model.init=null"]
    a = stamps.stage_stamp("configs/tiny/pretrain.yaml", over, 2)
    assert stamps.difference(a, stamps.stage_stamp("configs/tiny/pretrain.yaml", over, 2)) is None
    assert stamps.difference(a, stamps.stage_stamp("configs/tiny/pretrain.yaml", over + ["train.steps=50"], 2)) \
        == "train.steps: 250 then, 50 now"
    assert stamps.difference(a, stamps.stage_stamp("configs/tiny/pretrain.yaml", over, 1)) == "ranks: 2 then, 1 now"
    # the run directory and resume policy are where and how, not what: they do not count
    assert stamps.difference(a, stamps.stage_stamp("configs/tiny/pretrain.yaml", over + ["run_dir=x", "resume=none"],
                                                   2)) is None
    stamps.write(data, {"corpus": "embedded", "seed": 1})  # the DATA_DIR was rebuilt from another draw
    assert stamps.difference(a, stamps.stage_stamp("configs/tiny/pretrain.yaml", over, 2)) == "inputs.data_dir differs"
    assert "no record" in stamps.difference(None, a)


def test_a_stage_made_otherwise_is_refused_untouched_or_rebuilt(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    stamps.write(data, {"corpus": "embedded"})
    over = [f"data_dir={data}"]
    stage = _done_stage(tmp_path / "pretrain", stamps.stage_stamp("configs/tiny/pretrain.yaml",
                                                                   over + ["train.steps=25"], 2))
    before = _digest(stage)
    with pytest.raises(SystemExit, match=r"pretrain was made from other inputs \(train.steps: 25 then, 250 now\)"):
        pipeline.train_stage("configs/tiny/pretrain.yaml", stage, over, reuse="refuse")
    with pytest.raises(SystemExit, match="made from other inputs"):  # adopt: only a stage without a stamp
        pipeline.train_stage("configs/tiny/pretrain.yaml", stage, over, reuse="adopt")
    assert _digest(stage) == before
    assert pipeline.train_stage("configs/tiny/pretrain.yaml", stage, over + ["train.steps=25"], reuse="refuse") == 0.0
    assert "pretrain: reusing" in capsys.readouterr().err
    (stage / stamps.STAMP).unlink()  # made before stamps existed
    with pytest.raises(SystemExit, match="no record of what it was made from"):
        pipeline.train_stage("configs/tiny/pretrain.yaml", stage, over, reuse="refuse")
    assert pipeline.train_stage("configs/tiny/pretrain.yaml", stage, over, reuse="adopt") == 0.0
    assert stamps.read(stage) == stamps.stage_stamp("configs/tiny/pretrain.yaml", over, 2)
    pipeline._stale("pretrain", stage, "train.steps: 25 then, 250 now", "rebuild")
    assert not stage.exists()
    assert "pretrain: " + str(stage) + " was made from other inputs (train.steps: 25 then, 250 now); rebuilding it " \
        "and what follows" in capsys.readouterr().err


def test_data_is_rebuilt_when_the_corpus_changes(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("aa", "bb"):
        (corpus / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} document {i} " * 8}) + "\n"
                                                      for i in range(40)))
    out = tmp_path / "demo"
    data = pipeline.prepare_data(out, corpus, vocab=300, eval_docs=5, test_docs=5)
    tokens = json.loads((data / "manifest.json").read_text())["domains"]["aa"]["train_tokens"]
    assert pipeline.prepare_data(out, corpus, vocab=300, eval_docs=5, test_docs=5) == data
    assert "data: reusing" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="made from other inputs"):
        pipeline.prepare_data(out, corpus, vocab=300, eval_docs=6, test_docs=5, reuse="refuse")
    (corpus / "aa.jsonl").write_text("".join(json.dumps({"text": f"other text {i} " * 20}) + "\n" for i in range(40)))
    pipeline.prepare_data(out, corpus, vocab=300, eval_docs=5, test_docs=5)
    assert "rebuilding it and what follows" in capsys.readouterr().err
    assert json.loads((data / "manifest.json").read_text())["domains"]["aa"]["train_tokens"] != tokens


@pytest.mark.parametrize("args,needle", [(["--scale", "0"], "--scale=0.0: a positive number"),
                                         (["--scale", "-1"], "--scale=-1.0"), (["--scale", "nan"], "--scale=nan"),
                                         (["--ranks", "0"], "--ranks=0: at least 1"),
                                         (["--mode", "dro-lite"], "invalid choice: 'dro-lite'")])
def test_demo_refuses_bad_flags_before_any_work(tmp_path, args, needle):
    p = subprocess.run([sys.executable, "-m", "megadrp", "demo", "--out", str(tmp_path / "d"), *args],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2 and needle in p.stderr and not (tmp_path / "d").exists(), p.stderr[-1500:]


def test_the_console_relay_drops_launcher_noise_and_a_ctrl_c_traceback_only(monkeypatch):
    """What `sh` copies from a step's stderr: INFO lines and a traceback ending in
    KeyboardInterrupt are left out; any other traceback is copied whole, and so is a cut one."""
    import io

    monkeypatch.setattr(pipeline, "VERBOSE", False)
    tb = ["Traceback (most recent call last):\n", '  File "x.py", line 3, in <module>\n', "    import y\n"]
    err = "".join(tb) + "RuntimeError: the rank failed\n"
    text = ("[2026-01-01] [INFO] [launch.py:1] cmd = python train.py\nstep 1\n" + "".join(tb) + "KeyboardInterrupt\n"
            + "\nstep 2\n" + err + "".join(tb))
    sink = io.StringIO()
    pipeline._relay(io.BytesIO(text.encode()), sink)
    assert sink.getvalue() == "step 1\n\nstep 2\n" + err + "".join(tb)

    # once the user has pressed Ctrl-C, every traceback is a consequence of it (ninja's build
    # stopped, then the op's ImportError): none is copied, the other lines are
    import threading

    stopped = threading.Event()
    stopped.set()
    sink = io.StringIO()
    pipeline._relay(io.BytesIO(("ninja: build stopped: interrupted by user.\n" + err + err + "".join(tb)).encode()),
                    sink, stopped)
    assert sink.getvalue() == "ninja: build stopped: interrupted by user.\n"

    # torch.distributed prefixes a rank's uncaught traceback with "[rankN]: ": still a traceback
    ranked = "".join(f"[rank1]: {line}" for line in [*tb, "RuntimeError: Connection closed by peer\n"])
    sink = io.StringIO()
    pipeline._relay(io.BytesIO(("step 3\n" + ranked).encode()), sink, stopped)
    assert sink.getvalue() == "step 3\n"
    sink = io.StringIO()
    pipeline._relay(io.BytesIO(ranked.encode()), sink)
    assert sink.getvalue() == ranked  # not interrupted: copied whole
