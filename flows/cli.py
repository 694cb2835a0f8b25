"""The ``copgen`` command line."""

from __future__ import annotations

import typer

import copgen_core

app = typer.Typer(
    help="COP-GEN-Beta pipeline: fill missing Copernicus modalities, run self-loop studies, write cubes.",
    no_args_is_help=True,
)


@app.command()
def version() -> None:
    """Print the package version."""
    typer.echo(copgen_core.__version__)


if __name__ == "__main__":  # pragma: no cover
    app()
