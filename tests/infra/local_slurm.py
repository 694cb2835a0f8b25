"""A real single-node Slurm for the tests: munged, slurmctld and slurmd from Debian's `munge` and
`slurm-wlm` packages, configured for this host in a temporary folder (own munge key and socket, free
ports, no cgroups), so nothing of a system Slurm is touched. Clients find it through ``SLURM_CONF``.

Also usable by hand: ``python tests/infra/local_slurm.py /tmp/slurm`` starts it and prints the
``export SLURM_CONF=...`` line (Ctrl-C stops it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def why_not() -> str | None:
    """Why a local Slurm cannot start here (None: it can)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurmd slurmctld slurm-client munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(root: Path) -> tuple[Path, Path]:
    """slurm.conf for this host under ``root``; returns (slurm.conf, munge socket)."""
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    munge_sock = root / "munge" / "munge.socket"
    for d in ("state", "spool", "log", "munge"):
        (root / d).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=copgen-test
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_sock}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
NodeName={host} CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=60 State=UP OverSubscribe=FORCE:4
""")
    return conf, munge_sock


@contextlib.contextmanager
def local_slurm(root: Path, timeout: float = 60) -> Iterator[dict[str, str]]:
    """Start munged, slurmctld and slurmd under ``root``; yields the environment for Slurm clients."""
    reason = why_not()
    if reason:
        raise RuntimeError(f"cannot start a local Slurm: {reason}")
    root = Path(root)
    conf, sock = write_config(root)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "munge").chmod(0o700)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            [_exe("munged"), "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
             f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/log/munged.log",
             f"--seed-file={root}/munge/munged.seed"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        _until(lambda: sock.exists(), timeout, "munged's socket", root)
        procs.append(subprocess.Popen([_exe("slurmctld"), "-D", "-i", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([_exe("slurmd"), "-D", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))

        def idle():
            out = subprocess.run([_exe("sinfo"), "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")

        _until(idle, timeout, "an idle Slurm node", root)
        yield env
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _until(check, timeout: float, what: str, root: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((root / "log").glob("*.log")))
    raise RuntimeError(f"local Slurm: timed out waiting for {what}\n{logs}")


if __name__ == "__main__":  # pragma: no cover - by hand
    with local_slurm(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/copgen-slurm")) as slurm_env:
        print(f"export SLURM_CONF={slurm_env['SLURM_CONF']}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
