"""Deterministic masks → a smaller standard model of the source's family (SPEC §2, "Finalising").

Each surviving mask value is folded into the weights that produce or consume the gated
unit, then pruned rows and columns are dropped. The result's logits equal the masked
model's deterministic-mask logits (tested to 1e-4 in fp32).

Folding rules (h: kept hidden dims with values vh; a layer's gate vl):
    embed_tokens[:, h] · vh
    q/k/v_proj: rows of kept heads (kv groups), columns h
    o_proj:     rows h · vh · vl, columns of kept heads · their head gate
    gate/up:    rows of kept channels, columns h
    down_proj:  rows h · vh · vl, columns of kept channels · their channel gate
    q/k/v biases (Qwen2): entries of kept heads (they are per head dimension, not hidden)
    norms: weight[h]; lm_head[:, h] (unscaled: the norm output is not gated)
    q_norm, k_norm (Qwen3): whole (one weight over head_dim, shared by every head)
Tied input/output embeddings (small Qwen2 sizes) stay tied, with the hidden mask folded
once: the shared matrix is embed[:, h] · vh, and the final norm's weight is divided by vh
so that the LM head, which reads the norm output, still sees embed[:, h] (vh > 0 for every
kept dimension). Untying instead would add vocab × d parameters to the exported model.

The pruned config states `head_dim` explicitly (it no longer equals hidden / heads) and
keeps only the kept layers' entries of per-layer fields (`layer_types`, Qwen2's
`max_window_layers`).
"""
from __future__ import annotations

import copy

import torch

from megadrp.model.families import prune_layer_fields
from megadrp.model.llama import head_dim_of


def _kept(z: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of kept units; all units with value 1 when the set is not pruned."""
    if z is None:
        return torch.arange(n), torch.ones(n)
    idx = torch.nonzero(z, as_tuple=True)[0]
    return idx, z[idx].float()


def prune_state_dict(sd: dict[str, torch.Tensor], config, z: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], object]:
    from megadrp.model.families import arch_of

    if arch_of(config) == "neox":  # the same rules on GPT-NeoX's weights (model/neox.py)
        from megadrp.model import neox

        return neox.prune_state_dict(sd, config, z, _kept)
    hd = head_dim_of(config)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    group = n_heads // n_kv
    h_idx, h_val = _kept(z.get("hidden"), config.hidden_size)
    l_idx, l_val = _kept(z.get("layer"), config.num_hidden_layers)
    out: dict[str, torch.Tensor] = {}

    def get(k: str) -> torch.Tensor:
        return sd[k].float()

    emb = get("model.embed_tokens.weight")[:, h_idx] * h_val
    out["model.embed_tokens.weight"] = emb
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:  # one matrix: the hidden mask goes into it once, the final norm undoes it for the head
        out["model.norm.weight"] = get("model.norm.weight")[h_idx] / h_val
    else:
        out["lm_head.weight"] = get("lm_head.weight")[:, h_idx].clone()
        out["model.norm.weight"] = get("model.norm.weight")[h_idx]

    kept_kv = kept_int = None
    for new_i, (old_i, lv) in enumerate(zip(l_idx.tolist(), l_val.tolist())):
        p, q = f"model.layers.{old_i}.", f"model.layers.{new_i}."
        head_z = z["head"][old_i] if "head" in z else None
        g_idx, g_val = _kept(head_z, n_kv)
        qh = (g_idx[:, None] * group + torch.arange(group)).flatten()  # query heads of kept groups
        q_rows = (qh[:, None] * hd + torch.arange(hd)).flatten()
        kv_rows = (g_idx[:, None] * hd + torch.arange(hd)).flatten()
        q_scale = g_val.repeat_interleave(group).repeat_interleave(hd)
        out_scale = (h_val * lv)[:, None]
        a = p + "self_attn."
        out[q + "self_attn.q_proj.weight"] = get(a + "q_proj.weight")[q_rows][:, h_idx]
        out[q + "self_attn.k_proj.weight"] = get(a + "k_proj.weight")[kv_rows][:, h_idx]
        out[q + "self_attn.v_proj.weight"] = get(a + "v_proj.weight")[kv_rows][:, h_idx]
        out[q + "self_attn.o_proj.weight"] = get(a + "o_proj.weight")[h_idx][:, q_rows] * q_scale[None, :] * out_scale
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            if a + name + ".bias" in sd:
                out[q + f"self_attn.{name}.bias"] = get(a + name + ".bias")[rows]
        if a + "o_proj.bias" in sd:
            out[q + "self_attn.o_proj.bias"] = get(a + "o_proj.bias")[h_idx] * out_scale[:, 0]
        for name in ("q_norm", "k_norm"):  # Qwen3: over head_dim, shared by the heads: kept whole
            if a + name + ".weight" in sd:
                out[q + f"self_attn.{name}.weight"] = get(a + name + ".weight")

        int_z = z["intermediate"][old_i] if "intermediate" in z else None
        c_idx, c_val = _kept(int_z, config.intermediate_size)
        m = p + "mlp."
        out[q + "mlp.gate_proj.weight"] = get(m + "gate_proj.weight")[c_idx][:, h_idx]
        out[q + "mlp.up_proj.weight"] = get(m + "up_proj.weight")[c_idx][:, h_idx]
        out[q + "mlp.down_proj.weight"] = get(m + "down_proj.weight")[h_idx][:, c_idx] * c_val[None, :] * out_scale
        for name in ("gate_proj", "up_proj"):
            if m + name + ".bias" in sd:
                out[q + f"mlp.{name}.bias"] = get(m + name + ".bias")[c_idx]
        if m + "down_proj.bias" in sd:
            out[q + "mlp.down_proj.bias"] = get(m + "down_proj.bias")[h_idx] * out_scale[:, 0]
        out[q + "input_layernorm.weight"] = get(p + "input_layernorm.weight")[h_idx]
        out[q + "post_attention_layernorm.weight"] = get(p + "post_attention_layernorm.weight")[h_idx]
        if kept_kv is not None and (len(g_idx) != kept_kv or len(c_idx) != kept_int):
            raise ValueError("deterministic masks keep a different number of heads or channels per layer; "
                             "export needs the final (uniform) masks")
        kept_kv, kept_int = len(g_idx), len(c_idx)

    new = copy.deepcopy(config)
    new.hidden_size = len(h_idx)
    new.num_hidden_layers = len(l_idx)
    new.num_key_value_heads = kept_kv if kept_kv is not None else n_kv
    new.num_attention_heads = new.num_key_value_heads * group
    new.intermediate_size = kept_int if kept_int is not None else config.intermediate_size
    new.head_dim = hd
    new.tie_word_embeddings = tied
    prune_layer_fields(new, l_idx.tolist())
    dtype = next(iter(sd.values())).dtype
    return {k: v.to(dtype).contiguous() for k, v in out.items()}, new
