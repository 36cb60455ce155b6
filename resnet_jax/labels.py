"""The label map of a run: its class names in label order, kept in `<workdir>/labels.json`.

A model's output i means class names[i] only as long as the data keeps that order. The map is
recorded when a training starts and checked on resume, evaluation and export, so that a
dataset whose classes changed (a class folder added, removed or renamed) stops with an error
naming the first differing label instead of scoring every image against the wrong class.
"""

from __future__ import annotations

import json
import os

from resnet_jax.cli import UserError

LABELS_FILE = 'labels.json'


class LabelMapError(UserError, ValueError):
    """The dataset's classes differ from those a run was trained on, or its labels.json is unreadable."""


def path(workdir: str) -> str:
    return os.path.join(workdir, LABELS_FILE)


def read(workdir: str) -> tuple[str, ...] | None:
    """The recorded class names, or None for a run that has none (older runs)."""
    try:
        with open(path(workdir)) as f:
            names = json.load(f)['classes']
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LabelMapError(f'{path(workdir)} is unreadable ({type(e).__name__}: {e}); it should hold '
                            '{"classes": [<class name>, ...]}') from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LabelMapError(f'{path(workdir)}: "classes" must be a list of class names')
    return tuple(names)


def check(workdir: str, names, write: bool = False, new_run: bool = False) -> None:
    """Refuse a dataset whose class names (in label order) differ from those recorded in `workdir`;
    with `write`, record them where nothing is recorded yet (a run older than labels.json) or, for
    a `new_run` (no checkpoint yet), in place of what an earlier attempt recorded."""
    names = tuple(str(n) for n in names)
    recorded = None if new_run else read(workdir)
    if recorded is None:
        if write:
            tmp = path(workdir) + '.tmp'
            with open(tmp, 'w') as f:
                json.dump({'classes': list(names)}, f, indent=1)
            os.replace(tmp, path(workdir))
        return
    if recorded == names:
        return
    i = next((i for i, (a, b) in enumerate(zip(recorded, names)) if a != b), min(len(recorded), len(names)))
    was = repr(recorded[i]) if i < len(recorded) else 'absent'
    now = repr(names[i]) if i < len(names) else 'absent'
    raise LabelMapError(f'the dataset\'s classes differ from those {workdir} was trained on ({path(workdir)}): '
                        f'label {i} was {was}, now {now} ({len(recorded)} classes then, {len(names)} now). '
                        'Restore the dataset as it was, or train in a new workdir')
