"""The feed (`config.data.feed`) as one object, so that nothing outside `resnet_jax.data` branches on it.

A `Feed` hands the training loop the next input of the train step (`next_input()`) and the step
the function that turns that input into the global batch (`to_batch(inputs, step)`, traced inside
the jitted step). For 'host' and 'stream' the input is the batch itself, assembled on the mesh;
for 'device' it is the device-resident dataset, from which `to_batch` draws batch `step`
(`data.device.batch_at`), so the host does nothing per step.
"""

from __future__ import annotations

import importlib.util

from resnet_jax import sharding
from resnet_jax.data import device, pipeline
from resnet_jax.errors import check_field_choice, refuse

FEEDS = ('host', 'device', 'stream')


def check_config(config) -> None:
    """data.feed, and what the other data fields need of it, before any data is read."""
    d = config.data
    check_field_choice('data.feed', d.feed, FEEDS)
    if d.augment == 'inception' and d.feed != 'stream':
        refuse('data.augment', "'inception' crops variable-size images on the host; it needs data.feed='stream'")
    if d.feed == 'stream' and importlib.util.find_spec('grain') is None:
        refuse('data.feed', "'stream' reads through Grain, which is not installed: pip install grain")
    in_memory = "needs an in-memory feed (data.feed 'host' or 'device'); the 'stream' feed"
    if d.normalize == 'per_pixel_mean' and d.feed == 'stream':
        refuse('data.normalize', f"'per_pixel_mean' {in_memory} would have to read every training image first")
    if d.pad_after_normalize and d.feed == 'stream':
        refuse('data.pad_after_normalize', f'{in_memory} crops uint8 images on the host, before normalising')


def check_fits(config, num_train: int, shards: int) -> None:
    """Refuse a batch larger than what the 'device' feed holds over `shards` shards (it keeps
    num_train // shards examples per shard); the other feeds draw from the whole split."""
    held = num_train // shards * shards
    if config.data.feed == 'device' and config.batch_size > held:
        refuse('batch_size', f"{config.batch_size} exceeds the {held} examples that "
                             f"data.feed='device' holds over {shards} shards; use a smaller batch or data.feed='host'")


def step_augmentation(config) -> str:
    """The augmentation the train step applies: the in-memory feeds' (the stream feed augments on the host)."""
    return 'none' if config.data.feed == 'stream' else config.data.augment


def _as_is(inputs, step):
    """The batch of the 'host' and 'stream' feeds: the input itself."""
    del step
    return inputs


class Feed:
    """The training input of a config on a mesh: what the loop passes to the step, and how the step reads it."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        self.to_batch = self._draw if config.data.feed == 'device' else _as_is

    def _draw(self, dataset, step):
        """Global batch `step` drawn from the device-resident dataset, inside the jitted step."""
        return device.batch_at(dataset, self.config.seed, step, self.config.batch_size, self.mesh)

    def train_inputs(self, source, start_step: int = 0):
        """(iterator, next_input): next_input() is the train step's input for steps start_step,
        start_step+1, ...: the next global batch, or the device-resident dataset itself. The
        iterator's get_state/set_state save and restore the position."""
        batches = pipeline.train_iterator(self.config, source, self.mesh, start_step)
        if self.config.data.feed == 'device':
            return batches, lambda: next(batches)
        return batches, lambda: sharding.global_batch(next(batches), self.mesh)

    def fixed_inputs(self, source):
        """next_input() for timing the step with no host work at all: every call returns one input prepared
        once. For 'host' that is the in-memory source's first batch_size examples (not shuffled, not
        augmented), placed on the mesh; for 'device' the resident dataset, as in training (the step draws
        a new batch from it each time)."""
        if self.config.data.feed == 'device':
            return self.train_inputs(source)[1]
        size = self.config.batch_size
        fixed = sharding.global_batch({'image': source.images[:size], 'label': source.labels[:size]}, self.mesh)
        return lambda: fixed


def make(config, mesh) -> Feed:
    """The feed `config.data.feed` names, on `mesh`."""
    return Feed(config, mesh)
