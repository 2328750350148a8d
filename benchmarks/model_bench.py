"""Training-step time (forward + backward, CPU fp32, ~20M parameters) of: megadrp's model
with masks sampling, megadrp's model without masks, and transformers' LlamaForCausalLM of
the same shape — side by side in one run; and the pruned export against a freshly built
model of the target shape.

    python benchmarks/model_bench.py
"""
from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from _common import best_of, save


def main() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from megadrp.model.hf_io import export_hf
    from megadrp.model.llama import MaskedLlama, count_parameters
    from megadrp.model.masks import Shape
    from megadrp.model.prune import prune_state_dict

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=64)
    target = Shape(layers=4, hidden=384, heads=6, kv_heads=6, intermediate=688)
    n = count_parameters(cfg)
    hf = LlamaForCausalLM(cfg)
    ours = MaskedLlama(cfg, target, ramp_steps=10)
    ours.load_state_dict(hf.state_dict(), strict=False)
    plain = MaskedLlama(cfg)
    plain.load_state_dict(hf.state_dict())
    x = torch.randint(0, 8192, (4, 257))

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
    fresh = LlamaForCausalLM(small_cfg)
    fns = {"megadrp, masks sampling": step_ours(ours, True), "megadrp, no masks": step_ours(plain, False),
           "transformers LlamaForCausalLM": step_hf(hf), "pruned export (transformers)": step_hf(exported),
           "fresh model of the target shape (transformers)": step_hf(fresh)}
    for f in fns.values():
        f()
    times = {k: 0.0 for k in fns}
    for _ in range(3):  # interleave rounds so machine noise hits every variant alike
        for k, f in fns.items():
            t = best_of(f, repeats=2)
            times[k] = t if times[k] == 0 else min(times[k], t)
    r = {k: round(v * 1000, 1) for k, v in times.items()}
    ratios = {"masked / unmasked": round(times["megadrp, masks sampling"] / times["megadrp, no masks"], 3),
              "ours unmasked / transformers": round(times["megadrp, no masks"] / times["transformers LlamaForCausalLM"], 3),
              "pruned export / fresh target-shape model": round(times["pruned export (transformers)"] /
                                                               times["fresh model of the target shape (transformers)"], 3)}
    md = ["| model | step ms (min of 6) |", "|---|---|"] + [f"| {k} | {v} |" for k, v in r.items()]
    md += ["", "| ratio | value | goal |", "|---|---|---|",
           f"| masked / unmasked | {ratios['masked / unmasked']} | ≤ 1.10 |",
           f"| ours unmasked / transformers | {ratios['ours unmasked / transformers']} | ≤ 1.00 |",
           f"| pruned export / fresh target-shape model | {ratios['pruned export / fresh target-shape model']} | ≈ 1.00 |",
           "", f"Source model {n:,} parameters (batch 4 × 256 tokens); target {count_parameters(small_cfg):,}."]
    save("model_step", {"step_ms": r, "ratios": ratios, "parameters": n}, "\n".join(md))


if __name__ == "__main__":
    main()
