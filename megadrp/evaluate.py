"""Independent per-domain evaluation of any Hugging Face causal LM on megadrp's eval windows.

    python -m megadrp.evaluate --model HF_DIR --data DATA_DIR [--tokens-per-domain N]
        [--seq-len N] [--out FILE] [--domains a,b,...]

Loads the model with transformers (not megadrp's model class: this is the check that the
export is a standard model) and scores the same fixed windows the trainer evaluates. The
last line printed is a JSON object:
{"domain_loss": {...}, "domain_ppl": {...}, "mean_ppl": x, "worst_ppl": x}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megadrp.atomic import atomic_write_text
from megadrp.data.manifest import ManifestError, load_manifest
from megadrp.data.mixture import EvalWindows


@torch.no_grad()
def evaluate(model_dir: str, data_dir: str, tokens_per_domain: int, seq_len: int,
             domains: list[str] | None = None, batch: int = 8) -> dict:
    from transformers import AutoModelForCausalLM

    if not Path(model_dir, "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    if not any(any(Path(model_dir).glob(pat)) for pat in ("*.safetensors", "pytorch_model*.bin")):
        raise FileNotFoundError(f"{model_dir}: config.json but no weights (*.safetensors or pytorch_model*.bin); "
                                "point --model at a complete export (RUN_DIR/hf)")
    manifest = load_manifest(data_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    manifest.check_vocab(model.config.vocab_size, domains)
    losses = {}
    for d in manifest.select(domains):
        ew = EvalWindows(d.eval, seq_len, tokens_per_domain, d.name, model.config.vocab_size)
        total, count = 0.0, 0
        for s in range(0, ew.n, batch):
            x = torch.from_numpy(np.stack([ew[i] for i in range(s, min(s + batch, ew.n))]))
            logits = model(input_ids=x[:, :-1]).logits.float()
            nll = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
        losses[d.name] = total / count
    ppl = {k: math.exp(v) for k, v in losses.items()}
    return {"domain_loss": losses, "domain_ppl": ppl, "mean_ppl": float(np.mean(list(ppl.values()))),
            "worst_ppl": max(ppl.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--data", required=True, help="DATA_DIR written by data_tools/preprocess.py")
    ap.add_argument("--tokens-per-domain", type=int, default=None,
                    help="eval tokens per domain (default: the trainer's, from RUN_DIR/config.yaml beside the model, else 16384)")
    ap.add_argument("--seq-len", type=int, default=None, help="window length (default: the trainer's, else 128)")
    ap.add_argument("--domains", default=None, help="comma-separated subset of domains")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    args = ap.parse_args(argv)
    for flag, v in (("--tokens-per-domain", args.tokens_per_domain), ("--seq-len", args.seq_len)):
        if v is not None and v < 1:
            ap.error(f"{flag}={v}: must be at least 1")  # exit 2, before any work
    if args.out and not Path(args.out).resolve().parent.is_dir():
        ap.error(f"--out {args.out}: its folder does not exist; create it first")
    tokens, seq = args.tokens_per_domain, args.seq_len
    run_cfg = Path(args.model).parent / "config.yaml"
    if (tokens is None or seq is None) and run_cfg.is_file():
        import yaml

        rc = yaml.safe_load(run_cfg.read_text())
        tokens = tokens if tokens is not None else rc["eval"]["tokens_per_domain"]
        seq = seq if seq is not None else rc["train"]["seq_len"]
    try:
        res = evaluate(args.model, args.data, tokens if tokens is not None else 16384, seq if seq is not None else 128,
                       args.domains.split(",") if args.domains else None)
    except (FileNotFoundError, ManifestError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    line = json.dumps(res)
    if args.out:
        atomic_write_text(args.out, line + "\n")
    for name, v in res["domain_loss"].items():
        print(f"{name:>14}: loss {v:.4f}  ppl {res['domain_ppl'][name]:.3f}", file=sys.stderr)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
