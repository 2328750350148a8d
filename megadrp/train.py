"""Entry point: `deepspeed megadrp/train.py --config CONFIG.yaml [dotted.key=value ...]`.

Also runs as `python megadrp/train.py` (one process), under torchrun, srun and mpirun;
wiring only — the loop lives in megadrp/engine.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadrp.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config (see configs/)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=10")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # DeepSpeed still calls torch.distributed APIs that warn on every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2

    from megadrp import distributed
    from megadrp.data.indexed import IndexedDatasetError
    from megadrp.data.manifest import ManifestError
    from megadrp.engine import Trainer, TrainingStopped
    from megadrp.model.hf_io import CheckpointError

    info = distributed.discover()
    distributed.init(info)
    try:
        return Trainer(cfg, info).run()
    except (ConfigError, ManifestError, IndexedDatasetError, CheckpointError, TrainingStopped, OSError) as e:
        print(f"train: error (rank {info.rank}): {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
