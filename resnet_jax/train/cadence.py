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
from typing import Any

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


def printer(lead: bool, prefix: str = '') -> Callable:
    """The print of the progress lines: flushed on process 0 (after `prefix`, a population member's name),
    silent elsewhere."""
    if not lead:
        return lambda *_: None
    return functools.partial(print, prefix.rstrip(), flush=True) if prefix else functools.partial(print, flush=True)


@dataclasses.dataclass
class Output:
    """Where one run's results go (its workdir, writer and checkpoints), and which part of the trained state and
    of a step's metrics is its own: all of them for a standalone run, member i's slice for a population
    (train.population_loop), so that one cadence serves both."""
    config: Any
    schedule: Callable        # step -> learning rate, logged as train/lr
    workdir: str
    writer: Any               # metrics.MetricWriter
    manager: Any              # checkpoint.Manager
    data_state: Callable      # done -> the data iterator's state at step `done`, saved with the checkpoint
    meta: dict = dataclasses.field(default_factory=dict)  # saved in every checkpoint's metadata
    skipped_updates: int = 0  # non-finite updates skipped before `start` (a resumed run)
    name: str = ''            # the prefix of its messages ('' for a standalone run)
    part: Callable = lambda tree: tree   # its part of a step's metrics (fetched to the host)
    saved: Callable = lambda state: state  # its part of the state, as its checkpoint holds it


def _standalone(run, workdir: str, writer, manager, steps: Steps | None = None) -> Output:
    """The one Output of a standalone run."""
    if steps is None:
        return Output(run.config, run.schedule, workdir, writer, manager, data_state=lambda done: None)
    return Output(run.config, run.schedule, workdir, writer, manager, steps.data_state, steps.meta,
                  steps.skipped_updates)


def finish_done(run, state, writer, workdir: str, evaluate: Callable) -> dict[str, float]:
    """A finished run started again: evaluate and report it, change nothing."""
    return finish_members(run.num_steps, state, [_standalone(run, workdir, writer, None)],
                          lambda s: [evaluate(s)])[0]


def finish_members(num_steps: int, state, outputs: list[Output], evaluate: Callable) -> list[dict[str, float]]:
    """`finish_done` for the runs of `outputs` trained together (`evaluate(state)`: a list, one per output)."""
    finals = evaluate(state)
    for out, final in zip(outputs, finals):
        out.writer.write(num_steps, final)
        if jax.process_index() == 0:
            workdir_lib.mark_done(out.workdir, num_steps, final)
    return finals


def run_steps(run, state, start: int, steps: Steps, manager, writer, workdir: str, signals,
              own_signals: bool) -> dict[str, float]:
    """Train `run` from `state` at step `start` to run.num_steps; returns the final metrics.

    Raises Preempted after saving when a stop signal (or, across processes, a pre-emption) arrives,
    and NonFiniteError at the first non-finite update under config.optim.nonfinite='stop'. The writer is
    the caller's; the done marker and the plot are written here after the last step.
    """
    output = _standalone(run, workdir, writer, manager, steps)
    return run_members(run.num_steps, state, start, steps.step, lambda s: [steps.evaluate(s)], steps.window_values,
                       [output], signals, own_signals)[0]


def run_members(num_steps: int, state, start: int, step: Callable, evaluate: Callable, window_values: Callable,
                outputs: list[Output], signals, own_signals: bool) -> list[dict[str, float]]:
    """`run_steps` for the runs of `outputs` trained by one `step` (a population's members, whose cadence
    fields are equal): each gets its own metrics, evaluation (`evaluate(state)`: a list, one per output),
    checkpoints and done marker. Every run's previous save is complete before any starts the next, so a crash
    during a save leaves a step that every run has (the caller keeps one checkpoint more than config asks)."""
    config, lead = outputs[0].config, jax.process_index() == 0
    if lead:  # a finished run given more steps
        for out in outputs:
            workdir_lib.clear_done(out.workdir)
    progress = [metrics_lib.ProgressLogger(num_steps, config.log.progress_seconds, print_fn=printer(lead, out.name))
                for out in outputs]
    coordinated = jax.process_count() > 1  # JAX's pre-emption notifier owns SIGTERM; Orbax syncs the stop step

    def should_stop(step: int) -> str | None:
        if coordinated and outputs[0].manager.reached_preemption(step):
            return 'SIGTERM'
        return signals.received

    finals: list[dict[str, float]] = [{} for _ in outputs]
    skipped_updates = [out.skipped_updates for out in outputs]
    pending, counted, window_start, window_steps, paused = [], 0, time.perf_counter(), 0, 0.0

    def count_nonfinite(done: int) -> None:
        """Count the skipped updates among the pending steps not yet counted (the last is step done - 1);
        under 'stop', stop at the first."""
        nonlocal counted
        flags = jax.device_get([m['train/nonfinite'] for m in pending[counted:]])
        counted = len(pending)
        for i, out in enumerate(outputs):
            mine = [float(out.part(f)) for f in flags]
            if config.optim.nonfinite == 'stop' and any(mine):
                bad = done - len(mine) + mine.index(1.0)
                raise NonFiniteError(
                    f'{out.name}non-finite loss or gradient at step {bad}; its update was not applied. The newest '
                    f'checkpoint ({out.manager.steps()[-1] if out.manager.steps() else "none yet"}) is intact. Lower '
                    "the learning rate, or skip such updates with --config.optim.nonfinite=skip")
            skipped_updates[i] += int(sum(mine))

    def save(step: int, eval_results: list | None) -> None:
        count_nonfinite(step)  # a checkpoint is written only after its steps were checked
        for out in outputs:  # every run's previous step is complete before any run saves this one
            out.manager.wait()
        for i, out in enumerate(outputs):
            meta = {'config': json.loads(config_lib.to_json(out.config)), 'metrics': finals[i], **out.meta,
                    'skipped_updates': skipped_updates[i]}
            out.manager.save(step, out.saved(state), out.data_state(step), meta,
                             metrics=None if eval_results is None else eval_results[i])

    if own_signals:
        signals.install()
    signals.recording()  # from now on a signal stops the loop after saving what is new
    for index in range(start, num_steps):
        state, metrics = step(state, index)
        pending.append(dict(metrics))
        window_steps += 1
        done = index + 1
        last = done == num_steps
        if done % config.log.every_steps == 0 or last:
            count_nonfinite(done)
            fetched = jax.device_get(pending)
            elapsed = time.perf_counter() - window_start - paused  # training time only
            for i, out in enumerate(outputs):
                mine = [out.part(m) for m in fetched]
                values = {k: float(np.mean([m[k] for m in mine])) for k in mine[0] if k != 'train/nonfinite'}
                values['train/lr'] = float(out.schedule(done - 1))
                values['train/skipped_updates'] = skipped_updates[i]
                window_values(values, elapsed, window_steps)
                out.writer.write(done, values)
                progress[i].maybe_log(done, values)
                finals[i].update(values)
            pending, counted, window_start, window_steps, paused = [], 0, time.perf_counter(), 0, 0.0
        results = None
        if done % config.eval.every_steps == 0 or last:
            eval_start = time.perf_counter()
            results = evaluate(state)
            for out, result, final in zip(outputs, results, finals):
                out.writer.write(done, result)
                if lead:
                    print(f'{out.name}step {done}: ' + ', '.join(f'{k} {v:.4f}' for k, v in result.items()),
                          flush=True)
                final.update(result)
            paused += time.perf_counter() - eval_start
        saved = done % config.checkpoint.every_steps == 0 or last
        if saved:
            save(done, results)
        stopping = None if last else should_stop(done)
        if stopping:
            if not saved:
                save(done, results)
            for out in outputs:
                out.manager.wait()
            raise Preempted(done, stopping)
    for out in outputs:
        out.writer.close()
    for out in outputs:
        out.manager.wait()
    if lead:
        for out, final in zip(outputs, finals):
            metrics_lib.plot_curves(out.workdir)
            workdir_lib.mark_done(out.workdir, num_steps, final)
    if signals.received:  # after the last step: the run is complete, and says it was stopped
        raise Preempted(num_steps, signals.received)
    return finals
