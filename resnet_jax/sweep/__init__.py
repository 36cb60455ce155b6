"""Sweeps: many runs of one experiment file, launched, skipped and resumed as a whole.

An experiment file defines its sweep next to its config: `get_sweep(arg)` returns a list of
override dicts, built with the helpers below, one dict per run:

    def get_sweep(arg):
        nets = product({'arg': ['resnet20', 'plain20']}, {'optim.lr': [0.1, 0.05]})
        return product(nets, seeds(3)) + sample({'optim.lr': log_uniform(0.01, 1.0)}, budget=4, seed=0)

Each key is a config field set as `--config.<key>=<value>`, except 'arg', which picks the
run's `get_config(arg)` (a run without it uses `get_config()`). A run's directory name is
built from its overrides (`resnet20,lr=0.1,seed=0`), and the sweep directory records the
definition in `sweep.json`:

    python -m resnet_jax.sweep --config=experiments/cifar10.py --sweep_dir=runs/table6 --launcher=local

expands the sweep (plus any `--config.<key>=<value>` given to the command, for every run),
builds and validates every run's config exactly as `resnet_jax.train` will (so a bad override fails before anything starts), refuses a sweep directory that holds
a different sweep, skips finished runs and hands the rest to `resnet_jax.launch.<launcher>`.
An unfinished run is resumed by running the same command in the same workdir.

With `--population=M`, the runs that can share one compiled step (`train.population.check_population`:
they differ only in member fields, e.g. seeds, learning rates, resnet20 vs plain20) are grouped into
populations of at most M members, recorded in `<sweep_dir>/populations.json` and kept on every relaunch,
and each population is launched as one training, `python -m resnet_jax.train --members=<members file>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import itertools
import json
import math
import os
import re
import shlex
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

from resnet_jax import cli as cli_lib
from resnet_jax.data import sources
from resnet_jax.errors import ConfigError, UserError
from resnet_jax.train import config as config_lib
from resnet_jax.train.population import check_population, check_supported
from resnet_jax.workdir import is_done, saved_steps

ARG = 'arg'               # the override key that selects get_config's argument
SWEEP_FILE = 'sweep.json'
LAUNCHERS = ('local', 'slurm', 'tpu')
STATES = ('finished', 'unfinished', 'new')
MAX_NAME = 200            # directory names stay below the usual 255-byte limit
GROUPING_FILE = 'populations.json'  # in the sweep directory: which runs train together, kept on relaunch
POPULATIONS_DIR = 'populations'     # <sweep_dir>/populations/<name>/: a population's members file and launch log
MEMBERS_FILE = 'members.json'


class SweepError(UserError, ValueError):
    """A sweep that cannot be launched; the message names the run and the problem."""


# --- the sweep algebra: each helper returns a list of override dicts --------------------------

def product(*factors) -> list[dict]:
    """Every combination of one entry from each factor, merged. A factor is a list of override dicts
    or a dict {key: [values]}, which is itself the product over its keys."""
    lists = []
    for factor in factors:
        if isinstance(factor, dict):
            axes = [[{key: value} for value in _values(key, values)] for key, values in factor.items()]
            lists.append([_merge(combo) for combo in itertools.product(*axes)])
        else:
            lists.append(list(factor))
    return [_merge(combo) for combo in itertools.product(*lists)]


def zipped(axes: dict) -> list[dict]:
    """{key: [values]} of equal lengths -> one run per position: [{k1: a1, k2: b1}, {k1: a2, k2: b2}, ...]."""
    lengths = {key: len(_values(key, values)) for key, values in axes.items()}
    if len(set(lengths.values())) > 1:
        raise SweepError(f'zipped() needs value lists of one length, got {lengths}')
    return [dict(zip(axes, values)) for values in zip(*axes.values())]


def seeds(n: int, first: int = 0) -> list[dict]:
    """[{'seed': first}, ..., {'seed': first + n - 1}]: repetitions, averaged over by the results table."""
    if n < 1:
        raise SweepError(f'seeds() needs n >= 1, got {n}')
    return [{'seed': s} for s in range(first, first + n)]


@dataclasses.dataclass(frozen=True)
class uniform:  # noqa: N801 (reads as a distribution in a sample() space)
    """A float drawn uniformly from [low, high], rounded to `digits` significant digits."""
    low: float
    high: float
    digits: int = 3

    def draw(self, rng: np.random.Generator) -> float:
        """One value, from `rng` so that a sweep draws the same points for the same seed."""
        return _round(rng.uniform(self.low, self.high), self.digits)


@dataclasses.dataclass(frozen=True)
class log_uniform(uniform):  # noqa: N801
    """A float whose logarithm is uniform on [log low, log high] (learning rates, weight decay)."""

    def draw(self, rng: np.random.Generator) -> float:
        """One value, uniform in log space (`uniform.draw` for scale-like settings)."""
        if not 0 < self.low < self.high:
            raise SweepError(f'log_uniform needs 0 < low < high, got {self.low}, {self.high}')
        return _round(math.exp(rng.uniform(math.log(self.low), math.log(self.high))), self.digits)


def sample(space: dict, budget: int, seed: int = 0) -> list[dict]:
    """`budget` distinct random points of `space` ({key: list of choices | uniform | log_uniform}),
    the same ones for the same seed; keys are drawn in the order given."""
    rng = np.random.default_rng(seed)
    points, seen = [], set()
    for _ in range(100 * budget):
        if len(points) == budget:
            break
        point = {key: dist.draw(rng) if isinstance(dist, uniform) else _values(key, dist)[rng.integers(len(dist))]
                 for key, dist in space.items()}
        if canonical(point) not in seen:
            seen.add(canonical(point))
            points.append(point)
    if len(points) < budget:
        raise SweepError(f'sample() found only {len(points)} distinct points of {sorted(space)} for a budget of '
                         f'{budget}; widen the space or lower the budget')
    return points


def options(arg: str | None, default: str, **defaults) -> tuple[str, dict]:
    """Parse an experiment argument '[name][,key=value,...]' into (name or `default`, options).

    Options take the type of their default; an unknown option or a bad value is an error
    listing the allowed options. `options('wrn28_10,seeds=5', 'wrn16_8', seeds=1)` is
    ('wrn28_10', {'seeds': 5}); `options('seeds=5', 'wrn16_8', seeds=1)` is ('wrn16_8', {'seeds': 5}).
    """
    pairs = arg.split(',') if arg else []
    name = pairs.pop(0) if pairs and '=' not in pairs[0] else ''
    values = dict(defaults)
    for pair in pairs:
        key, eq, text = pair.partition('=')
        if key not in defaults or not eq:
            raise SweepError(f'experiment argument {arg!r}: {pair!r} is not an option; use name,key=value with key '
                             f'one of: {", ".join(defaults) or "(none)"}')
        kind = type(defaults[key])
        try:
            values[key] = text if kind is str else kind(text)
        except ValueError:
            raise SweepError(f'experiment argument {arg!r}: {key}={text!r} is not a {kind.__name__}') from None
    return name or default, values


def _values(key, values) -> list:
    if not isinstance(values, (list, tuple)) or not values:
        raise SweepError(f'{key!r}: give a non-empty list of values, got {values!r}')
    return list(values)


def _merge(parts) -> dict:
    merged = {}
    for part in parts:
        clash = merged.keys() & part.keys()
        if clash:
            raise SweepError(f'product(): key {sorted(clash)[0]!r} is set by two factors ({merged} and {part})')
        merged.update(part)
    return merged


def _round(x: float, digits: int) -> float:
    return float(f'{x:.{digits}g}')


def canonical(value) -> str:
    """A JSON text equal for equal values whatever their key order: how runs and sweeps are compared."""
    return json.dumps(value, sort_keys=True, default=list)


# --- runs ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its name, config, workdir and overrides, and the command that trains it."""
    name: str        # directory name derived from the overrides: filesystem-safe, unique in the sweep
    config: str      # the config spec, e.g. '/abs/experiments/cifar10.py:resnet20'
    workdir: str     # absolute: <sweep_dir>/<name>; recorded in sweep.json relative to the sweep directory
    overrides: dict  # {'model.skip': 'none', 'seed': 1, ...}, passed as --config.<key>=<value>
    common: tuple[str, ...] = ()  # '--config.<key>=<text>' given to the sweep command, the same for every run

    def train_args(self) -> list[str]:
        """['-m', 'resnet_jax.train', '--config=...', '--workdir=...', '--config.k=v', ...] (no interpreter)."""
        return ['-m', 'resnet_jax.train', f'--config={self.config}', f'--workdir={self.workdir}',
                *(f'--config.{key}={_flag_value(value)}' for key, value in self.overrides.items()), *self.common]

    def command(self, python: str = sys.executable) -> str:
        """The shell command that trains this run with `python` (printed, recorded, run by launchers)."""
        return shlex.join([python, *self.train_args()])


@dataclasses.dataclass(frozen=True)
class PopulationSpec:
    """Runs of a sweep trained together as one population: to a launcher, one run (`name`, `workdir`,
    `train_args`, `command`) whose training is `python -m resnet_jax.train --members=<members file>`."""
    name: str                      # 'pop-<i>', unique in the sweep
    workdir: str                   # <sweep_dir>/populations/<name>: the members file and the launch log
    members: tuple[RunSpec, ...]   # each trains into its own workdir, as a standalone run would

    @property
    def members_file(self) -> str:
        """Where the members file is: the population's whole input to `resnet_jax.train --members`."""
        return os.path.join(self.workdir, MEMBERS_FILE)

    def train_args(self) -> list[str]:
        """['-m', 'resnet_jax.train', '--members=<members file>'] (no interpreter)."""
        return ['-m', 'resnet_jax.train', f'--members={self.members_file}']

    command = RunSpec.command

    def members_content(self, configs: dict) -> dict:
        """{'members': [{'name', 'workdir', 'config'}, ...]}: each member's resolved config (`configs`, by run
        name) as its config.json holds it, its workdir relative to the members file's directory (a moved
        sweep keeps working)."""
        return {'members': [{'name': run.name, 'workdir': os.path.relpath(run.workdir, self.workdir),
                             'config': json.loads(config_lib.to_json(configs[run.name]))} for run in self.members]}

    def write_members(self, configs: dict) -> None:
        """Write the members file (atomically: a population starting now reads the old one or the new one)."""
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.members_file + '.tmp', 'w') as f:
            json.dump(self.members_content(configs), f, indent=2)
        os.replace(self.members_file + '.tmp', self.members_file)


def run_state(workdir: str) -> str:
    """'finished' (the run wrote done.json at its last step), 'unfinished' (it has a checkpoint) or 'new'."""
    if is_done(workdir):
        return 'finished'
    return 'unfinished' if saved_steps(workdir) else 'new'


def _flag_value(value) -> str:
    """The command-line text that ml_collections' config flags parse back into `value`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return repr(_tuples(value))
    return repr(value) if isinstance(value, float) else str(value)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def name_value(value) -> str:
    """A value as it appears in run names: short floats ('0.1'), lists joined by '-'."""
    if isinstance(value, float):
        short = f'{value:g}'
        return short if float(short) == value else repr(value)
    if isinstance(value, (list, tuple)):
        return '-'.join(name_value(v) for v in value)
    return str(value)


def short_keys(entries: list[dict]) -> dict[str, str]:
    """How each key appears in names: its last component ('optim.lr' -> 'lr') unless two keys share it."""
    keys = list(dict.fromkeys(key for entry in entries for key in entry))
    last = [key.rsplit('.', 1)[-1] for key in keys]
    return {key: tail if last.count(tail) == 1 else key for key, tail in zip(keys, last)}


def entry_name(entry: dict, short: dict[str, str]) -> str:
    """'resnet110,skip=scale,skip_scale=0.5': 'arg' as its bare value, the rest as key=value, made
    filesystem-safe; never '.', '..' or a leading '-'; cut with a hash of the whole past MAX_NAME."""
    parts = [name_value(v) if k == ARG else f'{short[k]}={name_value(v)}' for k, v in entry.items()]
    name = re.sub(r'[^A-Za-z0-9._+,=-]', '-', ','.join(parts)) or 'default'
    if name[0] in '.-':
        name = '_' + name
    if len(name) > MAX_NAME:
        name = f'{name[:MAX_NAME - 11]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}'
    return name


def run_names(entries: list[dict]) -> list[str]:
    """Every run's directory name (`entry_name`), deterministic and checked unique in the sweep."""
    short = short_keys(entries)
    names, owner = [], {}
    for i, entry in enumerate(entries):
        name = entry_name(entry, short)
        if name in owner:
            raise SweepError(f'runs {owner[name]} {entries[owner[name]]} and {i} {entry} both get the directory name '
                             f'{name!r}; make their overrides differ in more than unsafe characters')
        owner[name] = i
        names.append(name)
    return names


def expand(spec: str, sweep_dir: str, common: tuple[str, ...] = ()) -> tuple[dict, list[RunSpec]]:
    """(definition, runs) of the sweep that the experiment file 'path.py[:arg]' defines; `common` are
    '--config.<key>=<text>' arguments added to every run's command (a key the sweep sets is refused)."""
    path, _, arg = spec.partition(':')
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise SweepError(f'--config={spec}: no such file {path}')
    module = config_lib.config_module(path)
    if not hasattr(module, 'get_sweep'):
        raise SweepError(f'{path} defines no get_sweep(arg); add one returning a list of override dicts '
                         '(see resnet_jax/sweep/__init__.py)')
    try:
        entries = module.get_sweep(arg) if arg else module.get_sweep()
    except SweepError:
        raise
    except Exception as e:  # noqa: BLE001 - a refused argument, or a bug in the file: both named
        raise SweepError(f'{path}: get_sweep({arg!r}) failed: {type(e).__name__}: {e}') from e
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise SweepError(f'{path}: get_sweep({arg!r}) must return a non-empty list of dicts, got {entries!r}')
    for entry in entries:
        bad = [k for k, v in entry.items() if not isinstance(k, str) or v is None or isinstance(v, dict)]
        if bad:
            raise SweepError(f'{path}: run {entry}: {bad[0]!r} needs a value (a number, string, bool or tuple; '
                             'leave the key out to keep the default)')
    common = tuple(common)
    for flag in common:
        key = flag[len('--config.'):].partition('=')[0]
        if not flag.startswith('--config.') or '=' not in flag:
            raise SweepError(f'{flag!r}: a setting for every run is written --config.<key>=<value>')
        setters = [e for e in entries if key in e]
        if setters:
            raise SweepError(f'{flag} sets {key!r}, which the sweep itself sets (e.g. in run {setters[0]}); '
                             'change it in get_sweep instead')
    sweep_dir = os.path.abspath(sweep_dir)
    runs = [RunSpec(name, f'{path}:{entry[ARG]}' if ARG in entry else path, os.path.join(sweep_dir, name),
                    {k: v for k, v in entry.items() if k != ARG}, common)
            for name, entry in zip(run_names(entries), entries)]
    definition = {'config': f'{path}:{arg}' if arg else path, 'entries': json.loads(canonical(entries))}
    if common:  # part of what the runs compute: a re-launch with other settings is another sweep
        definition['common'] = list(common)
    return definition, runs


def resolve(run: RunSpec):
    """The run's config, built by ml_collections' config flags from the run's command line, exactly
    as `python -m resnet_jax.train` builds it; an override that does not survive the command line
    (a wrong type, an unknown field) is an error naming the run."""
    argv = ['resnet_jax.train', *run.train_args()[2:]]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)
    flags.DEFINE_string('workdir', None, '', flag_values=values)
    try:
        config_lib.check_config_args(argv[1:])  # a missing get_config or a typo'd field, named plainly
        values(argv)
        config = values.config
        for key, value in run.overrides.items():
            got = config
            for part in key.split('.'):
                got = got[part]
            if _tuples(got) != _tuples(value):
                raise ValueError(f'--config.{key}={_flag_value(value)} became {got!r}')
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise SweepError(f'run {run.name}: {e}') from None
    return config


def validate_runs(runs: list[RunSpec], check_data: bool = True) -> list:
    """Every run's config, validated with the project's checks before anything is launched.

    The mesh is checked on the fewest devices it accepts (the launch machine may not be the
    one that trains); with `check_data`, each distinct training split is opened (file names or
    metadata only) so that schedules are checked against its size.
    """
    sizes, configs = {}, []
    for run in runs:
        config = resolve(run)
        data = config.data
        num_train = None
        if check_data:
            key = (data.dataset, data.train_split, data.tfds_data_dir, data.num_train, data.train_subset)
            if key not in sizes:
                try:
                    sizes[key] = (min(data.num_train, data.train_subset or data.num_train)
                                  if data.dataset in ('shapes', 'synthetic')
                                  else len(sources.open_source(config, data.train_split)))
                except (OSError, ValueError) as e:
                    raise SweepError(f'run {run.name}: its training data cannot be opened here: {e}. If only the '
                                     'machines that train can read it, pass --nocheck_data') from None
            num_train = sizes[key]
        fsdp = max(config.mesh.fsdp, 1)
        devices = fsdp * (config.mesh.data if config.mesh.data > 0 else 1)
        try:
            config_lib.validate(config, devices, num_train)
        except ConfigError as e:
            raise SweepError(f'run {run.name}: {e}') from None
        configs.append(config)
    return configs


def record(sweep_dir: str, definition: dict, runs: list[RunSpec], write: bool = True) -> None:
    """Write `<sweep_dir>/sweep.json`, or check that the one there holds the same definition.
    A different sweep is refused, naming what differs; nothing is ever deleted."""
    path = os.path.join(sweep_dir, SWEEP_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)['definition']
        if old != definition:
            if old['config'] != definition['config']:
                what = f"it was made from {old['config']}, this one from {definition['config']}"
            elif old.get('common') != definition.get('common'):
                what = f"its runs all had {old.get('common', [])}, these {definition.get('common', [])}"
            else:
                old_names, new_names = set(run_names(old['entries'])), {r.name for r in runs}
                what = (f'runs only there: {sorted(old_names - new_names)}; runs only here: '
                        f'{sorted(new_names - old_names)}' if old_names != new_names else "the runs' overrides differ")
            raise SweepError(f'{sweep_dir} holds a different sweep ({what}). Use another --sweep_dir; '
                             'the existing runs are kept as they are')
        return
    if write:
        os.makedirs(sweep_dir, exist_ok=True)
        # Workdirs relative to the sweep directory, so that a moved or copied sweep keeps its runs.
        content = {'definition': definition,
                   'runs': [dict(dataclasses.asdict(run), workdir=os.path.relpath(run.workdir, sweep_dir),
                                 command=run.command()) for run in runs]}
        with open(path + '.tmp', 'w') as f:
            json.dump(content, f, indent=2, default=list)
        os.replace(path + '.tmp', path)


def load(sweep_dir: str) -> tuple[dict, list[RunSpec]]:
    """(definition, runs) as recorded in `<sweep_dir>/sweep.json`, workdirs inside `sweep_dir` wherever it
    is now (a record made before workdirs were relative names an old place: its last part is kept)."""
    path = os.path.join(sweep_dir, SWEEP_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{sweep_dir} has no {SWEEP_FILE}: is it a sweep directory made by '
                                'python -m resnet_jax.sweep?')
    with open(path) as f:
        content = json.load(f)
    sweep_dir = os.path.abspath(sweep_dir)
    runs = [RunSpec(r['name'], r['config'], os.path.join(sweep_dir, os.path.basename(r['workdir'])
                                                         if os.path.isabs(r['workdir']) else r['workdir']),
                    r['overrides'], tuple(r.get('common', ()))) for r in content['runs']]
    return content['definition'], runs


# --- populations ----------------------------------------------------------------------------------

def group(configs: list, size: int) -> list[list[int]]:
    """Run indices grouped into populations of at most `size` members: runs go, in sweep order, into the
    first bucket whose first run `check_population` lets them share a step with (its checks compare fields
    for equality, so a bucket's runs all agree), and each bucket is cut in order into the fewest groups of
    at most `size`, of sizes that differ by at most one (10 runs, size 8: 5 + 5). A run that populations
    cannot train (`check_supported`: another feed, FSDP, a warm start) is a group of its own."""
    buckets: list[list[int]] = []
    alone: list[list[int]] = []
    for i, config in enumerate(configs):
        try:
            check_supported(config)
        except ConfigError:
            alone.append([i])
            continue
        for bucket in buckets:
            try:
                check_population([configs[bucket[0]], config])
            except ConfigError:
                continue
            bucket.append(i)
            break
        else:
            buckets.append([i])
    groups = []
    for bucket in buckets:
        parts = -(-len(bucket) // size)
        groups += [bucket[j * len(bucket) // parts:(j + 1) * len(bucket) // parts] for j in range(parts)]
    return groups + alone


def population_state(population: PopulationSpec, states: dict) -> str:
    """'finished' when every member is, 'new' when every member is, else 'unfinished'."""
    member_states = {states[run.name] for run in population.members}
    return member_states.pop() if len(member_states) == 1 else 'unfinished'


def populations(sweep_dir: str, runs: list[RunSpec], configs: list, states: dict, size: int | None,
                write: bool = True) -> tuple[int | None, list[PopulationSpec], bool]:
    """(size, populations, recorded) of the sweep: the grouping in `<sweep_dir>/populations.json` if there is
    one (recorded: True), else, with `size`, a new grouping of the runs that are 'new' in `states` (a finished
    run needs nothing, an unfinished one resumes alone from its own checkpoints), written unless `write` is
    False. A grouping is never changed, as a population's members resume only together: a `size` other than
    the recorded one is refused. A group of one is no population: that run trains alone. With `write`, every
    population's members file is (re)written from `configs`."""
    if size is not None and size < 1:
        raise SweepError(f'--population={size}: give the most members a population may have, at least 1')
    path = os.path.join(sweep_dir, GROUPING_FILE)
    by_name = {run.name: run for run in runs}
    recorded = os.path.exists(path)
    if recorded:
        with open(path) as f:
            grouping = json.load(f)
        if size is not None and size != grouping['size']:
            raise SweepError(f"--population={size}: {sweep_dir} is grouped into populations of at most "
                             f"{grouping['size']} members ({path}), and a population's members resume only "
                             f"together. Relaunch with --population={grouping['size']} or without --population, "
                             'or use another --sweep_dir')
        size, names = grouping['size'], [(p['name'], p['members']) for p in grouping['populations']]
    elif size is None or size == 1:
        return size, [], False
    else:
        fresh = [i for i, run in enumerate(runs) if states[run.name] == 'new']
        names = [(f'pop-{k}', [runs[fresh[i]].name for i in indices]) for k, indices in
                 enumerate(g for g in group([configs[i] for i in fresh], size) if len(g) > 1)]
    pops = [PopulationSpec(name, os.path.join(sweep_dir, POPULATIONS_DIR, name),
                           tuple(by_name[member] for member in members)) for name, members in names]
    if write:
        if not recorded:
            content = {'size': size, 'populations': [{'name': p.name, 'members': [r.name for r in p.members]}
                                                     for p in pops]}
            with open(path + '.tmp', 'w') as f:
                json.dump(content, f, indent=2)
            os.replace(path + '.tmp', path)
        by_run = {run.name: config for run, config in zip(runs, configs)}
        for population in pops:
            population.write_members(by_run)
    return size, pops, recorded


# --- the command line ---------------------------------------------------------------------------

def _define_flags() -> None:
    flags.DEFINE_string('config', None, "experiment file with get_sweep(arg): 'experiments/cifar10.py[:arg]'")
    flags.DEFINE_string('sweep_dir', None, 'directory holding sweep.json and one workdir per run')
    flags.DEFINE_enum('launcher', 'local', LAUNCHERS, 'where the runs are started')
    flags.DEFINE_bool('dry_run', False, 'expand, validate and print what would be launched; write nothing')
    flags.DEFINE_string('only', None, 'launch only the runs whose name matches this regular expression')
    flags.DEFINE_bool('check_data', True, "open each run's training split to check schedules against its size")
    flags.DEFINE_integer('population', None, 'train the runs that can share one compiled step as populations of at '
                         'most this many members, one training each (the grouping is recorded and kept on relaunch)')
    flags.mark_flags_as_required(['config', 'sweep_dir'])


def main(argv, common: tuple[str, ...] = ()) -> int:
    """The command's main under absl: refuse positional arguments, then `run_sweep` on the flags."""
    if len(argv) > 1:
        raise SweepError(f'unexpected arguments: {argv[1:]}')
    return run_sweep(flags.FLAGS, common)


def run_sweep(options, common: tuple[str, ...] = ()) -> int:
    """The command: expand, validate, record, group into populations (`--population`, or as recorded), skip
    finished runs and populations and launch the rest; the exit code.
    `options` has the flags of _define_flags and of the launcher's module (absl FLAGS or a Namespace);
    `common` the '--config.<key>=<value>' arguments that every run gets."""
    try:
        only = re.compile(options.only) if options.only else None
    except re.error as e:
        raise SweepError(f'--only={options.only!r} is not a regular expression: {e}') from None
    definition, runs = expand(options.config, options.sweep_dir, common)
    selected = [run for run in runs if only is None or only.search(run.name)]
    if not selected:
        raise SweepError(f'--only={options.only!r} matches none of the runs: {", ".join(r.name for r in runs)}')
    configs = validate_runs(runs, options.check_data)
    sweep_dir = os.path.abspath(options.sweep_dir)
    record(sweep_dir, definition, runs, write=not options.dry_run)
    states = {run.name: run_state(run.workdir) for run in runs}
    width = max(len(run.name) for run in selected)
    print(f'sweep {definition["config"]}: {len(runs)} runs in {sweep_dir}' +
          (f', {len(selected)} selected by --only' if only else ''))
    for run in selected:
        print(f'  {run.name:<{width}}  {states[run.name]}')
    size, pops, recorded = populations(sweep_dir, runs, configs, states, getattr(options, 'population', None),
                                       write=not options.dry_run)
    chosen = {run.name for run in selected}
    # A population trains all its members or none: one that holds a selected run is launched whole.
    pops = [p for p in pops if chosen & {run.name for run in p.members}]
    pooled = {run.name for p in pops for run in p.members}
    alone = [run for run in selected if run.name not in pooled and states[run.name] != 'finished']
    if size is not None:
        print(f'{len(pops)} population{"s" * (len(pops) != 1)} of at most {size} members' +
              (f' (the grouping recorded in {os.path.join(sweep_dir, GROUPING_FILE)})' if recorded else '') +
              (', each holding a run selected by --only' if only else '') + ':')
        for p in pops:
            print(f'  {p.name}  {population_state(p, states)}: {", ".join(run.name for run in p.members)}')
        if alone:
            print(f'  trained alone: {", ".join(run.name for run in alone)}')
    order = {run.name: i for i, run in enumerate(runs)}
    todo = sorted([p for p in pops if population_state(p, states) != 'finished'] + alone,
                  key=lambda job: order[job.members[0].name if isinstance(job, PopulationSpec) else job.name])
    if not todo:
        print('every selected run is finished; nothing to launch')
        return 0
    launcher = importlib.import_module(f'resnet_jax.launch.{options.launcher}')
    return launcher.launch(todo, sweep_dir, options)


def _launcher_from_argv(argv: list[str]) -> str:
    """--launcher, read before absl parses the command line so that its module's flags exist then."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--launcher', default='local')
    return parser.parse_known_args(argv[1:])[0].launcher


def cli() -> None:
    """`python -m resnet_jax.sweep`: the launcher's module is imported before absl parses the command
    line, so that its flags (--slurm_*, --tpu_*, --local_*) are known then."""
    _define_flags()
    if _launcher_from_argv(sys.argv) in LAUNCHERS:
        importlib.import_module(f'resnet_jax.launch.{_launcher_from_argv(sys.argv)}')
    # --config.<key>=<value> (not flags of this command): settings for every run, passed on verbatim.
    common = tuple(a for a in sys.argv[1:] if a.startswith('--config.'))
    sys.argv = [a for a in sys.argv if not a.startswith('--config.')]
    cli_lib.run(lambda argv: main(argv, common))
