"""What the launch commands share: `LaunchError` (a user error, printed as one line by
`resnet_jax.cli.run`) for the sweep and every launcher, and the single-training flags of the SLURM
and TPU-VM launchers (`--config` with `--config.*` overrides, `--workdir`, `--dry_run`) and how they
pass them on."""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from resnet_jax.errors import ConfigError, UserError
from resnet_jax.train import config as config_lib


class LaunchError(UserError, ValueError):
    """Launcher options that cannot work; the message names the flag or key and what is allowed."""


def define_training_flags() -> None:
    """--config (parsed and type-checked here, as resnet_jax.train will), --workdir and --dry_run."""
    config_flags.DEFINE_config_file('config', None, 'experiment config file, e.g. experiments/cifar10.py:resnet56')
    flags.DEFINE_string('workdir', None, 'the run directory, a path that every process of the run can reach')
    flags.DEFINE_bool('dry_run', False, 'print what would be written and run; do nothing')


def config_args(argv: list[str]) -> list[str]:
    """The --config and --config.* arguments of `argv` exactly as given, to pass on to resnet_jax.train."""
    args = [a for a in argv[1:] if a == '--config' or a.startswith(('--config=', '--config.'))]
    for a in args:
        if '=' not in a:
            raise LaunchError(f'{a}: write it with "=" (--config=file.py, --config.a.b=value) so that it is passed '
                              'on to the training unchanged')
    return args


def validate(config, num_devices: int | None = None) -> None:
    """The project's config checks, on `num_devices` or the fewest devices the config's mesh accepts."""
    if num_devices is None:
        num_devices = max(config.mesh.fsdp, 1) * max(config.mesh.data, 1)
    try:
        config_lib.validate(config, num_devices)
    except ConfigError as e:
        raise LaunchError(str(e)) from None
