"""The device mesh and how arrays are laid out on it: one sharding path for every scale.

The mesh has a 'data' and an 'fsdp' axis. A batch is split over both (every device sees
different examples); parameters and optimizer state are replicated, or, for the paths the
config's rules mark 'fsdp', split along their largest dimension that the 'fsdp' axis
divides. Under `jax.jit` on such global arrays, BatchNorm statistics are those of the
global batch with no collective written by hand. `check_config` refuses a `mesh` section that does
not fit the devices before anything is built.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.errors import check_field_choice, check_field_regex, refuse

BATCH_AXES = ('data', 'fsdp')
PARAM_RULES = ('replicate', 'fsdp')  # what mesh.param_rules may do with the parameters a pattern matches


def mesh_shape(config, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) axis sizes of config.mesh on `num_devices` devices; data=-1 takes every device
    that the fsdp axis leaves."""
    fsdp = config.mesh.fsdp
    return (num_devices // fsdp if config.mesh.data == -1 else config.mesh.data), fsdp


def check_config(config, num_devices: int) -> tuple[int, int]:
    """The (data, fsdp) mesh shape, after refusing param_rules that are not (regex, rule) pairs and axis
    sizes that do not multiply to `num_devices`."""
    for pattern, rule in config.mesh.param_rules:
        check_field_choice('mesh.param_rules', rule, PARAM_RULES)
        check_field_regex('mesh.param_rules', pattern)
    fsdp = config.mesh.fsdp
    if fsdp < 1 or num_devices % fsdp:
        refuse('mesh.fsdp', f'{fsdp} must be a positive divisor of the {num_devices} devices')
    data, _ = mesh_shape(config, num_devices)
    if data < 1 or data * fsdp != num_devices:
        refuse('mesh.data', f'mesh data={config.mesh.data} x fsdp={fsdp} does not fit the {num_devices} '
                            f'devices; use data=-1 or data={num_devices // fsdp}')
    return data, fsdp


def make_mesh(config, devices=None) -> Mesh:
    """The ('data', 'fsdp') mesh of config.mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices).reshape(mesh_shape(config, len(devices))), ('data', 'fsdp'))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split along their first axis over every device (both mesh axes)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (scalars, RNG keys, replicated parameters)."""
    return NamedSharding(mesh, P())


def _path_name(path) -> str:
    return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def param_spec(name: str, shape: tuple[int, ...], rules, fsdp_size: int, min_size: int) -> P:
    """The PartitionSpec the first matching rule gives a parameter called `name`."""
    rule = next((r for pattern, r in rules if re.fullmatch(pattern, name)), 'replicate')
    if rule == 'replicate' or fsdp_size == 1 or int(np.prod(shape)) < min_size:
        return P()
    divisible = [d for d in range(len(shape)) if shape[d] % fsdp_size == 0]
    if not divisible:
        return P()
    axis = max(divisible, key=lambda d: shape[d])
    return P(*[('fsdp' if d == axis else None) for d in range(len(shape))])


def state_shardings(mesh: Mesh, state_shapes, config):
    """A NamedSharding for every leaf of the train state (shapes from jax.eval_shape)."""
    fsdp = mesh.shape['fsdp']

    def leaf(path, x):
        spec = param_spec(_path_name(path), x.shape, config.mesh.param_rules, fsdp, config.mesh.fsdp_min_size)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(leaf, state_shapes)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble this process's slice of the global batch into global arrays on the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
