"""Is a process still the one we knew? (pid plus its start time, so a reused pid is never mistaken for it.)
Used by the cube lease (a dead holder on this host is taken over at once) and the driver's reaper."""

from __future__ import annotations

import os
from pathlib import Path

_PROC = Path("/proc/self/stat").exists()


def process_start(pid: int) -> str | None:
    """``pid``'s start time in clock ticks since boot (Linux /proc); None when it is gone, a zombie, or
    where there is no /proc."""
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return fields[19]


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_gone(pid: int, start: str | None = None) -> bool:
    """True when ``pid`` no longer runs the process that started at ``start`` (unknown start: any process
    with that pid counts as it). Without /proc only the pid's existence is known."""
    now = process_start(pid)
    if now is not None:
        return start is not None and now != start
    return _PROC or not pid_exists(pid)
