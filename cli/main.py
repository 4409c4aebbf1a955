"""The ``zo-edge`` command line: one click group; each command lives in its own module."""
from __future__ import annotations

import sys

import click

from zo_runtime.errors import UserError


class Group(click.Group):
    """Turns a UserError anywhere below into one line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"zo-edge: error: {e}", err=True)
            sys.exit(2)


@click.group(cls=Group)
@click.version_option(package_name="zo-edge")
def main() -> None:
    """Forward-only personalization of Stable Diffusion on ONNX Runtime (ZOODiP at the edge)."""


def _register() -> None:
    import importlib
    for mod in ("convert_cmd", "personalize_cmd", "generate_cmd", "evaluate_cmd", "bench_cmd"):
        try:
            m = importlib.import_module(f"zo_edge.cli.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"zo_edge.cli.{mod}":
                continue  # not written yet
            raise
        for cmd in getattr(m, "COMMANDS", []):
            main.add_command(cmd)


_register()

if __name__ == "__main__":
    main()
