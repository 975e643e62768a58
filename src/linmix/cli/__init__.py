"""`linmix` command-line entry point (see ``linmix --help``)."""
from __future__ import annotations

import importlib
import sys

from linmix.cli.app import CliError, app, lm_app, mqar_app, sam_app

# Command modules, one per task area; each registers its commands on a group from app.py.
_COMMAND_MODULES = ("lm", "mqar", "sam", "sam_train", "main")

for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(f"linmix.cli.{_name}")
    except ModuleNotFoundError as error:
        # Only a missing command module is tolerated (areas land one by one); a missing
        # dependency inside one is a real error.
        if error.name != f"linmix.cli.{_name}":
            raise

# Errors a user can cause: one clear line on stderr, no traceback, exit status 1.
_USER_ERRORS = (CliError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, KeyError)


def main(argv: list[str] | None = None) -> int:
    try:
        # Standalone mode: click prints usage errors itself and always ends with SystemExit.
        app(args=argv, prog_name="linmix")
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except _USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


__all__ = ["CliError", "app", "lm_app", "mqar_app", "sam_app", "main"]
