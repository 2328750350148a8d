"""Typed run configuration: YAML → dataclasses, dotted `key=value` overrides, validation.

Unknown keys and wrong types are errors that name the key (and the file), so a typo never
silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what to do."""


@dataclass
class ModelShapeConfig:
    """A model built from scratch (stage `pretrain`)."""

    num_hidden_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 688
    head_dim: int | None = None
    vocab_size: int | None = None  # None: the manifest's vocabulary
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5


@dataclass
class ModelConfig:
    init: str | None = None  # Hugging Face directory (prune, continue)
    shape: ModelShapeConfig | None = None  # pretrain
    # Recompute each layer's forward in backward instead of keeping its activations: true (every
    # layer), false, a number of layers (the first N), or auto: the fewest layers that let the
    # micro-batch fit the GPU (megadrp/memory_plan.py; `--dry-run` prints the choice).
    activation_checkpointing: bool | int | Literal["auto"] = False


@dataclass
class PruneTarget:
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


MaskSet = Literal["layer", "head", "intermediate", "hidden"]


@dataclass
class PruneConfig:
    target: PruneTarget | None = None
    # Mask sets trained (SPEC §2). The multilingual Qwen2 recipe keeps all 28 layers and
    # trains head, intermediate and hidden only; a target that shrinks a dimension whose
    # set is left out is refused (masks.check_target), never silently kept at full size.
    sets: list[MaskSet] = field(default_factory=lambda: ["layer", "head", "intermediate", "hidden"])
    mask_lr: float = 1.0
    lambda_lr: float = 1.0
    ramp_fraction: float = 0.2  # target ramps from source to target over this share of steps
    # Starting value of every λ2 (the quadratic penalty's multiplier). 0 is the reference. Under
    # Adam λ2 grows by about lambda_lr per step whatever the gap (gap² is never negative), so the
    # reference's λ2 is in the hundreds by the end of its 640-step ramp and holds the masks on
    # target; a run of a few hundred steps never gets there, and λ1, wound up while the masks
    # could not yet move, drives them far past the target (issue #20). Start λ2 where it would be.
    lambda2_init: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch: int = 8
    # Sequences a rank runs in one forward; lowered to divide the rank's share of the global batch.
    # auto: the largest that fits the GPU's memory (megadrp/memory_plan.py).
    micro_batch: int | Literal["auto"] = 2
    seq_len: int = 128
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    num_workers: int = 2
    prefetch_factor: int = 2
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    log_interval: int = 1
    # Memory each rank may plan for, in GiB (the `auto` choices; the dry run checks against
    # --gpu-memory). None: the device's own memory.
    gpu_memory_gib: float | None = None


@dataclass
class EvalConfig:
    interval: int = 50
    tokens_per_domain: int = 16384
    micro_batch: int = 4
    at_start: bool = True


@dataclass
class SaveConfig:
    interval: int = 0  # 0: only at the end
    keep: int = 2


@dataclass
class DROConfig:
    mode: Literal["constant", "sheared", "dro", "dro_dyloss", "drpruning"] = "drpruning"
    initial_proportion: list[float] | dict[str, float] | str | None = None  # None: ∝ tokens^0.3
    reference_loss: list[float] | dict[str, float] | str = "auto"
    signal: Literal["eval", "train_ema"] = "eval"
    # Evaluations between a decision's input and its weights taking effect. 0 (SPEC §3
    # Timing): the decision made at step t drives steps t+1 … t+interval. 1 defers it.
    update_lag: int = 0
    rho: float = 0.1
    min_prob: float = 0.2
    sheared_eta: float = 1.0
    sheared_c: float = 1e-4
    history_start: float = 0.02
    fit_start: float = 0.1
    # A domain's law is fitted once its history holds more than this many points (SPEC §3.1).
    min_fit_points: int = 10
    ratio_start: float = 0.2
    max_points: int = 64


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "megadrp"
    name: str | None = None


@dataclass
class Config:
    run_dir: str
    data_dir: str
    stage: Literal["pretrain", "prune", "continue"]
    seed: int = 1234
    domains: list[str] | None = None  # None: every domain in the manifest
    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    resume: str = "auto"
    # Starting over (resume: none, or no checkpoint to resume) in a run_dir whose status.json
    # says `done` would destroy a finished run's metrics and model: refused unless this is true.
    overwrite: bool = False
    deepspeed: str = "ds_configs/zero3_cpu.json"
    dro: DROConfig = field(default_factory=DROConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# ---- conversion ---------------------------------------------------------------------------
def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t) if a is not type(None))
    if origin is Literal:
        return " or ".join(map(repr, typing.get_args(t)))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return {"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string"}.get(
        getattr(t, "__name__", ""), getattr(t, "__name__", None) or str(t))


def _convert(value: Any, t: Any, key: str) -> Any:
    origin = typing.get_origin(t)
    if t is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(t):
            return None
        for arg in typing.get_args(t):
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: {value!r} is not {_type_name(t)}")
    if origin is Literal:
        if value not in typing.get_args(t):
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, typing.get_args(t)))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        (arg,) = typing.get_args(t)
        return [_convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(t)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(t):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return _build(t, value, key)
    if t is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key {key!r}: unsupported type {t}")


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!r}; known keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in raw:
            kwargs[f.name] = _convert(raw[f.name], hints[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ConfigError(f"config key {key!r} is required")
    return cls(**kwargs)


def apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value`, value parsed as YAML (so numbers, lists, null work)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node = node[p]
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({first}); quote it or fix it") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
    for item in overrides or []:
        apply_override(raw, item)
    try:
        cfg = _build(Config, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    validate(cfg, str(path) if path else "config")
    return cfg


def validate(cfg: Config, where: str) -> None:
    """Checks that need no files beyond the config itself (the trainer checks paths)."""
    t = cfg.train
    for key, v in (("train.steps", t.steps), ("train.global_batch", t.global_batch),
                   ("train.micro_batch", 1 if t.micro_batch == "auto" else t.micro_batch), ("train.seq_len", t.seq_len),
                   ("eval.interval", cfg.eval.interval), ("eval.tokens_per_domain", cfg.eval.tokens_per_domain)):
        if v < 1:
            raise ConfigError(f"{where}: {key}={v} must be at least 1")
    for key, v in (("train.log_interval", t.log_interval), ("eval.micro_batch", cfg.eval.micro_batch),
                   ("train.prefetch_factor", t.prefetch_factor), ("train.max_bad_steps", t.max_bad_steps),
                   ("dro.max_points", cfg.dro.max_points)):
        if v < 1:
            raise ConfigError(f"{where}: {key}={v} must be at least 1")
    for key, v in (("train.num_workers", t.num_workers), ("train.warmup_steps", t.warmup_steps), ("seed", cfg.seed),
                   ("save.interval", cfg.save.interval), ("save.keep", cfg.save.keep),
                   ("dro.min_fit_points", cfg.dro.min_fit_points)):
        if v < 0:
            raise ConfigError(f"{where}: {key}={v} must not be negative")
    if t.micro_batch != "auto" and t.micro_batch > t.global_batch:
        raise ConfigError(f"{where}: train.micro_batch={t.micro_batch} is larger than train.global_batch="
                          f"{t.global_batch}; lower the micro-batch")
    for key, v in (("train.lr", t.lr), ("prune.mask_lr", cfg.prune.mask_lr), ("prune.lambda_lr", cfg.prune.lambda_lr),
                   ("dro.rho", cfg.dro.rho)):
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{where}: {key}={v} must be a positive finite number")
    for key, v in (("train.weight_decay", t.weight_decay), ("train.grad_clip", t.grad_clip), ("train.eps", t.eps),
                   ("prune.lambda2_init", cfg.prune.lambda2_init)):
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"{where}: {key}={v} must be a finite number ≥ 0")
    for key, v in (("train.min_lr_ratio", t.min_lr_ratio), ("train.beta1", t.beta1), ("train.beta2", t.beta2),
                   ("prune.ramp_fraction", cfg.prune.ramp_fraction), ("dro.min_prob", cfg.dro.min_prob)):
        if not 0 <= v <= 1:
            raise ConfigError(f"{where}: {key}={v} must lie in [0, 1]")
    for key in ("reference_loss", "initial_proportion"):
        value = getattr(cfg.dro, key)
        values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        bad = [x for x in values if not math.isfinite(float(x))]
        if bad:
            raise ConfigError(f"{where}: dro.{key} holds {bad[0]}; every value must be a finite number")
    ac = cfg.model.activation_checkpointing
    if not isinstance(ac, bool) and ac != "auto" and ac < 0:
        raise ConfigError(f"{where}: model.activation_checkpointing={ac}: give true, false, auto or a number of layers ≥ 0")
    if t.gpu_memory_gib is not None and not (math.isfinite(t.gpu_memory_gib) and t.gpu_memory_gib > 0):
        raise ConfigError(f"{where}: train.gpu_memory_gib={t.gpu_memory_gib} must be a positive number of GiB")
    if cfg.stage == "pretrain" and cfg.model.shape is None:
        raise ConfigError(f"{where}: stage pretrain needs model.shape")
    if cfg.stage in ("prune", "continue") and not cfg.model.init:
        raise ConfigError(f"{where}: stage {cfg.stage} needs model.init (a Hugging Face model directory)")
    if cfg.stage == "prune" and cfg.prune.target is None:
        raise ConfigError(f"{where}: stage prune needs prune.target")
    sets = cfg.prune.sets
    if not sets:
        raise ConfigError(f"{where}: prune.sets is empty; name at least one of layer, head, intermediate, hidden")
    if len(set(sets)) != len(sets):
        raise ConfigError(f"{where}: prune.sets {sets} names a set twice")
    if cfg.dro.update_lag not in (0, 1):
        raise ConfigError(f"{where}: dro.update_lag must be 0 or 1")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
