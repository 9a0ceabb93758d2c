"""The one base class for every error a user can cause and fix.

A `MegatrainError` message names the file, key or value at fault and says what to do. The
`megatrain` command catches this class once, prints the message on one line and exits with
code 2; anything else is a crash (a traceback, exit code 1). Modules subclass it for their own
kind of problem (`ConfigError`, `ShardError`, `CheckpointError`, `PrepError`, ...), so that
callers can still tell them apart.

`shared` marks an error that every rank of a distributed job raised together (see
`megatrain.dist.agree`): only rank 0 needs to print it, and no rank needs to abort the others.
"""

from __future__ import annotations


class MegatrainError(Exception):
    """Something the user can fix; the message says what and how."""

    shared = False


def need(module: str, extra: str):
    """Import `module`, which only some commands use, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MegatrainError(
            f"this command needs the Python package '{module.split('.')[0]}': "
            f"pip install 'megatrain[{extra}]'"
        ) from None
