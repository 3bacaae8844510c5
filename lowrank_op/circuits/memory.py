"""Resident-set-size probes for the command line: current RSS, peak RSS, and resetting the peak.

The peak is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. On Linux, writing ``5`` to
``/proc/self/clear_refs`` resets it (and ``VmHWM``) to the current RSS, so the peak of one phase
(the analysis, after loading) can be told from the peak of the process.
"""

from __future__ import annotations

import resource
import sys

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def peak_rss() -> int:
    """Peak resident set size of this process so far (since the last :func:`reset_peak`), in bytes."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # macOS reports bytes, Linux KiB


def current_rss() -> int | None:
    """Resident set size now, in bytes, from /proc/self/status; None where that is unavailable."""
    try:
        with open(_STATUS) as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS; True on success (Linux >= 4.0), else False."""
    try:
        with open(_CLEAR_REFS, "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True
