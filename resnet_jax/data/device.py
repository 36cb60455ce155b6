"""Device-resident training data: the whole uint8 dataset lives in device memory.

For CIFAR-sized data the host has nothing to do per step: `put` shards the dataset over the
mesh's batch axes once, and `batch_at(data, seed, step, batch_size)`, traced into the train
step, draws each shard's examples from its own per-epoch permutation. Each of the S shards
holds N // S examples (the N % S left over are never drawn) and contributes batch_size // S
examples to every global batch, so batch t is a pure function of (seed, t, S): a resumed run
sees exactly the batches it would have seen, on a mesh with the same number of data shards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from resnet_jax.data.arrays import ArrayDataset
from resnet_jax.sharding import BATCH_AXES, batch_sharding


def num_shards(mesh: Mesh) -> int:
    """The number of data shards of `mesh` (its batch axes together): each holds its own slice of the dataset."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def put(ds: ArrayDataset, mesh: Mesh, seed: int) -> dict[str, jax.Array]:
    """{'image', 'label'} as global arrays split evenly over the batch axes of `mesh`.

    The examples are dealt out in an order drawn from `seed`, so that every shard holds a mix
    of classes even when the dataset is stored class by class. Every process holds the whole
    dataset in host memory and uploads only the rows of the shards on its own devices.
    """
    shards = num_shards(mesh)
    per_shard = len(ds) // shards
    if per_shard < 1:
        raise ValueError(f'the dataset has {len(ds)} examples, fewer than the {shards} data shards')
    sharding = batch_sharding(mesh)
    kept = per_shard * shards

    order = np.random.default_rng([seed, 2 ** 31 - 1]).permutation(len(ds))[:kept]

    def upload(array):
        array = array[order]
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return {'image': upload(ds.images), 'label': upload(ds.labels)}


def batch_at(data: dict[str, jax.Array], seed: int, step, batch_size: int, mesh: Mesh) -> dict[str, jax.Array]:
    """Global batch `step` (a traced scalar) drawn from device-resident `data`, under jit.

    Shard s takes positions step*b .. step*b+b-1 (b = batch_size / S) of the concatenation of
    its per-epoch permutations; permutation e of shard s is drawn from (seed, s, e). A batch
    straddles at most two epochs, so two permutations per step cover it.
    """
    shards = num_shards(mesh)
    local_batch = batch_size // shards
    per_shard = data['label'].shape[0] // shards
    if local_batch > per_shard:
        raise ValueError(f'a batch of {local_batch} per shard exceeds the {per_shard} examples each shard holds')

    def local(images, labels):
        shard = jax.lax.axis_index(BATCH_AXES)
        key = jax.random.fold_in(jax.random.key(seed), shard)
        positions = step * local_batch + jnp.arange(local_batch)
        epochs, offsets = positions // per_shard, positions % per_shard
        first = epochs[0]
        perms = [jax.random.permutation(jax.random.fold_in(key, first + i), per_shard) for i in range(2)]
        index = jnp.where(epochs == first, perms[0][offsets], perms[1][offsets])
        return images[index], labels[index]

    spec = P(BATCH_AXES)
    images, labels = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec))(
        data['image'], data['label'])
    return {'image': images, 'label': labels}

