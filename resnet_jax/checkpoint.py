"""Orbax checkpoints: what a run needs to continue exactly, kept safely, restored onto any mesh.

A checkpoint of step t has three items:

    state   the TrainState (params, batch stats, optimizer state, EMA, step); every process
            writes its own shards, and restoring lays them out for the current mesh, whatever
            mesh wrote them
    data    the data iterator's state (`pipeline.BatchIterator.get_state()`)
    meta    the resolved config, the metrics of step t, and the run's base RNG key

Saves are asynchronous. Orbax writes each into a temporary directory and renames it when
every process has finished, so a save killed halfway is never listed as a checkpoint, and old
checkpoints are deleted only after a newer one is complete. Kept: the newest
`keep_checkpoints`, plus the best `keep_best_checkpoints` by `best_metric`. A checkpoint that
cannot be read (truncated or deleted files) is skipped on restore with a warning naming it,
and the next older one is used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

ITEMS = ('state', 'data', 'meta')


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data: dict   # the data iterator's state
    meta: dict   # {'config', 'metrics', 'rng'}


class Manager:
    def __init__(self, directory: str, config, read_only: bool = False):
        policies = ocp.checkpoint_managers
        keep = [policies.LatestN(config.keep_checkpoints)]
        if config.keep_best_checkpoints:
            metric = config.best_metric
            keep.append(policies.BestN(get_metric_fn=lambda metrics: metrics[metric], n=config.keep_best_checkpoints,
                                       reverse=config.best_mode == 'min', keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(preservation_policy=policies.AnyPreservationPolicy(keep),
                                               create=not read_only, read_only=read_only,
                                               cleanup_tmp_directories=not read_only)
        self.directory, self._read_only = directory, read_only
        self._manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)

    def save(self, step: int, state, data: dict, meta: dict, metrics: dict | None = None) -> None:
        """Start an asynchronous save of step `step`; `metrics` (if any) rank it for `best_metric`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                                  meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, metrics=metrics, force=True)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state, step: int | None = None) -> Restored | None:
        """Checkpoint `step`, or the newest readable one, laid out as `abstract_state`; None if there is none.

        Without `step`, an unreadable checkpoint is skipped (with a warning) for the next older
        one; a requested `step` that cannot be read is an error.
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        for s in candidates:
            if s not in self._manager.all_steps():
                raise FileNotFoundError(f'{self.directory} has no checkpoint at step {s}; it has {self.steps()}')
            try:
                items = self._manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # truncated or missing files: Orbax raises many kinds
                if step is not None:
                    raise
                logging.warning('checkpoint %s/%d cannot be read and is skipped (%s: %s); trying an older one',
                                self.directory, s, type(e).__name__, str(e).splitlines()[0][:300])
                self._set_aside(s)
                continue
            return Restored(s, items['state'], items['data'], items['meta'])
        return None

    def _set_aside(self, step: int) -> None:
        """Rename an unreadable checkpoint to <step>.unreadable (kept for inspection, never deleted), so
        that the run can write that step again."""
        if self._read_only:
            return
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            os.rename(path, f'{path}.unreadable-{int(time.time())}')
        multihost_utils.sync_global_devices(f'checkpoint {step} set aside')
        self._manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the same step once any of them was told to stop (multi-process)."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def read_numpy(step_dir: str) -> dict:
    """The train state saved in checkpoint directory `step_dir` as a dict of numpy arrays, whatever
    mesh or process count wrote it (for warm starts, export and inspection)."""
    item = os.path.join(step_dir, 'state')
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(item).item_metadata
    return checkpointer.restore(item, restore_args=jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


def saved_steps(workdir: str) -> list[int]:
    """The complete checkpoint steps in a run's workdir, read from the file system (no Orbax manager)."""
    directory = os.path.join(workdir, 'checkpoints')
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def step_dir(path: str) -> str:
    """A checkpoint step directory from a run's workdir (its newest step) or a step directory itself."""
    if os.path.isdir(os.path.join(path, 'state')):
        return path
    steps = saved_steps(path)
    if not steps:
        raise FileNotFoundError(f'{path} is neither a run directory with checkpoints nor a checkpoint step directory')
    return os.path.join(path, 'checkpoints', str(steps[-1]))


INIT_SOURCES = ('checkpoint:<workdir or step dir>', 'torchvision:<file.pth or .safetensors>',
                'timm:<file.pth or .safetensors>')


def warm_start(spec: str, model, params, batch_stats, init_head: str = 'keep') -> tuple[dict, dict]:
    """(params, batch_stats) taken from another run's checkpoint or torchvision weights.

    init_head='keep' takes the classifier head too, so its shape must fit (the same class count);
    'replace' keeps this model's own head whatever the source's. The targets may be abstract
    (jax.ShapeDtypeStruct): a source that does not fit is then refused before anything is compiled,
    and the leaves kept from the targets come back as given.
    """
    kind, _, path = spec.partition(':')
    if kind == 'checkpoint':
        saved = read_numpy(step_dir(path))
        source = {'params': saved['params'], 'batch_stats': saved.get('batch_stats') or {}}
    elif kind == 'torchvision':
        from resnet_jax.models.torchvision_import import from_torchvision, load_state_dict
        state_dict = load_state_dict(path)
        source = from_torchvision(state_dict, model.clone(num_classes=state_dict['fc.weight'].shape[0]))
    elif kind == 'timm':
        from resnet_jax.models.timm_import import from_timm
        from resnet_jax.models.torchvision_import import load_state_dict
        state_dict = load_state_dict(path)
        source = from_timm(state_dict, model.clone(num_classes=state_dict['fc.weight'].shape[0]))
    else:
        raise ValueError(f'init_from={spec!r}: choose one of {", ".join(INIT_SOURCES)}')
    target = {'params': params, 'batch_stats': batch_stats}
    flat_source = flax.traverse_util.flatten_dict(jax.device_get(source), sep='/')
    merged = {}
    flat_target = flax.traverse_util.flatten_dict(target, sep='/')
    for name in sorted(flat_target, key=lambda n: n.split('/')[1] == 'head'):  # a backbone misfit is named first
        value, found = flat_target[name], flat_source[name].shape if name in flat_source else 'nothing'
        head = name.split('/')[1] == 'head'
        if head and init_head == 'replace':
            merged[name] = value
        elif found == value.shape:
            merged[name] = np.asarray(flat_source[name], value.dtype)
        elif head:
            raise ValueError(f'{spec}: its classifier head {name} has shape {found}, and this model '
                             f'(num_classes={model.num_classes}) needs {value.shape}. Set '
                             "init_head='replace' to train a fresh head instead")
        else:
            raise ValueError(f'init_from={spec!r} does not fit this model: {name} needs {value.shape}, found {found}')
    if init_head == 'replace':
        logging.info('init_from %s: a fresh classifier head (init_head=replace)', spec)
    merged = flax.traverse_util.unflatten_dict(merged, sep='/')
    return merged['params'], merged.get('batch_stats', {})
