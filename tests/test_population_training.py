"""Populations as trainings: `python -m resnet_jax.train --members=FILE`, each member a normal run in its own
workdir (evaluate and a standalone Run read it), exact resume after SIGKILL, SIGTERM, a finished population
relaunched, and the refusals (another config in a member's workdir, a busy member, the limits)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from population_runs import TOLERANCE, member_configs
from test_fault_tolerance import RUN_TIMEOUT, assert_same_state, last_eval, run_starts
from test_multihost import ROOT, cli_env, processes  # noqa: F401 (fixture)

from resnet_jax import export
from resnet_jax import workdir as workdir_lib
from resnet_jax.checkpoint import read_numpy, saved_steps
from resnet_jax.errors import ConfigError
from resnet_jax.train import config as config_lib
from resnet_jax.train.population_loop import common_step, read_members, train_population
from resnet_jax.train.run import restore_workdir
from resnet_jax.workdir import PREEMPTED_EXIT_CODE


def write_members(directory, configs, **overrides) -> str:
    """A members file in `directory` whose members m0, m1, ... train in directory/m0, ... (relative paths)."""
    members = []
    for i, c in enumerate(configs):
        c = c.copy_and_resolve_references()
        for key, value in overrides.items():
            section, _, field = key.rpartition('.')
            (c[section] if section else c)[field] = value
        members.append({'name': f'm{i}', 'workdir': f'm{i}', 'config': json.loads(config_lib.to_json(c))})
    os.makedirs(directory, exist_ok=True)
    file = os.path.join(directory, 'members.json')
    with open(file, 'w') as f:
        json.dump({'members': members}, f)
    return file


def command(args, devices=1, timeout=RUN_TIMEOUT):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=cli_env(devices), capture_output=True, text=True,
                          timeout=timeout)


def final_train(workdir) -> dict:
    return [r for r in workdir_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if 'train/loss' in r][-1]


@pytest.mark.slow
def test_members_command_trains_members_that_are_normal_runs(tmp_path):
    """A population of 4 trained by the command: each member's workdir is a standalone run's, `evaluate` on it
    reproduces the population's final evaluation of that member, its checkpoint restores into a standalone Run,
    and the finished population started again trains nothing."""
    file = write_members(tmp_path, member_configs(), num_steps=4, **{'eval.every_steps': 4, 'log.every_steps': 2,
                                                                      'checkpoint.every_steps': 2})
    result = command(['-m', 'resnet_jax.train', f'--members={file}'])
    assert result.returncode == 0, result.stderr[-3000:]
    names, workdirs, configs = read_members(file)
    assert names == ['m0', 'm1', 'm2', 'm3'] and workdirs[2] == str(tmp_path / 'm2')
    for w, c in zip(workdirs, configs):
        assert config_lib.load_resolved(w).to_dict() == c.to_dict()  # its own values
        for name in ('labels.json', 'metrics.jsonl', 'done.json', 'train_curves.png', 'tensorboard'):
            assert os.path.exists(os.path.join(w, name)), name
        assert saved_steps(w)[-1] == 4
    done = [json.loads((tmp_path / f'm{i}' / 'done.json').read_text()) for i in range(4)]
    assert done[0]['metrics']['train/lr'] != done[2]['metrics']['train/lr']  # each member's own schedule

    evaluated = command(['-m', 'resnet_jax.evaluate', f'--workdir={workdirs[1]}'])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    numbers = json.loads(evaluated.stdout[evaluated.stdout.index('{'):])
    for key in ('loss', 'top1', 'top5'):
        assert abs(numbers[f'evaluate/{key}'] - done[1]['metrics'][f'eval/{key}']) < TOLERANCE, key

    run, restored = restore_workdir(workdirs[3])  # the standalone Run of member 3's config
    assert restored.step == 4 and restored.meta['skipped_updates'] == 0 and restored.data['step'] == 4
    assert_same_state(jax.device_get(restored.state.params), read_numpy(f'{workdirs[3]}/checkpoints/4')['params'])
    final = run.evaluate(restored.state)
    assert abs(final['eval/loss'] - done[3]['metrics']['eval/loss']) < TOLERANCE

    exported = command(['-m', 'resnet_jax.export', f'--workdir={workdirs[3]}', f'--out={tmp_path}/m3.msgpack'])
    assert exported.returncode == 0, exported.stderr[-3000:]
    model, variables, info = export.load(f'{tmp_path}/m3.msgpack')  # member 3's own weights, as a run's
    assert info['step'] == 4
    assert_same_state(jax.device_get(variables['params']), jax.device_get(restored.state.params))

    again = command(['-m', 'resnet_jax.train', f'--members={file}'])
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(run_starts(w) == [0] for w in workdirs)  # nothing trained
    assert all(os.path.exists(os.path.join(w, 'done.json')) for w in workdirs)


@pytest.mark.system
def test_sigkill_at_random_moments_then_restart_ends_bit_identical(processes, tmp_path):  # noqa: F811
    """A population of 4, killed 3 times at seeded random moments (a checkpoint every step, so kills land
    inside the members' saves) and restarted: each member's final state, evaluation and last train metrics
    equal an uninterrupted population's exactly."""
    steps = 16
    overrides = {'num_steps': steps, 'checkpoint.every_steps': 1, 'checkpoint.keep': 1,
                 'eval.every_steps': steps // 2, 'data.augment': 'cifar'}
    whole = write_members(tmp_path / 'whole', member_configs(), **overrides)
    killed = write_members(tmp_path / 'killed', member_configs(), **overrides)
    watched = tmp_path / 'killed' / 'm3'  # the last member to save
    reference = processes.start('whole', [f'--members={whole}'], devices=1)
    rng = random.Random(1234)
    for attempt in range(3):
        proc = processes.start(f'killed{attempt}', [f'--members={killed}'], devices=1)
        deadline = time.time() + RUN_TIMEOUT
        while (len(run_starts(watched)) <= attempt or saved_steps(watched)[-1:] <= run_starts(watched)[-1:]) \
                and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    final = processes.start('final', [f'--members={killed}'], devices=1)
    for proc in (reference, final):
        assert processes.wait(proc, RUN_TIMEOUT) == 0, processes.output(proc)[-3000:]

    starts = [run_starts(tmp_path / 'killed' / f'm{i}') for i in range(4)]
    assert all(s == starts[0] for s in starts), starts  # every member restarts from the same step
    assert len(starts[0]) == 4 and starts[0][0] == 0 and starts[0][-1] < steps, starts
    for i in range(4):
        a, b = tmp_path / 'killed' / f'm{i}', tmp_path / 'whole' / f'm{i}'
        assert_same_state(read_numpy(str(a / 'checkpoints' / str(steps))), read_numpy(str(b / 'checkpoints' / str(steps))))
        assert last_eval(a) == last_eval(b) and last_eval(a)['step'] == steps
        ta, tb = final_train(a), final_train(b)
        assert {k: v for k, v in ta.items() if k not in TIMING} == {k: v for k, v in tb.items() if k not in TIMING}


TIMING = ('train/images_per_sec', 'train/step_seconds')


@pytest.mark.system
def test_sigterm_saves_every_member_and_exits_75(processes, tmp_path):  # noqa: F811
    file = write_members(tmp_path, member_configs()[:2], num_steps=100000, **{
        'eval.every_steps': 100000, 'checkpoint.every_steps': 100000})
    proc = processes.start('run', [f'--members={file}'], devices=1)
    while not run_starts(tmp_path / 'm1') and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    assert processes.wait(proc, RUN_TIMEOUT) == PREEMPTED_EXIT_CODE, processes.output(proc)[-3000:]
    saved = [saved_steps(tmp_path / f'm{i}') for i in range(2)]
    assert saved[0] == saved[1] and len(saved[0]) == 1 and saved[0][0] > 0, saved
    assert f'stopped by SIGTERM after step {saved[0][0]}' in processes.output(proc)


def test_a_member_workdir_with_another_config_is_refused_naming_the_member(tmp_path):
    configs = member_configs()[:2]
    other = configs[1].copy_and_resolve_references()
    other.optim.lr = 0.5
    (tmp_path / 'b' / 'checkpoints' / '4').mkdir(parents=True)
    config_lib.write_resolved(other, str(tmp_path / 'b'))
    with pytest.raises(ConfigError, match=rf"member b \({tmp_path / 'b'}\): the workdir holds checkpoints of a run "
                                          r'with a different config: optim.lr was 0.5, now 0.05'):
        train_population(configs, [tmp_path / 'a', tmp_path / 'b'])
    assert workdir_lib.holder(str(tmp_path / 'a')) is None  # released


def test_a_busy_member_is_named_and_no_member_is_locked(tmp_path):
    lock = workdir_lib.Lock(str(tmp_path / 'b'))
    lock.acquire()
    try:
        with pytest.raises(workdir_lib.WorkdirBusy, match='member b: '):
            train_population(member_configs()[:3], [tmp_path / 'a', tmp_path / 'b', tmp_path / 'c'])
        assert workdir_lib.holder(str(tmp_path / 'a')) is None and not (tmp_path / 'c').exists()
    finally:
        lock.release()


@pytest.mark.parametrize('override, message', [
    ({'data.feed': 'device'}, "config.data.feed: 'device' is not supported by populations yet; use 'host'"),
    ({'mesh.fsdp': 2}, 'config.mesh.fsdp: 2: a population lays its members over the devices'),
    ({'init.source': 'checkpoint:/x'}, "config.init.source: 'checkpoint:/x': members start from their seeds only"),
])
def test_population_limits_are_refused_before_any_workdir(tmp_path, override, message):
    configs = member_configs()[:2]
    for c in configs:
        for key, value in override.items():
            section, field = key.split('.')
            c[section][field] = value
    with pytest.raises(ConfigError, match=message):
        train_population(configs, [tmp_path / 'a', tmp_path / 'b'])
    assert not os.listdir(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize('args, message', [
    (['--members={file}', '--workdir={tmp}/w'], "error: --members=FILE.json holds each member's config and workdir"),
    (['--members={tmp}/none.json'], 'error: --members: {tmp}/none.json cannot be read'),
    (['--members={tmp}/bad.json'], 'error: --members: member 0 of {tmp}/bad.json needs "workdir" (str)'),
])
def test_members_flag_errors(tmp_path, args, message):
    file = write_members(tmp_path, member_configs()[:1])
    (tmp_path / 'bad.json').write_text(json.dumps({'members': [{'name': 'x', 'config': {}}]}))
    args = [a.format(file=file, tmp=tmp_path) for a in args]
    result = command(['-m', 'resnet_jax.train', *args], timeout=120)
    assert result.returncode == 2 and message.format(tmp=tmp_path) in result.stderr, result.stderr[-2000:]


def test_member_values_survive_the_members_file(tmp_path):
    """The file holds each member's resolved config; reading it back gives the same configs (tuples too)."""
    configs = member_configs()
    names, workdirs, read = read_members(write_members(tmp_path, configs))
    assert [c.to_dict() for c in read] == [c.to_dict() for c in configs]
    assert isinstance(read[0].model.stage_sizes, tuple) and np.isclose(read[2].optim.lr, 0.2)


def test_a_crash_between_member_saves_resumes_from_the_step_every_member_has(tmp_path):
    """Member a saved step 3, member b was killed before it did: both continue from step 2, and a's step 3
    (computed again, identically) is deleted so that it can be saved again."""
    configs = member_configs()[:2]
    for name, steps in (('a', (1, 2, 3)), ('b', (1, 2))):
        for s in steps:
            (tmp_path / name / 'checkpoints' / str(s)).mkdir(parents=True)
    assert common_step(configs, [str(tmp_path / 'a'), str(tmp_path / 'b')], ['a', 'b']) == 2
    assert saved_steps(tmp_path / 'a') == saved_steps(tmp_path / 'b') == [1, 2]
    assert common_step(configs, [str(tmp_path / 'a'), str(tmp_path / 'd')], ['a', 'd']) is None  # d: none yet
    assert saved_steps(tmp_path / 'a') == []
