"""`megadrp <command> ...`: one command line over every entry point (installed as a console
script by setup.py; also `python -m megadrp`).

Each command is the module's own `main` with that module's flags (`megadrp <command> --help`),
so `megadrp train ...` is `python megadrp/train.py ...` and `megadrp preprocess ...` is
`python data_tools/preprocess.py ...`. A user error anywhere is one line and exit 2.
Under the DeepSpeed launcher: `deepspeed --num_gpus 8 $(which megadrp) train --config ...`.
"""
from __future__ import annotations

import importlib
import sys

# command: (module whose main() runs it, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megadrp.train", "train one stage (pretrain, prune, continue) from a YAML config; --dry-run plans it"),
    "preprocess": ("megadrp.tools.preprocess", "domain corpora → Megatron .bin/.idx shards + DATA_DIR/manifest.json"),
    "tokenizer": ("megadrp.tools.train_tokenizer", "train a sentencepiece tokenizer on corpus files"),
    "inspect": ("megadrp.tools.inspect_data", "counts, length histogram and a decoded sample of a DATA_DIR"),
    "merge": ("megadrp.tools.merge_manifests", "join per-domain DATA_DIRs into one manifest"),
    "eval": ("megadrp.tools.evaluate", "per-domain loss and perplexity of any HF model on the eval windows"),
    "downstream": ("megadrp.tools.downstream", "lm-evaluation-harness accuracy of an exported model"),
    "demo": ("megadrp.tools.demo", "the whole pipeline on the embedded corpus, CPU only (about 10 minutes)"),
    "report": ("megadrp.tools.report", "report.md and plots from run directories"),
    "synth-corpus": ("megadrp.tools.synth_corpus", "write the embedded 6-domain corpus"),
    "debian-corpus": ("megadrp.tools.debian_corpus", "a real-text corpus from files every Debian machine has"),
    "recipes": ("megadrp.tools.recipes", "every shipped 7B recipe's memory plan (the README's table)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    return f"usage: megadrp <command> [args]   (megadrp <command> --help)\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the DeepSpeed launcher puts --local_rank=N before everything the script was given
    launcher = [a for a in argv[:1] if a.startswith(("--local_rank", "--local-rank"))]
    argv = argv[len(launcher):]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"megadrp {version('megadrp')}")
        return 0
    name, rest = argv[0], argv[1:] + launcher
    if name not in COMMANDS:
        print(f"megadrp: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    stop = None
    if name == "train" and "--dry-run" not in rest:  # the stop handlers before anything slow is imported
        from megadrp.runtime.stop import StopRequest

        stop = StopRequest().install()
    sys.argv[0] = f"megadrp {name}"  # what each command's --help calls itself
    module = importlib.import_module(COMMANDS[name][0])
    from megadrp.errors import UserError

    try:
        return int(module.main(rest, stop) if stop is not None else module.main(rest) or 0)
    except UserError as e:
        print(f"megadrp {name}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
