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

from megadrp.dro.constants import DROConstants
from megadrp.errors import ConfigError


@dataclass
class ModelShapeConfig:
    """A model built from scratch (stage `pretrain`), in Hugging Face's names."""

    num_hidden_layers: int = 4
    """Decoder layers."""
    hidden_size: int = 256
    """Residual width d."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 4
    """Key/value heads (grouped-query attention when fewer than the query heads)."""
    intermediate_size: int = 688
    """MLP width."""
    head_dim: int | None = None
    """Per-head width; null: hidden_size / num_attention_heads."""
    vocab_size: int | None = None
    """null: the data manifest's vocabulary."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the LM head."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is configured for."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""


@dataclass
class ModelConfig:
    """What the stage trains."""

    init: str | None = None
    """Hugging Face model directory the stage starts from (prune, continue)."""
    shape: ModelShapeConfig | None = None
    """The shape of a from-scratch model (pretrain)."""
    activation_checkpointing: bool | int | Literal["auto"] = False
    """Recompute each layer's forward in backward instead of keeping its activations: true (every
    layer), false, a number of layers (the first N), or auto: the fewest layers that let the
    micro-batch fit the GPU (the memory plan, `--dry-run` prints the choice)."""


@dataclass
class PruneTarget:
    """The shape to prune to (checked against the source before any compute)."""

    num_hidden_layers: int
    """Layers kept."""
    hidden_size: int
    """Residual width kept."""
    num_attention_heads: int
    """Query heads kept: a whole number of key/value groups."""
    num_key_value_heads: int
    """Key/value groups kept."""
    intermediate_size: int
    """MLP channels kept per layer."""


MaskSet = Literal["layer", "head", "intermediate", "hidden"]


@dataclass
class PruneConfig:
    """Targeted structured pruning with L0 masks (stage `prune`; docs/method.md §2)."""

    target: PruneTarget | None = None
    """The target shape (required for stage prune)."""
    sets: list[MaskSet] = field(default_factory=lambda: ["layer", "head", "intermediate", "hidden"])
    """Mask sets trained. The multilingual Qwen2 recipe keeps its layers: [head, intermediate,
    hidden]. A target that shrinks a dimension whose set is left out is refused."""
    mask_lr: float = 1.0
    """Learning rate of the masks' log α (paper: 1.0), scaled by the weights' warmup + cosine multiplier."""
    lambda_lr: float = 1.0
    """Learning rate of the Lagrange multipliers (gradient ascent; paper: 1.0), same multiplier."""
    ramp_fraction: float = 0.2
    """Share of the steps over which the target ramps linearly from the source shape (paper: 0.2)."""
    lambda2_init: float = 0.0
    """Starting value of every λ2. 0 is the reference. Under Adam λ2 grows by about lambda_lr a step
    whatever the gap, so the reference's λ2 is in the hundreds by the end of its 640-step ramp; a run
    of a few hundred steps never gets there and its masks overshoot: start λ2 where it would be."""
    method: Literal["l0", "minitron", "shortgpt"] = "l0"
    """l0: learned masks (the paper's). minitron: one shot by activation importance (heads, MLP channels,
    hidden dimensions, layers); shortgpt: one shot, layers only, by Block Influence. The one-shot methods
    score calibration windows with forward passes only and export with no training step (docs/method.md §10)."""
    calibration_tokens: int = 131072
    """Tokens a domain the one-shot importance (and `init: importance`) scores: the first windows of each
    domain's training split."""
    importance_over_domains: Literal["mean", "worst"] = "mean"
    """mean: a unit's importance averaged over domains; worst: each domain's scores normalised, a unit kept by
    its largest over domains (one that a single domain needs is not cut)."""
    layer_importance: Literal["loss", "block_influence"] = "loss"
    """minitron's depth score: the loss increase when a layer is skipped, or Block Influence (shortgpt: always)."""
    init: Literal["uniform", "importance"] = "uniform"
    """The masks' starting log α (method l0): uniform (every unit at the same value, the reference), or
    importance: the units a one-shot minitron prune would keep at that value, the rest init_gap below."""
    init_gap: float = 2.0
    """With init: importance, how far below (in log α) the units a one-shot prune would cut start."""


@dataclass
class TrainConfig:
    """The optimisation: steps, batch layout, AdamW, data loading."""

    steps: int = 100
    """Optimizer steps of the stage."""
    global_batch: int = 8
    """Sequences a step, over all ranks (accumulation adapts so any world size gives it)."""
    micro_batch: int | Literal["auto"] = 2
    """Sequences a rank runs in one forward; lowered to divide the rank's share of the global batch.
    auto: the largest that fits the GPU's memory (the memory plan)."""
    seq_len: int = 128
    """Tokens a training sequence (windows of seq_len + 1 tokens)."""
    lr: float = 1e-4
    """Peak learning rate of the weights."""
    min_lr_ratio: float = 0.1
    """The cosine ends at lr × this."""
    warmup_steps: int = 0
    """Linear warmup steps before the cosine."""
    weight_decay: float = 0.0
    """AdamW weight decay of the weights (the masks and λ's have none)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (DeepSpeed's gradient_clipping)."""
    num_workers: int = 2
    """Data-loader worker processes a rank (any number: batches are the same with 0 or 2)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    max_bad_steps: int = 5
    """Consecutive non-finite steps (each skipped) before the run stops."""
    log_interval: int = 1
    """Steps between progress lines."""
    gpu_memory_gib: float | None = None
    """Memory each rank may plan for, in GiB (the `auto` choices); null: the device's own."""


@dataclass
class EvalConfig:
    """Per-domain evaluation on held-out windows."""

    interval: int = 50
    """Steps between evaluations, and so between domain-weight updates (paper: 50 pruning, 400 continuing)."""
    tokens_per_domain: int | Literal["auto"] = 16384
    """Eval tokens a domain (paper: 500 × 4096 = 2048000); auto: each domain's evaluation adds windows
    (from min_tokens_per_domain, doubling) only until the standard error of its mean window loss is below
    target_se, or max_tokens_per_domain."""
    target_se: float = 0.02
    """With tokens_per_domain: auto, the standard error (nats) of a domain's mean loss to reach."""
    min_tokens_per_domain: int = 16384
    """With tokens_per_domain: auto, the first round's tokens a domain (the floor)."""
    max_tokens_per_domain: int = 2048000
    """With tokens_per_domain: auto, the most tokens a domain (the ceiling; capped by the eval split)."""

    @property
    def token_bounds(self) -> tuple[int, int]:
        """(floor, ceiling) tokens a domain: equal for a fixed tokens_per_domain."""
        if self.tokens_per_domain == "auto":
            return self.min_tokens_per_domain, self.max_tokens_per_domain
        return self.tokens_per_domain, self.tokens_per_domain
    micro_batch: int = 4
    """Sequences a rank evaluates in one forward."""
    at_start: bool = True
    """Evaluate at step 0: sets `auto` reference losses and is logged; it makes no decision."""
    held_out_every: int = 1
    """Run the held-out evaluation at every Nth domain-weight update (and always at the last step).
    1 with `dro.signal: eval`, whose updates are that evaluation; a training-loss signal needs none
    in between, so N cuts evaluation's share of the compute N-fold (docs/method.md §9)."""


@dataclass
class SaveConfig:
    """Checkpoints (DeepSpeed's, with the controller and sampler state)."""

    interval: int = 0
    """Steps between checkpoints; 0: only at the end (and on a stop signal)."""
    keep: int = 2
    """Complete checkpoints kept; older ones are removed once a newer one is complete."""


@dataclass
class DROConfig(DROConstants):
    """The domain schedule (docs/method.md §3). The constants above `mode` are the controller's
    own (megadrp/dro/constants.py), declared once."""

    mode: Literal["constant", "sheared", "dro", "dro_dyloss", "drpruning"] = "drpruning"
    """constant (p0), sheared (Sheared-LLaMA's), dro (χ² with fixed references), dro_dyloss (+ scaling-law
    references), drpruning (+ the moving reference ratio: the method)."""
    initial_proportion: list[float] | dict[str, float] | str = "tokens^0.3"
    """p0: a list (the domains' order), a {domain: value} mapping, uniform, tokens, tokens^0.3 (∝ each
    domain's training tokens to the 0.3, the paper's multilingual rule), or carried: the final domain
    weights of the run that exported model.init (Sheared-LLaMA continues from its pruning's)."""
    reference_loss: list[float] | dict[str, float] | str = "auto"
    """r: a list, a mapping, model:<HF dir> (that model's eval losses on this stage's windows, measured
    once and cached in RUN_DIR/reference_losses.json), teacher (the same, of distill.teacher), or auto: the source model's own losses (a prune:
    model.init unmasked before step 1; a continue stage: the model the pruned model came from, carried
    from the prune run; the stage's own first losses only where no source is known)."""
    signal: Literal["eval", "train_ema", "train"] = "eval"
    """The loss the controller sees: eval (the held-out evaluation), train_ema (a moving average of the
    training loss, 0.9), or train (the mean training loss of the steps since the last update, which
    every step already reduces). With a training-loss signal, `auto` and `model:` references are
    measured on training windows, the same basis (docs/method.md §9)."""
    update_lag: int = 0
    """0: the decision made at the evaluation after step t drives steps t+1 … t+interval (the paper's
    timing; the step waits for it). 1: defer each decision by one interval."""


@dataclass
class DistillConfig:
    """Distillation from a frozen teacher (docs/method.md §7): loss = α · T² · KL(teacher ‖ student)
    + (1 − α) · cross-entropy, on every trained token; the teacher is sharded by ZeRO-3 like the
    student (no gradients, no optimizer state) and counted in the memory plan."""

    teacher: str | None = None
    """Hugging Face model directory of the teacher (normally the source model); null: no distillation.
    Its vocabulary must be the student's and the data's."""
    alpha: float = 1.0
    """Weight of the KL term (1.0: distillation only, Minitron's choice)."""
    temperature: float = 1.0
    """Softmax temperature of both distributions (the KL is scaled by T²)."""
    chunk_tokens: int = 1024
    """Tokens whose full-vocabulary logits are computed at once (the loss runs over chunks, so the
    logits of both models never sit in memory whole)."""


@dataclass
class WandbConfig:
    """Weights & Biases logging (rank 0; never stops training)."""

    mode: Literal["online", "offline", "disabled"] = "offline"
    """offline writes under RUN_DIR/wandb; online needs network and a login."""
    project: str = "megadrp"
    """The wandb project."""
    name: str | None = None
    """The run's name; null: wandb's."""


@dataclass
class Config:
    """One stage of one run."""

    run_dir: str
    """Where the run writes (docs/run_dir.md): config.yaml, metrics.jsonl, checkpoints/, hf/, status.json."""
    data_dir: str
    """DATA_DIR written by `megadrp preprocess` (its manifest.json)."""
    stage: Literal["pretrain", "prune", "continue"]
    """pretrain (from model.shape), prune (from model.init to prune.target), continue (from model.init)."""
    seed: int = 1234
    """Seeds the batches, the mask draws, the controller and a from-scratch model."""
    domains: list[str] | None = None
    """The domains used, in this order; null: every domain of the manifest."""
    domain_groups: dict[str, list[str] | dict[str, float]] | None = None
    """{group: [domain, ...]}: the controller weighs groups, and each group's batch is split among its
    members in proportion to their training tokens ({group: {domain: share}}: as given). Regroups a
    DATA_DIR with no re-preprocessing. dro.initial_proportion and a given dro.reference_loss are then
    per group; `weights` in metrics.jsonl are keyed by group, and `domain_weights` holds what the
    sampler draws. null: every domain is its own group."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Pruning (stage prune)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    save: SaveConfig = field(default_factory=SaveConfig)
    """Checkpoints."""
    resume: str = "auto"
    """auto (the last complete checkpoint in run_dir, if any), none (start over), or a checkpoint path."""
    overwrite: bool = False
    """Allow resume: none to start over in a run_dir whose status.json says done (it would replace
    a finished run's metrics and model)."""
    allow_tokenizer_mismatch: bool = False
    """Train although model.init, the reference model or the teacher carries another tokenizer than the
    data was made with (compared by fingerprint: every token, its id and the special ids). Only for
    tokenizers you know agree on every id the data holds."""
    deepspeed: str = "ds_configs/zero3_cpu.json"
    """The DeepSpeed JSON: zero3_cpu.json (CPU, fp32), zero3_bf16.json (GPUs), zero3_offload.json
    (optimizer and parameters on the host); a shipped one by name from any directory."""
    dro: DROConfig = field(default_factory=DROConfig)
    """The domain schedule."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Distillation from a teacher (any stage)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Logging."""


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
        from megadrp.resources import resolve

        p = resolve(path)
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
                   ("eval.interval", cfg.eval.interval),
                   ("eval.tokens_per_domain", 1 if cfg.eval.tokens_per_domain == "auto" else cfg.eval.tokens_per_domain),
                   ("eval.min_tokens_per_domain", cfg.eval.min_tokens_per_domain)):
        if v < 1:
            raise ConfigError(f"{where}: {key}={v} must be at least 1")
    if cfg.eval.held_out_every != 1 and cfg.dro.signal == "eval":
        raise ConfigError(f"{where}: eval.held_out_every={cfg.eval.held_out_every} with dro.signal=eval: the updates "
                          "are the held-out evaluation; use 1, or a training-loss signal (dro.signal=train)")
    for key, v in (("train.log_interval", t.log_interval), ("eval.micro_batch", cfg.eval.micro_batch),
                   ("eval.held_out_every", cfg.eval.held_out_every),
                   ("train.prefetch_factor", t.prefetch_factor), ("train.max_bad_steps", t.max_bad_steps),
                   ("dro.max_points", cfg.dro.max_points)):
        if v < 1:
            raise ConfigError(f"{where}: {key}={v} must be at least 1")
    for key, v in (("train.num_workers", t.num_workers), ("train.warmup_steps", t.warmup_steps), ("seed", cfg.seed),
                   ("save.interval", cfg.save.interval), ("save.keep", cfg.save.keep),
                   ("dro.min_fit_points", cfg.dro.min_fit_points)):
        if v < 0:
            raise ConfigError(f"{where}: {key}={v} must not be negative")
    p = cfg.prune
    if cfg.stage != "prune" and (p.method != "l0" or p.init != "uniform"):
        key = "prune.method" if p.method != "l0" else "prune.init"
        raise ConfigError(f"{where}: {key}={getattr(p, key.split('.')[1])} needs stage: prune (this is stage "
                          f"{cfg.stage}); remove it")
    if p.init == "importance" and p.method != "l0":
        raise ConfigError(f"{where}: prune.init=importance warm-starts learned masks (prune.method=l0), not "
                          f"prune.method={p.method}")
    if p.calibration_tokens < 1:
        raise ConfigError(f"{where}: prune.calibration_tokens={p.calibration_tokens} must be at least 1")
    if not (math.isfinite(p.init_gap) and p.init_gap >= 0):
        raise ConfigError(f"{where}: prune.init_gap={p.init_gap} must be a finite number ≥ 0")
    if cfg.eval.max_tokens_per_domain < cfg.eval.min_tokens_per_domain:
        raise ConfigError(f"{where}: eval.max_tokens_per_domain={cfg.eval.max_tokens_per_domain} is below "
                          f"eval.min_tokens_per_domain={cfg.eval.min_tokens_per_domain}")
    if not (math.isfinite(cfg.eval.target_se) and cfg.eval.target_se > 0):
        raise ConfigError(f"{where}: eval.target_se={cfg.eval.target_se} must be a positive finite number (nats)")
    if t.micro_batch != "auto" and t.micro_batch > t.global_batch:
        raise ConfigError(f"{where}: train.micro_batch={t.micro_batch} is larger than train.global_batch="
                          f"{t.global_batch}; lower the micro-batch")
    for key, v in (("train.lr", t.lr), ("prune.mask_lr", cfg.prune.mask_lr), ("prune.lambda_lr", cfg.prune.lambda_lr),
                   ("dro.rho", cfg.dro.rho), ("dro.tol", cfg.dro.tol)):
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{where}: {key}={v} must be a positive finite number")
    for key, v in (("train.weight_decay", t.weight_decay), ("train.grad_clip", t.grad_clip), ("train.eps", t.eps),
                   ("prune.lambda2_init", cfg.prune.lambda2_init)):
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"{where}: {key}={v} must be a finite number ≥ 0")
    for key, v in (("train.min_lr_ratio", t.min_lr_ratio), ("train.beta1", t.beta1), ("train.beta2", t.beta2),
                   ("prune.ramp_fraction", cfg.prune.ramp_fraction), ("dro.min_prob", cfg.dro.min_prob),
                   ("dro.ratio_momentum", cfg.dro.ratio_momentum)):
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
    d = cfg.distill
    if d.teacher is not None and not (0.0 <= d.alpha <= 1.0):
        raise ConfigError(f"{where}: distill.alpha={d.alpha} must lie in [0, 1]")
    if not (math.isfinite(d.temperature) and d.temperature > 0):
        raise ConfigError(f"{where}: distill.temperature={d.temperature} must be a positive number")
    if d.chunk_tokens < 1:
        raise ConfigError(f"{where}: distill.chunk_tokens={d.chunk_tokens} must be at least 1")
    if cfg.dro.reference_loss == "teacher" and d.teacher is None:
        raise ConfigError(f"{where}: dro.reference_loss=teacher needs distill.teacher (the teacher's model directory)")
    if cfg.dro.update_lag not in (0, 1):
        raise ConfigError(f"{where}: dro.update_lag must be 0 or 1")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
