"""DeepSpeed around the masked model: build it (under `zero.Init`, loading the source
checkpoint module by module), clamp the masks' fp32 master, and read whole tensors back
(the consolidated state dict, the fp32 master of log α, the λ's). Every function that
gathers is a collective: all ranks call it.
"""
from __future__ import annotations

import torch

from megadrp.engine.optim import param_groups
from megadrp.model.hf_io import load_weights
from megadrp.model.llama import MaskedLlama
from megadrp.model.masks import LOG_ALPHA_MAX, LOG_ALPHA_MIN
from megadrp.plan import RunPlan


def build_engine(plan: RunPlan, rank: int, init_log_alpha: dict[str, torch.Tensor] | None = None):
    """(DeepSpeed engine, names of its parameter groups in optimizer order). `init_log_alpha`:
    the masks' starting values by set (`prune.init: importance`), written before the optimizer
    copies them into its fp32 master."""
    import deepspeed

    cfg = plan.cfg
    if cfg.stage == "pretrain":
        # Small from-scratch models: build whole, identically seeded on every rank;
        # deepspeed.initialize partitions them.
        torch.manual_seed(cfg.seed)
        model = MaskedLlama(plan.model_config, activation_checkpointing=plan.checkpointed_layers)
        model.init_weights()
    else:
        with deepspeed.zero.Init(config_dict_or_path=plan.ds_config, enabled=plan.zero3):
            model = MaskedLlama(plan.model_config, plan.target, plan.ramp_steps, plan.checkpointed_layers,
                                sets=cfg.prune.sets, lambda2_init=cfg.prune.lambda2_init)
        load_weights(model, cfg.model.init, zero3=plan.zero3, rank=rank)
        if init_log_alpha and model.l0 is not None:
            params = [model.l0.log_alpha[m] for m in init_log_alpha if m in model.l0.log_alpha]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=plan.zero3), torch.no_grad():
                for m, v in init_log_alpha.items():
                    if m in model.l0.log_alpha:
                        model.l0.log_alpha[m].copy_(v.to(model.l0.log_alpha[m].dtype))
    groups = param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.prune.mask_lr, cfg.prune.lambda_lr)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=plan.ds_config)
    return engine, [g["name"] for g in groups]


def build_inference_engine(model_dir: str, plan: RunPlan, rank: int):
    """An unmasked model of `model_dir` on a ZeRO-3 engine with no optimizer (sharded like the
    training model, gathered layer by layer in each forward): to measure another model's losses
    on the stage's eval windows. Free it with `release_engine` before the training engine is
    built, so the two never hold memory together."""
    import deepspeed

    from megadrp.model.hf_io import load_hf_config

    config = load_hf_config(model_dir, seq_len=plan.cfg.train.seq_len)
    plan.manifest.check_vocab(config.vocab_size, plan.cfg.domains)
    ds = {k: v for k, v in plan.ds_config.items() if k not in ("optimizer", "scheduler", "gradient_clipping")}
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=plan.zero3):
        model = MaskedLlama(config)
    load_weights(model, model_dir, zero3=plan.zero3, rank=rank)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds)
    return engine


def release_engine(engine) -> None:
    """Give an engine's memory back (its partitions, buffers and the device cache)."""
    import gc

    destroy = getattr(engine, "destroy", None)
    if destroy is not None:
        destroy()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def clamp_masks(model: MaskedLlama, zero3: bool) -> None:
    """Keep the optimizer's master log α inside [log 0.01, log 100] (SPEC §2); the forward
    clamps its value too, so this only stops the master drifting where it cannot return."""
    if model.l0 is None:
        return
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    for p in model.l0.log_alpha.values():
        v = safe_get_local_fp32_param(p) if zero3 else p.data
        if v is None or v.numel() == 0:
            continue
        clamped = v.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
        if zero3:
            safe_set_local_fp32_param(p, clamped)
        else:
            p.data.copy_(clamped)


def full_state_dict(engine, zero3: bool, rank: int) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0 (16-bit under bf16), None elsewhere."""
    if zero3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    return {k: v.detach().cpu() for k, v in sd.items()} if rank == 0 and sd is not None else None


def weights_finite(engine) -> bool:
    """Whether this rank's share of the weights is finite (its ZeRO-3 partitions; the whole
    model without ZeRO-3). Cheap next to writing a checkpoint; callers all-reduce it."""
    for p in engine.module.parameters():
        local = getattr(p, "ds_tensor", None)
        t = local if local is not None else p.data
        if t.numel() and not torch.isfinite(t).all():
            return False
    return True


def fp32_master(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each parameter's value from the optimizer's fp32 master copy, whole, on the CPU. The
    final masks are chosen from these: under bf16 the module's 16-bit copy rounds log α to 8
    bits of mantissa, which ties or reorders units that the fp32 values tell apart (SPEC §2)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in params.items():
        full = safe_get_full_fp32_param(p)  # None when there is no separate fp32 master
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    return out


def lambdas(model: MaskedLlama, zero3: bool) -> dict[str, list[float]]:
    """{mask set: [λ1, λ2]}."""
    import deepspeed

    l0 = model.l0
    assert l0 is not None
    with deepspeed.zero.GatheredParameters([l0.lambdas], enabled=zero3):
        lam = l0.lambdas.detach().float().cpu().tolist()
    return {m: lam[i] for i, m in enumerate(l0.active)}



def expected_sparsity(model: MaskedLlama, zero3: bool) -> float:
    """The masks' expected sparsity now (SPEC §3.1's s), without an evaluation: what the
    pruning law needs at a controller update that runs no held-out evaluation (a training-loss
    signal). Collective under ZeRO-3 (the log α are gathered)."""
    import deepspeed

    l0 = model.l0
    assert l0 is not None
    with deepspeed.zero.GatheredParameters(list(l0.log_alpha.values()), enabled=zero3), torch.no_grad():
        return float(l0.expected_sparsity(l0.probs()))
