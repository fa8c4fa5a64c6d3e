"""Running ``closedloop`` the way a user does: as a subprocess."""

from __future__ import annotations

import subprocess
import sys


def run(*args, check: bool = True) -> subprocess.CompletedProcess:
    """``closedloop ARGS...``; with ``check``, assert it exited 0 (showing its stderr if not)."""
    proc = subprocess.run(
        [sys.executable, "-m", "closedloop.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc
