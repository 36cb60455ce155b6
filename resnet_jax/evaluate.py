"""python -m resnet_jax.evaluate --workdir=<run> [--step=N]: evaluate a run's checkpoint.

Rebuilds the run from the config it recorded, restores the newest checkpoint (or --step),
evaluates the whole evaluation split (padded and masked, never truncated) and prints the
metrics as JSON; they are also appended to the run's metrics.jsonl as 'evaluate/*', holding the
workdir's lock (so it is refused at once while a training runs there). On a read-only workdir the
results are printed, with a warning that they could not be recorded.
"""

if __name__ == '__main__':  # the command, not an import of evaluate_workdir: before JAX starts its threads
    from resnet_jax import allocator
    allocator.keep_freed_memory()

import errno  # noqa: E402
import json
import logging
import os
import sys

import jax
from absl import app, flags

from resnet_jax import distributed
from resnet_jax import workdir as workdir_lib
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train.run import restore_workdir


def _lock_for_writing(workdir: str) -> tuple[workdir_lib.Lock | None, str | None]:
    """(The workdir's lock, None), or (None, why its results cannot be recorded) for a read-only
    workdir; WorkdirBusy while another process holds it."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f'{workdir}: no such directory (the workdir of a resnet_jax.train run)')
    if jax.process_index() != 0:
        return None, None
    lock = workdir_lib.Lock(workdir)
    try:
        lock.acquire()
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        return None, f'{workdir} is read-only ({e.strerror})'
    return lock, None


def evaluate_workdir(workdir: str, step: int | None = None) -> dict[str, float]:
    """The evaluation metrics of checkpoint `step` (default: the newest undamaged one), also appended
    to metrics.jsonl where the workdir can be written."""
    lock, unrecordable = _lock_for_writing(workdir)
    try:
        run, restored = restore_workdir(workdir, step)
        results = {k.replace('eval', 'evaluate', 1): v for k, v in run.evaluate(restored.state).items()}
        if unrecordable is None:
            try:
                with metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0) as writer:
                    writer.write(restored.step, results)
            except OSError as e:  # a full disk
                unrecordable = f'{e.strerror}: {e.filename}'
        if unrecordable:
            logging.warning('the results could not be recorded in %s: %s',
                            os.path.join(workdir, workdir_lib.METRICS_FILE), unrecordable)
        return results
    finally:
        if lock is not None:
            lock.release()


def main(argv):
    """Evaluate --workdir's checkpoint and print the metrics as JSON (process 0)."""
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if os.path.isdir(flags.FLAGS.workdir):
        workdir_lib.quiet_terminal(flags.FLAGS.workdir)
    distributed.initialize_from_flags()
    try:
        results = evaluate_workdir(flags.FLAGS.workdir, flags.FLAGS.step)
    except workdir_lib.WorkdirBusy as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(workdir_lib.BUSY_EXIT_CODE)
    except workdir_lib.WorkdirError as e:
        sys.exit(f'error: {e}')
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2))


if __name__ == '__main__':  # flags only for the command, so importing evaluate_workdir defines none
    flags.DEFINE_string('workdir', None, 'the run directory written by python -m resnet_jax.train')
    flags.DEFINE_integer('step', None, 'checkpoint step to evaluate (default: the newest readable one)')
    flags.mark_flags_as_required(['workdir'])
    from resnet_jax import cli

    cli.run(main)
