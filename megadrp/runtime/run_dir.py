"""The run directory: one class that owns every path in it, so its layout is written down once
(docs/run_dir.md describes each file).

    RUN_DIR/config.yaml       the resolved config of the last start
    RUN_DIR/metrics.jsonl     one JSON object per evaluation
    RUN_DIR/status.json       {"state": done | interrupted | failed | retry, "time": ...}
    RUN_DIR/checkpoints/      stepNNNNNNNN/ DeepSpeed files + megadrp_state.pt
    RUN_DIR/hf/               the exported Hugging Face model
    RUN_DIR/controller.pid    the controller process of the running job
    RUN_DIR/reference_losses.json  reference losses measured from a model (cached: measured once)
    RUN_DIR/wandb_id          the wandb run every segment of this run logs to
    RUN_DIR/cost.json         the cost ledger of the plan (megadrp/cost_ledger.py): FLOPs by part, GPU-hours
    RUN_DIR/eval.json, report.md, *.png   what the demo and the tools add
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from megadrp.errors import ConfigError
from megadrp.runtime.files import atomic_write_text

STATES = ("done", "interrupted", "failed", "retry")


class RunDir:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    status = property(lambda self: self.root / "status.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    hf = property(lambda self: self.root / "hf")
    controller_pid = property(lambda self: self.root / "controller.pid")
    reference_losses = property(lambda self: self.root / "reference_losses.json")
    cost = property(lambda self: self.root / "cost.json")
    eval_json = property(lambda self: self.root / "eval.json")
    report = property(lambda self: self.root / "report.md")

    # ---- status.json -----------------------------------------------------------------------
    def state(self) -> str | None:
        """The state status.json records, or None where there is none (or it is unreadable:
        a status is never a reason to fail)."""
        try:
            return json.loads(self.status.read_text()).get("state")
        except (OSError, ValueError, AttributeError):
            return None

    def write_state(self, state: str) -> None:
        assert state in STATES, state
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.status, json.dumps({"state": state, "time": time.time()}) + "\n")

    def done(self) -> bool:
        """A finished stage: status `done` and an exported model."""
        return self.state() == "done" and (self.hf / "config.json").is_file()

    # ---- before a start --------------------------------------------------------------------
    def validate(self, resume: str, overwrite: bool) -> None:
        """What `check` refuses, without writing anything (the dry run's half of it): a path that
        is a file or under no writable directory, a finished run that `resume: none` would start
        over in."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"run_dir {self.root}: a file, not a directory; choose another run_dir")
        probe = self.root if self.root.exists() else next(p for p in self.root.parents if p.exists())
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"run_dir {self.root}: cannot write under {probe}; choose a writable run_dir")
        if resume == "none" and not overwrite and self.state() == "done":
            raise ConfigError(f"run_dir {self.root} holds a finished run ({self.status}: done) and resume=none would "
                              "start over in it; choose another run_dir, or pass overwrite=true to replace it")

    def check(self, resume: str, overwrite: bool) -> None:
        """`validate`, then make the directory and prove it writable."""
        self.validate(resume, overwrite)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"run_dir {self.root}: cannot write there ({e.strerror}); choose a writable run_dir") \
                from e
