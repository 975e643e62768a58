"""`linmix` command-line entry point (see ``linmix --help``)."""
from __future__ import annotations

import importlib
import os
import sys

import typer

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


def _click_exceptions():
    """The exception classes of the click that typer runs on (recent typer vendors its own copy)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("LINMIX_DEFAULT_MALLOC") != "1":
        # Reuse freed tensor buffers instead of page-faulting fresh ones (about 2x on the SAM encoders
        # at 1024 px on CPU); see linmix.utils.memory.tune_cpu_allocator.
        from linmix.utils.memory import tune_cpu_allocator

        tune_cpu_allocator()
    click = _click_exceptions()
    no_args_is_help = getattr(click, "NoArgsIsHelpError", ())  # click >= 8.2
    aborts = (typer.Abort, KeyboardInterrupt) + ((click.Abort,) if hasattr(click, "Abort") else ())
    try:
        # Not standalone: usage errors come back here, to be printed as one line like the others.
        result = app(args=argv, prog_name="linmix", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except no_args_is_help as error:
        print(error.ctx.get_help() if error.ctx else "")  # a group without a sub-command: its help
        return 2
    except click.UsageError as error:  # unknown command or option, bad or missing value
        hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
        print(f"error: {error.format_message()}{hint}", file=sys.stderr)
        return error.exit_code
    except click.ClickException as error:
        print(f"error: {error.format_message()}", file=sys.stderr)
        return error.exit_code
    except aborts:
        print("interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 1


__all__ = ["CliError", "app", "lm_app", "mqar_app", "sam_app", "main"]
