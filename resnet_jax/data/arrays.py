"""In-memory image datasets and the batch order every process agrees on.

A dataset here is uint8 NHWC images with int32 labels held in host memory: the generated
'shapes' quickstart set, 'synthetic' noise for smoke tests, or an image folder decoded once.
Batch t of a run is a pure function of (seed, t): example p = t * batch + i of the
concatenated per-epoch permutations, so a resumed run sees the batches it would have seen,
and each process takes its contiguous slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator

import numpy as np

from resnet_jax.data import shapes


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int32 (N,)
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the images in [0, 1], for normalisation."""
        x = self.images.reshape(-1, self.images.shape[-1]).astype(np.float64) / 255.0
        return tuple(x.mean(0).tolist()), tuple(x.std(0).tolist())


DATASETS = ('shapes', 'synthetic', 'folder:<path>')


def load(config, split: str) -> ArrayDataset:
    """The `split` of `config.data.dataset` at `config.data.image_size`."""
    d = config.data
    is_train = split == d.train_split
    if d.dataset == 'shapes':
        images, labels = shapes.splits(d.image_size, d.num_train, d.num_eval, seed=0)['train' if is_train else 'test']
        return ArrayDataset(images, labels, len(shapes.CLASSES))
    if d.dataset == 'synthetic':  # as many classes as the model has (10 unless it says otherwise)
        rng = np.random.default_rng(0 if is_train else 1)
        n, classes = (d.num_train if is_train else d.num_eval), config.model.num_classes or 10
        images = rng.integers(0, 256, (n, d.image_size, d.image_size, 3), dtype=np.uint8)
        return ArrayDataset(images, rng.integers(0, classes, n).astype(np.int32), classes)
    if d.dataset.startswith('folder:'):
        return load_folder(os.path.join(d.dataset[len('folder:'):], split), d.image_size)
    raise ValueError(f'config.data.dataset={d.dataset!r} is not supported; choose one of: {", ".join(DATASETS)}')


def load_folder(root: str, image_size: int) -> ArrayDataset:
    """Decode `root/<class>/<file>` into memory; classes are the sorted sub-folder names."""
    from PIL import Image

    if not os.path.isdir(root):
        raise FileNotFoundError(f'image folder {root!r} does not exist (expected <root>/<split>/<class>/<file>)')
    classes = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c)))
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(root, name))):
            path = os.path.join(root, name, file)
            try:
                with Image.open(path) as im:
                    im = im.convert('RGB')
                    if im.size != (image_size, image_size):
                        im = im.resize((image_size, image_size), Image.BILINEAR)
                    images.append(np.asarray(im, np.uint8))
            except OSError as e:
                raise ValueError(f'cannot read image {path}: {e}') from e
            labels.append(label)
    if not images:
        raise ValueError(f'image folder {root!r} holds no images in class sub-folders')
    return ArrayDataset(np.stack(images), np.asarray(labels, np.int32), len(classes))


def _local_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    per_process = global_batch // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def train_indices(num_examples: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """Dataset indices of global batch `step`: positions step*B .. step*B+B-1 of the
    concatenation of per-epoch permutations drawn from (seed, epoch)."""
    positions = step * global_batch + np.arange(global_batch)
    epochs, offsets = np.divmod(positions, num_examples)
    out = np.empty(global_batch, np.int64)
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
