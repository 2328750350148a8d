"""What a run costs, before it runs: FLOPs by part and GPU-hours, from the plan alone.

Per token, for a decoder with N parameters in its layers and output layer (embeddings are a
lookup), L layers of attention width a = heads × head_dim and sequence length s (Kaplan et al.
2020, "Scaling Laws for Neural Language Models", §2.1; SPEC §7):

    forward   ≈ 2·N + 2·L·s·a       (the matmuls, plus attention's scores and weighted sum)
    training  ≈ 3 · forward          (backward is twice the forward)
              + the forward of each checkpointed layer again (activation checkpointing recomputes it)

A prune stage trains the whole source model (the masks cost next to nothing); the evaluation
costs a forward over every domain's windows at every held-out evaluation (and at step 0 where
`eval.at_start`); distillation adds the teacher's forward on every trained token; a reference
model measured once adds a forward over the windows. A one-shot prune (`prune.method: minitron |
shortgpt`) and an importance warm start add `calibrate`: forwards over every domain's
calibration windows (and one more per layer where depth is scored by the loss when a layer is
skipped); a one-shot prune trains nothing and evaluates once. With `eval.tokens_per_domain: auto` the
evaluation is counted at its floor (`eval_at_ceiling_flops`: at its ceiling). GPU-hours = FLOPs / (peak · MFU), the peak
being the GPU's dense bf16 tensor throughput from its datasheet (`GPUS`). `metrics.jsonl`
records the seconds each part took (engine/clock.py), and `megadrp report` shows the two side
by side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Dense bf16 tensor-core peak per GPU, FLOP/s (the datasheets quote twice these "with sparsity").
GPUS: dict[str, tuple[float, str]] = {
    "a100": (312e12, "NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS (SXM, dense)"),
    "h100": (989e12, "NVIDIA H100 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity, "
                     "989 dense (SXM)"),
    "h200": (989e12, "NVIDIA H200 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity, "
                     "989 dense (SXM; the H100's compute, more and faster memory)"),
}
DEFAULT_MFU = 0.4


@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs per token of one model at one sequence length."""

    layer: float  # one decoder layer
    layers: int
    head: float  # the output layer

    @property
    def forward(self) -> float:
        return self.layers * self.layer + self.head


def model_flops(config: Any, seq_len: int) -> ModelFlops:
    """`config`: a transformers config of a family megadrp prunes (GQA or MHA, a gated or a
    two-matrix MLP; biases and norms are too small to count)."""
    from megadrp.model.families import mlp_matrices

    d, L = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // heads
    attn = heads * hd
    per_layer = d * attn * 2 + d * kv * hd * 2 + mlp_matrices(config) * d * config.intermediate_size  # q, o; k, v; MLP
    return ModelFlops(layer=2 * per_layer + 2 * seq_len * attn, layers=L, head=2 * d * config.vocab_size)


def ledger(plan, world_size: int, mfu: float = DEFAULT_MFU, gpu: str = "h100") -> dict:
    """The run's FLOPs by part (`train`, `eval`, and `teacher` and `reference` where they
    apply), each part's share, and GPU-hours at `mfu` on `gpu` (GPUS)."""
    cfg, t = plan.cfg, plan.cfg.train
    model = model_flops(plan.model_config, t.seq_len)
    one_shot = plan.pruning and cfg.prune.method != "l0"
    tokens = 0 if one_shot else t.steps * t.global_batch * t.seq_len
    recompute = plan.checkpointed_layers * model.layer
    flops = {"train": tokens * (3 * model.forward + recompute)}
    if plan.pruning and (one_shot or cfg.prune.init == "importance"):
        # forwards over each domain's calibration windows; a loss-based depth score adds one per layer
        per_layer = cfg.prune.method != "shortgpt" and cfg.prune.layer_importance == "loss" and \
            plan.target.layers < plan.model_config.num_hidden_layers
        passes = 1 + (plan.model_config.num_hidden_layers if per_layer else 0)
        flops["calibrate"] = plan.k * cfg.prune.calibration_tokens * model.forward * passes
    held_out = 1 if one_shot else held_out_evaluations(cfg)
    floor, ceiling = cfg.eval.token_bounds  # tokens_per_domain: auto scores between the two
    window_tokens = plan.k * floor
    flops["eval"] = held_out * window_tokens * model.forward
    if plan.teacher_config is not None:
        flops["teacher"] = tokens * model_flops(plan.teacher_config, t.seq_len).forward
    if (plan.reference_model or plan.reference_from_engine) and not one_shot:
        ref = _reference_config(plan)
        flops["reference"] = window_tokens * model_flops(ref, t.seq_len).forward
    total = sum(flops.values())
    peak, source = GPUS[gpu]
    gpu_hours = total / (peak * mfu) / 3600
    more = {"eval_at_ceiling_flops": held_out * plan.k * ceiling * model.forward} if ceiling != floor else {}
    return {"flops": flops, "share": {k: v / total for k, v in flops.items()}, "total_flops": total, **more,
            "tokens": {"train": tokens, "eval": held_out * window_tokens}, "held_out_evaluations": held_out,
            "gpu": gpu, "peak_flops_per_gpu": peak, "peak_source": source, "mfu": mfu,
            "gpu_hours": gpu_hours, "wall_hours": gpu_hours / world_size}


def held_out_evaluations(cfg) -> int:
    """How many held-out evaluations the run makes: at step 0 (`eval.at_start`), at every
    `eval.held_out_every`-th update and at the last step (engine/signal.py's rule)."""
    t, every, interval = cfg.train, cfg.eval.held_out_every, cfg.eval.interval
    updates = [s for s in range(interval, t.steps + 1, interval)] + ([t.steps] if t.steps % interval else [])
    return (1 if cfg.eval.at_start else 0) + sum(1 for s in updates if s == t.steps or (s // interval) % every == 0)


def _reference_config(plan):
    """The config of the model whose losses are the references: the source itself (a prune's
    `auto`), the teacher, or a `model:` directory's config.json."""
    if plan.reference_from_engine or plan.reference_model is None:
        return plan.model_config
    if plan.teacher_config is not None and plan.reference_model == plan.cfg.distill.teacher:
        return plan.teacher_config
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(plan.reference_model, local_files_only=True)


def lines(cost: dict, world_size: int) -> list[str]:
    """The ledger in the dry run's words."""
    parts = ", ".join(f"{k} {v / 1e15:,.1f} PFLOP ({cost['share'][k]:.1%})" for k, v in cost["flops"].items())
    return [f"cost: {cost['total_flops'] / 1e15:,.1f} PFLOP: {parts}",
            f"      ≈ {cost['gpu_hours']:,.0f} GPU-hours on {cost['gpu']} at MFU {cost['mfu']:g} "
            f"({cost['wall_hours']:,.1f} h on {world_size} GPUs; peak {cost['peak_flops_per_gpu'] / 1e12:,.0f} TFLOP/s "
            "bf16 dense)"]


def measured(rows: list[dict]) -> dict[str, float]:
    """Seconds by part summed over a run's metrics records (every process's, `end` records
    included): what the clock measured."""
    from megadrp.engine.clock import PARTS

    return {p: sum(r.get(f"{p}_seconds", 0.0) for r in rows) for p in PARTS}
