"""The per-GPU memory plan: its arithmetic, the `auto` choices, every shipped recipe at its
documented layout, the dry run's refusal and JSON, and DeepSpeed JSONs that need no compiler."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megadrp.errors import ConfigError
from megadrp.memory_plan import (
    AUTO_HEADROOM,
    GIB,
    Dims,
    MaskGates,
    ZeroSettings,
    activations,
    build_requirements,
    choose,
    fill_auto,
    layer_activations,
    plan_memory,
)
from megadrp.tools import recipes

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SMALL = Dims(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32)
ZERO = ZeroSettings(stage=3, param_bytes=2, grad_accum_bytes=4, comm_bytes=4, offload_optimizer=False,
                    offload_param=False, reduce_bucket=100, prefetch_bucket=10, max_live=50,
                    persistence_threshold=8, optimizer="torch")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recipes")


def test_model_states_by_hand():
    # per layer: q 8·8, k 4·8, v 4·8, o 8·8, gate/up/down 3·16·8, 2 norms of 8 = 592; ×2 layers,
    # embeddings 2·32·8, final norm 8: 1184 + 512 + 8 = 1704 parameters
    assert SMALL.parameters() == 1704
    plan = plan_memory(SMALL, ZERO, world_size=4, micro_batch=1, seq_len=4, checkpointed_layers=0)
    t = plan.terms
    persistent = 5 * 8  # the norms (8 ≤ threshold 8) stay whole on every rank
    assert t["weights"] == 2 * (416 + persistent)  # ⌈(1704 − 40) / 4⌉ = 416
    assert t["master_and_adam"] == 12 * 426 and t["gradient_partitions"] == 4 * 426
    # two 16-bit reduce buckets, their fp32 copy, and one whole gradient of the largest tensor (32·8)
    assert t["gradient_buckets"] == (2 * 2 + 4) * 100 + 2 * 256
    assert t["live_parameters"] == 2 * (50 + 10)
    assert plan.total == sum(t.values()) and plan.largest()[0] == "runtime_reserve"


def test_offload_moves_master_adam_and_gradients_to_the_host():
    off = ZeroSettings(**{**ZERO.__dict__, "offload_optimizer": True})
    plan = plan_memory(SMALL, off, 4, 1, 4, 0)
    assert plan.terms["master_and_adam"] == plan.terms["gradient_partitions"] == 0
    assert plan.host_bytes_per_rank == (12 + 4) * 426


def test_checkpointing_keeps_each_layers_input_only():
    full = layer_activations(SMALL, 8, 2, MaskGates())
    none = activations(SMALL, 2, 4, 2, MaskGates(), 0)
    every = activations(SMALL, 2, 4, 2, MaskGates(), 2)
    one = activations(SMALL, 2, 4, 2, MaskGates(), 1)
    assert none["layers"] == 2 * full and every["layers"] == 2 * 2 * 8 * 8
    assert one["layers"] == full + 2 * 8 * 8
    assert none["recompute"] == 0 and every["recompute"] == full
    # pruning gates add the folded weight copies of o_proj and down_proj to every layer
    gated = layer_activations(SMALL, 8, 2, MaskGates(hidden=True))
    assert gated - full == 2 * (8 * 8 + 8 * 16)


def test_bucket_sizes_follow_the_hidden_size():
    ds = fill_auto({"zero_optimization": {"reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                          "stage3_param_persistence_threshold": "auto", "stage": 3}}, 4096)
    z = ds["zero_optimization"]
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == \
        (4096 * 4096, int(0.9 * 4096 * 4096), 40960)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
def test_shipped_deepspeed_configs_need_no_compiler(name):
    """torch's AdamW (fused where the device has the kernel): no JIT build of FusedAdam or
    CPUAdam on a node without nvcc. bf16 configs accumulate and reduce gradients in fp32."""
    ds = json.loads((ROOT / "ds_configs" / name).read_text())
    z = ZeroSettings.from_ds(fill_auto(ds, 1024))
    assert z.optimizer == "torch" and build_requirements(z) is None
    if ds.get("bf16", {}).get("enabled"):
        assert z.grad_accum_bytes == 4 and z.comm_bytes == 4
        assert ds["optimizer"]["params"].get("fused") is True


def test_the_dry_run_says_what_a_deepspeed_op_needs_to_build():
    fused = ZeroSettings.from_ds({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {}}})
    cpu = ZeroSettings.from_ds({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
                                "optimizer": {"type": "AdamW"}})
    assert "nvcc" in build_requirements(fused) and "C++ compiler" in build_requirements(cpu)


def test_auto_takes_the_largest_micro_batch_then_the_fewest_checkpointed_layers():
    d = Dims(layers=8, hidden=512, heads=8, kv_heads=8, head_dim=64, intermediate=1376, vocab=4096)
    z = ZeroSettings(**{**ZERO.__dict__, "reduce_bucket": 512 * 512, "prefetch_bucket": 1000, "max_live": 10**6,
                        "persistence_threshold": 5120})
    seq, per_rank = 1024, 16
    budget = plan_memory(d, z, 2, 4, seq, 3).total
    chosen = choose(d, z, 2, per_rank, seq, MaskGates(), int(budget / (1 - AUTO_HEADROOM)), None, None)
    assert chosen is not None and chosen.total <= budget
    assert chosen.micro_batch >= 4  # micro-batch 4 with 3 checkpointed layers fits by construction
    for m in (16, 8):  # no larger divisor (within the token cap) fits, even with every layer checkpointed
        if chosen.micro_batch < m <= 16384 // seq:
            assert plan_memory(d, z, 2, m, seq, 8).total > budget
    if chosen.checkpointed_layers:  # one layer fewer would not fit
        assert plan_memory(d, z, 2, chosen.micro_batch, seq, chosen.checkpointed_layers - 1).total > budget
    # a given micro-batch is kept; checkpointing only as much as it must
    kept = choose(d, z, 2, per_rank, seq, MaskGates(), 10**12, 8, None)
    assert kept.micro_batch == 8 and kept.checkpointed_layers == 0
    assert choose(d, z, 2, per_rank, seq, MaskGates(), 1000, None, None) is None


@pytest.mark.parametrize("recipe", recipes.RECIPES, ids=lambda r: r.config)
def test_every_recipe_fits_80gb_gpus_at_its_documented_layout(recipe, stand_ins):
    report = recipes.plan(recipe, stand_ins)
    d = report.data
    assert report.problem is None, report.problem
    assert d["memory_per_gpu_bytes"] < 80 * GIB
    lay = d["layout"]
    assert lay["micro_batch"] * lay["accumulation"] * recipe.ranks == lay["global_batch"]
    assert any("memory per GPU" in line for line in report.lines)


def test_readme_memory_table_is_the_plans(stand_ins):
    readme = (ROOT / "README.md").read_text()
    assert recipes.readme_block(readme) == recipes.table(stand_ins), \
        "README's memory table is stale: run `python -m megadrp.recipes --write-readme`"


def test_auto_needs_a_memory_budget(stand_ins):
    r = recipes.recipe("continue_1.3b.yaml")
    with pytest.raises(ConfigError, match="train.micro_batch is auto.*--gpu-memory"):
        from megadrp.config import load_config
        from megadrp.plan import dry_run

        cfg = load_config(str(ROOT / "configs" / r.config),
                          [f"model.init={recipes.model_dir(r.model, stand_ins)}",
                           f"data_dir={recipes.data_dir(r.corpus, 32000, stand_ins)}", "train.micro_batch=auto"])
        dry_run(cfg, r.ranks, None, check_disk=False)
    report = recipes.plan(r, stand_ins, overrides=["train.micro_batch=auto", "model.activation_checkpointing=auto"])
    assert report.data["memory_per_gpu_bytes"] <= (1 - AUTO_HEADROOM) * 80 * GIB


def _dry_run_cli(stand_ins: Path, recipe: recipes.Recipe, *more: str) -> subprocess.CompletedProcess:
    vocab = recipes.MODELS[recipe.model][1]["vocab_size"]
    cmd = [sys.executable, str(ROOT / "megadrp" / "train.py"), "--config", str(ROOT / "configs" / recipe.config),
           "--dry-run", "--world-size", str(recipe.ranks), "--plan-only",
           f"model.init={recipes.model_dir(recipe.model, stand_ins)}",
           f"data_dir={recipes.data_dir(recipe.corpus, vocab, stand_ins)}", f"run_dir={stand_ins / 'runs' / 'x'}", *more]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore"))


def test_oversized_continue_job_is_refused_naming_memory(stand_ins):
    """The continue recipe as it shipped before the plan (micro-batch 8, no checkpointing):
    ~138 GiB a GPU. With --gpu-memory the dry run refuses it in one line naming the largest term."""
    p = _dry_run_cli(stand_ins, recipes.recipe("continue_2.7b.yaml"), "--gpu-memory", "80", "train.micro_batch=8")
    assert p.returncode == 2, p.stderr[-2000:]
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("train:")]
    assert len(err) == 1 and "GiB per GPU" in err[0] and "largest term is activations" in err[0], p.stderr[-2000:]
    assert "memory per GPU" in p.stdout  # the plan is still printed


def test_dry_run_json_has_the_plan(stand_ins):
    p = _dry_run_cli(stand_ins, recipes.recipe("llama2_7b_to_1.3b.yaml"), "--gpu-memory", "80", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    data = json.loads(p.stdout)
    terms = data["memory"]["terms"]
    assert data["memory_per_gpu_bytes"] == sum(terms.values()) > 0
    assert {"weights", "master_and_adam", "gradient_partitions", "activations", "logits"} <= set(terms)
    assert data["layout"]["checkpointed_layers"] == 32 and data["build_requirements"] is None
