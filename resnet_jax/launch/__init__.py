"""Launchers behind `python -m resnet_jax.sweep --launcher=NAME`: one module per place runs start.

Each module (`local`, `slurm`, `tpu`) defines its own absl flags, prefixed with its name, and

    def launch(runs: list[RunSpec], sweep_dir: str, options) -> int   # an exit code

which starts `runs` (the sweep's unfinished runs, each `python <run.train_args()>` in
`run.workdir`), or with `options.dry_run` prints what it would start. A population
(`sweep.PopulationSpec`, `--population`) is one such run: `name`, `workdir` (its members file and
log), `train_args()` and `command()`, its training one process that trains every member. `resnet_jax.sweep`
imports the chosen module by name, before parsing the command line, so that its flags exist.
"""
