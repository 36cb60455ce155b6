"""python -m resnet_jax.evaluate --workdir=<run> [--step=N]: evaluate a run's checkpoint.

Rebuilds the run from the config it recorded, restores the newest checkpoint (or --step),
evaluates the whole evaluation split (padded and masked, never truncated) and prints the
metrics as JSON; they are also appended to the run's metrics.jsonl as 'evaluate/*'.
"""

import json
import os

import jax
from absl import app, flags

from resnet_jax import checkpoint, distributed, labels
from resnet_jax.data import sources
from resnet_jax.train import config as config_lib
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train.loop import Run



def restore_workdir(workdir: str, step: int | None = None, run: Run | None = None):
    """(Run rebuilt from the workdir's recorded config, its checkpoint `step` or the newest readable one);
    pass the `run` of an earlier call to restore another step without rebuilding it."""
    if not os.path.exists(os.path.join(workdir, 'config.json')):
        raise FileNotFoundError(f'{workdir} has no config.json: is it a resnet_jax.train workdir?')
    run = Run(config_lib.load_resolved(workdir)) if run is None else run
    labels.check(workdir, sources.class_names(run.config))  # the classes the model was trained on
    manager = checkpoint.Manager(os.path.join(workdir, 'checkpoints'), run.config, read_only=True)
    restored = manager.restore(run.abstract_state, step)
    manager.close()
    if restored is None:
        raise FileNotFoundError(f'{workdir}/checkpoints holds no checkpoint')
    return run, restored


def evaluate_workdir(workdir: str, step: int | None = None) -> dict[str, float]:
    run, restored = restore_workdir(workdir, step)
    results = {k.replace('eval', 'evaluate', 1): v for k, v in run.evaluate(restored.state).items()}
    with metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0) as writer:
        writer.write(restored.step, results)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    distributed.initialize_from_flags()
    results = evaluate_workdir(flags.FLAGS.workdir, flags.FLAGS.step)
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2))


if __name__ == '__main__':  # flags only for the command, so export.py can import restore_workdir
    flags.DEFINE_string('workdir', None, 'the run directory written by python -m resnet_jax.train')
    flags.DEFINE_integer('step', None, 'checkpoint step to evaluate (default: the newest readable one)')
    flags.mark_flags_as_required(['workdir'])
    from resnet_jax import cli

    cli.run(main)
