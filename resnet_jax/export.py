"""python -m resnet_jax.export --workdir=<run> --out=model.msgpack [--step=N] [--ema]

Writes a kept checkpoint's inference weights ({'params', 'batch_stats'}, EMA parameters with
--ema) as Flax msgpack, and beside it `<out>.json`: the model name and overrides, the input
size and the normalisation a caller must apply. `load(path)` rebuilds (model, variables), so

    model, variables, info = load('model.msgpack')
    logits = model.apply(variables, (images / 255 - info['mean']) / info['std'], train=False)

needs neither the run directory nor its config.
"""

from __future__ import annotations

import json
import jax
import numpy as np
from absl import app, flags
from flax import serialization

from resnet_jax.models import get_model
from resnet_jax.train import config as config_lib


def export(workdir: str, out: str, step: int | None = None, ema: bool = False) -> dict:
    """Write `out` and `out`.json from checkpoint `step` (default: the newest readable) of `workdir`."""
    from resnet_jax.evaluate import restore_workdir

    if ema and not config_lib.load_resolved(workdir).optim.ema_decay:  # before any data is loaded
        raise ValueError(f'{workdir} was trained without EMA (optim.ema_decay = 0); export without --ema')
    run, restored = restore_workdir(workdir, step)
    config = run.config
    state = jax.device_get(restored.state)
    variables = {'params': state.ema_params if ema else state.params, 'batch_stats': state.batch_stats}
    with open(out, 'wb') as f:
        f.write(serialization.to_bytes(variables))
    info = {'model': config.model.name, 'overrides': dict(config_lib.model_overrides(config),
                                                          num_classes=run.model.num_classes),
            'image_size': config.data.image_size, 'mean': np.asarray(run.mean).tolist(),
            'std': np.asarray(run.std).tolist(),
            'step': restored.step, 'ema': ema, 'dataset': config.data.dataset}
    with open(f'{out}.json', 'w') as f:
        json.dump(info, f, indent=2, default=list)
    return info


def load(path: str):
    """(model, variables, info) from a file written by `export`."""
    with open(f'{path}.json') as f:
        info = json.load(f)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in info['overrides'].items()}
    model = get_model(info['model'], **overrides)
    template = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, info['image_size'], info['image_size'], 3),
                                                                      np.float32))
    with open(path, 'rb') as f:
        variables = serialization.from_bytes({'params': template['params'],
                                              'batch_stats': template.get('batch_stats', {})}, f.read())
    return model, variables, info


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    info = export(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step, flags.FLAGS.ema)
    print(json.dumps(info, indent=2, default=list))


if __name__ == '__main__':
    flags.DEFINE_string('workdir', None, 'a resnet_jax.train run directory')
    flags.DEFINE_string('out', None, 'the msgpack file to write (and <out>.json beside it)')
    flags.DEFINE_integer('step', None, 'checkpoint step (default: the newest readable one)')
    flags.DEFINE_bool('ema', False, 'export the EMA parameters instead of the raw ones')
    flags.mark_flags_as_required(['workdir', 'out'])
    app.run(main)
