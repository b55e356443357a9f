"""A ``carddeck`` command in a process of its own, interrupted by a real SIGINT (Ctrl-C) once it is under way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def interrupt(argv: list[str], marker: str, log: Path, *, timeout: float = 180.0) -> tuple[int, str]:
    """Run ``carddeck ARGV``; once ``marker`` shows on its stderr (a progress bar's name), send SIGINT.
    Returns its exit status and stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "carddeck", *argv], stdout=subprocess.DEVNULL, stderr=err,
                                env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while marker not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"ended before {marker!r}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {marker!r} in {timeout} s: {log.read_text()[-3000:]}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, log.read_text(errors="replace")
