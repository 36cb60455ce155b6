"""python -m resnet_jax.analyze: the command line of the analysis tools (see the package docstring)."""

from __future__ import annotations

from resnet_jax import allocator  # noqa: I001 (first: before JAX starts its threads)

allocator.keep_freed_memory()

from absl import app, flags
from ml_collections import config_flags

from resnet_jax import cli
from resnet_jax.analyze import TOOLS, analyse, common, parse_tools

CONFIG = config_flags.DEFINE_config_file('config', None, 'analyse a fresh initialisation of this experiment config')
flags.DEFINE_string('workdir', None, 'the run to analyse (a resnet_jax.train workdir)')
flags.DEFINE_string('compare', None, 'a second run shown beside the first in every plot (e.g. its plain twin)')
flags.DEFINE_integer('step', None, 'checkpoint step to analyse (default: the newest readable one)')
flags.DEFINE_string('out', None, 'output directory (default: <workdir>/analysis; required with --config)')
flags.DEFINE_string('sweep_dir', None, 'degradation: the sweep directory of plain and residual runs')
for _field in common.Options.__dataclass_fields__.values():
    _define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}[type(_field.default)]
    _define(_field.name, _field.default, f'see resnet_jax.analyze.common.Options ({_field.name})')
FLAGS = flags.FLAGS


def main(argv):
    """Run the tools named by the one argument on the flags' run(s); print the files written."""
    if len(argv) != 2:
        raise app.UsageError(f'usage: python -m resnet_jax.analyze <tool>[,<tool>...] --workdir=<run>; tools: '
                             f'{", ".join(TOOLS)}, all')
    tools = parse_tools(argv[1])  # its ValueErrors, and those of the options, are printed by resnet_jax.cli
    options = common.Options(**{name: FLAGS[name].value for name in common.Options.__dataclass_fields__})
    files = analyse(tools, options, FLAGS.workdir, CONFIG.value, FLAGS.compare, FLAGS.step, FLAGS.out,
                    FLAGS.sweep_dir)
    print('\n'.join(files))


if __name__ == '__main__':
    cli.run(main, config_flag='config', errors=(ValueError,))
