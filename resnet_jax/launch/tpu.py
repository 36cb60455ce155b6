"""The TPU-VM launcher: create a Cloud TPU VM, run a training on all its workers, copy the logs back, delete it.

    python -m resnet_jax.launch.tpu create --tpu_name=r50 --tpu_zone=us-central2-b \\
        --tpu_accelerator_type=v4-32 --tpu_version=tpu-ubuntu2204-base [--tpu_project=P] [--tpu_spot]
    python -m resnet_jax.launch.tpu run --tpu_name=r50 --tpu_zone=us-central2-b \\
        --config=experiments/imagenet.py:resnet50 --workdir=/mnt/shared/r50 [--config.a.b=v ...]
    python -m resnet_jax.launch.tpu copy_logs --tpu_name=r50 --tpu_zone=us-central2-b --workdir=/mnt/shared/r50
    python -m resnet_jax.launch.tpu delete --tpu_name=r50 --tpu_zone=us-central2-b

Each step is one `gcloud compute tpus tpu-vm` command, printed before it runs and only printed
with --dry_run. `run` starts the same training on every worker (`ssh --worker=all`) with
`--distributed`, so that each host joins `jax.distributed` from the TPU pod's own metadata; it
runs from `--tpu_repo_dir` on the VM (a checkout with `pip install -e '.[tpu]'` done), and
config files inside this checkout are passed relative to it. The workdir must be a path every
worker reaches (a shared mount) since every process writes its checkpoint shards there.
`python -m resnet_jax.sweep --launcher=tpu` runs a sweep's runs one after another on the VM.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from absl import flags

from resnet_jax import cli
from resnet_jax import workdir as workdir_lib
from resnet_jax.launch.command import (
    LaunchError,
    config_args,
    define_training_flags,
    validate,
)

# Where the TPU VM is.
flags.DEFINE_string('tpu_name', None, 'the TPU VM (node) name')
flags.DEFINE_string('tpu_zone', None, 'its zone, e.g. us-central2-b')
flags.DEFINE_string('tpu_project', None, 'Google Cloud project (default: gcloud config)')
# What runs on its workers.
flags.DEFINE_string('tpu_repo_dir', 'resnet_jax', 'the checkout on every worker, relative to the home directory '
                    'or absolute')
flags.DEFINE_string('tpu_python', 'python3', 'the interpreter on the workers')
# The VM that create makes.
flags.DEFINE_string('tpu_accelerator_type', None, 'for create: e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8')
flags.DEFINE_string('tpu_version', None, 'for create: the TPU software version, e.g. tpu-ubuntu2204-base')
flags.DEFINE_bool('tpu_spot', False, 'for create: a Spot VM (cheaper, can be pre-empted)')
# Where copy_logs puts the logs.
flags.DEFINE_string('tpu_local_dir', '.', 'for copy_logs: where the logs go on this machine')

COMMANDS = ('create', 'run', 'copy_logs', 'delete')
ACCELERATOR_FORMAT = re.compile(r'v(\d+)(e|p|litepod|lite)?-(\d+)')
# Written by process 0 from the first logging step.
LOG_FILES = (workdir_lib.CONFIG_FILE, workdir_lib.METRICS_FILE, workdir_lib.TENSORBOARD_DIR)
REPO_ROOT = Path(__file__).resolve().parents[2]


def _where(options) -> list[str]:
    if not getattr(options, 'tpu_name', None):
        raise LaunchError('--tpu_name is required: the TPU VM to use')
    if not getattr(options, 'tpu_zone', None):
        raise LaunchError('--tpu_zone is required, e.g. --tpu_zone=us-central2-b')
    return [f'--zone={options.tpu_zone}'] + ([f'--project={options.tpu_project}'] if options.tpu_project else [])


def create_command(options) -> list[str]:
    """The gcloud command that creates the TPU VM, after checking the accelerator type and version."""
    where = _where(options)
    accelerator = options.tpu_accelerator_type
    if not accelerator or not ACCELERATOR_FORMAT.fullmatch(accelerator):
        raise LaunchError(f'--tpu_accelerator_type={accelerator!r} is not a TPU type: use v<generation>[e|p|litepod]'
                          '-<size>, e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8')
    if not options.tpu_version:
        raise LaunchError('--tpu_version is required for create: the TPU software version, e.g. '
                          'tpu-ubuntu2204-base (list them: gcloud compute tpus tpu-vm versions list --zone=...)')
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', options.tpu_name, *where,
            f'--accelerator-type={accelerator}', f'--version={options.tpu_version}',
            *(['--spot'] if options.tpu_spot else [])]


def remote_args(train_args: list[str]) -> list[str]:
    """Training arguments with config files inside this checkout made relative to it (the run starts in the
    VM's checkout)."""
    def relative(arg: str) -> str:
        name, eq, value = arg.partition('=')
        if name == '--config' and eq and os.path.isabs(value) and Path(value).is_relative_to(REPO_ROOT):
            return f'--config={Path(value).relative_to(REPO_ROOT)}'
        return arg
    return [relative(a) for a in train_args]


def run_command(options, train_args: list[str]) -> list[str]:
    """gcloud ssh on every worker: `cd <repo> && <python> <train_args> --distributed`."""
    where = _where(options)
    remote = f'cd {shlex.quote(options.tpu_repo_dir)} && ' + shlex.join(
        [options.tpu_python, *remote_args(train_args), '--distributed'])
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', options.tpu_name, *where, '--worker=all',
            f'--command={remote}']


def copy_logs_command(options, workdir: str) -> list[str]:
    """scp from worker 0 (process 0 writes the logs) of the run's logs, without its checkpoints."""
    where = _where(options)
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '--recurse',
            *(f'{options.tpu_name}:{workdir.rstrip("/")}/{name}' for name in LOG_FILES), local_logs_dir(options, workdir),
            *where, '--worker=0']


def local_logs_dir(options, workdir: str) -> str:
    """Where copy_logs puts a run's logs here: --tpu_local_dir/<the workdir's last part>."""
    return os.path.join(options.tpu_local_dir, os.path.basename(workdir.rstrip('/')))


def delete_command(options) -> list[str]:
    """The gcloud command that deletes the TPU VM (without asking)."""
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', options.tpu_name, *_where(options), '--quiet']


def execute(command: list[str], dry_run: bool) -> int:
    """Print the command; run it unless `dry_run`; its exit code."""
    print(shlex.join(command), flush=True)
    if dry_run:
        return 0
    try:
        return subprocess.run(command).returncode
    except FileNotFoundError:
        raise LaunchError('gcloud is not on PATH: install the Google Cloud CLI, or pass --dry_run') from None


def launch(runs, sweep_dir: str, options) -> int:
    """Run a sweep's `runs` one after another on all workers of the TPU VM; 1 if any failed."""
    try:
        commands = [(run, run_command(options, run.train_args())) for run in runs]
        failed = []
        for run, command in commands:
            code = execute(command, getattr(options, 'dry_run', False))
            if code:
                failed.append(f'{run.name} (exit {code})')
        if failed:
            print(f'{len(failed)} of {len(runs)} runs failed: {", ".join(failed)}', file=sys.stderr)
        return 1 if failed else 0
    except LaunchError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


def main(argv) -> int:
    """`python -m resnet_jax.launch.tpu <command>`: check the flags the command needs, then run its gcloud
    command (printed only with --dry_run)."""
    options = flags.FLAGS
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise LaunchError(f'give one command, one of {", ".join(COMMANDS)}; got {" ".join(argv[1:]) or "none"}')
    command = argv[1]
    if command in ('run', 'copy_logs') and not options.workdir:
        raise LaunchError(f'{command} needs --workdir: the run directory on the TPU VM workers')
    if command == 'create':
        return execute(create_command(options), options.dry_run)
    if command == 'run':
        if options.config is None:
            raise LaunchError('run needs --config: the experiment config file, e.g. experiments/cifar10.py:resnet56')
        validate(options.config)  # a bad config fails here, not on the TPU VM
        train_args = ['-m', 'resnet_jax.train', *config_args(sys.argv), f'--workdir={options.workdir}']
        return execute(run_command(options, train_args), options.dry_run)
    if command == 'copy_logs':
        if not options.dry_run:
            os.makedirs(local_logs_dir(options, options.workdir), exist_ok=True)
        return execute(copy_logs_command(options, options.workdir), options.dry_run)
    return execute(delete_command(options), options.dry_run)


if __name__ == '__main__':
    define_training_flags()
    cli.run(main, config_flag='config')
