"""A ~0.94B Llama pruned on one GPU in bf16 ZeRO-3 for a few minutes: training tokens/s and
model FLOPs utilisation, recorded with the GPU's name.

    python benchmarks/gpu_check.py                  # on a CUDA GPU (or: bash benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --smoke --out /tmp/x   # the same path on CPU, tiny shape (tests)

MFU counts model FLOPs only (PaLM's 6N + 12·L·d·T per token, N the source model's
parameters, since the masked model runs at full size while pruning): activation
checkpointing's recomputed forward is not credited. Peak bf16 FLOP/s are looked up from the
GPU's name, or given with --peak-tflops.

`--smoke` exists so the script itself is tested on every CI run: a GPU check that breaks on
its first GPU wastes a scarce machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, machine

SHAPES = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=16, head_dim=128),
    "smoke": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
TARGETS = {
    "1b": dict(num_hidden_layers=12, hidden_size=1536, num_attention_heads=12, num_key_value_heads=12,
               intermediate_size=4096),
    "smoke": dict(num_hidden_layers=1, hidden_size=48, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64),
}
# dense bf16 tensor-core peak, by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def model_flops_per_token(n_params: int, layers: int, hidden: int, seq: int) -> float:
    return 6.0 * n_params + 12.0 * layers * hidden * seq


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def measured(run_dir: Path) -> tuple[float, float]:
    """(tokens, seconds) of training after the first logged interval (which holds warm-up)."""
    from megadrp.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    timed = [r for r in rows if r.get("train_seconds")]
    if len(timed) < 2:
        raise SystemExit(f"gpu_check: {run_dir}/metrics.jsonl has {len(timed)} timed rows; need 2 (more --steps)")
    tokens = sum(timed[-1]["tokens"].values()) - sum(timed[0]["tokens"].values())
    return float(tokens), float(sum(r["train_seconds"] for r in timed[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape: checks the script, measures nothing useful")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "gpu_check")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where gpu_check.{json,md} go")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if its name is not known here")
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megadrp import pipeline
    from megadrp.model.llama import count_parameters

    shape = "smoke" if args.smoke else "1b"
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); --smoke runs on CPU")
    seq, gb, micro = (64, 4, 2) if args.smoke else (2048, 16, 8)
    data = pipeline.prepare_data(args.work, docs_per_domain=200 if args.smoke else 4000, eval_docs=20)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 128), eos_token_id=2, bos_token_id=1)
    src = args.work / f"source_{shape}"
    if not (src / "config.json").exists():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        (model if args.smoke else model.to(torch.bfloat16)).save_pretrained(src)
    n_params = count_parameters(cfg)
    run_dir = args.work / f"prune_{shape}"
    overrides = [f"data_dir={data}", f"model.init={src}", f"run_dir={run_dir}", "resume=none",
                 f"train.steps={args.steps}", f"train.seq_len={seq}", f"train.global_batch={gb}",
                 f"train.micro_batch={micro}", f"train.num_workers={1 if args.smoke else 4}", "eval.at_start=false",
                 f"eval.interval={max(1, args.steps // 2)}", f"eval.tokens_per_domain={1024 if args.smoke else 16384}",
                 f"eval.micro_batch={micro}", "save.interval=0", "train.log_interval=5",
                 f"deepspeed=ds_configs/{'zero3_cpu' if args.smoke else 'zero3_bf16'}.json",
                 f"model.activation_checkpointing={'false' if args.smoke else 'true'}"]
    overrides += [f"prune.target.{k}={v}" for k, v in TARGETS[shape].items()]
    t0 = time.time()
    subprocess.run([sys.executable, str(ROOT / "megadrp" / "train.py"), "--config",
                    str(ROOT / "configs" / "tiny" / "prune.yaml"), *overrides], check=True, cwd=ROOT)
    tokens, seconds = measured(run_dir)
    tps = tokens / seconds
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "cpu"
    peak = peak_flops(device, args.peak_tflops)
    flops = model_flops_per_token(n_params, cfg.num_hidden_layers, cfg.hidden_size, seq)
    res = {"device": device, "shape": shape, "parameters": n_params, "seq_len": seq, "global_batch": gb,
           "steps": args.steps, "tokens_per_s": round(tps, 1), "model_flops_per_token": flops,
           "peak_flops": peak, "mfu": None if peak is None else round(tps * flops / peak, 4),
           "wall_seconds": round(time.time() - t0, 1), "machine": machine(),
           "note": "MFU counts 6N + 12·L·d·T model FLOPs per token; activation checkpointing's recompute is not credited"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
    mfu = "n/a (unknown peak)" if res["mfu"] is None else f"{res['mfu']:.1%}"
    (args.out / "gpu_check.md").write_text(
        f"# gpu_check\n\nCommand: `python benchmarks/gpu_check.py{' --smoke' if args.smoke else ''}`\n\n"
        f"| device | source params | seq | tokens/s | MFU |\n|---|---|---|---|---|\n"
        f"| {device} | {n_params:,} | {seq} | {tps:,.0f} | {mfu} |\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
