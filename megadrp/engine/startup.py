"""Everything a start would refuse, checked in one function that both `--dry-run` and the run call,
so that a clean dry run means the run starts: they cannot drift apart.

`check_start` needs no process group and no weights in memory. It reads the run directory, the
shards' headers, the models' config.json and weight headers, and the checkpoint a resume would
load; it raises a UserError with one line naming the key, file or flag. The run calls it on rank 0
before building anything (every rank then raises the same line), the dry run before it prints the
plan's verdict.
"""
from __future__ import annotations

from megadrp.errors import CheckpointError, ConfigError, IndexedDatasetError
from megadrp.plan import RunPlan


def check_start(plan: RunPlan, world: int) -> None:
    from megadrp.runtime.run_dir import RunDir

    cfg = plan.cfg
    RunDir(cfg.run_dir).validate(cfg.resume, cfg.overwrite)
    check_shards(plan)
    check_models(plan)
    check_resume(plan, world)


def check_shards(plan: RunPlan) -> None:
    """Every train and eval shard of the run's domains opens (header, index, sizes): a missing or
    truncated file is named before any model loads. The test split is not the run's to open."""
    from megadrp.data.indexed import IndexedDataset

    for d in plan.domains:
        for split, prefix in (("train", d.train), ("eval", d.eval)):
            try:
                IndexedDataset(prefix, plan.model_config.vocab_size)
            except (IndexedDatasetError, OSError, ValueError) as e:
                raise ConfigError(f"data_dir {plan.manifest.data_dir}: domain {d.name!r}, {split} split: {e}; "
                                  "rebuild the DATA_DIR with `megadrp preprocess`") from None


def check_models(plan: RunPlan) -> None:
    """model.init, a `model:` reference and the teacher each hold weights of the shape their
    config.json says (headers only, on the meta device), and a reference model's vocabulary fits
    the data."""
    import torch

    from megadrp.model.hf_io import check_weights, load_hf_config
    from megadrp.model.llama import MaskedLlama

    cfg = plan.cfg
    models = [("model.init", cfg.model.init if cfg.stage != "pretrain" else None),
              ("dro.reference_loss", plan.reference_model if plan.reference_model != cfg.distill.teacher else None),
              ("distill.teacher", cfg.distill.teacher)]
    for key, path in models:
        if not path:
            continue
        config = load_hf_config(path, seq_len=cfg.train.seq_len)
        if key == "dro.reference_loss":
            plan.manifest.check_vocab(config.vocab_size, cfg.domains)
        with torch.device("meta"):
            model = MaskedLlama(config)
        try:
            check_weights(model, path)
        except CheckpointError as e:
            raise ConfigError(f"{key}: {e}") from None


def check_resume(plan: RunPlan, world: int) -> None:
    """A resume that cannot work (a path that is no complete checkpoint, files of a rank missing,
    settings a resume may not change) is refused; `auto` with nothing to resume starts fresh."""
    from megadrp.config import to_dict
    from megadrp.engine.checkpoint import RunRecord, describe_resume
    from megadrp.runtime.run_dir import RunDir

    cfg = plan.cfg
    record = RunRecord(to_dict(cfg), plan.manifest.tokenizer_fingerprint).state_dict()
    said = describe_resume(RunDir(cfg.run_dir).checkpoints, cfg.resume, world, record)
    if ": cannot" in said:
        raise ConfigError(said)
