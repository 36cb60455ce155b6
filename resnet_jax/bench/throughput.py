"""Input-pipeline throughput: how fast each feed delivers training batches, with no model.

    python -m resnet_jax.bench.throughput --config=experiments/cifar10.py \
        --config.data.dataset=folder:/tmp/cifar10 --feeds=host,device,stream --workers=0,2

Each row builds the pipeline from scratch and times it up to the point where the train step
would start: the global batch on the device, augmented and normalised (and mixed, if the
config says so). 'startup' is the time to the first batch (decoding a split into memory,
uploading it, starting Grain workers); images/s is the steady rate after `--warmup` batches.
Compare images/s with the train step's rate from `python -m resnet_jax.bench`: the slower
of the two sets the pace of training.
"""

from __future__ import annotations

import time

import jax
from absl import app, flags
from ml_collections import config_flags

from resnet_jax import sharding
from resnet_jax.data import feed as feed_lib
from resnet_jax.data import pipeline
from resnet_jax.train import config as config_lib
from resnet_jax.train.step import preprocess

FLAGS = flags.FLAGS


def measure(config, batches: int, warmup: int, split: str | None = None) -> dict:
    """{'startup_s', 'images_per_sec', 'ms_per_batch'} of `config`'s training input on this machine."""
    config_lib.validate(config, jax.device_count())
    mesh, rng = sharding.make_mesh(config), jax.random.key(0)
    start = time.perf_counter()
    source = pipeline.open_split(config, split or config.data.train_split)
    mean, std = pipeline.normalization(config, source)
    feed = feed_lib.make(config, mesh)
    _, next_input = feed.train_inputs(source)

    @jax.jit
    def prepare(inputs, step):
        batch = feed.to_batch(inputs, step)
        return preprocess(jax.random.fold_in(rng, step), batch, config, source.num_classes, mean, std)

    jax.block_until_ready(prepare(next_input(), 0))
    startup = time.perf_counter() - start
    for step in range(1, 1 + warmup):
        jax.block_until_ready(prepare(next_input(), step))
    t0 = time.perf_counter()
    for step in range(1 + warmup, 1 + warmup + batches):
        out = prepare(next_input(), step)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - t0) / batches
    return {'startup_s': startup, 'images_per_sec': config.batch_size / seconds, 'ms_per_batch': 1e3 * seconds}


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table, one line per feed and worker count."""
    head = ('dataset', 'feed', 'workers', 'augment', 'batch', 'size', 'startup_s', 'images_per_sec', 'ms_per_batch')
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        cells = [r['dataset'], r['feed'], str(r['workers']), r['augment'], str(r['batch']), str(r['size']),
                 f"{r['startup_s']:.1f}", f"{r['images_per_sec']:,.0f}", f"{r['ms_per_batch']:.1f}"]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def define_flags() -> None:
    """Defined only when run as a command, so importing this module next to resnet_jax.bench is safe."""
    config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
    flags.DEFINE_list('feeds', ['host', 'device', 'stream'], 'Feeds to measure: host, device, stream.')
    flags.DEFINE_list('workers', ['0'], "Grain worker counts for the 'stream' feed.")
    flags.DEFINE_integer('batches', 50, 'Batches timed per row.')
    flags.DEFINE_integer('warmup', 5, 'Batches run before timing, after the first.')
    flags.DEFINE_string('split', None, 'Split to read (default: the training split).')
    flags.mark_flag_as_required('config')


def main(argv):
    """Measure every requested feed (and, for 'stream', worker count), after validating every row's config."""
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    config = FLAGS.config
    bad = [f for f in FLAGS.feeds if f not in feed_lib.FEEDS]
    if bad:
        raise app.UsageError(f'--feeds: {bad} not among {", ".join(feed_lib.FEEDS)}')
    try:
        worker_counts = [int(w) for w in FLAGS.workers]
    except ValueError:
        raise app.UsageError(f'--workers: {FLAGS.workers} must be integers') from None
    configs = []
    for feed in FLAGS.feeds:
        for workers in worker_counts if feed == 'stream' else [0]:
            c = config.copy_and_resolve_references()
            c.data.feed, c.data.workers = feed, workers
            config_lib.validate(c, jax.device_count())  # every row's config, before any is measured
            configs.append(c)
    rows = []
    for c in configs:
        result = measure(c, FLAGS.batches, FLAGS.warmup, FLAGS.split)
        rows.append(dict(result, dataset=c.data.dataset, feed=c.data.feed, workers=c.data.workers,
                         augment=c.data.augment, batch=c.batch_size, size=c.data.image_size))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == '__main__':
    from resnet_jax import cli

    define_flags()
    cli.run(main, config_flag='config')
