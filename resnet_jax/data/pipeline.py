"""What the training loop reads: this process's slice of every global batch, resumable by state.

Three feeds (`config.data.feed`), one batch order. Batch t holds positions t*B .. t*B+B-1 of
the concatenated per-epoch permutations of the training split drawn from the seed
(`arrays.indices_at`); process p takes its contiguous slice of each global batch.

    host    the split decoded into host memory once; batches gathered by index and
            augmented inside the jitted step
    device  the split uploaded to device memory once; batches drawn and augmented inside
            the jitted step (`data.device`); the host does nothing per step
    stream  records decoded and augmented per step by a Grain pipeline (`data.workers`
            worker processes), for datasets that do not fit in memory or whose images
            differ in size (ImageNet); the step only normalises

A `BatchIterator`'s state is {step, ...}: JSON, a few bytes, and enough to resume in a new
process with exactly the batches an uninterrupted run would have seen, because every batch
and every augmentation draw is a function of (seed, step, position).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time

import jax
import numpy as np
from absl import flags

from resnet_jax.data import arrays, augment, sources
from resnet_jax.data import device as device_data

STATS_SAMPLE = 1024  # images from which a streamed dataset's channel mean/std are estimated


def open_split(config, split: str, held_out: bool = False):
    """The records of `split` as the feed reads them: decoded into memory, or lazily for 'stream';
    held_out: the data.validation_split examples carved from it (`sources.open_source`)."""
    if config.data.feed == 'stream':
        return sources.open_source(config, split, held_out)
    return sources.load(config, split, held_out)


def normalization(config, source) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) that `augment.normalize` applies, from the training split only: per channel
    (`channel_stats`), or with data.normalize='per_pixel_mean' the mean training image (H, W, 3) in
    [0, 1] and a std of 1 (He et al. 2016). Both are exact functions of the training images, so a
    resumed run and `evaluate` recompute the same values."""
    if config.data.normalize == 'per_pixel_mean':
        if not isinstance(source, arrays.ArrayDataset):  # validate() refuses this before any data is read
            raise ValueError("config.data.normalize='per_pixel_mean' needs data.feed 'host' or 'device'")
        return source.pixel_mean(), np.ones(3, np.float32)
    mean, std = channel_stats(config, source)
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def channel_stats(config, source) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1]: data.mean/data.std if set, else measured on the training
    split (in memory: all of it; streamed: a fixed sample of evaluation views)."""
    if config.data.mean is not None:
        return tuple(config.data.mean), tuple(config.data.std)
    if isinstance(source, arrays.ArrayDataset):
        return source.channel_stats()
    d = config.data
    sample = np.random.default_rng(0).permutation(len(source))[:STATS_SAMPLE]
    images = [augment.eval_view(sources.read(source, int(i), d.on_corrupt)[0], d.augment, d.image_size,
                                d.eval_crop_fraction) for i in sample]
    return arrays.ArrayDataset(np.stack(images), np.zeros(len(images), np.int32), 1).channel_stats()


class BatchIterator:
    """Batches step, step+1, ... of one data order; `get_state()`/`set_state()` move it.

    `make(start_step)` returns the batches from `start_step` on. The state also records what
    defines the order (dataset, split, feed, seed, batch, size), and `set_state` refuses a state
    from a different order instead of silently feeding other batches.
    """

    def __init__(self, make, order: dict, start_step: int = 0):
        self._make, self.order = make, order
        self.step, self.skipped = start_step, 0
        self._batches = None  # made on first use, so set_state never starts a pipeline twice

    def __iter__(self):
        return self

    def __next__(self):
        if self._batches is None:
            self._batches = self._make(self.step)
        batch = next(self._batches)
        self.step += 1
        if 'skipped' in batch:  # the stream feed's count of unreadable records it replaced
            batch = dict(batch)
            self.skipped += int(batch.pop('skipped').sum())
        return batch

    def get_state(self) -> dict:
        """The position (step, skipped records) and what defines the order, as JSON for a checkpoint."""
        return dict(self.order, step=self.step, skipped=self.skipped)

    def set_state(self, state: dict, allow_order_change: bool = False) -> None:
        """Continue from `state`; with allow_order_change (a resume that was allowed to change the
        config), a state from another order only sets the step, with a warning."""
        changed = {k: (state.get(k), v) for k, v in self.order.items() if state.get(k) != v}
        if changed:
            message = 'the data iterator state is from a different data order: ' + ', '.join(
                f'{k} was {old!r}, now {new!r}' for k, (old, new) in sorted(changed.items()))
            if not allow_order_change:
                raise ValueError(message)
            logging.warning('%s; continuing the new order at step %d', message, state['step'])
        self.step, self.skipped = state['step'], state['skipped']
        self._batches = None


def train_iterator(config, source, mesh=None, start_step: int = 0, process_index: int | None = None,
                   process_count: int | None = None) -> BatchIterator:
    """This process's training batches from `start_step` on; for the 'device' feed, the uploaded
    dataset itself at every step (the step draws its batch from it)."""
    d, batch = config.data, config.batch_size
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    order = {'dataset': d.dataset, 'split': d.train_split, 'subset': d.train_subset, 'feed': d.feed,
             'seed': config.seed, 'global_batch': batch, 'num_examples': len(source)}
    if d.feed == 'device':
        order['shards'] = device_data.num_shards(mesh)
        dataset = device_data.put(source, mesh, config.seed)
        return BatchIterator(lambda start: itertools.repeat(dataset), order, start_step)
    if d.feed == 'host':
        return BatchIterator(lambda start: arrays.train_batches(source, batch, config.seed, start, process_index,
                                                                 process_count), order, start_step)
    local = batch // process_count
    record = TrainRecord(source, batch, local, process_index * local, d.augment, d.image_size, d.on_corrupt,
                         seed=config.seed, pad_mode=d.pad_mode)
    return BatchIterator(lambda start: _grain_batches(record, start * local, None, local, d.workers), order,
                         start_step)


def eval_batches(config, source, process_index: int, process_count: int):
    """The whole split once, in order, this process's slice of each global batch; the last one is
    padded and masked, never dropped."""
    if config.data.feed != 'stream':
        return arrays.eval_batches(source, config.eval.batch_size, process_index, process_count)
    d, batch = config.data, config.eval.batch_size
    local = batch // process_count
    num_batches = -(-len(source) // batch)
    record = EvalRecord(source, batch, local, process_index * local, d.augment, d.image_size, d.on_corrupt,
                        crop_fraction=d.eval_crop_fraction)
    return _grain_batches(record, 0, num_batches * local, local, d.workers)


@dataclasses.dataclass(frozen=True)
class _Records:
    """Local element k of a process's stream over `source`; `offset` is its first position in each
    global batch. Plain data, so that Grain can send it to worker processes."""
    source: object
    global_batch: int
    local_batch: int
    offset: int
    augment: str
    size: int
    on_corrupt: str


@dataclasses.dataclass(frozen=True)
class TrainRecord(_Records):
    """Training element k: decoded, augmented with draws from (seed, step, position)."""
    seed: int
    pad_mode: str = 'zero'

    def __call__(self, k: int) -> dict:
        step, i = divmod(k, self.local_batch)
        position = self.offset + i
        index = arrays.indices_at(len(self.source), self.seed, np.array([step * self.global_batch + position]))[0]
        image, label, skipped = sources.read(self.source, int(index), self.on_corrupt)
        rng = np.random.default_rng([self.seed, 1, step, position])
        return {'image': augment.train_view(rng, image, self.augment, self.size, self.pad_mode),
                'label': np.int32(label),
                'skipped': np.int32(skipped)}


@dataclasses.dataclass(frozen=True)
class EvalRecord(_Records):
    """Evaluation element k; positions past the end repeat the last record, masked."""
    crop_fraction: float

    def __call__(self, k: int) -> dict:
        batch, i = divmod(k, self.local_batch)
        position = batch * self.global_batch + self.offset + i
        image, label, skipped = sources.read(self.source, min(position, len(self.source) - 1), self.on_corrupt)
        real = position < len(self.source) and not skipped  # a replaced record must not count twice
        return {'image': augment.eval_view(image, self.augment, self.size, self.crop_fraction),
                'label': np.int32(label), 'mask': np.float32(real)}


def _grain_batches(record, start: int, stop: int | None, local_batch: int, workers: int):
    """Elements start, start+1, ... (up to stop) of `record`, batched, produced by Grain: `workers`
    processes (0: threads of this process), each element a pure function of its index."""
    import grain

    stop = 2 ** 62 if stop is None else stop
    batches = grain.MapDataset.range(start, stop).map(record).batch(local_batch)
    # Each thread builds whole batches; at most `threads` batches wait in memory (ImageNet: ~40 MB each).
    threads = 2 if workers else min(16, max(2, os.cpu_count() or 1))
    stream = batches.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
    if workers:
        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside an absl app, take the defaults
            flags.FLAGS.mark_as_parsed()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_end_with_parent)
    return iter(stream)


def _end_with_parent(worker_index: int, worker_count: int) -> None:
    """In each Grain worker: end it within a second of the process that started it, however that one
    ended (Grain's own shutdown runs only when the trainer exits cleanly, not on SIGKILL)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name='end-with-parent', daemon=True).start()
