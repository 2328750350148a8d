"""RUN report: tables and plots from metrics.jsonl files (Markdown + PNG).

    megadrp report --out runs/demo --prune runs/demo/prune --continue runs/demo/continue
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from megadrp.dro.scaling_law import predict
from megadrp.engine.metrics import read_metrics
from megadrp.runtime.files import atomic_write_text, read_json
from megadrp.runtime.run_dir import RunDir


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_losses(runs: dict[str, list[dict]], out: Path) -> Path:
    """Per-domain eval loss over steps, the fitted scaling-law curves and the reference losses."""
    plt = _plt()
    names = list(next(iter(runs.values()))[0]["eval_loss"])
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    offset = 0
    for stage, m in runs.items():
        steps = np.array([r["step"] for r in m]) + offset
        for i, n in enumerate(names):
            ax = axes[i // cols][i % cols]
            ax.plot(steps, [r["eval_loss"][n] for r in m], "o-", ms=2, label=f"{stage} eval loss")
            ref = [(s, r["reference_loss"][n]) for s, r in zip(steps, m) if r.get("reference_loss")]
            if ref:
                ax.plot(*zip(*ref), "--", label=f"{stage} reference")
            fit = next((r for r in reversed(m) if r.get("controller") and r["controller"]["fits"].get(n)), None)
            if fit is not None:
                # the mean of the best fits' curves, as the reference loss is their mean prediction
                toks = np.array([max(r["tokens"][n], 1) for r in m])
                curves = []
                for f in fit["controller"]["fits"][n]:
                    theta = np.array([f["log_A"], f["b"], f["log_E"]] + ([f["b2"]] if "b2" in f else []))
                    sp = np.array([r.get("expected_sparsity") or 1e-3 for r in m]) if "b2" in f else None
                    curves.append(predict(theta, toks, sp))
                ax.plot(steps, np.mean(curves, axis=0), ":", label=f"{stage} fitted law (mean of best fits)")
            ax.set_title(n)
            ax.set_xlabel("step (stages back to back)")
            seen = [r["eval_loss"][n] for mm in runs.values() for r in mm]
            pad = 0.1 * (max(seen) - min(seen) + 1e-3)
            ax.set_ylim(min(seen) - 4 * pad, max(seen) + pad)  # fitted curves can start far off-scale
        offset = steps[-1]
    axes[0][0].legend(fontsize=7)
    return _save(plt, fig, out / "eval_loss.png")


def plot_weights(runs: dict[str, list[dict]], out: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 3.5), squeeze=False)
    for ax, (stage, m) in zip(axes[0], runs.items()):
        steps = [r["step"] for r in m]
        for n in m[0]["weights"]:
            ax.plot(steps, [r["weights"][n] for r in m], label=n)
        ax.set_title(f"{stage}: domain weights q")
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    return _save(plt, fig, out / "weights.png")


def plot_shape(m: list[dict], out: Path) -> Path:
    """The masks' expected shape against the ramped target, and the λ's that pull one to the other."""
    plt = _plt()
    keys = ["layers", "hidden", "heads", "intermediate"]
    rows = [r for r in m if r.get("expected_shape")]
    has_lambdas = any(r.get("lambdas") for r in rows)
    fig, axes = plt.subplots(1, 6 if has_lambdas else 4, figsize=(24 if has_lambdas else 16, 3))
    steps = [r["step"] for r in rows]
    for ax, k in zip(axes, keys):
        ax.plot(steps, [r["expected_shape"][k] for r in rows], label="expected")
        if any(r.get("target_shape") for r in rows):
            ax.plot(steps, [r["target_shape"][k] if r.get("target_shape") else np.nan for r in rows], "--",
                    label="target (ramped)")
        ax.set_title(k)
        ax.set_xlabel("prune step")
    axes[0].legend(fontsize=7)
    if has_lambdas:
        # λ1 and λ2 on their own axes: λ2 may start in the hundreds (prune.lambda2_init) and
        # would flatten λ1, the one that shows wind-up.
        sets = next(r["lambdas"] for r in rows if r.get("lambdas"))
        for j, (ax, name) in enumerate(zip(axes[4:], ("λ1", "λ2"))):
            for s in sets:
                ax.plot(steps, [r["lambdas"][s][j] if r.get("lambdas") else np.nan for r in rows], label=s)
            ax.set_title(f"Lagrange multiplier {name}")
            ax.set_xlabel("prune step")
            ax.legend(fontsize=6)
    return _save(plt, fig, out / "expected_shape.png")


def plot_ppl(evals: dict[str, dict], out: Path) -> Path:
    plt = _plt()
    names = list(next(iter(evals.values()))["domain_ppl"])
    x = np.arange(len(names))
    w = 0.8 / len(evals)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 3.5))
    for i, (label, ev) in enumerate(evals.items()):
        ax.bar(x + i * w, [ev["domain_ppl"][n] for n in names], w, label=label)
    ax.set_xticks(x + w * (len(evals) - 1) / 2, names)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity")
    ax.legend()
    return _save(plt, fig, out / "perplexity.png")


SHIFTS = (("uniform", "uniform mix"), ("p0_mix", "p0 mix"), ("worst_chi2", "worst χ² mix"))


def ppl_table(evals: dict[str, dict]) -> str:
    """Per-domain perplexity, and (from `evaluate --shift`) the perplexity under the uniform
    mix, p0 and the worst mix in the χ² ball around p0."""
    names = list(next(iter(evals.values()))["domain_ppl"])
    shift = all("shift" in ev for ev in evals.values())
    head = ["mean", "worst"] + ([label for _, label in SHIFTS] if shift else [])
    lines = ["| model | " + " | ".join(names + head) + " |", "|---" * (len(names) + len(head) + 1) + "|"]
    for label, ev in evals.items():
        cells = [ev["domain_ppl"][n] for n in names] + [ev["mean_ppl"], ev["worst_ppl"]]
        cells += [ev["shift"][k]["ppl"] for k, _ in SHIFTS] if shift else []
        lines.append(f"| {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    if shift:
        sh = next(iter(evals.values()))["shift"]
        lines += ["", f"Mixes weigh each domain's mean token loss: p0 = {_fmt_mix(sh['p0'])}; the worst χ² mix "
                  f"(ρ = {sh['rho']:g}) of the last model: {_fmt_mix(list(evals.values())[-1]['shift']['worst_chi2']['mix'])}."]
    return "\n".join(lines)


def _fmt_mix(mix: dict[str, float]) -> str:
    return ", ".join(f"{n} {v:.3f}" for n, v in mix.items())


def prediction_table(runs: dict[str, list[dict]]) -> str:
    """Scaling-law prediction accuracy per stage (metrics.prediction_accuracy); empty when no
    stage fitted a law."""
    from megadrp.engine.metrics import prediction_accuracy

    lines = []
    for stage, rows in runs.items():
        for frac, a in prediction_accuracy(rows).items():
            lines.append(f"| {stage} | {frac} (step {a['step']}) | {a['mape']:.2f}% | "
                         + ", ".join(f"{n} {v:.1f}%" for n, v in a["per_domain"].items()) + " |")
    if not lines:
        return ""
    return "\n".join(["| stage | predicted at | mean abs. error vs the stage's final eval loss | per domain |",
                      "|---|---|---|---|", *lines])


def cost_table(stages: dict[str, Path]) -> str:
    """Each stage's cost as planned (RUN_DIR/cost.json: FLOPs by part) beside what the clock
    measured (metrics.jsonl's seconds by part); empty where no stage has both."""
    from megadrp.cost_ledger import measured

    lines = []
    for stage, path in stages.items():
        rd = RunDir(path)
        if not (rd.cost.is_file() and rd.metrics.is_file()):
            continue
        plan, secs = read_json(rd.cost), measured(read_metrics(rd.metrics, events=True))
        total = sum(secs.values()) or 1.0
        # the teacher's forward runs inside the training steps: the clock sees them as one
        train_share = sum(plan["share"].get(k, 0.0) for k in ("train", "teacher"))
        rows = [("training (+ teacher)" if "teacher" in plan["share"] else "training", train_share, secs["train"]),
                ("held-out evaluation", plan["share"]["eval"], secs["eval"]),
                ("reference losses", plan["share"].get("reference", 0.0), secs["reference"])]
        rest = total - sum(s for _, _, s in rows)
        lines += [f"| {stage} | {label} | {share:.1%} | {sec:,.0f} s ({sec / total:.1%}) |" for label, share, sec in rows]
        lines.append(f"| {stage} | start-up, saves, export, controller, other | not planned | {rest:,.0f} s "
                     f"({rest / total:.1%}) |")
    if not lines:
        return ""
    return "\n".join(["| stage | part | planned share of the FLOPs | measured seconds (share of the run's) |",
                      "|---|---|---|---|", *lines])


def write_report(out: Path, stages: dict[str, Path], evals: dict[str, dict], extra: str = "") -> Path:
    runs = {k: read_metrics(RunDir(v).metrics) for k, v in stages.items() if RunDir(v).metrics.is_file()}
    # updates without a held-out evaluation (a training-loss signal) have weights but no eval loss
    evaluated = {k: [r for r in rows if r.get("eval_loss")] for k, rows in runs.items()}
    splits = {ev.get("split", "eval") for ev in evals.values()}
    where = ("the test split: documents no training run opened" if splits == {"test"} else
             "the eval split, which the runs evaluated and steered their domain schedule by (this DATA_DIR has no "
             "test split: `megadrp preprocess --test-docs N` makes one)" if splits == {"eval"} else
             f"mixed splits ({', '.join(sorted(splits))})")
    parts = ["# megadrp report", "", extra, "", "## Per-domain perplexity (megadrp eval, transformers)", "",
             f"Scored on {where}.", "", ppl_table(evals), "", "![perplexity](perplexity.png)", ""]
    plot_ppl(evals, out)
    if runs:
        plot_losses({k: v for k, v in evaluated.items() if k != "pretrain"} or evaluated, out)
        plot_weights({k: v for k, v in runs.items() if k != "pretrain"} or runs, out)
        parts += ["## Eval loss, fitted scaling laws and reference losses", "", "![eval loss](eval_loss.png)", ""]
        pred = prediction_table(runs)
        if pred:
            parts += ["How well the fitted laws foresaw each stage's end: the end-of-stage loss predicted at 25%, "
                      "50% and 75% of the stage against the eval loss reached.", "", pred, ""]
        parts += ["## Domain weights", "", "![weights](weights.png)", ""]
    costs = cost_table(stages)
    if costs:
        parts += ["## Cost: the plan beside the measurement", "", "FLOPs by part from the plan (megadrp/cost_ledger.py; "
                  "`megadrp train --dry-run` prints it with GPU-hours), seconds by part from the run's clock "
                  "(metrics.jsonl). On a CPU the shares differ from a GPU's: there evaluation runs at the training "
                  "steps' throughput, here small forward passes are slower per FLOP.", "", costs, ""]
    if "prune" in runs:
        plot_shape(evaluated["prune"], out)
        last = evaluated["prune"][-1]
        parts += ["## Expected shape while pruning", "", "![shape](expected_shape.png)", "",
                  f"Final expected shape: {', '.join(f'{k} {v:.1f}' for k, v in last['expected_shape'].items())}", ""]
        final_w = " | ".join(f"{n} {v:.3f}" for n, v in last["weights"].items())
        parts += [f"Final domain weights of pruning: {final_w}", ""]
    return atomic_write_text(RunDir(out).report, "\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--pretrain", type=Path)
    ap.add_argument("--prune", type=Path)
    ap.add_argument("--continue", dest="cont", type=Path)
    args = ap.parse_args(argv)

    labels = {"pretrain": "base", "prune": "pruned", "continue": "continued"}
    dirs = {k: v for k, v in (("pretrain", args.pretrain), ("prune", args.prune), ("continue", args.cont)) if v}
    evals = {labels[k]: read_json(RunDir(v).eval_json) for k, v in dirs.items() if RunDir(v).eval_json.is_file()}
    print(write_report(args.out, {k: v for k, v in dirs.items() if k != "pretrain"}, evals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
