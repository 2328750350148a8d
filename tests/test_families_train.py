"""A tiny multilingual Qwen2 prune end to end (issue #14): parquet and .jsonl.zst corpora
written here → preprocess → 2-rank ZeRO-3 prune with SPEC §4's mask sets (head,
intermediate, hidden; layers kept) and p0 ∝ tokens^0.3 → a `Qwen2ForCausalLM` export
whose loss `megadrp.evaluate` reproduces."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from conftest import PY, metrics, run, tiny_run_config, write_config

from megadrp.runtime.launch import free_port

pytestmark = pytest.mark.slow
TARGET = {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
          "intermediate_size": 64}


def _texts(path: Path) -> list[str]:
    return [json.loads(x)["text"] for x in path.read_text().splitlines() if x.strip()]


def _multilingual_data(corpus: Path, tokenizer: Path, tmp: Path) -> Path:
    """Three 'languages' in the formats of the real datasets: a glob of parquet files
    (CulturaX), one parquet file, a .jsonl.zst (SlimPajama)."""
    src = tmp / "src"
    (src / "en").mkdir(parents=True)
    en = _texts(corpus / "prose.jsonl")
    for i, part in enumerate((en[:150], en[150:])):
        pq.write_table(pa.table({"text": part}), src / "en" / f"en_part_{i:05d}.parquet", row_group_size=64)
    pq.write_table(pa.table({"text": _texts(corpus / "code.jsonl")[:200]}), src / "zh.parquet", row_group_size=50)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in _texts(corpus / "lang2.jsonl")).encode()
    (src / "ru.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    out = tmp / "data"
    run([PY, "data_tools/preprocess.py", "--input", f"en={src}/en/*.parquet", "--input", f"ru={src}/ru.jsonl.zst",
         "--input", f"zh={src}/zh.parquet", "--tokenizer", str(tokenizer), "--out", str(out), "--eval-docs", "20"])
    return out


def _tiny_qwen2(out: Path) -> Path:
    """Qwen2's small-size layout: tied embeddings, q/k/v biases (made non-zero), GQA."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return out


def _prune_two_ranks(tmp: Path, data: Path, base: Path, name: str, sets: list[str], target: dict,
                     **over) -> tuple[Path, list]:
    """A few prune steps on 2 ranks ZeRO-3, evaluation every 4; returns the run dir and its metrics."""
    cfg = tiny_run_config(tmp, data, "prune", name, model={"init": str(base)},
                          prune={"target": target, "sets": sets, "mask_lr": 0.5, "lambda_lr": 0.5},
                          train={"steps": 8}, save={"interval": 0, "keep": 1}, **over)
    path = write_config(tmp / f"{name}.yaml", **cfg)
    run([str(Path(PY).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
         "megadrp/train.py", "--config", str(path)], timeout=900)
    run_dir = Path(cfg["run_dir"])
    m = metrics(run_dir)
    assert [r["step"] for r in m] == [0, 4, 8] and m[-1]["world_size"] == 2
    return run_dir, m


def _check_export(run_dir: Path, data: Path, m: list, cls_name: str, target: dict) -> None:
    """The export loads as the family's own class, has the target shape and the tokenizer the
    data was made with (the source's, in a real run), and megadrp.evaluate reproduces the run's
    last eval loss within 1%."""
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert type(model) is getattr(transformers, cls_name)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == tuple(target.values())
    assert (run_dir / "hf" / "tokenizer_config.json").is_file()  # the tokenizer the data was made with
    p = run([PY, "-m", "megadrp.evaluate", "--model", str(run_dir / "hf"), "--data", str(data), "--shift",
             "--split", "eval"])
    ev = json.loads(p.stdout.strip().splitlines()[-1])  # window, size, p0 and ρ from RUN_DIR/config.yaml
    for d, v in m[-1]["eval_loss"].items():
        assert abs(ev["domain_loss"][d] - v) / v < 0.01, (d, ev["domain_loss"][d], v)
    # --shift: p0 is the run's own (its first weights), the worst χ² mix lies between the p0
    # mix and the worst domain and on the ball's edge (or is that domain)
    from megadrp.dro.weights import chi2

    sh, loss = ev["shift"], ev["domain_loss"]
    names = list(loss)
    assert np.allclose([sh["p0"][d] for d in names], [m[0]["weights"][d] for d in names], atol=1e-9)
    assert sh["uniform"]["loss"] == pytest.approx(np.mean(list(loss.values())))
    assert sh["p0_mix"]["loss"] == pytest.approx(sum(sh["p0"][d] * loss[d] for d in names))
    assert sh["worst_domain"]["loss"] == max(loss.values()) and loss[sh["worst_domain"]["domain"]] == max(loss.values())
    assert sh["p0_mix"]["loss"] <= sh["worst_chi2"]["loss"] <= sh["worst_domain"]["loss"]
    q, p0 = (np.array([x[d] for d in names]) for x in (sh["worst_chi2"]["mix"], sh["p0"]))
    assert chi2(q, p0) <= sh["rho"] * (1 + 1e-6) and sh["rho"] == 0.1


def test_multilingual_qwen2_prune_two_ranks(tmp_path, corpus, tokenizer):
    data = _multilingual_data(corpus, tokenizer, tmp_path)
    base = _tiny_qwen2(tmp_path / "qwen2")
    run_dir, m = _prune_two_ranks(tmp_path, data, base, "qwen2_prune", ["head", "intermediate", "hidden"], TARGET,
                                  dro={"mode": "drpruning", "reference_loss": "auto", "fit_start": 0.3,
                                       "history_start": 0.0, "initial_proportion": "tokens^0.3"})
    manifest = json.loads((data / "manifest.json").read_text())
    tok = np.array([manifest["domains"][d]["train_tokens"] for d in ("en", "ru", "zh")], dtype=float) ** 0.3
    assert np.allclose([m[0]["weights"][d] for d in ("en", "ru", "zh")], tok / tok.sum(), atol=1e-12)
    assert m[-1]["expected_shape"]["layers"] == 3  # no layer mask trained
    saved = json.loads((run_dir / "hf" / "config.json").read_text())
    assert saved["architectures"] == ["Qwen2ForCausalLM"] and saved["model_type"] == "qwen2"
    assert saved["head_dim"] == 16 and saved["tie_word_embeddings"] is True
    _check_export(run_dir, data, m, "Qwen2ForCausalLM", TARGET)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run_dir / "hf").model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("name,cls_name", [("llama3.1", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM")])
def test_family_prune_two_ranks_evaluates_the_same(name, cls_name, tmp_path, data_dir):
    """Llama 3.1 (GQA, llama3 rope scaling) and Mistral (a sliding window no shorter than the
    sequence) prune every set on 2 ranks and export to their own class."""
    import shutil

    from test_families import _source

    _source(tmp_path, name, vocab=1024)
    for f in Path(data_dir / "tokenizer").iterdir():  # the source ships its tokenizer, with a chat template
        shutil.copy2(f, tmp_path / name / f.name)
    (tmp_path / name / "chat_template.jinja").write_text("{{ messages }}")
    target = {**TARGET, "num_hidden_layers": 2}
    run_dir, m = _prune_two_ranks(tmp_path, data_dir, tmp_path / name, f"{name}_prune",
                                  ["layer", "head", "intermediate", "hidden"], target)
    assert m[-1]["expected_shape"]["layers"] < 3  # the layer mask trained
    _check_export(run_dir, data_dir, m, cls_name, target)
    assert (run_dir / "hf" / "chat_template.jinja").read_text() == "{{ messages }}"  # the source's own files


def test_export_tokenizer_is_the_sources_only_with_the_datas_vocabulary(tmp_path, tokenizer):
    from megadrp.engine.export import tokenizer_source

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    assert tokenizer_source(str(src), tokenizer) == tokenizer  # no tokenizer files: the data's
    assert tokenizer_source(None, tokenizer) == tokenizer
    for f in Path(tokenizer).iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    assert tokenizer_source(str(src), tokenizer) == src  # same vocabulary: the source's
    tj = json.loads((src / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tok, idx = next((k, v) for k, v in vocab.items() if v > 100)
    vocab["zz_other_" + tok] = vocab.pop(tok)  # one token differs: another vocabulary
    (src / "tokenizer.json").write_text(json.dumps(tj))
    assert tokenizer_source(str(src), tokenizer) == tokenizer


@pytest.mark.parametrize("name,cls_name,target", [
    ("qwen3", "Qwen3ForCausalLM", {"num_hidden_layers": 2, "hidden_size": 40, "num_attention_heads": 2,
                                   "num_key_value_heads": 1, "intermediate_size": 64}),
    ("pythia", "GPTNeoXForCausalLM", {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                                      "num_key_value_heads": 2, "intermediate_size": 64}),
])
def test_new_family_prune_two_ranks_exports_what_it_evaluated(name, cls_name, target, tmp_path, data_dir):
    """Qwen3 (per-head q/k norms, head_dim 24 ≠ hidden/heads) and GPT-NeoX (Pythia's LayerNorm,
    fused q/k/v, partial rotary, parallel residual) prune every set on 2 ranks ZeRO-3; the export
    is the family's own class with the target shape, and `megadrp eval` of it reproduces the
    run's last evaluation (the exported masks) to 1e-4."""
    import shutil

    import transformers
    from test_families import _neox, _source
    from transformers import AutoModelForCausalLM

    src = tmp_path / name
    (_neox if name == "pythia" else _source)(tmp_path, name, vocab=1024)
    for f in Path(data_dir / "tokenizer").iterdir():
        shutil.copy2(f, src / f.name)
    run_dir, m = _prune_two_ranks(tmp_path, data_dir, src, f"{name}_prune", ["layer", "head", "intermediate", "hidden"],
                                  target)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert type(model) is getattr(transformers, cls_name)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (
        target["num_hidden_layers"], target["hidden_size"], target["num_attention_heads"], target["intermediate_size"])
    p = run([PY, "-m", "megadrp", "eval", "--model", str(run_dir / "hf"), "--data", str(data_dir), "--split", "eval"])
    ev = json.loads(p.stdout.strip().splitlines()[-1])["domain_loss"]
    for d, v in m[-1]["eval_loss"].items():
        assert abs(ev[d] - v) / v < 1e-4, (d, ev[d], v)
