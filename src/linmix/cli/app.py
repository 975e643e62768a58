"""The `linmix` command tree. Command modules register on these groups.

Each task area owns one module that imports its group from here and adds commands with
``@lm_app.command(...)`` etc.; ``linmix.cli.__init__`` imports those modules so the commands
exist. Keep heavy imports (torch models, fastapi) inside command bodies so ``--help`` stays fast.
"""
from __future__ import annotations

import typer


class CliError(Exception):
    """A user-facing error: printed as one line (no traceback), exit code 1."""


def _group(name: str, help_text: str) -> typer.Typer:
    return typer.Typer(
        name=name,
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
    )


app = _group(
    "linmix",
    "Linear-time sequence models: BASED language models, the MQAR recall study, RWKV-SAM segmentation.",
)
lm_app = _group("lm", "BASED language models: train, generate, evaluate, convert official checkpoints.")
mqar_app = _group("mqar", "The MQAR recall-vs-state-size study: run a sweep, report results.")
sam_app = _group("sam", "RWKV-SAM promptable segmentation: segment, automatic masks, train, evaluate, export.")



def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"linmix {version('linmix')}")
        except PackageNotFoundError:  # running from a source tree that was never installed
            typer.echo("linmix (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


app.add_typer(lm_app, name="lm")
app.add_typer(mqar_app, name="mqar")
app.add_typer(sam_app, name="sam")
