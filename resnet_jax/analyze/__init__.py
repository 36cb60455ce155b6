"""python -m resnet_jax.analyze <tool>[,<tool>...] --workdir=<run> [--compare=<run>] [options]

Tools (docs/design.md section 1, one module each under resnet_jax/analyze/):
    gradient-flow  per-block norms of dL/dh_l and of the weight gradients, at init and at each checkpoint
    signal         per-block mean and variance of the residual stream and of each branch
    lesion         error with each block deleted, and with k random blocks deleted (Veit et al.)
    paths          path-length distribution and the gradient carried by paths of each length (Veit et al.)
    landscape      loss/accuracy on filter-normalised random 1-D lines and 2-D grids (Li et al.)
    degradation    He et al.'s Figure 6 from a sweep directory (--sweep_dir instead of --workdir)
    all            every tool but degradation

A run is analysed at its newest checkpoint (or --step); `--config=<file>[:arg]` analyses a freshly
initialised model instead (with --out). `--compare` adds a second run (e.g. the plain twin) to every
plot. Files go to <workdir>/analysis/<tool>/ (or <out>/<tool>/): PNG, JSON, CSV and summary.md.
"""

from __future__ import annotations

import os

from resnet_jax import workdir as workdir_lib
from resnet_jax.analyze import (
    common,
    degradation,
    gradient_flow,
    landscape,
    lesion,
    paths,
    signal_propagation,
)
from resnet_jax.train import config as config_lib

TOOLS = ('gradient-flow', 'signal', 'lesion', 'paths', 'landscape', 'degradation')


def parse_tools(spec: str) -> list[str]:
    """The tools named by the command's first argument ('all' expanded, duplicates dropped), in order;
    a ValueError naming every tool for an unknown one."""
    tools = [t for t in spec.split(',') if t]
    tools = [t for name in tools for t in (TOOLS[:-1] if name == 'all' else [name])]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        raise ValueError(f'unknown tool {unknown[0] if unknown else spec!r}; choose from: {", ".join(TOOLS)}, all '
                         '(comma-separated for several)')
    return list(dict.fromkeys(tools))


def check_run(workdir: str, flag: str):
    """The run's recorded config; fails before any work if the directory is not a trained run."""
    if not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
        raise ValueError(f'--{flag}={workdir} has no config.json: is it a resnet_jax.train workdir?')
    if not os.path.isdir(workdir_lib.checkpoints(workdir)):
        raise ValueError(f'--{flag}={workdir} has no checkpoints/ to analyse')
    return config_lib.load_resolved(workdir)


def analyse(tools: list[str], options: common.Options, workdir=None, config=None, compare=None, step=None,
            out=None, sweep_dir=None) -> list[str]:
    """Run `tools`; every argument is checked before anything is loaded. Returns the files written."""
    modules = {'gradient-flow': gradient_flow, 'signal': signal_propagation, 'lesion': lesion, 'paths': paths,
               'landscape': landscape}
    model_tools = [t for t in tools if t != 'degradation']
    if 'degradation' in tools and not sweep_dir:
        raise ValueError('degradation needs --sweep_dir=<a sweep directory of plain and residual runs>')
    if sweep_dir and not os.path.isdir(sweep_dir):
        raise ValueError(f'--sweep_dir={sweep_dir} does not exist')
    if model_tools:
        if (workdir is None) == (config is None):
            raise ValueError(f'{", ".join(model_tools)} need exactly one of --workdir=<run> and --config=<file>')
        if config is not None and not out:
            raise ValueError('--config analyses a fresh model that has no run directory: give --out=<directory>')
        if config is not None:
            config_lib.validate(config, 1)
        configs = [check_run(workdir, 'workdir') if workdir else config]
        if compare:
            configs.append(check_run(compare, 'compare'))
        if 'paths' in model_tools and common.kind(common.model_of(configs[0])) == 'plain':
            raise ValueError('paths needs a residual net: a plain net (skip=none) has a single path. Give the '
                             'residual run as --workdir and the plain one as --compare')
    files = []
    if 'degradation' in tools:
        files += degradation.analyse(sweep_dir, os.path.join(out or os.path.join(sweep_dir, 'analysis'), 'degradation'))
    if model_tools:
        subjects = [common.load(workdir, config, step)] + ([common.load(compare, step=None)] if compare else [])
        for tool in model_tools:
            files += modules[tool].analyse(subjects, options, common.output_dir(subjects[0], tool, out))
    return files
