"""Tagged checkpoints that become visible only when complete.

Layout: RUN_DIR/checkpoints/step00000040/ holds DeepSpeed's files (every rank's
partitions) and `megadrp_state.pt` (the `state_dict()` of every stateful component the
trainer lists: loop counters, domain schedule). It is written as `.tmp-step00000040/` and
renamed by rank 0 after every rank has finished, so a kill at any moment leaves either the
old set of checkpoints or the old set plus one whole new one. After the rename the root's
`latest` file names the new tag (DeepSpeed's convention: `zero_to_fp32.py ROOT OUT` works
without `--tag`). `resume: auto` takes the highest complete step.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch
import torch.distributed as dist

from megadrp.errors import TrainingStopped
from megadrp.runtime.files import atomic_open, atomic_write_text, fsync_dir

STATE_FILE = "megadrp_state.pt"
_TAG = re.compile(r"^step(\d{8})$")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _TAG.match(d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def clear_partial(root: Path) -> list[Path]:
    """Remove what a save killed mid-way left: `.tmp-stepN/` folders (at 7B about 100 GB each) and
    a universal form's unfinished `.universal.tmp/`. Rank 0, before anything is loaded or saved;
    each removal is logged."""
    import logging

    removed = []
    if root.is_dir():
        for d in [*root.glob(".tmp-step*"), *root.glob("step*/.universal.tmp")]:
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
                logging.getLogger("megadrp").warning("removed %s, left by a save that did not finish", d)
    return removed


def check_room(root: Path, needed_bytes: int) -> None:
    """Fail with a clear message, before writing, when the disk cannot hold a checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if needed_bytes > free:
        raise OSError(f"{root}: {free / 2**30:.2f} GiB free, a checkpoint needs about {needed_bytes / 2**30:.2f} GiB; "
                      "free space or point run_dir elsewhere (the last complete checkpoint is kept)")


def save(engine, root: Path, step: int, states: Mapping[str, Stateful], keep: int, kill_in_save: int = 0) -> Path:
    """Collective: every rank calls it. `states`: the components whose `state_dict()` goes
    into `megadrp_state.pt` (rank 0's; they are identical on every rank or rank-0 only)."""
    rank = dist.get_rank()
    tag, tmp_tag = tag_of(step), f".tmp-{tag_of(step)}"
    tmp = root / tmp_tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    if kill_in_save == step:  # fault injection (megadrp.faults): die mid-save
        os.kill(os.getpid(), 9)
    state = {name: obj.state_dict() for name, obj in states.items()}
    state["world_size"] = dist.get_world_size()
    if rank == 0:
        with atomic_open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
        fsync_dir(tmp)
    dist.barrier()
    final = root / tag
    if rank == 0:
        if final.exists():  # a re-save of the same step (resume then immediate save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / "latest", tag + "\n")
        for _, old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_state(path: Path) -> dict:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def problem(path: Path, rank: int | None, world: int) -> str | None:
    """Why rank `rank` (None: any of the `world` ranks, the dry run's and the start check's
    question) could not load the checkpoint at `path` (None: it looks loadable). Checked on
    every rank before any loads, so that a rank missing its files is found before the ranks part
    ways in a collective load. A checkpoint of another rank count needs every one of its ranks'
    files (they are converted to the universal form); one of this rank count, the rank's own.
    The state is read and the folder listed once, whatever the rank count."""
    if not path.is_dir():
        return f"{path}: not a directory"
    try:
        saved = read_state(path).get("world_size", world)
    except Exception as e:  # truncated, corrupt, unpicklable: all mean "cannot resume from it"
        return f"{path / STATE_FILE}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    listing = {f.name: f.stat().st_size for f in path.iterdir() if f.is_file()}
    partitioned = any("zero_pp_rank_" in n for n in listing)
    ranks = range(saved) if saved != world or rank is None else [rank]
    for r in ranks:
        own = [s for n, s in listing.items() if (f"zero_pp_rank_{r}_" in n if partitioned else
                                                 n.startswith("mp_rank_") and n.endswith("_model_states.pt"))]
        if not own or 0 in own:
            return f"{path}: the DeepSpeed files of rank {r} are missing or empty"
    return None


def describe_resume(root: Path, setting: str, world: int, record: dict | None = None) -> str:
    """What a start with `resume: setting` on `world` ranks would do, for the dry run (no process
    group: it reads files only). `record`: the run's RunRecord state, to find settings a resume
    may not change ('cannot' in the answer)."""
    if setting == "none":
        return "resume: none: starts fresh (status done in run_dir needs overwrite=true)"
    candidates = [p for _, p in reversed(complete_checkpoints(root))] if setting == "auto" else [Path(setting)]
    for path in candidates:
        why = problem(path, None, world)
        if why is not None:
            if setting != "auto":
                return f"resume {path}: cannot: {why}"
            continue
        if record is not None:
            changed = resume_changes(read_state(path).get("run"), record)
            if changed:
                return (f"resume {path}: cannot: the checkpoint was made with other settings: {'; '.join(changed)}")
        saved = read_state(path).get("world_size", world)
        step = read_state(path).get("train", {}).get("step", "?")
        if saved == world:
            return f"resume: from {path} (step {step}, written by {saved} rank(s), the same as now)"
        ready = (path / UNIVERSAL / "zero" / "optimizer_state.pt").is_file()
        return (f"resume: from {path} (step {step}) written by {saved} rank(s), on {world}: elastic, through "
                f"DeepSpeed's universal format ({'already converted' if ready else 'converted once at start: about 12 bytes a parameter of disk'})")
    if candidates:
        return (f"resume=auto: cannot: no checkpoint under {root} can be loaded; remove the broken ones, or start "
                "fresh with resume=none")
    return "resume: auto: no complete checkpoint under " + str(root) + ": starts fresh"


def load(engine, path: Path, states: Mapping[str, Stateful]) -> None:
    """Collective. Loads the engine's state in place and each component's from
    `megadrp_state.pt`."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    missing = [name for name in states if name not in state and name != "run"]  # `run`: newer than some checkpoints
    if missing:
        raise ValueError(f"{path / STATE_FILE}: no {missing[0]!r} state (written by an older megadrp?); "
                         "resume from a checkpoint of this version, or start fresh with resume=none")
    world = dist.get_world_size()
    saved = state.get("world_size", world)
    if saved == world:
        engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                               load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        _load_elastic(engine, path, saved, world)
    for name, obj in states.items():
        if name in state:
            obj.load_state_dict(state[name])


UNIVERSAL = "universal"  # inside a checkpoint: its DeepSpeed universal form, made once when first needed


def universal_form(path: Path) -> Path:
    """The checkpoint at `path` in DeepSpeed's universal format (one file a parameter for the
    fp32 master and each Adam moment, independent of the rank count), made by rank 0 on first
    need and kept beside the per-rank files (it is about the size of the optimizer state: 12
    bytes a parameter). Collective; the conversion writes into a temporary folder renamed when
    complete, so a kill mid-way leaves nothing a later start would trust."""
    out = path / UNIVERSAL
    if dist.get_rank() == 0 and not (out / "zero" / "optimizer_state.pt").is_file():
        import argparse
        import contextlib
        import io
        import logging

        from deepspeed.checkpoint import ds_to_universal

        tmp = path / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
        logging.getLogger("megadrp").info("resume: converting %s to DeepSpeed's universal format", path)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints, one per parameter
            ds_to_universal.main(args)
        (path / "latest_universal").unlink(missing_ok=True)  # written beside its output: not ours
        os.replace(tmp, out)
        fsync_dir(path)
    dist.barrier()
    return out


def _load_elastic(engine, path: Path, saved: int, world: int) -> None:
    """Resume a checkpoint of `saved` ranks on `world` ranks: the weights, fp32 master and Adam
    moments from its universal form, each rank taking its new partition of every parameter."""
    import logging

    logging.getLogger("megadrp").warning("resume: %s was written by %d rank(s), resuming on %d: loading its universal "
                                         "form (docs/cluster.md, 'Elastic resume')", path, saved, world)
    uni = universal_form(path)
    groups = [dict(g) for g in engine.optimizer.param_groups]  # the settings and the fp32 partitions they own
    engine._config.load_universal_checkpoint = True  # read at load time; DeepSpeed has no per-call switch
    try:
        engine.load_checkpoint(str(uni.parent), tag=uni.name, load_module_strict=True,
                               load_optimizer_states=True, load_lr_scheduler_states=False)
    finally:
        engine._config.load_universal_checkpoint = False
    # DeepSpeed's universal load of ZeRO-3 gives every parameter group the first group's settings:
    # put each group's own back (the masks and λ's have their own lr and no weight decay).
    for g, own in zip(engine.optimizer.param_groups, groups):
        g.clear()
        g.update(own)
    # It also gives every partition's Adam state one shared `step` tensor, which torch's Adam
    # increments in place once per partition and step: bias corrections would run ahead. One
    # tensor each.
    opt = engine.optimizer
    for flat in getattr(opt, "fp32_partitioned_groups_flat", []):
        state = opt.optimizer.state.get(flat, {})
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def first_problem(problem: str | None, world: int) -> str | None:
    """Collective: the first rank's problem (in rank order), the same on every rank."""
    found = [None] * world
    dist.all_gather_object(found, problem)
    return next((f"rank {i}: {p}" if world > 1 else p for i, p in enumerate(found) if p), None)


# What a resume may change (dotted keys and their prefixes): the world size is no key (elastic
# resume), steps may extend a run, and what only decides where, how fast or how loudly it runs.
# Everything else made the checkpoint what it is: a change is refused before anything loads.
RESUMABLE = ("train.steps", "train.micro_batch", "train.num_workers", "train.prefetch_factor", "train.log_interval",
             "train.gpu_memory_gib", "train.max_bad_steps", "eval.micro_batch", "eval.at_start", "save.", "wandb.",
             "resume", "overwrite", "run_dir", "deepspeed", "model.activation_checkpointing", "allow_tokenizer_mismatch",
             "distill.chunk_tokens")


class RunRecord:
    """What the run was made from, saved in every checkpoint (its resolved config and the data's
    tokenizer fingerprint), so a resume can refuse another one before loading anything."""

    def __init__(self, config: dict, tokenizer_fingerprint: str | None) -> None:
        self.record = {"config": config, "tokenizer_fingerprint": tokenizer_fingerprint}

    def state_dict(self) -> dict[str, Any]:
        return self.record

    def load_state_dict(self, state: dict[str, Any]) -> None:  # compared before loading: `resume_changes`
        pass


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def resume_changes(saved: dict | None, now: dict) -> list[str]:
    """'key: saved → now' for every setting a resume may not change (RESUMABLE); [] for a
    checkpoint from before records were saved (nothing to compare). A key the record lacks was
    added to megadrp after the checkpoint was written: not a change the user made."""
    if not saved:
        return []
    a, b = _flat(saved.get("config", {})), _flat(now["config"])
    out = [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(a)
           if a.get(k) != b.get(k) and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE)]
    fa, fb = saved.get("tokenizer_fingerprint"), now.get("tokenizer_fingerprint")
    if fa and fb and fa != fb:
        out.append(f"the data's tokenizer: fingerprint {fa} → {fb}")
    return out


def refuse_changes(path: Path, record: dict | None) -> None:
    """ValueError (one line, every changed key with both values) if the checkpoint at `path`
    was made from settings `record` (RunRecord's) may not change."""
    if record is None:
        return
    changed = resume_changes(read_state(path).get("run"), record)
    if changed:
        raise ValueError(f"resume {path}: the checkpoint was made with other settings: {'; '.join(changed)}. "
                         "Restore them to resume, or start fresh (resume=none, or another run_dir)")


def resume(engine, root: Path, setting: str, states: Mapping[str, Stateful], world: int) -> Path | None:
    """Collective. Load the checkpoint `setting` names (config `resume`): `none`; `auto`, the
    newest under `root` that every rank can load (the ones skipped are logged with the reason);
    or a path, which must load. Returns the checkpoint loaded, None for a fresh start. Raises
    ValueError with one line when nothing can be resumed that should be."""
    import logging

    if setting == "none":
        return None
    rank = dist.get_rank()
    if setting == "auto":
        candidates = [p for _, p in reversed(complete_checkpoints(root))]
    else:
        candidates = [Path(setting)]
        if not (candidates[0] / STATE_FILE).is_file():
            raise ValueError(f"resume {setting}: not a complete megadrp checkpoint (no {STATE_FILE})")
    for path in candidates:
        why = first_problem(problem(path, rank, world), world)
        if why is None:
            run = states.get("run")
            refuse_changes(path, run.state_dict() if run is not None else None)  # before anything loads
            load(engine, path, states)  # a ValueError here (other domains, world size) is never skipped
            return path
        if setting != "auto":
            raise ValueError(f"resume {path}: {why}")
        logging.getLogger("megadrp").warning("resume: skipping %s: %s", path, why)
    if candidates:
        raise ValueError(f"resume=auto: no checkpoint under {root} can be loaded (see the warnings above); "
                         "remove the broken ones, or start fresh with resume=none")
    return None


class Saver:
    """The loop's saves: room on the disk first, finite weights only (a run whose weights went
    non-finite stops with its last good checkpoint named), the seconds on the clock's `save`."""

    def __init__(self, engine, root: Path, states: Mapping[str, Stateful], keep: int, checkpoint_bytes: int,
                 rank: int, world: int, clock, kill_in_save: int = 0) -> None:
        self.engine, self.root, self.states, self.keep = engine, root, states, keep
        self.bytes, self.rank, self.world, self.clock, self.kill_in_save = checkpoint_bytes, rank, world, clock, kill_in_save

    def check_room(self) -> None:
        from megadrp.runtime.process_group import on_rank0

        on_rank0(lambda: check_room(self.root, self.bytes), self.rank, self.world)

    def __call__(self, step: int, weights_finite: bool, on_failure) -> None:
        """Collective. `on_failure()` runs before the error that refuses non-finite weights (it
        marks the run failed)."""
        with self.clock.part("save"):
            self.check_room()
            if first_problem(None if weights_finite else "non-finite weights", self.world) is not None:
                last = latest(self.root)
                on_failure()
                raise TrainingStopped(f"step {step}: the model's weights are not finite; not saving them and not "
                                      f"exporting. The last good checkpoint is {last or 'none (no checkpoint was written)'};"
                                      " lower train.lr or raise train.warmup_steps and resume from it")
            save(self.engine, self.root, step, self.states, self.keep, self.kill_in_save)
