"""python -m resnet_jax.train --config=experiments/quickstart.py --workdir=/tmp/run [--config.a.b=v]

Exit codes: 0 done; 1 a bad config or an error; 3 a NaN/Inf loss or gradient with
config.nonfinite='stop'; 75 stopped by SIGTERM/SIGUSR1 after saving (run the same command again).
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import distributed
from resnet_jax.train.config import ConfigError
from resnet_jax.train.loop import (NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE, NonFiniteError, Preempted,
                                   train_and_evaluate)

CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file, e.g. experiments/cifar10.py:resnet56')
WORKDIR = flags.DEFINE_string('workdir', None, 'where the run keeps its config, metrics, checkpoints and plots')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    distributed.initialize_from_flags()
    try:
        train_and_evaluate(CONFIG.value, WORKDIR.value)
    except ConfigError as e:
        sys.exit(f'error: {e}')
    except Preempted as e:
        logging.warning('%s', e)
        sys.exit(PREEMPTED_EXIT_CODE)
    except NonFiniteError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(NONFINITE_EXIT_CODE)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        logging.error('A collective failed, most likely because another process of this run died or '
                      'was killed; stopping this one too. The error was: %s', e)
        # JAX's exit handler would wait out the heartbeat timeout for the dead peer first.
        os._exit(1)


if __name__ == '__main__':
    from resnet_jax import cli

    cli.run(main, config_flag='config')
