"""The local launcher: a sweep's runs on this machine, one after another or N at a time.

    python -m resnet_jax.sweep --config=experiments/cifar10.py --sweep_dir=runs/table6 \\
        --launcher=local --local_parallel=4 --local_devices_per_run=2

Each run is `python -m resnet_jax.train ...` in its own workdir, its output appended to
`<workdir>/train.log`. A run whose workdir a training holds locked (resnet_jax.workdir) is skipped,
so a second launcher on the same sweep leaves the first one's runs alone. With
`--local_devices_per_run=k`, the i-th of the parallel slots sees GPUs `ids[i*k:(i+1)*k]` through
CUDA_VISIBLE_DEVICES; without it, every run sees every device, and
`--local_memory_fraction` lets several small runs share one GPU. SIGINT or SIGTERM to the launcher is passed
on as SIGTERM to every running run, which saves a checkpoint and exits 75 (pre-empted); such
runs count as unfinished, not failed, and are resumed by launching the sweep again. The exit
code is 1 if a run failed, else 75 if a run was pre-empted, else 0.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading

from absl import flags

from resnet_jax import workdir as workdir_lib
from resnet_jax.launch.command import LaunchError
from resnet_jax.workdir import PREEMPTED_EXIT_CODE

LOG_FILE = workdir_lib.LAUNCH_LOG
BUSY = 'busy'  # the outcome of a run whose workdir another training holds locked

flags.DEFINE_integer('local_parallel', 1, 'runs at a time; 0: as many as the devices allow with '
                     '--local_devices_per_run (else 1)')
flags.DEFINE_integer('local_devices_per_run', 0, 'GPUs each run sees (CUDA_VISIBLE_DEVICES); 0: every run sees all')
flags.DEFINE_list('local_device_ids', None, 'GPU ids to share out (default: $CUDA_VISIBLE_DEVICES, else nvidia-smi)')
flags.DEFINE_float('local_memory_fraction', None, 'share of device memory each run takes '
                   '(XLA_PYTHON_CLIENT_MEM_FRACTION), so that several small runs fit on one GPU: e.g. 0.2 with '
                   '--local_parallel=4; default: JAX preallocates 75%, which leaves room for one run per GPU')


def device_groups(parallel: int, per_run: int, ids: list[str] | None) -> list[dict]:
    """One environment addition per parallel slot: {} without pinning, else its CUDA_VISIBLE_DEVICES."""
    if parallel < 0 or per_run < 0:
        raise LaunchError(f'--local_parallel={parallel} and --local_devices_per_run={per_run} must be >= 0')
    if per_run == 0:
        return [{}] * max(parallel, 1)
    ids = ids or _visible_gpus()
    if not ids:
        raise LaunchError('--local_devices_per_run needs GPU ids: none found in $CUDA_VISIBLE_DEVICES or by '
                          'nvidia-smi; pass --local_device_ids=0,1,...')
    parallel = parallel or len(ids) // per_run
    if parallel * per_run > len(ids) or parallel == 0:
        raise LaunchError(f'--local_parallel={parallel} x --local_devices_per_run={per_run} needs '
                          f'{max(parallel, 1) * per_run} devices; there are {len(ids)} ({",".join(ids)})')
    return [{'CUDA_VISIBLE_DEVICES': ','.join(ids[i * per_run:(i + 1) * per_run])} for i in range(parallel)]


def with_memory_fraction(groups: list[dict], fraction: float | None, shared: bool) -> list[dict]:
    """`groups` with XLA_PYTHON_CLIENT_MEM_FRACTION set; refused where the runs that share a device
    (all of them, when `shared`) would ask for more than the whole of its memory."""
    if fraction is None:
        return groups
    sharing = len(groups) if shared else 1
    if not 0 < fraction * sharing <= 1:
        raise LaunchError(f'--local_memory_fraction={fraction}: {sharing} run(s) share each device, so it must be '
                          f'in (0, {1 / sharing:.3g}]')
    return [dict(group, XLA_PYTHON_CLIENT_MEM_FRACTION=str(fraction)) for group in groups]


def _visible_gpus() -> list[str]:
    if os.environ.get('CUDA_VISIBLE_DEVICES'):
        return os.environ['CUDA_VISIBLE_DEVICES'].split(',')
    if shutil.which('nvidia-smi') is None:
        return []
    result = subprocess.run(['nvidia-smi', '--query-gpu=index', '--format=csv,noheader'],
                            capture_output=True, text=True, check=False)
    return result.stdout.split() if result.returncode == 0 else []


class _Runner:
    """Starts runs in free slots and passes a stop signal on to the running ones."""

    def __init__(self, groups: list[dict]):
        self.slots = queue.Queue()
        for group in groups:
            self.slots.put(group)
        self.running: dict[str, subprocess.Popen] = {}
        self.stopping = None  # the signal name once one arrived
        self.lock = threading.Lock()

    def run(self, run) -> int | str:
        group = self.slots.get()
        try:
            if self.stopping:
                return PREEMPTED_EXIT_CODE  # never started: still unfinished
            if workdir_lib.holder(run.workdir) is not None:
                return BUSY
            os.makedirs(run.workdir, exist_ok=True)
            with open(os.path.join(run.workdir, LOG_FILE), 'a') as log:
                command = [sys.executable, *run.train_args()]
                pinned = ''.join(f'{k}={v} ' for k, v in group.items())
                log.write(f'# {datetime.datetime.now().isoformat(timespec="seconds")} {pinned}{shlex.join(command)}\n')
                log.flush()
                with self.lock:
                    if self.stopping:
                        return PREEMPTED_EXIT_CODE
                    # Its own session: a terminal's Ctrl-C reaches the launcher only, which stops the runs cleanly.
                    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                               env=dict(os.environ, **group))
                    self.running[run.name] = process
                code = process.wait()
                with self.lock:
                    del self.running[run.name]
                return BUSY if code == workdir_lib.BUSY_EXIT_CODE else code  # another took it as it started
        finally:
            self.slots.put(group)

    def stop(self, signum, frame) -> None:
        with self.lock:
            self.stopping = signal.Signals(signum).name
            for process in self.running.values():
                try:
                    os.killpg(process.pid, signal.SIGTERM)  # the run and its data workers
                except ProcessLookupError:  # it has just ended
                    pass
        print(f'{self.stopping}: asked {len(self.running)} running runs to save and stop', flush=True)


def launch(runs, sweep_dir: str, options) -> int:
    """Run `runs` here; print one line per run as it ends and a summary; return the exit code."""
    groups = device_groups(options.local_parallel, options.local_devices_per_run, options.local_device_ids)
    groups = with_memory_fraction(groups, options.local_memory_fraction, shared=not options.local_devices_per_run)
    if options.dry_run:
        for i, run in enumerate(runs):
            pinned = ''.join(f'{k}={v} ' for k, v in groups[i % len(groups)].items())
            print(f'{pinned}{run.command()} >> {shlex.quote(os.path.join(run.workdir, LOG_FILE))} 2>&1')
        return 0
    runner = _Runner(groups)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, runner.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    outcomes = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
            futures = {pool.submit(runner.run, run): run for run in runs}
            for future in concurrent.futures.as_completed(futures):
                run = futures[future]
                outcomes[run.name] = future.result()
                log = os.path.join(run.workdir, LOG_FILE)
                print(f'{run.name}: {_describe(outcomes[run.name])} ({log})', flush=True)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    failed = [name for name, code in outcomes.items() if code not in (0, PREEMPTED_EXIT_CODE, BUSY)]
    unfinished = [name for name, code in outcomes.items() if code in (PREEMPTED_EXIT_CODE, BUSY)]
    print(f'{len(runs) - len(failed) - len(unfinished)} of {len(runs)} runs finished; '
          f'{len(unfinished)} unfinished (launch the sweep again to resume them); {len(failed)} failed' +
          (': ' + ', '.join(f'{name} (exit {outcomes[name]})' for name in failed) if failed else ''))
    return 1 if failed else PREEMPTED_EXIT_CODE if unfinished else 0


def _describe(code) -> str:
    if code == 0:
        return 'finished'
    if code == BUSY:
        return 'skipped: another process is training in its workdir'
    if code == PREEMPTED_EXIT_CODE:
        return 'stopped after saving (unfinished)'
    return f'failed with exit code {code}'
