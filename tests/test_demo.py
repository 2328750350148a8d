"""The README's first command (`make demo` = `python -m megadrp.demo`), scaled down to ten
steps a stage: the whole main job on the embedded default, then a rerun that reuses it."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import PY, run

pytestmark = pytest.mark.slow


def test_demo_end_to_end_then_reuse(tmp_path):
    out = tmp_path / "demo"
    cmd = [PY, "-m", "megadrp.demo", "--out", str(out), "--scale", "0.04"]
    first = run(cmd, timeout=1500)
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

    again = run(cmd, timeout=600)
    for stage in ("data", "pretrain", "prune", "continue"):
        assert f"{stage}: reusing" in again.stderr, stage
