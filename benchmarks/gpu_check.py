"""The first figures on a GPU, in one command of a few minutes (`bash benchmarks/gpu_check.sh`).

    python benchmarks/gpu_check.py                        # on a CUDA GPU
    python benchmarks/gpu_check.py --smoke --out /tmp/x   # the same path on the CPU, tiny shapes (tests)

Checks, each recorded in benchmarks/results/gpu_check.{json,md}:
1. numerics: a tiny masked Llama's fp32 loss and gradients on the GPU against the CPU; bf16 with
   activation checkpointing against fp32 on the GPU (loss within 2%, gradient cosine ≥ 0.98);
2. kernels: the flash SDPA kernel runs in a bf16 forward (the profiler names it);
3. a ~0.94B random Llama pruned through `megadrp/train.py` on ZeRO-3 bf16 (`ds_configs/zero3_bf16.json`,
   torch's fused AdamW, nothing compiled) with a target that keeps every layer, for `--steps` steps:
   training tokens/s, model FLOPs utilisation, and the peak memory against the memory plan's
   prediction for the same run;
4. distillation's step cost: a frozen teacher of the ~0.94B shape and students at the 7B → 2.7B and
   7B → 1.3B proportions (width ×0.625, and width ×0.5 with ¾ of the layers), bf16, the LM step
   against the KD step (teacher forward + chunked KL), interleaved, with 1 + N_t / (3·N_s) beside
   it (#30's goal: ≤ 1.6; CPU ratios follow the CPU's kernel speeds, not the FLOPs, and cannot say).

MFU counts model FLOPs only (PaLM's 6N + 12·L·d·T per token, N the source model's parameters,
since the masked model runs at full size while pruning): activation checkpointing's recomputed
forward is not credited. Peak bf16 FLOP/s are looked up from the GPU's name, or given with
--peak-tflops. `--smoke` runs the whole path on the CPU in every CI run: a check that breaks on
its first GPU wastes a scarce machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, machine, paired_median, rotated

from megadrp.runtime.run_dir import RunDir

SHAPES = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=16, head_dim=128),
    "smoke": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
# keep every layer (the 7B → 2.7B, Qwen2 and Llama-3.1 recipes do): the layer set is inactive
TARGETS = {
    "1b": dict(num_hidden_layers=16, hidden_size=1536, num_attention_heads=12, num_key_value_heads=12,
               intermediate_size=4096),
    "smoke": dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=2, num_key_value_heads=1,
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


def measured(run_dir: Path) -> tuple[float, float, dict | None]:
    """(tokens, seconds) of training after the first timed interval (which holds warm-up), and
    the last evaluation's device memory peaks (None on the CPU)."""
    from megadrp.engine.metrics import read_metrics

    rows = read_metrics(RunDir(run_dir).metrics)
    timed = [r for r in rows if r.get("train_seconds")]
    if len(timed) < 2:
        raise SystemExit(f"gpu_check: {run_dir}/metrics.jsonl has {len(timed)} timed rows; need 2 (more --steps)")
    tokens = sum(timed[-1]["tokens"].values()) - sum(timed[0]["tokens"].values())
    return float(tokens), float(sum(r["train_seconds"] for r in timed[1:])), rows[-1].get("device_memory")


# ---- 1. numerics ---------------------------------------------------------------------------
def _loss_and_grads(model, ids, device, dtype):
    import torch

    m = model.to(device=device, dtype=dtype).train()
    if m.l0 is not None:
        m.l0.float()  # as the engine's fp32 master would score them
    m.zero_grad(set_to_none=True)
    x = ids.to(device)
    out = m(x[:, :-1], x[:, 1:], step=5, mask_mode="expected")
    loss = out.losses.float().mean() + out.lagrangian.float()
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in m.named_parameters() if p.grad is not None}
    return float(loss), grads, torch


def numerics(device: str) -> dict:
    """GPU fp32 against CPU fp32 (the same model, deterministic masks: the noise generators of
    the two devices differ by design); bf16 with checkpointing against fp32 on the device."""
    import copy

    import torch
    from transformers import LlamaConfig

    from megadrp.model.llama import MaskedLlama
    from megadrp.model.masks import Shape

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(0)
    base = MaskedLlama(cfg, Shape(3, 96, 4, 2, 256), ramp_steps=10)
    base.init_weights()
    with torch.no_grad():
        for p in base.l0.log_alpha.values():
            p.normal_(2.0, 1.5)
    ids = torch.randint(0, 512, (4, 129), generator=torch.Generator().manual_seed(1))
    cpu_loss, cpu_g, _ = _loss_and_grads(copy.deepcopy(base), ids, "cpu", torch.float32)
    dev_loss, dev_g, _ = _loss_and_grads(copy.deepcopy(base), ids, device, torch.float32)
    ck = copy.deepcopy(base)
    ck.checkpointed_layers = cfg.num_hidden_layers
    bf_loss, bf_g, _ = _loss_and_grads(ck, ids, device, torch.bfloat16)

    def rel(a, b):
        return max(float((a[n] - b[n]).abs().max() / (b[n].abs().max() + 1e-12)) for n in b)

    def cosine(a, b):
        va, vb = torch.cat([a[n].flatten() for n in b]), torch.cat([b[n].flatten() for n in b])
        return float(torch.nn.functional.cosine_similarity(va, vb, dim=0))

    res = {"fp32_loss_device": dev_loss, "fp32_loss_cpu": cpu_loss,
           "fp32_loss_rel_diff": abs(dev_loss - cpu_loss) / abs(cpu_loss),
           "fp32_grad_max_rel_diff": rel(dev_g, cpu_g),
           "bf16_ckpt_loss": bf_loss, "bf16_loss_rel_diff": abs(bf_loss - dev_loss) / abs(dev_loss),
           "bf16_grad_cosine": cosine(bf_g, dev_g)}
    res["pass"] = (res["fp32_loss_rel_diff"] < 1e-4 and res["fp32_grad_max_rel_diff"] < 1e-3
                   and res["bf16_loss_rel_diff"] <= 0.02 and res["bf16_grad_cosine"] >= 0.98)
    return res


# ---- 2. kernels ----------------------------------------------------------------------------
def sdpa_kernels(device: str) -> dict:
    """The attention kernels a bf16 training forward of the masked model launches."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig

    from megadrp.model.llama import MaskedLlama

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
    m = MaskedLlama(cfg).to(device=device, dtype=torch.bfloat16).train()
    x = torch.randint(0, 512, (2, 1025), device=device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        m(x[:, :-1], x[:, 1:]).losses.mean().backward()
    names = {e.name for e in prof.events()}
    attn = sorted(n for n in names if "attention" in n.lower() or "flash" in n.lower() or "fmha" in n.lower())
    return {"kernels": attn[:12], "flash": any("flash" in n.lower() for n in attn)}


# ---- 4. the distillation step --------------------------------------------------------------
def kd_step(device: str, shape: str, rounds: int = 12) -> dict:
    """KD / LM step time (median of same-round ratios) for a teacher of SHAPES[shape] and students
    at the recipes' proportions, on `device` (bf16 on a GPU, fp32 on the CPU)."""
    import statistics

    import torch
    from transformers import LlamaConfig

    from megadrp.model.distill import Teacher
    from megadrp.model.llama import MaskedLlama, count_parameters

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t_shape = SHAPES[shape]
    d, ffn, layers, heads = (t_shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads"))
    students = {"7B→2.7B proportion": (5 * d // 8, 5 * ffn // 8, layers, 5 * heads // 8),
                "7B→1.3B proportion": (d // 2, ffn // 2, 3 * layers // 4, heads // 2)}
    seq, batch, chunk = (64, 2, 64) if shape == "smoke" else (2048, 2, 2048)
    vocab = t_shape["vocab_size"]
    torch.manual_seed(0)
    t_cfg = LlamaConfig(**t_shape, max_position_embeddings=seq)
    teacher = MaskedLlama(t_cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    x = torch.randint(0, vocab, (batch, seq + 1), device=device)
    fns, info = {}, {}
    for name, (sd, sffn, sl, sh) in students.items():
        s_cfg = LlamaConfig(vocab_size=vocab, hidden_size=sd, intermediate_size=sffn, num_hidden_layers=sl,
                            num_attention_heads=sh, num_key_value_heads=sh, head_dim=sd // sh, max_position_embeddings=seq)
        student = MaskedLlama(s_cfg).to(device=device, dtype=dtype).train()

        def lm(student=student):
            student(x[:, :-1], x[:, 1:]).losses.mean().backward()

        def kd(student=student):
            with torch.no_grad():
                hidden = teacher(x[:, :-1], hidden_only=True)
            student(x[:, :-1], x[:, 1:], teacher=Teacher(hidden, teacher.lm_head, 1.0, 1.0, chunk)).kd.mean().backward()

        fns[(name, "lm")], fns[(name, "kd")] = lm, kd
        n_t, n_s = count_parameters(t_cfg), count_parameters(s_cfg)
        info[name] = {"teacher_parameters": n_t, "student_parameters": n_s, "arithmetic": round(1 + n_t / (3 * n_s), 3)}
    times: dict[tuple[str, str], list[float]] = {k: [] for k in fns}
    for r in range(rounds + 1):  # round 0 warms up
        for k in rotated(list(fns), r):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fns[k]()
            if device == "cuda":
                torch.cuda.synchronize()
            if r:
                times[k].append(time.perf_counter() - t0)
    for name in students:
        lm_t, kd_t = times[(name, "lm")], times[(name, "kd")]
        info[name].update(lm_ms=round(statistics.median(lm_t) * 1000, 2), kd_ms=round(statistics.median(kd_t) * 1000, 2),
                          ratio=round(paired_median(kd_t, lm_t), 3))
    return {"tokens": batch * seq, "chunk_tokens": chunk, "dtype": str(dtype), "pairs": info}


# ---- 3. the prune run --------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape: checks the script, measures nothing useful")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "gpu_check")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where gpu_check.{json,md} go")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if its name is not known here")
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megadrp.config import load_config
    from megadrp.model.llama import count_parameters
    from megadrp.plan import GIB, dry_run
    from megadrp.tools import pipeline

    shape = "smoke" if args.smoke else "1b"
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); --smoke runs on CPU")
    device = "cpu" if args.smoke else "cuda"
    t0 = time.time()
    checks = {"numerics": numerics(device), "sdpa": sdpa_kernels(device), "kd_step": kd_step(device, shape)}
    print(json.dumps(checks), flush=True)
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
    config = str(ROOT / "configs" / "tiny" / "prune.yaml")
    overrides = [f"data_dir={data}", f"model.init={src}", f"run_dir={run_dir}", "resume=none", "overwrite=true",
                 f"train.steps={args.steps}", f"train.seq_len={seq}", f"train.global_batch={gb}",
                 f"train.micro_batch={micro}", f"train.num_workers={1 if args.smoke else 4}", "eval.at_start=false",
                 f"eval.interval={max(1, args.steps // 2)}", f"eval.tokens_per_domain={1024 if args.smoke else 16384}",
                 f"eval.micro_batch={micro}", "save.interval=0", "train.log_interval=5",
                 f"deepspeed=ds_configs/{'zero3_cpu' if args.smoke else 'zero3_bf16'}.json",
                 f"model.activation_checkpointing={'false' if args.smoke else 'true'}"]
    overrides += [f"prune.target.{k}={v}" for k, v in TARGETS[shape].items()]
    subprocess.run([sys.executable, str(ROOT / "megadrp" / "train.py"), "--config", config, *overrides],
                   check=True, cwd=ROOT)
    tokens, seconds, memory = measured(run_dir)
    plan = dry_run(load_config(config, overrides), 1, None, check_disk=False).data["memory"]
    tps = tokens / seconds
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = peak_flops(name, args.peak_tflops)
    flops = model_flops_per_token(n_params, cfg.num_hidden_layers, cfg.hidden_size, seq)
    # the plan's terms that torch's allocator sees (not the CUDA context, NCCL, fragmentation)
    allocated_plan = plan["memory_per_gpu_bytes"] - plan["terms"]["runtime_reserve"] - plan["terms"]["fragmentation"]
    res = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "shape": shape,
           "parameters": n_params, "seq_len": seq, "global_batch": gb, "micro_batch": micro, "steps": args.steps,
           "tokens_per_s": round(tps, 1), "model_flops_per_token": flops, "peak_flops": peak,
           "mfu": None if peak is None else round(tps * flops / peak, 4),
           "peak_allocated_bytes": memory and memory["peak_allocated"],
           "peak_reserved_bytes": memory and memory["peak_reserved"],
           "plan_bytes": plan["memory_per_gpu_bytes"], "plan_allocated_bytes": allocated_plan,
           "plan_vs_peak_allocated": memory and round(allocated_plan / memory["peak_allocated"] - 1, 4),
           **checks, "wall_seconds": round(time.time() - t0, 1), "machine": machine(),
           "note": "MFU counts 6N + 12·L·d·T model FLOPs per token; activation checkpointing's recompute is not "
                   "credited. plan_allocated_bytes: the plan less its runtime reserve and fragmentation share, "
                   "against torch.cuda.max_memory_allocated"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
    mfu = "n/a (unknown peak)" if res["mfu"] is None else f"{res['mfu']:.1%}"
    mem = ("n/a (CPU)" if memory is None else
           f"{memory['peak_allocated'] / GIB:.1f} GiB allocated (plan {allocated_plan / GIB:.1f}, "
           f"{res['plan_vs_peak_allocated']:+.1%}); {memory['peak_reserved'] / GIB:.1f} GiB reserved (plan in all "
           f"{plan['memory_per_gpu_bytes'] / GIB:.1f})")
    nm = checks["numerics"]
    (args.out / "gpu_check.md").write_text(
        f"# gpu_check\n\nCommand: `python benchmarks/gpu_check.py{' --smoke' if args.smoke else ''}`  \n"
        f"torch {torch.__version__}, CUDA {torch.version.cuda}\n\n"
        f"| device | source params | seq | tokens/s | MFU | peak memory |\n|---|---|---|---|---|---|\n"
        f"| {name} | {n_params:,} | {seq} | {tps:,.0f} | {mfu} | {mem} |\n\n"
        f"Numerics ({'pass' if nm['pass'] else 'FAIL'}): fp32 loss vs CPU {nm['fp32_loss_rel_diff']:.1e}, "
        f"gradients {nm['fp32_grad_max_rel_diff']:.1e}; bf16 + checkpointing vs fp32: loss "
        f"{nm['bf16_loss_rel_diff']:.2%}, gradient cosine {nm['bf16_grad_cosine']:.4f}.  \n"
        f"Attention kernels: {', '.join(checks['sdpa']['kernels']) or 'none seen'} "
        f"(flash: {checks['sdpa']['flash']}).  \n"
        "Distillation step, KD / LM (goal ≤ 1.6): " + "; ".join(
            f"{k} {v['ratio']:.2f}× (by FLOPs {v['arithmetic']:.2f}×)" for k, v in checks["kd_step"]["pairs"].items())
        + ".\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
