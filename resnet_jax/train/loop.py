"""`train_and_evaluate`: one linear loop that runs unchanged from one CPU to many hosts.

Order of work: validate the config (cheap, before anything else), load data, build the
model, mesh and optimizer (`run.Run`), compile the step ahead of time, restore the newest
checkpoint if the workdir has one, then train on the cadence of `cadence.run_steps`
(evaluating and checkpointing on schedule). Only process 0 writes logs and plots; every
process saves its shards of the checkpoint.
"""

from __future__ import annotations

import threading
import time

import jax
import numpy as np

from resnet_jax import checkpoint
from resnet_jax import workdir as workdir_lib
from resnet_jax.data import sources
from resnet_jax.train import cadence, mfu, probe
from resnet_jax.train import config as config_lib
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train.run import Run, lock_workdir


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
        train = probe.train_head if config.finetune.linear_probe else _train  # the probe trains only the head
        with metrics_lib.MetricWriter(workdir, enabled=lead) as writer:
            return train(run, restored, manager, writer, workdir, signals, own_signals)
    finally:
        if own_signals:
            signals.uninstall()
        if manager is not None:
            manager.close()
        if lock is not None:
            lock.release()


def _train(run: Run, restored, manager, writer, workdir: str, signals, own_signals: bool) -> dict[str, float]:
    """The full network's training from `restored` (None: a new run) to run.num_steps."""
    config = run.config
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
    if start >= run.num_steps:
        return cadence.finish_done(run, state, writer, workdir, run.evaluate)

    first = next_input()
    t0 = time.perf_counter()
    compiled = run.train_step.lower(state, first, rng).compile()
    compile_seconds = time.perf_counter() - t0
    flops_per_step = mfu.model_flops(run.model, config.data.image_size, config.batch_size) / run.mesh.size
    peak = mfu.peak_flops_per_device(config)
    writer.write(start, {'perf/compile_seconds': compile_seconds, 'perf/flops_per_step_per_device': flops_per_step})
    # Seen on CPU: several devices per process queuing many steps across processes can deadlock.
    block_each_step = jax.process_count() > 1 and jax.default_backend() == 'cpu'

    def step(state, index: int):
        state, metrics = compiled(state, first if index == start else next_input(), rng)
        if block_each_step:
            jax.block_until_ready(metrics)
        return state, metrics

    def window_values(values: dict, seconds: float, steps: int) -> None:
        if config.data.on_corrupt == 'skip':  # unreadable images left out at load or replaced in the stream
            values['data/skipped_images'] = getattr(run.train_data, 'skipped', 0) + batches.skipped
        values['train/images_per_sec'] = steps * config.batch_size / seconds
        values['train/step_seconds'] = seconds / steps
        utilisation = mfu.mfu(flops_per_step, seconds / steps, peak)
        if utilisation is not None:
            values['train/mfu'] = utilisation

    steps = cadence.Steps(step=step, evaluate=run.evaluate, data_state=lambda done: batches.get_state(),
                          meta={'rng': np.asarray(jax.random.key_data(rng)).tolist()},
                          skipped_updates=skipped_updates, window_values=window_values)
    return cadence.run_steps(run, state, start, steps, manager, writer, workdir, signals, own_signals)
