"""The run directory (resnet_jax.workdir): its lock, restore that sets aside only damage, signals
from the first instruction, metadata that survives damage, a quiet terminal, Grain workers that
end with their trainer, and evaluation of a read-only workdir. Faults are real: processes, signals,
flipped bytes, a read-only bind mount."""

import glob
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import tiny_config
from test_fault_tolerance import RUN_TIMEOUT, run_starts
from test_multihost import LONG, ROOT, TINY, cli_env, processes  # noqa: F401 (fixture)

from resnet_jax import checkpoint, workdir
from resnet_jax.errors import ConfigError
from resnet_jax.launch import local
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train.loop import train_and_evaluate


def training_ran(run) -> bool:
    """A training step was logged (the loop runs, so a signal now is recorded and saved)."""
    return os.path.exists(os.path.join(run, workdir.METRICS_FILE)) and any(
        'train/loss' in r for r in metrics_lib.read_metrics(str(run)))


def catches(proc, sig) -> bool:
    """Whether the process has installed a handler for `sig` (the SigCgt mask in /proc/PID/status)."""
    with open(f'/proc/{proc.pid}/status') as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith('SigCgt:'))
    return bool(mask >> (sig - 1) & 1)


def wait_for(condition, proc, timeout=RUN_TIMEOUT):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f'ended early with {proc.returncode}'
        assert time.time() < deadline, 'timed out'
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------- lock

@pytest.mark.system
def test_a_second_process_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(
        processes, tmp_path, caplog):
    run = tmp_path / 'run'
    first = processes.start('first', [*TINY, *LONG, f'--workdir={run}', '--nodistributed'], devices=1)
    wait_for(lambda: run_starts(run), first)
    holder = workdir.holder(str(run))
    assert holder['pid'] == first.pid and holder['host'] and holder['since']

    second = processes.start('second', [*TINY, *LONG, f'--workdir={run}', '--nodistributed'], devices=1)
    assert processes.wait(second, RUN_TIMEOUT) == workdir.BUSY_EXIT_CODE, processes.output(second)[-3000:]
    out = processes.output(second)
    assert f'error: {run} is in use by pid {first.pid} on host {holder["host"]} since {holder["since"]}' in out
    assert 'Traceback' not in out
    evaluate = subprocess.run([sys.executable, '-m', 'resnet_jax.evaluate', f'--workdir={run}'], cwd=ROOT,
                              env=cli_env(1), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert evaluate.returncode == workdir.BUSY_EXIT_CODE and f'in use by pid {first.pid}' in evaluate.stderr
    # A launcher skips it without starting anything.
    script = local_run(run)
    assert local.launch([script], str(tmp_path), launch_options()) == workdir.PREEMPTED_EXIT_CODE
    assert not (run / local.LOG_FILE).exists()

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert workdir.holder(str(run)) is None  # the kernel dropped the flock
    with caplog.at_level('WARNING'), workdir.Lock(str(run)):
        assert workdir.holder(str(run))['pid'] == os.getpid()
    assert f'taking over the lock left by pid {first.pid}' in caplog.text
    assert workdir.holder(str(run)) is None and (run / workdir.LOCK_FILE).read_text() == ''
    # The quiet terminal: progress lines, not Orbax's or absl's INFO logging, which is in library.log.
    out = processes.output(first)
    assert 'step ' in out and not any(line[:1] == 'I' and line[1:5].isdigit() for line in out.splitlines()), out[:3000]
    assert 'checkpoint' in (run / workdir.LIBRARY_LOG).read_text()


def local_run(run_dir):
    from test_sweep import ScriptRun
    return ScriptRun('held', 'print("started")', str(run_dir), {})


def launch_options():
    from test_sweep import launch_options
    return launch_options()


# ------------------------------------------------------------------------------------------- restore

CONFIG = {'checkpoint.every_steps': 4}  # checkpoints 4 and 8


@pytest.fixture(scope='module')
def trained_once(tmp_path_factory):
    path = tmp_path_factory.mktemp('trained') / 'run'
    train_and_evaluate(tiny_config(**CONFIG), str(path))
    return path


@pytest.fixture
def trained(trained_once, tmp_path):
    """A copy of an 8-step run with checkpoints 4 and 8 (its lock free)."""
    return shutil.copytree(trained_once, tmp_path / 'run')


def data_file(step_dir) -> str:
    """The largest file of a checkpoint's train state: array data."""
    files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', '*'), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


@pytest.mark.slow
def test_flipped_bytes_are_damage_and_the_run_continues_from_the_older_step(trained, caplog):
    tmp_path, config = trained, tiny_config(**CONFIG)
    target = data_file(tmp_path / 'checkpoints' / '8')
    with open(target, 'r+b') as f:  # flip 16 bytes in the middle of the array data
        f.seek(os.path.getsize(target) // 2)
        chunk = f.read(16)
        f.seek(-16, 1)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with caplog.at_level('WARNING'):
        train_and_evaluate(config, str(tmp_path))
    assert run_starts(tmp_path) == [0, 4]
    assert f'checkpoints/8 is damaged' in caplog.text and 'SHA-256' in caplog.text
    assert len(glob.glob(str(tmp_path / 'checkpoints' / '8.damaged-*'))) == 1
    assert checkpoint.verify(str(tmp_path / 'checkpoints' / '8'))  # rewritten, with its sums


@pytest.mark.slow
def test_all_damaged_is_an_error_unless_asked_to_start_over(trained):
    tmp_path, config = trained, tiny_config(**CONFIG)
    for step in (4, 8):
        open(data_file(tmp_path / 'checkpoints' / str(step)), 'r+b').truncate(10)
    with pytest.raises(checkpoint.CheckpointError, match=r'every checkpoint in .* is damaged \(8: .*; 4: .*\)\. '
                                                         r'Nothing was changed\. .* --restart_from_scratch'):
        train_and_evaluate(config, str(tmp_path))
    assert workdir.saved_steps(str(tmp_path)) == [4, 8]
    train_and_evaluate(config, str(tmp_path), restart_from_scratch=True)
    assert run_starts(tmp_path) == [0, 0]
    assert len(glob.glob(str(tmp_path / 'checkpoints' / '*.damaged-*'))) == 2


def test_a_state_that_no_longer_fits_is_an_error_naming_the_leaf_not_damage(trained):
    tmp_path = trained
    wider = tiny_config(**CONFIG, **{'model.widths': (8, 16, 48), 'num_steps': 12,
                           'checkpoint.resume_allow_changes': ('model.widths',)})
    with pytest.raises(checkpoint.CheckpointError,
                       match=r'checkpoint .*/8 does not fit the model this config builds: \S+ is shape \(.*\) float32 '
                             r'in the checkpoint and shape \(.*48.*\) float32 here\. Nothing was changed'):
        train_and_evaluate(wider, str(tmp_path))
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4', '8'] and run_starts(tmp_path) == [0]


@pytest.mark.slow
def test_any_path_a_user_can_type_works(tmp_path):
    """Brackets made Orbax miss its own files (etils globs the directory name); spaces, unicode,
    `*?#%` and a long name too."""
    path = str(tmp_path / ('a [b] *?#% ü ' + 'x' * 150) / 'run [1]')
    train_and_evaluate(tiny_config(**CONFIG), path)
    assert workdir.saved_steps(path) == [4, 8]
    for step in (4, 8):
        assert int(checkpoint.read_numpy(os.path.join(path, 'checkpoints', str(step)))['step']) == step


# ------------------------------------------------------------------------------------------ metadata

@pytest.mark.slow
def test_garbage_or_missing_config_json_and_bad_metrics_lines(trained, caplog):
    tmp_path = trained
    stored = tmp_path / workdir.CONFIG_FILE
    text = stored.read_text()
    stored.write_text('{"batch_size": 32,')
    with pytest.raises(workdir.WorkdirError, match=rf'{stored} \(the config of the run\) is not valid JSON'):
        train_and_evaluate(tiny_config(**CONFIG, num_steps=12), str(tmp_path))
    stored.unlink()  # recovered from the checkpoint, and compared as usual
    with pytest.raises(ConfigError, match=r'optim.lr was 0.1, now 0.05'):
        train_and_evaluate(tiny_config(**CONFIG, **{'optim.lr': 0.05, 'num_steps': 12}), str(tmp_path))
    bad_line = len((tmp_path / workdir.METRICS_FILE).read_text().splitlines()) + 1
    with open(tmp_path / workdir.METRICS_FILE, 'a') as f:
        f.write('{"step": 5, "train/lo\n')  # half-written by a killed run
    with caplog.at_level('WARNING'):
        train_and_evaluate(tiny_config(**CONFIG, num_steps=12), str(tmp_path))
    assert json.loads(stored.read_text()) == dict(json.loads(text), num_steps=12)
    assert (tmp_path / workdir.DONE_FILE).exists() and run_starts(tmp_path) == [0, 8]
    assert f'{tmp_path / workdir.METRICS_FILE} line {bad_line} is not a metrics record' in caplog.text


# ------------------------------------------------------------------------------------------- signals

@pytest.mark.system
def test_a_stop_signal_at_any_moment_exits_75(tmp_path):
    """SIGTERM or SIGUSR1 at seeded random moments from the command's first instruction (while the
    libraries load, the data is read, the step compiles, or training runs): always exit 75; a
    checkpoint is written only once training ran, and is complete."""
    rng = random.Random(16)
    moments = [rng.uniform(0.0, 0.6), rng.uniform(0.6, 3.0), rng.uniform(3.0, 8.0), None]  # None: while training
    for i, moment in enumerate(moments):
        run = tmp_path / f'run{i}'
        sig = signal.SIGUSR1 if i % 2 else signal.SIGTERM
        proc = subprocess.Popen([sys.executable, '-m', 'resnet_jax.train', *TINY, *LONG, f'--workdir={run}',
                                 '--nodistributed'], cwd=ROOT, env=cli_env(1), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            if moment is None:
                wait_for(lambda: training_ran(run), proc)
                time.sleep(rng.uniform(0.0, 1.0))
            else:  # counted from the command's first instruction, before which no program can catch it
                wait_for(lambda: catches(proc, sig), proc)
                time.sleep(moment)
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=RUN_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == workdir.PREEMPTED_EXIT_CODE, (moment, out[-3000:])
        assert 'Traceback' not in out and 'Event loop is closed' not in out and 'cannot schedule' not in out, out
        for step in workdir.saved_steps(str(run)):
            assert checkpoint.verify(str(run / 'checkpoints' / str(step)))
        if moment is None:
            assert workdir.saved_steps(str(run))[-1] > 0 and f'stopped by {sig.name} after step' in out


@pytest.mark.system
def test_ctrl_c_once_stops_after_saving(tmp_path):
    proc = subprocess.Popen([sys.executable, '-m', 'resnet_jax.train', *TINY, *LONG, f'--workdir={tmp_path}',
                             '--nodistributed'], cwd=ROOT, env=cli_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: training_ran(tmp_path), proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == workdir.PREEMPTED_EXIT_CODE, out[-3000:]
    assert 'Ctrl-C: stopping after saving (press Ctrl-C again to abort at once)' in out
    assert f'stopped by SIGINT after step {workdir.saved_steps(str(tmp_path))[-1]}' in out
    assert workdir.holder(str(tmp_path)) is None


def test_a_stop_while_the_libraries_load_ends_the_process_without_unwinding():
    """The train command's first phase: a signal while JAX imports exits 75 on the spot, with no
    interpreter shutdown (which can crash on a half-imported native library: seen as exit -11)."""
    code = ('import atexit, os, signal\n'
            'from resnet_jax import workdir\n'
            'workdir.SIGNALS.install(exit_at_once=True)\n'
            'atexit.register(lambda: print("interpreter shut down", flush=True))\n'
            'try:\n'
            '    os.kill(os.getpid(), signal.SIGTERM)\n'
            '    import jax\n'
            'finally:\n'
            '    print("unwound", flush=True)\n')
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == workdir.PREEMPTED_EXIT_CODE, proc.stderr
    assert proc.stdout == '' and 'stopped by SIGTERM before training began' in proc.stderr


def test_a_second_ctrl_c_aborts_and_a_stop_before_training_raises_stopped():
    """The handlers themselves, with real signals to this process (two presses reaching a busy CLI
    run within one step would be taken up by Python as one)."""
    signals = workdir.StopSignals().install()
    try:
        with pytest.raises(workdir.Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert stopped.value.code == workdir.PREEMPTED_EXIT_CODE and stopped.value.signal_name == 'SIGTERM'
        with pytest.raises(workdir.Stopped):  # a Stopped that Python swallowed is raised at the switch
            signals.recording()
        signals.uninstall()
        signals.install()
        signals.recording()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert signals.received == 'SIGINT'
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        signals.uninstall()


# ---------------------------------------------------------------------------- workers and read-only

@pytest.mark.system
def test_grain_workers_end_with_a_sigkilled_trainer(tmp_path):
    proc = subprocess.Popen([sys.executable, '-m', 'resnet_jax.train', *TINY, *LONG, '--config.data.feed=stream',
                             '--config.data.workers=2', f'--workdir={tmp_path}', '--nodistributed'], cwd=ROOT,
                            env=cli_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: run_starts(tmp_path) and len(psutil.Process(proc.pid).children()) >= 2, proc)
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)  # the trainer alone, as the OOM killer would
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=15)
        for p in alive:
            p.kill()
        assert not alive, f'{len(alive)} of {len(workers)} Grain workers outlived their SIGKILLed trainer'
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.system
def test_evaluate_on_a_read_only_workdir_prints_and_says_it_could_not_record(trained):
    if shutil.which('unshare') is None or subprocess.run(['unshare', '-m', 'true']).returncode != 0:
        pytest.skip('needs unshare -m (a private mount namespace) for a read-only bind mount')
    run = trained
    before = (run / workdir.METRICS_FILE).read_text()
    script = (f'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && touch "$0/x" 2>/dev/null && exit 9; '
              f'exec {sys.executable} -m resnet_jax.evaluate --workdir="$0"')
    result = subprocess.run(['unshare', '-m', 'sh', '-c', script, str(run)], cwd=ROOT, env=cli_env(1),
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)['evaluate/top1'] >= 0
    assert f'could not be recorded in {run / workdir.METRICS_FILE}: {run} is read-only' in result.stderr
    assert (run / workdir.METRICS_FILE).read_text() == before


@pytest.mark.system
def test_a_full_disk_stops_with_an_error_and_the_run_resumes_once_there_is_space(tmp_path):
    """A 600 kB tmpfs (private mount namespace) fills up during the second checkpoint."""
    if shutil.which('unshare') is None or subprocess.run(['unshare', '-m', 'true']).returncode != 0:
        pytest.skip('needs unshare -m (a private mount namespace) for a small tmpfs')
    run = tmp_path / 'disk' / 'run'
    run.parent.mkdir()
    train = shlex.join([sys.executable, '-m', 'resnet_jax.train', *TINY, '--config.num_steps=40',
                        '--config.checkpoint.every_steps=2', '--config.eval.every_steps=40', f'--workdir={run}',
                        '--nodistributed'])
    script = (f'mount -t tmpfs -o size=600k tmpfs {shlex.quote(str(run.parent))} || exit 9; {train}; echo "rc=$?"; '
              f'mount -o remount,size=16M {shlex.quote(str(run.parent))}; {train}; echo "rc=$?"; '
              f'cat {shlex.quote(str(run / workdir.METRICS_FILE))}')
    result = subprocess.run(['unshare', '-m', 'sh', '-c', script], cwd=ROOT, env=cli_env(1), capture_output=True,
                            text=True, timeout=2 * RUN_TIMEOUT)
    assert re.findall(r'^rc=(\d+)$', result.stdout, re.M) == ['1', '0'], result.stderr[-3000:]
    assert f'error: no space left on the disk of {run}' in result.stderr
    starts = [json.loads(line)['step'] for line in result.stdout.splitlines()
              if line.startswith('{') and 'perf/compile_seconds' in line]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] > 0, starts
