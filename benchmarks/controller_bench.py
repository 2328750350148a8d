"""Controller cost per evaluation (ms) for 7 and 64 domains at a full 64-point history, in
the `drpruning` mode (scaling-law fits for every domain, χ² DRO, ratio update); and the
training step time with the controller (drpruning) and without it (constant), side by side.

    python benchmarks/controller_bench.py
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from _common import save


def controller_ms(k: int, pruning: bool, repeats: int = 3) -> float:
    from megadrp.dro.controller import Controller, ControllerSettings, Observation

    rng = np.random.default_rng(0)
    s = ControllerSettings(mode="drpruning", domains=[f"d{i}" for i in range(k)], p0=list(rng.dirichlet(np.ones(k))),
                           total_steps=1000, reference_loss=None, pruning=pruning, target_sparsity=0.5,
                           history_start=0.0, fit_start=0.0)
    c = Controller(s)
    a, e = rng.uniform(5, 20, k), rng.uniform(1, 3, k)

    def obs(step):
        d = 1e5 * step * np.ones(k)
        return Observation(step, (a * d ** -0.3 + e + rng.normal(0, 1e-3, k)).tolist(), d.tolist(), 0.5 * step / 1000)

    for step in range(1, 65):  # fill the history (fits are skipped while it is short)
        c.s.fit_start = 2.0
        c.update(obs(step))
    c.s.fit_start = 0.0
    times = []
    for step in range(65, 65 + repeats):
        t0 = time.perf_counter()
        c.update(obs(step))
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


def main() -> None:
    from megadrp import pipeline
    from megadrp.metrics import read_metrics

    cost = {f"{k} domains, {'pruning' if p else 'continued'} law": round(controller_ms(k, p), 1)
            for k in (7, 64) for p in (False, True)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = pipeline.prepare_data(tmp, docs_per_domain=800, eval_docs=20)
        base = ["data_dir=" + str(data), "train.log_interval=1000", "save.interval=0"]
        pipeline.train_stage("configs/tiny/pretrain.yaml", tmp / "base", base + ["train.steps=10"], ranks=1, quiet=True)
        step_ms = {}
        for mode in ("constant", "drpruning"):
            pipeline.train_stage("configs/tiny/continue.yaml", tmp / mode,
                                 base + [f"model.init={tmp / 'base' / 'hf'}", f"dro.mode={mode}", "train.steps=60",
                                         "dro.fit_start=0.0", "dro.history_start=0.0", "eval.interval=5"],
                                 ranks=1, quiet=True)
            rows = read_metrics(tmp / mode / "metrics.jsonl")
            secs = sum(r.get("train_seconds", 0) for r in rows)
            step_ms[mode] = round(secs / 60 * 1000, 1)
    diff = step_ms["drpruning"] / step_ms["constant"] - 1
    md = ["| controller update (one evaluation, 64-point history) | ms |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in cost.items()]
    md += ["", "| training (tiny continue, 60 steps, eval every 5) | step ms |", "|---|---|",
           f"| dro.mode=constant (no fits) | {step_ms['constant']} |",
           f"| dro.mode=drpruning (fits in the controller process) | {step_ms['drpruning']} |",
           "", f"Step-time difference: {diff:+.1%}. The controller runs in its own process; its weights take "
               "effect one evaluation later (dro.update_lag=1), so a fit overlaps the next interval's steps."]
    save("controller", {"update_ms": cost, "step_ms": step_ms, "step_time_difference": round(diff, 3)}, "\n".join(md))


if __name__ == "__main__":
    main()
