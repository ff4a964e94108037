"""Resident memory of this process (Linux /proc, else getrusage): now, and its peak since a reset."""
from __future__ import annotations

import resource
import sys
from pathlib import Path


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> float:
    """The resident set now, MiB, with the peak reset to it (Linux); elsewhere the lifetime peak so far."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mib("VmRSS")
    except OSError:
        return peak_rss()


def peak_rss() -> float:
    """Peak resident set since the last reset (Linux) or since the process began, MiB."""
    try:
        return _status_mib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
