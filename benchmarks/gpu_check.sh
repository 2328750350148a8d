#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: a ~1B Llama pruned on one GPU in bf16 ZeRO-3 for a few
# minutes; records tokens/s and model FLOPs utilisation with the GPU's name in
# benchmarks/results/gpu_check.{json,md}.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to pick the interpreter; STEPS=40
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-40}
WORK=${WORK:-runs/gpu_check}
mkdir -p "$WORK"
"$PYTHON" - "$WORK" "$STEPS" <<'PY'
import json, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, ".")
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from megadrp import pipeline
work, steps = Path(sys.argv[1]), int(sys.argv[2])
assert torch.cuda.is_available(), "gpu_check needs a CUDA GPU"
data = pipeline.prepare_data(work, docs_per_domain=4000, eval_docs=20)
cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=128, max_position_embeddings=4096,
                  eos_token_id=2, bos_token_id=1)
src = work / "source"
if not (src / "config.json").exists():
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
seq, gb = 2048, 16
run_dir = work / "prune"
overrides = [f"data_dir={data}", f"model.init={src}", f"run_dir={run_dir}", "resume=none", f"train.steps={steps}",
             f"train.seq_len={seq}", f"train.global_batch={gb}", "train.micro_batch=8", "train.num_workers=4",
             "eval.at_start=false", f"eval.interval={steps // 2}", "eval.tokens_per_domain=16384", "eval.micro_batch=8",
             "save.interval=0", "deepspeed=ds_configs/zero3_bf16.json", "model.activation_checkpointing=true",
             "prune.target.num_hidden_layers=12", "prune.target.hidden_size=1536", "prune.target.num_attention_heads=12",
             "prune.target.num_key_value_heads=12", "prune.target.intermediate_size=4096", "train.log_interval=5"]
t0 = time.time()
subprocess.run([sys.executable, "megadrp/train.py", "--config", "configs/tiny/prune.yaml", *overrides], check=True)
rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
secs = sum(r.get("train_seconds", 0) for r in rows[1:])  # the first interval includes warm-up
toks = sum(r["tokens"][k] for k in rows[-1]["tokens"]) - sum(rows[0]["tokens"].values())
tps = toks / secs
n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
flops_per_token = 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
name = torch.cuda.get_device_name(0)
peak = 989e12 if ("H100" in name or "H200" in name) else 312e12  # dense bf16
res = {"gpu": name, "parameters": n, "seq_len": seq, "global_batch": gb, "steps": steps,
       "tokens_per_s": round(tps, 1), "mfu": round(tps * flops_per_token / peak, 4), "peak_flops": peak,
       "wall_seconds": round(time.time() - t0, 1), "note": "activation checkpointing recomputes the forward; MFU counts 6N+attention only"}
out = Path("benchmarks/results")
out.mkdir(parents=True, exist_ok=True)
(out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
(out / "gpu_check.md").write_text(f"# gpu_check\n\nCommand: `bash benchmarks/gpu_check.sh`\n\n| GPU | params | tokens/s | MFU |\n|---|---|---|---|\n"
                                  f"| {name} | {n:,} | {tps:,.0f} | {res['mfu']:.1%} |\n")
print(json.dumps(res))
PY
