"""Sweeps as populations (`python -m resnet_jax.sweep --population=M`): the exact grouping of a mixed sweep,
the members files, the dry run, a relaunch that keeps the grouping (and refuses another M), --only, and a
tiny sweep trained end to end as one population by the local launcher."""

import json
import os
import re
from pathlib import Path

import pytest
from helpers import tiny_config
from test_sweep import ROOT, TINY_HEADER, cli_env, launch_options
from test_train import run_module

from resnet_jax import sweep
from resnet_jax.launch import local
from resnet_jax.sweep import results
from resnet_jax.train import config as config_lib

EXPERIMENT = TINY_HEADER + '''

def get_sweep(arg=''):
    if arg == 'small':  # ResNet-8 and its plain twin, 2 seeds each: one population of 4
        return product({'arg': ['resnet20', 'plain20']}, seeds(2))
    nets = product({'arg': ['resnet20', 'plain20']}, seeds(2), {'optim.lr': [0.1, 0.05]})
    deeper = [{'arg': 'resnet20', 'model.stage_sizes': (2, 2, 2), 'seed': 0},
              {'arg': 'plain20', 'model.stage_sizes': (2, 2, 2), 'seed': 1}]
    return nets + deeper + [{'arg': 'resnet20', 'batch_size': 32}, {'arg': 'plain20', 'model.shortcut': 'B'}]
'''
NETS = [f'{net},seed={seed},lr={lr}' for net in ('resnet20', 'plain20') for seed in (0, 1) for lr in (0.1, 0.05)]
DEEPER = ['resnet20,stage_sizes=2-2-2,seed=0', 'plain20,stage_sizes=2-2-2,seed=1']
ALONE = ['resnet20,batch_size=32', 'plain20,shortcut=B']


@pytest.fixture
def spec(tmp_path) -> str:
    path = tmp_path / 'tiny.py'
    path.write_text(EXPERIMENT)
    return str(path)


def options(spec, sweep_dir, **kw):
    """What `python -m resnet_jax.sweep --config=spec --sweep_dir=... [--population=M]` parses into."""
    return launch_options(**{'config': spec, 'sweep_dir': str(sweep_dir), 'launcher': 'local', 'only': None,
                             'check_data': True, 'population': None, **kw})


@pytest.fixture
def launched(monkeypatch):
    """The jobs that the sweep hands to the local launcher, which starts nothing."""
    jobs = []
    monkeypatch.setattr(local, 'launch', lambda todo, sweep_dir, options: jobs.append(todo) or 0)
    return jobs


def names(jobs) -> list:
    """A launch as names: a population as (its name, [its members]), a run alone as its name."""
    return [(job.name, [m.name for m in job.members]) if isinstance(job, sweep.PopulationSpec) else job.name
            for job in jobs]


def test_a_mixed_sweep_groups_into_compatible_populations(spec, tmp_path):
    """resnet20 / plain20 (option A) x 2 seeds x 2 learning rates share one network; a deeper pair shares
    another; another batch size, and a plain net with projection shortcuts, share with nothing. Buckets are
    cut in sweep order into the fewest groups of at most M, of sizes that differ by at most one."""
    _, runs = sweep.expand(spec, str(tmp_path / 'sw'))
    assert [r.name for r in runs] == NETS + DEEPER + ALONE
    configs = sweep.validate_runs(runs)
    assert sweep.group(configs, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10], [11]]
    assert sweep.group(configs, 3) == [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9], [10], [11]]
    assert sweep.group(configs, 8) == [list(range(8)), [8, 9], [10], [11]]
    assert sweep.group(configs, 1) == [[i] for i in range(12)]
    states = dict.fromkeys(NETS + DEEPER + ALONE, 'new')
    size, pops, recorded = sweep.populations(str(tmp_path / 'sw'), runs, configs, states, 3, write=False)
    assert (size, recorded) == (3, False) and not (tmp_path / 'sw').exists()
    assert [(p.name, [r.name for r in p.members]) for p in pops] == [
        ('pop-0', NETS[:2]), ('pop-1', NETS[2:5]), ('pop-2', NETS[5:]), ('pop-3', DEEPER)]  # groups of 1: alone
    assert pops[0].workdir == str(tmp_path / 'sw' / 'populations' / 'pop-0')
    assert pops[0].train_args() == ['-m', 'resnet_jax.train',
                                    f'--members={tmp_path}/sw/populations/pop-0/members.json']
    with pytest.raises(sweep.SweepError, match=r'--population=0: give the most members a population may have'):
        sweep.populations(str(tmp_path / 'sw'), runs, configs, states, 0, write=False)


@pytest.mark.parametrize('field, value', [('data.feed', 'device'), ('mesh.fsdp', 2), ('init.source', '/w')])
def test_runs_a_population_cannot_train_are_trained_alone(field, value):
    """Runs that would otherwise share a step, but that populations cannot train (another feed, FSDP, a warm
    start), are groups of one, which the sweep trains as ordinary runs."""
    configs = [tiny_config(seed=s) for s in range(4)]
    for config in configs[1:3]:
        section, name = field.split('.')
        setattr(getattr(config, section), name, value)
    assert sweep.group(configs, 4) == [[0, 3], [1], [2]]


def test_members_files_and_the_recorded_grouping(spec, tmp_path, launched):
    """Each population's members file holds each member's name, its workdir relative to the file's
    directory and its resolved config exactly as its config.json would; populations.json records the
    grouping; the launcher gets the populations and the runs that train alone, in sweep order."""
    sweep_dir = tmp_path / 'sw'
    assert sweep.run_sweep(options(spec, sweep_dir, population=4)) == 0
    assert names(launched[0]) == [('pop-0', NETS[:4]), ('pop-1', NETS[4:]), ('pop-2', DEEPER), *ALONE]
    assert json.loads((sweep_dir / 'populations.json').read_text()) == {'size': 4, 'populations': [
        {'name': 'pop-0', 'members': NETS[:4]}, {'name': 'pop-1', 'members': NETS[4:]},
        {'name': 'pop-2', 'members': DEEPER}]}
    _, runs = sweep.load(str(sweep_dir))
    by_name = {run.name: run for run in runs}
    for pop in launched[0][:3]:
        content = json.loads(Path(pop.members_file).read_text())
        assert list(content) == ['members'] and [m['name'] for m in content['members']] == [
            r.name for r in pop.members]
        for member in content['members']:
            assert list(member) == ['name', 'workdir', 'config']
            assert member['workdir'] == f'../../{member["name"]}'
            assert os.path.normpath(os.path.join(pop.workdir, member['workdir'])) == by_name[member['name']].workdir
            assert member['config'] == json.loads(config_lib.to_json(sweep.resolve(by_name[member['name']])))
    plain = json.loads(Path(launched[0][1].members_file).read_text())['members'][3]['config']
    assert (plain['model']['name'], plain['seed'], plain['optim']['lr']) == ('plain20', 1, 0.05)


def test_dry_run_prints_the_populations_and_writes_nothing(spec, tmp_path, capsys):
    sweep_dir = tmp_path / 'sw'
    assert sweep.run_sweep(options(spec, sweep_dir, population=3, dry_run=True)) == 0
    out = capsys.readouterr().out.splitlines()
    assert not sweep_dir.exists()
    start = out.index('4 populations of at most 3 members:')
    assert out[start:start + 6] == [
        '4 populations of at most 3 members:',
        f'  pop-0  new: {", ".join(NETS[:2])}',
        f'  pop-1  new: {", ".join(NETS[2:5])}',
        f'  pop-2  new: {", ".join(NETS[5:])}',
        f'  pop-3  new: {", ".join(DEEPER)}',
        f'  trained alone: {", ".join(ALONE)}']
    commands = out[start + 6:]
    assert len(commands) == 6
    for k, line in enumerate(commands[:4]):
        members = f'{sweep_dir}/populations/pop-{k}'
        assert line.endswith(f' -m resnet_jax.train --members={members}/members.json >> {members}/train.log 2>&1')
    assert ' --workdir=' + str(sweep_dir / ALONE[0]) in commands[4]


def test_a_relaunch_keeps_the_grouping(spec, tmp_path, launched, capsys):
    """The recorded grouping is kept whatever the runs' states now: a finished population is skipped, a
    partly finished one is launched whole; --population with another M is refused, without it the recorded
    grouping is used; --only launches each population that holds a selected run, whole. A run that was
    already unfinished when the sweep was first grouped (its own checkpoints) trains alone."""
    sweep_dir = tmp_path / 'sw'
    assert sweep.run_sweep(options(spec, sweep_dir)) == 0  # first launched without populations
    assert not (sweep_dir / 'populations.json').exists() and names(launched.pop()) == NETS + DEEPER + ALONE
    (sweep_dir / NETS[1] / 'checkpoints' / '4').mkdir(parents=True)  # it ran alone for a while
    assert sweep.run_sweep(options(spec, sweep_dir, population=4)) == 0
    grouping = [('pop-0', [NETS[0], *NETS[2:4]]), ('pop-1', NETS[4:]), ('pop-2', DEEPER)]  # 7 runs: 3 + 4
    assert names(launched.pop()) == [grouping[0], NETS[1], *grouping[1:], *ALONE]
    recorded = (sweep_dir / 'populations.json').read_text()

    for name in NETS[:5] + DEEPER[:1]:  # pop-0 finished, pop-1 and pop-2 in part
        (sweep_dir / name).mkdir(exist_ok=True)
        (sweep_dir / name / 'done.json').write_text('{}')
    (sweep_dir / NETS[6] / 'checkpoints' / '4').mkdir(parents=True)
    for population in (4, None):
        assert sweep.run_sweep(options(spec, sweep_dir, population=population)) == 0
        assert names(launched.pop()) == grouping[1:] + ALONE
        out = capsys.readouterr().out
        assert (f'3 populations of at most 4 members (the grouping recorded in {sweep_dir}/populations.json):\n'
                '  pop-0  finished: ' in out)
        assert '  pop-1  unfinished: ' in out and '  pop-2  unfinished: ' in out
    assert (sweep_dir / 'populations.json').read_text() == recorded
    with pytest.raises(sweep.SweepError, match=re.escape(
            f'--population=3: {sweep_dir} is grouped into populations of at most 4 members ({sweep_dir}/'
            "populations.json), and a population's members resume only together. Relaunch with --population=4 "
            'or without --population, or use another --sweep_dir')):
        sweep.run_sweep(options(spec, sweep_dir, population=3))

    assert sweep.run_sweep(options(spec, sweep_dir, only='plain20,seed=1,lr=0.05')) == 0
    assert names(launched.pop()) == grouping[1:2]  # the population that holds it, whole
    assert 'each holding a run selected by --only' in capsys.readouterr().out
    assert sweep.run_sweep(options(spec, sweep_dir, only='^resnet20,seed=0')) == 0
    assert capsys.readouterr().out.endswith('every selected run is finished; nothing to launch\n')
    assert not launched


@pytest.mark.slow
def test_a_tiny_sweep_trains_as_one_population(spec, tmp_path):
    """2 seeds of ResNet-8 and its plain twin, launched as one population of 4 by the command line: one
    training, every member's workdir finished as a standalone run's would be, the results table reads them,
    and launching again runs nothing."""
    sweep_dir = tmp_path / 'sw'
    args = ['-m', 'resnet_jax.sweep', f'--config={spec}:small', f'--sweep_dir={sweep_dir}', '--population=4']
    first = run_module(args, env=cli_env(tmp_path))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert '1 population of at most 4 members:\n  pop-0  new: resnet20,seed=0, resnet20,seed=1, plain20,seed=0, ' \
           'plain20,seed=1\n' in first.stdout
    assert 'pop-0: finished' in first.stdout and '1 of 1 runs finished' in first.stdout
    _, runs = sweep.load(str(sweep_dir))
    for run in runs:
        assert sweep.run_state(run.workdir) == 'finished', run.name
        assert json.loads(Path(run.workdir, 'done.json').read_text())['step'] == 8
        assert json.loads(Path(run.workdir, 'config.json').read_text()) == json.loads(
            config_lib.to_json(sweep.resolve(run)))
    records = results.collect(str(sweep_dir))
    assert [r['name'] for r in records] == [r.name for r in runs] and all(r['step'] == 8 for r in records)
    assert len({json.dumps(r['final'], sort_keys=True) for r in records}) == 4  # four different runs
    again = run_module(args, env=cli_env(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert '  pop-0  finished: ' in again.stdout
    assert again.stdout.endswith('every selected run is finished; nothing to launch\n')


@pytest.mark.parametrize('spec, size, sizes', [
    ('cifar10.py', 2, [2] * 5),
    ('cifar10.py:seeds=5', 10, [10] * 5),
    ('cifar10.py:seeds=5', 8, [5] * 10),
    ('identity_mappings.py:table1', 8, [1, 3, 3, 2, 1, 1]),
    ('identity_mappings.py:table1,seeds=5', 8, [5, 7, 8, 7, 8, 5, 5, 5, 5]),
    ('identity_mappings.py:table2,seeds=5', 8, [5] * 10),
    ('identity_mappings.py:table2', 8, [1] * 10),
])
def test_the_experiments_group_as_their_docstrings_say(spec, size, sizes):
    """Table 6's seeds and plain/ResNet twins share a population per depth; Identity Mappings' rows share one
    where they differ only in member values (constant scaling, gate bias), its placements never."""
    _, runs = sweep.expand(str(ROOT / 'experiments' / spec), '/tmp/unused')
    groups = sweep.group(sweep.validate_runs(runs, check_data=False), size)
    assert [len(g) for g in groups] == sizes
    depth = [re.sub(r'\D', '', run.name.split(',')[0]) for run in runs]  # resnet56 and plain56: '56'
    if spec.startswith('cifar10'):
        assert all(len({depth[i] for i in g}) == 1 for g in groups)
    assert sorted(i for g in groups for i in g) == list(range(len(runs)))
