"""The run plan: everything a run needs that follows from config × data manifest × world,
resolved once, before any model is built, and frozen.

Why one place: the engine, the evaluator, the domain schedule and the exporter all need the
domains, p0, the reference losses, the target shape and the batch layout; resolving them in
one pure function means every user error in them surfaces before any compute, with the key
that caused it, and nothing downstream re-derives (and possibly disagrees about) them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megadrp.config import Config
from megadrp.data.groups import DomainGroups, resolve_groups
from megadrp.data.manifest import DomainShards, Manifest, load_manifest
from megadrp.data.mixture import BatchLayout
from megadrp.errors import ConfigError, UserError
from megadrp.memory_plan import (
    GIB,
    Dims,
    MaskGates,
    MemoryPlan,
    ZeroSettings,
    build_requirements,
    choose,
    fill_auto,
    plan_memory,
)
from megadrp.model.llama import count_parameters
from megadrp.model.masks import Shape, check_target
from megadrp.runtime.files import read_json, read_jsonl
from megadrp.runtime.run_dir import RunDir


@dataclass(frozen=True)
class RunPlan:
    cfg: Config
    manifest: Manifest
    domains: tuple[DomainShards, ...]
    layout: BatchLayout
    model_config: Any  # a transformers config of the model this stage starts from
    target: Shape | None  # the prune target (stage prune only)
    ramp_steps: int
    ds_config: dict
    p0: np.ndarray  # initial proportions of the controller's groups (the domains without domain_groups), normalised
    reference_loss: list[float] | None  # given (or carried) values; None: measured, or the first evaluation's
    memory: MemoryPlan | None = None  # the per-GPU memory plan at `layout` (None where not planned)
    checkpointed_layers: int = 0  # layers whose forward is recomputed in backward (resolved `auto`)
    # Where the reference losses come from when they are not given (docs/method.md §3):
    # `reference_model` is measured once on this stage's eval windows (`model:<dir>`, or the
    # source model of the pruned model a continue stage starts from); `reference_from_engine`:
    # the source itself, unmasked, before the first step of a prune; neither: the stage's
    # first evaluation. `reference_note` says which, for the logs.
    reference_model: str | None = None
    reference_from_engine: bool = False
    reference_note: str = ""
    teacher_config: Any = None  # the distillation teacher's transformers config (None: no teacher)
    groups: DomainGroups | None = None  # what the controller weighs (data/groups.py); None: the domains

    @property
    def dro_groups(self) -> DomainGroups:
        return self.groups or DomainGroups.identity(self.names)

    @property
    def p_domains(self) -> np.ndarray:
        """p0 as the sampler draws it: each group's share split among its domains."""
        return self.dro_groups.expand(self.p0)

    @property
    def reference_split(self) -> str:
        """The windows reference losses are measured on: the signal's own basis (train windows
        for a training-loss signal, else eval windows), so the excess over the reference is not
        a constant offset between held-out and training loss (docs/method.md §9)."""
        return "eval" if self.cfg.dro.signal == "eval" else "train"

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    @property
    def k(self) -> int:
        return len(self.domains)

    @property
    def pruning(self) -> bool:
        return self.cfg.stage == "prune"

    @property
    def zero3(self) -> bool:
        return self.ds_config.get("zero_optimization", {}).get("stage", 0) == 3


def make_plan(cfg: Config, world_size: int, rank: int, gpu_memory: int | None = None) -> RunPlan:
    """Resolve and validate; raises ConfigError (or the manifest's own error) naming the key.

    `gpu_memory`: bytes each rank may use (`train.gpu_memory_gib` wins where set); needed only
    where `train.micro_batch` or `model.activation_checkpointing` is `auto`."""
    manifest = load_manifest(cfg.data_dir)
    domains = tuple(manifest.select(cfg.domains))
    names = [d.name for d in domains]
    model_config = _model_config(cfg, manifest)
    target = _target(cfg, model_config)
    _check_calibration(cfg, domains)
    teacher = _teacher_config(cfg, manifest, model_config)
    if cfg.train.gpu_memory_gib is not None:
        gpu_memory = int(cfg.train.gpu_memory_gib * GIB)
    ds = _ds_config(cfg, model_config.hidden_size)
    t = cfg.train
    given = None if t.micro_batch == "auto" else fit_layout(t.global_batch, t.micro_batch, world_size, rank).micro_batch
    memory, micro, ckpt = _memory(cfg, model_config, target, ds, world_size, gpu_memory, given, teacher)
    layout = fit_layout(t.global_batch, micro, world_size, rank)
    _set_batch(ds, cfg, layout)
    groups = resolve_groups(cfg.domain_groups, names, [d.train_tokens for d in domains])
    ref = resolve_reference(cfg, names, groups)
    _check_tokenizers(cfg, manifest, ref.model)
    ref_values = ref.values if ref.values is None or not ref.by_domain else groups.loss(ref.values).tolist()
    return RunPlan(cfg=cfg, manifest=manifest, domains=domains, layout=layout, model_config=model_config,
                   target=target, ramp_steps=max(1, int(round(cfg.prune.ramp_fraction * cfg.train.steps))),
                   ds_config=ds, p0=initial_proportion(cfg.dro.initial_proportion, domains, names,
                                                       model_init=cfg.model.init, groups=groups),
                   reference_loss=ref_values, memory=memory, checkpointed_layers=ckpt,
                   reference_model=ref.model, reference_from_engine=ref.from_engine, reference_note=ref.note,
                   teacher_config=teacher, groups=groups)


def mask_gates(cfg: Config, model_config, target: Shape | None) -> MaskGates:
    """The mask sets a prune trains (as `L0Masks` activates them): allowed by `prune.sets`
    and smaller in the target than in the source."""
    if target is None:
        return MaskGates()
    from megadrp.model.llama import shape_of

    src, sets = shape_of(model_config), set(cfg.prune.sets)
    return MaskGates(layer="layer" in sets and target.layers < src.layers,
                     head="head" in sets and target.kv_heads < src.kv_heads,
                     intermediate="intermediate" in sets and target.intermediate < src.intermediate,
                     hidden="hidden" in sets and target.hidden < src.hidden)


def _teacher_config(cfg: Config, manifest: Manifest, model_config):
    """The teacher's config, checked before any compute: its vocabulary must be the student's and
    the data's (the KL compares distributions over the same tokens), and where both carry a
    tokenizer, the same tokens."""
    path = cfg.distill.teacher
    if path is None:
        return None
    from megadrp.model.hf_io import load_hf_config

    if not Path(path, "config.json").is_file():
        raise ConfigError(f"distill.teacher {path}: not a Hugging Face model directory (no config.json)")
    tc = load_hf_config(path, seq_len=cfg.train.seq_len)
    if tc.vocab_size != model_config.vocab_size:
        raise ConfigError(f"distill.teacher {path}: vocab_size {tc.vocab_size} differs from the student's "
                          f"{model_config.vocab_size}; a teacher must share the student's tokenizer")
    manifest.check_vocab(tc.vocab_size, cfg.domains)
    return tc


def _check_tokenizers(cfg: Config, manifest: Manifest, reference_model: str | None) -> None:
    """Every model the run reads beside the data (model.init, a reference model, the teacher) was
    made with the data's tokenizer, by fingerprint: two tokenizers of one size (Llama-2's and
    Mistral's) give the same ids to other text, and the numbers would be wrong without an error."""
    from megadrp.data.tokenizer import fingerprint_of
    from megadrp.errors import TokenizerError

    if cfg.allow_tokenizer_mismatch:
        return
    models = [("model.init", cfg.model.init if cfg.stage != "pretrain" else None),
              ("dro.reference_loss", reference_model), ("distill.teacher", cfg.distill.teacher)]
    for key, path in models:
        if not path or not Path(path).is_dir():
            continue
        try:
            manifest.check_tokenizer(f"{key} {path}", fingerprint_of(path), "set allow_tokenizer_mismatch: true")
        except TokenizerError as e:
            raise ConfigError(str(e)) from None


def _memory(cfg: Config, model_config, target: Shape | None, ds: dict, world_size: int, gpu_memory: int | None,
            micro: int | None, teacher_config=None) -> tuple[MemoryPlan, int, int]:
    """(the memory plan, the micro-batch, the checkpointed layers), `auto` resolved; `micro`
    is the configured micro-batch fitted to the rank's share, None for `auto`."""
    t, L = cfg.train, model_config.num_hidden_layers
    per_rank = t.global_batch // world_size
    ac = cfg.model.activation_checkpointing
    dims, zero = Dims.from_config(model_config), ZeroSettings.from_ds(ds)
    gates = mask_gates(cfg, model_config, target)
    teacher = None if teacher_config is None else Dims.from_config(teacher_config)
    chunk = cfg.distill.chunk_tokens
    auto_micro, auto_ckpt = micro is None, ac == "auto"
    if micro is not None and not auto_ckpt:
        layers = min(L if ac is True else int(ac), L)
        return (plan_memory(dims, zero, world_size, micro, t.seq_len, layers, gates, cfg.eval.micro_batch, teacher,
                            chunk), micro, layers)
    which = " and ".join(k for k, a in (("train.micro_batch", auto_micro), ("model.activation_checkpointing",
                                                                              auto_ckpt)) if a)
    if gpu_memory is None:
        raise ConfigError(f"{which} is auto, but the GPU memory to plan for is unknown here; set "
                          "train.gpu_memory_gib (or give the dry run --gpu-memory GIB)")
    chosen = choose(dims, zero, world_size, per_rank, t.seq_len, gates, gpu_memory, micro,
                    None if auto_ckpt else min(L if ac is True else int(ac), L), cfg.eval.micro_batch, teacher, chunk)
    if chosen is None:
        smallest = plan_memory(dims, zero, world_size, micro or 1, t.seq_len,
                               L if auto_ckpt or ac is True else int(ac), gates, cfg.eval.micro_batch, teacher, chunk)
        name, size = smallest.largest()
        raise ConfigError(f"{which} is auto, but nothing fits {gpu_memory / GIB:.1f} GiB per GPU: the smallest "
                          f"layout needs {smallest.total / GIB:.1f} GiB, its largest term {name} "
                          f"({size / GIB:.1f} GiB); use more ranks, ZeRO offload (ds_configs/zero3_offload.json) "
                          "or a larger GPU")
    import logging

    logging.getLogger("megadrp").info("%s: micro-batch %d, %d of %d layers checkpointed (%.1f of %.1f GiB per GPU)",
                                      which, chosen.micro_batch, chosen.checkpointed_layers, L, chosen.total / GIB,
                                      gpu_memory / GIB)
    return chosen, chosen.micro_batch, chosen.checkpointed_layers


def _fit_micro(micro_batch: int, per_rank: int) -> int:
    return max(d for d in range(1, min(micro_batch, per_rank) + 1) if per_rank % d == 0)


def fit_layout(global_batch: int, micro_batch: int, world_size: int, rank: int) -> BatchLayout:
    """The batch layout for this world size: `train.micro_batch` lowered (logged) to the
    largest size that divides each rank's share of the global batch, so a recipe written for
    one node runs on 2, 4, 8 nodes with the same global batch; a world that cannot hold the
    global batch at all is a config error."""
    if world_size > global_batch or global_batch % world_size:
        raise ConfigError(f"train.global_batch={global_batch} cannot be split evenly over {world_size} ranks; "
                          f"use a global batch that is a multiple of the rank count, or fewer ranks")
    per_rank = global_batch // world_size
    micro = _fit_micro(micro_batch, per_rank)
    if micro != micro_batch:
        import logging

        logging.getLogger("megadrp").info("train.micro_batch lowered from %d to %d: %d sequences per rank on %d ranks",
                                          micro_batch, micro, per_rank, world_size)
    return BatchLayout(global_batch, micro, world_size, rank)


@dataclass
class DryRun:
    """What `train.py --dry-run` reports: the plan as text lines and as a JSON-able dict."""

    lines: list[str]
    data: dict
    problem: str | None = None  # a reason to refuse the job (exit 2), in one line
    plan: RunPlan | None = None


def dry_run(cfg: Config, world_size: int, gpu_memory: int | None = None, check_disk: bool = True,
            mfu: float | None = None, gpu: str = "h100") -> DryRun:
    """Everything that needs no weights, checked; the plan as text and data, with its cost
    (cost_ledger.py: FLOPs by part, GPU-hours at `mfu` on `gpu`). Raises on the first problem
    of the config or data; a job that does not fit `gpu_memory` (or the disk) comes back with
    `problem` set, so the caller can still print the plan."""
    import shutil

    from megadrp import cost_ledger

    plan = make_plan(cfg, world_size, 0, gpu_memory)
    t, lay = cfg.train, plan.layout
    notes = plan_notes(cfg)
    tokens_step = t.global_batch * t.seq_len
    params = count_parameters(plan.model_config)
    ckpt = params * 16  # 16-bit weights and their fp32 master, Adam's m and v (fp32 ones: about the same)
    saves = (t.steps // cfg.save.interval if cfg.save.interval else 0) + 1  # the last step always saves
    # save.keep complete checkpoints stay, and the next is written before the oldest goes
    at_once = min(saves, cfg.save.keep + 1) if cfg.save.keep > 0 else saves
    export_bytes = params * 4  # at most: fp32 weights (bf16 runs write half), before pruning shrinks them
    need = at_once * ckpt + export_bytes
    run_dir = Path(cfg.run_dir)
    probe = run_dir if run_dir.exists() else next(p for p in run_dir.parents if p.exists())
    free = shutil.disk_usage(probe).free
    problem = None
    if check_disk and need > free:
        raise ConfigError(f"run_dir {run_dir}: {free / 2**30:.1f} GiB free, the run needs about {need / 2**30:.1f} "
                          f"GiB ({at_once} checkpoint(s) of {ckpt / 2**30:.1f} GiB at once with save.keep="
                          f"{cfg.save.keep}, and the export); free space, lower save.keep or choose another run_dir")
    cost = cost_ledger.ledger(plan, world_size, cost_ledger.DEFAULT_MFU if mfu is None else mfu, gpu)
    floor, ceiling = cfg.eval.token_bounds
    eval_tokens = ceiling * plan.k
    interval_tokens = min(cfg.eval.interval, t.steps) * tokens_step
    mem = plan.memory
    assert mem is not None
    build = build_requirements(ZeroSettings.from_ds(plan.ds_config))
    if gpu_memory is not None and mem.total > gpu_memory:
        name, size = mem.largest()
        problem = (f"the plan needs {mem.total / GIB:.1f} GiB per GPU, more than the {gpu_memory / GIB:.1f} GiB "
                   f"given; its largest term is {name} ({size / GIB:.1f} GiB): {_advice(name)}")
    lines = [
        f"stage {cfg.stage}: {params:,} parameters from {cfg.model.init or 'scratch'}"
        + (f" → target {plan.target.as_dict()}" if plan.target else ""),
        f"ranks {world_size}: micro-batch {lay.micro_batch} × accumulation {lay.accumulation} × {world_size} ranks "
        f"= global batch {t.global_batch} ({tokens_step:,} tokens a step)",
        f"steps {t.steps} ({t.steps * tokens_step:,} tokens), warmup {t.warmup_steps}, lr {t.lr}",
        f"domains {len(plan.names)}: " + ", ".join(f"{n} {p:.3f}" for n, p in zip(plan.names, plan.p_domains)),
        *([f"controller groups {len(plan.dro_groups.names)}: " + "; ".join(
            f"{g} {p:.3f} = " + " + ".join(n for n, o in zip(plan.names, plan.dro_groups.of) if o == i)
            for i, (g, p) in enumerate(zip(plan.dro_groups.names, plan.p0)))] if plan.dro_groups.grouped else []),
        f"evaluation every {cfg.eval.interval} steps (held out at {cost['held_out_evaluations']} of them, step 0 "
        f"included where eval.at_start): {eval_tokens:,} tokens each, {eval_tokens / interval_tokens:.2f}× an "
        f"interval's {interval_tokens:,} training tokens"
        + (f" at most (tokens_per_domain auto: from {floor * plan.k:,}, until each domain's standard error is "
           f"≤ {cfg.eval.target_se:g})" if floor != ceiling else "")
        + f"; dro.mode {cfg.dro.mode}, signal {cfg.dro.signal}, "
        f"update lag {cfg.dro.update_lag}",
        f"disk: {at_once} checkpoint(s) of ≈ {ckpt / 2**30:.1f} GiB at once (save.keep={cfg.save.keep}) + export "
        f"≤ {export_bytes / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free under {probe}"
        + ("" if check_disk or need <= free else " (NOT ENOUGH, not checked: --no-disk-check)"),
        *mem.lines(),
        *cost_ledger.lines(cost, world_size),
        *[f"note: {n}" for n in notes],
        f"optimizer: {build}" if build else "optimizer: torch's AdamW (no compiler needed on the node)",
        f"dry run: {problem}" if problem else "dry run: no problem found",
    ]
    data = {
        "stage": cfg.stage, "parameters": params, "world_size": world_size,
        "layout": {"micro_batch": lay.micro_batch, "accumulation": lay.accumulation, "global_batch": t.global_batch,
                   "seq_len": t.seq_len, "checkpointed_layers": plan.checkpointed_layers},
        "steps": t.steps, "tokens": t.steps * tokens_step,
        "domains": dict(zip(plan.names, map(float, plan.p_domains))),
        "groups": dict(zip(plan.dro_groups.names, map(float, plan.p0))) if plan.dro_groups.grouped else None,
        "disk": {"need_bytes": need, "free_bytes": free, "checked": check_disk},
        "memory_per_gpu_bytes": mem.total, "gpu_memory_bytes": gpu_memory, "memory": mem.as_dict(),
        "build_requirements": build, "problem": problem, "cost": cost,
        "tokenizer_fingerprint": plan.manifest.tokenizer_fingerprint, "notes": notes,
    }
    return DryRun(lines, data, problem, plan)


def plan_notes(cfg: Config) -> list[str]:
    """Settings that are allowed but rarely meant, said in the dry run and the run's log."""
    t = cfg.train
    notes = []
    if t.warmup_steps > t.steps:
        notes.append(f"train.warmup_steps={t.warmup_steps} is more than train.steps={t.steps}: the learning rate "
                     f"never reaches train.lr (it ends at {t.steps / t.warmup_steps:.0%} of it); lower the warmup "
                     "with the steps")
    return notes


def _advice(term: str) -> str:
    return {
        "activations": "lower train.micro_batch or set model.activation_checkpointing: true (or auto)",
        "logits": "lower train.micro_batch (or eval.micro_batch) — the vocabulary makes the logits large",
        "recompute_and_backward": "lower train.micro_batch",
        "master_and_adam": "use more ranks or ds_configs/zero3_offload.json (the optimizer on the host)",
        "gradient_partitions": "use more ranks or ds_configs/zero3_offload.json",
        "weights": "use more ranks or offload the parameters (offload_param)",
        "live_parameters": "lower stage3_max_live_parameters / stage3_prefetch_bucket_size in the DeepSpeed JSON",
        "gradient_buckets": "lower reduce_bucket_size in the DeepSpeed JSON (auto: hidden²)",
        "teacher_weights": "use more ranks (the teacher is sharded over them) or offload its parameters",
        "teacher_live_parameters": "lower stage3_max_live_parameters in the DeepSpeed JSON",
    }.get(term, "use more ranks or a smaller micro-batch")


def _model_config(cfg: Config, manifest: Manifest):
    from megadrp.model.hf_io import load_hf_config

    if cfg.stage == "pretrain":
        from transformers import LlamaConfig

        s = cfg.model.shape
        assert s is not None
        mc = LlamaConfig(vocab_size=s.vocab_size or manifest.vocab_size, hidden_size=s.hidden_size,
                         intermediate_size=s.intermediate_size, num_hidden_layers=s.num_hidden_layers,
                         num_attention_heads=s.num_attention_heads, num_key_value_heads=s.num_key_value_heads,
                         head_dim=s.head_dim or s.hidden_size // s.num_attention_heads,
                         max_position_embeddings=s.max_position_embeddings, rms_norm_eps=s.rms_norm_eps,
                         tie_word_embeddings=s.tie_word_embeddings, rope_theta=s.rope_theta,
                         bos_token_id=1, eos_token_id=manifest.eod_id)
    else:
        assert cfg.model.init is not None
        if not Path(cfg.model.init).is_dir():
            raise ConfigError(f"model.init {cfg.model.init}: directory does not exist")
        mc = load_hf_config(cfg.model.init, seq_len=cfg.train.seq_len)
    if mc.vocab_size < manifest.vocab_size:
        raise ConfigError(f"model vocab_size {mc.vocab_size} is smaller than the data's vocabulary "
                          f"({manifest.vocab_size}, {manifest.data_dir}/manifest.json)")
    manifest.check_vocab(mc.vocab_size, cfg.domains)
    if cfg.train.seq_len > mc.max_position_embeddings:
        import logging

        logging.getLogger("megadrp").warning("train.seq_len %d exceeds max_position_embeddings %d",
                                             cfg.train.seq_len, mc.max_position_embeddings)
    return mc


def _target(cfg: Config, model_config) -> Shape | None:
    if cfg.stage != "prune":
        return None
    from megadrp.model.llama import shape_of

    assert cfg.prune.target is not None
    target = Shape.from_hf(cfg.prune.target)
    source = shape_of(model_config)
    try:
        check_target(source, target, cfg.prune.sets)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _check_arch_target(model_config, target)
    if cfg.prune.method == "shortgpt":  # depth only: every other dimension stays the source's
        for dim, key in (("hidden", "hidden_size"), ("heads", "num_attention_heads"),
                         ("kv_heads", "num_key_value_heads"), ("intermediate", "intermediate_size")):
            if getattr(target, dim) != getattr(source, dim):
                raise ConfigError(f"prune.target.{key}={getattr(target, dim)}: prune.method=shortgpt removes whole "
                                  f"layers only; keep the source's {getattr(source, dim)}, or use prune.method=minitron")
    return target


def _check_arch_target(model_config, target: Shape) -> None:
    """What the architecture's own class cannot hold: GPT-NeoX's attention is as wide as its
    hidden size (no head_dim of its own), so heads × head_dim must equal the kept hidden size."""
    from megadrp.model.families import arch_of
    from megadrp.model.llama import head_dim_of

    if arch_of(model_config) == "neox" and target.hidden != target.heads * head_dim_of(model_config):
        hd = head_dim_of(model_config)
        raise ConfigError(f"prune.target.hidden_size={target.hidden}: GPT-NeoX's attention is as wide as its hidden "
                          f"size, so it must be num_attention_heads × head_dim = {target.heads} × {hd} = "
                          f"{target.heads * hd} (or prune heads to hidden_size / {hd})")


def _check_calibration(cfg: Config, domains) -> None:
    """A one-shot prune (or an importance warm start) scores the first prune.calibration_tokens
    of every domain's training split: refuse a domain that has fewer."""
    if cfg.stage != "prune" or (cfg.prune.method == "l0" and cfg.prune.init != "importance"):
        return
    need = cfg.prune.calibration_tokens + 1
    short = [f"{d.name} ({d.train_tokens:,})" for d in domains if d.train_tokens < need]
    if short:
        raise ConfigError(f"prune.calibration_tokens={cfg.prune.calibration_tokens:,}: more than the training split "
                          f"of {', '.join(short)} holds; lower it")


def _ds_config(cfg: Config, hidden: int) -> dict:
    """The DeepSpeed JSON with the run's clipping and optimizer settings written in (DeepSpeed
    reads them from here; the config keys are the single source) and `auto` bucket sizes
    filled from the hidden size; the batch keys follow once the layout is known."""
    from megadrp.resources import resolve
    from megadrp.runtime.files import read_json

    p = resolve(cfg.deepspeed)
    if not p.is_file():
        raise ConfigError(f"deepspeed {p}: DeepSpeed JSON not found (see ds_configs/)")
    ds = read_json(p, ConfigError)
    t = cfg.train
    ds["gradient_clipping"] = t.grad_clip
    ds["steps_per_print"] = 10**9
    ds["wall_clock_breakdown"] = False
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt.setdefault("params", {}).update(lr=t.lr, betas=[t.beta1, t.beta2], eps=t.eps, weight_decay=t.weight_decay)
    return fill_auto(ds, hidden)


def _set_batch(ds: dict, cfg: Config, layout: BatchLayout) -> None:
    ds["train_micro_batch_size_per_gpu"] = layout.micro_batch
    ds["gradient_accumulation_steps"] = layout.accumulation
    ds["train_batch_size"] = cfg.train.global_batch


def per_domain(value, key: str, names: list[str], what: str = "domain", strict: bool = True) -> list[float] | None:
    """A per-domain (or per-group: `what`) setting given as a list (in `names` order) or a
    {name: value} mapping, in the order of `names`; None when it is neither (a keyword).
    `strict`: an entry for a name the run does not have is an error (a typo, or data that lacks
    the domain), not ignored."""
    if isinstance(value, dict):
        missing = [n for n in names if n not in value]
        if missing:
            raise ConfigError(f"{key} has no entry for {what} {missing[0]!r}")
        extra = [n for n in value if n not in names]
        if extra and strict:
            raise ConfigError(f"{key} has an entry for {extra[0]!r}, which is not one of the run's {what}s "
                              f"({', '.join(names)}); remove it or fix the name")
        return [float(value[n]) for n in names]
    if isinstance(value, list):
        if len(value) != len(names):
            raise ConfigError(f"{key} has {len(value)} values for {len(names)} {what}s ({', '.join(names)})")
        return [float(x) for x in value]
    return None


def initial_proportion(ip, domains, names: list[str], key: str = "dro.initial_proportion",
                       model_init: str | None = None, groups: DomainGroups | None = None) -> np.ndarray:
    """p0 of the controller's groups (the domains without `domain_groups`) from
    `dro.initial_proportion`'s value (a list, a mapping, 'uniform', 'tokens', 'tokens^0.3' or
    'carried'), normalised; `groups.expand` of it is what `megadrp eval --shift` weighs losses
    with. 'carried': the last domain weights of the run that exported `model_init` (its
    RUN_DIR/metrics.jsonl), as Sheared-LLaMA's scripts continue from the pruning stage's final
    proportions."""
    groups = groups or DomainGroups.identity(names)
    carried = ip == "carried"
    if carried:
        ip = _carried_weights(model_init, key)
        if groups.grouped and isinstance(ip, dict) and set(ip) == set(names):  # the sampler's (domain) weights
            ip = dict(zip(groups.names, groups.aggregate([ip[n] for n in names]).tolist()))
    given = per_domain(ip, key, groups.names, "group" if groups.grouped else "domain", strict=not carried)
    if given is not None:
        p = np.array(given, dtype=np.float64)
    elif ip in ("uniform", None):  # None: a config.yaml written before the default became tokens^0.3
        p = np.ones(len(groups.names))
    elif ip in ("tokens", "tokens^0.3"):
        tok = groups.tokens([d.train_tokens for d in domains])
        p = tok ** (1.0 if ip == "tokens" else 0.3)
    else:
        raise ConfigError(f"{key}={ip!r}: give a list, a mapping, 'uniform', 'tokens', 'tokens^0.3' or 'carried'")
    if np.any(p <= 0) or not np.all(np.isfinite(p)):
        raise ConfigError(f"{key} values must be positive")
    return p / p.sum()


def _producing_run(model_init: str | None, key: str, what: str) -> RunDir:
    """The run directory that exported `model_init` (model_init = RUN_DIR/hf)."""
    if not model_init or not Path(model_init).is_dir():
        raise ConfigError(f"{key}: {what} needs model.init to be a model megadrp exported (RUN_DIR/hf)")
    return RunDir(Path(model_init).resolve().parent)


def _carried_weights(model_init: str | None, key: str) -> dict[str, float]:
    run = _producing_run(model_init, key, "'carried'")
    if not run.metrics.is_file():
        raise ConfigError(f"{key}=carried: {run.metrics} not found; model.init must be the export (RUN_DIR/hf) of "
                          "a megadrp run whose domain weights are carried over, or give p0 explicitly")
    rows = [r for r in read_jsonl(run.metrics) if r.get("weights")]
    if not rows:
        raise ConfigError(f"{key}=carried: {run.metrics} holds no domain weights")
    return rows[-1].get("domain_weights") or rows[-1]["weights"]  # a grouped run's own per-domain mix


@dataclass(frozen=True)
class Reference:
    """Where a stage's reference losses come from (see RunPlan.reference_model)."""

    values: list[float] | None = None
    by_domain: bool = False  # values per domain (a measurement), not per controller group (given)
    model: str | None = None
    from_engine: bool = False
    note: str = ""


def reference_key(cfg: Config, names: list[str]) -> dict:
    """What makes two measurements of reference losses the same: the eval windows (DATA_DIR,
    domains, sequence length, tokens a domain)."""
    key = {"data_dir": str(Path(cfg.data_dir).resolve()), "domains": list(names), "seq_len": cfg.train.seq_len,
           "tokens_per_domain": cfg.eval.tokens_per_domain}
    if cfg.dro.signal != "eval":  # measured on training windows (RunPlan.reference_split)
        key["split"] = "train"
    if cfg.eval.tokens_per_domain == "auto":
        key.update(zip(("min_tokens_per_domain", "max_tokens_per_domain"), cfg.eval.token_bounds),
                   target_se=cfg.eval.target_se)
    return key


def resolve_reference(cfg: Config, names: list[str], groups: DomainGroups | None = None) -> Reference:
    """`dro.reference_loss` → values, a model to measure, or the stage's first evaluation.

    - a list or a {domain: loss} mapping: those values;
    - `model:<HF dir>`: that model's eval losses on this stage's windows, measured once (a
      smaller model of the same family, as Sheared-LLaMA did; or the source model);
    - `auto`: the source model's own losses. In a prune stage the source is model.init,
      evaluated unmasked before the first step. In a continue stage it is the model the pruned
      model was pruned from: its losses as the prune run measured them (RUN_DIR/reference_losses.json
      beside model.init) where the windows are the same, else measured here from the source
      named in the export's megadrp.json; only where neither exists, the stage's own first
      evaluation (with a warning: the references then measure nothing of the source).
    """
    ref = cfg.dro.reference_loss
    groups = groups or DomainGroups.identity(names)
    given = per_domain(ref, "dro.reference_loss", groups.names,  # the controller's: by group
                       "group" if groups.grouped else "domain")
    if given is not None and any(x < 0 for x in given):
        bad = next(n for n, x in zip(groups.names, given) if x < 0)
        raise ConfigError(f"dro.reference_loss: {bad!r} has {given[groups.names.index(bad)]}; a loss is never negative")
    if given is not None:
        return Reference(values=given, note="given in dro.reference_loss")
    if ref == "teacher":
        return Reference(model=cfg.distill.teacher, note=f"the teacher {cfg.distill.teacher}")
    if isinstance(ref, str) and ref.startswith("model:"):
        model = ref[len("model:"):]
        if not Path(model, "config.json").is_file():
            raise ConfigError(f"dro.reference_loss={ref!r}: {model} is not a Hugging Face model directory "
                              "(no config.json)")
        return Reference(model=model, note=f"measured from {model}")
    if ref != "auto":
        raise ConfigError(f"dro.reference_loss={ref!r}: give a list, a mapping, 'auto', 'teacher' or "
                          "'model:<HF directory>'")
    if cfg.stage == "prune":
        return Reference(from_engine=True, note=f"the source model {cfg.model.init}, unmasked, before step 1")
    if cfg.stage == "continue" and cfg.model.init and Path(cfg.model.init).is_dir():
        run = RunDir(Path(cfg.model.init).resolve().parent)
        cached = read_reference_cache(run.reference_losses, reference_key(cfg, names), role="source")
        if cached is not None:
            return Reference(values=cached["losses"], by_domain=True, note=f"the source model {cached['model']}, as "
                             f"{run.reference_losses} measured it")
        about = Path(cfg.model.init, "megadrp.json")
        source = read_json(about).get("source") if about.is_file() else None
        if source and Path(source, "config.json").is_file():
            return Reference(model=source, note=f"the source model {source} (named in {about})")
    import logging

    logging.getLogger("megadrp").warning(
        "dro.reference_loss=auto: no source model known for model.init=%s; the references are this stage's own "
        "first losses. Give dro.reference_loss=model:<the source model> to recover toward it", cfg.model.init)
    return Reference(note="this stage's first evaluation (no source model known)")


def read_reference_cache(path: Path, key: dict, model: str | None = None, role: str | None = None) -> dict | None:
    """The cached measurement at `path` if it was made on the same windows (and of `model`, in
    `role`, where given), else None."""
    if not path.is_file():
        return None
    try:
        cached = read_json(path)
    except UserError:
        return None
    if not isinstance(cached, dict) or cached.get("windows") != key or len(cached.get("losses") or []) != len(
            key["domains"]):
        return None
    if (model is not None and cached.get("model") != model) or (role is not None and cached.get("role") != role):
        return None
    return cached
