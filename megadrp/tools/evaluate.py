"""Independent per-domain evaluation of any Hugging Face causal LM on megadrp's eval windows.

    megadrp eval --model HF_DIR --data DATA_DIR [--split test|eval] [--tokens-per-domain N]
        [--seq-len N] [--out FILE] [--domains a,b,...] [--shift [--p0 SPEC] [--rho R]]
        [--corrupt RATE [--corrupt-seed N]] [--tasks arc_easy,hellaswag,... [--task-dir DIR] [--limit N] [--num-fewshot K]]

Loads the model with transformers (not megadrp's model class: this is the check that the
export is a standard model) and scores the first `tokens // seq_len` windows of each domain's
test split, where the DATA_DIR has one (`megadrp preprocess --test-docs`): documents no
training run opened. `--split eval` scores the windows the trainer evaluated and its domain
schedule steered by instead; a DATA_DIR without a test split is scored on them, and a line says
so. The last line printed is a JSON object:
{"split": "test", "domain_loss": {...}, "domain_ppl": {...}, "mean_ppl": x, "worst_ppl": x,
 "windows": {...}}.

`--shift` adds a "shift" object: the loss (and perplexity) the model would have under the
uniform mix, under p0, under the worst mix inside the χ² ball of radius ρ around p0 (the
DRO objective; the mix is reported) and on the single worst domain. p0 and ρ default to the
run's `dro.initial_proportion` and `dro.rho` (RUN_DIR/config.yaml beside the model).

`--tasks` adds a "downstream" object: lm-evaluation-harness's metrics per task
(megadrp/downstream.py; `pip install -e .[eval]`).
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

from megadrp.data.manifest import Manifest, load_manifest
from megadrp.data.mixture import EvalWindows
from megadrp.errors import ManifestError, TokenizerError
from megadrp.runtime.files import atomic_write_text
from megadrp.runtime.run_dir import RunDir


def corrupt(x: torch.Tensor, rate: float, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` [B, seq + 1] with each token replaced, with probability `rate`, by one drawn uniformly
    from the vocabulary (a seeded generator: the same corruption for every model scored); and
    the mask [B, seq] of the targets that were left intact. Only those are scored: the loss then
    measures how well the model predicts real text from a damaged context, not how it guesses
    noise."""
    if rate <= 0:
        return x, torch.ones(x.shape[0], x.shape[1] - 1, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    hit = torch.rand(x.shape, generator=g) < rate
    noise = torch.randint(0, vocab, x.shape, generator=g)
    return torch.where(hit, noise, x), ~hit[:, 1:]


def default_split(manifest: Manifest, split: str | None) -> tuple[str, str | None]:
    """The split to score and, when it is not the one asked for or expected, a line saying why:
    `None` means the test split where every domain has one, else the eval split."""
    if split is not None:
        if split == "test" and not manifest.has_test:
            raise ManifestError(f"{manifest.data_dir}: no test split; make the DATA_DIR with "
                                "`megadrp preprocess --test-docs N`, or score the eval split with --split eval")
        return split, None
    if manifest.has_test:
        return "test", None
    return "eval", (f"{manifest.data_dir} has no test split (made without --test-docs): scoring the eval split, "
                    "the windows a run evaluates and steers its domain schedule by")


@torch.no_grad()
def evaluate(model_dir: str, data_dir: str, tokens_per_domain: int, seq_len: int,
             domains: list[str] | None = None, batch: int = 8, corrupt_rate: float = 0.0, seed: int = 0,
             split: str | None = None, allow_tokenizer_mismatch: bool = False) -> dict:
    """Per-domain mean token loss and perplexity of the model at `model_dir` on the first
    windows of DATA_DIR's `split` (`default_split`); with `corrupt_rate`, on windows damaged by
    `corrupt` (seeded by `seed` and the domain's place), scoring the intact targets only."""
    from transformers import AutoModelForCausalLM

    if not Path(model_dir, "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    if not any(any(Path(model_dir).glob(pat)) for pat in ("*.safetensors", "pytorch_model*.bin")):
        raise FileNotFoundError(f"{model_dir}: config.json but no weights (*.safetensors or pytorch_model*.bin); "
                                "point --model at a complete export (RUN_DIR/hf)")
    manifest = load_manifest(data_dir)
    if not allow_tokenizer_mismatch:  # before the model loads: a wrong pairing costs no time
        from megadrp.data.tokenizer import fingerprint_of

        manifest.check_tokenizer(f"--model {model_dir}", fingerprint_of(model_dir), "pass --allow-tokenizer-mismatch")
    split, note = default_split(manifest, split)
    if note:
        print(f"evaluate: {note}", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    manifest.check_vocab(model.config.vocab_size, domains)
    losses, windows, capped = {}, {}, {}
    for j, d in enumerate(manifest.select(domains)):
        ew = EvalWindows(d.split(split), seq_len, tokens_per_domain, d.name, model.config.vocab_size, split)
        windows[d.name] = ew.n
        if ew.n < max(1, tokens_per_domain // seq_len):
            capped[d.name] = ew.n * seq_len
            print(f"evaluate: domain {d.name!r}: its {split} split holds {ew.n} windows of {seq_len}, fewer than "
                  f"--tokens-per-domain {tokens_per_domain} asks; scoring all {ew.n * seq_len:,} tokens", file=sys.stderr)
        total, count = 0.0, 0
        for s in range(0, ew.n, batch):
            x = torch.from_numpy(np.stack([ew[i] for i in range(s, min(s + batch, ew.n))]))
            x, keep = corrupt(x, corrupt_rate, model.config.vocab_size, ((seed * 1000003 + j) * 1000003 + s) % 2**31)
            logits = model(input_ids=x[:, :-1]).logits.float()
            nll = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
            total += float(nll[keep.flatten()].sum())
            count += int(keep.sum())
        losses[d.name] = total / count
    ppl = {k: math.exp(v) for k, v in losses.items()}
    return {"split": split, "domain_loss": losses, "domain_ppl": ppl, "mean_ppl": float(np.mean(list(ppl.values()))),
            "worst_ppl": max(ppl.values()), "windows": windows, "seq_len": seq_len,
            "tokens_per_domain": tokens_per_domain, **({"capped": capped} if capped else {})}


def shift_report(losses: dict[str, float], p0: np.ndarray, rho: float) -> dict:
    """Mean loss under domain mixes a deployment may meet: uniform, p0, the worst in the χ²
    ball of radius ρ around p0, the worst single domain. A mix's loss is Σ q_i·loss_i (each
    domain's mean token loss, weighted by the share of tokens it gets)."""
    from megadrp.dro.weights import worst_mix

    names = list(losses)
    loss = np.array([losses[n] for n in names])
    q = worst_mix(loss, p0, rho)
    j = int(np.argmax(loss))

    def at(value: float, **more) -> dict:
        return {"loss": float(value), "ppl": math.exp(value), **more}

    return {"rho": rho, "p0": dict(zip(names, map(float, p0))),
            "uniform": at(loss.mean()), "p0_mix": at(float(p0 @ loss)),
            "worst_chi2": at(float(q @ loss), mix=dict(zip(names, map(float, q)))),
            "worst_domain": at(loss[j], domain=names[j])}


def _p0(spec, manifest, names: list[str], key: str, model_init: str | None = None, groups_spec=None) -> np.ndarray:
    """Domain proportions from --p0 (uniform | tokens | tokens^0.3 | comma-separated values in
    the domains' order | name=value pairs) or the run config's dro.initial_proportion, which is over the run's
    `domain_groups` where it has them (each group's share then split as its sampler splits it)."""
    from megadrp.data.groups import resolve_groups
    from megadrp.plan import initial_proportion

    if isinstance(spec, str) and ("," in spec or "=" in spec):
        try:
            if "=" in spec:  # name=value,...: shares by domain name, in any order
                spec = {k.strip(): float(v) for k, v in (item.split("=", 1) for item in spec.split(","))}
            else:
                spec = [float(x) for x in spec.split(",")]
        except ValueError as e:
            raise ValueError(f"{key}={spec!r}: not a comma-separated list of numbers or of name=number") from e
    domains = manifest.select(names)
    groups = resolve_groups(groups_spec, names, [d.train_tokens for d in domains])
    return groups.expand(initial_proportion(spec, domains, names, key, model_init=model_init, groups=groups))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--data", required=True, help="DATA_DIR written by `megadrp preprocess`")
    ap.add_argument("--split", choices=("test", "eval"), default=None,
                    help="the held-out split to score (default: test where the DATA_DIR has one, else eval, said in "
                    "one line)")
    ap.add_argument("--tokens-per-domain", type=int, default=None,
                    help="eval tokens per domain (default: the trainer's, from RUN_DIR/config.yaml beside the model, else 16384)")
    ap.add_argument("--seq-len", type=int, default=None, help="window length (default: the trainer's, else 128)")
    ap.add_argument("--domains", default=None, help="comma-separated subset of domains (default: the run's "
                    "`domains` from RUN_DIR/config.yaml beside the model, else all in the manifest)")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    ap.add_argument("--shift", action="store_true", help="also report losses under shifted domain mixes")
    ap.add_argument("--p0", default=None, help="with --shift: uniform, tokens, tokens^0.3, carried, comma-separated "
                    "values in the domains' order, or name=value,... (default: the run's dro.initial_proportion, else uniform)")
    ap.add_argument("--rho", type=float, default=None, help="with --shift: χ² radius (default: the run's dro.rho, "
                    "else 0.1)")
    ap.add_argument("--corrupt", type=float, default=0.0, metavar="RATE",
                    help="replace this share of the eval tokens at random (seeded by --corrupt-seed) and score the "
                    "intact targets: robustness to damaged text (0: off)")
    ap.add_argument("--corrupt-seed", type=int, default=0, help="with --corrupt: the seed of the damage")
    ap.add_argument("--allow-tokenizer-mismatch", action="store_true",
                    help="score a model whose tokenizer differs from the one the data was made with (by fingerprint: "
                    "every token, its id and the special ids); only where you know they agree")
    ap.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks: downstream accuracy")
    ap.add_argument("--task-dir", default=None, help="with --tasks: a directory of your own lm-eval task YAMLs")
    ap.add_argument("--limit", type=int, default=None, help="with --tasks: at most N examples a task")
    ap.add_argument("--num-fewshot", type=int, default=None, help="with --tasks: few-shot examples (task default)")
    ap.add_argument("--online", action="store_true", help="with --tasks: let lm-eval download datasets from the "
                    "Hugging Face hub (default: offline, local and cached data only)")
    args = ap.parse_args(argv)
    for flag, v, lowest in (("--tokens-per-domain", args.tokens_per_domain, 1), ("--seq-len", args.seq_len, 1),
                            ("--limit", args.limit, 1), ("--num-fewshot", args.num_fewshot, 0)):
        if v is not None and v < lowest:
            ap.error(f"{flag}={v}: must be at least {lowest}")  # exit 2, before any work
    if args.tasks:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            ap.error("--tasks needs lm-evaluation-harness: pip install -e '.[eval]'")
    if args.out and Path(args.out).is_dir():
        ap.error(f"--out {args.out}: a directory; give the path of the JSON file to write")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        ap.error(f"--out {args.out}: its folder does not exist; create it first")
    if not 0.0 <= args.corrupt < 1.0:
        ap.error(f"--corrupt={args.corrupt}: a share of tokens in [0, 1)")
    if args.rho is not None and not (math.isfinite(args.rho) and args.rho > 0):
        ap.error(f"--rho={args.rho}: must be a positive finite number")
    run_cfg = RunDir(Path(args.model).parent).config
    rc: dict = {}
    if run_cfg.is_file():
        import yaml

        rc = yaml.safe_load(run_cfg.read_text()) or {}
    tokens = args.tokens_per_domain if args.tokens_per_domain is not None else \
        rc.get("eval", {}).get("tokens_per_domain", 16384)
    if tokens == "auto":  # the run's adaptive evaluation: score its ceiling (capped by the split)
        tokens = int(rc.get("eval", {}).get("max_tokens_per_domain", 2048000))
    seq = args.seq_len if args.seq_len is not None else rc.get("train", {}).get("seq_len", 128)
    # The run's own domains, in its order, unless --domains says otherwise: a p0 given as a
    # list in the run's config is in that order.
    domains = args.domains.split(",") if args.domains else rc.get("domains") or None
    try:
        manager = p0 = None
        if args.tasks:  # a task name lm-eval does not know fails here, before any evaluation
            from megadrp.tools.downstream import task_manager

            manager = task_manager(args.tasks.split(","), args.task_dir, online=args.online)
        if args.shift:  # likewise a p0 that does not fit the domains
            manifest = load_manifest(args.data)
            names = domains or list(manifest.domains)
            spec, where, groups = (args.p0, "--p0", None) if args.p0 is not None else \
                (rc.get("dro", {}).get("initial_proportion"), f"{run_cfg}: dro.initial_proportion",
                 rc.get("domain_groups"))
            p0 = _p0(spec, manifest, names, where, rc.get("model", {}).get("init"), groups)
        res = evaluate(args.model, args.data, tokens, seq, domains, corrupt_rate=args.corrupt, seed=args.corrupt_seed,
                       split=args.split, allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
        if args.corrupt:
            res["corrupt"] = {"rate": args.corrupt, "seed": args.corrupt_seed}
        if p0 is not None:
            res["shift"] = shift_report(res["domain_loss"], p0,
                                        args.rho if args.rho is not None else float(rc.get("dro", {}).get("rho", 0.1)))
        if args.tasks:
            from megadrp.tools.downstream import downstream

            res["downstream"] = downstream(args.model, args.tasks.split(","), args.task_dir, args.limit,
                                           num_fewshot=args.num_fewshot, manager=manager)
    except (FileNotFoundError, ManifestError, TokenizerError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    line = json.dumps(res)
    if args.out:
        atomic_write_text(args.out, line + "\n")
    for name, v in res["domain_loss"].items():
        print(f"{name:>14}: loss {v:.4f}  ppl {res['domain_ppl'][name]:.3f}", file=sys.stderr)
    if "shift" in res:
        sh = res["shift"]
        for key, label in (("uniform", "uniform mix"), ("p0_mix", "p0 mix"),
                           ("worst_chi2", f"worst mix, χ² ≤ {sh['rho']:g}"), ("worst_domain", "worst domain")):
            print(f"{label:>22}: loss {sh[key]['loss']:.4f}  ppl {sh[key]['ppl']:.3f}", file=sys.stderr)
    for task, m in res.get("downstream", {}).get("tasks", {}).items():
        print(f"{task:>22}: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "sample_len"), file=sys.stderr)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
