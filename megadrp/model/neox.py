"""GPT-NeoX (Pythia), the second masked architecture: the blocks and the export. The masks, the
Lagrangian, the engine, the schedule, the memory plan and the export path are shared with the
Llama architecture (model/llama.py); this module holds only what the architecture does otherwise:

- LayerNorm with a bias (not RMSNorm). With the hidden mask, its mean and variance run over the
  kept dimensions only, and its output on a pruned dimension is zero (the bias would otherwise
  put a value there that no pruned model has); a kept dimension's output is exactly the pruned
  model's LayerNorm of the kept dimensions, so the export slices weight and bias (below).
- One fused query/key/value projection, laid out head by head (`[head, (q | k | v), head_dim]`
  rows), and full multi-head attention: a key/value group is one head.
- Rotary embedding on the first `partial_rotary_factor · head_dim` dimensions of each head only
  (Pythia: 25%), the rest passed through.
- A parallel residual (`use_parallel_residual`, Pythia's): attention and MLP read the same input,
  h + attn(ln₁(h)) + mlp(ln₂(h)); or the sequential one.
- A two-matrix MLP with the config's activation (GELU), biases everywhere.

Parameter names are transformers' `GPTNeoXForCausalLM`'s (`gpt_neox.layers.N.attention.dense`…,
the output layer `lm_head`, `embed_out` in older checkpoints), so a checkpoint loads directly.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from megadrp.model.families import attention_biases, prune_layer_fields, rotary_dims


class LayerNorm(nn.Module):
    """`nn.LayerNorm`'s parameters and numbers; under the hidden mask, statistics over the kept
    dimensions and a zero output on the pruned ones."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, kept: torch.Tensor | None = None, on: torch.Tensor | None = None) -> torch.Tensor:
        if on is None:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        xf = x.float()
        n = kept.clamp(min=1)
        centred = (xf - xf.sum(-1, keepdim=True) / n) * on  # pruned dims of x are zero: the sum is the kept dims'
        var = centred.pow(2).sum(-1, keepdim=True) / n
        out = centred * torch.rsqrt(var + self.eps) * self.weight.float() + self.bias.float()
        return (out * on).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class NeoXAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        from megadrp.model.llama import GatedLinear, head_dim_of

        d, self.n_heads, self.head_dim = config.hidden_size, config.num_attention_heads, head_dim_of(config)
        self.rotary = rotary_dims(config)
        bias, _ = attention_biases(config)
        self.query_key_value = nn.Linear(d, 3 * self.n_heads * self.head_dim, bias=bias)
        self.dense = GatedLinear(self.n_heads * self.head_dim, d, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                head_z: torch.Tensor | None = None, out_gate: torch.Tensor | None = None) -> torch.Tensor:
        """`head_z` [heads] gates the dense projection's input columns of each head;
        `out_gate` [d] its output rows (and bias)."""
        b, t, _ = x.shape
        hd, r = self.head_dim, self.rotary
        q, k, v = self.query_key_value(x).view(b, t, self.n_heads, 3 * hd).transpose(1, 2).chunk(3, dim=-1)
        q = torch.cat((q[..., :r] * cos + rotate_half(q[..., :r]) * sin, q[..., r:]), dim=-1)
        k = torch.cat((k[..., :r] * cos + rotate_half(k[..., :r]) * sin, k[..., r:]), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        columns = None if head_z is None else head_z.repeat_interleave(hd)
        return self.dense(y.transpose(1, 2).reshape(b, t, self.n_heads * hd), columns, out_gate)


class NeoXMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        from megadrp.model.llama import GatedLinear

        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = GatedLinear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, int_z: torch.Tensor | None = None,
                out_gate: torch.Tensor | None = None) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)), int_z, out_gate)


class NeoXBlock(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.parallel = bool(config.use_parallel_residual)
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.attention = NeoXAttention(config)
        self.mlp = NeoXMLP(config)

    # what model/importance.py's hooks read, named alike in both architectures
    attn_out = property(lambda self: self.attention.dense)
    mlp_out = property(lambda self: self.mlp.dense_4h_to_h)
    norms = property(lambda self: (self.input_layernorm, self.post_attention_layernorm))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, m) -> torch.Tensor:
        a = self.attention(self.input_layernorm(h, m.kept, m.on), cos, sin, m.head, m.out_scale)
        if self.parallel:  # summed in transformers' order: (mlp + attention) + residual
            return self.mlp(self.post_attention_layernorm(h, m.kept, m.on), m.intermediate, m.out_scale) + a + h
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h, m.kept, m.on), m.intermediate, m.out_scale)


class NeoXDecoder(nn.Module):
    """Holds what transformers keeps under `gpt_neox.` (embed_in, layers, final_layer_norm)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(NeoXBlock(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    embed = property(lambda self: self.embed_in)
    final_norm = property(lambda self: self.final_layer_norm)


def prune_state_dict(sd: dict[str, torch.Tensor], config, z: dict[str, torch.Tensor], kept) -> tuple[dict, object]:
    """GPT-NeoX's fold and slice (model/prune.py has the rules and `kept`): a head's q, k and v
    rows together (its block of the fused projection), the dense projection's columns of kept
    heads times their gate and its rows (and bias) times the hidden and layer gates, the MLP as
    the Llama one without a gate projection, every LayerNorm's weight and bias sliced. A tied
    output layer reads the final LayerNorm's output, so its weight and bias are divided by the
    hidden gate the shared embedding carries."""
    from megadrp.model.llama import head_dim_of

    hd, n_heads = head_dim_of(config), config.num_attention_heads
    h_idx, h_val = kept(z.get("hidden"), config.hidden_size)
    l_idx, l_val = kept(z.get("layer"), config.num_hidden_layers)
    out: dict[str, torch.Tensor] = {}

    def get(k: str) -> torch.Tensor:
        return sd[k].float()

    out["gpt_neox.embed_in.weight"] = get("gpt_neox.embed_in.weight")[:, h_idx] * h_val
    tied = bool(getattr(config, "tie_word_embeddings", False))
    fw, fb = get("gpt_neox.final_layer_norm.weight")[h_idx], get("gpt_neox.final_layer_norm.bias")[h_idx]
    if tied:
        fw, fb = fw / h_val, fb / h_val
    else:
        out["lm_head.weight"] = get("lm_head.weight")[:, h_idx].clone()
    out["gpt_neox.final_layer_norm.weight"], out["gpt_neox.final_layer_norm.bias"] = fw, fb
    kept_heads = kept_int = None
    for new_i, (old_i, lv) in enumerate(zip(l_idx.tolist(), l_val.tolist())):
        p, q = f"gpt_neox.layers.{old_i}.", f"gpt_neox.layers.{new_i}."
        g_idx, g_val = kept(z["head"][old_i] if "head" in z else None, n_heads)
        qkv_rows = (g_idx[:, None] * 3 * hd + torch.arange(3 * hd)).flatten()  # a head's q, k, v together
        cols = (g_idx[:, None] * hd + torch.arange(hd)).flatten()
        out_scale = (h_val * lv)[:, None]
        a = p + "attention."
        out[q + "attention.query_key_value.weight"] = get(a + "query_key_value.weight")[qkv_rows][:, h_idx]
        out[q + "attention.dense.weight"] = (get(a + "dense.weight")[h_idx][:, cols]
                                             * g_val.repeat_interleave(hd)[None, :] * out_scale)
        if a + "query_key_value.bias" in sd:
            out[q + "attention.query_key_value.bias"] = get(a + "query_key_value.bias")[qkv_rows]
        if a + "dense.bias" in sd:
            out[q + "attention.dense.bias"] = get(a + "dense.bias")[h_idx] * out_scale[:, 0]
        c_idx, c_val = kept(z["intermediate"][old_i] if "intermediate" in z else None, config.intermediate_size)
        m = p + "mlp."
        out[q + "mlp.dense_h_to_4h.weight"] = get(m + "dense_h_to_4h.weight")[c_idx][:, h_idx]
        out[q + "mlp.dense_h_to_4h.bias"] = get(m + "dense_h_to_4h.bias")[c_idx]
        out[q + "mlp.dense_4h_to_h.weight"] = get(m + "dense_4h_to_h.weight")[h_idx][:, c_idx] * c_val[None, :] * out_scale
        out[q + "mlp.dense_4h_to_h.bias"] = get(m + "dense_4h_to_h.bias")[h_idx] * out_scale[:, 0]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            for part in ("weight", "bias"):
                out[q + f"{norm}.{part}"] = get(p + f"{norm}.{part}")[h_idx]
        if kept_heads is not None and (len(g_idx) != kept_heads or len(c_idx) != kept_int):
            raise ValueError("deterministic masks keep a different number of heads or channels per layer; "
                             "export needs the final (uniform) masks")
        kept_heads, kept_int = len(g_idx), len(c_idx)
    heads = kept_heads if kept_heads is not None else n_heads
    if len(h_idx) != heads * hd:
        raise ValueError(f"GPT-NeoX's attention is as wide as its hidden size: {heads} heads × {hd} ≠ {len(h_idx)} "
                         "hidden dimensions cannot be written as a GPTNeoXForCausalLM")
    new = copy.deepcopy(config)
    new.hidden_size, new.num_hidden_layers = len(h_idx), len(l_idx)
    new.num_attention_heads = new.num_key_value_heads = heads
    new.intermediate_size = kept_int if kept_int is not None else config.intermediate_size
    new.tie_word_embeddings = tied
    for key in ("head_dim", "num_key_value_heads"):  # load_hf_config's additions: not GPT-NeoX keys
        if key in new.__dict__:
            delattr(new, key)
    prune_layer_fields(new, l_idx.tolist())
    dtype = next(iter(sd.values())).dtype
    return {k: v.to(dtype).contiguous() for k, v in out.items()}, new
