"""Helpers shared by the tests."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


# XLA_FLAGS for a subprocess that compares 8 CPU devices with 1: LLVM -O0 compiles about ten times faster,
# and both sides of the comparison run in that process with the same flags.
EIGHT_CPU_DEVICES = '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0'


def init_variables(model, x, seed=0):
    """Initialise `model` on `x` and give every BatchNorm random statistics, so eval-mode
    tests exercise the running mean and variance instead of the trivial (0, 1)."""
    variables = model.init({'params': jax.random.key(seed), 'dropout': jax.random.key(seed + 1)}, x)
    if 'batch_stats' not in variables:
        return variables
    rng = np.random.default_rng(seed)

    def randomize(path, value):
        if path[-1].key == 'mean':
            return jnp.asarray(rng.normal(0, 0.5, value.shape), value.dtype)
        return jnp.asarray(rng.uniform(0.5, 2.0, value.shape), value.dtype)

    return dict(variables, batch_stats=jax.tree_util.tree_map_with_path(randomize, variables['batch_stats']))


def sown(model, variables, x, train=False, rngs=None):
    """Run `model` and return (output, intermediates collection)."""
    mutable = ['intermediates', 'batch_stats'] if train else ['intermediates']
    # jitted: op-by-op, a ResNet on a large batch takes a minute to dispatch
    out, state = jax.jit(functools.partial(model.apply, train=train, mutable=mutable))(variables, x, rngs=rngs)
    return out, state['intermediates']


def images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def tiny_config(**overrides):
    """A ResNet-8 of width 8 on 8x8 'shapes' images: a real run that compiles in seconds."""
    from resnet_jax.train.config import from_file

    c = from_file(str(Path(__file__).parents[1] / 'experiments' / 'quickstart.py'))
    c.model.stage_sizes = (1, 1, 1)
    c.model.widths = (8, 16, 32)
    c.model.stem_width = 8
    c.data.image_size = 8
    c.data.num_train = 512
    c.data.num_eval = 103
    c.batch_size = 32
    c.eval.batch_size = 24
    c.num_steps = 8
    c.optim.warmup_steps = 2
    c.log.every_steps = 4
    c.eval.every_steps = 8
    c.checkpoint.every_steps = 8
    c.log.progress_seconds = 0.0
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


CIFAR10_JPEG = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10-jpeg' / 'cifar10_jpeg.tar.gz'


def cifar10_jpeg() -> Path:
    """The CIFAR-10 JPEG folder (train/ and test/), unpacked once from ../shared into a cache outside
    the repository ($RESNET_JAX_CACHE, default /tmp/resnet_jax_cache); safe under pytest-xdist."""
    import os
    import tarfile
    import tempfile

    cache = Path(os.environ.get('RESNET_JAX_CACHE', '/tmp/resnet_jax_cache'))
    root = cache / 'cifar10-jpeg'
    if not (root / 'test').is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache))
        with tarfile.open(CIFAR10_JPEG) as tar:
            tar.extractall(staging, filter='data')
        try:
            os.rename(staging, root)  # atomic: another worker sees all of it or none
        except OSError:  # another worker got there first
            import shutil
            shutil.rmtree(staging)
    return root


def png_bytes(image) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='PNG')
    return buf.getvalue()


def random_image(rng, height: int, width: int):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_image_folder(root: Path, splits: dict, classes=('cat', 'ant', 'bee'), seed: int = 0) -> Path:
    """root/<split>/<class>/<i>.png with `splits[split]` images per class, or per named class when it
    is a dict {class: images} (0: an empty class folder), of varied sizes."""
    rng = np.random.default_rng(seed)
    for split, counts in splits.items():
        for name, count in (counts if isinstance(counts, dict) else dict.fromkeys(classes, counts)).items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                (root / split / name / f'{i:03d}.png').write_bytes(png_bytes(random_image(rng, 20 + i % 7, 24 + i % 5)))
    return root


@functools.cache
def _tiny_shapes_builder():
    """The builder class, defined once per process: TFDS refuses to register a name twice."""
    import io

    import tensorflow_datasets as tfds

    class TinyShapes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, supervised_keys=('image', 'label'), features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
                'label': tfds.features.ClassLabel(names=['red', 'green', 'blue', 'grey'])}))

        def _split_generators(self, dl_manager):
            return {'train': self._generate_examples(0, 40), 'test': self._generate_examples(1, 13)}

        def _generate_examples(self, seed, n):
            rng = np.random.default_rng(seed)
            for i in range(n):
                yield i, {'image': io.BytesIO(png_bytes(random_image(rng, 18 + i % 5, 22 + i % 3))), 'label': i % 4}

    return TinyShapes


def build_tfds_dataset(data_dir: Path) -> str:
    """A small TFDS image-classification dataset 'tiny_shapes' (40 train, 13 test records of varied
    sizes) prepared as ArrayRecord in `data_dir`, built without TensorFlow (images handed over as PNG)."""
    _tiny_shapes_builder()(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
    return 'tiny_shapes'
