"""The TPU-VM launcher's gcloud command lines (--dry_run) and its errors on bad input."""

import shlex
import subprocess
import sys

import pytest
from test_multihost import ROOT

WHERE = ['--tpu_name=r50', '--tpu_zone=us-central2-b', '--tpu_project=my-proj']
REMOTE = ('cd resnet_jax && python3 -m resnet_jax.train --config=experiments/cifar10.py:resnet20 '
          "'--config.model.stage_sizes=(1, 1, 1)' '--workdir=/mnt/shared/r50 #2' --distributed")
EXPECTED = {
    'create': ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'r50', '--zone=us-central2-b', '--project=my-proj',
               '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base', '--spot'],
    'run': ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'r50', '--zone=us-central2-b', '--project=my-proj',
            '--worker=all', f'--command={REMOTE}'],
    'copy_logs': ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '--recurse', 'r50:/mnt/shared/r50/config.json',
                  'r50:/mnt/shared/r50/metrics.jsonl', 'r50:/mnt/shared/r50/tensorboard', 'logs/r50',
                  '--zone=us-central2-b', '--project=my-proj', '--worker=0'],
    'delete': ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'r50', '--zone=us-central2-b', '--project=my-proj',
               '--quiet'],
}


def tpu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'resnet_jax.launch.tpu', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize('command', list(EXPECTED))
def test_dry_run_prints_the_exact_gcloud_command(command):
    extra = {'create': ['--tpu_accelerator_type=v4-32', '--tpu_version=tpu-ubuntu2204-base', '--tpu_spot'],
             # an absolute config path inside the checkout is passed relative to the VM's checkout
             'run': [f'--config={ROOT}/experiments/cifar10.py:resnet20', '--config.model.stage_sizes=(1, 1, 1)',
                     '--workdir=/mnt/shared/r50 #2'],  # a path with a space and a '#' stays one argument
             'copy_logs': ['--workdir=/mnt/shared/r50/', '--tpu_local_dir=logs'],
             'delete': []}[command]
    out = tpu(command, *WHERE, *extra, '--dry_run')
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [shlex.join(EXPECTED[command])]
    assert shlex.split(out.stdout) == EXPECTED[command]


@pytest.mark.parametrize('args, message', [
    (['create', '--tpu_name=r50', '--tpu_accelerator_type=v4-8', '--tpu_version=v'], '--tpu_zone is required'),
    (['launch', *WHERE], 'give one command, one of create, run, copy_logs, delete; got launch'),
    (['create', *WHERE, '--tpu_accelerator_type=v4', '--tpu_version=v'],
     "--tpu_accelerator_type='v4' is not a TPU type"),
    (['create', *WHERE, '--tpu_accelerator_type=v4-8'], '--tpu_version is required for create'),
    (['run', *WHERE, '--config=experiments/quickstart.py', '--config.model.name=resnet7', '--workdir=w'],
     "config.model.name: unknown model 'resnet7'"),
])
def test_bad_input_is_refused_with_a_clear_error(args, message):
    out = tpu(*args, '--dry_run')
    assert out.returncode == 2 and 'gcloud' not in out.stdout
    assert message in out.stderr, out.stderr


def test_a_sweep_on_the_tpu_vm_runs_one_after_another(tmp_path):
    sweep = tmp_path / 'sweep.py'
    sweep.write_text(f'from resnet_jax.train.config import from_file\n\n\n'
                     f'def get_config(arg=None):\n    return from_file({str(ROOT / "experiments" / "quickstart.py")!r})\n\n\n'
                     "def get_sweep(arg=None):\n    return [{'seed': 0}, {'seed': 1}]\n")
    out = subprocess.run([sys.executable, '-m', 'resnet_jax.sweep', f'--config={sweep}', '--sweep_dir=/mnt/shared/s',
                          '--launcher=tpu', *WHERE, '--dry_run'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.splitlines() if line.startswith('gcloud')]
    assert [line[:9] for line in lines] == [EXPECTED['run'][:9]] * 2
    for seed, line in enumerate(lines):
        assert line[9] == (f'--command=cd resnet_jax && python3 -m resnet_jax.train --config={sweep} '
                           f'--workdir=/mnt/shared/s/seed={seed} --config.seed={seed} --distributed')


def test_a_population_on_the_tpu_vm_is_one_training(tmp_path):
    """Two seeds with --population=2: one population, started on the VM as one training that reads its
    members file (a path on the shared mount, as the sweep directory is)."""
    sweep = tmp_path / 'sweep.py'
    sweep.write_text(f'from resnet_jax.train.config import from_file\n\n\n'
                     f'def get_config(arg=None):\n    return from_file({str(ROOT / "experiments" / "quickstart.py")!r})\n\n\n'
                     "def get_sweep(arg=None):\n    return [{'seed': 0}, {'seed': 1}]\n")
    out = subprocess.run([sys.executable, '-m', 'resnet_jax.sweep', f'--config={sweep}', '--sweep_dir=/mnt/shared/s',
                          '--launcher=tpu', '--population=2', *WHERE, '--dry_run'], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert '1 population of at most 2 members:\n  pop-0  new: seed=0, seed=1\n' in out.stdout
    lines = [shlex.split(line) for line in out.stdout.splitlines() if line.startswith('gcloud')]
    assert lines == [EXPECTED['run'][:9] + ['--command=cd resnet_jax && python3 -m resnet_jax.train '
                                            '--members=/mnt/shared/s/populations/pop-0/members.json --distributed']]
