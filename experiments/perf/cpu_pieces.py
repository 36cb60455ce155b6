"""Time the pieces of a ResNet training step on CPU in isolation (experiments/perf/CPU_NOTES.md).

    python experiments/perf/cpu_pieces.py --model=resnet20   # batch 128, 32x32
    python experiments/perf/cpu_pieces.py --model=resnet50   # batch 32, 64x64

For every distinct conv shape of the network (with how often it occurs) it times the forward
conv, the input gradient and the weight gradient as XLA compiles them, and the weight gradient
as patches x matmul; then BatchNorm+ReLU forward and backward at every activation shape.
Repetitions of the variants are interleaved, and the median is reported.
"""
import argparse
import collections
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import cpu_conv

DN = ('NHWC', 'HWIO', 'NHWC')


def shapes(model: str):
    """(N, H, W, Cin, k, stride, Cout) -> count, for the convs of the two issue models."""
    c = collections.Counter()
    if model == 'resnet20':
        n = 128
        c[(n, 32, 32, 3, 3, 1, 16)] += 1
        for (h, w_in, w), in [((32, 16, 16),), ((16, 16, 32),), ((8, 32, 64),)]:
            stride = 1 if w_in == w else 2
            c[(n, h * stride, h * stride, w_in, 3, stride, w)] += 1
            c[(n, h, h, w, 3, 1, w)] += 5
    else:
        n, h = 32, 16  # 64x64 input: stem to 32x32, pool to 16x16
        c[(n, 64, 64, 3, 7, 2, 64)] += 1
        cin = 64
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for b in range(blocks):
                s = stride if b == 0 else 1
                c[(n, h, h, cin, 1, 1, planes)] += 1
                c[(n, h, h, planes, 3, s, planes)] += 1
                h //= s
                c[(n, h, h, planes, 1, 1, planes * 4)] += 1
                if b == 0:
                    c[(n, h * s, h * s, cin, 1, s, planes * 4)] += 1
                cin = planes * 4
    return c


def timeit(fns, reps):
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--model', default='resnet20')
    p.add_argument('--reps', type=int, default=7)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    total = collections.Counter()
    print(f'backend {jax.default_backend()}, XLA_FLAGS as set in the environment')
    print('shape (N,H,W,Cin,k,s,Cout) x count: lax fwd | lax dx | lax dw | patches dw | custom fwd+bwd | lax fwd+bwd (ms each)')
    for (n, h, w, cin, k, s, cout), count in shapes(a.model).items():
        x = jnp.asarray(rng.standard_normal((n, h, w, cin), np.float32))
        kern = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32) * 0.1)
        pad = [((k - 1) // 2,) * 2] * 2
        ref = lambda x, kern: jax.lax.conv_general_dilated(x, kern, (s, s), pad, dimension_numbers=DN)
        ours = lambda x, kern: cpu_conv.conv_general_dilated(x, kern, (s, s), pad, dimension_numbers=DN)
        y, vjp = jax.vjp(ref, x, kern)
        g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
        fwd = jax.jit(ref)
        dx = jax.jit(lambda x, kern, g: jax.vjp(lambda x: ref(x, kern), x)[1](g)[0])
        dw = jax.jit(lambda x, kern, g: jax.vjp(lambda kern: ref(x, kern), kern)[1](g)[0])
        pdw = jax.jit(lambda x, g: cpu_conv.weight_grad(x, g, (k, k), (s, s), pad))
        both_ref = jax.jit(lambda x, kern, g: jax.vjp(ref, x, kern)[1](g))
        both_ours = jax.jit(lambda x, kern, g: jax.vjp(ours, x, kern)[1](g))
        fns = {'fwd': lambda: fwd(x, kern), 'dx': lambda: dx(x, kern, g), 'dw': lambda: dw(x, kern, g),
               'pdw': lambda: pdw(x, g), 'ours': lambda: both_ours(x, kern, g),
               'ref': lambda: both_ref(x, kern, g)}
        for f in fns.values():
            jax.block_until_ready(f())
        t = timeit(fns, a.reps)
        for key in t:
            total[key] += t[key] * count
        print(f'{(n, h, w, cin, k, s, cout)} x{count}: ' + ' | '.join(f'{t[k]:.2f}' for k in fns))
    print('totals (ms per step, counting repeats): ' + ', '.join(f'{k} {v:.1f}' for k, v in total.items()))


if __name__ == '__main__':
    main()
