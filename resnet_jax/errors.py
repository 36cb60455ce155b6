"""The errors and checks every layer shares, so that no module imports upward to raise one.

A `UserError` is something the person running a command can fix (a flag, a config value, a path,
a dataset); the commands print its message as 'error: <message>' and exit with `USAGE_EXIT_CODE`
(see `resnet_jax.cli`). `check_choice` and `close_matches` phrase the common cases the same way
everywhere: the bad value, every allowed value, and the nearest spelling. `refuse` and
`check_field_choice` and `check_field_regex` are the config's forms of them, shared by the subsystems that each check
their own section of the config.
"""

from __future__ import annotations

import difflib
import re
from typing import NoReturn

USAGE_EXIT_CODE = 2  # a user error: bad flags, config values, paths or data; nothing was started


class UserError(Exception):
    """An error the user can fix (a flag, a config value, a path, a dataset); the message says how.
    Printed as 'error: <message>' with exit code 2 by `resnet_jax.cli.run`."""


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the field and what is allowed."""


def check_choice(field: str, value, allowed) -> None:
    """Raise a ValueError naming `field`, the bad value and every allowed value."""
    if value not in allowed:
        raise ValueError(f'{field}={value!r} is not allowed; choose one of: '
                         + ', '.join(repr(a) for a in allowed))


def close_matches(word: str, candidates) -> str:
    """A ' Did you mean ...?' suffix for error messages, or '' when nothing is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=5, cutoff=0.6)
    return f' Did you mean: {", ".join(matches)}?' if matches else ''


def refuse(field: str, message: str) -> NoReturn:
    """Raise the ConfigError 'config.<field>: <message>' for a dotted config field ('optim.lr'), so that
    every subsystem's check names the field the same way."""
    raise ConfigError(f'config.{field}: {message}')


def check_field_choice(field: str, value, allowed) -> None:
    """`check_choice` for the dotted config field `field`, as a ConfigError naming its full path."""
    try:
        check_choice(field.split('.')[-1], value, allowed)
    except ValueError as e:
        raise ConfigError(f'config.{field}: {e}') from None


def check_field_regex(field: str, pattern: str) -> None:
    """Refuse a `pattern` of the dotted config field `field` that is not a regular expression."""
    try:
        re.compile(pattern)
    except re.error as e:
        refuse(field, f'{pattern!r} is not a regular expression: {e}')
