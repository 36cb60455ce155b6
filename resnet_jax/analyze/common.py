"""What every analysis tool starts from, and how they all write their results.

A `Subject` is a network with its variables: a trained run (`--workdir`: rebuilt from its recorded
config by the training code and restored with `resnet_jax.train.run.restore_workdir`) or a fresh one
(`--config`: the run's own initialisation from its seed). Tools read the first examples of the run's
own split through its evaluation pipeline, so there is no augmentation and the normalisation is the
one training used. Each tool writes PNG plots, JSON and CSV, and a `summary.md` into
`<workdir>/analysis/<tool>/` (or `<out>/<tool>/`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import jax
import numpy as np

from resnet_jax import checkpoint
from resnet_jax import workdir as workdir_lib
from resnet_jax.data import augment, pipeline
from resnet_jax.errors import check_choice
from resnet_jax.models import get_model
from resnet_jax.models.registry import model_overrides
from resnet_jax.train import step as step_lib
from resnet_jax.train.run import Run, restore_workdir

SPLITS = ('eval', 'train')
BN_MODES = ('train', 'eval')
COLOURS = {'residual': 'tab:blue', 'plain': 'tab:red'}


@dataclasses.dataclass(frozen=True)
class Options:
    """The tools' settings (the command line's flags of the same names), checked before any work."""

    split: str = 'eval'         # which split the examples come from: the run's eval_split or train_split
    num_examples: int = 1000    # the first N examples of the split (0: all of it)
    batch_size: int = 128       # examples per compiled call; gradient-flow, signal and paths use one batch
    bn: str = 'train'           # BatchNorm in gradient-flow and signal: batch statistics or running ones
    seed: int = 0               # random lesion draws, path samples and landscape directions
    draws: int = 5              # random draws per k (lesion) and per path length (paths)
    max_deleted: int = 8        # lesion: delete k = 1..max_deleted random blocks
    grid: int = 21              # landscape: points per axis over [-span, span]
    span: float = 1.0
    points_per_device: int = 4  # landscape: grid points each device evaluates per compiled call

    def __post_init__(self):
        check_choice('split', self.split, SPLITS)
        check_choice('bn', self.bn, BN_MODES)
        for field, low in (('num_examples', 0), ('batch_size', 1), ('draws', 1), ('max_deleted', 1), ('grid', 2),
                           ('points_per_device', 1)):
            if getattr(self, field) < low:
                raise ValueError(f'--{field}={getattr(self, field)} must be an integer >= {low}')
        if not self.span > 0:
            raise ValueError(f'--span={self.span} must be positive')


def model_of(config):
    """The network a config describes, without building its run (cheap: for checks before any work)."""
    return get_model(config.model.name, **model_overrides(config))


def kind(model) -> str:
    """'plain' (no shortcut, skip='none') or 'residual': the two curves every plot compares."""
    return 'plain' if model.design.skip == 'none' else 'residual'


@dataclasses.dataclass
class Subject:
    """One network the tools analyse: a run rebuilt by the training code, and its variables at `step`."""
    label: str
    run: Run
    step: int                # the training step of `variables` (0: initialisation)
    variables: dict          # {'params', 'batch_stats'}
    workdir: str | None

    @property
    def config(self):
        """The run's resolved config."""
        return self.run.config

    @property
    def model(self):
        """The network, without rematerialisation (which changes memory use, never values)."""
        return self.run.model.clone(remat=False)  # remat changes memory use, never values

    @property
    def kind(self) -> str:
        """'plain' or 'residual' (see `kind`)."""
        return kind(self.run.model)

    @property
    def num_blocks(self) -> int:
        """The number of residual blocks, the x axis of the per-block plots."""
        return len(self.run.model.block_names)

    def checkpoint_steps(self) -> list[int]:
        """The steps of the run's saved checkpoints ([] for a fresh model), for tools that
        follow training."""
        if self.workdir is None:
            return []
        manager = checkpoint.Manager(workdir_lib.checkpoints(self.workdir), self.config, read_only=True)
        steps = manager.steps()
        manager.close()
        return steps

    def variables_at(self, step: int) -> dict:
        """The variables at checkpoint `step`; step 0 is the run's initialisation from its seed."""
        if step == 0:
            return state_variables(self.run.initial_state())
        return state_variables(restore_workdir(self.workdir, step, self.run)[1].state)


def state_variables(state) -> dict:
    """A train state's {'params', 'batch_stats'}: what `model.apply` takes."""
    return {'params': state.params, 'batch_stats': state.batch_stats}


def load(workdir: str | None = None, config=None, step: int | None = None) -> Subject:
    """A trained run (its checkpoint `step`, default the newest readable one) or a fresh model from `config`."""
    if workdir is not None:
        run, restored = restore_workdir(workdir, step)
        return Subject(os.path.basename(os.path.normpath(workdir)), run, restored.step,
                       state_variables(restored.state), workdir)
    run = Run(config)
    return Subject(config.model.name, run, 0, state_variables(run.initial_state()), None)


def examples(subject: Subject, options: Options) -> tuple[np.ndarray, np.ndarray]:
    """(normalised float32 images, int labels): the first `num_examples` of the split, evaluation views."""
    run = subject.run
    source = run.eval_data if options.split == 'eval' else run.train_data
    images, labels, count = [], [], 0
    for batch in pipeline.eval_batches(subject.config, source, 0, 1):
        real = batch['mask'] > 0
        images.append(batch['image'][real])
        labels.append(batch['label'][real])
        count += int(real.sum())
        if options.num_examples and count >= options.num_examples:
            break
    n = options.num_examples or count
    x = augment.normalize(np.concatenate(images)[:n], run.mean, run.std)
    return np.asarray(x), np.concatenate(labels)[:n].astype(np.int32)


def padded_batches(x: np.ndarray, y: np.ndarray, size: int):
    """(x, y, mask) batches of exactly `size` rows, the last padded with masked rows, so one compile serves all."""
    for start in range(0, len(x), size):
        idx = np.arange(start, start + size)
        mask = (idx < len(x)).astype(np.float32)
        idx = np.minimum(idx, len(x) - 1)
        yield x[idx], y[idx], mask


def loss_and_correct(model, variables, x, y, mask, **hooks):
    """Summed cross-entropy and top-1 hits over the real rows of a batch, eval mode (hooks: keep, grad_route)."""
    logits = model.apply(variables, x, train=False, **hooks)
    return ((step_lib.cross_entropy(logits, y, model.num_classes) * mask).sum(),
            (step_lib.topk_correct(logits, y, 1) * mask).sum())


def batch_loss(model, variables, x, y, train: bool, **hooks):
    """Mean cross-entropy of a batch; in train mode BatchNorm uses the batch's statistics (not stored)."""
    if train:
        logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'],
                                rngs={'dropout': jax.random.key(0)}, **hooks)
    else:
        logits = model.apply(variables, x, train=False, **hooks)
    return step_lib.cross_entropy(logits, y, model.num_classes).mean()


# --- output -------------------------------------------------------------------------------------

def output_dir(subject: Subject, tool: str, out: str | None) -> str:
    """<out or the run's analysis/>/<tool>/, created: where a tool writes its files."""
    base = out if out else os.path.join(subject.workdir, 'analysis')
    path = os.path.join(base, tool)
    os.makedirs(path, exist_ok=True)
    return path


def write_json(directory: str, name: str, content) -> str:
    """Write `content` to <directory>/<name> as JSON (numpy scalars as floats); the path."""
    path = os.path.join(directory, name)
    with open(path, 'w') as f:
        json.dump(content, f, indent=1, default=float)
    return path


def write_csv(directory: str, name: str, rows: list[dict]) -> str:
    """Write `rows` (dicts with the same keys) to <directory>/<name> as CSV; the path."""
    path = os.path.join(directory, name)
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_results(directory: str, tool: str, content, rows: list[dict], figures: list[str], title: str,
                  lines: list[str]) -> list[str]:
    """What every tool writes: <tool>.json (`content`), <tool>.csv (`rows`) beside its saved `figures`, and a
    summary.md (`title`, `lines`) naming them all; the files, summary last."""
    files = [write_json(directory, f'{tool}.json', content), write_csv(directory, f'{tool}.csv', rows), *figures]
    return files + [write_summary(directory, title, lines, files)]


def write_summary(directory: str, title: str, lines: list[str], files: list[str]) -> str:
    """Write <directory>/summary.md: a title, the tool's findings and the files it wrote; the path."""
    path = os.path.join(directory, 'summary.md')
    names = ', '.join(f'`{os.path.basename(f)}`' for f in files)
    with open(path, 'w') as f:
        f.write(f'# {title}\n\n' + '\n'.join(lines) + f'\n\nFiles: {names}\n')
    return path


def figure(rows: int, cols: int, width: float = 5.5, height: float = 4.2, **subplot_kw):
    """(figure, axes array) drawn with Agg, without touching pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout='constrained')
    FigureCanvasAgg(fig)
    return fig, np.atleast_1d(fig.subplots(rows, cols, squeeze=False, subplot_kw=subplot_kw)).reshape(rows, cols)


def save_figure(fig, directory: str, name: str) -> str:
    """Save `fig` as <directory>/<name>; the path."""
    path = os.path.join(directory, name)
    fig.savefig(path, dpi=80)
    return path


def describe(subject: Subject) -> str:
    """One line naming the subject, its kind and depth, and where its variables come from, for summaries."""
    where = f'`{subject.workdir}` at step {subject.step}' if subject.workdir else 'a fresh initialisation'
    return f'{subject.label} ({subject.kind}, {subject.num_blocks} blocks): {where}'
