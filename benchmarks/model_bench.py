"""Training-step time (forward + backward, CPU fp32, ~20M parameters) of: megadrp's model
with masks sampling, megadrp's model without masks, and transformers' LlamaForCausalLM of
the same shape — side by side in one run; and the pruned export against a freshly built
model of the target shape.

    python benchmarks/model_bench.py [--rounds 15] [--threads N] [--batch 4] [--family llama|qwen2|qwen3|gpt_neox]

`--family qwen2`: a Qwen2-shaped model (GQA 8/2, q/k/v biases, tied embeddings) against
`Qwen2ForCausalLM`; `qwen3`: GQA 8/2 with per-head q/k norms and head_dim 80 against
`Qwen3ForCausalLM`; `gpt_neox`: Pythia's layout (LayerNorm with bias, fused q/k/v, a quarter of each
head rotated, parallel residual, GELU) against `GPTNeoXForCausalLM`. Results under
model_step_<family> (model_step for llama) unless --name says otherwise.

Variants run interleaved, one step each per round, so machine noise hits each alike; a
ratio is the median over rounds of the two variants' same-round ratio.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from _common import paired_median, rotated, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15, help="rounds of one step per variant")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--batch", type=int, default=4, help="sequences of 256 tokens per step")
    ap.add_argument("--family", choices=("llama", "qwen2", "qwen3", "gpt_neox"), default="llama")
    ap.add_argument("--name", default=None, help="results file name under benchmarks/results "
                    "(default model_step, or model_step_<family>)")
    args = ap.parse_args()
    args.name = args.name or ("model_step" if args.family == "llama" else f"model_step_{args.family}")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Qwen2Config, Qwen3Config

    from megadrp.model.hf_io import export_hf
    from megadrp.model.llama import MaskedLlama, count_parameters
    from megadrp.model.masks import Shape
    from megadrp.model.prune import prune_state_dict

    torch.manual_seed(0)
    shape = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8)
    if args.family == "qwen2":
        cfg = Qwen2Config(**shape, num_key_value_heads=2, tie_word_embeddings=True)
        target = Shape(layers=4, hidden=384, heads=4, kv_heads=1, intermediate=688)
    elif args.family == "qwen3":
        cfg = Qwen3Config(**shape, num_key_value_heads=2, head_dim=80)
        target = Shape(layers=4, hidden=384, heads=4, kv_heads=1, intermediate=688)
    elif args.family == "gpt_neox":
        cfg = GPTNeoXConfig(**shape, rotary_pct=0.25)
        target = Shape(layers=4, hidden=384, heads=6, kv_heads=6, intermediate=688)  # hidden = heads × 64
    else:
        cfg = LlamaConfig(**shape, num_key_value_heads=8, head_dim=64)
        target = Shape(layers=4, hidden=384, heads=6, kv_heads=6, intermediate=688)
    hf_cls = getattr(transformers, type(cfg).__name__.replace("Config", "ForCausalLM"))
    n = count_parameters(cfg)
    hf = hf_cls(cfg)
    ours = MaskedLlama(cfg, target, ramp_steps=10)
    ours.load_state_dict(hf.state_dict(), strict=False)
    plain = MaskedLlama(cfg)
    plain.load_state_dict(hf.state_dict())
    x = torch.randint(0, 8192, (args.batch, 257))

    def step_ours(model, masks):
        def f():
            out = model(x[:, :-1], x[:, 1:], step=5, mask_mode="sample" if masks else None)
            loss = out.losses.mean() + (out.lagrangian if out.lagrangian is not None else 0)
            loss.backward()
        return f

    def step_hf(model):
        def f():
            logits = model(input_ids=x[:, :-1]).logits
            F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
        return f

    with torch.no_grad():
        z, _, _ = ours.l0(0, "final")
        sd = {k: v for k, v in ours.state_dict().items() if not k.startswith("l0.")}
        small_sd, small_cfg = prune_state_dict(sd, cfg, z)
    with tempfile.TemporaryDirectory() as tmp:
        exported = AutoModelForCausalLM.from_pretrained(export_hf(small_sd, small_cfg, f"{tmp}/hf"))
    fresh = hf_cls(small_cfg)
    hf_name = f"transformers {hf_cls.__name__}"
    fns = {"megadrp, masks sampling": step_ours(ours, True), "megadrp, no masks": step_ours(plain, False),
           hf_name: step_hf(hf), "pruned export (transformers)": step_hf(exported),
           "fresh model of the target shape (transformers)": step_hf(fresh)}
    for f in fns.values():
        f()
    names = list(fns)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.rounds):  # one step of each variant per round, in rotated order
        for k in rotated(names, r):
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
    pairs = {"masked / unmasked": ("megadrp, masks sampling", "megadrp, no masks", "≤ 1.10"),
             "ours unmasked / transformers": ("megadrp, no masks", hf_name, "≤ 1.00"),
             "pruned export / fresh target-shape model": ("pruned export (transformers)",
                                                          "fresh model of the target shape (transformers)", "≈ 1.00")}
    ratios = {name: round(paired_median(samples[a], samples[b]), 3)
              for name, (a, b, _) in pairs.items()}
    ratio_of_minima = {name: round(min(samples[a]) / min(samples[b]), 3) for name, (a, b, _) in pairs.items()}
    r = {k: round(min(v) * 1000, 1) for k, v in samples.items()}
    med = {k: round(statistics.median(v) * 1000, 1) for k, v in samples.items()}
    md = [f"| model | step ms, min of {args.rounds} | median |", "|---|---|---|"]
    md += [f"| {k} | {r[k]} | {med[k]} |" for k in names]
    md += ["", "| ratio | median of paired ratios | ratio of minima | goal |", "|---|---|---|---|"]
    md += [f"| {name} | {ratios[name]} | {ratio_of_minima[name]} | {goal} |" for name, (_, _, goal) in pairs.items()]
    md += ["", f"Source model {n:,} parameters (batch {args.batch} × 256 tokens); target {count_parameters(small_cfg):,}; "
           f"{torch.get_num_threads()} torch threads; {args.rounds} rounds, one step of each variant per round "
           "in rotated order."]
    save(args.name, {"family": args.family, "batch": args.batch, "step_ms": r, "median_step_ms": med, "ratios": ratios, "ratio_of_minima": ratio_of_minima,
                        "parameters": n, "rounds": args.rounds,
                        "threads": torch.get_num_threads()}, "\n".join(md))


if __name__ == "__main__":
    main()
