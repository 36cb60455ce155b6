"""In-memory image datasets and the batch order every process agrees on.

A dataset here is uint8 NHWC images with int32 labels held in host memory: the generated
'shapes' quickstart set, 'synthetic' noise for smoke tests, or any source decoded once
(`sources.load`).
Batch t of a run is a pure function of (seed, t): example p = t * batch + i of the
concatenated per-epoch permutations, so a resumed run sees the batches it would have seen,
and each process takes its contiguous slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np

from resnet_jax.data import shapes


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """A split decoded into memory as uint8 arrays, so that batches are gathered by index (the 'host' and
    'device' feeds) and the normalisation statistics are exact."""
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int32 (N,)
    num_classes: int
    skipped: int = 0  # unreadable files left out when it was decoded

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])

    def name(self, i: int) -> str:
        """How messages name example `i` (a file-backed source names the file)."""
        return f'example {i}'

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the images in [0, 1], for normalisation."""
        channels = self.images.shape[-1]
        total, squares = np.zeros(channels, np.uint64), np.zeros(channels, np.uint64)
        for start in range(0, len(self.images), 4096):  # exact integer sums, in chunks: no 1 GB float copy
            x = self.images[start:start + 4096].reshape(-1, channels).astype(np.uint32)
            total += x.sum(0, dtype=np.uint64)
            squares += (x * x).sum(0, dtype=np.uint64)
        n = self.images.size // channels
        mean = total.astype(np.float64) / n
        std = np.sqrt(squares.astype(np.float64) / n - mean ** 2)
        return tuple((mean / 255.0).tolist()), tuple((std / 255.0).tolist())

    def pixel_mean(self) -> np.ndarray:
        """The mean image (H, W, C) in [0, 1], float32: He et al.'s per-pixel mean, from exact integer sums."""
        total = np.zeros(self.images.shape[1:], np.uint64)
        for start in range(0, len(self.images), 4096):
            total += self.images[start:start + 4096].sum(0, dtype=np.uint64)
        return (total.astype(np.float64) / len(self.images) / 255.0).astype(np.float32)


def generated(config, split: str) -> ArrayDataset:
    """The generated 'shapes' or 'synthetic' split at data.image_size, of data.num_train/num_eval examples."""
    d = config.data
    is_train = split == d.train_split
    if d.dataset == 'shapes':
        images, labels = shapes.splits(d.image_size, d.num_train, d.num_eval, seed=0)['train' if is_train else 'test']
        return ArrayDataset(images, labels, len(shapes.CLASSES))
    rng = np.random.default_rng(0 if is_train else 1)  # 'synthetic': as many classes as the model has
    n, classes = (d.num_train if is_train else d.num_eval), generated_classes(config)
    images = rng.integers(0, 256, (n, d.image_size, d.image_size, 3), dtype=np.uint8)
    return ArrayDataset(images, rng.integers(0, classes, n).astype(np.int32), classes)


def generated_classes(config) -> int:
    """The number of classes of the generated dataset of `config`."""
    if config.data.dataset == 'shapes':
        return len(shapes.CLASSES)
    return config.model.num_classes or 10


def _local_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    per_process = global_batch // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def train_indices(num_examples: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """Dataset indices of global batch `step`: positions step*B .. step*B+B-1 of the
    concatenation of per-epoch permutations drawn from (seed, epoch)."""
    return indices_at(num_examples, seed, step * global_batch + np.arange(global_batch))


def indices_at(num_examples: int, seed: int, positions: np.ndarray) -> np.ndarray:
    """Dataset indices at `positions` of the concatenated per-epoch permutations."""
    epochs, offsets = np.divmod(positions, num_examples)
    out = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):
        out[epochs == epoch] = _epoch_permutation(num_examples, seed, int(epoch))[offsets[epochs == epoch]]
    return out


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """Drawn once per epoch rather than per step: for ImageNet a permutation costs ~20 ms."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(ds: ArrayDataset, global_batch: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This process's slice of every global training batch, from `start_step` on."""
    local = _local_slice(global_batch, process_index, process_count)
    step = start_step
    while True:
        idx = train_indices(len(ds), global_batch, seed, step)[local]
        yield {'image': ds.images[idx], 'label': ds.labels[idx]}
        step += 1


def eval_batches(ds: ArrayDataset, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """The whole split once, in order; the last global batch is padded and masked, never dropped."""
    local = _local_slice(global_batch, process_index, process_count)
    for start in range(0, len(ds), global_batch):
        idx = np.arange(start, start + global_batch)[local]
        mask = (idx < len(ds)).astype(np.float32)
        idx = np.minimum(idx, len(ds) - 1)
        yield {'image': ds.images[idx], 'label': ds.labels[idx], 'mask': mask}
