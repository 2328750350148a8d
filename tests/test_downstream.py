"""megadrp.evaluate --tasks: downstream accuracy through lm-evaluation-harness, on a local
multiple-choice task this test writes (no machine here can download the paper's datasets).
The accuracy lm-eval reports is checked against one computed here, independently, from the
model's own log-likelihoods of each choice: the plumbing (which model, which tokenizer,
which metric lands in the JSON) could not pass by accident."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from conftest import PY, run


def _task(tmp: Path, corpus: Path, n: int = 16) -> Path:
    """n two-way questions: a prose document's opening, its true next words against another
    document's."""
    docs = [json.loads(x)["text"] for x in (corpus / "prose.jsonl").read_text().splitlines()[:2 * n]]
    rows = []
    for i in range(n):
        a, b = docs[2 * i].split(), docs[2 * i + 1].split()
        rows.append({"question": " ".join(a[:12]), "choices": [" ".join(a[12:16]), " ".join(b[12:16])], "answer": 0})
    d = tmp / "tasks"
    d.mkdir()
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "mc.yaml").write_text(f"""task: megadrp_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return d


def _our_accuracy(model_dir: Path, task: Path) -> float:
    """argmax over choices of Σ log p(continuation | context), continuation = ' ' + choice,
    tokenised as lm-eval pairs them: the context's ids, then the rest of the joint text's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    right = 0
    rows = [json.loads(x) for x in (task / "mc.jsonl").read_text().splitlines()]
    for r in rows:
        lls = []
        for choice in r["choices"]:
            ctx = tok(r["question"], add_special_tokens=False)["input_ids"]
            whole = tok(r["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0]
            lls.append(float(logp[-len(cont):].gather(-1, torch.tensor(cont)[:, None]).sum()))
        right += int(max(range(len(lls)), key=lls.__getitem__) == r["answer"])
    return right / len(rows)


def test_tasks_adds_lm_eval_accuracy(tmp_path, corpus, tokenizer, data_dir, base_model):
    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    for f in Path(tokenizer).iterdir():
        shutil.copy2(f, model / f.name)
    task = _task(tmp_path, corpus)
    p = run([PY, "-m", "megadrp.evaluate", "--model", str(model), "--data", str(data_dir), "--tokens-per-domain",
             "256", "--seq-len", "32", "--tasks", "megadrp_local_mc", "--task-dir", str(task)], timeout=900)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    got = res["downstream"]["tasks"]["megadrp_local_mc"]
    assert got["sample_len"] == 16 and 0 <= got["acc"] <= 1
    assert got["acc"] == _our_accuracy(model, task)
    assert set(res["domain_loss"]) == set(json.loads((data_dir / "manifest.json").read_text())["domains"])


def test_unknown_task_is_named_before_any_work(tmp_path, data_dir, base_model):
    p = run([PY, "-m", "megadrp.evaluate", "--model", str(base_model), "--data", str(data_dir),
             "--tasks", "no_such_task_xyz", "--task-dir", str(tmp_path)], check=False)
    assert p.returncode == 2 and "no task 'no_such_task_xyz'" in p.stderr and "Traceback" not in p.stderr
