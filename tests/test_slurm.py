"""The SLURM launcher on a real one-node cluster (slurmctld + slurmd + munged on localhost).

A sweep of 3 tiny runs as one job array, then its results table; one training as a 2-task job
(jax.distributed from SLURM's environment) equal to the same run as one process with 2 devices;
pre-emption: `scancel --signal=TERM` makes the training save and exit 75, the job script
requeues the job, and the second attempt resumes from the checkpoint and finishes; a signalled
array task requeues only itself and a cancelled one is not requeued. The tests of this module share one cluster per xdist worker (a cluster
starts in about a second, and clusters in different directories do not collide); the daemons
are stopped at the end even when a test fails. Without the SLURM binaries the
tests are skipped (CI installs slurm-wlm and munge).
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from slurm_cluster import SlurmCluster, missing_binaries
from test_fault_tolerance import run_starts
from test_multihost import ROOT, TINY, cli_env, processes, read_lines  # noqa: F401 (fixture)

from resnet_jax import sweep as sweep_lib
from resnet_jax.checkpoint import read_numpy, saved_steps
from resnet_jax.workdir import DONE_FILE

TIMEOUT = 300  # seconds for any one job; reached only when something hangs
STEPS = 6
SHORT = [f'--config.num_steps={STEPS}', f'--config.eval.every_steps={STEPS}', f'--config.checkpoint.every_steps={STEPS}']

SWEEP_FILE = """
from resnet_jax.sweep import product, seeds
from resnet_jax.train.config import from_file


def get_config(arg=None):
    c = from_file({quickstart!r})
    c.model.stage_sizes, c.model.widths, c.model.stem_width = (1, 1, 1), (8, 16, 32), 8
    c.data.image_size, c.data.num_train, c.data.num_eval = 8, 256, 100
    c.batch_size, c.eval.batch_size, c.num_steps = 16, 20, 6
    c.optim.warmup_steps, c.log.every_steps, c.eval.every_steps, c.checkpoint.every_steps = 2, 2, 6, 6
    c.log.progress_seconds = 0.0
    return c


def get_sweep(arg=None):
    return product({{'optim.lr': [0.1]}}, seeds(2)) + [{{'optim.lr': 0.05, 'seed': 0}}]
"""


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f'SLURM is not installed (missing {", ".join(missing)}); apt-get install slurm-wlm munge')
    with SlurmCluster(tmp_path_factory.mktemp('slurm')) as c:
        yield c


def job_env(cluster) -> dict:
    """What the launcher (and through sbatch's --export=ALL, every job) runs with: one CPU device per process."""
    return cluster.env(cli_env(1))


def launcher(cluster, args: list[str], log: Path) -> subprocess.Popen:
    with open(log, 'wb') as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=job_env(cluster), stdout=out,
                                stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, cluster) -> str:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f'the launcher did not end within {TIMEOUT} s:\n{log.read_text()[-3000:]}\n{cluster.logs()}')
    return log.read_text(errors='replace')


@pytest.mark.system
def test_a_sweep_runs_as_one_job_array_and_gives_the_results_table(cluster, tmp_path):
    config = tmp_path / 'tiny_sweep.py'
    config.write_text(SWEEP_FILE.format(quickstart=str(ROOT / 'experiments' / 'quickstart.py')))
    sweep_dir = tmp_path / 'sweep'
    args = ['-m', 'resnet_jax.sweep', f'--config={config}', f'--sweep_dir={sweep_dir}', '--launcher=slurm',
            '--slurm_wait', '--slurm_poll_seconds=1', '--slurm_cpus_per_task=1', '--slurm_time=10']
    out = finish(launcher(cluster, args, tmp_path / 'launch.log'), tmp_path / 'launch.log', cluster)
    assert re.search(r'submitted job array (\d+): 3 runs', out), out
    job = re.search(r'submitted job array (\d+)', out).group(1)
    assert f'job {job} ended: 3 of 3 tasks completed' in out, out + cluster.logs()

    script = (sweep_dir / 'slurm' / 'array-0.sbatch').read_text()
    assert '#SBATCH --array=0-2\n' in script and '#SBATCH --cpus-per-task=1\n' in script
    _, runs = sweep_lib.load(str(sweep_dir))
    lines = (sweep_dir / 'slurm' / 'array-0.runs').read_text().splitlines()
    assert [run.train_args() for run in runs] == [shlex.split(line) for line in lines]
    for i, run in enumerate(runs):  # task i ran run i, to the end, in its own workdir
        assert sweep_lib.run_state(run.workdir) == 'finished', run.name
        assert json.loads((Path(run.workdir) / DONE_FILE).read_text())['step'] == STEPS
        log = (sweep_dir / 'slurm' / f'{job}_{i}.out').read_text()
        assert f'job {job}_{i}, attempt 1: ' in log and f'--workdir={run.workdir}' in log, log
    # Different seeds and learning rates: three different runs.
    finals = [read_lines(Path(run.workdir))[-1] for run in runs]
    assert len(set(finals)) == 3

    table = subprocess.run([sys.executable, '-m', 'resnet_jax.sweep.results', str(sweep_dir)], cwd=ROOT,
                           env=job_env(cluster), capture_output=True, text=True, timeout=TIMEOUT)
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith('| 0.')]
    assert len(rows) == 2 and ' ± ' in rows[[r.split(' | ')[1] for r in rows].index('2')], table.stdout


@pytest.mark.system
def test_paths_with_spaces_and_special_characters_reach_the_job_intact(cluster, tmp_path):
    """Sweep directory, working directory and interpreter with ' ', '#' and '%': sbatch reads the quoted
    #SBATCH options (log path, job name, --chdir) and each task gets its arguments unsplit."""
    config = tmp_path / 'tiny_sweep.py'
    config.write_text(SWEEP_FILE.format(quickstart=str(ROOT / 'experiments' / 'quickstart.py')))
    odd = tmp_path / 'a dir #1 100%'
    (odd / 'cwd').mkdir(parents=True)
    python = odd / 'fake python'  # prints its arguments: the job itself costs nothing
    python.write_text('#!/bin/bash\nprintf "arg<%s>\\n" "$@"\npwd\n')
    python.chmod(0o755)
    sweep_dir = odd / 'sweep'
    args = ['-m', 'resnet_jax.sweep', f'--config={config}', f'--sweep_dir={sweep_dir}', '--launcher=slurm',
            '--slurm_wait', '--slurm_poll_seconds=1', '--slurm_time=5', f'--slurm_python={python}']
    with open(tmp_path / 'launch.log', 'wb') as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=odd / 'cwd', env=job_env(cluster), stdout=out,
                                stderr=subprocess.STDOUT)
    out = finish(proc, tmp_path / 'launch.log', cluster)
    job = re.search(r'submitted job array (\d+)', out).group(1)
    assert f'job {job} ended: 3 of 3 tasks completed' in out, out + cluster.logs()
    _, runs = sweep_lib.load(str(sweep_dir))
    for i, run in enumerate(runs):
        log = (sweep_dir / 'slurm' / f'{job}_{i}.out').read_text()
        assert f'arg<--workdir={run.workdir}>\n' in log and f'\n{odd / "cwd"}\n' in log, log


@pytest.mark.system
def test_a_population_runs_as_one_array_task(cluster, tmp_path):
    """`--population=3` groups the 3 runs (they differ in seed and lr only) into one population: one array
    task, whose training is `python -m resnet_jax.train --members=<members file>`, the file naming the 3
    member workdirs. The interpreter is a script that prints its arguments, so the job itself costs nothing."""
    config = tmp_path / 'tiny_sweep.py'
    config.write_text(SWEEP_FILE.format(quickstart=str(ROOT / 'experiments' / 'quickstart.py')))
    python = tmp_path / 'fake_python'
    python.write_text('#!/bin/bash\nprintf "arg<%s>\\n" "$@"\n')
    python.chmod(0o755)
    sweep_dir = tmp_path / 'sweep'
    args = ['-m', 'resnet_jax.sweep', f'--config={config}', f'--sweep_dir={sweep_dir}', '--launcher=slurm',
            '--population=3', '--slurm_wait', '--slurm_poll_seconds=1', '--slurm_time=5', f'--slurm_python={python}']
    out = finish(launcher(cluster, args, tmp_path / 'launch.log'), tmp_path / 'launch.log', cluster)
    assert re.search(r'submitted job array (\d+): 1 runs', out), out
    job = re.search(r'submitted job array (\d+)', out).group(1)
    assert f'job {job} ended: 1 of 1 tasks completed' in out, out + cluster.logs()
    members = sweep_dir / 'populations' / 'pop-0' / 'members.json'
    assert '#SBATCH --array=0-0\n' in (sweep_dir / 'slurm' / 'array-0.sbatch').read_text()
    assert (sweep_dir / 'slurm' / 'array-0.runs').read_text() == f'-m resnet_jax.train --members={members}\n'
    log = (sweep_dir / 'slurm' / f'{job}_0.out').read_text()
    assert f'arg<-m>\narg<resnet_jax.train>\narg<--members={members}>\n' in log, log
    _, runs = sweep_lib.load(str(sweep_dir))
    assert [m['workdir'] for m in json.loads(members.read_text())['members']] == [f'../../{r.name}' for r in runs]


@pytest.mark.system
@pytest.mark.multiprocess
def test_one_training_as_two_slurm_tasks_equals_one_process_with_two_devices(cluster, processes, tmp_path):
    two_tasks, reference = tmp_path / 'two_tasks', tmp_path / 'one_process'
    single = processes.start('reference', [*TINY, *SHORT, f'--workdir={reference}', '--nodistributed'], devices=2)
    args = ['-m', 'resnet_jax.launch.slurm', *TINY, *SHORT, f'--workdir={two_tasks}', '--tasks_per_node=2',
            '--slurm_cpus_per_task=1', '--slurm_wait', '--slurm_poll_seconds=1']
    out = finish(launcher(cluster, args, tmp_path / 'launch.log'), tmp_path / 'launch.log', cluster)
    assert processes.wait(single, TIMEOUT) == 0, processes.output(single)[-3000:]
    job = re.search(r'submitted job (\d+): 1 node\(s\) x 2 task\(s\)', out).group(1)
    log = (two_tasks / 'slurm' / f'{job}.out').read_text()
    assert f'job {job} ended: 1 of 1 tasks completed' in out, out + log[-3000:]

    # srun --label: both tasks joined one run of 2 processes; only task 0 printed progress.
    for task in (0, 1):
        assert re.search(rf'^{task}: .*joining an auto-detected multi-process run', log, re.M), log[-3000:]
    assert re.search(r'^0: step 2/6', log, re.M) and not re.search(r'^1: step 2/6', log, re.M)

    a, b = read_numpy(str(reference / 'checkpoints' / str(STEPS))), read_numpy(str(two_tasks / 'checkpoints' / str(STEPS)))
    assert int(a['step']) == int(b['step']) == STEPS
    # As in test_multihost: the same global batch split over 2 devices, only the all-reduce differs
    # (in-process vs gloo between the two SLURM tasks), so rounding-level differences at most.
    for collection in ('params', 'batch_stats', 'opt_state'):
        flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a[collection]), jax.tree_util.tree_leaves(b[collection])
        assert len(flat_a) == len(flat_b) > 0
        for (path, x), y in zip(flat_a, flat_b):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=f'{collection}{jax.tree_util.keystr(path)}')
    lines = read_lines(two_tasks)
    assert len(set(lines)) == len(lines), 'duplicate metric lines: more than one task wrote'
    assert [json.loads(x)['step'] for x in lines] == [json.loads(x)['step'] for x in read_lines(reference)]


@pytest.mark.system
def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(cluster, tmp_path):
    workdir, steps = tmp_path / 'run', 150
    args = ['-m', 'resnet_jax.launch.slurm', *TINY, f'--config.num_steps={steps}', f'--config.eval.every_steps={steps}',
            f'--config.checkpoint.every_steps={steps}', f'--workdir={workdir}', '--tasks_per_node=1',
            '--slurm_cpus_per_task=1', '--slurm_wait', '--slurm_poll_seconds=1']
    proc = launcher(cluster, args, tmp_path / 'launch.log')
    deadline = time.monotonic() + TIMEOUT
    while not run_starts(workdir) or not any('train/loss' in line for line in read_lines(workdir)):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / 'launch.log').read_text()
        time.sleep(0.1)
    job = re.search(r'submitted job (\d+)', (tmp_path / 'launch.log').read_text()).group(1)
    cluster.run('scancel', '--signal=TERM', job)  # the job steps (the training), as --signal=TERM@s does

    # The script requeued the job; SLURM holds a requeued job back (BeginTime, ~2 minutes): let it go now.
    while 'Restarts=1' not in cluster.run('scontrol', 'show', 'job', '-o', job):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / 'launch.log').read_text()
        time.sleep(0.2)
    while 'attempt 2' not in (workdir / 'slurm' / f'{job}.out').read_text():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / 'launch.log').read_text()
        if 'Reason=BeginTime' in cluster.run('scontrol', 'show', 'job', '-o', job):
            cluster.run('scontrol', 'update', f'JobId={job}', 'StartTime=now')
        time.sleep(0.2)
    out = finish(proc, tmp_path / 'launch.log', cluster)
    log = (workdir / 'slurm' / f'{job}.out').read_text()
    assert f'job {job} ended: 1 of 1 tasks completed' in out, out + log[-3000:]

    starts = run_starts(workdir)
    assert len(starts) == 2 and starts[0] == 0 and 0 < starts[1] < steps, starts
    assert re.search(rf'stopped by SIGTERM after step {starts[1]}; its checkpoint is complete', log), log[-3000:]
    assert 'training exited with 75' in log and f'pre-empted after saving; requeueing {job}' in log
    assert f'job {job}, attempt 2: ' in log, log[-3000:]
    assert json.loads((workdir / DONE_FILE).read_text())['step'] == steps
    assert saved_steps(workdir)[-1] == steps
    assert [r['step'] for r in map(json.loads, read_lines(workdir)) if 'eval/top1' in r] == [steps]


FAKE_TRAINING = """#!/bin/bash
# Stands in for the interpreter: runs until SIGTERM, then exits 75 as a pre-empted training does.
trap 'exit 75' TERM
echo "fake training started"
while :; do sleep 0.1; done
"""


@pytest.mark.system
def test_a_signalled_array_task_requeues_itself_only(cluster, tmp_path, monkeypatch, capsys):
    """The array's own job id is also one task's id: requeueing it would requeue (and kill) every task.
    The script requeues `<array>_<task>`; the other task must run on untouched. A cancelled task is not
    requeued. No JAX here: the interpreter is a script that exits 75 on SIGTERM, as the training does
    (test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint covers the training)."""
    from resnet_jax.launch import slurm

    fake = tmp_path / 'fake_python'
    fake.write_text(FAKE_TRAINING)
    fake.chmod(0o755)
    monkeypatch.setenv('SLURM_CONF', str(cluster.conf))
    runs = [sweep_lib.RunSpec(f'r{i}', 'unused.py', str(tmp_path / f'r{i}'), {}) for i in range(2)]
    assert slurm.launch(runs, str(tmp_path), options(slurm_python=str(fake), slurm_cpus_per_task=1)) == 0
    array = re.search(r'submitted job array (\d+): 2 runs', capsys.readouterr().out).group(1)

    def tasks() -> dict:
        lines = cluster.run('scontrol', 'show', 'job', '-o', array).splitlines()
        return {re.search(r'ArrayTaskId=(\S+)', x).group(1): (re.search(r'JobState=(\S+)', x).group(1),
                                                               re.search(r'Restarts=(\d+)', x).group(1)) for x in lines}

    logs = [tmp_path / 'slurm' / f'{array}_{i}.out' for i in range(2)]
    deadline = time.monotonic() + 60
    while not all(log.exists() and 'fake training started' in log.read_text() for log in logs):  # srun started
        assert time.monotonic() < deadline, tasks()
        time.sleep(0.2)
    assert tasks() == {'0': ('RUNNING', '0'), '1': ('RUNNING', '0')}
    cluster.run('scancel', '--signal=TERM', f'{array}_1')
    while tasks()['1'][1] != '1':
        assert time.monotonic() < deadline, tasks()
        time.sleep(0.2)
    assert tasks()['0'] == ('RUNNING', '0'), tasks()
    assert f'pre-empted after saving; requeueing {array}_1' in logs[1].read_text()

    # A plain scancel also sends SIGTERM to the training (which exits 75), and to the batch shell:
    # the job is cancelled, not requeued.
    cluster.run('scancel', f'{array}_0')
    while tasks()['0'][0] != 'CANCELLED':
        assert time.monotonic() < deadline and tasks()['0'][1] == '0', tasks()
        time.sleep(0.2)
    assert 'the job is cancelled' in logs[0].read_text() and 'requeueing' not in logs[0].read_text()
    cluster.run('scancel', array)


def options(**flags):
    """Launcher options as `resnet_jax.sweep` hands them over: every --slurm_* flag, None unless given."""
    from resnet_jax.launch import slurm

    values = {f'slurm_{key}': None for key in slurm.RESOURCE_FLAGS} | {'slurm_profile': None, 'dry_run': False}
    return argparse.Namespace(**(values | flags))


def test_profile_keys_are_checked_and_flags_win_over_them(tmp_path):
    from resnet_jax.launch import slurm

    example = slurm.read_profile(str(ROOT / 'launch' / 'profiles' / 'example.toml'))  # the README's example is valid
    assert set(example) == set(slurm.RESOURCE_FLAGS)
    profile = tmp_path / 'cluster.toml'
    profile.write_text('partition = "gpu"\ntime = "4:00:00"\ncpus_per_task = 8\nsbatch_args = ["--constraint=a100"]\n')
    res = slurm.resources(options(slurm_profile=str(profile), slurm_partition='debug', slurm_max_parallel=2))
    assert res == {'partition': 'debug', 'time': '4:00:00', 'cpus_per_task': 8, 'sbatch_args': ['--constraint=a100'],
                   'max_parallel': 2, 'signal_seconds': 120, 'python': sys.executable}
    script = slurm.sweep_script(3, '/s/slurm/array-0.runs', '/s', res)
    for line in ('--array=0-2%2', '--requeue', '--signal=TERM@120', '--partition=debug', '--time=4:00:00',
                 '--cpus-per-task=8', '--constraint=a100', '--open-mode=append', '--output=/s/slurm/%A_%a.out'):
        assert f'#SBATCH {line}\n' in script
    assert 'JOB="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in script and 'scontrol requeue "$JOB"' in script

    for text, message in [('gpus = 1', "unknown key 'gpus'; the allowed keys are partition, account"),
                          ('cpus_per_task = "8"', "cpus_per_task = '8' should be an integer"),
                          ('sbatch_args = "--exclusive"', 'should be a list of strings'),
                          ('time = "4 hours"', "slurm_time='4 hours' is not a SLURM time limit"),
                          ('time = "2"\nsignal_seconds = 120', 'slurm_signal_seconds=120 leaves no training time'),
                          ('mem = "lots"', "slurm_mem='lots'")]:
        profile.write_text(text + '\n')
        with pytest.raises(slurm.LaunchError, match=re.escape(message)):
            slurm.resources(options(slurm_profile=str(profile)))
    assert slurm.time_limit_seconds('1-02:03:04') == 93784 and slurm.time_limit_seconds('90') == 5400
    assert slurm.time_limit_seconds('5:30') == 330 and slurm.time_limit_seconds('2-3') == 183600
