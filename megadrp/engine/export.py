"""End of a stage: the final masks (from the fp32 master log α), fold and slice them into a
smaller model of the same family, and write a standard Hugging Face directory with its
tokenizer and a `megadrp.json` provenance file. Collective (gathers), rank 0 writes.

The tokenizer: the source model's own files (its chat template, special tokens, a
sentencepiece `tokenizer.model` a re-saved copy may lack) when they have the vocabulary the
data was made with; otherwise, with a warning, the tokenizer the data was made with, since
that is what the model was trained on.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from megadrp.data.tokenizer import fingerprint_of
from megadrp.engine import zero3
from megadrp.model.hf_io import export_hf, tokenizer_files
from megadrp.model.llama import count_parameters
from megadrp.model.masks import L0Masks
from megadrp.model.prune import prune_state_dict
from megadrp.plan import RunPlan

log = logging.getLogger("megadrp")


def tokenizer_source(source: str | None, data_tokenizer: Path) -> Path:
    """The directory whose tokenizer files the export carries (see the module docstring)."""
    if not source or not Path(source).is_dir() or not tokenizer_files(source):
        return data_tokenizer
    from transformers import AutoTokenizer

    try:
        same = (AutoTokenizer.from_pretrained(source).get_vocab()
                == AutoTokenizer.from_pretrained(str(data_tokenizer)).get_vocab())
    except Exception as e:  # noqa: BLE001 — any failure here must not strand the other ranks at export
        log.warning("export: the tokenizer in %s cannot be loaded (%s); exporting the data's (%s)",
                    source, e, data_tokenizer)
        return data_tokenizer
    if not same:
        log.warning("export: the tokenizer in %s has another vocabulary than the one the data was made with; "
                    "exporting the data's (%s), which the model was trained on", source, data_tokenizer)
        return data_tokenizer
    return Path(source)


def final_masks(l0: L0Masks) -> dict[str, torch.Tensor]:
    """The masks of the exported shape, chosen from the fp32 master log α (SPEC §2), on the
    CPU. Collective under ZeRO-3 (every rank calls it); the engine's last evaluation and the
    export both take their masks from here, so the last eval loss is the exported model's."""
    l0.master_log_alpha = zero3.fp32_master(dict(l0.log_alpha.items()))
    with torch.no_grad():
        return l0.deterministic(final=True, log_alpha=l0.master_log_alpha)


def export(plan: RunPlan, engine, out_dir: Path, rank: int, masks: dict[str, torch.Tensor] | None = None
           ) -> Path | None:
    """Write the final model into `out_dir` (the run's `hf/`); collective, rank 0 writes.
    `masks`: a one-shot prune's (engine/one_shot.py), else the L0 masks' final ones."""
    sd = zero3.full_state_dict(engine, plan.zero3, rank)
    l0 = engine.module.l0
    z = masks if masks is not None else final_masks(l0) if plan.pruning and l0 is not None else {}
    out = None
    if rank == 0:
        assert sd is not None
        weights = {k: v for k, v in sd.items() if not k.startswith("l0.")}
        config = plan.model_config
        if plan.pruning:
            weights, config = prune_state_dict(weights, config, z)
        tok = tokenizer_source(plan.cfg.model.init, plan.manifest.tokenizer)
        about = json.dumps({
            "stage": plan.cfg.stage, "steps": 0 if masks is not None else plan.cfg.train.steps,
            "method": plan.cfg.prune.method if plan.pruning else None, "source": plan.cfg.model.init,
            "parameters": count_parameters(config), "source_parameters": count_parameters(plan.model_config),
            "domains": plan.names, "tokenizer_fingerprint": fingerprint_of(tok)}, indent=2) + "\n"
        out = export_hf(weights, config, out_dir, tok, extra={"megadrp.json": about})
        log.info("exported model: %s (%s parameters)", out, f"{count_parameters(config):,}")
    dist.barrier()
    return out
