"""`train_and_evaluate`: one linear loop that runs unchanged from one CPU to many hosts.

Order of work: validate the config (cheap, before anything else), load data, build the
model, mesh and optimizer, compile the step ahead of time (which also yields its FLOPs for
MFU), restore the newest checkpoint if the workdir has one, then train, evaluating and
checkpointing on schedule. Only process 0 writes logs and plots; every process saves its
shards of the checkpoint.
"""

from __future__ import annotations

import functools
import json
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax import checkpoint, sharding
from resnet_jax import workdir as workdir_lib
from resnet_jax.data import pipeline, sources
from resnet_jax.errors import ConfigError
from resnet_jax.models import get_model
from resnet_jax.models.registry import model_overrides
from resnet_jax.models.summary import count_macs
from resnet_jax.train import config as config_lib
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train import optim
from resnet_jax.train import step as step_lib

# Dense bf16 peak TFLOP/s per device, matched as a substring of `device.device_kind`.
PEAK_TFLOPS = {'H200': 989.0, 'H100': 989.0, 'A100': 312.0, 'L4': 121.0, 'V100': 125.0,
               'TPU v6 lite': 918.0, 'TPU v5p': 459.0, 'TPU v5 lite': 197.0, 'TPU v5': 459.0,
               'TPU v4': 275.0, 'TPU v3': 123.0}


def peak_flops_per_device(config) -> float | None:
    if config.log.peak_tflops_per_device is not None:
        return config.log.peak_tflops_per_device * 1e12
    kind = jax.devices()[0].device_kind
    return next((tflops * 1e12 for name, tflops in PEAK_TFLOPS.items() if name in kind), None)


def model_flops(model, image_size: int, batch_size: int) -> float:
    """Model FLOPs of one training step: 6 x MACs x batch (forward 2, backward 4 per MAC).

    Counted from the architecture rather than taken from XLA's cost analysis, which on GPUs
    counts the convolutions handed to cuDNN as zero, and which would count rematerialised
    work as useful: MFU compares the model's FLOPs with the device's peak.
    """
    return 6.0 * count_macs(model, image_size) * batch_size


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
        self.num_steps = optim.total_steps(config, num_train)
        self.optimizer = optim.make_optimizer(config, num_train)
        self.schedule = optim.lr_schedule(config, num_train)
        self.mean, self.std = pipeline.normalization(config, self.train_data)
        self.init = functools.partial(step_lib.create_state, self.model, self.optimizer,
                                      image_size=config.data.image_size, ema=config.optim.ema_decay > 0)
        state_shapes = jax.eval_shape(self.init, jax.random.key(0))
        self.train_step, self.eval_step, self.state_sharding = step_lib.compile_steps(
            self.model, self.optimizer, config, self.mesh, state_shapes, self.mean, self.std)
        self.abstract_state = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, self.state_sharding)

    def initial_state(self):
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
        """(iterator, next_input): next_input() is the train step's data argument for steps start_step,
        start_step+1, ...: the next global batch, or the device-resident dataset itself."""
        batches = pipeline.train_iterator(self.config, self.train_data, self.mesh, start_step)
        if self.config.data.feed == 'device':
            return batches, lambda: next(batches)
        return batches, lambda: sharding.global_batch(next(batches), self.mesh)

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
        totals = jax.device_get(totals)
        count = float(totals.pop('count'))
        return {f'{prefix}/{k}': float(v) / count for k, v in totals.items()}


class Preempted(Exception):
    """The run stopped on a signal after its checkpoint at `step` was complete."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f'stopped by {signal_name} after step {step}; its checkpoint is complete. '
                         'Run the same command again to continue.')
        self.step = step


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient under config.optim.nonfinite='stop'; the state holds no NaN."""


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


def train_and_evaluate(config, workdir: str, restart_from_scratch: bool = False) -> dict[str, float]:
    """Train `config` in `workdir`, continuing from its newest undamaged checkpoint; return the final metrics.

    Holds the workdir's lock throughout (WorkdirBusy if another process has it). Raises Preempted
    after saving when a stop signal arrives, NonFiniteError on a NaN/Inf with config.optim.nonfinite='stop',
    ConfigError when the workdir holds a run with another config, and CheckpointError when a
    checkpoint does not fit or every one is damaged (`restart_from_scratch` then starts over).
    """
    config_lib.validate(config, jax.device_count())  # before the workdir is touched
    lock = lock_workdir(workdir)
    signals = workdir_lib.SIGNALS
    # A library caller's run (no handlers installed by the command) stops on signals from the loop on.
    own_signals = (not signals.installed and jax.process_count() == 1
                   and threading.current_thread() is threading.main_thread())
    manager = None
    try:
        lead = jax.process_index() == 0
        manager = checkpoint.Manager(workdir_lib.checkpoints(workdir), config)
        if manager.steps():  # before any data is loaded
            stored, _ = workdir_lib.stored_config(workdir)
            if stored is not None:
                config_lib.check_resume(stored, config)
        workdir_lib.check_labels(workdir, sources.class_names(config), write=lead, new_run=not manager.steps())
        run = Run(config)
        restored = manager.restore(run.abstract_state, restart_from_scratch=restart_from_scratch)
        if lead:
            workdir_lib.write_config(workdir, config_lib.to_json(config))
        if config.finetune.linear_probe:  # only the head trains, on features computed once
            from resnet_jax.train import probe  # it builds on this module
            return probe.train_head(run, run.first_state() if restored is None else restored.state, manager, workdir)
        return _train(run, workdir, manager, restored, signals, own_signals)
    finally:
        if own_signals:
            signals.uninstall()
        if manager is not None:
            manager.close()
        if lock is not None:
            lock.release()


def _train(run: Run, workdir: str, manager: checkpoint.Manager, restored, signals, own_signals) -> dict[str, float]:
    config, lead = run.config, jax.process_index() == 0
    rng = jax.random.key(config.seed)
    batches, next_input = run.train_inputs(0)
    skipped_updates = 0
    if restored is None:
        state = run.first_state()
    else:
        state, rng = restored.state, jax.random.wrap_key_data(np.asarray(restored.meta['rng'], np.uint32))
        batches.set_state(restored.data, allow_order_change=bool(config.checkpoint.resume_allow_changes))
        skipped_updates = restored.meta['skipped_updates']
        if restored.data['step'] != restored.step:
            raise ValueError(f'checkpoint {restored.step}: its data iterator is at step {restored.data["step"]}')
    start = int(jax.device_get(state.step))

    writer = metrics_lib.MetricWriter(workdir, enabled=lead)
    progress = metrics_lib.ProgressLogger(run.num_steps, config.log.progress_seconds,
                                          print_fn=functools.partial(print, flush=True) if lead else (lambda *_: None))
    if start >= run.num_steps:  # a finished run: report, change nothing
        final = run.evaluate(state)
        writer.write(run.num_steps, final)
        writer.close()
        if lead:
            workdir_lib.mark_done(workdir, run.num_steps, final)
        return final
    if lead:  # a finished run given more steps
        workdir_lib.clear_done(workdir)

    first = next_input()
    t0 = time.perf_counter()
    compiled = run.train_step.lower(state, first, rng).compile()
    compile_seconds = time.perf_counter() - t0
    flops_per_step = model_flops(run.model, config.data.image_size, config.batch_size) / run.mesh.size
    peak = peak_flops_per_device(config)
    writer.write(start, {'perf/compile_seconds': compile_seconds, 'perf/flops_per_step_per_device': flops_per_step})
    # Seen on CPU: several devices per process queuing many steps across processes can deadlock.
    block_each_step = jax.process_count() > 1 and jax.default_backend() == 'cpu'
    coordinated = jax.process_count() > 1  # JAX's pre-emption notifier owns SIGTERM; Orbax syncs the stop step

    def should_stop(step: int) -> str | None:
        if coordinated and manager.reached_preemption(step):
            return 'SIGTERM'
        return signals.received
    rng_data = np.asarray(jax.random.key_data(rng)).tolist()

    final: dict[str, float] = {}
    pending, window_start, window_steps, paused = [], time.perf_counter(), 0, 0.0

    def count_nonfinite(done: int) -> None:
        """Count the skipped updates among the pending steps (the last is step done - 1); under
        'stop', stop at the first."""
        nonlocal skipped_updates
        flags = [float(m) for m in jax.device_get([m['train/nonfinite'] for m in pending])]
        if config.optim.nonfinite == 'stop' and any(flags):
            bad = done - len(flags) + flags.index(1.0)
            raise NonFiniteError(
                f'non-finite loss or gradient at step {bad}; its update was not applied. The newest checkpoint '
                f'({manager.steps()[-1] if manager.steps() else "none yet"}) is intact. Lower the learning rate, '
                "or skip such updates with --config.optim.nonfinite=skip")
        skipped_updates += int(sum(flags))
        for m in pending:
            m['train/nonfinite'] = 0.0  # counted

    def save(step: int, eval_results: dict | None) -> None:
        count_nonfinite(step)  # a checkpoint is written only after its steps were checked
        meta = {'config': json.loads(config_lib.to_json(config)), 'metrics': final, 'rng': rng_data,
                'skipped_updates': skipped_updates}
        manager.save(step, state, batches.get_state(), meta, metrics=eval_results)

    inputs = first
    if own_signals:
        signals.install()
    signals.recording()  # from now on a signal stops the loop after saving what is new
    try:
        for step in range(start, run.num_steps):
            if step > start:
                inputs = next_input()
            state, metrics = compiled(state, inputs, rng)
            pending.append(dict(metrics))
            window_steps += 1
            if block_each_step:
                jax.block_until_ready(metrics)
            done = step + 1
            last = done == run.num_steps
            if done % config.log.every_steps == 0 or last:
                count_nonfinite(done)
                values = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]
                          if k != 'train/nonfinite'}
                elapsed = time.perf_counter() - window_start - paused  # training time only
                values['train/lr'] = float(run.schedule(done - 1))
                values['train/skipped_updates'] = skipped_updates
                if config.data.on_corrupt == 'skip':  # unreadable images left out at load or replaced in the stream
                    values['data/skipped_images'] = getattr(run.train_data, 'skipped', 0) + batches.skipped
                values['train/images_per_sec'] = window_steps * config.batch_size / elapsed
                values['train/step_seconds'] = elapsed / window_steps
                if peak and flops_per_step:
                    values['train/mfu'] = flops_per_step / (elapsed / window_steps) / peak
                writer.write(done, values)
                progress.maybe_log(done, values)
                final.update(values)
                pending, window_start, window_steps, paused = [], time.perf_counter(), 0, 0.0
            results = None
            if done % config.eval.every_steps == 0 or last:
                eval_start = time.perf_counter()
                results = run.evaluate(state)
                writer.write(done, results)
                if lead:
                    print(f'step {done}: ' + ', '.join(f'{k} {v:.4f}' for k, v in results.items()), flush=True)
                final.update(results)
                paused += time.perf_counter() - eval_start
            saved = done % config.checkpoint.every_steps == 0 or last
            if saved:
                save(done, results)
            stopping = None if last else should_stop(done)
            if stopping:
                if not saved:
                    save(done, results)
                manager.wait()
                raise Preempted(done, stopping)
    finally:
        writer.close()
    manager.wait()
    if lead:
        metrics_lib.plot_curves(workdir)
        workdir_lib.mark_done(workdir, run.num_steps, final)
    if signals.received:  # after the last step: the run is complete, and says it was stopped
        raise Preempted(run.num_steps, signals.received)
    return final
