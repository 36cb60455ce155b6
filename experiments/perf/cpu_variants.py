"""Compare variants of the CPU path on the full training step, side by side in one process
(experiments/perf/CPU_NOTES.md): each variant's step is traced and compiled with its patches in
place, then the compiled steps run interleaved and the median step time of each is printed.

    python experiments/perf/cpu_variants.py --model=resnet20 --variants=base,no_onednn
    python experiments/perf/cpu_variants.py --model=resnet50 --batch=32 --size=64 --variants=base,optax_update

A variant is a name in VARIANTS: a context manager that patches the CPU path while the step is traced
('base': the code as it is; 'lax': XLA's convs throughout; 'no_onednn': XLA's convs with their slow
cases routed around; 'norm_xla': XLA's BatchNorm backward; 'pool_xla': XLA's max pool; 'optax_update':
optax's update instead of the one-pass kernel; 'onednn_mat': oneDNN's convs on materialised inputs; 'rw' / 'nomat': the earlier reduce-window
materialisation / none). `--eval` times the evaluation forward pass instead.
"""
import argparse
import contextlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_jax import sharding
from resnet_jax.models import cpu_conv, resnet
from resnet_jax.train import optim
from resnet_jax.train.config import base_config
from resnet_jax.train.run import Run


def _rw(x):
    """The previous materialisation: a max over x and a -inf pad, kept by XLA:CPU as a reduce-window."""
    pad = ((0, 0),) * x.ndim + ((0, 1),)
    window = (1,) * x.ndim + (2,)
    return lax.reduce_window(x[..., None], -jnp.inf, lax.max, window, (1,) * (x.ndim + 1), pad)[..., 0]


@jax.custom_vjp
def _materialized(x):
    return cpu_conv.materialize(x)


_materialized.defvjp(lambda x: (cpu_conv.materialize(x), None), lambda _, g: (g,))
_dnnl_conv = cpu_conv._dnnl_conv


VARIANTS = {
    'base': lambda: contextlib.nullcontext(),
    'pool_xla': lambda: _patched(cpu_conv, max_pool_3x3_2d=lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1)] * 2)),
    'norm_xla': lambda: _patched(resnet, norm_by_onednn=lambda groups: False),
    'no_onednn': lambda: _patched(cpu_conv, uses_onednn=lambda padding: False),
    'onednn_mat': lambda: _patched(cpu_conv, _dnnl_conv=lambda x, k, *conf: _dnnl_conv(_materialized(x), k, *conf)),
    'lax': lambda: _patched(cpu_conv, applies=lambda *a: False),
    'optax_update': lambda: _patched(optim, sgd_in_place=lambda *a: None),
    'rw': lambda: _patched(cpu_conv, materialize=_rw),
    'nomat': lambda: _patched(cpu_conv, materialize=lambda x: x),
}


@contextlib.contextmanager
def _patched(module, **values):
    old = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def _run(model: str, batch: int, size: int, train: bool):
    c = base_config()
    c.model.name = model
    c.model.dtype = 'float32'
    c.batch_size = c.eval.batch_size = batch
    c.num_steps = 1
    c.data.image_size = size
    c.data.augment = 'none'
    c.data.dataset = 'synthetic'
    c.data.num_train = c.data.num_eval = batch
    c.model.num_classes = 10 if model.startswith('resnet20') else 1000
    return Run(c)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--model', default='resnet20')
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--size', type=int, default=32)
    p.add_argument('--variants', default='base,lax')
    p.add_argument('--reps', type=int, default=7)
    p.add_argument('--steps', type=int, default=2, help='steps per repetition')
    p.add_argument('--eval', action='store_true', help='time the evaluation forward pass instead')
    p.add_argument('--dump', default='', help='write each variant\'s compiled HLO to DUMP.<variant>.txt')
    a = p.parse_args()
    run = _run(a.model, a.batch, a.size, not a.eval)
    state = run.initial_state()
    batch = {'image': run.train_data.images[:a.batch], 'label': run.train_data.labels[:a.batch]}
    inputs = sharding.global_batch(batch, run.mesh)
    rng = jax.random.key(0)
    compiled = {}
    for name in a.variants.split(','):
        jax.clear_caches()  # jit caches traces by argument types, not by the patched globals
        with VARIANTS[name]():
            if a.eval:
                fn = jax.jit(lambda s, x: run.model.apply({'params': s.params, 'batch_stats': s.batch_stats},
                                                          x, train=False))
                compiled[name] = (lambda f: lambda s: (s, f(s, inputs['image'])))(
                    fn.lower(state, inputs['image']).compile())
                text = fn.lower(state, inputs['image']).compile().as_text()
            else:
                c = run.train_step.lower(state, inputs, rng).compile()
                compiled[name] = (lambda c: lambda s: c(s, inputs, rng))(c)
                text = c.as_text()
        if a.dump:
            with open(f'{a.dump}.{name}.txt', 'w') as f:
                f.write(text)
    losses = {}
    fresh = lambda: jax.tree.map(lambda v: v.copy(), state)  # noqa: E731  (the step donates its state)
    for name, f in compiled.items():
        s, m = f(fresh())
        losses[name] = None if a.eval else float(m['train/loss'])
        jax.block_until_ready(s)
    print('first loss:', losses)
    times = {k: [] for k in compiled}
    cpu = {k: [] for k in compiled}
    for _ in range(a.reps):
        for name, f in compiled.items():
            s = jax.block_until_ready(fresh())
            t, c = time.perf_counter(), time.process_time()
            for _ in range(a.steps):
                s, m = f(s)
            jax.block_until_ready((s, m))
            times[name].append((time.perf_counter() - t) / a.steps)
            cpu[name].append((time.process_time() - c) / a.steps)
    first = next(iter(times))
    ref, ref_min, ref_cpu = statistics.median(times[first]), min(times[first]), statistics.median(cpu[first])
    print('wall median and min, and the process CPU time (both cores) per step; ratios: the first variant / this one')
    for name, v in times.items():
        med, low, c = statistics.median(v), min(v), statistics.median(cpu[name])
        print(f'{name:>18}: median {1e3 * med:7.1f} ms ({a.batch / med:6.1f} img/s) x{ref / med:.3f} | min {1e3 * low:7.1f} '
              f'x{ref_min / low:.3f} | cpu {1e3 * c:7.1f} x{ref_cpu / c:.3f} | all {np.round(np.array(v) * 1e3).astype(int).tolist()}')


if __name__ == '__main__':
    main()
