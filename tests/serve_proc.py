"""Waiting for a `tokenstep serve` subprocess: shared by the server and load-generator tests."""

from __future__ import annotations

import subprocess
import time
import urllib.request


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Return once url/health answers 200; raise if the process exits or timeout_s passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            detail = proc.stderr.read()[-2000:] if proc.stderr is not None and not proc.stderr.closed else ""
            raise RuntimeError(f"tokenstep serve exited with {proc.returncode}: {detail}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"tokenstep serve was not ready within {timeout_s} s")
