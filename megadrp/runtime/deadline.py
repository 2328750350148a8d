"""Stop before the wall clock does: the job's end time, and whether the next step still leaves
room for a checkpoint.

Where the end comes from (first that is set): `--time-limit` (seconds or [D-]HH:MM[:SS] from the
start of this process), `SLURM_JOB_END_TIME` (Slurm ≥ 23.02 exports it) or `MEGADRP_JOB_END_TIME`
(the Slurm scripts read the job's EndTime once in the batch shell for older Slurm), both UNIX
times. A run that sees the end coming saves a checkpoint and exits 3 (`interrupted`), and the Slurm
scripts requeue it: no signal has to arrive in time, and `--time` can be the partition's MaxTime.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from megadrp.errors import ConfigError

SAFETY_SECONDS = 15.0  # a margin for what no estimate sees (a slow file system, the exit itself)


def parse_duration(text: str, what: str = "--time-limit") -> float:
    """Seconds from a bare number of seconds, or Slurm's clock forms: M:S, H:M:S, D-H, D-H:M,
    D-H:M:S."""
    text = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text)
    if not m or (m.group(1) is None and text.isdigit() is False and ":" not in text):
        raise ConfigError(f"{what}={text!r}: give seconds, M:S, H:M:S or D-H:M:S")
    days, clock = m.group(1), [int(x) for x in m.group(2).split(":")]
    if days is None:
        if len(clock) == 1:
            return float(clock[0])
        h, mi, s = ([0] + clock)[-3:] if len(clock) == 2 else clock
    else:
        h, mi, s = (clock + [0, 0])[:3]
    return float((int(days or 0) * 24 + h) * 3600 + mi * 60 + s)


@dataclass
class Deadline:
    end: float | None  # UNIX time; None: no end known
    source: str = ""

    @classmethod
    def find(cls, time_limit: str | None = None, env: Mapping[str, str] | None = None,
             now: float | None = None) -> "Deadline":
        env = os.environ if env is None else env
        now = time.time() if now is None else now
        if time_limit:
            return cls(now + parse_duration(time_limit), f"--time-limit {time_limit}")
        for var in ("SLURM_JOB_END_TIME", "MEGADRP_JOB_END_TIME"):
            value = env.get(var, "").strip()
            if value and value.isdigit() and int(value) > 0:
                return cls(float(value), var)
        return cls(None)

    def too_close(self, needed_seconds: float, now: float | None = None) -> bool:
        """Whether less than `needed_seconds` (plus SAFETY_SECONDS) is left."""
        if self.end is None:
            return False
        now = time.time() if now is None else now
        return self.end - now < needed_seconds + SAFETY_SECONDS

    def left(self, now: float | None = None) -> float:
        return float("inf") if self.end is None else self.end - (time.time() if now is None else now)
