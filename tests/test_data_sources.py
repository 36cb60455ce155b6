"""Record sources: the real CIFAR-10 JPEG folder, corrupt files, TFDS (mocked, test-built, missing)."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import build_tfds_dataset, cifar10_jpeg, make_image_folder, tiny_config

from resnet_jax.data import augment, pipeline, sources
from resnet_jax.errors import ConfigError
from resnet_jax.train.config import validate

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def folder_config(root, **overrides):
    return tiny_config(**{'data.dataset': f'folder:{root}', 'data.image_size': 32, **overrides})


@pytest.mark.slow
def test_cifar10_jpeg_folder_has_the_published_splits():
    """Decoded in full: 50,000 training and 10,000 test images of 32x32, 10 sorted classes, balanced."""
    config = folder_config(cifar10_jpeg())
    for split, per_class in (('train', 5000), ('test', 1000)):
        ds = sources.load(config, split)
        assert ds.images.shape == (10 * per_class, 32, 32, 3) and ds.images.dtype == np.uint8
        assert ds.num_classes == 10 and ds.skipped == 0
        np.testing.assert_array_equal(np.bincount(ds.labels), [per_class] * 10)
        assert 60 < ds.images.mean() < 180  # real photographs, not blank decodes
    assert sources.FolderSource.scan(str(cifar10_jpeg() / 'test')).classes == CIFAR10_CLASSES


@pytest.fixture
def corrupt_copy(tmp_path):
    """The CIFAR-10 test split linked file by file into tmp_path, with one file overwritten by garbage."""
    original = cifar10_jpeg() / 'test'
    for name in CIFAR10_CLASSES:
        (tmp_path / 'test' / name).mkdir(parents=True)
        for file in os.listdir(original / name):
            os.symlink(original / name / file, tmp_path / 'test' / name / file)
    bad = tmp_path / 'test' / 'dog' / '0417.jpg'
    bad.unlink()
    bad.write_bytes(b'\xff\xd8\xff not a jpeg')
    return tmp_path, bad


def test_a_corrupt_file_is_named_or_skipped_and_counted(corrupt_copy):
    root, bad = corrupt_copy
    with pytest.raises(augment.CorruptImageError, match=str(bad)):
        sources.load(folder_config(root, **{'data.train_split': 'test'}), 'test')
    ds = sources.load(folder_config(root, **{'data.on_corrupt': 'skip', 'data.train_split': 'test'}), 'test')
    assert len(ds) == 9_999 and ds.skipped == 1
    assert np.bincount(ds.labels)[CIFAR10_CLASSES.index('dog')] == 999


def test_the_stream_replaces_a_corrupt_record_and_counts_it(corrupt_copy):
    root, bad = corrupt_copy
    config = folder_config(root, **{'data.feed': 'stream', 'data.augment': 'none', 'data.train_split': 'test',
                                    'batch_size': 500})
    source = pipeline.open_split(config, 'test')
    with pytest.raises(augment.CorruptImageError, match=str(bad)):
        batches = pipeline.train_iterator(config, source, process_index=0, process_count=1)
        for _ in range(20):  # one epoch
            next(batches)
    config.data.on_corrupt = 'skip'
    batches = pipeline.train_iterator(config, source, process_index=0, process_count=1)
    for _ in range(20):
        next(batches)
    assert batches.skipped == 1 and batches.get_state()['skipped'] == 1


def test_the_training_split_defines_the_classes_and_hidden_entries_are_ignored(tmp_path):
    """A test split lacking a class, a hidden folder or file in train/: labels are matched by name."""
    root = make_image_folder(tmp_path, {'train': {'cat': 2, 'dog': 3, 'emu': 1, '.ipynb_checkpoints': 1},
                                   'test': {'dog': 2, 'emu': 1}})
    (root / 'train' / 'cat' / '.DS_Store').write_bytes(b'not an image')
    (root / 'train' / 'dog' / '.hidden.png').write_bytes(b'not an image')
    config = folder_config(root, **{'data.image_size': 8})
    train, test = sources.load(config, 'train'), sources.load(config, 'test')
    assert train.num_classes == test.num_classes == 3 and len(train) == 6
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(test.labels, [1, 1, 2])  # dog and emu keep their training labels
    assert sources.class_names(config) == ('cat', 'dog', 'emu')
    config.data.feed = 'stream'
    stream = pipeline.open_split(config, 'test')
    assert stream.classes == ('cat', 'dog', 'emu') and [stream[i][1] for i in range(len(stream))] == [1, 1, 2]


@pytest.mark.parametrize('splits,message', [
    ({'train': {'cat': 1, 'dog': 1}, 'test': {'cat': 1, 'cow': 1}},
     r"class folder 'cow' of .*/test is not a class of the training split .*/train \(2 classes: cat, dog\)"),
    ({'train': {'cat': 1, 'dog': 0}, 'test': {'cat': 1}}, r"class folder '.*/train/dog' holds no images"),
    ({'train': {'cat': 2, '.git': 1}, 'test': {'cat': 1}}, r"has 1 class folder\(s\) \['cat'\]; .* at least 2"),
])
def test_datasets_that_would_mislabel_are_errors(tmp_path, splits, message):
    config = folder_config(make_image_folder(tmp_path, splits), **{'data.image_size': 8})
    with pytest.raises(sources.DatasetError, match=message):
        for split in ('train', 'test'):
            sources.load(config, split)


def test_tfds_mock_data_through_both_readers():
    """tfds.testing.mock_data stands in for a prepared cifar10: decoded into memory, and streamed."""
    config = tiny_config(**{'data.dataset': 'tfds:cifar10', 'data.image_size': 32, 'data.tfds_data_dir': '/nonexistent'})
    with tfds.testing.mock_data(num_examples=40):
        ds = sources.load(config, 'train')
        assert ds.images.shape == (40, 32, 32, 3) and ds.num_classes == 10
        config.data.feed = 'stream'
        source = pipeline.open_split(config, 'train')
        batch = next(pipeline.train_iterator(config, source, process_index=0, process_count=1))
    assert batch['image'].shape == (32, 32, 32, 3) and batch['label'].max() < 10


def test_tfds_split_slicing_and_image_sizes(tmp_path):
    name = build_tfds_dataset(tmp_path)
    config = tiny_config(**{'data.dataset': f'tfds:{name}:1.0.0', 'data.tfds_data_dir': str(tmp_path),
                            'data.image_size': 16, 'data.train_split': 'train[:10]'})
    ds = sources.load(config, 'train[:10]')
    assert ds.images.shape == (10, 16, 16, 3) and ds.num_classes == 4
    raw = sources.open_source(config, 'train')
    assert len(raw) == 40 and raw[3][0].shape == (21, 22, 3)  # the stored size, before resizing
    config.data.train_subset = 5  # the label map through a subset of the training split
    assert sources.class_names(config) == ('red', 'green', 'blue', 'grey')


def test_a_tfds_dataset_that_is_not_prepared_says_how_to_prepare_it(tmp_path):
    config = tiny_config(**{'data.dataset': 'tfds:cifar10', 'data.tfds_data_dir': str(tmp_path)})
    with pytest.raises(sources.DatasetNotPreparedError) as error:
        sources.open_source(config, 'train')
    message = str(error.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert f'tfds build cifar10 --data_dir={tmp_path} --file_format=array_record' in message
    config.data.dataset = 'tfds:cifar1O'
    with pytest.raises(ValueError, match='Did you mean: cifar10'):
        sources.open_source(config, 'train')


@pytest.mark.parametrize('overrides,message', [
    ({'data.dataset': 'imagenet'}, "'imagenet' is not supported; choose one of: shapes, synthetic, folder:<path>"),
    ({'data.augment': 'inception'}, "'inception' crops variable-size images on the host; it needs data.feed='stream'"),
    ({'data.on_corrupt': 'ignore'}, 'on_corrupt'),
    ({'data.mixup_alpha': -1.0}, 'data.mixup_alpha: must be >= 0'),
    ({'data.mean': (0.5, 0.5, 0.5)}, 'set both data.mean and data.std'),
])
def test_bad_data_fields_fail_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace('[', r'\[')):
        validate(tiny_config(**overrides), num_devices=1)


@pytest.mark.slow
def test_the_label_map_is_recorded_and_checked_on_resume_and_evaluate(tmp_path):
    """labels.json holds the training classes; a class folder added later stops resume and evaluate."""
    import json

    from resnet_jax import evaluate
    from resnet_jax import workdir as workdir_lib
    from resnet_jax.train.loop import train_and_evaluate

    root = make_image_folder(tmp_path / 'data', {'train': {'cat': 4, 'dog': 4}, 'test': {'dog': 2}})
    config = folder_config(root, **{'data.image_size': 8, 'batch_size': 8, 'eval.batch_size': 8, 'num_steps': 2,
                                    'optim.warmup_steps': 0, 'log.every_steps': 1, 'eval.every_steps': 2,
                                    'checkpoint.every_steps': 2})
    workdir = str(tmp_path / 'run')
    train_and_evaluate(config, workdir)
    assert json.loads((tmp_path / 'run' / 'labels.json').read_text()) == {'classes': ['cat', 'dog']}
    make_image_folder(root, {'train': {'ant': 1}})  # sorts first: every label would shift by one
    config.num_steps = 4
    for attempt in (lambda: train_and_evaluate(config, workdir), lambda: evaluate.evaluate_workdir(workdir)):
        with pytest.raises(workdir_lib.LabelMapError, match="label 0 was 'cat', now 'ant' \\(2 classes then, 3 now\\)"):
            attempt()
