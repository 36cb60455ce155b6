"""Session setup: one persistent XLA compilation cache for the whole test session, the commands' malloc
settings for CPU training (resnet_jax/allocator.py) in every test process, and each module-scoped
fixture built once (its tests share one xdist worker: `--dist loadgroup` in pyproject.toml).

Most tests compile the same few tiny networks, in this process, in the xdist workers and in the
CLI subprocesses they start; a cached executable is the same program the compiler would give, so
nothing a test asserts changes, only the time. The cache is fresh for each session (set
JAX_COMPILATION_CACHE_DIR yourself to keep one across sessions), and its size limit turns on JAX's
file lock, so concurrent processes never read an entry another is still writing.
"""

import os
import shutil
import tempfile

import pytest

from resnet_jax import allocator

CACHE_SETTINGS = {
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
    'JAX_COMPILATION_CACHE_MAX_SIZE': str(8 << 30),
}


def pytest_configure(config):
    """In the controlling process, before any worker or subprocess starts (they inherit os.environ)."""
    if hasattr(config, 'workerinput') or 'JAX_COMPILATION_CACHE_DIR' in os.environ:
        return
    config.xla_cache = tempfile.mkdtemp(prefix='resnet_jax_xla_cache_')
    os.environ.update(CACHE_SETTINGS, JAX_COMPILATION_CACHE_DIR=config.xla_cache)
    allocator.keep_freed_memory()  # the commands' CPU malloc settings, for the workers too


def pytest_unconfigure(config):
    """Remove the session's cache."""
    if getattr(config, 'xla_cache', None):
        shutil.rmtree(config.xla_cache, ignore_errors=True)
        del os.environ['JAX_COMPILATION_CACHE_DIR']


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Group the tests that use a module-scoped fixture, so that xdist builds it on one worker, once."""
    for item in items:
        for name in item.fixturenames:
            definitions = item._fixtureinfo.name2fixturedefs.get(name)
            if definitions and definitions[-1].scope == 'module':
                item.add_marker(pytest.mark.xdist_group(f'{item.module.__name__}.{name}'))
