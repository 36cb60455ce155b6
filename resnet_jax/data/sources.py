"""Record sources: random access to a split's (image, label) records, by index.

A source has `len`, `num_classes`, `source[i] -> (uint8 HWC image or encoded bytes/path, label)`
and `name(i)` for error messages. `open_source(config, split)` picks one from
`config.data.dataset`:

    shapes, synthetic          generated in memory (`arrays.ArrayDataset`)
    folder:<root>              <root>/<split>/<class>/<file>; the training split's class
                               folders, sorted by name, are the classes of every split
    tfds:<name>[:<version>]    a TFDS dataset prepared as ArrayRecord, read through
                               `tfds.data_source` without TensorFlow

`load(config, split)` decodes a whole source into an `ArrayDataset` for the in-memory feeds, and
`class_names(config)` is the label map (class names in label order) that training records.
`check_config` refuses a dataset name or data.on_corrupt value that cannot be read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent import futures

import numpy as np

from resnet_jax.data import arrays, augment, shapes
from resnet_jax.errors import UserError, check_field_choice, close_matches, refuse

DATASETS = ('shapes', 'synthetic', 'folder:<path>', 'tfds:<name>[:<version>]')
ON_CORRUPT = ('error', 'skip')  # data.on_corrupt: an unreadable image stops the run, or is left out and counted
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')


def check_dataset_name(dataset: str) -> None:
    """Raise a ValueError unless `dataset` has one of the forms of DATASETS (before anything is read)."""
    if dataset in ('shapes', 'synthetic'):
        return
    for prefix in ('folder:', 'tfds:'):
        if dataset.startswith(prefix) and dataset[len(prefix):]:
            return
    raise ValueError(f'{dataset!r} is not supported; choose one of: {", ".join(DATASETS)}')


def check_config(config) -> None:
    """Refuse a data.dataset of no known form and an unknown data.on_corrupt, naming the field."""
    try:
        check_dataset_name(config.data.dataset)
    except ValueError as e:
        refuse('data.dataset', str(e))
    check_field_choice('data.on_corrupt', config.data.on_corrupt, ON_CORRUPT)


class DatasetError(UserError, ValueError):
    """A dataset that cannot be read as labelled data; the message names the folder or split."""


def visible(names) -> list[str]:
    """`names` without hidden entries ('.DS_Store', '.ipynb_checkpoints', ...), sorted."""
    return sorted(n for n in names if not n.startswith('.'))


def folder_classes(root: str) -> tuple[str, ...]:
    """The class names of an image-folder split: its sub-folders sorted by name, hidden ones ignored."""
    if not os.path.isdir(root):
        raise DatasetError(f'image folder {root!r} does not exist (expected <root>/<split>/<class>/<file>)')
    return tuple(c for c in visible(os.listdir(root)) if os.path.isdir(os.path.join(root, c)))


@dataclasses.dataclass(frozen=True)
class FolderSource:
    """Image files under root/<class>/; records are (path, label), decoded by the reader."""
    root: str
    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]

    @classmethod
    def scan(cls, root: str, train_root: str | None = None) -> FolderSource:
        """The images of split `root`, labelled by the class list of `train_root` (default: `root`
        itself, the training split), matched by folder name. A class folder the training split
        lacks, an empty class folder or a training split of fewer than two classes is an error."""
        found = folder_classes(root)
        if train_root is None or os.path.normpath(train_root) == os.path.normpath(root):
            classes = found
            if len(classes) < 2:
                raise DatasetError(f'image folder {root!r} has {len(classes)} class folder(s) '
                                   f'{list(classes)}; a classification dataset needs at least 2 '
                                   '(expected <root>/<split>/<class>/<file>)')
        else:
            classes = folder_classes(train_root)
            extra = [c for c in found if c not in classes]
            if extra:
                raise DatasetError(f'class folder {extra[0]!r} of {root} is not a class of the training split '
                                   f'{train_root} ({len(classes)} classes: {", ".join(classes[:10])}'
                                   f'{", ..." if len(classes) > 10 else ""}); an evaluation split may only hold '
                                   'classes the model is trained on')
        paths, labels, label_of = [], [], {name: label for label, name in enumerate(classes)}
        for name in found:
            files = [f for f in visible(os.listdir(os.path.join(root, name))) if f.lower().endswith(IMAGE_SUFFIXES)]
            if not files:
                raise DatasetError(f'class folder {os.path.join(root, name)!r} holds no images '
                                   f'({", ".join(IMAGE_SUFFIXES)}); remove it or fill it')
            paths += [os.path.join(root, name, f) for f in files]
            labels += [label_of[name]] * len(files)
        if not paths:
            raise DatasetError(f'image folder {root!r} holds no images ({", ".join(IMAGE_SUFFIXES)}) '
                               'in class sub-folders')
        return cls(root, tuple(paths), np.asarray(labels, np.int32), classes)

    @property
    def num_classes(self) -> int:
        """How many classes the labels range over (the source protocol of the module docstring)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.paths[i], int(self.labels[i])

    def name(self, i: int) -> str:
        """Record i as an error message names it (the file, or the TFDS record and split)."""
        return self.paths[i]


class DatasetNotPreparedError(UserError, FileNotFoundError):
    """A TFDS dataset that is not on disk; the message says how to prepare it."""


class TfdsSource:
    """A split of a TFDS image-classification dataset prepared as ArrayRecord, read by index."""

    def __init__(self, spec: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds

        self.spec, self.split = spec, split
        self.dataset_name = spec.split(':')[0].split('/')[0]
        name = spec  # TFDS's own 'name[/config][:version]'
        registered = tfds.list_builders(with_community_datasets=False)
        prepared_dir = os.path.join(_data_dir(data_dir), self.dataset_name)
        if self.dataset_name not in registered and not os.path.isdir(prepared_dir):
            raise DatasetError(f'config.data.dataset=tfds:{spec}: TFDS has no dataset {self.dataset_name!r} and '
                               f'none is prepared in {_data_dir(data_dir)}.{close_matches(self.dataset_name, registered)}')
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:  # a version or config that is not there
            versions = sorted(os.listdir(prepared_dir)) if os.path.isdir(prepared_dir) else []
            raise DatasetError(f'config.data.dataset=tfds:{spec}: not found; {prepared_dir} holds '
                               f'{", ".join(versions) or "nothing"}') from None
        self.image_key, self.label_key = builder.info.supervised_keys or ('image', 'label')
        try:
            self._records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:
            if builder.is_prepared():
                raise DatasetError(f'TFDS {name} in {builder.data_dir} is prepared as '
                                   f'{builder.info.file_format.value}, which has no random access; prepare it '
                                   f'again with: tfds build {self.dataset_name} --data_dir={_data_dir(data_dir)} '
                                   '--file_format=array_record') from e
            raise DatasetNotPreparedError(
                f'TFDS dataset {name!r} is not prepared in {_data_dir(data_dir)} and is never downloaded during '
                f'training. Prepare it once (on a machine with internet access, or with the manual download in '
                f'place for datasets such as imagenet2012): tfds build {self.dataset_name} '
                f'--data_dir={_data_dir(data_dir)} --file_format=array_record') from e
        # One ClassLabel feature for every split: the label map cannot differ between splits.
        label = self._records.dataset_info.features[self.label_key]
        self.num_classes = label.num_classes
        self.classes = tuple(label.names)
        if self.num_classes < 2:
            raise DatasetError(f'tfds:{spec}: its label {self.label_key!r} has {self.num_classes} class(es); a '
                               'classification dataset needs at least 2')

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int):
        try:  # TFDS decodes the image (with PIL, no TensorFlow)
            record = self._records[i]
        except Exception as e:
            raise augment.CorruptImageError(f'cannot decode {self.name(i)}: {type(e).__name__}: {e}') from e
        return record[self.image_key], int(record[self.label_key])

    def name(self, i: int) -> str:
        """Record i as an error message names it (the file, or the TFDS record and split)."""
        return f'record {i} of tfds:{self.spec} split {self.split!r}'


def _data_dir(data_dir: str | None) -> str:
    return data_dir or os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


@dataclasses.dataclass(frozen=True)
class Subset:
    """Records `indices` of `source`: a fixed random subset of a training split."""
    source: object
    indices: np.ndarray

    @property
    def num_classes(self) -> int:
        """How many classes the labels range over (the source protocol of the module docstring)."""
        return self.source.num_classes

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names in label order: those of the source the subset is drawn from."""
        return self.source.classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]

    def name(self, i: int) -> str:
        """Record i as an error message names it (the file, or the TFDS record and split)."""
        return self.source.name(int(self.indices[i]))


def validation_indices(num_examples: int, held_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) indices, sorted and disjoint, of a training split of `num_examples`:
    `held_out` of them drawn at random, fixed by the two sizes alone (the same for every seed, so
    runs that differ in seed are selected on the same examples)."""
    if not 0 < held_out < num_examples:
        raise ValueError(f'config.data.validation_split: {held_out} must be between 1 and {num_examples - 1}, '
                         f'leaving training examples of the {num_examples} in the training split')
    order = np.random.default_rng([num_examples, held_out, 0x7a1]).permutation(num_examples)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def _take(source, indices: np.ndarray):
    if isinstance(source, arrays.ArrayDataset):
        return arrays.ArrayDataset(source.images[indices], source.labels[indices], source.num_classes)
    return Subset(source, indices)


def open_source(config, split: str, held_out: bool = False):
    """The records of `split` of `config.data.dataset`. From the training split, data.validation_split
    examples are held out (`validation_indices`; held_out=True returns them instead), and
    data.train_subset trims what remains."""
    d = config.data
    if held_out and (split != d.train_split or not d.validation_split):
        raise ValueError(f'held-out examples come from the training split {d.train_split!r} with '
                         f'data.validation_split > 0, not from {split!r} with {d.validation_split}')
    check_dataset_name(d.dataset)
    if d.dataset in ('shapes', 'synthetic'):
        source = arrays.generated(config, split)
    elif d.dataset.startswith('folder:'):
        root = d.dataset[len('folder:'):]
        source = FolderSource.scan(os.path.join(root, split), os.path.join(root, d.train_split))
    else:
        source = TfdsSource(d.dataset[len('tfds:'):], split, d.tfds_data_dir)
    if split == d.train_split and d.validation_split:
        train, validation = validation_indices(len(source), d.validation_split)
        source = _take(source, validation if held_out else train)
        if held_out:
            return source
    if split == d.train_split and 0 < d.train_subset < len(source):
        # Fixed by the subset size alone, so runs with different seeds train on the same examples.
        indices = np.sort(np.random.default_rng([d.train_subset, 0x5b5e7]).permutation(len(source))[:d.train_subset])
        source = Subset(source, indices)
    return source


def class_names(config) -> tuple[str, ...]:
    """The label map of `config.data.dataset`: class names in label order, as the training split
    defines them (folder datasets: its class folders; TFDS: its label feature)."""
    d = config.data
    if d.dataset == 'shapes':
        return tuple(shapes.CLASSES)
    if d.dataset == 'synthetic':
        return tuple(str(i) for i in range(arrays.generated_classes(config)))
    if d.dataset.startswith('folder:'):
        return folder_classes(os.path.join(d.dataset[len('folder:'):], d.train_split))
    return open_source(config, d.train_split).classes


def read(source, i: int, on_corrupt: str, size: int | None = None):
    """(decoded image, label, skipped) of record i; with on_corrupt='skip' a record that cannot be
    decoded is replaced by the next readable one and `skipped` counts the records passed over."""
    for skipped in range(len(source)):
        j = (i + skipped) % len(source)
        try:
            data, label = source[j]
            image = augment.decode(data, source.name(j))
        except augment.CorruptImageError as e:
            if on_corrupt != 'skip':
                raise
            logging.warning('skipping %s', e)
            continue
        return (image if size is None else augment.resize(image, size)), label, skipped
    raise ValueError(f'no record of {len(source)} could be decoded')


def load(config, split: str, held_out: bool = False) -> arrays.ArrayDataset:
    """`split` (its held-out part, see `open_source`) decoded into memory at data.image_size (resized
    where it differs); unreadable files raise an error naming them, or with data.on_corrupt='skip'
    are left out and counted."""
    source = open_source(config, split, held_out)
    if isinstance(source, arrays.ArrayDataset):
        return source
    size = config.data.image_size

    def one(i):
        try:
            return read(source, i, 'error', size)[:2]
        except augment.CorruptImageError:
            if config.data.on_corrupt == 'skip':
                return None
            raise

    with futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        records = [r for r in pool.map(one, range(len(source)), chunksize=256) if r is not None]
    skipped = len(source) - len(records)
    if skipped:
        logging.warning('%s %s: skipped %d unreadable image(s)', config.data.dataset, split, skipped)
    if not records:
        raise ValueError(f'{config.data.dataset} {split}: no readable images')
    return arrays.ArrayDataset(np.stack([r[0] for r in records]), np.asarray([r[1] for r in records], np.int32),
                               source.num_classes, skipped=skipped)
