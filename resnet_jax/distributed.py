"""Joining a multi-process run: one program on every host, `jax.distributed` underneath.

Explicit flags (coordinator address, process count and id) win; otherwise a SLURM step
with several tasks is detected and JAX reads SLURM's environment itself; `--distributed`
forces auto-detection elsewhere (TPU pods, Kubernetes). Timeouts are bounded so that an
unreachable coordinator or a dead peer ends every process with an error instead of a hang.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import flags

COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for explicit multi-process runs')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes in an explicit multi-process run')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process index in an explicit multi-process run')
DISTRIBUTED = flags.DEFINE_boolean('distributed', None, 'force (or, with --nodistributed, forbid) '
                                   'jax.distributed auto-detection; default: on under multi-task SLURM')
INIT_TIMEOUT = flags.DEFINE_integer('distributed_timeout', 300, 'seconds to wait for every process to join')
HEARTBEAT_TIMEOUT = flags.DEFINE_integer('heartbeat_timeout', 100, 'seconds without a heartbeat before a '
                                         'process is declared dead and the run stops')


def slurm_multi_task() -> bool:
    """Whether this process is one task of several in a SLURM step, where JAX joins the run itself."""
    return int(os.environ.get('SLURM_STEP_NUM_TASKS', os.environ.get('SLURM_NTASKS', '1'))) > 1


def initialize_from_flags() -> None:
    """Call jax.distributed.initialize when the flags or the environment say the run spans processes."""
    timeouts = dict(initialization_timeout=INIT_TIMEOUT.value, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT.value)
    if COORDINATOR.value:
        if NUM_PROCESSES.value is None or PROCESS_ID.value is None:
            raise ValueError('--coordinator_address needs --num_processes and --process_id')
        # Said before initialize: when the coordinator cannot be reached or a peer dies, JAX ends
        # the process from C++ (SIGABRT, 'DEADLINE_EXCEEDED ... RegisterTask' or 'heartbeat
        # timeout'), and this line says which run, address and limits that was about: on the terminal,
        # which shows no INFO logging.
        print(f'process {PROCESS_ID.value} of {NUM_PROCESSES.value}: joining the run coordinated at '
              f'{COORDINATOR.value} (waiting at most {INIT_TIMEOUT.value} s for every process; a process '
              f'silent for {HEARTBEAT_TIMEOUT.value} s stops the run)', file=sys.stderr, flush=True)
        jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value, **timeouts)
    elif DISTRIBUTED.value or (DISTRIBUTED.value is None and slurm_multi_task()):
        print(f'joining an auto-detected multi-process run (waiting at most {INIT_TIMEOUT.value} s for every '
              f'process; a process silent for {HEARTBEAT_TIMEOUT.value} s stops the run)', file=sys.stderr, flush=True)
        jax.distributed.initialize(**timeouts)
