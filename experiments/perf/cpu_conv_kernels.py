"""The convolution kernels alone, XLA:CPU against PyTorch (oneDNN), in GFLOP/s (CPU_NOTES.md entry 14).

    python experiments/perf/cpu_conv_kernels.py

For each stage of a CIFAR ResNet (batch 128, 3x3, stride 1, as many output as input channels: 16 ch at
32x32, 32 at 16x16, 64 at 8x8) it times the forward conv and the backward pass (input and weight
gradients) of both frameworks, and a 2048x2048 matmul as the machine's reachable peak. Medians of
interleaved repetitions; torch uses as many threads as XLA has cores.
"""
import os
import statistics
import time

import jax
import jax.numpy as jnp
import torch
from jax import lax

STAGES = ((16, 32), (32, 16), (64, 8))  # (channels, feature map side)
NHWC = ('NHWC', 'HWIO', 'NHWC')


def _median_seconds(fn, reps: int = 7, inner: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def _jax_conv(channels: int, side: int):
    x = jax.random.normal(jax.random.key(0), (128, side, side, channels))
    k = jax.random.normal(jax.random.key(1), (3, 3, channels, channels))
    conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)  # noqa: E731
    forward = jax.jit(conv)
    _, vjp = jax.vjp(conv, x, k)
    g = jnp.ones((128, side, side, channels))
    backward = jax.jit(lambda g: vjp(g))
    return (lambda: forward(x, k).block_until_ready(),
            lambda: jax.block_until_ready(backward(g)))


def _torch_conv(channels: int, side: int):
    x = torch.randn(128, channels, side, side, requires_grad=True)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    g = torch.ones(128, channels, side, side)

    def backward():
        y = conv(x)
        y.backward(g)  # the forward is timed on its own and subtracted
    return lambda: conv(x), backward


def main():
    torch.set_num_threads(os.cpu_count())
    a = jnp.ones((2048, 2048))
    matmul = jax.jit(lambda a: a @ a)
    t = torch.ones(2048, 2048)
    flops = 2 * 2048 ** 3
    print(f'matmul 2048x2048: JAX {flops / _median_seconds(lambda: matmul(a).block_until_ready()) / 1e9:.0f}, '
          f'torch {flops / _median_seconds(lambda: t @ t) / 1e9:.0f} GFLOP/s\n')
    print('| channels | map | XLA fwd | XLA dX+dW | torch fwd | torch dX+dW |  (GFLOP/s)\n|---|---|---|---|---|---|')
    for channels, side in STAGES:
        flops = 2 * 128 * side * side * 9 * channels * channels
        jf, jb = _jax_conv(channels, side)
        tf, tb = _torch_conv(channels, side)
        j_fwd, j_bwd, t_fwd, t_both = (_median_seconds(f) for f in (jf, jb, tf, tb))
        print(f'| {channels} | {side}x{side} | {flops / j_fwd / 1e9:.0f} | {2 * flops / j_bwd / 1e9:.0f} | '
              f'{flops / t_fwd / 1e9:.0f} | {2 * flops / (t_both - t_fwd) / 1e9:.0f} |')


if __name__ == '__main__':
    main()
