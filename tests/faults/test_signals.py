"""Finding 6 (second half): the driver's Prefect server and Dask cluster shut down on every exit path,
SIGTERM included (a killed driver used to leave its Prefect server running), and the lease is released so
the next run starts at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import alive, descendants, kill_all, wait_for

pytestmark = pytest.mark.slow


def _started(log: Path, proc: subprocess.Popen) -> bool:
    """The run is in its block loop: the progress start line (printed as the blocks are handed out)."""
    return "samples to generate" in log.read_text() or proc.poll() is not None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see the run's processes")
def test_sigterm_shuts_down_the_server_cluster_and_lease(tiny_world, tiny_model, tmp_path):
    root, _ = tiny_world
    net, vae = tiny_model
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the run starts its own server
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    log = tmp_path / "stderr.txt"
    with log.open("w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "copgen.flows.cli", "complete", "--source", root,
                                 "--out", str(out), "--weights", net, "--vae", vae, "--workers", "1",
                                 "--steps", "50", "--block-samples", "1"],
                                stdout=subprocess.DEVNULL, stderr=err_file, text=True, env=env)
    lease = out / "complete.zarr" / "_ledger" / "lease.json"
    try:
        # SIGTERM only once the blocks are being handed out (4 blocks of 50 steps: well before the end)
        assert wait_for(lambda: _started(log, proc), 400), "the run never started"
        assert proc.poll() is None, log.read_text()[-2000:]
        assert lease.exists()
        helpers = descendants(proc.pid)  # the Prefect server, the nanny and its worker
        assert len(helpers) >= 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 143, err[-3000:]
    # the driver's one line, and no traceback (nor from a local worker shut down mid-task)
    assert "terminated (SIGTERM)" in err and " ".join(err.split()).endswith("rerun to resume"), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not lease.exists()  # released: the next run need not wait for the expiry
    assert wait_for(lambda: not any(alive(p) for p in helpers), 60), \
        f"left running: {[p for p in helpers if alive(p)]}"


def test_a_signal_wrapped_by_serialisation_still_maps_to_its_exit_code():
    """A SIGTERM or Ctrl-C raised while pydantic-core serialises Prefect's settings (``_ser_model``) comes
    out as a PydanticSerializationError (a ValueError) that keeps only the signal's name; it must still be
    143/130, never "user input" (2), which it was in a flaky CI run."""
    from copgen.flows.failures import EXIT_INTERRUPTED, EXIT_TERMINATED, classify, signal_exit_code
    from prefect.exceptions import TerminationSignal
    from pydantic import BaseModel, model_serializer

    def wrapped(exc: BaseException) -> Exception:
        class Settings(BaseModel):
            @model_serializer(mode="wrap")
            def _ser_model(self, handler, info):
                raise exc
        try:
            Settings().model_dump(mode="json")
        except Exception as caught:  # noqa: BLE001 - whatever pydantic makes of it
            return caught
        raise AssertionError("pydantic did not raise")

    term = wrapped(TerminationSignal(signal.SIGTERM))
    assert isinstance(term, ValueError) and classify(term) is not None  # what used to decide: exit 2
    assert signal_exit_code(term) == EXIT_TERMINATED
    assert signal_exit_code(wrapped(KeyboardInterrupt())) == EXIT_INTERRUPTED
    in_chain = RuntimeError("flow crashed")
    in_chain.__context__ = TerminationSignal(signal.SIGTERM)
    assert signal_exit_code(in_chain) == EXIT_TERMINATED
    assert signal_exit_code(ValueError("bad --bbox")) is None
    assert signal_exit_code(RuntimeError("a bug")) is None


def test_a_received_sigterm_decides_even_when_no_exception_names_it(tmp_path):
    """The interpreter's record of received signals: a SIGTERM whose exception was swallowed and replaced
    by an unrelated one still ends the run with 143 (in a child: the wakeup fd is process state)."""
    code = (
        "import os, signal\n"
        "from copgen.flows.failures import record_signals, signal_exit_code\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)  # a handler that swallows it\n"
        "record_signals()\n"
        "assert signal_exit_code(ValueError('x')) is None\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "if os.fork() == 0:  # a forked child's signals are its own\n"
        "    os._exit(0 if signal_exit_code(ValueError('x')) is None else 1)\n"
        "assert os.wait()[1] == 0, 'the child inherited the record'\n"
        "print(signal_exit_code(ValueError('serialisation failed')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "143"


def test_a_process_tied_to_the_reaper_dies_with_a_sigkilled_driver(tmp_path):
    """The mechanism under the driver's Prefect server (copgen.flows.reaper): a 'driver' ties a sleeper to
    its reaper and is SIGKILLed; the sleeper must end (a reused pid would not be hit: start times)."""
    code = ("import subprocess, sys, time\n"
            "from copgen.flows.reaper import Reaper\n"
            "r = Reaper()\n"
            "s = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            "r.tie(s.pid)\n"
            "print(s.pid, r.proc.pid, flush=True)\n"
            "time.sleep(600)\n")
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = [int(v) for v in driver.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        driver.kill()
        driver.wait()
        assert wait_for(lambda: not any(alive(p) for p in pids), 60), "the tied process outlived its driver"
    finally:
        driver.kill()
        driver.wait()
        kill_all(pids)
