"""A Llama decoder you can read top to bottom, with L0 mask hooks.

Parameter names and shapes are those of transformers' `LlamaForCausalLM` (and of
`MistralForCausalLM` and `Qwen2ForCausalLM`, which share them), so a Hugging Face
checkpoint loads directly and a state dict goes back out unchanged. What differs between
those families (bias on q/k/v, sliding windows, rope variants) is data in
`megadrp.model.families`, not another copy of this model. Unmasked, its logits equal the
family's own transformers class (tested to 1e-4 in fp32).

Where masks multiply (SPEC §2): head-group outputs before o_proj; intermediate
activations before down_proj; each block's attention and MLP outputs by the layer gate
and the hidden mask; the embedding output by the hidden mask. The norms average over the
kept hidden dimensions only, so the physically pruned model computes the same numbers.

Every gate inside a block sits on one side of o_proj or down_proj, so it is folded into
that weight (`GatedLinear`) instead of multiplying activations: the cost is then in
proportion to parameters, not tokens, and a micro-batch carries far more tokens than the
model has hidden dimensions (7B recipe: 16,384 tokens, d = 4,096). Only the embedding's
hidden mask multiplies activations, once per forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megadrp.model.distill import Teacher, chunked_losses
from megadrp.model.families import (
    arch_of,
    attention_biases,
    check_config,
    mlp_bias,
    mlp_matrices,
    qk_norm,
    rope_params,
    rope_type,
    rotary_dims,
    sliding_window,
)
from megadrp.model.masks import SETS, L0Masks, Shape

SHAPE_KEYS = Shape.KEYS
# What a masked forward reports about the masks: the expected shape, then the expected sparsity.
SHAPE_STATS = SHAPE_KEYS + ("sparsity",)


def head_dim_of(config) -> int:
    """Per-head width, independent of hidden_size: pruning hidden dimensions keeps it."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def shape_of(config) -> Shape:
    return Shape(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=config.num_attention_heads,
                 kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                 intermediate=config.intermediate_size)


def rope_frequencies(config) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling, with transformers' own rope types (llama3, yarn, ...);
    `families.check_config` has refused the types that change with the sequence length."""
    params = rope_params(config)
    kind = rope_type(config)
    if kind != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](config, None)
        return inv_freq.float(), float(scaling)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    dim = rotary_dims(config)  # the whole head, or GPT-NeoX's partial share of it
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, kept: torch.Tensor | None = None, on: torch.Tensor | None = None) -> torch.Tensor:
        """`kept`: number of unpruned hidden dims; pruned dims of x are zero, so the sum of
        squares over all dims equals the sum over kept ones, and so is the output (`on`, the kept
        dims' indicator, is what a LayerNorm with a bias needs; an RMSNorm does not)."""
        xf = x.float()
        ss = xf.pow(2).sum(-1, keepdim=True)
        # an evaluation mask may keep no dimension at all; the output is then 0, not NaN
        var = ss / (kept.clamp(min=1) if kept is not None else x.shape[-1])
        return self.weight * (xf * torch.rsqrt(var + self.eps)).to(x.dtype)


class _GatedWeight(torch.autograd.Function):
    """W ∘ (out_gate ⊗ in_gate), either gate optional, with the backward written out.

    Autograd's own graph for this (an outer product, then a product) spends eight passes
    over a weight-sized tensor; this spends five: forward W·o then ·i in place; backward
    t = G ∘ W (the gates' gradients are two matrix-vector products of t) and G·o·i.
    `out_gate` may be a 0-d tensor expanded to [d_out] (a layer gate alone).
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, out_gate: torch.Tensor | None,  # type: ignore[override]
                in_gate: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(w, out_gate, in_gate)
        return _scale(w, out_gate, in_gate)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        w, out_gate, in_gate = ctx.saved_tensors
        need_w, need_out, need_in = ctx.needs_input_grad
        grad_w = _scale(g, out_gate, in_gate) if need_w else None
        grad_out = grad_in = None
        if need_out or need_in:
            t = g * w
            if need_out:
                grad_out = t.sum(1) if in_gate is None else t @ in_gate
            if need_in:
                grad_in = t.sum(0) if out_gate is None else out_gate @ t
        return grad_w, grad_out, grad_in


def _scale(w: torch.Tensor, out_gate: torch.Tensor | None, in_gate: torch.Tensor | None) -> torch.Tensor:
    y = w * out_gate[:, None] if out_gate is not None else w * in_gate[None, :]
    if out_gate is not None and in_gate is not None:
        y.mul_(in_gate[None, :])
    return y


class GatedLinear(nn.Linear):
    """`nn.Linear` (same parameter names and shapes) whose weight can be gated per input
    column and per output row: y = ((out_gate ⊗ in_gate) ∘ W) x + out_gate ∘ b.

    Folding a gate into the weight costs d_out·d_in multiplies (a few times over in
    backward) where gating the activations costs tokens·d per gate and saves an
    activation-sized tensor for backward. The gated weight is made inside this module's
    forward, where ZeRO-3 has gathered `weight`.
    """

    def forward(self, x: torch.Tensor, in_gate: torch.Tensor | None = None,
                out_gate: torch.Tensor | None = None) -> torch.Tensor:
        w, b = self.weight, self.bias
        if in_gate is None and out_gate is None:
            return F.linear(x, w, b)
        if out_gate is not None:
            out_gate = out_gate.to(w.dtype).expand(w.shape[0])  # a 0-d layer gate alone becomes a row
            if b is not None:
                b = b * out_gate
        if in_gate is not None:
            in_gate = in_gate.to(w.dtype)
        return F.linear(x, _GatedWeight.apply(w, out_gate, in_gate), b)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        d, hd = config.hidden_size, head_dim_of(config)
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        qkv_bias, o_bias = attention_biases(config)  # Qwen2: q/k/v only; Llama: attention_bias on all four
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=qkv_bias)
        self.o_proj = GatedLinear(self.n_heads * hd, d, bias=o_bias)
        if qk_norm(config):  # Qwen3: one RMSNorm over head_dim, shared by every query (key) head
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                head_z: torch.Tensor | None = None, out_gate: torch.Tensor | None = None) -> torch.Tensor:
        """`head_z` [n_kv]: one gate per kv group, shared by the group's query heads (it
        gates o_proj's input columns); `out_gate` [d]: gates o_proj's output rows."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        columns = None if head_z is None else head_z.repeat_interleave(self.n_heads // self.n_kv * self.head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim), columns, out_gate)


class MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        bias = mlp_bias(config)
        self.gate_proj = nn.Linear(d, i, bias=bias)
        self.up_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = GatedLinear(i, d, bias=bias)

    def forward(self, x: torch.Tensor, int_z: torch.Tensor | None = None,
                out_gate: torch.Tensor | None = None) -> torch.Tensor:
        """`int_z` [I] gates down_proj's input columns; `out_gate` [d] its output rows."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x), int_z, out_gate)


@dataclass
class LayerMasks:
    """The masks one block sees (None where that set is not pruned)."""

    head: torch.Tensor | None = None
    intermediate: torch.Tensor | None = None
    out_scale: torch.Tensor | None = None  # layer gate × hidden mask, on residual writes
    kept: torch.Tensor | None = None  # kept hidden dims, for the norms
    on: torch.Tensor | None = None  # 1 on a kept hidden dim, 0 on a pruned one (GPT-NeoX's LayerNorm)


class Block(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    # what model/importance.py's hooks read, named alike in both architectures
    attn_out = property(lambda self: self.self_attn.o_proj)
    mlp_out = property(lambda self: self.mlp.down_proj)
    norms = property(lambda self: (self.input_layernorm, self.post_attention_layernorm))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, m: LayerMasks) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h, m.kept), cos, sin, m.head, m.out_scale)
        return h + self.mlp(self.post_attention_layernorm(h, m.kept), m.intermediate, m.out_scale)


class Decoder(nn.Module):
    """Holds what HF keeps under `model.` (embed_tokens, layers, norm)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    embed = property(lambda self: self.embed_tokens)
    final_norm = property(lambda self: self.norm)


# An architecture's decoder and the attribute transformers keeps it under (its weights' prefix).
DECODERS = {"llama": "model", "neox": "gpt_neox"}


class MaskedLlama(nn.Module):
    """Decoder compatible with the family's own class (`LlamaForCausalLM`, `MistralForCausalLM`,
    `Qwen2ForCausalLM`, `Qwen3ForCausalLM`; `GPTNeoXForCausalLM` with model/neox.py's blocks);
    `l0` (optional) holds the pruning masks.

    `sets`: the mask sets that may be trained (config `prune.sets`); a set outside it stays
    inactive even where the target is smaller (`check_target` refuses such targets).
    """

    def __init__(self, config, target: Shape | None = None, ramp_steps: int = 1,
                 activation_checkpointing: bool | int = False, sets: tuple[str, ...] | list[str] = SETS,
                 lambda2_init: float = 0.0) -> None:
        super().__init__()
        check_config(config)  # unknown family, unsupported rope: refused before any weight exists
        self.config = config
        # Full causal attention equals the family's windowed attention while the window
        # covers the sequence; `logits` refuses longer inputs (the engine checks
        # train.seq_len up front with `families.check_sliding_window`).
        self.sliding_window = sliding_window(config)
        self.arch = arch_of(config)
        if self.arch == "neox":
            from megadrp.model.neox import NeoXDecoder

            self.gpt_neox = NeoXDecoder(config)
        else:
            self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.decoder.embed.weight
        self.l0 = (L0Masks(shape_of(config), target, ramp_steps, head_dim_of(config), sets, lambda2_init,
                           mlp_matrices(config)) if target is not None else None)
        inv_freq, self.attention_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Layers whose forward is recomputed in backward (the first N; True: all): what the
        # memory plan chose (`model.activation_checkpointing`, megadrp/memory_plan.py).
        L = config.num_hidden_layers
        ac = activation_checkpointing
        self.checkpointed_layers = L if ac is True else 0 if ac is False else min(int(ac), L)

    @property
    def decoder(self) -> nn.Module:
        """The embedding, the layers and the final norm (`embed`, `layers`, `final_norm`), under the
        name the family's checkpoints use (`model.`, `gpt_neox.`)."""
        return getattr(self, DECODERS[self.arch])

    def init_weights(self, std: float | None = None) -> None:
        """HF's init: normal(0, initializer_range) for linears and embeddings, ones for norms."""
        std = std if std is not None else getattr(self.config, "initializer_range", 0.02)
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, 0.0, std)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, RMSNorm) or type(mod).__name__ == "LayerNorm":
                nn.init.ones_(mod.weight)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)

    def rope(self, t: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(t, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def logits(self, input_ids: torch.Tensor, z: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [B, T, V]; `z` the masks of this forward (from `self.l0`), or None."""
        return self.lm_head(self.hidden_states(input_ids, z))

    def hidden_states(self, input_ids: torch.Tensor, z: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The final normed hidden states [B, T, d] (what the LM head reads)."""
        z = z or {}
        if self.sliding_window is not None and input_ids.shape[1] > self.sliding_window:
            raise ValueError(f"input of {input_ids.shape[1]} tokens is longer than the model's sliding_window "
                             f"{self.sliding_window}; megadrp's full causal attention would differ from the "
                             "model's own (keep train.seq_len at most sliding_window)")
        dec = self.decoder
        h = dec.embed(input_ids)
        hidden = z.get("hidden")
        kept = on = None
        if hidden is not None:
            h = h * hidden.to(h.dtype)
            on = (hidden != 0).to(torch.float32)
            kept = on.sum()
        cos, sin = self.rope(input_ids.shape[1], h.device, h.dtype)
        for i, block in enumerate(dec.layers):
            scale = hidden
            if "layer" in z:
                scale = z["layer"][i] if scale is None else z["layer"][i] * scale
            m = LayerMasks(head=z["head"][i] if "head" in z else None,
                           intermediate=z["intermediate"][i] if "intermediate" in z else None,
                           out_scale=scale, kept=kept, on=on)
            if i < self.checkpointed_layers and self.training:
                h = checkpoint(block, h, cos, sin, m, use_reentrant=False)
            else:
                h = block(h, cos, sin, m)
        return dec.final_norm(h, kept, on)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, step: int = 0,
                mask_mode: str | None = None, mask_seed: int = 0, mask_draw: int = 0,
                teacher: Teacher | None = None, hidden_only: bool = False,
                masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor | ForwardOutput:
        """Logits when `labels` is None (the final hidden states with `hidden_only`: a teacher's
        forward); else per-token losses and the L0 terms, and with a `teacher` the per-token KL
        to it (model/distill.py: chunked, so the logits of both never sit in memory whole).

        The masks are computed inside this forward (not by the caller) so that under ZeRO-3
        the mask parameters are gathered and their gradients reduced like any other.
        `mask_mode`: None (no masks), 'sample' (one hard-concrete draw per forward, seeded by
        (mask_seed, step, mask_draw); the engine passes the micro-batch's place in the global
        batch as `mask_draw`, so one and two ranks with the same global batch draw the same
        masks for the same samples), 'expected' or 'final'. `masks`: fixed masks of the same
        format instead (a one-shot prune's, model/importance.py), on the model's device.
        """
        z, lag, shape = masks or {}, None, None
        if mask_mode is not None and self.l0 is not None:
            gen = None
            if mask_mode == "sample":
                gen = draw_generator(input_ids.device, mask_draw_seed(mask_seed, step, mask_draw))
            z, lag, shape = self.l0(step, mask_mode, gen)
        if hidden_only:
            return self.hidden_states(input_ids, z)
        if teacher is not None and labels is not None:
            ce, kd = chunked_losses(self.hidden_states(input_ids, z), self.lm_head, labels, teacher)
            return ForwardOutput(ce, lag, shape, kd)
        logits = self.logits(input_ids, z)
        if labels is None:
            return logits
        return ForwardOutput(token_losses(logits, labels), lag, shape)


def draw_generator(device: torch.device, seed: int) -> torch.Generator | None:
    """A generator on `device` seeded with `seed`, so the mask noise is drawn where the masks
    are (one generator per draw: a resumed run draws the same noise). None on `meta`, which
    has no generator (shape-level runs only)."""
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(seed)


def mask_draw_seed(seed: int, step: int, draw: int) -> int:
    """A 63-bit seed for one hard-concrete draw, mixed so that no two (seed, step, draw)
    triples of a run share a stream."""
    return int(np.random.SeedSequence([seed, 0x10, step, draw]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class ForwardOutput(NamedTuple):
    """A tuple of tensors, so DeepSpeed's ZeRO-3 hooks can see every output."""

    losses: torch.Tensor  # [B, T] fp32
    lagrangian: torch.Tensor | None
    expected_shape: torch.Tensor | None  # SHAPE_STATS: layers, hidden, heads, kv_heads, intermediate, sparsity
    kd: torch.Tensor | None = None  # [B, T] fp32: KL to the teacher (distillation)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32, [B, T]."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)


def count_parameters(config) -> int:
    """Parameters of a standard model of this config, biases included (for reports)."""
    d, i, L, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    hd, h = head_dim_of(config), config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or h
    qkv_bias, o_bias = attention_biases(config)
    mats, norm = mlp_matrices(config), 2 if arch_of(config) == "neox" else 1  # LayerNorm: weight and bias
    per_layer = d * hd * (2 * h + 2 * kv) + mats * d * i + 2 * norm * d
    per_layer += hd * (h + 2 * kv) * qkv_bias + d * o_bias + ((mats - 1) * i + d) * mlp_bias(config)
    per_layer += 2 * hd * qk_norm(config)
    emb = v * d * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return L * per_layer + emb + norm * d


