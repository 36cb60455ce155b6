"""`train_population`: a population (train.population) trained as M runs, each in its own workdir.

Each member's workdir holds what a standalone run of its config writes: config.json with its own values,
labels.json, metrics.jsonl and TensorBoard events, the plot, done.json, and checkpoints/ in the standalone
format (the member's state in its standalone run's tree, its own data-iterator state, rng and skipped
updates), so that evaluate, export, analyze, init.source and sweep results read it as any run's. The cadence
(log, evaluate, checkpoint, stop, non-finite updates, done) is `cadence.run_members`.

Resume: no member starts saving a step before every member has finished saving the previous one, and each
keeps checkpoint.keep + 1 newest checkpoints, so a crash during a save leaves a step that every member has.
A restart continues every member from the newest such step; steps newer than it, which only some members
completed, are deleted (they are computed again, identically).

The file of `--members` (`read_members`), written by `resnet_jax.sweep --population`:

    {"members": [{"name": str, "workdir": str, "config": {<the member's resolved config, as config.json>}}, ...]}

a relative workdir being relative to the file's directory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import threading
import time

import jax
import numpy as np

from resnet_jax import checkpoint
from resnet_jax import workdir as workdir_lib
from resnet_jax.data import sources
from resnet_jax.errors import ConfigError, UserError
from resnet_jax.models import get_model
from resnet_jax.models.registry import model_overrides
from resnet_jax.train import cadence, optim
from resnet_jax.train import config as config_lib
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train import population as population_lib
from resnet_jax.train.run import lock_workdir
from resnet_jax.train.state import create_state


def read_members(file: str) -> tuple[list[str], list[str], list]:
    """(names, workdirs, configs) of a members file (module docstring); a UserError names what is wrong."""
    try:
        with open(file, encoding='utf-8') as f:
            raw = json.load(f)
    except OSError as e:
        raise UserError(f'--members: {file} cannot be read ({e.strerror})') from None
    except ValueError as e:
        raise UserError(f'--members: {file} is not valid JSON ({e})') from None
    members = raw.get('members') if isinstance(raw, dict) else None
    if not isinstance(members, list) or not members:
        raise UserError(f'--members: {file} must hold {{"members": [{{"name": str, "workdir": str, "config": '
                        '{...}}, ...]}} with at least one member')
    names, workdirs, configs = [], [], []
    for i, m in enumerate(members):
        kinds = {'name': str, 'workdir': str, 'config': dict}
        wrong = [k for k, kind in kinds.items() if not isinstance(m, dict) or not isinstance(m.get(k), kind)]
        if wrong:
            raise UserError(f'--members: member {i} of {file} needs ' + ', '.join(
                f'"{k}" ({kinds[k].__name__})' for k in wrong))
        names.append(m['name'])
        workdirs.append(os.path.join(os.path.dirname(os.path.abspath(file)), m['workdir']))
        configs.append(config_lib.from_resolved(m['config']))
    return names, workdirs, configs


def train_population(configs, workdirs, restart_from_scratch: bool = False, names=None) -> list[dict[str, float]]:
    """Train the population of `configs`, member i in workdirs[i], continuing every member from the newest
    checkpoint step all of them have; return each member's final metrics.

    Checks the population (check_population, its limits, every member's config) before any workdir is
    touched, then locks every member's workdir (all or none; WorkdirBusy names a busy member). Raises as
    `loop.train_and_evaluate` does: Preempted after saving on a stop signal, NonFiniteError naming the member,
    ConfigError naming a member whose workdir holds a run with another config, CheckpointError naming a
    member whose checkpoint cannot be restored (`restart_from_scratch` then starts every member over).
    """
    configs, workdirs = list(configs), [os.fspath(w) for w in workdirs]
    names = list(names) if names is not None else [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(workdirs) != len(configs) or len(names) != len(configs):
        raise UserError(f'a population of {len(configs)} members needs as many workdirs and names, got '
                        f'{len(workdirs)} and {len(names)}')
    real = [os.path.realpath(w) for w in workdirs]
    if len(set(real)) != len(real):
        shared = next(w for w in real if real.count(w) > 1)
        raise UserError(f'two members of the population share the workdir {shared}; each needs its own')
    devices = jax.devices()
    population_lib.check_limits(configs, devices)  # before any workdir is touched
    signals = workdir_lib.SIGNALS
    own_signals = not signals.installed and threading.current_thread() is threading.main_thread()
    with contextlib.ExitStack() as stack:
        _lock_all(stack, workdirs, names)
        if own_signals:
            stack.callback(signals.uninstall)
        start = common_step(configs, workdirs, names)
        for c, w in zip(configs, workdirs):
            workdir_lib.check_labels(w, sources.class_names(c), write=True, new_run=start is None)
        population = population_lib.Population(configs, devices)
        for c, w in zip(configs, workdirs):
            workdir_lib.write_config(w, config_lib.to_json(c))
        managers = _managers(stack, configs, workdirs)
        num_train = len(population.train_data)
        standalone = [_standalone_shapes(c, population.model.num_classes, num_train, devices[0]) for c in configs]
        restored = _restore(managers, standalone, start, names, restart_from_scratch)
        if restored is None and start is not None:  # every member set aside: start over
            managers = _managers(stack, configs, workdirs)
        writers = [stack.enter_context(metrics_lib.MetricWriter(w)) for w in workdirs]
        return _train(population, restored, standalone, managers, writers, workdirs, names, signals, own_signals)


def _lock_all(stack: contextlib.ExitStack, workdirs: list[str], names: list[str]) -> None:
    """Every member's workdir locked (released when `stack` closes), or none: the first that cannot be locked
    raises, naming its member."""
    for w, name in zip(workdirs, names):
        try:
            lock = lock_workdir(w)
        except workdir_lib.WorkdirError as e:
            raise type(e)(f'member {name}: {e}') from None
        stack.callback(lock.release)


def common_step(configs, workdirs: list[str], names: list[str]) -> int | None:
    """The newest checkpoint step that every member has (None: a new population), after refusing a member
    whose workdir holds a run with another config; steps newer than it are deleted."""
    saved = [workdir_lib.saved_steps(w) for w in workdirs]
    for c, w, name, steps in zip(configs, workdirs, names, saved):
        stored, _ = workdir_lib.stored_config(w) if steps else (None, '')
        if stored is not None:
            try:
                config_lib.check_resume(stored, c)
            except ConfigError as e:
                raise ConfigError(f'member {name} ({w}): {e}') from None
    common = set.intersection(*map(set, saved))
    start = max(common) if common else None
    for w, steps in zip(workdirs, saved):
        for s in steps:
            if start is None or s > start:
                logging.warning('%s: checkpoint %d is newer than the newest step every member has (%s); deleted, '
                                'it will be computed again', w, s, start)
                shutil.rmtree(os.path.join(workdir_lib.checkpoints(w), str(s)))
    return start


def _managers(stack: contextlib.ExitStack, configs, workdirs: list[str]) -> list[checkpoint.Manager]:
    """Each member's checkpoint manager, keeping one checkpoint more than its config asks (module docstring)."""
    managers = []
    for c, w in zip(configs, workdirs):
        kept = c.copy_and_resolve_references()
        kept.checkpoint.keep += 1
        managers.append(checkpoint.Manager(workdir_lib.checkpoints(w), kept))
        stack.callback(managers[-1].close)
    return managers


def _standalone_shapes(config, num_classes: int, num_train: int, device):
    """The abstract state of `config`'s standalone run (the tree of a member's checkpoint), on `device`."""
    model = get_model(config.model.name, **dict(model_overrides(config), num_classes=num_classes))
    init = functools.partial(create_state, model, optim.make_optimizer(config, num_train),
                             image_size=config.data.image_size, ema=config.optim.ema_decay > 0)
    where = jax.sharding.SingleDeviceSharding(device)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
                                  jax.eval_shape(init, jax.random.key(0)))


def _restore(managers, standalone, step: int | None, names: list[str], restart_from_scratch: bool):
    """Every member's checkpoint `step` (None: none), or with `restart_from_scratch`, where one cannot be
    restored, None after setting every member's checkpoints aside."""
    if step is None:
        return None
    restored = []
    for m, shapes, name in zip(managers, standalone, names):
        try:
            restored.append(m.restore(shapes, step))
        except checkpoint.CheckpointError as e:
            if not restart_from_scratch:
                raise checkpoint.CheckpointError(f"member {name}: {e}. To set every member's checkpoints aside and "
                                                 'train from step 0, run again with --restart_from_scratch') from None
            break
    else:
        return restored
    for m in managers:
        logging.warning('%s: checkpoints set aside, starting from step 0 (restart_from_scratch)', m.directory)
        for s in m.steps():
            path = os.path.join(m.directory, str(s))
            os.rename(path, f'{path}.damaged-{int(time.time())}')
        m.close()
    return None


def _train(population, restored, standalone, managers, writers, workdirs, names, signals,
           own_signals: bool) -> list[dict[str, float]]:
    """The members' training from `restored` (None: a new population) to population.num_steps."""
    configs, num_train = population.configs, len(population.train_data)
    iterators = population.data_iterators()
    next_batches = population.train_inputs(iterators=iterators)
    shapes = jax.eval_shape(population.initial_states)
    member_shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), shapes)
    if restored is None:
        states, rngs = population.initial_states(), population.rngs()
        skipped = [0] * population.size
    else:
        for r, it, c in zip(restored, iterators, configs):
            if r.data['step'] != r.step:
                raise ValueError(f'checkpoint {r.step}: its data iterator is at step {r.data["step"]}')
            it.set_state(r.data, allow_order_change=bool(c.checkpoint.resume_allow_changes))
        members = [population_lib.from_standalone(jax.device_get(r.state), member_shapes) for r in restored]
        states = jax.device_put(jax.tree_util.tree_map(lambda *xs: np.stack(xs), *members),
                                population.member_sharding)
        keys = np.stack([np.asarray(r.meta['rng'], np.uint32) for r in restored])
        rngs = jax.device_put(jax.random.wrap_key_data(keys), population.member_sharding)
        skipped = [r.meta['skipped_updates'] for r in restored]
    values = population.device_values()
    outputs = [cadence.Output(
        c, optim.lr_schedule(c, num_train), w, writer, manager, data_state=lambda done, it=it: it.get_state(),
        meta={'rng': np.asarray(jax.random.key_data(rngs[i])).tolist()}, skipped_updates=skipped[i],
        name=f'[{name}] ', part=functools.partial(population_lib.member, i=i),
        saved=lambda s, i=i: population_lib.to_standalone(population_lib.member(s, i), standalone[i]))
        for i, (c, w, writer, manager, it, name) in enumerate(zip(configs, workdirs, writers, managers, iterators,
                                                                  names))]
    start = int(jax.device_get(states.step)[0])
    if start >= population.num_steps:
        return cadence.finish_members(population.num_steps, states, outputs, population.evaluate)

    first = next_batches()
    t0 = time.perf_counter()
    compiled = population.train_step.lower(states, first, rngs, values).compile()
    for writer in writers:
        writer.write(start, {'perf/compile_seconds': time.perf_counter() - t0})

    def step(states, index: int):
        return compiled(states, first if index == start else next_batches(), rngs, values)

    def window_values(values: dict, seconds: float, steps: int) -> None:
        values['train/images_per_sec'] = steps * configs[0].batch_size / seconds  # each member's
        values['train/step_seconds'] = seconds / steps

    return cadence.run_members(population.num_steps, states, start, step, population.evaluate, window_values,
                               outputs, signals, own_signals)
