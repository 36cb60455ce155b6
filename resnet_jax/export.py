"""python -m resnet_jax.export --workdir=<run> --out=model.msgpack [--step=N] [--ema]

Writes a kept checkpoint's inference weights ({'params', 'batch_stats'}, EMA parameters with
--ema) as Flax msgpack, and beside it `<out>.json`: the model name and overrides, the input
size and the normalisation a caller must apply. `load(path)` rebuilds (model, variables), so

    model, variables, info = load('model.msgpack')
    logits = model.apply(variables, (images / 255 - info['mean']) / info['std'], train=False)

needs neither the run directory nor its config.

--format=torchvision or --format=timm writes the weights instead as a PyTorch state_dict in that
library's names (safetensors, so `out` must end in .safetensors), for a model that library has:

    model = timm.create_model(info['timm_model'], num_classes=info['num_classes'])
    model.load_state_dict(safetensors.torch.load_file('model.safetensors'))
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import app, flags
from flax import serialization

from resnet_jax.errors import UserError
from resnet_jax.models import get_model, timm_import, torchvision_import
from resnet_jax.models.registry import model_overrides
from resnet_jax.train import config as config_lib
from resnet_jax.train.run import restore_workdir

FORMATS = ('flax', 'torchvision', 'timm')


def _torch_format(format: str):
    """(check, write) for a PyTorch format: refuse a model it lacks; write variables as its state_dict."""
    return {'torchvision': (torchvision_import.check_torchvision, torchvision_import.to_torchvision),
            'timm': (timm_import.check_timm, timm_import.to_timm)}[format]


def export(workdir: str, out: str, step: int | None = None, ema: bool = False, format: str = 'flax') -> dict:
    """Write `out` and `out`.json from checkpoint `step` (default: the newest readable) of `workdir`, as
    Flax msgpack or (format 'torchvision' or 'timm') a PyTorch state_dict in safetensors."""
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))) or os.path.isdir(out):  # before anything is restored
        raise UserError(f'--out={out}: ' + ('is a directory; name the file to write' if os.path.isdir(out) else
                                            f'its directory {os.path.dirname(os.path.abspath(out))} does not exist'))
    if format not in FORMATS:
        raise UserError(f'format={format!r}: choose one of {", ".join(FORMATS)}')
    if format != 'flax':  # before any data is loaded or checkpoint read
        if not out.endswith('.safetensors'):
            raise UserError(f'--format={format} writes safetensors; name the file <name>.safetensors, not {out}')
        resolved = config_lib.load_resolved(workdir)
        _torch_format(format)[0](get_model(resolved.model.name, **model_overrides(resolved)))
    if ema and not config_lib.load_resolved(workdir).optim.ema_decay:  # before any data is loaded
        raise UserError(f'{workdir} was trained without EMA (optim.ema_decay = 0); export without --ema')
    run, restored = restore_workdir(workdir, step)
    config = run.config
    state = jax.device_get(restored.state)
    variables = {'params': state.ema_params if ema else state.params, 'batch_stats': state.batch_stats}
    if format == 'flax':
        with open(out, 'wb') as f:
            f.write(serialization.to_bytes(variables))
    else:
        _torch_format(format)[1](variables, run.model, out)
    info = {'model': config.model.name, 'overrides': dict(model_overrides(config),
                                                          num_classes=run.model.num_classes),
            'image_size': config.data.image_size, 'mean': np.asarray(run.mean).tolist(),
            'std': np.asarray(run.std).tolist(),
            'step': restored.step, 'ema': ema, 'dataset': config.data.dataset}
    if format != 'flax':  # the torch model takes the same normalisation, on NCHW images
        info.update(format=format, num_classes=run.model.num_classes)
        if format == 'timm':
            info['timm_model'] = timm_import.timm_name(run.model)
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
    """Export the checkpoint the flags name and print what was written beside it."""
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    info = export(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step, flags.FLAGS.ema, flags.FLAGS.format)
    print(json.dumps(info, indent=2, default=list))


if __name__ == '__main__':
    flags.DEFINE_string('workdir', None, 'a resnet_jax.train run directory')
    flags.DEFINE_string('out', None, 'the msgpack file to write (and <out>.json beside it)')
    flags.DEFINE_integer('step', None, 'checkpoint step (default: the newest readable one)')
    flags.DEFINE_bool('ema', False, 'export the EMA parameters instead of the raw ones')
    flags.DEFINE_enum('format', 'flax', FORMATS, 'flax msgpack (for `load`), or a torchvision- or timm-named '
                      'PyTorch state_dict as .safetensors')
    flags.mark_flags_as_required(['workdir', 'out'])
    from resnet_jax import cli

    cli.run(main)
