"""The training cadence shared by the full loop and the linear probe: log, evaluate, checkpoint,
stop on a signal or pre-emption, check for non-finite updates, and mark the run done.

A caller supplies only its step (`step(state, index) -> (state, metrics)`) and its evaluation
(`evaluate(state) -> metrics`); `run_steps` does the rest on the config's schedule
(log.every_steps, eval.every_steps, checkpoint.every_steps, and always at the last step).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable

import jax
import numpy as np

from resnet_jax import workdir as workdir_lib
from resnet_jax.train import config as config_lib
from resnet_jax.train import metrics as metrics_lib


class Preempted(Exception):
    """The run stopped on a signal after its checkpoint at `step` was complete."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f'stopped by {signal_name} after step {step}; its checkpoint is complete. '
                         'Run the same command again to continue.')
        self.step = step


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient under config.optim.nonfinite='stop'; the state holds no NaN."""


@dataclasses.dataclass
class Steps:
    """What a training supplies to the cadence: its step, its evaluation, and what its checkpoints
    hold besides the state. `window_values(values, seconds, steps)` adds throughput metrics to a
    log line from the training time (evaluation excluded) of its `steps` steps."""
    step: Callable            # (state, index) -> (state, metrics with 'train/nonfinite')
    evaluate: Callable        # state -> {'eval/...': float}
    data_state: Callable      # done -> the data iterator's state at step `done`, saved with the checkpoint
    meta: dict = dataclasses.field(default_factory=dict)  # saved in every checkpoint's metadata
    skipped_updates: int = 0  # non-finite updates skipped before `start` (a resumed run)
    window_values: Callable = lambda values, seconds, steps: None


def printer(lead: bool) -> Callable:
    """The print of the progress lines: flushed on process 0, silent elsewhere."""
    return functools.partial(print, flush=True) if lead else (lambda *_: None)


def finish_done(run, state, writer, workdir: str, evaluate: Callable) -> dict[str, float]:
    """A finished run started again: evaluate and report it, change nothing."""
    final = evaluate(state)
    writer.write(run.num_steps, final)
    if jax.process_index() == 0:
        workdir_lib.mark_done(workdir, run.num_steps, final)
    return final


def run_steps(run, state, start: int, steps: Steps, manager, writer, workdir: str, signals,
              own_signals: bool) -> dict[str, float]:
    """Train `run` from `state` at step `start` to run.num_steps; returns the final metrics.

    Raises Preempted after saving when a stop signal (or, across processes, a pre-emption) arrives,
    and NonFiniteError at the first non-finite update under config.optim.nonfinite='stop'. The writer is
    the caller's; the done marker and the plot are written here after the last step.
    """
    config, lead = run.config, jax.process_index() == 0
    if lead:  # a finished run given more steps
        workdir_lib.clear_done(workdir)
    progress = metrics_lib.ProgressLogger(run.num_steps, config.log.progress_seconds, print_fn=printer(lead))
    coordinated = jax.process_count() > 1  # JAX's pre-emption notifier owns SIGTERM; Orbax syncs the stop step

    def should_stop(step: int) -> str | None:
        if coordinated and manager.reached_preemption(step):
            return 'SIGTERM'
        return signals.received

    final: dict[str, float] = {}
    skipped_updates = steps.skipped_updates
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
        meta = {'config': json.loads(config_lib.to_json(config)), 'metrics': final, **steps.meta,
                'skipped_updates': skipped_updates}
        manager.save(step, state, steps.data_state(step), meta, metrics=eval_results)

    if own_signals:
        signals.install()
    signals.recording()  # from now on a signal stops the loop after saving what is new
    for step in range(start, run.num_steps):
        state, metrics = steps.step(state, step)
        pending.append(dict(metrics))
        window_steps += 1
        done = step + 1
        last = done == run.num_steps
        if done % config.log.every_steps == 0 or last:
            count_nonfinite(done)
            values = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]
                      if k != 'train/nonfinite'}
            elapsed = time.perf_counter() - window_start - paused  # training time only
            values['train/lr'] = float(run.schedule(done - 1))
            values['train/skipped_updates'] = skipped_updates
            steps.window_values(values, elapsed, window_steps)
            writer.write(done, values)
            progress.maybe_log(done, values)
            final.update(values)
            pending, window_start, window_steps, paused = [], time.perf_counter(), 0, 0.0
        results = None
        if done % config.eval.every_steps == 0 or last:
            eval_start = time.perf_counter()
            results = steps.evaluate(state)
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
    writer.close()
    manager.wait()
    if lead:
        metrics_lib.plot_curves(workdir)
        workdir_lib.mark_done(workdir, run.num_steps, final)
    if signals.received:  # after the last step: the run is complete, and says it was stopped
        raise Preempted(run.num_steps, signals.received)
    return final
