"""The README's first command (`make demo` = `megadrp demo`), scaled down to ten steps a stage:
the whole main job on the embedded default, from a non-editable install (`pip install .`) run in
an empty directory outside the checkout; then a rerun through the older documented name
(`python -m megadrp.demo`) that reuses every stage."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import PY, ROOT, run

pytestmark = pytest.mark.slow


def test_demo_end_to_end_then_reuse(tmp_path):
    site, empty = tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    # megadrp alone, not editable (its dependencies are this environment's); nothing of the
    # checkout is on the path: the recipes and DeepSpeed JSONs must come with the package
    run([PY, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(ROOT)], timeout=600)
    env = {"PYTHONPATH": str(site)}
    where = run([PY, "-c", "import megadrp; print(megadrp.__file__)"], env=env, cwd=empty).stdout
    assert where.startswith(str(site)), where
    out = empty / "demo"
    first = run([str(site / "bin" / "megadrp"), "demo", "--out", "demo", "--scale", "0.04"], timeout=1500, env=env,
                cwd=empty)
    text = (out / "report.md").read_text()
    for label in ("base", "pruned", "continued"):
        assert f"| {label} |" in text, label
        ev = json.loads((out / {"base": "pretrain", "pruned": "prune", "continued": "continue"}[label]
                         / "eval.json").read_text())
        assert ev["shift"]["p0_mix"]["loss"] <= ev["shift"]["worst_chi2"]["loss"] <= ev["shift"]["worst_domain"]["loss"]
    assert "| worst χ² mix |" in text and "p0 mix" in text  # evaluate --shift's columns
    for png in ("perplexity.png", "eval_loss.png", "weights.png", "expected_shape.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    params = {s: json.loads((out / s / "hf" / "megadrp.json").read_text())["parameters"]
              for s in ("pretrain", "prune", "continue")}
    assert params["prune"] < 0.7 * params["pretrain"] and params["continue"] == params["prune"]
    assert "report:" in first.stderr and str(out / "continue" / "hf") in first.stderr

    from transformers import AutoModelForCausalLM, AutoTokenizer  # what the demo tells the user to run

    model = AutoModelForCausalLM.from_pretrained(out / "continue" / "hf")
    tok = AutoTokenizer.from_pretrained(out / "continue" / "hf")
    ids = tok("def add(a, b):", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()

    again = run([PY, "-m", "megadrp.demo", "--out", str(out), "--scale", "0.04"], timeout=600)
    for stage in ("data", "pretrain", "prune", "continue"):
        assert f"{stage}: reusing" in again.stderr, stage
