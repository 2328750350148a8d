"""The shipped large-model recipes, planned without their checkpoints or data.

A recipe's dry run reads only the source model's config.json and DATA_DIR/manifest.json. This
module holds what a clean checkout lacks for that: the published shapes of the source models
(and of the pruned models the continue recipes start from), the domains of each corpus, and
the layout each recipe is documented to run on. `plan(recipe)` writes config-only model
directories and a manifest-only DATA_DIR and runs the recipe's real dry run on them, so the
README's memory table and the recipe tests come from the memory plan itself:

    megadrp recipes                # the memory table (Markdown)
    megadrp recipes --write-readme # ... and put it into README.md (a checkout's)
    megadrp recipes dro.signal=eval eval.held_out_every=1   # every recipe with overrides (a what-if)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

GPU_GIB = 80  # the GPUs the recipes are documented for (A100/H100 80 GB)

_LLAMA2 = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
# (transformers config class, config.json values), as published; the pruned shapes are SPEC §2's targets.
MODELS: dict[str, tuple[str, dict]] = {
    "Llama-2-7B": ("LlamaConfig", _LLAMA2),
    "Llama-2 1.3B (pruned)": ("LlamaConfig", {**_LLAMA2, "hidden_size": 2048, "intermediate_size": 5504,
                                              "num_hidden_layers": 24, "num_attention_heads": 16,
                                              "num_key_value_heads": 16, "head_dim": 128}),
    "Llama-2 2.7B (pruned)": ("LlamaConfig", {**_LLAMA2, "hidden_size": 2560, "intermediate_size": 6912,
                                              "num_hidden_layers": 32, "num_attention_heads": 20,
                                              "num_key_value_heads": 20, "head_dim": 128}),
    "Llama-3.1-8B": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "Qwen2-7B": ("Qwen2Config", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=131072, sliding_window=131072, use_sliding_window=False,
        max_window_layers=28, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "Qwen2 1.8B (pruned)": ("Qwen2Config", dict(
        vocab_size=152064, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=14,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=131072, sliding_window=131072,
        use_sliding_window=False, max_window_layers=28, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "Qwen3-8B": ("Qwen3Config", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
CORPORA = {
    "RedPajama": ["cc", "github", "book", "stackexchange", "wiki", "arxiv", "c4"],
    "CulturaX": ["en", "ru", "zh", "ja", "ar", "tr", "ko", "th"],
}


@dataclass(frozen=True)
class Recipe:
    config: str  # under configs/
    model: str  # key of MODELS: what model.init holds
    corpus: str  # key of CORPORA
    nodes: int  # the documented layout: nodes of 8 GPUs (slurm/prune_7b.sh: 1, slurm/continue_7b.sh: 4)
    teacher: str | None = None  # key of MODELS: the distillation teacher (distill.teacher)

    @property
    def ranks(self) -> int:
        return 8 * self.nodes


RECIPES = [
    Recipe("llama2_7b_to_1.3b.yaml", "Llama-2-7B", "RedPajama", 1),
    Recipe("llama2_7b_to_2.7b.yaml", "Llama-2-7B", "RedPajama", 1),
    Recipe("qwen2_7b_to_1.8b.yaml", "Qwen2-7B", "CulturaX", 1),
    Recipe("llama31_8b_to_4b.yaml", "Llama-3.1-8B", "RedPajama", 1),
    Recipe("qwen3_8b_to_4b.yaml", "Qwen3-8B", "RedPajama", 1),
    Recipe("continue_1.3b.yaml", "Llama-2 1.3B (pruned)", "RedPajama", 4),
    Recipe("continue_2.7b.yaml", "Llama-2 2.7B (pruned)", "RedPajama", 4),
    Recipe("continue_qwen2_1.8b.yaml", "Qwen2 1.8B (pruned)", "CulturaX", 4),
    Recipe("continue_1.3b_distill.yaml", "Llama-2 1.3B (pruned)", "RedPajama", 4, teacher="Llama-2-7B"),
    Recipe("continue_2.7b_distill.yaml", "Llama-2 2.7B (pruned)", "RedPajama", 4, teacher="Llama-2-7B"),
]


def recipe(config: str) -> Recipe:
    """The shipped recipe of a config file name (`continue_1.3b.yaml`)."""
    return next(r for r in RECIPES if r.config == config)


def model_dir(name: str, root: Path) -> Path:
    """A directory holding only the model's config.json (all a dry run reads of a model)."""
    import transformers

    cls, values = MODELS[name]
    out = root / "models" / name.replace(" ", "_").replace("(", "").replace(")", "")
    if not (out / "config.json").is_file():
        getattr(transformers, cls)(**values).save_pretrained(out)
    return out


def data_dir(corpus: str, vocab: int, root: Path) -> Path:
    """A DATA_DIR holding only manifest.json (all a dry run reads of the data)."""
    out = root / "data" / f"{corpus}-{vocab}"
    out.mkdir(parents=True, exist_ok=True)
    domains = {d: {"train": f"{d}_train", "eval": f"{d}_eval", "train_tokens": 10**10, "eval_tokens": 2048000,
                   "train_docs": 10**7, "eval_docs": 1000, "max_token_id": vocab - 1} for d in CORPORA[corpus]}
    manifest = {"tokenizer": "tokenizer", "vocab_size": vocab, "eod_id": 2,
                "dtype": "uint16" if vocab < 65500 else "int32", "domains": domains}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def plan(recipe: Recipe, root: Path, gpu_gib: float = GPU_GIB, overrides: list[str] | None = None):
    """The recipe's dry run (megadrp.plan.DryRun) at its documented layout on GPUs of
    `gpu_gib` GiB, its paths pointed at stand-ins under `root`; the disk is not checked (the
    run directory is the cluster's, not this machine's)."""
    from megadrp.config import load_config
    from megadrp.plan import GIB, dry_run

    vocab = MODELS[recipe.model][1]["vocab_size"]
    from megadrp.resources import recipe as shipped

    cfg = load_config(str(shipped(recipe.config)),
                      [f"model.init={model_dir(recipe.model, root)}", f"data_dir={data_dir(recipe.corpus, vocab, root)}",
                       f"run_dir={root / 'runs' / recipe.config}",
                       *([f"distill.teacher={model_dir(recipe.teacher, root)}"] if recipe.teacher else []),
                       *(overrides or [])])
    return dry_run(cfg, recipe.ranks, int(gpu_gib * GIB), check_disk=False)


def table(root: Path, overrides: list[str] | None = None) -> str:
    """The README's memory table: every recipe's plan at its documented layout, with its cost
    (cost_ledger.py: GPU-hours on H100s at MFU 0.4, and evaluation's share of the FLOPs);
    `overrides` (KEY=VALUE, applied to every recipe) answer what-ifs such as the paper's signal."""
    from megadrp.plan import GIB

    head = ["| recipe | GPUs | micro-batch × accumulation | checkpointed layers | weights + master + Adam (+ teacher) "
            "| gradients | ZeRO-3 buffers | activations | logits | recompute + backward | runtime | **per GPU** "
            "| GPU-hours (H100, MFU 0.4) | evaluation share of the FLOPs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for r in RECIPES:
        d = plan(r, root, overrides=overrides).data
        t, lay = d["memory"]["terms"], d["layout"]

        teacher = ["teacher_weights"] if "teacher_weights" in t else []
        teacher_live = ["teacher_live_parameters"] if "teacher_live_parameters" in t else []

        def g(*keys: str) -> str:
            return f"{sum(t[k] for k in keys) / GIB:.1f}"

        who = f"{r.model}, teacher {r.teacher}" if r.teacher else r.model
        rows.append(f"| `{r.config}` ({who}) | {r.ranks} × {GPU_GIB} GB | {lay['micro_batch']} × "
                    f"{lay['accumulation']} | {lay['checkpointed_layers']} of {d['memory']['layers']} "
                    f"| {g('weights', 'master_and_adam', *teacher)} | {g('gradient_partitions')} "
                    f"| {g('gradient_buckets', 'live_parameters', *teacher_live)} | {g('activations')} | {g('logits')} "
                    f"| {g('recompute_and_backward')} | {g('runtime_reserve', 'fragmentation', 'masks')} "
                    f"| **{d['memory_per_gpu_bytes'] / GIB:.1f} GiB** | {d['cost']['gpu_hours']:,.0f} "
                    f"| {d['cost']['share']['eval']:.1%} |")
    return "\n".join(head + rows)


START, END = "<!-- memory table: megadrp recipes --write-readme -->", "<!-- end of memory table -->"


def readme_block(text: str) -> str:
    """The memory table as it stands in a README text (between the markers)."""
    if START not in text or END not in text:
        raise ValueError(f"README.md has no memory table between {START!r} and {END!r}")
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-readme", action="store_true", help="replace the table in README.md")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="config overrides applied to every recipe (not with --write-readme)")
    args = ap.parse_args(argv)
    if args.overrides and args.write_readme:
        print("recipes: --write-readme writes the shipped recipes' table; drop the overrides "
              f"({' '.join(args.overrides)}) or --write-readme", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        md = table(Path(tmp), args.overrides)
    print(md)
    if args.write_readme:
        from megadrp.runtime.files import atomic_write_text

        readme = Path(__file__).resolve().parents[2] / "README.md"  # a checkout's: a developer's command
        if not readme.is_file():
            print(f"recipes: {readme}: no README here (--write-readme is for a checkout)", file=sys.stderr)
            return 2
        text = readme.read_text()
        readme_block(text)  # the markers are there
        before, rest = text.split(START, 1)
        atomic_write_text(readme, before + START + "\n" + md + "\n" + END + rest.split(END, 1)[1])
        print(f"wrote {readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
