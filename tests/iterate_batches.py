"""Training batches of a recorded config from a saved iterator state, in a process of its own.

    python tests/iterate_batches.py WORKDIR COUNT

reads WORKDIR/config.json and WORKDIR/state.json (if present), takes COUNT batches and writes
WORKDIR/batches.npz and WORKDIR/state.json (the state after them).
"""

import json
import os
import sys

import jax
import numpy as np

from resnet_jax import sharding
from resnet_jax.data import device as device_data
from resnet_jax.data import pipeline
from resnet_jax.train import config as config_lib


def take(config, count: int, state: dict | None = None) -> tuple[list[dict], dict]:
    """`count` global batches (as numpy) from `state` on, and the state after them."""
    mesh = sharding.make_mesh(config)
    batches = pipeline.train_iterator(config, pipeline.open_split(config, config.data.train_split), mesh)
    if state is not None:
        batches.set_state(state)
    draw = jax.jit(device_data.batch_at, static_argnums=(1, 3, 4))
    out = []
    for _ in range(count):
        step = batches.step
        batch = next(batches)
        if config.data.feed == 'device':  # the iterator hands over the dataset; the step draws from it
            batch = draw(batch, config.seed, step, config.batch_size, mesh)
        out.append({k: np.asarray(jax.device_get(v)) for k, v in batch.items()})
    return out, batches.get_state()


def main(workdir: str, count: int) -> None:
    config = config_lib.load_resolved(workdir)
    state_path = os.path.join(workdir, 'state.json')
    state = json.load(open(state_path)) if os.path.exists(state_path) else None
    batches, state = take(config, count, state)
    np.savez(os.path.join(workdir, 'batches.npz'), **{f'{i}/{k}': v for i, b in enumerate(batches) for k, v in b.items()})
    with open(state_path, 'w') as f:
        json.dump(state, f)


if __name__ == '__main__':
    main(sys.argv[1], int(sys.argv[2]))
