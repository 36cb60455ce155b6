"""Real learning on real images: ResNet-8 on 10,000 CIFAR-10 JPEG training images, tested on all 10,000.

The threshold, 45% top-1 on the full test set: chance is 10%, and a linear classifier on raw
pixels reaches about 39-41% on CIFAR-10 even with all 50,000 training images, so passing needs
features learned by the network. This run (400 steps of batch 128, 5.1 epochs of the subset,
about 2 minutes on the idle 2-core machine) measured 51.2% on the development machine (54.8% at
600 steps); the margin covers platform and library-version noise. The data is the lossy JPEG copy in ../shared, not
TFDS's cifar10.
"""

from pathlib import Path

import pytest
from helpers import cifar10_jpeg

from resnet_jax.train.config import from_file
from resnet_jax.train.loop import train_and_evaluate

pytestmark = pytest.mark.slow

THRESHOLD = 0.45


def test_resnet8_learns_cifar10_from_jpeg_files(tmp_path):
    c = from_file(str(Path(__file__).parents[1] / 'experiments' / 'cifar10.py') + ':resnet20')
    c.data.dataset = f'folder:{cifar10_jpeg()}'
    c.data.train_subset = 10_000
    c.model.stage_sizes = (1, 1, 1)  # ResNet-8
    c.num_steps = 400
    c.optim.schedule, c.optim.boundaries = 'cosine', ()
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 5e-4
    c.eval.batch_size = 1000
    c.eval.every_steps = c.checkpoint.every_steps = 400
    c.log.every_steps = 100
    final = train_and_evaluate(c, str(tmp_path))
    assert final['eval/top1'] > THRESHOLD, final
