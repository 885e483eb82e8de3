"""Errors a user can act on. The CLI prints ``str(err)`` as one line and exits with ``err.exit_code``."""
from __future__ import annotations


class EdgepruneError(Exception):
    """Bad input or usage: one line naming what is wrong and how to fix it (exit code 2)."""

    exit_code = 2


class BudgetError(EdgepruneError):
    """A device budget cannot be met by any plan (exit code 3)."""

    exit_code = 3


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP turned into an exception, so that every cleanup that runs on Ctrl-C (temp folders, the f32
    export intermediate, locks) also runs when ``kill``, systemd or CI stop edgeprune; the CLI exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


PARITY_FAIL_EXIT = 4
"""``edgeprune verify``: the artifact does not compute the reference model's function within its quant's
thresholds (the full report is still printed on stdout)."""
