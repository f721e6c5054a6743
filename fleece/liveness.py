"""Is the process that left a lease or an export behind still alive?"""

from __future__ import annotations

import os
from socket import gethostname


def process_gone(host: str, pid: int) -> bool:
    """True only when ``pid`` ran on this host and no longer exists.

    A process on another host, or one we may not signal, counts as alive:
    only certainty of death lets a later run take over what it held.
    """
    if host != gethostname() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
