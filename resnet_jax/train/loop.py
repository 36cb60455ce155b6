"""`train_and_evaluate`: one linear loop that runs unchanged from one CPU to many hosts.

Order of work: validate the config (cheap, before anything else), load data, build the
model, mesh and optimizer, compile the step ahead of time (which also yields its FLOPs for
MFU), restore the newest checkpoint if the workdir has one, then train, evaluating and
checkpointing on schedule. Only process 0 writes logs and plots; every process saves its
shards of the checkpoint.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np

from resnet_jax import checkpoint
from resnet_jax.data import pipeline
from resnet_jax.models import get_model
from resnet_jax.models.summary import count_macs
from resnet_jax.train import config as config_lib
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train import optim, sharding, step as step_lib

# Dense bf16 peak TFLOP/s per device, matched as a substring of `device.device_kind`.
PEAK_TFLOPS = {'H200': 989.0, 'H100': 989.0, 'A100': 312.0, 'L4': 121.0, 'V100': 125.0,
               'TPU v6 lite': 918.0, 'TPU v5p': 459.0, 'TPU v5 lite': 197.0, 'TPU v5': 459.0,
               'TPU v4': 275.0, 'TPU v3': 123.0}


def peak_flops_per_device(config) -> float | None:
    if config.peak_tflops_per_device is not None:
        return config.peak_tflops_per_device * 1e12
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
        num_train = len(self.train_data)
        config_lib.validate(config, len(devices), num_train)
        overrides = config_lib.model_overrides(config)
        classes = overrides.setdefault('num_classes', self.train_data.num_classes)
        if classes != self.train_data.num_classes:
            raise config_lib.ConfigError(f'config.model.num_classes: {classes} differs from the '
                                         f'{self.train_data.num_classes} classes of {config.data.dataset}')
        self.model = get_model(config.model.name, **overrides)
        self.mesh = sharding.make_mesh(config, devices)
        self.num_steps = config_lib.total_steps(config, num_train)
        self.optimizer = optim.make_optimizer(config, num_train)
        self.schedule = optim.lr_schedule(config, num_train)
        self.mean, self.std = pipeline.channel_stats(config, self.train_data)
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

    def train_inputs(self, start_step: int):
        """(iterator, next_input): next_input() is the train step's data argument for steps start_step,
        start_step+1, ...: the next global batch, or the device-resident dataset itself."""
        batches = pipeline.train_iterator(self.config, self.train_data, self.mesh, start_step)
        if self.config.data.feed == 'device':
            return batches, lambda: next(batches)
        return batches, lambda: sharding.global_batch(next(batches), self.mesh)

    def evaluate(self, state) -> dict[str, float]:
        """Loss, top-1 and top-5 over the whole evaluation split, and the same for EMA parameters."""
        results = self._evaluate(state, use_ema=False, prefix='eval')
        if self.config.optim.ema_decay:
            results.update(self._evaluate(state, use_ema=True, prefix='ema_eval'))
        return results

    def _evaluate(self, state, use_ema: bool, prefix: str) -> dict[str, float]:
        totals = None
        for batch in pipeline.eval_batches(self.config, self.eval_data, jax.process_index(), jax.process_count()):
            out = self.eval_step(state, sharding.global_batch(batch, self.mesh), use_ema)
            totals = out if totals is None else jax.tree_util.tree_map(lambda a, b: a + b, totals, out)
        totals = jax.device_get(totals)
        count = float(totals.pop('count'))
        return {f'{prefix}/{k}': float(v) / count for k, v in totals.items()}


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Train `config` in `workdir` (resuming from its newest checkpoint); return the final metrics."""
    run = Run(config)
    lead = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if lead:
        config_lib.write_resolved(config, workdir)
    manager = checkpoint.Manager(os.path.join(workdir, 'checkpoints'), config)
    state = manager.restore(run.abstract_state)
    state = run.initial_state() if state is None else state
    start = int(jax.device_get(state.step))

    writer = metrics_lib.MetricWriter(workdir, enabled=lead)
    progress = metrics_lib.ProgressLogger(run.num_steps, config.progress_seconds,
                                          print_fn=functools.partial(print, flush=True) if lead else (lambda *_: None))
    rng = jax.random.key(config.seed)
    if start >= run.num_steps:  # a finished run: report, change nothing
        final = run.evaluate(state)
        writer.write(run.num_steps, final)
        writer.close()
        manager.close()
        return final

    batches, next_input = run.train_inputs(start)
    first = next_input()
    t0 = time.perf_counter()
    compiled = run.train_step.lower(state, first, rng).compile()
    compile_seconds = time.perf_counter() - t0
    flops_per_step = model_flops(run.model, config.data.image_size, config.batch_size) / run.mesh.size
    peak = peak_flops_per_device(config)
    writer.write(start, {'perf/compile_seconds': compile_seconds, 'perf/flops_per_step_per_device': flops_per_step})
    # Seen on CPU: several devices per process queuing many steps across processes can deadlock.
    block_each_step = jax.process_count() > 1 and jax.default_backend() == 'cpu'

    final: dict[str, float] = {}
    pending, window_start, window_steps, paused = [], time.perf_counter(), 0, 0.0
    inputs = first
    for step in range(start, run.num_steps):
        if step > start:
            inputs = next_input()
        state, metrics = compiled(state, inputs, rng)
        pending.append(metrics)
        window_steps += 1
        if block_each_step:
            jax.block_until_ready(metrics)
        done = step + 1
        last = done == run.num_steps
        if done % config.log_every_steps == 0 or last:
            values = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
            elapsed = time.perf_counter() - window_start - paused  # training time only
            values['train/lr'] = float(run.schedule(done - 1))
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
        if done % config.eval_every_steps == 0 or last:
            eval_start = time.perf_counter()
            results = run.evaluate(state)
            writer.write(done, results)
            if lead:
                print(f'step {done}: ' + ', '.join(f'{k} {v:.4f}' for k, v in results.items()), flush=True)
            final.update(results)
            paused += time.perf_counter() - eval_start
        if done % config.checkpoint_every_steps == 0 or last:
            manager.save(done, state)
    manager.close()
    writer.close()
    if lead:
        metrics_lib.plot_curves(workdir)
    return final
