"""Analysis tools: each claim of DESIGN.md section 1 turned into a measurement and a plot.

Run them with `python -m resnet_jax.analyze <tool>[,<tool>...] --workdir=<run>` (see resnet_jax/analyze.py).
"""
