"""What every command shares: `UserError` and `run`, absl's app.run with errors a person can read.

A user error (a bad flag, config value, path or dataset; `UserError` and its subclasses, absl's
flag and usage errors, and the OS errors of a path the user typed) ends a command with

    error: <message>

on stderr, no traceback, and exit code 2 (`USAGE_EXIT_CODE`). Anything else is a bug or an
environment failure and keeps its traceback (exit code 1). `--debug`, or RESNET_JAX_DEBUG=1 in
the environment, shows the traceback of user errors too. The training's own exit codes (3 for a
non-finite loss, 75 for a pre-empted run) are set by the training command and pass through.

Every `--help` lists the flags of the command's own modules (absl lists only those defined in
the main module otherwise), including flags defined in the resnet_jax modules it imports.
"""

from __future__ import annotations

import ast
import os
import sys

from absl import app, flags

from resnet_jax.errors import USAGE_EXIT_CODE, UserError
from resnet_jax.train import config as config_lib

DEBUG_ENV = 'RESNET_JAX_DEBUG'
# OS errors about a path the user gave; their message names the path.
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def _debug() -> bool:
    if os.environ.get(DEBUG_ENV, '') not in ('', '0'):
        return True
    if flags.FLAGS.is_parsed() and 'debug' in flags.FLAGS:
        return flags.FLAGS.debug
    return '--debug' in sys.argv  # a parse error: the flags are not parsed


def message(error: BaseException) -> str:
    """The readable text of `error`: the message of a config-flag error without the reprs and
    tracebacks that ml_collections wraps around it."""
    text = str(error)
    if isinstance(error, (AttributeError, KeyError)) and len(text) > 1 and text[0] in '"\'':
        try:  # KeyError and ml_collections' AttributeError hold the repr of the message
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
    if 'Error whilst parsing config file:' in text:  # ml_collections puts the traceback in the message
        text = text.strip().splitlines()[-1]
    return text.replace('\nDid you mean', '; did you mean')


def _fail(error: BaseException) -> None:
    if _debug():
        raise error
    print(f'error: {message(error)}', file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def list_own_flags(main_module: str | None = None) -> None:
    """Make the flags defined in resnet_jax modules key flags of the main module, so that --help
    (absl lists the main module's key flags) shows them."""
    main_module = sys.argv[0] if main_module is None else main_module
    values = flags.FLAGS
    for module, module_flags in values.flags_by_module_dict().items():
        if module == main_module or module.startswith('resnet_jax.'):
            for flag in module_flags:
                values.register_key_flag_for_module(main_module, flag)


def _parse(argv: list[str], config_flag: str | None):
    """absl's flag parsing, with a parse failure (absl's or the config file's) as a user error;
    the config file named by `--<config_flag>` and its overrides are checked first, so that a
    missing get_config, a wrong argument or a typo'd field is named plainly."""
    if config_flag is not None:
        try:
            config_lib.check_config_args(argv[1:], config_flag)
        except UserError as e:
            _fail(e)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - absl's and ml_collections' parse errors come in many types
        _fail(e)


def run(main, config_flag: str | None = None, errors: tuple[type[BaseException], ...] = ()) -> None:
    """absl's app.run(main) where a user error (a `UserError`, a flag or usage error, a path error,
    or one of `errors`) prints 'error: <message>' and exits with code 2; `main`'s return value is the
    exit code. `config_flag` names a config-file flag (ml_collections) whose file is checked first."""
    # Defined here, not on import: modules that import UserError stay free of command-line flags.
    flags.DEFINE_bool('debug', False, f'show the traceback of user errors too (or set {DEBUG_ENV}=1)')
    list_own_flags()
    user_errors = (UserError, app.UsageError, flags.Error, *PATH_ERRORS, *errors)

    def run_main(args):
        try:
            code = main(args)
        except user_errors as e:
            _fail(e)
        sys.exit(code)

    app.run(run_main, flags_parser=lambda argv: _parse(argv, config_flag))
