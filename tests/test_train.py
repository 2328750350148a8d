"""End-to-end training on real DeepSpeed ZeRO-3 (CPU, gloo): one process and two ranks,
all three stages, export checked by transformers and by megadrp.evaluate."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PY, metrics, run, tiny_run_config, write_config

pytestmark = pytest.mark.slow
TARGET = {"num_hidden_layers": 2, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
          "intermediate_size": 64}
P0 = [0.4, 0.12, 0.12, 0.12, 0.12, 0.12]
DS = [str(Path(PY).parent / "deepspeed"), "--num_gpus", "2", "--master_port"]
_port = [29600]


def train(cfg: dict, tmp: Path, ranks: int = 1, env: dict | None = None, check: bool = True, extra=()):
    path = write_config(tmp / f"{Path(cfg['run_dir']).name}.yaml", **cfg)
    if ranks == 1:
        cmd = [PY, "megadrp/train.py", "--config", str(path), *extra]
    else:
        _port[0] += 1
        cmd = [*DS, str(_port[0]), "megadrp/train.py", "--config", str(path), *extra]
    return run(cmd, env=env, check=check, timeout=900)


def evaluate(model: Path, data: Path, cfg: dict) -> dict:
    p = run([PY, "-m", "megadrp.evaluate", "--model", str(model), "--data", str(data), "--split", "eval",
             "--tokens-per-domain", str(cfg["eval"]["tokens_per_domain"]), "--seq-len", str(cfg["train"]["seq_len"])])
    return json.loads(p.stdout.strip().splitlines()[-1])


def prune_cfg(tmp, data_dir, base_model, name, **over):
    return tiny_run_config(tmp, data_dir, "prune", name, model={"init": str(base_model)},
                           prune={"target": TARGET, "mask_lr": 0.5, "lambda_lr": 0.5},
                           dro={"mode": "drpruning", "reference_loss": "auto", "fit_start": 0.3,
                                "history_start": 0.0, "initial_proportion": P0}, **over)


def _leave_as_a_killed_process_would(path: Path, size: int = 0) -> None:
    """Create `path` as torch's build lock (O_CREAT | O_EXCL) or DeepSpeed's shm segment is
    created, in a process that is then SIGKILLed."""
    code = ("import os, sys, signal; fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600); "
            "os.ftruncate(fd, int(sys.argv[2])); os.kill(os.getpid(), signal.SIGKILL)")
    path.parent.mkdir(parents=True, exist_ok=True)
    run([PY, "-c", code, str(path), str(size)], check=False)
    assert path.exists()


@pytest.fixture(scope="module")
def prune2(tmp_path_factory, data_dir, base_model):
    """A 2-rank ZeRO-3 drpruning prune run, shared by several checks. Before it starts, a
    killed process leaves a build lock where DeepSpeed JIT-loads FusedAdam and a shared-memory
    segment of an earlier run's CPU allreduce, as on a machine some run was killed on
    (test_leftovers_of_killed_runs_cleared)."""
    import os

    from torch.utils.cpp_extension import _get_build_directory  # the exact folder torch builds it in

    tmp = tmp_path_factory.mktemp("prune2")
    lock = Path(_get_build_directory("fused_adam", verbose=False)) / "lock"
    segment = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1_0"
    _leave_as_a_killed_process_would(lock)
    _leave_as_a_killed_process_would(segment, 1 << 20)
    cfg = prune_cfg(tmp, data_dir, base_model, "prune2")
    p = train(cfg, tmp, ranks=2)
    (tmp / "train.stderr").write_text(p.stderr)
    (tmp / "leftovers.json").write_text(json.dumps({"lock": str(lock), "segment": str(segment), "port": _port[0]}))
    return tmp, cfg


def test_leftovers_of_killed_runs_cleared(prune2):
    """Without the cleanup this run would wait for the lock forever (torch's FileBaton polls for
    the file); and every 2-rank CPU run used to leave 2 x 66 MiB of RAM in /dev/shm."""
    import os

    tmp, _ = prune2
    left = json.loads((tmp / "leftovers.json").read_text())
    err = (tmp / "train.stderr").read_text()
    assert not Path(left["lock"]).exists() and f"removed the stale build lock {left['lock']}" in err
    assert not Path(left["segment"]).exists() and "shared-memory segments of DeepSpeed's CPU allreduce" in err
    own = [n for n in os.listdir("/dev/shm")
           if n.startswith(f"deepspeed_allreduce_buffer_{os.getuid()}_") and f"_{left['port']}_" in n]
    assert own == []  # this run's own segments were unlinked once both ranks had mapped them


def test_pretrain_one_process(tmp_path, data_dir):
    cfg = tiny_run_config(tmp_path, data_dir, "pretrain", "pre",
                          model={"shape": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                           "num_key_value_heads": 2, "intermediate_size": 128,
                                           "max_position_embeddings": 128}},
                          dro={"mode": "constant"})
    t0 = time.time()
    p = train(cfg, tmp_path)
    wall = time.time() - t0
    assert "tok/s" in p.stderr and "ETA" in p.stderr
    run_dir = Path(cfg["run_dir"])
    m = metrics(run_dir)
    assert [r["step"] for r in m] == [0, 4, 8, 12]
    # one clock (engine/clock.py): the rows split the process's seconds by part, summing to its wall-clock
    rows = metrics(run_dir, events=True)
    end = rows[-1]
    assert end["event"] == "end" and end["status"] == "done" and end["export_seconds"] > 0 and end["save_seconds"] > 0
    assert rows[0]["startup_seconds"] > 0 and all(r["train_seconds"] > 0 for r in rows[1:-1])
    from megadrp.engine.clock import PARTS

    parts = sum(r.get(f"{k}_seconds", 0.0) for r in rows for k in PARTS)
    assert all(k.removesuffix("_seconds") in (*PARTS, "wall", "controller_cpu")
               for r in rows for k in r if k.endswith("_seconds"))
    # the process's own account, from its start (the OS's record) to its closing record; the
    # launch and the interpreter's exit around it are all that the outside measure adds
    assert abs(parts - end["wall_seconds"]) < 0.01 * end["wall_seconds"], (parts, end["wall_seconds"])
    assert end["wall_seconds"] <= wall and wall - end["wall_seconds"] < max(0.05 * wall, 5.0), (end, wall)
    assert m[-1]["eval_loss"]["code"] < m[0]["eval_loss"]["code"]
    assert (run_dir / "config.yaml").is_file() and json.loads((run_dir / "status.json").read_text())["state"] == "done"
    ev = evaluate(run_dir / "hf", data_dir, cfg)
    for d, v in m[-1]["eval_loss"].items():
        assert abs(ev["domain_loss"][d] - v) / v < 0.01
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert AutoTokenizer.from_pretrained(run_dir / "hf").eos_token_id == 2


def test_prune_two_ranks_metrics_and_export(prune2, data_dir):
    tmp, cfg = prune2
    run_dir = Path(cfg["run_dir"])
    m = metrics(run_dir)
    assert [r["step"] for r in m] == [0, 4, 8, 12]
    for r in m:
        for key in ("tokens", "eval_loss", "weights", "reference_loss", "reference_ratio", "lr", "world_size",
                    "weights_digests", "expected_shape", "lagrangian"):
            assert key in r, key
        assert r["world_size"] == 2
    for prev, cur in zip(m, m[1:]):
        # every rank's workers read the same table, and it is what the trainer published
        assert len(set(cur["weights_digests"])) == 1 and cur["weights_digests"][0] == prev["weights_digest"]
    # SPEC §3 Timing: no decision at step 0 (steps 1-4 train on p0); every later decision comes
    # from its own evaluation (lag 0), and the metrics say how long the step waited for it.
    p0 = np.array(P0) / sum(P0)
    assert np.allclose(list(m[0]["weights"].values()), p0, atol=1e-12)
    assert [r["controller"]["from_step"] for r in m] == [r["step"] for r in m]
    assert all(r["controller_wait_seconds"] >= 0 for r in m)
    cpu = [r["controller_cpu_seconds"] for r in m]  # the controller process's CPU so far
    assert cpu[0] > 0 and cpu == sorted(cpu)
    # SPEC §2: masks and λ's follow the weights' warmup + cosine multiplier (warmup 2 of 12 steps).
    for r in m:
        mult = r["lr_groups"]["weights"] / cfg["train"]["lr"]
        assert r["lr_groups"]["masks"] == pytest.approx(0.5 * mult) and r["lr_groups"]["lambdas"] == pytest.approx(0.5 * mult)
    assert m[-1]["lr_groups"]["weights"] == pytest.approx(0.1 * cfg["train"]["lr"])
    assert all(0 <= r["expected_sparsity"] <= 1 and 0 <= r["target_sparsity"] <= 1 for r in m)
    assert m[0]["target_sparsity"] == 0 and m[-1]["target_shape"]["layers"] == TARGET["num_hidden_layers"]
    assert sum(m[-1]["tokens"].values()) == 12 * 8 * 32
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == tuple(TARGET.values())
    ev = evaluate(run_dir / "hf", data_dir, cfg)
    for d, v in m[-1]["eval_loss"].items():
        assert abs(ev["domain_loss"][d] - v) / v < 0.01, (d, ev["domain_loss"][d], v)


def test_dro_invariants_on_a_real_run(prune2):
    _, cfg = prune2
    m = metrics(Path(cfg["run_dir"]))
    p0 = np.array(P0) / sum(P0)
    fitted: dict[str, float] = {}
    for r in m:
        q = np.array(list(r["weights"].values()))
        # floors and clamps hold up to the one renormalisation after each (SPEC §3.2, §3.3)
        assert abs(q.sum() - 1) < 1e-9 and (q >= p0.min() / (1 + len(q) * p0.min()) - 1e-9).all()
        if r["reference_ratio"]:
            p = np.array(list(r["reference_ratio"].values()))
            assert (p >= p0.min() * 0.9).all() and (p <= p0.max() * 1.15).all()
            assert (p >= p0 / 2 * 0.9).all() and (p <= 2 * p0 * 1.15).all()
        for d, v in (r["reference_loss"] or {}).items():
            if d in fitted:
                assert v <= fitted[d] + 1e-12
        if r["controller"]:
            for d, f in r["controller"]["fits"].items():
                if f is not None:
                    fitted[d] = r["reference_loss"][d]


def test_one_rank_equals_two_ranks(prune2, tmp_path, data_dir, base_model):
    _, cfg2 = prune2
    cfg1 = prune_cfg(tmp_path, data_dir, base_model, "prune1")
    train(cfg1, tmp_path, ranks=1)
    m1, m2 = metrics(Path(cfg1["run_dir"])), metrics(Path(cfg2["run_dir"]))
    assert len(m1) == len(m2)
    for a, b in zip(m1, m2):
        assert a["tokens"] == b["tokens"]
        for d in a["eval_loss"]:
            assert math.isclose(a["eval_loss"][d], b["eval_loss"][d], rel_tol=2e-3), (a["step"], d)


def test_continue_stage_two_ranks(prune2, tmp_path, data_dir):
    _, pcfg = prune2
    cfg = tiny_run_config(tmp_path, data_dir, "continue", "cont", model={"init": str(Path(pcfg["run_dir"]) / "hf")},
                          dro={"mode": "drpruning", "initial_proportion": P0, "fit_start": 0.3, "history_start": 0.0})
    train(cfg, tmp_path, ranks=2)
    m = metrics(Path(cfg["run_dir"]))
    assert m[-1]["eval_loss"]["code"] < m[0]["eval_loss"]["code"]
    ev = evaluate(Path(cfg["run_dir"]) / "hf", data_dir, cfg)
    for d, v in m[-1]["eval_loss"].items():
        assert abs(ev["domain_loss"][d] - v) / v < 0.01


def _hf_weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def test_resume_equals_straight_and_controller_kill(prune2, tmp_path, data_dir, base_model):
    """Stop with SIGUSR1 at step 6, resume (resume=auto): the finished run equals the straight
    2-rank run. The controller process is SIGKILLed at step 9: it is restarted and replays."""
    _, straight = prune2
    cfg = prune_cfg(tmp_path, data_dir, base_model, "resumed")
    p = train(cfg, tmp_path, ranks=2, env={"MEGADRP_FAULT_SIGNAL_AT": "6"}, check=False)
    assert p.returncode == 3, p.stderr[-3000:]  # interrupted at a checkpoint: a non-zero exit, so `&&` stops
    run_dir = Path(cfg["run_dir"])
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    assert (run_dir / "checkpoints" / "step00000006" / "megadrp_state.pt").is_file()
    assert not (run_dir / "hf").exists()
    p = train(cfg, tmp_path, ranks=2, env={"MEGADRP_FAULT_KILL_CONTROLLER_AT": "9"})
    assert "controller process" in p.stderr and "died" in p.stderr
    a, b = metrics(Path(straight["run_dir"])), metrics(run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert b[-1]["controller_restarts"] >= 1
    for x, y in zip(a, b):
        assert x["weights"] == y["weights"] and x["tokens"] == y["tokens"]
        for d in x["eval_loss"]:
            assert math.isclose(x["eval_loss"][d], y["eval_loss"][d], rel_tol=1e-5, abs_tol=1e-6)
    wa, wb = _hf_weights(Path(straight["run_dir"]) / "hf"), _hf_weights(run_dir / "hf")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_elastic_resume_two_to_one_to_two_ranks(prune2, tmp_path, data_dir, base_model):
    """A checkpoint of 2 ranks resumes on 1, which stops at a checkpoint that 2 ranks finish
    (DeepSpeed's universal format, made once per checkpoint): the same tokens per domain, the same
    decisions and the same eval losses (1e-4) as the straight 2-rank run at every evaluation. The
    dry run says how each start would resume."""
    _, straight = prune2
    cfg = prune_cfg(tmp_path, data_dir, base_model, "elastic")
    path = write_config(tmp_path / "elastic.yaml", **cfg)
    assert train(cfg, tmp_path, ranks=2, env={"MEGADRP_FAULT_SIGNAL_AT": "4"}, check=False).returncode == 3
    dry = run([PY, "megadrp/train.py", "--config", str(path), "--dry-run", "--world-size", "1"]).stdout
    assert "written by 2 rank(s), on 1: elastic" in dry and "step 4" in dry
    p = train(cfg, tmp_path, ranks=1, env={"MEGADRP_FAULT_SIGNAL_AT": "8"}, check=False)
    assert p.returncode == 3 and "resuming on 1" in p.stderr, p.stderr[-3000:]
    run_dir = Path(cfg["run_dir"])
    assert (run_dir / "checkpoints" / "step00000004" / "universal" / "zero").is_dir()
    p = train(cfg, tmp_path, ranks=2)
    assert "written by 1 rank(s), resuming on 2" in p.stderr
    a, b = metrics(Path(straight["run_dir"])), metrics(run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 4, 8, 12]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        for d in x["eval_loss"]:
            assert math.isclose(x["eval_loss"][d], y["eval_loss"][d], rel_tol=1e-4)
            assert math.isclose(x["weights"][d], y["weights"][d], rel_tol=1e-5, abs_tol=1e-7)
    wa, wb = _hf_weights(Path(straight["run_dir"]) / "hf"), _hf_weights(run_dir / "hf")
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_zero_to_fp32_consolidates_our_checkpoint(prune2, tmp_path):
    """DeepSpeed's own zero_to_fp32 script reads our tagged checkpoints."""
    _, cfg = prune2
    ckpts = Path(cfg["run_dir"]) / "checkpoints"
    # no --tag: the checkpoint root's `latest` file names the newest complete checkpoint
    assert (ckpts / "latest").read_text().strip() == "step00000012"
    run([PY, str(ckpts / "zero_to_fp32.py"), str(ckpts), str(tmp_path / "fp32")])
    from safetensors.torch import load_file

    files = list((tmp_path / "fp32").glob("*.safetensors")) or list((tmp_path / "fp32").glob("*.bin"))
    assert files, list((tmp_path / "fp32").iterdir())
    sd = {}
    for f in files:
        sd.update(load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True))
    assert sd["model.embed_tokens.weight"].shape == (1024, 64)  # full, unpartitioned source shapes
    assert sd["model.layers.2.mlp.down_proj.weight"].shape == (64, 128)
    assert "l0.log_alpha.hidden" in sd and sd["l0.lambdas"].shape[1] == 2


def test_report_from_a_real_run(prune2, tmp_path, data_dir):
    """megadrp.report draws every plot and table from a real run's metrics.jsonl and eval."""
    tmp, cfg = prune2
    stage = tmp_path / "prune"
    stage.mkdir()
    (stage / "metrics.jsonl").write_text((Path(cfg["run_dir"]) / "metrics.jsonl").read_text())
    (stage / "cost.json").write_text((Path(cfg["run_dir"]) / "cost.json").read_text())
    (stage / "eval.json").write_text(json.dumps(evaluate(Path(cfg["run_dir"]) / "hf", data_dir, cfg)))
    out = tmp_path / "report"
    out.mkdir()
    run([PY, "-m", "megadrp.report", "--out", str(out), "--prune", str(stage)])
    text = (out / "report.md").read_text()
    for png in ("perplexity.png", "eval_loss.png", "weights.png", "expected_shape.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"({png})" in text
    assert "Final expected shape" in text and "Final domain weights of pruning" in text
    # the cost ledger's plan beside the clock's measurement (#40)
    assert "## Cost: the plan beside the measurement" in text and "| prune | held-out evaluation |" in text
    for name in metrics(Path(cfg["run_dir"]))[-1]["eval_loss"]:
        assert f"| {name} " in text, name


def test_gpu_check_script_runs_on_cpu(tmp_path):
    """benchmarks/gpu_check.py end to end on CPU (--smoke): the GPU machine is scarce, so
    the script must not meet its first bug there."""
    p = run([PY, "benchmarks/gpu_check.py", "--smoke", "--steps", "6", "--work", str(tmp_path / "w"),
             "--out", str(tmp_path / "out")], timeout=900)
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert json.loads(p.stdout.strip().splitlines()[-1]) == res
    assert res["device"] == "cpu" and res["tokens_per_s"] > 0 and res["mfu"] is None
    assert res["parameters"] > 0 and res["model_flops_per_token"] > 6 * res["parameters"]
    assert res["numerics"]["pass"] and res["sdpa"]["flash"]  # the CPU's flash kernel, in smoke mode
    assert 0 < res["plan_allocated_bytes"] < res["plan_bytes"]
    pairs = res["kd_step"]["pairs"]  # the distillation step, both student proportions
    assert len(pairs) == 2 and all(v["ratio"] > 0 and v["arithmetic"] > 1 for v in pairs.values()), pairs
    assert [v["student_parameters"] < v["teacher_parameters"] for v in pairs.values()] == [True, True]
    text = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| cpu |" in text and "Distillation step, KD / LM" in text


def test_dry_run_plans_without_building(tmp_path, data_dir, base_model, monkeypatch):
    """--dry-run checks config, data, the source's config.json, the batch layout for N ranks
    and the disk, prints the plan and exits 0; a world that cannot hold the global batch exits 2."""
    import shutil
    import types

    from megadrp.config import load_config
    from megadrp.errors import ConfigError
    from megadrp.plan import dry_run

    cfg = prune_cfg(tmp_path, data_dir, base_model, "dry", train={"global_batch": 32, "micro_batch": 4})
    path = write_config(tmp_path / "dry.yaml", **cfg)
    p = run([PY, "megadrp/train.py", "--config", str(path), "--dry-run", "--world-size", "16"])
    assert "micro-batch 2 × accumulation 1 × 16 ranks = global batch 32" in p.stdout and "no problem found" in p.stdout
    assert "× an interval's" in p.stdout and "checkpoint(s) of" in p.stdout
    # Room for save.keep + 1 checkpoints and the export, not for one checkpoint: 16 bytes a parameter each.
    loaded = load_config(str(path), ["save.keep=2", "save.interval=1"])
    from megadrp.model.hf_io import load_hf_config
    from megadrp.model.llama import count_parameters

    params = count_parameters(load_hf_config(str(base_model)))
    monkeypatch.setattr(shutil, "disk_usage", lambda _: types.SimpleNamespace(free=params * 16 * 2))
    with pytest.raises(ConfigError, match=r"the run needs about .* \(3 checkpoint\(s\) of .* save.keep=2"):
        dry_run(loaded, 16)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: types.SimpleNamespace(free=params * (16 * 3 + 4)))
    assert "dry run: no problem found" in dry_run(loaded, 16).lines
    # auto: the largest micro-batch whose plan fits the memory given (less the headroom)
    from megadrp.memory_plan import AUTO_HEADROOM

    auto = load_config(str(path), ["train.micro_batch=auto"])
    sizes = {m: dry_run(load_config(str(path), [f"train.micro_batch={m}"]), 4, check_disk=False)
             .data["memory_per_gpu_bytes"] for m in (8, 4)}
    assert sizes[8] > sizes[4]
    budget = int((sizes[4] + sizes[8]) / 2 / (1 - AUTO_HEADROOM))
    chosen = dry_run(auto, 4, budget, check_disk=False).data
    assert chosen["layout"]["micro_batch"] == 4 and chosen["problem"] is None
    assert dry_run(auto, 4, budget * 4, check_disk=False).data["layout"]["micro_batch"] == 8
    assert not (tmp_path / "dry").exists()  # nothing written
    p = run([PY, "megadrp/train.py", "--config", str(path), "--dry-run", "--world-size", "64"], check=False)
    assert p.returncode == 2 and "cannot be split evenly over 64 ranks" in p.stderr and "Traceback" not in p.stderr


def test_token_ids_past_the_model_vocabulary_are_refused(tmp_path, data_dir):
    """Shards whose ids reach past the model's embedding: refused before any compute from the
    manifest's recorded maximum (dry run, evaluate); without that record (a foreign or older
    manifest), the first window read names the shard. Never an IndexError from the embedding."""
    import shutil

    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    man = json.loads((data_dir / "manifest.json").read_text())
    top = max(d["max_token_id"] for d in man["domains"].values())
    assert 0 < top < man["vocab_size"]
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    man["vocab_size"] = top // 2  # as if the data came from another, larger tokenizer
    (data / "manifest.json").write_text(json.dumps(man))
    small = tmp_path / "small"
    LlamaForCausalLM(tiny_llama_config(vocab=top // 2 + 1)).save_pretrained(small)
    cfg = prune_cfg(tmp_path, data, small, "vocab")
    p = run([PY, "megadrp/train.py", "--config", str(write_config(tmp_path / "v.yaml", **cfg)), "--dry-run"],
            check=False)
    assert p.returncode == 2 and "reach past the model's vocab_size" in p.stderr and "Traceback" not in p.stderr
    p = run([PY, "-m", "megadrp.evaluate", "--model", str(small), "--data", str(data)], check=False)
    assert p.returncode == 2 and "reach past the model's vocab_size" in p.stderr, p.stderr[-2000:]
    for d in man["domains"].values():
        del d["max_token_id"]
    (data / "manifest.json").write_text(json.dumps(man))
    p = run([PY, "-m", "megadrp.evaluate", "--model", str(small), "--data", str(data), "--split", "eval"], check=False)
    assert p.returncode == 2 and "outside the model's vocabulary" in p.stderr and "_eval.bin" in p.stderr
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
