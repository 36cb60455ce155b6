"""The procedural Shapes dataset: format, determinism, balance, split separation, no colour
shortcut, and the property the quickstart relies on, learnable by a small convnet but not
by a pixel-template classifier."""


import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from resnet_jax.data import shapes

NUM_CLASSES = len(shapes.CLASSES)


def test_classes():
    assert len(shapes.CLASSES) == 10
    assert len(set(shapes.CLASSES)) == 10


@pytest.mark.parametrize('size', [8, 16, 32, 64])
def test_shapes_dtypes_and_range(size):
    images, labels = shapes.generate(50, size, seed=0)
    assert images.shape == (50, size, size, 3) and images.dtype == np.uint8
    assert labels.shape == (50,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < NUM_CLASSES
    # Every image shows an object: pixels far (in RGB) from the background colour, which
    # the median finds because the object never covers half the image. Noise alone stays
    # within about 60 levels.
    pixels = images.reshape(50, -1, 3).astype(np.float32)
    background = np.median(pixels, axis=1, keepdims=True)
    object_fraction = (np.linalg.norm(pixels - background, axis=-1) > 90).mean(axis=1)
    assert np.all(object_fraction > 0) and np.all(object_fraction < 0.5), object_fraction


def test_empty_and_invalid_arguments():
    images, labels = shapes.generate(0, 16)
    assert images.shape == (0, 16, 16, 3) and labels.shape == (0,)
    with pytest.raises(ValueError, match='image_size'):
        shapes.generate(10, 4)
    with pytest.raises(ValueError, match='num_examples'):
        shapes.generate(-1, 16)


def test_deterministic_in_seed():
    images, labels = shapes.generate(300, 16, seed=7)
    again_images, again_labels = shapes.generate(300, 16, seed=7)
    np.testing.assert_array_equal(images, again_images)
    np.testing.assert_array_equal(labels, again_labels)
    other_images, other_labels = shapes.generate(300, 16, seed=8)
    assert not np.array_equal(labels, other_labels)
    # Not one image is repeated across seeds.
    assert not np.any(np.all(images == other_images, axis=(1, 2, 3)))


def test_balanced_shuffled_labels():
    _, labels = shapes.generate(1000, 16, seed=0)
    assert np.all(np.bincount(labels, minlength=NUM_CLASSES) == 100)
    assert not np.array_equal(labels, np.arange(1000) % NUM_CLASSES)
    assert not np.array_equal(labels, np.sort(labels))
    _, labels = shapes.generate(1003, 16, seed=0)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    assert counts.sum() == 1003 and counts.max() - counts.min() <= 1


def test_splits_do_not_overlap():
    data = shapes.splits(image_size=16, num_train=2000, num_eval=500, seed=0)
    assert set(data) == {'train', 'test'}
    (train_x, train_y), (test_x, test_y) = data['train'], data['test']
    assert train_x.shape == (2000, 16, 16, 3) and test_x.shape == (500, 16, 16, 3)
    assert train_y.shape == (2000,) and test_y.shape == (500,)
    assert not {x.tobytes() for x in train_x} & {x.tobytes() for x in test_x}
    # The test split depends only on its own seed, not on the size of the train split.
    np.testing.assert_array_equal(shapes.splits(16, 100, 500, seed=0)['test'][0], test_x)
    assert not np.array_equal(shapes.splits(16, 100, 500, seed=1)['test'][0], test_x)


def test_colour_carries_no_class_information():
    images, labels = shapes.generate(2000, 32, seed=0)
    mean_rgb = images.reshape(len(images), -1, 3).mean(axis=1)  # (N, 3), one colour per image
    overall = mean_rgb.mean(axis=0)
    for c, name in enumerate(shapes.CLASSES):
        per_class = mean_rgb[labels == c]
        deviation = per_class.mean(axis=0) - overall
        std_error = per_class.std(axis=0) / np.sqrt(len(per_class))
        # Each class's mean colour is within sampling noise (and 20 of 255 levels) of the rest.
        assert np.all(np.abs(deviation) < 4.5 * std_error), (name, deviation, std_error)
        assert np.all(np.abs(deviation) < 20), (name, deviation)
    # And a nearest-class-mean classifier on an image's mean colour is at chance.
    test_images, test_labels = shapes.generate(2000, 32, seed=1)
    accuracy = nearest_class_mean_accuracy(mean_rgb, labels,
                                           test_images.reshape(len(test_images), -1, 3).mean(axis=1), test_labels)
    assert accuracy < 0.2, accuracy


@pytest.fixture(scope='module')
def small_splits():
    """16x16 images: the size at which the learnability checks run in seconds on a CPU."""
    return shapes.splits(image_size=16, num_train=10_000, num_eval=2000, seed=0)


def nearest_class_mean_accuracy(train_x, train_y, test_x, test_y):
    means = np.stack([train_x[train_y == c].mean(axis=0) for c in range(NUM_CLASSES)])
    distances = ((test_x[:, None, :] - means[None]) ** 2).sum(axis=-1)
    return float((distances.argmin(axis=1) == test_y).mean())


def test_raw_pixel_templates_do_not_solve_it(small_splits, record_property):
    """With random colours, positions and sizes, the class-mean images are nearly flat:
    a pixel-template classifier stays near chance (0.1), so the task needs convolutions."""
    (train_x, train_y), (test_x, test_y) = small_splits['train'], small_splits['test']
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32)  # noqa: E731
    accuracy = nearest_class_mean_accuracy(flat(train_x), train_y, flat(test_x), test_y)
    record_property('nearest_class_mean_accuracy', accuracy)
    print(f'nearest-class-mean accuracy on raw 16x16 pixels: {accuracy:.3f}')
    assert accuracy < 0.6, accuracy


class TinyCNN(nn.Module):
    """Two 3x3 convolutions, global max pooling, a linear classifier.

    Max rather than mean pooling: the object covers 5-45% of the image at a random place,
    and "is this local pattern anywhere" is the question; a mean dilutes it by the area.
    """

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        return nn.Dense(NUM_CLASSES)(x.max(axis=(1, 2)))


def standardise(images):
    """Per-image zero mean and unit variance: removes the random colours' brightness and
    contrast, so the first layer sees edges on one scale."""
    x = images.astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = x.std(axis=(1, 2, 3), keepdims=True)
    return (x - mean) / (std + 1.0)


@pytest.mark.slow
def test_small_convnet_learns_it(small_splits, record_property):
    """The classes are separable by local shape: a tiny convnet gets well above 0.8 after
    200 steps of batch 64 (about 10 s on 2 CPU cores), where pixel templates are at chance."""
    (train_x, train_y), (test_x, test_y) = small_splits['train'], small_splits['test']
    train_x, test_x = standardise(train_x), standardise(test_x)
    model = TinyCNN()
    params = model.init(jax.random.key(0), train_x[:1])
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(0)
    for _ in range(200):
        batch = rng.integers(0, len(train_x), 64)
        params, opt_state = step(params, opt_state, train_x[batch], train_y[batch])
    predictions = np.asarray(jax.jit(model.apply)(params, test_x).argmax(axis=-1))
    accuracy = float((predictions == test_y).mean())
    record_property('cnn_accuracy', accuracy)
    print(f'tiny CNN test accuracy on 16x16 after 200 steps: {accuracy:.3f}')
    assert accuracy > 0.8, accuracy
