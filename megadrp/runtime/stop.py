"""Stop requests: SIGTERM, SIGUSR1 (Slurm's --signal) and SIGINT ask a run to stop at the next
step boundary with a checkpoint.

Its own module, importing nothing heavy, so that `megadrp/train.py` installs the handlers in
the first milliseconds of the process: before torch, DeepSpeed and transformers are imported
(seconds on a busy node), before the rendezvous and before a minutes-long 7B model load. A
signal then never meets the default action (death) but a clean stop."""
from __future__ import annotations

import logging
import signal

log = logging.getLogger("megadrp")

EXIT_INTERRUPTED = 3  # stopped at a checkpoint by a signal: resume with resume=auto (Slurm scripts requeue)
EXIT_SIGINT = 130  # Ctrl-C, by the shell's convention


class StopRequest:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self.reason: str | None = None  # a stop the run requested itself (`request`), in words

    def install(self) -> "StopRequest":
        for s in self.SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, _frame) -> None:
        self.signum = signum
        log.warning("received signal %d: will save a checkpoint and exit after this step", signum)

    def request(self, why: str) -> None:
        """Stop at the next step boundary with a checkpoint, as a SIGUSR1 would (exit 3:
        resume with resume=auto; the Slurm scripts requeue), for a reason found by the run itself
        (the job's end time coming, megadrp/runtime/deadline.py)."""
        if not self.signum:
            self.signum, self.reason = signal.SIGUSR1, why
            log.warning("%s: will save a checkpoint and exit after this step", why)

    def describe(self) -> str:
        """What stopped the run, for its closing line: this process's signal, the run's own
        reason (the job's end coming), or a stop another rank received (shared at each step)."""
        if self.reason:
            return self.reason
        return signal.Signals(self.signum).name if self.signum else "a stop another rank received"

    @property
    def exit_code(self) -> int:
        return EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_INTERRUPTED
