"""Processes that die with the driver, even a SIGKILLed one.

A killed driver used to leave its temporary Prefect server running (issue 17, finding 6): nothing runs in
a SIGKILLed process, so the cleanup must live elsewhere. The driver starts this small process with a pipe
on its stdin and tells it, one ``pid start-time`` line each, which processes are tied to it. The pipe
closes when the driver closes it or dies, however it dies; the reaper then ends every tied process that is
still the same process (its start time, so a reused pid is never hit): SIGTERM, and SIGKILL after 5 s.

Dask's local worker processes need none of this: distributed ends them when the pipe to their nanny (in
the driver) closes. Run as ``python -m copgen.flows.reaper``; ``Reaper`` is the driver's side.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from copgen.processes import is_gone, process_start

GRACE_S = 5.0


class Reaper:
    """The driver's side: start the reaper, ``tie`` processes to this one, ``close`` when done."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "copgen.flows.reaper"], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL)

    def tie(self, pid: int) -> None:
        if self.proc.stdin is not None and not is_gone(pid):
            self.proc.stdin.write(f"{pid} {process_start(pid) or '-'}\n".encode())  # '-': no /proc here
            self.proc.stdin.flush()

    def close(self, timeout: float = GRACE_S + 5) -> None:
        """End the tied processes still running (normally none: they were stopped first), then the reaper."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Reaper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _end(tied: dict[int, str]) -> None:
    def same(pid: int) -> bool:
        return not is_gone(pid, None if tied[pid] == "-" else tied[pid])

    for pid in [p for p in tied if same(p)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + GRACE_S
    while time.monotonic() < end and any(same(p) for p in tied):
        time.sleep(0.1)
    for pid in [p for p in tied if same(p)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _exit(*_: object) -> None:
    raise SystemExit(0)


def main() -> None:
    # Ctrl-C in a terminal reaches the whole foreground group: the driver decides, we wait for the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit)  # terminated with the driver's group: still end what is tied
    tied: dict[int, str] = {}
    try:
        for line in sys.stdin.buffer:  # until the driver closes the pipe or dies
            pid, start = line.split()
            tied[int(pid)] = start.decode()
    finally:
        _end(tied)


if __name__ == "__main__":
    main()
