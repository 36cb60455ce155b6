"""A `Run`: everything a training needs besides its train state, built from a validated config.

The data (through the feed), the model, the mesh, the optimizer and schedule, the normalisation and
the compiled steps; `restore_workdir` rebuilds one from a workdir's recorded config with a
checkpoint, for evaluation, export and analysis.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax import checkpoint, sharding
from resnet_jax import workdir as workdir_lib
from resnet_jax.data import feed as feed_lib
from resnet_jax.data import pipeline, sources
from resnet_jax.errors import ConfigError
from resnet_jax.models import get_model
from resnet_jax.models.registry import model_overrides
from resnet_jax.train import config as config_lib
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train import optim
from resnet_jax.train import step as step_lib
from resnet_jax.train.state import create_state


class Run:
    """Everything a run needs besides its train state, built from a validated config."""

    def __init__(self, config, devices=None):
        devices = jax.devices() if devices is None else devices
        config_lib.validate(config, len(devices))
        self.config = config
        self.train_data = pipeline.open_split(config, config.data.train_split)
        self.eval_data = pipeline.open_split(config, config.data.eval_split)
        # data.validation_split: examples held out of the training split, evaluated as 'val/*' beside 'eval/*'.
        self.val_data = pipeline.open_split(config, config.data.train_split, held_out=True) \
            if config.data.validation_split else None
        num_train = len(self.train_data)
        config_lib.validate(config, len(devices), num_train)
        overrides = model_overrides(config)
        classes = overrides.setdefault('num_classes', self.train_data.num_classes)
        if classes != self.train_data.num_classes:
            raise ConfigError(f'config.model.num_classes: {classes} differs from the '
                                         f'{self.train_data.num_classes} classes of {config.data.dataset}')
        self.model = get_model(config.model.name, **overrides)
        self.mesh = sharding.make_mesh(config, devices)
        self.feed = feed_lib.make(config, self.mesh)
        self.num_steps = optim.total_steps(config, num_train)
        self.optimizer = optim.make_optimizer(config, num_train)
        self.schedule = optim.lr_schedule(config, num_train)
        self.mean, self.std = pipeline.normalization(config, self.train_data)
        self.init = functools.partial(create_state, self.model, self.optimizer,
                                      image_size=config.data.image_size, ema=config.optim.ema_decay > 0)
        state_shapes = jax.eval_shape(self.init, jax.random.key(0))
        self.train_step, self.eval_step, self.state_sharding = step_lib.compile_steps(
            self.model, self.optimizer, config, self.mesh, state_shapes, self.mean, self.std, self.feed.to_batch,
            optim.in_place_sgd(config, self.schedule))
        self.abstract_state = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, self.state_sharding)

    def initial_state(self):
        """The state at step 0, initialised from the config's seed and sharded over the mesh."""
        init_rng = jax.random.fold_in(jax.random.key(self.config.seed), -1 % 2 ** 31)
        return jax.jit(self.init, out_shardings=self.state_sharding)(init_rng)

    def first_state(self):
        """The state a new run starts from: `initial_state`, or for fine-tuning the weights of
        config.init.source (read and checked before anything is compiled) with a fresh optimizer."""
        config = self.config
        if not config.init.source:
            return self.initial_state()
        try:
            loaded = checkpoint.warm_start(config.init.source, self.model, self.abstract_state.params,
                                           self.abstract_state.batch_stats, config.init.head)
        except ValueError as e:
            raise ConfigError(f'config.init.source: {e}') from None
        state = self.initial_state()
        params, batch_stats = jax.tree_util.tree_map(  # a replaced head keeps its initialisation
            lambda w, fresh: fresh if isinstance(w, jax.ShapeDtypeStruct) else w, loaded,
            jax.device_get((state.params, state.batch_stats)))
        ema = params if state.ema_params is not None else None
        state = state.replace(params=params, batch_stats=batch_stats, opt_state=self.optimizer.init(params),
                              ema_params=ema)
        return jax.device_put(state, self.state_sharding)

    def train_inputs(self, start_step: int):
        """(iterator, next_input) of the training split from `start_step` on (`Feed.train_inputs`)."""
        return self.feed.train_inputs(self.train_data, start_step)

    def evaluate(self, state) -> dict[str, float]:
        """Loss, top-1 and top-5 over the whole evaluation split ('eval/*') and the held-out validation
        examples ('val/*'), and the same for EMA parameters ('ema_eval/*', 'ema_val/*')."""
        results = {}
        for prefix, data in (('eval', self.eval_data), ('val', self.val_data)):
            if data is not None:
                results.update(self._evaluate(state, data, use_ema=False, prefix=prefix))
                if self.config.optim.ema_decay:
                    results.update(self._evaluate(state, data, use_ema=True, prefix=f'ema_{prefix}'))
        return results

    def _evaluate(self, state, data, use_ema: bool, prefix: str) -> dict[str, float]:
        totals = None
        for batch in pipeline.eval_batches(self.config, data, jax.process_index(), jax.process_count()):
            out = self.eval_step(state, sharding.global_batch(batch, self.mesh), use_ema)
            totals = out if totals is None else jax.tree_util.tree_map(lambda a, b: a + b, totals, out)
        return metrics_lib.means(jax.device_get(totals), prefix)


def lock_workdir(workdir: str) -> workdir_lib.Lock | None:
    """Process 0 takes the workdir's lock (one lock for the whole run); if it could not, every
    process raises (WorkdirBusy, or WorkdirError for a workdir that cannot be written), so none goes
    on alone."""
    lock, busy = (workdir_lib.Lock(workdir), None) if jax.process_index() == 0 else (None, None)
    if lock is not None:
        try:
            lock.acquire()
        except workdir_lib.WorkdirBusy as e:
            lock, busy = None, e
        except OSError as e:  # a read-only or missing parent directory
            lock, busy = None, workdir_lib.WorkdirError(f'{workdir} cannot be written: {e.strerror}')
    if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(np.int32(busy is None)) and busy is None:
        busy = workdir_lib.WorkdirBusy(f'{workdir} is in use by another training (process 0 could not lock it)')
    if busy is not None:
        raise busy
    return lock


def restore_workdir(workdir: str, step: int | None = None, run: Run | None = None):
    """(Run rebuilt from the workdir's recorded config, its checkpoint `step` or the newest readable one);
    pass the `run` of an earlier call to restore another step without rebuilding it."""
    run = Run(config_lib.load_resolved(workdir)) if run is None else run
    workdir_lib.check_labels(workdir, sources.class_names(run.config))  # the classes the model was trained on
    manager = checkpoint.Manager(workdir_lib.checkpoints(workdir), run.config, read_only=True)
    try:
        restored = manager.restore(run.abstract_state, step)
    finally:
        manager.close()
    if restored is None:
        raise workdir_lib.WorkdirError(f'{workdir_lib.checkpoints(workdir)} holds no checkpoint')
    return run, restored
