"""python -m resnet_jax.train --config=experiments/quickstart.py --workdir=/tmp/run [--config.a.b=v]
python -m resnet_jax.train --members=FILE.json   (a population: train.population_loop)

Exit codes (resnet_jax.workdir): 0 done; 2 a bad flag or config value (printed as 'error: ...', nothing
started); 1 a workdir or checkpoint that cannot continue (printed as 'error: ...') or a crash; 3 a
NaN/Inf loss or gradient with config.optim.nonfinite='stop'; 73 the workdir is in use by another training;
75 stopped by SIGTERM, SIGUSR1 or Ctrl-C, after saving anything new (run the same command again);
130 a second Ctrl-C (stopped at once).

The terminal shows progress, evaluation results and warnings; the INFO logging of Orbax, absl and
JAX goes to <workdir>/library.log unless --verbosity (-v) is given.
"""

# Stop signals are caught from the first instruction: one arriving while the libraries load, the
# data is read, a checkpoint is restored or the step compiles ends the run with exit 75.
from resnet_jax import workdir as workdir_lib  # noqa: I001 (first, and cheap: no JAX)

workdir_lib.SIGNALS.install(exit_at_once=True)

from resnet_jax import allocator  # noqa: E402 (before JAX starts its threads)

allocator.keep_freed_memory()

import errno  # noqa: E402
import logging as py_logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from resnet_jax import distributed  # noqa: E402
from resnet_jax.checkpoint import CheckpointError  # noqa: E402
from resnet_jax.train.cadence import NonFiniteError, Preempted  # noqa: E402
from resnet_jax.train.loop import train_and_evaluate  # noqa: E402
from resnet_jax.train.population_loop import read_members, train_population  # noqa: E402

CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file, e.g. experiments/cifar10.py:resnet56')
WORKDIR = flags.DEFINE_string('workdir', None, 'where the run keeps its config, metrics, checkpoints and plots')
RESTART = flags.DEFINE_bool('restart_from_scratch', False, 'when every checkpoint in the workdir is damaged, set '
                            'them aside (renamed, not deleted) and train from step 0; without it that is an error')
MEMBERS = flags.DEFINE_string('members', None, 'instead of --config and --workdir: a JSON file {"members": [{"name", '
                              '"workdir", "config"}, ...]} of runs trained together as one population, each in its '
                              'own workdir (relative to the file)')
for _name in ('config', 'workdir'):  # required unless --members is given
    flags.register_validator(_name, lambda value: value is not None or MEMBERS.value is not None,
                             message=f'Flag --{_name} must have a value other than None.')


def main(argv):
    """Train, turning each way a run can stop into its exit code (module docstring)."""
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    workdir_lib.SIGNALS.unwinding()  # workdirs and files are opened from here on
    if MEMBERS.value is not None and (flags.FLAGS['config'].present or WORKDIR.value is not None):
        raise app.UsageError('--members=FILE.json holds each member\'s config and workdir: give it without '
                             '--config, --config.* and --workdir')
    where = WORKDIR.value if MEMBERS.value is None else os.path.dirname(os.path.abspath(MEMBERS.value))
    workdir_lib.quiet_terminal(where)
    distributed.initialize_from_flags()
    if jax.process_count() > 1:  # a stop must reach every process: SIGTERM through JAX's notifier only
        workdir_lib.SIGNALS.release(signal.SIGUSR1)
        workdir_lib.SIGNALS.release(signal.SIGINT)
    try:
        if MEMBERS.value is None:
            train_and_evaluate(CONFIG.value, WORKDIR.value, restart_from_scratch=RESTART.value)
        else:
            names, workdirs, configs = read_members(MEMBERS.value)
            train_population(configs, workdirs, restart_from_scratch=RESTART.value, names=names)
    except workdir_lib.Stopped as e:
        print(f'stopped by {e.signal_name} before training had anything new to save; run the same command '
              'again to continue', file=sys.stderr, flush=True)
        # The lock and files are closed; the interrupted library work (a compilation, a restore) may
        # still have threads that crash the interpreter's shutdown, so skip it.
        py_logging.shutdown()
        sys.stdout.flush()
        os._exit(workdir_lib.PREEMPTED_EXIT_CODE)
    except workdir_lib.WorkdirBusy as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(workdir_lib.BUSY_EXIT_CODE)
    except (workdir_lib.WorkdirError, CheckpointError) as e:  # the run cannot continue as it is
        sys.exit(f'error: {e}')
    except Preempted as e:
        logging.warning('%s', e)
        sys.exit(workdir_lib.PREEMPTED_EXIT_CODE)
    except NonFiniteError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(workdir_lib.NONFINITE_EXIT_CODE)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        logging.error('A collective failed, most likely because another process of this run died or '
                      'was killed; stopping this one too. The error was: %s', e)
        # JAX's exit handler would wait out the heartbeat timeout for the dead peer first.
        os._exit(1)
    except Exception as e:  # a full disk reaches us through TensorBoard, Orbax (as another type) or a write
        if getattr(e, 'errno', None) not in (errno.ENOSPC, errno.EDQUOT) and 'No space left' not in str(e):
            raise
        line = (str(e).splitlines() or [type(e).__name__])[0][:200]
        sys.exit(f'error: no space left on the disk of {where} ({line}). A checkpoint being written is '
                 'incomplete and will be ignored: free some space and run the same command again to continue '
                 'from the newest complete one')


if __name__ == '__main__':
    try:
        from resnet_jax import cli

        cli.run(main, config_flag='config')
    except KeyboardInterrupt:
        print('aborted by a second Ctrl-C: nothing more was saved', file=sys.stderr, flush=True)
        sys.exit(workdir_lib.ABORTED_EXIT_CODE)
