"""The test split's guard, for the test suite's subprocesses (conftest puts this folder on
PYTHONPATH): a training process (`.../train.py`) that opens a test shard (`*_test.bin` or
`*_test.idx`) fails at once, naming it. Every training run the suite starts thereby proves that
no run reads the windows results are reported on (megadrp/data/manifest.py); `megadrp eval`,
which scores them, runs unguarded."""
from __future__ import annotations

import os
import re
import sys

_TEST_SHARD = re.compile(r"_test\.(bin|idx)$")


def _guard(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if _TEST_SHARD.search(path):
            # recorded too, in case a caller catches the error: conftest.run checks the record
            record = os.environ.get("MEGADRP_GUARD_LOG")
            if record:
                with open(record, "a") as f:
                    f.write(f"{' '.join(sys.argv)}: {path}\n")
            raise PermissionError(f"a training process opened the test split: {path} (MEGADRP_GUARD_TEST_SPLIT)")


def _training() -> bool:
    argv = getattr(sys, "orig_argv", None) or sys.argv
    return any(os.path.basename(a) == "train.py" for a in argv[:3])


if os.environ.get("MEGADRP_GUARD_TEST_SPLIT") == "1" and _training():
    sys.addaudithook(_guard)
