"""The CLI as several processes on one machine: the same run as one process, and bounded failure.

Every test starts real `python -m resnet_jax.train` processes talking over 127.0.0.1 (the
coordination service and gloo collectives), each with its own CPU devices. Outputs go to
files, every wait has a timeout, and a `finally` kills whatever is still running: after
`jax.distributed.initialize` JAX catches SIGTERM for its preemption notifier, so SIGKILL.
"""

import contextlib
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_jax.checkpoint import read_numpy

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).parents[1]
# A ResNet-8 of width 8 on 8x8 images: each process compiles it in seconds.
TINY = ['--config=experiments/quickstart.py', '--config.model.stage_sizes=(1,1,1)',
        '--config.model.widths=(8,16,32)', '--config.model.stem_width=8', '--config.data.image_size=8',
        '--config.data.num_train=256', '--config.data.num_eval=100', '--config.batch_size=16',
        '--config.eval.batch_size=20', '--config.optim.warmup_steps=2', '--config.log.every_steps=2',
        '--config.log.progress_seconds=0']
STEPS = 6
SHORT = [f'--config.num_steps={STEPS}', f'--config.eval.every_steps={STEPS}',
         f'--config.checkpoint.every_steps={STEPS}']
LONG = ['--config.num_steps=100000', '--config.eval.every_steps=100000', '--config.checkpoint.every_steps=100000']
RUN_TIMEOUT = 300  # seconds; a generous bound on a 2-core machine, only reached when something hangs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def cli_env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           # Proxies would route gRPC to 127.0.0.1 through them; SLURM would trigger auto-detection.
           if '_proxy' not in k.lower() and not k.startswith('SLURM_')}
    # LLVM -O0: XLA:CPU spends ~1 s compiling each random draw of the model's init at the default
    # level (~8 s for a ResNet-8) and a tenth of that at 0; every process here gets the same
    # flags, so the comparisons between layouts are unaffected.
    flags = f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0'
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
               PYTHONPATH=str(ROOT) + os.pathsep + env.get('PYTHONPATH', ''))
    return env


class Processes:
    """CLI processes with output in files; `kill_all` SIGKILLs the live ones and reaps them."""

    def __init__(self, directory: Path):
        self.directory, self.procs, self.logs = directory, [], []

    def start(self, name: str, args: list[str], devices: int) -> subprocess.Popen:
        log = open(self.directory / f'{name}.log', 'wb')
        self.logs.append(log)
        proc = subprocess.Popen([sys.executable, '-m', 'resnet_jax.train', *args], cwd=ROOT,
                                env=cli_env(devices), stdout=log, stderr=subprocess.STDOUT)
        proc.name = name
        self.procs.append(proc)
        return proc

    def output(self, proc) -> str:
        return (self.directory / f'{proc.name}.log').read_text(errors='replace')

    def wait(self, proc, timeout: float) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f'{proc.name} still running after {timeout:.0f} s:\n{self.output(proc)[-3000:]}')

    def kill_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for log in self.logs:
            log.close()


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.kill_all()


def start_multiprocess(processes, workdir, extra, num_processes=2, name='proc'):
    address = f'127.0.0.1:{free_port()}'
    return [processes.start(f'{name}{i}', [*TINY, *extra, f'--workdir={workdir}', f'--coordinator_address={address}',
                                           f'--num_processes={num_processes}', f'--process_id={i}'], devices=1)
            for i in range(num_processes)]


def read_lines(workdir: Path) -> list[str]:
    return [line for line in (workdir / 'metrics.jsonl').read_text().splitlines() if line.strip()]


def test_two_processes_train_as_one_process_with_two_devices(processes, tmp_path):
    one, two = tmp_path / 'one_process', tmp_path / 'two_processes'
    # Both layouts at once: the 2-core machine is busier but the test is shorter.
    single = processes.start('single', [*TINY, *SHORT, f'--workdir={one}', '--nodistributed'], devices=2)
    multi = start_multiprocess(processes, two, SHORT)
    for proc in [single, *multi]:
        assert processes.wait(proc, RUN_TIMEOUT) == 0, f'{proc.name} failed:\n{processes.output(proc)[-3000:]}'

    a, b = read_numpy(str(one / 'checkpoints' / str(STEPS))), read_numpy(str(two / 'checkpoints' / str(STEPS)))
    assert int(a['step']) == int(b['step']) == STEPS
    # Same global batch, same data order, same 2-way data-parallel split (8 examples per
    # device); only how the two partial sums meet differs (XLA's in-process all-reduce vs
    # gloo over TCP), so the states may differ by float32 rounding amplified over 6 steps:
    # a few 1e-7 relative. 1e-5 relative / 1e-6 absolute (entries are O(0.01..1)) allows
    # that and is far below what a wrong batch, a doubled or missing shard, or per-process
    # BatchNorm statistics would change (>= 1e-3 after one step at lr 0.05).
    for collection in ('params', 'batch_stats', 'opt_state'):
        flat_a = jax.tree_util.tree_leaves_with_path(a[collection])
        flat_b = jax.tree_util.tree_leaves(b[collection])
        assert len(flat_a) == len(flat_b) > 0, collection
        for (path, x), y in zip(flat_a, flat_b):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6,
                                       err_msg=f'{collection}{jax.tree_util.keystr(path)}')
        print(f'{collection}: max |2 processes - 1 process| =',
              max(float(np.abs(np.asarray(x, np.float64) - y).max()) for (_, x), y in zip(flat_a, flat_b)))
    # Not vacuous: the optimizer took steps (its momentum is far from its zero start).
    assert max(float(np.abs(x).max()) for x in jax.tree_util.tree_leaves(a['opt_state'])) > 1e-3

    lines_a, lines_b = read_lines(one), read_lines(two)
    # One writer: two would append every line twice to the shared file.
    assert len(set(lines_b)) == len(lines_b), 'duplicate metric lines: more than one process wrote'
    records_a, records_b = [json.loads(x) for x in lines_a], [json.loads(x) for x in lines_b]
    assert [(r['step'], sorted(r)) for r in records_b] == [(r['step'], sorted(r)) for r in records_a]
    assert len(glob.glob(str(two / 'tensorboard' / 'events.out.tfevents.*'))) == 1
    assert 'step 2/6' in processes.output(multi[0]) and 'step 2/6' not in processes.output(multi[1])
    for ra, rb in zip(records_a, records_b):
        for key in ('train/loss', 'eval/loss'):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra['step'], key)
        for key in ('train/top1', 'eval/top1', 'eval/top5'):
            if key in ra:  # a count out of 100 (eval) or 32 (train): equal unless a logit ties
                assert rb[key] == pytest.approx(ra[key], abs=0.011), (ra['step'], key)
    assert sum('eval/loss' in r for r in records_b) == 1


def wait_for_training(processes, workdir: Path, procs, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, f'{proc.name} exited early:\n{processes.output(proc)[-3000:]}'
        metrics = workdir / 'metrics.jsonl'
        if metrics.exists() and '"train/loss"' in metrics.read_text():
            return
        time.sleep(0.5)
    pytest.fail(f'training did not start within {timeout:.0f} s:\n{processes.output(procs[0])[-3000:]}')


def test_a_dead_peer_stops_the_run_instead_of_hanging(processes, tmp_path):
    heartbeat = 120  # long on purpose: the survivor must not need the heartbeat to notice
    procs = start_multiprocess(processes, tmp_path / 'run', [*LONG, f'--heartbeat_timeout={heartbeat}'])
    wait_for_training(processes, tmp_path / 'run', procs, RUN_TIMEOUT)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert processes.wait(procs[1], 30) == -signal.SIGKILL
    # Process 0's next collective fails at once (gloo: connection reset by peer); the CLI logs
    # why and exits with 1 without waiting out the heartbeat timeout in JAX's exit handler.
    code = processes.wait(procs[0], 60)
    elapsed = time.monotonic() - killed
    out = processes.output(procs[0])
    print(f'process 0 exited with {code} {elapsed:.1f} s after process 1 was killed')
    assert code == 1, out[-3000:]
    assert elapsed < 60
    assert 'most likely because another process of this run died' in out, out[-3000:]
    assert re.search(r'Gloo .*failed|Connection reset|Connection closed', out), out[-3000:]


def test_an_unreachable_coordinator_fails_within_the_timeout(processes, tmp_path):
    address = f'127.0.0.1:{free_port()}'  # nobody listens there
    start = time.monotonic()
    proc = processes.start('worker', [*TINY, *SHORT, f'--workdir={tmp_path / "run"}', f'--coordinator_address={address}',
                                      '--num_processes=2', '--process_id=1', '--distributed_timeout=5'], devices=1)
    code = processes.wait(proc, 60)
    out = processes.output(proc)
    print(f'unreachable coordinator: exit {code} after {time.monotonic() - start:.1f} s')
    # JAX gives up after about the timeout plus 5 s and aborts the process (SIGABRT) with
    # 'DEADLINE_EXCEEDED ... RegisterTask'; our log line before it names the address.
    assert code != 0, out[-3000:]
    assert time.monotonic() - start < 60
    assert 'DEADLINE_EXCEEDED' in out or 'RegisterTask' in out, out[-3000:]
    assert address in out, out[-3000:]
    assert not (tmp_path / 'run' / 'metrics.jsonl').exists()
