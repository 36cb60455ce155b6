"""python -m resnet_jax.bench: the command line of the benchmark (see resnet_jax.bench.measure)."""

from __future__ import annotations

from resnet_jax import allocator  # noqa: I001 (first: before JAX starts its threads)

allocator.keep_freed_memory()

import itertools
import json
import os

from absl import app, flags

from resnet_jax import cli
from resnet_jax.bench.measure import (
    BenchError,
    measure_row,
    population_rows,
    population_table,
    table,
)
from resnet_jax.errors import close_matches
from resnet_jax.models.design import DTYPES
from resnet_jax.models.registry import PRESETS

SOURCES = ('synthetic', 'device', 'host')
STEPS = ('train', 'eval')
DEFAULT_STEPS_PROJECTED = 64_000  # He et al.'s CIFAR schedule, for the projected-time column

FLAGS = flags.FLAGS
# What is measured: a row for each combination of the list flags (--source below is one too).
flags.DEFINE_list('model', ['resnet50'], 'presets to measure (comma-separated)')
flags.DEFINE_list('batch_size', ['256'], 'global batch sizes (comma-separated)')
flags.DEFINE_list('dtype', ['bfloat16'], "compute dtypes: 'float32', 'bfloat16' (parameters stay float32)")
flags.DEFINE_list('step', ['train'], "steps to time: 'train' (forward, backward, update) and/or 'eval' (the forward "
                  "pass `evaluate` runs)")
flags.DEFINE_list('remat', ['false'], "'false' and/or 'true': recompute each block's activations in the backward pass")
flags.DEFINE_integer('image_size', None, 'input size; default: the preset native size (32 CIFAR, 224 ImageNet)')
flags.DEFINE_list('population', None, 'member counts M (comma-separated): time populations of M runs, vmapped and '
                  'as a loop inside one jit, beside M separate runs (synthetic source)')

# Where the batches come from.
flags.DEFINE_list('source', ['synthetic'], f'data sources, among {", ".join(SOURCES)}')
flags.DEFINE_string('dataset', 'synthetic', "dataset of the 'device' and 'host' sources: 'synthetic' or 'folder:<path>'")
flags.DEFINE_integer('num_examples', 50_000, "size of the random dataset of the 'device' and 'host' sources")

# The PyTorch comparison.
flags.DEFINE_bool('vs_torch', False, 'also time the same model, batch and precision in PyTorch (eager and compiled)')
flags.DEFINE_bool('torch_compile', True, 'with --vs_torch, include torch.compile')
flags.DEFINE_integer('repeat', 1, 'measure each row this many times, ours and PyTorch\'s alternating; the row gives the '
                     'median runs and the median and range of the paired ratios')

# How long to time, and the columns computed from the step time.
flags.DEFINE_integer('steps', 60, 'timed steps after warm-up')
flags.DEFINE_integer('warmup', 5, 'untimed steps after compilation')
flags.DEFINE_integer('window', 10, 'steps between synchronisations; step time statistics are over windows')
flags.DEFINE_integer('projected_steps', DEFAULT_STEPS_PROJECTED, 'steps for the projected-time column')
flags.DEFINE_float('peak_tflops', None, "device peak TFLOP/s for MFU; default: the training loop's table")

# Memory instead of time.
flags.DEFINE_bool('max_batch', False, 'instead of timing, find the largest batch whose step fits in device memory')
flags.DEFINE_float('memory_limit_gib', None, "with --max_batch: the memory to fit in; default: the device allocator's limit")

# Output.
flags.DEFINE_string('json', None, 'write the rows to this JSON file')


def _parse_rows() -> list[dict]:
    """The cartesian product of the list flags, checked before anything is compiled."""
    for model in FLAGS.model:
        if model not in PRESETS:
            raise BenchError(f'--model: unknown model {model!r}.{close_matches(model, PRESETS)} '
                             'Run python -m resnet_jax.models for the list.')
    for name, values, allowed in (('dtype', FLAGS.dtype, tuple(DTYPES)), ('source', FLAGS.source, SOURCES),
                                  ('step', FLAGS.step, STEPS),
                                  ('remat', FLAGS.remat, ('false', 'true'))):
        for v in values:
            if v not in allowed:
                raise BenchError(f'--{name}: {v!r} is not one of {", ".join(allowed)}')
    try:
        batches = [int(b) for b in FLAGS.batch_size]
    except ValueError:
        raise BenchError(f'--batch_size: {",".join(FLAGS.batch_size)} must be comma-separated integers') from None
    if min(batches) < 1 or min(FLAGS.steps, FLAGS.warmup, FLAGS.window, FLAGS.repeat) < 1:
        raise BenchError('--batch_size, --steps, --warmup, --window and --repeat must be positive')
    for flag in ('vs_torch', 'max_batch', 'population'):
        if FLAGS[flag].value and set(FLAGS.source) != {'synthetic'}:
            raise BenchError(f'--{flag} measures the step alone: use --source=synthetic')
    if 'eval' in FLAGS.step and (FLAGS.max_batch or FLAGS.population or set(FLAGS.source) != {'synthetic'}):
        raise BenchError('--step=eval times the evaluation step on one fixed batch: use --source=synthetic, '
                         'without --max_batch or --population')
    return [dict(model=m, batch=b, dtype=d, source=s, step=t, remat=r == 'true')
            for m, b, d, s, t, r in itertools.product(FLAGS.model, batches, FLAGS.dtype, FLAGS.source, FLAGS.step,
                                                      FLAGS.remat)]


def main(argv):
    """Measure every row the flags ask for, each printed as JSON as it ends, then print the table."""
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    specs = _parse_rows()  # a BenchError is printed by resnet_jax.cli
    if FLAGS.json and not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.json))):  # before measuring
        raise BenchError(f'--json={FLAGS.json}: its directory does not exist')
    args = {k: FLAGS[k].value for k in ('image_size', 'num_examples', 'dataset', 'peak_tflops', 'max_batch', 'memory_limit_gib',
                                         'vs_torch', 'torch_compile', 'repeat', 'steps', 'warmup', 'window',
                                         'projected_steps')}
    if FLAGS.population:
        sizes = _population_sizes()
        rows = [row for spec in specs for row in population_rows(spec, sizes, args)]
        _write_json(rows)
        print(population_table(rows))
        return
    rows = []
    for spec in specs:
        rows.append(measure_row(spec, args))
        print(json.dumps(rows[-1]), flush=True)
    _write_json(rows)
    print(table(rows))


def _population_sizes() -> list[int]:
    try:
        sizes = [int(m) for m in FLAGS.population]
    except ValueError:
        sizes = [0]
    if min(sizes) < 1:
        raise BenchError(f'--population: {",".join(FLAGS.population)} must be comma-separated positive integers')
    return sizes


def _write_json(rows: list[dict]) -> None:
    if FLAGS.json:
        with open(FLAGS.json, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    cli.run(main)
