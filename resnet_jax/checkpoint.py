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
`checkpoint.keep`, plus the best `checkpoint.keep_best` by `checkpoint.best_metric`.

A new run may start from other weights (`init.source`, see `warm_start`); `check_config` refuses
checkpoint and initialisation fields that cannot work before anything is built.

Once a save is complete, process 0 writes `SHA256SUMS.json` into its step directory: the size and
SHA-256 of every file (Orbax and TensorStore keep no checksums of their own by default). Restore
tells damage from misuse:

    damaged     a file listed in SHA256SUMS.json is missing, has another size or other bytes (a
                truncated file, a flipped bit); or, in a step without SHA256SUMS.json (killed
                between the save and the sums, or written by an older version), unreadable.
                The step is renamed to `<step>.damaged-<time>` (kept, never deleted) and the
                next older one is used, with a warning. When every step is damaged, the run
                stops with an error unless asked to start over (`restart_from_scratch`).
    an error    the saved tree, a shape or a dtype differs from what this config builds (the
                first differing leaf is named with both shapes), or intact files cannot be read
                (permissions, I/O): nothing is set aside, and the run stops naming the step.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import time
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from etils.epath import gpath
from jax.experimental import multihost_utils

from resnet_jax import workdir as workdir_lib
from resnet_jax.errors import check_field_choice, refuse
from resnet_jax.models.timm_import import from_timm
from resnet_jax.models.torchvision_import import from_torchvision, load_state_dict

ITEMS = ('state', 'data', 'meta')
SUMS_FILE = 'SHA256SUMS.json'
BEST_MODES = ('max', 'min')  # checkpoint.best_mode: whether a larger or a smaller checkpoint.best_metric is better
# What checkpoint.best_metric may rank checkpoints by: the metrics an evaluation logs, of the raw or the EMA
# parameters, on the eval split or on the held-out part of the training split.
EVAL_METRICS = tuple(f'{p}/{m}' for p in ('eval', 'ema_eval', 'val', 'ema_val') for m in ('top1', 'top5', 'loss'))


def _literal_glob(self, pattern: str):
    """etils' Path.glob (which Orbax uses to find its per-process files) globs `join(path, pattern)`,
    so the `[`, `]`, `*` or `?` of a directory name are read as a pattern: in a workdir such as
    `runs/lr[0.1]` Orbax misses its own files and writes a checkpoint it cannot read. Here the
    directory part of a local path is taken literally. (Private etils attributes: where a newer etils
    lacks them, its own glob runs.)"""
    local = getattr(self, '_uri_scheme', '') is None and hasattr(self, '_path_str') and hasattr(self, '_new')
    if not local:
        yield from _glob(self, pattern)
        return
    for f in glob.glob(os.path.join(glob.escape(self._path_str), pattern)):
        yield self._new(f)


if hasattr(gpath, '_GPath'):
    _glob, gpath._GPath.glob = gpath._GPath.glob, _literal_glob


class CheckpointError(workdir_lib.WorkdirError):
    """A checkpoint that cannot be used although it is not damaged, or a workdir whose checkpoints
    are all damaged: the run stops, and the message names the step and what to do."""


class Damaged(Exception):
    """A checkpoint step whose files are missing, truncated or altered."""


def _file_sums(directory: str) -> dict[str, list]:
    sums = {}
    for root, _, files in os.walk(directory):
        for name in files:
            file = os.path.join(root, name)
            relative = os.path.relpath(file, directory)
            if relative == SUMS_FILE:
                continue
            digest = hashlib.sha256()
            with open(file, 'rb') as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            sums[relative] = [os.path.getsize(file), digest.hexdigest()]
    return sums


def write_sums(step_dir: str) -> None:
    """Record the size and SHA-256 of every file of a complete checkpoint step."""
    workdir_lib.write_atomic(os.path.join(step_dir, SUMS_FILE), json.dumps({'files': _file_sums(step_dir)}))


def verify(step_dir: str) -> bool:
    """True if `step_dir` matches its SHA256SUMS.json, False if it has none; Damaged names the first
    missing or altered file."""
    file = os.path.join(step_dir, SUMS_FILE)
    if not os.path.exists(file):
        return False
    try:
        with open(file) as f:
            expected = json.load(f)['files']
    except (ValueError, KeyError, TypeError) as e:
        raise Damaged(f'{SUMS_FILE} is unreadable ({e})') from None
    for relative, (size, digest) in sorted(expected.items()):
        path = os.path.join(step_dir, relative)
        if not os.path.exists(path):
            raise Damaged(f'{relative} is missing')
        if os.path.getsize(path) != size:
            raise Damaged(f'{relative} has {os.path.getsize(path)} bytes, {size} were written')
    actual = _file_sums(step_dir)
    for relative, (size, digest) in sorted(expected.items()):
        if actual[relative][1] != digest:
            raise Damaged(f'{relative} does not match its SHA-256 (its bytes were altered)')
    return True


def _leaves(tree) -> dict[str, tuple]:
    """{'params/stage1/.../kernel': (shape, dtype)}, with tuple indices and dict keys spelled alike."""
    def name(path):
        return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
    return {name(p): (tuple(x.shape), np.dtype(x.dtype)) for p, x in flat if hasattr(x, 'shape')}


def check_fits(saved, abstract_state, where: str) -> None:
    """CheckpointError naming the first leaf where the saved tree (`saved`: Orbax metadata) and the
    state this config builds differ in path, shape or dtype."""
    old, new = _leaves(saved), _leaves(flax.serialization.to_state_dict(abstract_state))
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a != b:
            def show(x):
                return 'nothing' if x is None else f'shape {x[0]} {x[1]}'
            raise CheckpointError(
                f'checkpoint {where} does not fit the model this config builds: {key} is {show(a)} in the '
                f'checkpoint and {show(b)} here. Nothing was changed. A config change (let through by '
                'checkpoint.resume_allow_changes?) altered the model or optimizer: undo it, or train in another '
                '--workdir')


@dataclasses.dataclass
class Restored:
    """One checkpoint read back: its step, the train state on the current mesh, and its other items."""
    step: int
    state: Any
    data: dict   # the data iterator's state
    meta: dict   # {'config', 'metrics', 'rng'}


class Manager:
    """The checkpoints of one run directory: asynchronous saves with checksums, the retention policy of
    the config (newest and best), and restores that set damaged steps aside (module docstring)."""

    def __init__(self, directory: str, config, read_only: bool = False):
        policies = ocp.checkpoint_managers
        keep = [policies.LatestN(config.checkpoint.keep)]
        if config.checkpoint.keep_best:
            metric = config.checkpoint.best_metric
            keep.append(policies.BestN(get_metric_fn=lambda metrics: metrics[metric], n=config.checkpoint.keep_best,
                                       reverse=config.checkpoint.best_mode == 'min',
                                       keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(preservation_policy=policies.AnyPreservationPolicy(keep),
                                               create=not read_only, read_only=read_only,
                                               cleanup_tmp_directories=not read_only)
        self.directory, self._read_only = directory, read_only
        self._manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)
        self._unsummed: list[int] = []  # saved by this manager, SHA256SUMS.json not yet written
        self._closed = False

    def save(self, step: int, state, data: dict, meta: dict, metrics: dict | None = None) -> None:
        """Start an asynchronous save of step `step`; `metrics` (if any) rank it for `checkpoint.best_metric`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                                  meta=ocp.args.JsonSave(meta))
        self.wait()  # Orbax would wait for the previous save here anyway; its sums are written first
        self._manager.save(step, args=args, metrics=metrics, force=True)
        self._unsummed.append(step)

    def steps(self) -> list[int]:
        """The steps saved in the directory, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state, step: int | None = None, restart_from_scratch: bool = False
                ) -> Restored | None:
        """Checkpoint `step`, or the newest undamaged one, laid out as `abstract_state`; None if there is none.

        Without `step`, damaged checkpoints are set aside (see the module docstring) for the next
        older one; if every one is damaged, that is a CheckpointError unless `restart_from_scratch`
        (then they are all set aside and None is returned). A requested `step` that is damaged, and
        any checkpoint that does not fit `abstract_state`, is a CheckpointError.
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        damaged = []
        for s in candidates:
            if s not in self._manager.all_steps():
                raise CheckpointError(f'{self.directory} has no checkpoint at step {s}; it has {self.steps()}')
            try:
                restored = self._restore(s, abstract_state)
            except Damaged as e:
                if step is not None:
                    raise CheckpointError(f'checkpoint {self.directory}/{s} is damaged: {e}') from None
                logging.warning('checkpoint %s/%d is damaged (%s): trying an older one', self.directory, s, e)
                damaged.append((s, str(e)))
                continue
            for d, _ in damaged:
                self._set_aside(d)
            return restored
        if damaged and not restart_from_scratch:
            raise CheckpointError(
                f'every checkpoint in {self.directory} is damaged (' + '; '.join(f'{d}: {why}' for d, why in damaged)
                + '). Nothing was changed. To set them aside and train from step 0, run again with '
                '--restart_from_scratch')
        for d, _ in damaged:
            logging.warning('checkpoint %s/%d set aside: starting from step 0 (restart_from_scratch)',
                            self.directory, d)
            self._set_aside(d)
        return None

    def _restore(self, s: int, abstract_state) -> Restored:
        """Step `s`: Damaged if its files are not those written, CheckpointError if it does not fit or
        cannot be read though intact."""
        where = f'{self.directory}/{s}'
        summed = verify(os.path.join(self.directory, str(s)))
        handler = ocp.PyTreeCheckpointHandler()
        try:
            saved = handler.metadata(epath.Path(self.directory, str(s), 'state'))
        except Exception as e:  # noqa: BLE001 (Orbax raises many kinds)
            if summed:
                raise CheckpointError(f'checkpoint {where}: its tree cannot be read though its files are intact '
                                      f'({type(e).__name__}: {_first_line(e)})') from None
            raise Damaged(f'its tree cannot be read ({type(e).__name__}: {_first_line(e)})') from None
        finally:
            handler.close()
        check_fits(saved.tree if hasattr(saved, 'tree') else saved, abstract_state, where)
        try:
            items = self._manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            denied = isinstance(e, PermissionError) or 'PERMISSION_DENIED' in str(e)
            if summed or denied:
                raise CheckpointError(f'checkpoint {where} cannot be read, though it is not damaged'
                                      f'{"" if summed else " (access denied)"}: {type(e).__name__}: '
                                      f'{_first_line(e)}. Nothing was changed; check the path and its file '
                                      'system') from None
            raise Damaged(f'{type(e).__name__}: {_first_line(e)}') from None
        if not summed:
            logging.info('checkpoint %s has no %s (saved by an older version, or killed before it was written); '
                         'restored unchecked', where, SUMS_FILE)
        return Restored(s, items['state'], items['data'], items['meta'])

    def _set_aside(self, step: int) -> None:
        """Rename a damaged checkpoint to <step>.damaged-<time> (kept for inspection, never deleted), so
        that the run can write that step again."""
        if self._read_only:
            return
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            os.rename(path, f'{path}.damaged-{int(time.time())}')
        multihost_utils.sync_global_devices(f'checkpoint {step} set aside')
        self._manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the same step once any of them was told to stop (multi-process)."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        """Wait for the pending save, then write the sums of every complete one."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unsummed:
                if os.path.isdir(os.path.join(self.directory, str(step))):  # not deleted by retention
                    write_sums(os.path.join(self.directory, str(step)))
        self._unsummed = []

    def close(self) -> None:
        """Finish the pending save and its sums and stop Orbax's threads; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._manager.close()


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [''])[0][:300]


def read_numpy(step_dir: str) -> dict:
    """The train state saved in checkpoint directory `step_dir` as a dict of numpy arrays, whatever
    mesh or process count wrote it (for warm starts, export and inspection)."""
    try:
        verify(step_dir)
    except Damaged as e:
        raise CheckpointError(f'checkpoint {step_dir} is damaged: {e}') from None
    item = os.path.join(step_dir, 'state')
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(item).item_metadata
    return checkpointer.restore(item, restore_args=jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


saved_steps = workdir_lib.saved_steps


def step_dir(path: str) -> str:
    """A checkpoint step directory from a run's workdir (its newest step) or a step directory itself."""
    if os.path.isdir(os.path.join(path, 'state')):
        return path
    steps = saved_steps(path)
    if not steps:
        raise FileNotFoundError(f'{path} is neither a run directory with checkpoints nor a checkpoint step directory')
    return os.path.join(workdir_lib.checkpoints(path), str(steps[-1]))


INIT_SOURCES = ('checkpoint:<workdir or step dir>', 'torchvision:<file.pth or .safetensors>',
                'timm:<file.pth or .safetensors>')
INIT_HEADS = ('keep', 'replace')  # init.head: the source's classifier head, or a fresh one


def check_config(config) -> None:
    """Refuse the checkpoint and init sections' fields that cannot work: a checkpoint.best_metric this run
    does not compute, an unknown checkpoint.best_mode or init.head, an init.source of another kind or whose
    path is missing."""
    check_field_choice('checkpoint.best_mode', config.checkpoint.best_mode, BEST_MODES)
    check_field_choice('checkpoint.best_metric', config.checkpoint.best_metric, EVAL_METRICS)
    if config.checkpoint.best_metric.startswith('ema_') and not config.optim.ema_decay:
        refuse('checkpoint.best_metric', f'{config.checkpoint.best_metric} needs EMA parameters (optim.ema_decay > 0)')
    if config.checkpoint.best_metric.split('/')[0] in ('val', 'ema_val') and not config.data.validation_split:
        refuse('checkpoint.best_metric',
               f'{config.checkpoint.best_metric} needs held-out examples (data.validation_split > 0)')
    kinds = tuple(source.partition(':')[0] + ':' for source in INIT_SOURCES)
    if config.init.source and not config.init.source.startswith(kinds):
        refuse('init.source', f'{config.init.source!r}: use ' + ', '.join(repr(s) for s in INIT_SOURCES[:-1])
                              + f' or {INIT_SOURCES[-1]!r}')
    if config.init.source and not os.path.exists(config.init.source.partition(':')[2]):
        refuse('init.source', f'{config.init.source.partition(":")[2]} does not exist')
    check_field_choice('init.head', config.init.head, INIT_HEADS)


def warm_start(spec: str, model, params, batch_stats, head: str = 'keep') -> tuple[dict, dict]:
    """(params, batch_stats) taken from another run's checkpoint or torchvision weights.

    head='keep' (config.init.head) takes the classifier head too, so its shape must fit (the same class count);
    'replace' keeps this model's own head whatever the source's. The targets may be abstract
    (jax.ShapeDtypeStruct): a source that does not fit is then refused before anything is compiled,
    and the leaves kept from the targets come back as given.
    """
    kind, _, path = spec.partition(':')
    if kind == 'checkpoint':
        saved = read_numpy(step_dir(path))
        source = {'params': saved['params'], 'batch_stats': saved.get('batch_stats') or {}}
    elif kind == 'torchvision':
        state_dict = load_state_dict(path)
        source = from_torchvision(state_dict, model.clone(num_classes=state_dict['fc.weight'].shape[0]))
    elif kind == 'timm':
        state_dict = load_state_dict(path)
        source = from_timm(state_dict, model.clone(num_classes=state_dict['fc.weight'].shape[0]))
    else:
        raise ValueError(f'init.source={spec!r}: choose one of {", ".join(INIT_SOURCES)}')
    target = {'params': params, 'batch_stats': batch_stats}
    flat_source = flax.traverse_util.flatten_dict(jax.device_get(source), sep='/')
    merged = {}
    flat_target = flax.traverse_util.flatten_dict(target, sep='/')
    for name in sorted(flat_target, key=lambda n: n.split('/')[1] == 'head'):  # a backbone misfit is named first
        value, found = flat_target[name], flat_source[name].shape if name in flat_source else 'nothing'
        in_head = name.split('/')[1] == 'head'
        if in_head and head == 'replace':
            merged[name] = value
        elif found == value.shape:
            merged[name] = np.asarray(flat_source[name], value.dtype)
        elif in_head:
            raise ValueError(f'{spec}: its classifier head {name} has shape {found}, and this model '
                             f'(num_classes={model.num_classes}) needs {value.shape}. Set '
                             "init.head='replace' to train a fresh head instead")
        else:
            raise ValueError(f'init.source={spec!r} does not fit this model: {name} needs {value.shape}, found {found}')
    if head == 'replace':
        logging.info('init.source %s: a fresh classifier head (init.head=replace)', spec)
    merged = flax.traverse_util.unflatten_dict(merged, sep='/')
    return merged['params'], merged.get('batch_stats', {})
