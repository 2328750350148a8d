"""The memory plan's activation model against measurement, on the CPU.

    python benchmarks/memory_model.py            # writes benchmarks/results/memory_model.{json,md}

For each model shape × activation checkpointing on/off × two micro-batches × pruning masks
on/off (bf16 weights, as the GPU recipes run; one shape also in fp32), one training forward
of megadrp's `MaskedLlama` is run under a dispatch mode that sees every tensor an operator
creates and keeps a weak reference to its storage. What is still alive when the forward
returns is what the forward keeps for backward (activations, mask gates, the loss's
log-softmax): that is compared with the plan's `retained` term
(`megadrp.memory_plan.activations`). Saved-tensor hooks count the same thing another way
(the unique storages autograd packs, parameters excluded); under checkpointing they miss
the checkpointed layers' inputs, which the checkpoint holds itself, so they are reported
beside the measurement, not compared. The peak of live bytes during the forward and backward
is reported against the plan's dynamic peak; each parameter's gradient stops counting when it
is accumulated (ZeRO-3 moves it into a reduce bucket and its partition then: the plan's
gradient terms).
"""
from __future__ import annotations

import argparse
import weakref

import torch
from _common import save
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megadrp.memory_plan import Dims, MaskGates, activations
from megadrp.model.llama import MaskedLlama, shape_of
from megadrp.model.masks import Shape

SHAPES = {
    # name: (transformers config class, kwargs)
    "llama-mha": ("LlamaConfig", dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=8, head_dim=32)),
    "llama-gqa": ("LlamaConfig", dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=3,
                                      num_attention_heads=12, num_key_value_heads=4, head_dim=32)),
    "qwen2-tied": ("Qwen2Config", dict(vocab_size=12288, hidden_size=320, intermediate_size=896, num_hidden_layers=3,
                                       num_attention_heads=10, num_key_value_heads=2, head_dim=64,
                                       tie_word_embeddings=True)),
    # Qwen3: per-head q/k RMSNorm, head_dim (48) not hidden / heads
    "qwen3": ("Qwen3Config", dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=48)),
    # GPT-NeoX / Pythia: LayerNorm with bias, fused q/k/v, a quarter of each head rotated, parallel residual
    "pythia": ("GPTNeoXConfig", dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=3,
                                     num_attention_heads=8, rotary_pct=0.25)),
    # a small vocabulary and a wide MLP: the backward's working set, not the logits, sets the peak
    "wide-mlp": ("LlamaConfig", dict(vocab_size=512, hidden_size=256, intermediate_size=2048, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
}


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive, and their peak."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude, self.live, self.now, self.peak = exclude, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t.untyped_storage())
        return out

    def _track(self, st) -> None:
        key = st.data_ptr()
        if key in self.live or key in self.exclude or st.nbytes() == 0:
            return
        self.live[key] = st.nbytes()
        self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def forget(self, t: torch.Tensor) -> None:
        """Stop counting `t` (a parameter's gradient, which ZeRO-3 moves into its reduce bucket
        and partition as soon as it is made: the plan's gradient terms, not activations)."""
        key = t.untyped_storage().data_ptr()
        self.exclude.add(key)
        self._free(key)


def saved_bytes(model, fn) -> int:
    """Unique storages autograd packs for backward during `fn()`, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def measure(shape: str, dtype: torch.dtype, micro: int, seq: int, ckpt: bool, prune: bool) -> dict:
    import transformers

    cls, kw = SHAPES[shape]
    cfg = getattr(transformers, cls)(**kw, max_position_embeddings=seq)
    src = shape_of(cfg)
    target = Shape(layers=src.layers - 1, hidden=src.hidden // 2, heads=src.heads // 2 if src.kv_heads > 1 else src.heads,
                   kv_heads=max(1, src.kv_heads // 2), intermediate=src.intermediate // 2) if prune else None
    if target is not None and target.heads != target.kv_heads * (src.heads // src.kv_heads):
        target = Shape(target.layers, target.hidden, target.kv_heads * (src.heads // src.kv_heads), target.kv_heads,
                       target.intermediate)
    torch.manual_seed(0)
    model = MaskedLlama(cfg, target, ramp_steps=10, activation_checkpointing=ckpt).to(dtype).train()
    if model.l0 is not None:  # masks and λ's stay fp32 where the engine keeps them... here they follow the module
        model.l0.float()
    ids = torch.randint(0, cfg.vocab_size, (micro, seq + 1))
    mode = "sample" if prune else None

    def forward():
        return model(ids[:, :-1], ids[:, 1:], step=3, mask_mode=mode, mask_seed=0, mask_draw=0)

    hooked, _ = saved_bytes(model, forward)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tracker = LiveBytes(params)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.forget(p.grad)) for p in model.parameters()]
    with tracker:
        out = forward()
        loss = out.losses.mean() + (out.lagrangian if out.lagrangian is not None else 0)
        retained = tracker.now
        loss.backward()
    for h in hooks:
        h.remove()
    act = 2 if dtype == torch.bfloat16 else 4
    gates = MaskGates(layer=True, head=True, intermediate=True, hidden=True) if prune else MaskGates()
    plan = activations(Dims.from_config(cfg), micro, seq, act, gates, cfg.num_hidden_layers if ckpt else 0)
    plan_peak = plan["retained"] + max(plan["logits_peak"], plan["recompute"] + plan["backward"])
    return {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "micro_batch": micro, "seq_len": seq,
            "checkpointing": ckpt, "masks": prune, "measured_retained": retained, "saved_tensor_hooks": hooked,
            "plan_retained": plan["retained"], "rel_error": plan["retained"] / retained - 1,
            "measured_peak": tracker.peak, "plan_peak": plan_peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batches", default="1,4")
    ap.add_argument("--name", default="memory_model")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    args = ap.parse_args()
    rows = []
    micro = [int(x) for x in args.micro_batches.split(",")]
    chosen = [s for s in SHAPES if s in args.shapes.split(",")]
    cases = [(s, torch.bfloat16) for s in chosen] + ([("llama-mha", torch.float32)] if "llama-mha" in chosen else [])
    for shape, dtype in cases:
        for ckpt in (False, True):
            for mb in micro:
                for prune in (False, True):
                    r = measure(shape, dtype, mb, args.seq_len, ckpt, prune)
                    rows.append(r)
                    print(f"{shape:11} {r['dtype']:8} mb {mb} ckpt {ckpt!s:5} masks {prune!s:5} "
                          f"measured {r['measured_retained'] / 2**20:8.2f} MiB plan {r['plan_retained'] / 2**20:8.2f} "
                          f"MiB ({r['rel_error']:+.1%})", flush=True)
    worst = max(rows, key=lambda r: abs(r["rel_error"]))
    md = ["| shape | dtype | micro-batch | checkpointing | masks | measured (MiB) | saved-tensor hooks (MiB) | plan (MiB) "
          "| error | peak measured / plan (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['shape']} | {r['dtype']} | {r['micro_batch']} × {r['seq_len']} | {'on' if r['checkpointing'] else 'off'} "
                  f"| {'on' if r['masks'] else 'off'} | {r['measured_retained'] / 2**20:.2f} "
                  f"| {r['saved_tensor_hooks'] / 2**20:.2f} | {r['plan_retained'] / 2**20:.2f} | {r['rel_error']:+.1%} "
                  f"| {r['measured_peak'] / 2**20:.1f} / {r['plan_peak'] / 2**20:.1f} |")
    md += ["", f"Largest relative error of the plan's retained activations: **{abs(worst['rel_error']):.1%}** "
           f"({worst['shape']}, {worst['dtype']}, micro-batch {worst['micro_batch']}, checkpointing "
           f"{'on' if worst['checkpointing'] else 'off'}, masks {'on' if worst['masks'] else 'off'}). Goal ≤ 15%.",
           "", "Measured: bytes of the storages an operator created during one training forward that are still alive "
           "when it returns (parameters excluded). Saved-tensor hooks: the unique storages autograd packs (they do not "
           "see what a checkpoint keeps). Peak: the most live bytes during forward and backward, each parameter "
           "gradient uncounted from the moment it is accumulated (ZeRO-3 buckets and partitions it then: the plan's "
           "gradient terms), against the plan's retained + max(logits peak, recomputed layer + backward working set)."]
    save(args.name, {"rows": rows, "max_rel_error": round(abs(worst["rel_error"]), 4), "goal": 0.15},
         "\n".join(md))


if __name__ == "__main__":
    main()
