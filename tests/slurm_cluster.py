"""A real one-node SLURM cluster on localhost for the launcher tests (Debian's slurm-wlm and munge).

`SlurmCluster(directory)` writes a slurm.conf for this host into `directory` (free ports, its own
spool and state directories, its own munge key and socket), starts munged, slurmctld and slurmd in
the foreground as children of the test process, and waits until the node is idle. `env()` is the
environment for client commands (sbatch, squeue, scontrol, ...) and for what they launch; `stop()`
cancels every job, waits for them to leave and ends the daemons, SIGKILLing what does not stop.
Clusters in other directories do not collide (ports, sockets and spool directories are their own).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ('munged', 'mungekey', 'slurmctld', 'slurmd', 'sbatch', 'squeue', 'scontrol', 'scancel', 'srun', 'sinfo')


def missing_binaries() -> list[str]:
    """The SLURM/munge programs not on PATH (or in /usr/sbin); the tests skip naming them."""
    return [name for name in DAEMONS if not _which(name)]


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path='/usr/sbin:/sbin')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    with open('/proc/meminfo') as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith('MemTotal:'))
    return total_kb // 1024 - 512  # leave the daemons some room


SLURM_CONF = """\
ClusterName=resnetjax
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=5
SlurmdTimeout=60
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.host = socket.gethostname().split('.')[0]
        self.cpus = os.cpu_count() or 1
        self.procs: list[subprocess.Popen] = []
        self.conf = self.dir / 'slurm.conf'
        self.munge_socket = self.dir / 'munge' / 'munge.socket'

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env['SLURM_CONF'] = str(self.conf)
        env['PATH'] = env.get('PATH', '') + ':/usr/sbin:/sbin'
        return env

    def start(self, timeout: float = 60) -> SlurmCluster:
        for sub in ('state', 'spool', 'munge'):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / 'munge').chmod(0o700)
        key = self.dir / 'munge' / 'munge.key'
        subprocess.run([_which('mungekey'), '--create', f'--keyfile={key}'], check=True, capture_output=True)
        key.chmod(0o600)
        self.conf.write_text(SLURM_CONF.format(
            host=self.host, dir=self.dir, cpus=self.cpus, memory=_memory_mb(), ctld_port=_free_port(),
            slurmd_port=_free_port(), munge_socket=self.munge_socket))
        self._daemon('munged', [_which('munged'), '--foreground', '--force', f'--socket={self.munge_socket}',
                                f'--key-file={key}', f'--pid-file={self.dir}/munge/munged.pid',
                                f'--log-file={self.dir}/munge/munged.log', f'--seed-file={self.dir}/munge/seed'])
        self._wait(lambda: self.munge_socket.exists(), timeout, 'munged to create its socket')
        self._daemon('slurmctld', [_which('slurmctld'), '-D', '-i', '-f', str(self.conf)])
        self._daemon('slurmd', [_which('slurmd'), '-D', '-f', str(self.conf), '-N', self.host])
        self._wait(self._node_idle, timeout, f'node {self.host} to be idle in sinfo')
        return self

    def _daemon(self, name: str, args: list[str]) -> None:
        log = open(self.dir / f'{name}.out', 'wb')
        proc = subprocess.Popen(args, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        proc.name = name
        self.procs.append(proc)

    def _node_idle(self) -> bool:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f'{proc.name} exited with {proc.returncode}:\n{self.logs()}')
        out = subprocess.run(['sinfo', '-h', '-N', '-o', '%t'], env=self.env(), capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() == 'idle'

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f'waited {timeout:.0f} s for {what}:\n{self.logs()}')
            time.sleep(0.2)

    def run(self, *args: str, check: bool = True) -> str:
        """A client command against this cluster; its stdout."""
        out = subprocess.run(list(args), env=self.env(), capture_output=True, text=True)
        if check and out.returncode:
            raise RuntimeError(f'{" ".join(args)} exited with {out.returncode}: {out.stderr}')
        return out.stdout

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for name in ('slurmctld.log', 'slurmd.log', 'munged.out', 'slurmctld.out', 'slurmd.out'):
            path = self.dir / name
            if path.exists():
                parts.append(f'--- {name}\n{path.read_text(errors="replace")[-tail:]}')
        return '\n'.join(parts)

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, wait until none is left, then end the daemons (SIGKILL after `timeout`)."""
        alive = {p.name for p in self.procs if p.poll() is None}
        if {'slurmctld', 'slurmd'} <= alive:
            with contextlib.suppress(Exception):
                self.run('scancel', '--full', '--quiet', f'--user={os.getuid()}', check=False)
                self._wait(lambda: not self.run('squeue', '-h', '-o', '%i', check=False).strip(), timeout,
                           'the jobs to end')
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=timeout)

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
