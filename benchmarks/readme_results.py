"""The README's results blocks, rendered from the committed results files (never typed by hand):
the ablation on both corpora (benchmarks/results/ablation*.json), the pruning methods side by side
(methods.json) and the cheaper signals (signal.json), all scored on the test split.

    python benchmarks/readme_results.py           # print the block
    python benchmarks/readme_results.py --write   # put it into README.md between its markers

tests/unit/test_readme_results.py keeps README.md equal to what this renders. A difference whose
95% interval includes zero is written as no measurable difference, never as a lead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START = "<!-- results: python benchmarks/readme_results.py --write -->"
END = "<!-- end of results -->"
BLOCKS = ("results", "methods", "signal")  # each between <!-- NAME: ... --> and <!-- end of NAME -->
CORPORA = (("ablation", "embedded"), ("ablation_debian", "Debian text"))
COLUMNS = (("mean_ppl", "mean ppl"), ("worst_ppl", "worst domain"), ("worst_ratio", "worst ratio to source"),
           ("worst_chi2_ppl", "worst χ² mix"))
# every metric the ablation pairs, as the sentences name it
LABELS = {"mean_ppl": "mean", "worst_ppl": "worst domain", "worst_ratio": "largest ratio to the source",
          "worst_chi2_ppl": "worst χ² mix", "uniform_ppl": "uniform mix"}
# what each step of the ablation adds, paired on the same seeds: (arm, against, what it adds)
STEPS = (("dro", "constant", "χ² DRO with fixed references"), ("dro_dyloss", "dro", "scaling-law references"),
         ("drpruning", "dro_dyloss", "the moving reference ratio"))


def _ci(p: dict) -> str:
    lo, hi = p["ci95"]
    return f"{p['mean']:+.1f}% [{lo:+.1f}, {hi:+.1f}]"


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def _say(p: dict, better: str = "lower") -> str:
    """'X% [lo, hi] (lower)' or '... (no measurable difference)'; one seed has no interval."""
    import math

    lo, hi = p["ci95"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{p['mean']:+.1f}% on one seed, no interval yet"
    if lo <= 0 <= hi:
        return f"{_ci(p)}, no measurable difference"
    return f"{_ci(p)}, {better if hi < 0 else 'higher'}"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def render() -> str:
    runs = [(label, data) for name, label in CORPORA if (data := _load(name)) is not None]
    if not runs:
        return "(no ablation results yet: `python benchmarks/ablation.py`)\n"
    head = "| arm | " + " | ".join(f"{label}: {c}" for label, _ in runs for _, c in COLUMNS) + " |"
    lines = [head, "|---" * (1 + len(runs) * len(COLUMNS)) + "|"]
    arms = list(runs[0][1]["results"])
    for arm in arms:
        cells = []
        for _, data in runs:
            r = data["results"].get(arm)
            cells += [f"{r[k]['mean']:.3f}" if k == "worst_ratio" else f"{r[k]['mean']:.2f}" for k, _ in COLUMNS] \
                if r else ["" for _ in COLUMNS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    text = ["Test split (documents no run opened), mean over seeds, lower is better; every seed its own "
            "held-out draw and base model, and on the embedded corpus its own corpus draw (" + "; ".join(
                f"{label}: {_seeds(data['seeds'])}, prune {data['prune_steps']} + continue {data['continue_steps']} "
                f"steps, an update every {data['eval_interval']}" for label, data in runs) + "):", "", *lines, ""]
    for label, data in runs:
        r = data["results"]
        sent = [f"**{label}**, paired over seeds (95% interval):"]
        for k in ("worst_ppl", "worst_ratio", "mean_ppl"):
            sent.append(f"drpruning vs constant, {LABELS[k]}: {_say(r['drpruning'][k]['vs_constant_pct'])}; "
                        f"vs sheared (target-size references): {_say(r['drpruning'][k]['vs_sheared_pct'])}.")
        sent.append("What each part adds, on the largest ratio to the source: " + "; ".join(
            f"{what} ({arm} vs {against}): {_say(_pair(r, arm, against, 'worst_ratio'))}"
            for arm, against, what in STEPS if arm in r and against in r) + ".")
        sent.append(_measurable(r) if data["seeds"] > 1 else "One seed: no intervals yet.")
        if "sheared_source" in r:
            sent.append("Sheared-LLaMA's schedule with the source's losses as references (megadrp's earlier setup) "
                        f"against its authors' target-size references, worst domain: "
                        f"{_say(_pair(r, 'sheared_source', 'sheared', 'worst_ppl'))}.")
        text += [" ".join(sent), ""]
    return "\n".join(text).rstrip() + "\n"


def _measurable(r: dict) -> str:
    """Every paired difference against a baseline whose interval excludes zero, on any metric:
    the sentences above pick three metrics, and a difference elsewhere must not go unsaid."""
    import math

    found = []
    for arm, rows in r.items():
        for key, label in LABELS.items():
            for base in ("constant", "sheared"):
                p = rows.get(key, {}).get(f"vs_{base}_pct")
                if p and all(math.isfinite(x) for x in p["ci95"]) and not p["ci95"][0] <= 0 <= p["ci95"][1]:
                    found.append(f"{arm} vs {base}, {label}: {_ci(p)}")
    if not found:
        return "No arm differs measurably from `constant` or `sheared` on any of the five metrics."
    return "Every difference whose interval excludes zero, on any metric: " + "; ".join(found) + "."


def _pair(r: dict, arm: str, against: str, key: str) -> dict:
    """The paired % difference arm vs against: stored for the baselines, else from the per-seed values."""
    stored = r[arm][key].get(f"vs_{against}_pct")
    if stored is not None:
        return stored
    from _common import paired

    return paired([100.0 * (a / b - 1.0) for a, b in zip(r[arm][key]["per_seed"], r[against][key]["per_seed"])])


def _mean(per_seed: list[float]) -> float:
    return sum(per_seed) / len(per_seed)


def render_methods() -> str:
    data = _load("methods")
    if data is None:
        return "(no results yet: `python benchmarks/methods.py`)\n"
    r = data["results"]
    lines = ["| method | prune cost (PFLOP) | after pruning: worst ratio to source | after continuing: worst ppl "
             "| worst ratio to source | vs reference (ratio) |", "|---|---|---|---|---|---|"]
    for arm, v in r.items():
        ratio = v["continued"]["ratio_vs_ref_pct"]
        lines.append(f"| {arm} | {v['prune_flops'] / 1e15:.4f} | {_mean(v['pruned']['worst_ratio']):.3f} "
                     f"| {_mean(v['continued']['worst_ppl']):.2f} | {_mean(v['continued']['worst_ratio']):.3f} | "
                     + ("reference" if arm == v["vs"] else f"vs {v['vs']}: {_say(ratio)}") + " |")
    warm = data["warm_start"]
    reach = [w["warm_steps"] for w in warm]
    text = [f"{data['seeds']} seeds on the embedded corpus, each its own base model; the same continue stage "
            "(drpruning) after every prune; test split, means over seeds, paired 95% intervals:", "", *lines, "",
            f"Domain-robust importance (`worst` against `mean`), largest ratio to the source after continuing: "
            f"{_say(data['worst_vs_mean_pct'])}; after the prune alone: {_say(data['worst_vs_mean_pruned_pct'])}. "
            "Prune steps the warm start needs to reach the cold start's final worst ratio (its own evaluations): "
            + ", ".join("never" if s is None else str(s) for s in reach) + "."]
    return "\n".join(text) + "\n"


def render_signal() -> str:
    data = _load("signal")
    if data is None:
        return "(no results yet: `python benchmarks/signals.py`)\n"
    lines = ["| signal | worst domain vs `eval` | largest ratio to the source vs `eval` | evaluation share of the "
             "FLOPs | of the wall-clock |", "|---|---|---|---|---|"]
    for arm, v in data["results"].items():
        lines.append(f"| {arm} | {'reference' if arm == 'eval' else _say(v['worst_ppl']['vs_eval_pct'])} | "
                     f"{'reference' if arm == 'eval' else _say(v['worst_ratio']['vs_eval_pct'])} | "
                     f"{v['eval_share_flops']:.1%} | {v['eval_share_wall']:.1%} |")
    return (f"{data['seeds']} seeds on the embedded corpus, drpruning at equal training tokens; the training-loss "
            f"signals evaluate held-out windows at every {data['held_out_every']}th update; test split, paired 95% "
            "intervals:\n\n" + "\n".join(lines) + "\n")


RENDER = {"results": render, "methods": render_methods, "signal": render_signal}


def _markers(name: str) -> tuple[str, str]:
    return (START, END) if name == "results" else (f"<!-- {name}: python benchmarks/readme_results.py --write -->",
                                                   f"<!-- end of {name} -->")


def readme_block(text: str, name: str = "results") -> str:
    start, end = _markers(name)
    if start not in text or end not in text:
        raise ValueError(f"README.md has no {name} block between {start!r} and {end!r}")
    return text.split(start, 1)[1].split(end, 1)[0].strip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name in BLOCKS:
        block = RENDER[name]()
        print(block)
        if args.write:
            readme_block(text, name)
            start, end = _markers(name)
            before, rest = text.split(start, 1)
            text = before + start + "\n" + block + end + rest.split(end, 1)[1]
    if args.write:
        readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
