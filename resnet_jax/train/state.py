"""The train state: everything a step changes, as one pytree that is sharded, donated and checkpointed whole."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """Step counter, parameters, BatchNorm statistics, optimizer state and EMA parameters; one pytree
    so that the jitted step can donate it and a checkpoint holds exactly what a resumed run needs."""
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # None unless optim.ema_decay > 0


def create_state(model, optimizer, rng, image_size: int, ema: bool, member=None) -> TrainState:
    """The state at step 0: `model` initialised from `rng` on one image of `image_size`, a fresh
    `optimizer` state, and EMA parameters equal to the parameters when `ema`. member: a population
    member's model values, which gate initialisers read."""
    variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), member=member)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=optimizer.init(params),
                      ema_params=params if ema else None)
