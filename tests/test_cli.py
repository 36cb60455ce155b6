"""Every command, given bad input as a new user would type it: one 'error: ...' line, no traceback,
exit code 2 (resnet_jax.cli); --debug shows the traceback; --help lists the command's own flags.

The commands run as real subprocesses, all at once (a few seconds each, spent before any JAX work).
"""

import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # 21 commands as subprocesses, each importing JAX

ROOT = Path(__file__).parents[1]
QUICKSTART = 'experiments/quickstart.py'
TYPO = "error: --config.optim.lrr: config.optim has no field 'lrr'. Did you mean: lr?"
NO_ARG = ("error: experiments/quickstart.py: get_config() takes no argument, and 'experiments/quickstart.py:resnet56' "
          'gives it \'resnet56\'; use --config=experiments/quickstart.py')
NO_MODEL = "error: unknown model 'resnet5O'. Did you mean: resnet56, resnet50, resnet152, resnet50_d, resnet50_c?"

# (name, command arguments, the first 'error:' line exactly; '{tmp}' is a fresh temporary directory)
CASES = [
    ('train_typo', ['resnet_jax.train', f'--config={QUICKSTART}', '--workdir={tmp}/run', '--config.optim.lrr=0.1'],
     TYPO),
    ('train_arg', ['resnet_jax.train', f'--config={QUICKSTART}:resnet56', '--workdir={tmp}/run'], NO_ARG),
    ('train_no_workdir', ['resnet_jax.train', f'--config={QUICKSTART}'],
     'error: flag --workdir=None: Flag --workdir must have a value other than None.'),
    ('train_no_file', ['resnet_jax.train', '--config=experiments/quickstrat.py', '--workdir={tmp}/run'],
     'error: config file experiments/quickstrat.py does not exist'),
    ('evaluate', ['resnet_jax.evaluate', '--workdir={tmp}/nothing'],
     'error: {tmp}/nothing: no such directory (the workdir of a resnet_jax.train run)'),
    ('export', ['resnet_jax.export', '--workdir={tmp}/nothing', '--out={tmp}/no/model.msgpack'],
     'error: --out={tmp}/no/model.msgpack: its directory {tmp}/no does not exist'),
    ('sweep', ['resnet_jax.sweep', f'--config={QUICKSTART}', '--sweep_dir={tmp}/sweep', '--dry_run',
               '--config.optim.lrr=0.1'], TYPO.replace('error: ', 'error: run skip=identity,seed=0: ')),
    ('sweep_args', ['resnet_jax.sweep', f'--config={QUICKSTART}', '--sweep_dir={tmp}/sweep', 'extra'],
     "error: unexpected arguments: ['extra']"),
    ('results', ['resnet_jax.sweep.results', '{tmp}/nothing'],
     'error: {tmp}/nothing has no sweep.json: is it a sweep directory made by python -m resnet_jax.sweep?'),
    ('results_metric', ['resnet_jax.sweep.results', '{tmp}/nothing', '--metric='],
     'error: --metric: name at least one metrics.jsonl key, e.g. --metric=eval/top1'),
    ('analyze', ['resnet_jax.analyze', 'paths', f'--config={QUICKSTART}', '--out={tmp}/a', '--config.optim.lrr=1'],
     TYPO),
    ('bench', ['resnet_jax.bench', '--model=resnet5O'], NO_MODEL.replace('error: ', 'error: --model: ') +
     ' Run python -m resnet_jax.models for the list.'),
    ('throughput', ['resnet_jax.bench.throughput', f'--config={QUICKSTART}:resnet56'], NO_ARG),
    ('slurm', ['resnet_jax.launch.slurm', f'--config={QUICKSTART}:resnet56', '--workdir={tmp}/run', '--dry_run'],
     NO_ARG),
    ('tpu', ['resnet_jax.launch.tpu', '--tpu_name=a', '--tpu_zone=b', '--dry_run'],
     'error: give one command, one of create, run, copy_logs, delete; got none'),
    ('summary', ['resnet_jax.models', 'resnet5O'],
     NO_MODEL + ' Run python -m resnet_jax.models for the list.'),
]
DEBUG = ['resnet_jax.train', f'--config={QUICKSTART}', '--workdir={tmp}/run', '--config.optim.lrr=0.1', '--debug']
HELP = {'sweep': ['--sweep_dir', '--launcher', '--only', '--local_parallel', '--debug'],
        'train': ['--config', '--workdir', '--coordinator_address', '--debug'],
        'launch.slurm': ['--slurm_time', '--nodes', '--workdir']}


def _run(args, tmp, env=None):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, '-m', *(a.format(tmp=tmp) for a in args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def outputs(tmp_path_factory):
    """{name: CompletedProcess} of every case, the debug runs and the --help listings, run 3 at a time."""
    tmp = tmp_path_factory.mktemp('cli')
    jobs = {name: (args, None) for name, args, _ in CASES}
    jobs.update({'debug': (DEBUG, None), 'debug_env': (['resnet_jax.models', 'resnet5O'],
                                                        {'RESNET_JAX_DEBUG': '1'})})
    jobs.update({f'help_{c}': ([f'resnet_jax.{c}', '--help'], None) for c in HELP})
    with futures.ThreadPoolExecutor(3) as pool:
        done = {name: pool.submit(_run, args, tmp, env) for name, (args, env) in jobs.items()}
        return tmp, {name: job.result() for name, job in done.items()}


@pytest.mark.parametrize('name,first_line', [(name, line) for name, _, line in CASES], ids=[c[0] for c in CASES])
def test_a_user_error_is_one_line_and_exit_code_2(outputs, name, first_line):
    tmp, results = outputs
    out = results[name]
    errors = [line for line in out.stderr.splitlines() if line.startswith('error: ')]
    assert errors and errors[0] == first_line.format(tmp=tmp), out.stderr[-3000:]
    assert 'Traceback' not in out.stderr and out.returncode == 2, out.stderr[-3000:]


def test_debug_shows_the_traceback(outputs):
    _, results = outputs
    for name in ('debug', 'debug_env'):
        assert 'Traceback' in results[name].stderr and results[name].returncode != 0, results[name].stderr[-3000:]
    assert "config.optim has no field 'lrr'" in results['debug'].stderr


@pytest.mark.parametrize('command', list(HELP))
def test_help_lists_the_commands_own_flags(outputs, command):
    _, results = outputs
    listing = results[f'help_{command}'].stdout
    assert all(f'  {flag}' in listing or f'  --[no]{flag[2:]}' in listing for flag in HELP[command]), listing
