"""Hugging Face checkpoint directories in and out.

In: config.json + safetensors (one file or sharded), or pytorch_model.bin as a fallback.
Shapes are checked against the model before anything is copied, on every rank (only the
safetensors headers are read), so a wrong checkpoint fails fast with the key and file.
Under ZeRO-3, weights are copied module by module inside `GatheredParameters`, so the
full model never exists on one rank.

Out: `export_hf` writes a standard directory of the source family's own class
(`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`: safetensors, config,
tokenizer) to a temporary name and renames it into place.
"""
from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from megadrp.errors import CheckpointError, FamilyError
from megadrp.model.families import check_config, check_sliding_window, model_class
from megadrp.runtime.files import read_json


def load_hf_config(path: str | os.PathLike, seq_len: int | None = None):
    """The checkpoint's config, refused (naming the config.json key) when megadrp cannot
    reproduce its family exactly. `seq_len` (train.seq_len): also refuse a sliding
    attention window shorter than the training sequence; pass it wherever the config is
    loaded for training so the refusal comes before any compute."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p}: no config.json; model.init must be a Hugging Face model directory")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # transformers raises several types for a bad config
        raise CheckpointError(f"{p / 'config.json'}: cannot be read as a model config ({e})") from e
    where = str(p / "config.json")
    try:
        check_config(cfg, where)
        if seq_len is not None:
            check_sliding_window(cfg, seq_len, where)
    except FamilyError as e:
        raise CheckpointError(str(e)) from None
    if not getattr(cfg, "head_dim", None):
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    if not getattr(cfg, "num_key_value_heads", None):  # plain multi-head attention (GPT-NeoX has no such key)
        cfg.num_key_value_heads = cfg.num_attention_heads
    return cfg


def weight_files(path: str | os.PathLike) -> list[Path]:
    p = Path(path)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (p / index).is_file():
            try:
                shards = sorted(set(read_json(p / index, CheckpointError)["weight_map"].values()))
            except (KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{p / index}: malformed shard index (no weight_map: {e})") from e
            missing = [s for s in shards if not (p / s).is_file()]
            if missing:
                raise CheckpointError(f"{p / index}: lists {missing[0]} which does not exist")
            return [p / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (p / single).is_file():
            return [p / single]
    raise CheckpointError(f"{p}: no weights (model.safetensors, a sharded index or pytorch_model.bin)")


class _WeightReader:
    """Key → (file, lazy tensor) over one or many files; reads one tensor at a time."""

    def __init__(self, files: list[Path]) -> None:
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        for f in files:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    with safe_open(str(f), framework="pt") as h:
                        for k in h.keys():
                            self.where[k] = f
                            self.shapes[k] = tuple(h.get_slice(k).get_shape())
                except Exception as e:  # safetensors raises its own error types
                    raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
            else:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                self._bins[f] = sd
                for k, v in sd.items():
                    self.where[k], self.shapes[k] = f, tuple(v.shape)

    def key(self, name: str, model) -> str:
        """The checkpoint's name of the model's parameter `name`: itself, or for the output layer
        GPT-NeoX's older `embed_out`, or (tied) the input embedding."""
        if name in self.where or name != "lm_head.weight":
            return name
        if "embed_out.weight" in self.where:
            return "embed_out.weight"
        if getattr(model.config, "tie_word_embeddings", False):  # an untied checkpoint without one is refused
            return f"{DECODER_NAMES[getattr(model, 'arch', 'llama')]}.weight"
        return name

    def get(self, key: str) -> torch.Tensor:
        f = self.where[key]
        if f in self._bins:
            return self._bins[f][key]
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            return h.get_tensor(key)


DECODER_NAMES = {"llama": "model.embed_tokens", "neox": "gpt_neox.embed_in"}  # each architecture's input embedding


def _expected(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of the model's weights (ZeRO-3 keeps the full shape in ds_shape)."""
    out = {}
    for name, p in model.named_parameters():
        if name.startswith("l0."):
            continue
        out[name] = tuple(getattr(p, "ds_shape", p.shape))
    return out


def check_weights(model: torch.nn.Module, path: str | os.PathLike) -> _WeightReader:
    files = weight_files(path)
    reader = _WeightReader(files)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, shape in _expected(model).items():
        if name == "lm_head.weight" and tied:
            continue
        name = reader.key(name, model)
        if name not in reader.where:
            raise CheckpointError(f"{path}: weight {name!r} missing (looked in {', '.join(f.name for f in files)})")
        if reader.shapes[name] != shape:
            raise CheckpointError(f"{reader.where[name]}: weight {name!r} has shape {list(reader.shapes[name])}, "
                                  f"the config says {list(shape)}; the weights do not match config.json")
    return reader


def load_weights(model: torch.nn.Module, path: str | os.PathLike, zero3: bool = False, rank: int = 0) -> None:
    reader = check_weights(model, path)
    for mod in model.modules():
        params = [(n, p) for n, p in mod.named_parameters(recurse=False)]
        if not params:
            continue
        ctx = nullcontext()
        if zero3:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0)
        with ctx:
            if rank != 0 and zero3:
                continue
            prefix = next(k for k, m in model.named_modules() if m is mod)
            for n, p in params:
                full = f"{prefix}.{n}" if prefix else n
                if full.startswith("l0."):
                    continue
                key = reader.key(full, model)
                with torch.no_grad():
                    p.data.copy_(reader.get(key).to(p.dtype))


# What a tokenizer is made of on disk (sentencepiece, BPE, tiktoken, chat templates): the
# only files `export_hf` copies from a tokenizer directory, which may be a whole model dir.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "spiece.model", "chat_template.jinja",
                   "chat_template.json")


def tokenizer_files(d: str | os.PathLike) -> list[Path]:
    d = Path(d)
    return sorted(f for f in d.iterdir() if f.is_file() and (f.name in TOKENIZER_FILES or f.suffix == ".tiktoken"))


def export_hf(state_dict: dict[str, torch.Tensor], config, out_dir: str | os.PathLike,
              tokenizer_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
              extra: dict[str, str] | None = None) -> Path:
    """Write a directory of the config's own family class (a Qwen2 config gives
    `Qwen2ForCausalLM`) atomically (tmp dir, then rename); `architectures` names it, so
    `AutoModelForCausalLM` loads the same class. `extra`: more text files (name → content)
    written into it before the rename, so they appear with the model, never after it."""
    cls = model_class(config)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config = type(config).from_dict(config.to_dict())
    config.architectures = [cls.__name__]
    if dtype is not None:
        config.dtype = dtype
    with torch.device("meta"):
        model = cls(config)
    sd = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"export to {out}: state dict does not match the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer_dir is not None:
        for f in tokenizer_files(tokenizer_dir):
            shutil.copy2(f, tmp / f.name)
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return out
