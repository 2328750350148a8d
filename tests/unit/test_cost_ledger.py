"""The cost ledger (megadrp/cost_ledger.py): FLOPs by part against the textbook 6·N·D and
2·N·D, every recipe's dry run carrying it, and the flags it takes."""
from __future__ import annotations

import json
import math

import pytest
import torch

from megadrp import cost_ledger
from megadrp.tools import recipes

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    return tmp_path_factory.mktemp("recipes")


def _n_params(recipe_model: str) -> int:
    """N of 6·N·D: every parameter but the input embedding, counted from transformers' own model."""
    import transformers

    cls, values = recipes.MODELS[recipe_model]
    config = getattr(transformers, cls)(**values)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


@pytest.mark.parametrize("name,ckpt", [("continue_1.3b.yaml", 0), ("continue_1.3b.yaml", 24), ("qwen2_7b_to_1.8b.yaml", 0)])
def test_training_and_evaluation_flops_against_6nd_and_2nd(stand_ins, name, ckpt):
    """A dense model at a short sequence (attention's s·d term under 1% of the matmuls): training
    is 6·N per token, plus one more forward (2·N·ckpt/L) for recomputed layers; an evaluation 2·N."""
    r = recipes.recipe(name)
    over = ["train.seq_len=128", f"model.activation_checkpointing={ckpt or 'false'}", "train.micro_batch=1"]
    d = recipes.plan(r, stand_ins, overrides=over).data
    cost, n = d["cost"], _n_params(r.model)
    layers = recipes.MODELS[r.model][1]["num_hidden_layers"]
    head = recipes.MODELS[r.model][1]["hidden_size"] * recipes.MODELS[r.model][1]["vocab_size"]
    expected_train = d["tokens"] * (6 * n + 2 * (n - head) * ckpt / layers)
    assert math.isclose(cost["flops"]["train"], expected_train, rel_tol=0.05), (cost["flops"]["train"], expected_train)
    assert math.isclose(cost["flops"]["eval"], 2 * n * cost["tokens"]["eval"], rel_tol=0.05)
    assert math.isclose(sum(cost["share"].values()), 1.0, rel_tol=1e-9)
    peak = cost_ledger.GPUS["h100"][0]
    assert math.isclose(cost["gpu_hours"], sum(cost["flops"].values()) / (peak * 0.4) / 3600, rel_tol=1e-9)


@pytest.mark.parametrize("recipe", recipes.RECIPES, ids=lambda r: r.config)
def test_every_recipe_states_its_cost(stand_ins, recipe):
    cost = recipes.plan(recipe, stand_ins).data["cost"]
    parts = {"train", "eval"} | ({"teacher"} if recipe.teacher else set())
    assert parts <= set(cost["flops"]) and math.isclose(sum(cost["share"].values()), 1.0, rel_tol=1e-9)
    assert cost["gpu_hours"] > 0 and cost["wall_hours"] * recipe.ranks == pytest.approx(cost["gpu_hours"])
    if recipe.teacher:  # a 7B teacher's forward on every token of a 1.3–2.7B student
        assert cost["flops"]["teacher"] > 0.5 * cost["flops"]["train"]
    # #40: the shipped recipes spend at most 5% of their FLOPs evaluating (the prune recipes by a
    # training-loss signal with a sparse held-out evaluation, docs/benchmarks.md says why).
    assert cost["share"]["eval"] <= 0.05, cost["share"]


def test_held_out_evaluations_follow_the_signal(stand_ins):
    r = recipes.recipe("llama2_7b_to_1.3b.yaml")  # 3200 steps, an update every 50: 64 updates and step 0
    every = recipes.plan(r, stand_ins, overrides=["dro.signal=eval", "eval.held_out_every=1"]).data["cost"]
    assert every["held_out_evaluations"] == 65
    sparse = recipes.plan(r, stand_ins, overrides=["dro.signal=train", "eval.held_out_every=8"]).data["cost"]
    assert sparse["held_out_evaluations"] == 1 + 8  # step 0, every 8th update (the last among them)
    assert sparse["flops"]["eval"] * 65 == pytest.approx(every["flops"]["eval"] * 9)


@pytest.mark.parametrize("args,needle", [
    (["--mfu", "0"], "--mfu=0.0: a share in (0, 1]"), (["--mfu", "1.5"], "--mfu=1.5"),
    (["--gpu", "v100"], "invalid choice: 'v100'"), (["--gpu-memory", "nan"], "--gpu-memory=nan"),
    (["--gpu-memory", "-8"], "--gpu-memory=-8.0"), (["--world-size", "0"], "--world-size=0: at least 1"),
])
def test_plan_flags_refuse_values_no_plan_can_use(args, needle, capsys):
    from megadrp.train import main

    with pytest.raises(SystemExit) as e:
        main(["--config", "configs/tiny/prune.yaml", "--dry-run", *args])
    assert e.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--gpu-memory", "80"], ["--mfu", "0.5"], ["--world-size", "4"], ["--json"]])
def test_plan_flags_need_the_dry_run(flag, capsys):
    from megadrp.train import main

    with pytest.raises(SystemExit) as e:
        main(["--config", "configs/tiny/prune.yaml", *flag])
    assert e.value.code == 2 and "needs --dry-run" in capsys.readouterr().err


def test_dry_run_prints_and_json_carries_the_cost(stand_ins, capsys):
    from megadrp.train import main

    r = recipes.recipe("continue_1.3b_distill.yaml")  # train, eval, teacher
    vocab = recipes.MODELS[r.model][1]["vocab_size"]
    common = ["--config", f"configs/{r.config}", "--dry-run", "--world-size", str(r.ranks), "--plan-only",
              f"model.init={recipes.model_dir(r.model, stand_ins)}", f"data_dir={recipes.data_dir(r.corpus, vocab, stand_ins)}",
              f"run_dir={stand_ins / 'runs' / 'x'}", f"distill.teacher={recipes.model_dir(r.teacher, stand_ins)}"]
    assert main([*common, "--gpu", "a100", "--mfu", "0.5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cost"]["gpu"] == "a100" and data["cost"]["mfu"] == 0.5 and set(data["cost"]["flops"]) >= {"teacher"}
    assert main(common) == 0
    out = capsys.readouterr().out
    assert "GPU-hours on h100 at MFU 0.4" in out and "teacher" in out.split("cost:")[1]


def test_recipes_what_if_overrides(capsys):
    """`megadrp recipes KEY=VALUE ...` plans every recipe with the overrides (the paper's signal
    costs a third of a prune recipe's FLOPs), and refuses to write them into the README's table."""
    assert recipes.main(["dro.signal=eval", "eval.held_out_every=1"]) == 0
    shares = [float(line.rsplit("|", 2)[1].strip().rstrip("%")) for line in capsys.readouterr().out.splitlines()
              if "_to_" in line]
    assert len(shares) == 5 and min(shares) > 30, shares
    assert recipes.main(["--write-readme", "dro.signal=eval"]) == 2
    assert "drop the overrides" in capsys.readouterr().err
