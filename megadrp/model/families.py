"""Model families megadrp prunes, as data (SPEC §2 "Model families").

Llama 2 / 3 / 3.1, Mistral, Qwen2 / Qwen2.5 and Qwen3 are one architecture (RMSNorm, rotary
attention with grouped key/value heads, SwiGLU MLP) that differ in a few switches: bias
on the attention projections, sliding-window attention, the rope variant, a per-head RMSNorm
on queries and keys (Qwen3), and the class a checkpoint is loaded with. Those switches live in `FAMILIES`, keyed by config.json's
`model_type`, so `MaskedLlama`, pruning and export stay one implementation; adding a
family that fits the architecture is one row here plus its tests.

GPT-NeoX (Pythia) is a second architecture (`arch="neox"`: LayerNorm with bias, a fused QKV
projection, partial rotary embeddings, a parallel residual, a GELU MLP): its blocks and its export
live in `megadrp.model.neox`; the masks, the engine and the rest are shared, and what they need to
know of an architecture (how many matrices its MLP has, where its decoder sits) is asked here.

Everything that would make the masked model compute something other than the family's
own class is refused here, before any compute, with the config.json key named:
an unknown `model_type` (a mixture-of-experts one among them), a rope type whose frequencies
depend on the sequence length (`dynamic`, `longrope`), partial rotary embeddings outside GPT-NeoX
(and an odd number of rotated dimensions there), an activation other than SiLU in the Llama
architecture, and a sliding attention window shorter than the training sequence (megadrp's
attention is full causal; a window at least as long as the sequence changes nothing, so it is
accepted).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megadrp.errors import FamilyError


@dataclass(frozen=True)
class Family:
    """What differs between families of the Llama architecture."""

    model_type: str
    names: str  # for messages and docs
    config_class: str  # transformers class names, imported lazily
    model_class: str
    qkv_bias: bool | None  # bias on q/k/v_proj; None: the config's `attention_bias`
    o_bias: bool | None  # bias on o_proj; None: the config's `attention_bias`
    mlp_bias: bool | None  # bias on gate/up/down_proj; None: the config's `mlp_bias`
    # Which layers use `sliding_window`: none; all (Mistral); those whose `layer_types`
    # entry is 'sliding_attention' (Qwen2: use_sliding_window, from max_window_layers on).
    sliding: Literal["none", "all", "layer_types"]
    # An RMSNorm over head_dim on every query and key head before the rotary embedding, one
    # weight shared by all heads (Qwen3's q_norm, k_norm): pruning heads or hidden dimensions
    # never touches it.
    qk_norm: bool = False
    arch: Literal["llama", "neox"] = "llama"  # which blocks (model/llama.py or model/neox.py)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "Llama 2 / Llama 3 / Llama 3.1", "LlamaConfig", "LlamaForCausalLM",
                    qkv_bias=None, o_bias=None, mlp_bias=None, sliding="none"),
    "mistral": Family("mistral", "Mistral", "MistralConfig", "MistralForCausalLM",
                      qkv_bias=False, o_bias=False, mlp_bias=False, sliding="all"),
    "qwen2": Family("qwen2", "Qwen2 / Qwen2.5", "Qwen2Config", "Qwen2ForCausalLM",
                    qkv_bias=True, o_bias=False, mlp_bias=False, sliding="layer_types"),
    "qwen3": Family("qwen3", "Qwen3 (dense)", "Qwen3Config", "Qwen3ForCausalLM",
                    qkv_bias=None, o_bias=None, mlp_bias=False, sliding="layer_types", qk_norm=True),
    "gpt_neox": Family("gpt_neox", "GPT-NeoX / Pythia", "GPTNeoXConfig", "GPTNeoXForCausalLM",
                       qkv_bias=None, o_bias=None, mlp_bias=True, sliding="none", arch="neox"),
}


def arch_of(config) -> str:
    return family_of(config).arch


def mlp_matrices(config) -> int:
    """Weight matrices of one MLP channel: gate, up and down (SwiGLU), or in and out (GPT-NeoX)."""
    return 2 if arch_of(config) == "neox" else 3


def rotary_dims(config) -> int:
    """Dimensions of each head the rotary embedding turns: all of head_dim, or GPT-NeoX's
    `partial_rotary_factor` (Pythia: 0.25) of it."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = rope_params(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    return int(hd * float(factor))


def qk_norm(config) -> bool:
    return family_of(config).qk_norm

# Rope types whose frequencies are fixed at load time, so one precomputed table serves
# every sequence. 'dynamic' and 'longrope' rescale with the sequence length at run time.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _where(config, where: str | None) -> str:
    """The config.json a message should name: given, or where transformers loaded it from."""
    if where:
        return where
    src = getattr(config, "_name_or_path", "") or ""
    return f"{Path(src) / 'config.json'}" if src else "config.json"


def family_of(config, where: str | None = None) -> Family:
    mt = getattr(config, "model_type", None)
    fam = FAMILIES.get(mt)  # type: ignore[arg-type]
    if fam is None:
        known = ", ".join(f"{k!r} ({f.names})" for k, f in FAMILIES.items())
        raise FamilyError(f"{_where(config, where)}: model_type {mt!r} is not supported; megadrp prunes {known}")
    return fam


def attention_biases(config) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias) of this config's family."""
    fam = family_of(config)
    flag = bool(getattr(config, "attention_bias", False))
    return (flag if fam.qkv_bias is None else fam.qkv_bias, flag if fam.o_bias is None else fam.o_bias)


def mlp_bias(config) -> bool:
    fam = family_of(config)
    return bool(getattr(config, "mlp_bias", False)) if fam.mlp_bias is None else fam.mlp_bias


def windowed_layers(config) -> list[int]:
    """Indices of the layers that attend through `sliding_window` (empty when none does)."""
    fam = family_of(config)
    window = getattr(config, "sliding_window", None)
    if fam.sliding == "none" or window is None:
        return []
    n = config.num_hidden_layers
    if fam.sliding == "all":
        return list(range(n))
    types = getattr(config, "layer_types", None) or []
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


def sliding_window(config) -> int | None:
    """The attention window of the windowed layers, or None when every layer is full causal."""
    return int(config.sliding_window) if windowed_layers(config) else None


def check_sliding_window(config, seq_len: int, where: str | None = None) -> None:
    """Refuse a sliding window shorter than `seq_len` (train.seq_len): megadrp attends over
    the whole causal prefix, which equals windowed attention only while the window covers
    the sequence. Call it before building the model so nothing is computed first."""
    window = sliding_window(config)
    if window is None or window >= seq_len:
        return
    fam = family_of(config)
    layers = windowed_layers(config)
    how = ("every layer" if fam.sliding == "all" else
           f"layers {layers[0]}…{layers[-1]} (use_sliding_window: true, max_window_layers="
           f"{getattr(config, 'max_window_layers', '?')})")
    raise FamilyError(f"{_where(config, where)}: sliding_window={window} (on {how}) is shorter than "
                      f"train.seq_len={seq_len}; megadrp computes full causal attention, which differs from "
                      f"windowed attention past {window} tokens. Set train.seq_len to at most {window}, "
                      "or use a checkpoint without sliding-window attention")


def _rope_key(where: str) -> str:
    """The key the user's config.json spells the rope settings with (older files write
    `rope_scaling` with `type`, transformers 5 writes `rope_parameters` with `rope_type`)."""
    try:
        raw = json.loads(Path(where).read_text())
    except (OSError, ValueError):
        return "rope_parameters.rope_type"
    for key in ("rope_scaling", "rope_parameters"):
        block = raw.get(key)
        if isinstance(block, dict):
            return f"{key}.{'type' if 'type' in block and 'rope_type' not in block else 'rope_type'}"
    return "rope_parameters.rope_type"


def rope_params(config) -> dict:
    """The rope settings: transformers 5's `rope_parameters`, or 4.x's `rope_scaling`."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def rope_type(config) -> str:
    params = rope_params(config)
    return params.get("rope_type", params.get("type", "default"))


def check_config(config, where: str | None = None) -> Family:
    """Everything of a config that must hold for the masked model to equal the family's
    own class: the family is known, the rope is static and full, the MLP uses SiLU."""
    fam = family_of(config, where)
    w = _where(config, where)
    params = rope_params(config)
    if params and "rope_type" not in params and all(isinstance(v, dict) for v in params.values()):
        raise FamilyError(f"{w}: rope_parameters per layer type ({', '.join(params)}) are not supported; "
                          "megadrp uses one rope for every layer")
    kind = rope_type(config)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise FamilyError(f"{w}: {_rope_key(w)}={kind!r} is not supported (supported: "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}); its frequencies change with the sequence length, "
                          "which megadrp's precomputed rope does not do")
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if fam.arch == "neox":
        if rotary_dims(config) % 2:
            raise FamilyError(f"{w}: rope_parameters.partial_rotary_factor={partial} turns {rotary_dims(config)} "
                              "dimensions of each head, an odd number; the rotary embedding pairs them")
        from transformers.activations import ACT2FN

        for key in ("hidden_dropout", "attention_dropout"):  # transformers applies them in training; megadrp not
            if float(getattr(config, key, 0.0) or 0.0) != 0.0:
                raise FamilyError(f"{w}: {key}={getattr(config, key)} is not supported; megadrp trains without "
                                  "dropout (Pythia's is 0.0): set it to 0.0")
        act = getattr(config, "hidden_act", "gelu")
        if act not in ACT2FN:
            raise FamilyError(f"{w}: hidden_act={act!r} is not an activation transformers knows")
        return fam
    if partial not in (None, 1, 1.0):
        raise FamilyError(f"{w}: partial_rotary_factor={partial} is not supported for {fam.names}; megadrp "
                          "rotates the whole head there (GPT-NeoX's partial rotary is supported)")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise FamilyError(f"{w}: hidden_act={act!r} is not supported; the {fam.names} MLP megadrp implements uses 'silu'")
    return fam


def model_class(config):
    """The family's own transformers class (`Qwen2ForCausalLM` for a Qwen2 config, …)."""
    import transformers

    return getattr(transformers, family_of(config).model_class)


def prune_layer_fields(config, kept_layers: list[int]) -> None:
    """Per-layer config fields after dropping layers: `layer_types` keeps the kept layers'
    entries and `max_window_layers` counts the kept layers below it, so every kept layer
    attends as it did in the source model."""
    types = getattr(config, "layer_types", None)
    if types:
        config.layer_types = [types[i] for i in kept_layers]
    mwl = getattr(config, "max_window_layers", None)
    if isinstance(mwl, int):
        config.max_window_layers = sum(1 for i in kept_layers if i < mwl)
