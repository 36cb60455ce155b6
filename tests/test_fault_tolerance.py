"""Nothing lost: SIGKILL at random moments, SIGTERM pre-emption (1 and 2 processes), corrupted
checkpoints, restore onto another mesh, config changes on resume, best-K retention, NaN/Inf."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import pytest
from helpers import EIGHT_CPU_DEVICES, tiny_config
from test_multihost import ROOT, TINY, cli_env, processes, start_multiprocess  # noqa: F401 (fixture)
from test_train import run_module

from resnet_jax import checkpoint, workdir
from resnet_jax.checkpoint import read_numpy, saved_steps
from resnet_jax.errors import ConfigError
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train.cadence import NonFiniteError
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.run import Run
from resnet_jax.workdir import PREEMPTED_EXIT_CODE

RUN_TIMEOUT = 300


def run_starts(workdir) -> list[int]:
    """The step each start of the run in `workdir` began from."""
    if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
        return []
    return [r['step'] for r in metrics_lib.read_metrics(str(workdir)) if 'perf/compile_seconds' in r]


def last_eval(workdir) -> dict:
    return [r for r in metrics_lib.read_metrics(str(workdir)) if 'eval/top1' in r][-1]


def assert_same_state(a: dict, b: dict):
    """Equal leaves at equal paths (a tuple index and a dict key '1' count as the same path)."""
    def by_path(tree):
        return {jax.tree_util.keystr(p).replace("'", ''): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    a, b = by_path(a), by_path(b)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)


@pytest.mark.system
def test_sigkill_at_random_moments_then_restart_ends_bit_identical(processes, tmp_path):
    """Killed 4 times (seeded random moments after training starts, with a checkpoint every
    step, so several kills land in an asynchronous save) and restarted each time: the final
    parameters, optimizer state and evaluation equal an uninterrupted run's exactly."""
    steps = 40
    args = [*TINY, f'--config.num_steps={steps}', '--config.checkpoint.every_steps=1', '--config.checkpoint.keep=2',
            f'--config.eval.every_steps={steps // 2}', '--config.data.augment=cifar']
    whole, killed = tmp_path / 'whole', tmp_path / 'killed'
    reference = processes.start('whole', [*args, f'--workdir={whole}', '--nodistributed'], devices=1)
    rng = random.Random(1234)
    for attempt in range(4):
        proc = processes.start(f'killed{attempt}', [*args, f'--workdir={killed}', '--nodistributed'], devices=1)
        deadline = time.time() + RUN_TIMEOUT
        # Until this start has trained past where it began (a newer checkpoint is complete) ...
        while (len(run_starts(killed)) <= attempt or saved_steps(killed)[-1:] <= run_starts(killed)[-1:]) \
                and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))  # ... then a random moment, often inside the next save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    final = processes.start('final', [*args, f'--workdir={killed}', '--nodistributed'], devices=1)
    for proc in (reference, final):
        assert processes.wait(proc, RUN_TIMEOUT) == 0, processes.output(proc)[-3000:]

    starts = run_starts(killed)
    assert len(starts) == 5 and starts[0] == 0 and starts[-1] < steps, starts
    assert all(a < b for a, b in zip(starts, starts[1:])), f'each restart should resume further on: {starts}'
    assert_same_state(read_numpy(str(killed / 'checkpoints' / str(steps))), read_numpy(str(whole / 'checkpoints' / str(steps))))
    a, b = last_eval(killed), last_eval(whole)
    assert a['step'] == b['step'] == steps and a == b


@pytest.mark.system
def test_sigterm_saves_the_step_reached_and_the_restart_continues(processes, tmp_path):
    args = [*TINY, '--config.num_steps=100000', '--config.eval.every_steps=100000',
            '--config.checkpoint.every_steps=100000', f'--workdir={tmp_path}', '--nodistributed']
    proc = processes.start('run', args, devices=1)
    while not run_starts(tmp_path) and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    assert processes.wait(proc, RUN_TIMEOUT) == PREEMPTED_EXIT_CODE, processes.output(proc)[-3000:]
    saved = saved_steps(tmp_path)
    assert len(saved) == 1 and saved[0] > 0
    assert f'stopped by SIGTERM after step {saved[0]}' in processes.output(proc)

    again = processes.start('again', [*args[:-2], f'--config.num_steps={saved[0] + 4}', f'--workdir={tmp_path}',
                                      '--nodistributed'], devices=1)
    assert processes.wait(again, RUN_TIMEOUT) == 0, processes.output(again)[-3000:]
    assert run_starts(tmp_path) == [0, saved[0]]


@pytest.mark.system
@pytest.mark.multiprocess
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(processes, tmp_path):
    """JAX's preemption notifier and Orbax's sync point: both processes save the same step and exit 75."""
    long = ['--config.num_steps=100000', '--config.eval.every_steps=100000', '--config.checkpoint.every_steps=100000']
    procs = start_multiprocess(processes, tmp_path, long)
    while not run_starts(tmp_path) and all(p.poll() is None for p in procs):
        time.sleep(0.1)
    assert workdir.holder(str(tmp_path))['pid'] == procs[0].pid  # one lock for the whole run, held by process 0
    time.sleep(3.0)
    procs[1].send_signal(signal.SIGTERM)
    for proc in procs:
        assert processes.wait(proc, RUN_TIMEOUT) == PREEMPTED_EXIT_CODE, processes.output(proc)[-3000:]
    saved = saved_steps(tmp_path)
    assert len(saved) == 1 and saved[0] > 0
    for proc in procs:
        assert f'after step {saved[0]}' in processes.output(proc)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    config = tiny_config(**{'checkpoint.every_steps': 4})
    train_and_evaluate(config, str(tmp_path))
    directory = tmp_path / 'checkpoints'
    damaged = directory / '8' / 'state'
    for root, _, files in os.walk(damaged):
        for f in files:
            open(os.path.join(root, f), 'r+b').truncate(0)
    run = Run(config)
    manager = checkpoint.Manager(str(directory), config, read_only=True)
    with caplog.at_level('WARNING'):
        restored = manager.restore(run.abstract_state)
    manager.close()
    assert restored.step == 4 and int(restored.state.step) == 4
    assert f'{directory}/8 is damaged' in caplog.text
    # The run then continues from step 4 and rewrites step 8.
    train_and_evaluate(config, str(tmp_path))
    assert run_starts(tmp_path) == [0, 4]


@pytest.mark.slow
def test_restore_onto_one_device_of_a_checkpoint_saved_on_eight(tmp_path):
    """Saved with the train state split over data=4 x fsdp=2 CPU devices, restored onto 1 device."""
    result = run_module(['-m', 'resnet_jax.train', *TINY, '--config.num_steps=4', '--config.checkpoint.every_steps=4',
                         '--config.eval.every_steps=4', '--config.eval.batch_size=24', '--config.mesh.fsdp=2', '--config.mesh.fsdp_min_size=1',
                         "--config.mesh.param_rules=(('.*kernel','fsdp'),)", f'--workdir={tmp_path}', '--nodistributed'],
                        env={'XLA_FLAGS': EIGHT_CPU_DEVICES})
    assert result.returncode == 0, result.stderr[-3000:]
    from resnet_jax.train.config import load_resolved
    config = load_resolved(str(tmp_path))
    config.mesh.fsdp = 1
    run = Run(config)
    manager = checkpoint.Manager(str(tmp_path / 'checkpoints'), config, read_only=True)
    restored = manager.restore(run.abstract_state)
    manager.close()
    assert len(restored.state.params['head']['kernel'].sharding.device_set) == 1
    saved = read_numpy(str(tmp_path / 'checkpoints' / '4'))
    assert_same_state(flax.serialization.to_state_dict(jax.device_get(restored.state)), saved)


@pytest.mark.slow
def test_resuming_with_a_changed_config_names_the_fields(tmp_path):
    train_and_evaluate(tiny_config(), str(tmp_path))
    changed = tiny_config(**{'batch_size': 16, 'optim.lr': 0.05, 'log.every_steps': 2})
    with pytest.raises(ConfigError, match=r'batch_size was 32, now 16; optim.lr was 0.1, now 0.05\. Use another'):
        train_and_evaluate(changed, str(tmp_path))
    stored = json.loads((tmp_path / 'config.json').read_text())
    assert stored['batch_size'] == 32  # the stored config is left as it was
    # Safe fields may change; listed fields are allowed on request (here extending the run too).
    allowed = tiny_config(**{'num_steps': 10, 'log.every_steps': 2, 'batch_size': 16,
                             'checkpoint.resume_allow_changes': ('batch_size',)})
    train_and_evaluate(allowed, str(tmp_path))
    assert run_starts(tmp_path) == [0, 8]


@pytest.mark.slow
@pytest.mark.parametrize('metric,mode', [('eval/top1', 'max'), ('eval/loss', 'min')])
def test_the_newest_and_the_best_checkpoints_are_kept(tmp_path, metric, mode):
    config = tiny_config(**{'num_steps': 12, 'eval.every_steps': 2, 'checkpoint.every_steps': 2,
                            'checkpoint.keep': 1, 'checkpoint.keep_best': 1, 'checkpoint.best_metric': metric,
                            'checkpoint.best_mode': mode, 'optim.lr': 0.3})
    train_and_evaluate(config, str(tmp_path))
    evals = {r['step']: r[metric] for r in metrics_lib.read_metrics(str(tmp_path)) if metric in r}
    best = (max if mode == 'max' else min)(evals.values())
    kept = saved_steps(tmp_path)
    assert kept[-1] == 12 and len(kept) <= 2, (evals, kept)
    assert evals[kept[0]] == best, (evals, kept)  # the best step (the newest, if it is the best)
    assert len(set(evals.values())) > 1  # the metric varied, so 'best' was a real choice


@pytest.mark.slow
def test_a_nonfinite_loss_stops_or_is_skipped_and_counted(tmp_path):
    """std = 1e-30 (0 is refused) makes inputs of about 1e30, whose squares overflow float32, so every
    loss is NaN: 'stop' ends at the first step
    without touching the parameters; 'skip' runs to the end, counting every update as skipped."""
    poisoned = {'data.mean': (0.5, 0.5, 0.5), 'data.std': (1e-30, 1e-30, 1e-30)}
    with pytest.raises(NonFiniteError, match=r'non-finite loss or gradient at step 0; .* --config.optim.nonfinite=skip'):
        train_and_evaluate(tiny_config(**poisoned), str(tmp_path / 'stop'))
    assert not os.path.exists(tmp_path / 'stop' / 'checkpoints' / '8')

    config = tiny_config(**poisoned, **{'optim.nonfinite': 'skip'})
    train_and_evaluate(config, str(tmp_path / 'skip'))
    logged = [r for r in metrics_lib.read_metrics(str(tmp_path / 'skip')) if 'train/skipped_updates' in r]
    assert logged[-1]['train/skipped_updates'] == 8
    run = Run(config)
    manager = checkpoint.Manager(str(tmp_path / 'skip' / 'checkpoints'), config, read_only=True)
    final = manager.restore(run.abstract_state).state
    manager.close()
    initial = run.initial_state()
    assert int(final.step) == 8
    assert_same_state(jax.device_get(final.params), jax.device_get(initial.params))


@pytest.mark.system
def test_sigterm_to_the_process_group_of_a_streamed_run(tmp_path):
    """A scheduler signals the whole process group, Grain workers included: the run still saves
    and exits 75, and no worker outlives it."""
    args = [sys.executable, '-m', 'resnet_jax.train', *TINY, '--config.data.feed=stream', '--config.data.workers=2',
            '--config.num_steps=100000', '--config.eval.every_steps=100000', '--config.checkpoint.every_steps=100000',
            f'--workdir={tmp_path}', '--nodistributed']
    with open(tmp_path / 'log', 'wb') as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=cli_env(1), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while not run_starts(tmp_path) and proc.poll() is None:
                time.sleep(0.1)
            time.sleep(3.0)
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=RUN_TIMEOUT) == PREEMPTED_EXIT_CODE, (tmp_path / 'log').read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert len(saved_steps(tmp_path)) == 1 and saved_steps(tmp_path)[0] > 0
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)  # raises once no process of the group is left
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail('Grain worker processes outlived the training process')
