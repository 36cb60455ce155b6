"""The run directory: its layout, the exit codes, its lock, the done/pre-empted protocol, the
stored config and the label map. The one place that knows these, and cheap to import (no JAX), so launchers and
sweeps can use it.

    <workdir>/
        config.json        the resolved config of the run (written by process 0 at each start)
        labels.json        the class names in label order, recorded when the training starts
        metrics.jsonl      one JSON object per line, appended a whole line at a time
        tensorboard/       TensorBoard events (browsing only)
        checkpoints/<step>/{state,data,meta}/   Orbax checkpoints; SHA256SUMS.json in each step
        train_curves.png   loss and error curves, redrawn at the end
        done.json          written atomically once the run reached its last step
        library.log        INFO logging of Orbax, absl and JAX (the terminal shows only warnings)
        train.log          the local launcher's record of each start and the run's output
        lock               held (flock) for the whole life of a training; holds who holds it

A training holds `lock` from its first access to the workdir until it ends, so a second training,
an evaluation that records its results, or a launcher on the same workdir is refused at once,
naming the holder. The kernel drops the flock when its process dies, however it dies; a holder
record left behind by such a process is taken over with a warning.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys

from absl import flags
from absl import logging as absl_logging

from resnet_jax.errors import USAGE_EXIT_CODE, UserError  # noqa: F401 (USAGE_EXIT_CODE: one of the exit codes below)

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
CHECKPOINTS_DIR = 'checkpoints'
CURVES_FILE = 'train_curves.png'
DONE_FILE = 'done.json'
LIBRARY_LOG = 'library.log'
LAUNCH_LOG = 'train.log'
LOCK_FILE = 'lock'
LABELS_FILE = 'labels.json'

# Exit codes of `python -m resnet_jax.train` (and of evaluate where they apply).
ERROR_EXIT_CODE = 1       # a workdir or checkpoint that cannot continue (printed as 'error: ...') or a crash
# USAGE_EXIT_CODE = 2 (resnet_jax.errors): a bad flag or config value; nothing was started
NONFINITE_EXIT_CODE = 3   # stopped on a NaN/Inf loss or gradient (config.optim.nonfinite='stop')
BUSY_EXIT_CODE = 73       # the workdir is locked by another training (EX_CANTCREAT); nothing was done
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a signal, after saving anything new; run the same command again
ABORTED_EXIT_CODE = 130   # a second Ctrl-C: stopped at once, without saving


class WorkdirError(Exception):
    """The workdir cannot be used as asked; the message names the file and what to do."""


class WorkdirBusy(WorkdirError):
    """Another process holds the workdir's lock."""


def path(workdir: str, name: str) -> str:
    """The path of file `name` in `workdir`; one place that joins them."""
    return os.path.join(workdir, name)


def checkpoints(workdir: str) -> str:
    """The checkpoint directory of a workdir, which `checkpoint.Manager` owns."""
    return os.path.join(workdir, CHECKPOINTS_DIR)


# ---------------------------------------------------------------------------------------------- lock

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    """'pid P on host H since T' (the record's command, for inspection, is left out of messages)."""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')}"


def _read_record(fd: int) -> dict | None:
    data = os.pread(fd, 1 << 16, 0)
    if not data.strip():
        return None
    try:
        return json.loads(data)
    except ValueError:
        return {}  # a record cut short by a crash: a holder that did not release


class Lock:
    """The exclusive lock of a workdir (`<workdir>/lock`), held from `acquire()` to `release()`.

    A flock on the file is the truth: the kernel drops it when the holding process ends, however
    it ends. The file's text says who holds it ({pid, host, since, command}); it is emptied on a
    clean release, so a record found under a free lock was left by a process that died. Where the
    file system has no flock (some network mounts), a record of a live process on this host counts
    as held.
    """

    def __init__(self, workdir: str):
        self.workdir, self.file = workdir, os.path.join(workdir, LOCK_FILE)
        self._fd = None

    def acquire(self) -> None:
        """Take the lock, or raise WorkdirBusy naming the holder."""
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            holder = _read_record(fd)
            os.close(fd)
            raise WorkdirBusy(f'{self.workdir} is in use by ' + (_describe(holder) if holder else 'another process')
                              + '. Wait for it to end, stop it, or use another --workdir') from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            flocked = False
        previous = _read_record(fd)
        if previous is not None:
            alive = previous.get('host') == socket.gethostname() and _pid_alive(previous.get('pid', -1))
            if not flocked and alive and previous.get('pid') != os.getpid():
                os.close(fd)
                raise WorkdirBusy(f'{self.workdir} is in use by {_describe(previous)}. Wait for it to end, stop '
                                  'it, or use another --workdir')
            logging.warning('%s: taking over the lock left by %s, which ended without releasing it',
                            self.workdir, _describe(previous) if previous else 'a process')
        record = {'pid': os.getpid(), 'host': socket.gethostname(),
                  'since': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  'command': ' '.join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + '\n').encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Empty the holder record (a clean end) and drop the lock; calling it again does nothing."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:  # a full or read-only disk: the record stays, the flock still goes
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def holder(workdir: str) -> dict | None:
    """Who holds `workdir`'s lock now ({pid, host, since, command}, possibly empty), or None if it is free."""
    try:
        fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_record(fd) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------- done and stored config

def write_atomic(file: str, text: str) -> None:
    """Write `file` whole or not at all: a reader never sees it half-written."""
    with open(file + '.tmp', 'w', encoding='utf-8') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(file + '.tmp', file)


def mark_done(workdir: str, step: int, metrics: dict) -> None:
    """`<workdir>/done.json`: the run reached its last `step`; sweeps skip such runs."""
    write_atomic(os.path.join(workdir, DONE_FILE), json.dumps({'step': step, 'metrics': metrics}))


def is_done(workdir: str) -> bool:
    """Whether the run finished (`done.json` exists), so that launchers and sweeps skip it."""
    return os.path.exists(os.path.join(workdir, DONE_FILE))


def clear_done(workdir: str) -> None:
    """A finished run given more steps is unfinished again."""
    if is_done(workdir):
        os.remove(os.path.join(workdir, DONE_FILE))


def saved_steps(workdir: str) -> list[int]:
    """The complete checkpoint steps in a workdir, from the file system (Orbax lists only complete ones
    under a plain number; a save in progress has a temporary name)."""
    directory = checkpoints(workdir)
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def stored_config(workdir: str) -> tuple[dict | None, str]:
    """(The config a run in `workdir` recorded, as JSON, where it was read from): `config.json`, or where
    that is missing, the config stored with the newest checkpoint that has one; (None, '') for a new
    workdir. A file that is not a JSON object is a WorkdirError naming it."""
    file = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(file):
        return _read_json_object(file, 'the config of the run'), file
    for step in saved_steps(workdir)[::-1]:
        meta = os.path.join(checkpoints(workdir), str(step), 'meta', 'metadata')
        try:
            config = _read_json_object(meta, 'checkpoint metadata').get('config')
        except (OSError, WorkdirError):
            continue  # a damaged step; an older one may have it
        if isinstance(config, dict):
            logging.warning('%s is missing: using the config stored with checkpoint %d (%s)', file, step, meta)
            return config, meta
    return None, ''


def _read_json_object(file: str, what: str) -> dict:
    try:
        with open(file, encoding='utf-8') as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise WorkdirError(f'{file} ({what}) is not valid JSON: {e}. Restore it from a backup, or delete it '
                           'to recover it from the newest checkpoint') from None
    if not isinstance(value, dict):
        raise WorkdirError(f'{file} ({what}) holds a {type(value).__name__}, not a JSON object')
    return value


def write_config(workdir: str, config_json: str) -> None:
    """Record the run's resolved config as `config.json`, atomically, so a resume or evaluation rebuilds it."""
    write_atomic(os.path.join(workdir, CONFIG_FILE), config_json)


# ------------------------------------------------------------------------------------------ label map
# A model's output i means class names[i] only as long as the data keeps that order: the map is
# recorded when a training starts and checked on resume, evaluation and export, so a dataset whose
# classes changed (a class folder added, removed or renamed) stops with an error naming the first
# differing label instead of scoring every image against the wrong class.

class LabelMapError(UserError, ValueError):
    """The dataset's classes differ from those a run was trained on, or its labels.json is unreadable."""


def read_labels(workdir: str) -> tuple[str, ...] | None:
    """The recorded class names in label order, or None for a run that has none (older runs)."""
    file = os.path.join(workdir, LABELS_FILE)
    try:
        with open(file, encoding='utf-8') as f:
            names = json.load(f)['classes']
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LabelMapError(f'{file} is unreadable ({type(e).__name__}: {e}); it should hold '
                            '{"classes": [<class name>, ...]}') from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LabelMapError(f'{file}: "classes" must be a list of class names')
    return tuple(names)


def check_labels(workdir: str, names, write: bool = False, new_run: bool = False) -> None:
    """Refuse a dataset whose class names (in label order) differ from those recorded in `workdir`;
    with `write`, record them where nothing is recorded yet (a run older than labels.json) or, for
    a `new_run` (no checkpoint yet), in place of what an earlier attempt recorded."""
    names = tuple(str(n) for n in names)
    recorded = None if new_run else read_labels(workdir)
    if recorded is None:
        if write:
            write_atomic(os.path.join(workdir, LABELS_FILE), json.dumps({'classes': list(names)}, indent=1))
        return
    if recorded == names:
        return
    i = next((i for i, (a, b) in enumerate(zip(recorded, names)) if a != b), min(len(recorded), len(names)))
    was = repr(recorded[i]) if i < len(recorded) else 'absent'
    now = repr(names[i]) if i < len(names) else 'absent'
    raise LabelMapError(f"the dataset's classes differ from those {workdir} was trained on "
                        f'({os.path.join(workdir, LABELS_FILE)}): label {i} was {was}, now {now} '
                        f'({len(recorded)} classes then, {len(names)} now). Restore the dataset as it was, '
                        'or train in a new workdir')


# ---------------------------------------------------------------------------------------------- JSONL

def append_line(file, record: dict) -> None:
    """Append `record` to a JSONL file opened unbuffered in binary append mode, as one write() of the
    line and its newline, so a killed writer leaves at most one partial last line (which `read_jsonl`
    skips) and two writers never interleave within a line."""
    file.write((json.dumps(record, allow_nan=False) + '\n').encode())


def read_jsonl(file: str) -> list[dict]:
    """The JSON objects of a JSONL file in order; a line that is not one (half-written by a killed
    process, or damaged) is skipped with a warning naming the file and line."""
    records = []
    with open(file, encoding='utf-8', errors='replace') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get('step', 0), int):
                logging.warning('%s line %d is not a metrics record and is skipped: %.80r', file, number, line)
                continue
            records.append(record)
    return records


# -------------------------------------------------------------------------------------------- logging

# Loggers whose warnings are about probing for accelerators, not about the run: file only.
PROBING = ('jax._src.xla_bridge',)


def quiet_terminal(workdir: str) -> None:
    """For a command's terminal: warnings and errors only, the INFO logging of Orbax, absl and JAX in
    <workdir>/library.log. With --verbosity given, absl's usual terminal logging at that level."""
    if flags.FLAGS['verbosity'].present:
        return
    terminal = absl_logging.get_absl_handler()
    terminal.setLevel(logging.WARNING)
    terminal.addFilter(lambda record: not record.name.startswith(PROBING))
    try:
        os.makedirs(workdir, exist_ok=True)
        file = logging.FileHandler(os.path.join(workdir, LIBRARY_LOG), encoding='utf-8')
    except OSError:  # a read-only workdir: nowhere to keep the log
        return
    file.setFormatter(terminal.python_handler.formatter)
    logging.getLogger().addHandler(file)
    logging.raiseExceptions = False  # a log file on a full disk must not print a traceback per record


# -------------------------------------------------------------------------------------------- signals

class Stopped(SystemExit):
    """Raised from a stop signal's handler before training has anything new to save: the process ends
    with PREEMPTED_EXIT_CODE, through every `finally` (so locks and files are closed), and no
    `except Exception` can swallow it."""

    def __init__(self, signal_name: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.signal_name = signal_name


class StopSignals:
    """SIGTERM, SIGUSR1 (SLURM's pre-emption warnings) and Ctrl-C, from the first instruction of a command.

    Three phases. Installed with `exit_at_once` (a command's first instruction, while the libraries
    load and the flags are read, nothing opened yet), a signal ends the process on the spot with
    PREEMPTED_EXIT_CODE: unwinding a half-imported native library can crash the interpreter's shutdown.
    From `unwinding()` until `recording()` (called when training is about to make something new to
    save), a signal raises `Stopped`; where Python swallows that exception (a handler that ran inside a
    garbage-collection callback), `recording()` raises it instead. Afterwards a signal is recorded in
    `received` and the loop stops after the current step, saving first. A second Ctrl-C aborts at once
    (KeyboardInterrupt, exit 130).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received, self._record, self._previous, self._interrupts = None, False, {}, 0
        self._unraisable_hook, self._exit_at_once = None, False

    def install(self, *, exit_at_once: bool = False) -> StopSignals:
        """Catch the stop signals from now on (a fresh start: nothing received, not yet recording)."""
        self.received, self._record, self._interrupts, self._exit_at_once = None, False, 0, exit_at_once
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._unraisable_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    @property
    def installed(self) -> bool:
        """Whether the handlers are in place (a command installed them, or the training loop did)."""
        return bool(self._previous)

    def uninstall(self) -> None:
        """Give the signals back to the handlers they had before `install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._unraisable_hook is not None:
            sys.unraisablehook, self._unraisable_hook = self._unraisable_hook, None

    def release(self, sig: int) -> None:
        """Hand `sig` back to its previous handler (JAX's pre-emption notifier owns SIGTERM in a
        multi-process run)."""
        if sig in self._previous:
            signal.signal(sig, self._previous.pop(sig))

    def unwinding(self) -> None:
        """From now on a signal raises `Stopped`, so that locks and files are closed on the way out."""
        self._exit_at_once = False

    def recording(self) -> None:
        """From now on record signals; raise Stopped for one that came before and was swallowed."""
        if self.received and not self._record:
            raise Stopped(self.received)
        self._record = True

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self._exit_at_once:
            print(f'stopped by {name} before training began', file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(PREEMPTED_EXIT_CODE)
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
            print('Ctrl-C: stopping after saving (press Ctrl-C again to abort at once)', file=sys.stderr, flush=True)
        self.received = self.received or name
        if not self._record:
            raise Stopped(name)

    def _unraisable(self, unraisable) -> None:
        if not isinstance(unraisable.exc_value, Stopped):  # a Stopped swallowed here is raised by `recording`
            self._unraisable_hook(unraisable)


# The process's one set of handlers: installed by the train command at its first instruction, read by
# the training loop; a library caller that never installs it keeps the loop's own handling.
SIGNALS = StopSignals()
