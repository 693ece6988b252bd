"""Whether a process id names a live process (for leftovers of killed runs)."""

from __future__ import annotations

import os


def running(pid: int) -> bool:
    """True when a process with this id exists on this host (also when it is not ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
