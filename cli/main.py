"""The ``zo-edge`` command line: one click group; each command lives in its own module.

Every expected failure - bad input (:class:`UserError`), a refused or failed file operation
(``OSError``: no space, no permission, no such file), running out of memory, a command-line usage
error - ends as one line ``zo-edge: error: ...`` on stderr and exit status 2. Anything else is a
bug: one line naming it and exit status 1, with the traceback under ``--debug`` or
``ZO_EDGE_DEBUG=1``.
"""
from __future__ import annotations

import os
import sys

import click

from zo_runtime.errors import UserError

DEBUG_ENV = "ZO_EDGE_DEBUG"


def _debug(ctx: click.Context) -> bool:
    return bool((ctx.obj or {}).get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _fail(message: str) -> None:
    click.echo(f"zo-edge: error: {' '.join(message.split())}", err=True)
    sys.exit(2)


def os_error_line(e: OSError) -> str:
    """``[Errno 28] No space left on device: 'x'`` -> ``x: No space left on device``."""
    what = e.strerror or str(e) or type(e).__name__
    name = e.filename if e.filename is not None else None
    return f"{name}: {what}" if name is not None else what


class Group(click.Group):
    """Turns every expected failure below into one line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            _fail(str(e))
        except click.UsageError as e:
            where = f" (see zo-edge {e.ctx.command_path.split(' ', 1)[-1]} --help)" if e.ctx and e.ctx.parent else ""
            _fail(f"{e.format_message()}{where}")
        except (click.exceptions.Exit, click.Abort, click.ClickException):
            raise
        except OSError as e:
            _fail(os_error_line(e))
        except MemoryError:
            _fail("out of memory; try a smaller --resolution, fewer images per prompt or --low-memory")
        except Exception as e:  # noqa: BLE001 (the last resort for bugs: one line, traceback on request)
            if _debug(ctx):
                raise
            click.echo(f"zo-edge: internal error: {type(e).__name__}: {e} (this is a bug; rerun with --debug "
                       f"or {DEBUG_ENV}=1 for the traceback)".replace("\n", " "), err=True)
            sys.exit(1)


@click.group(cls=Group)
@click.version_option(package_name="zo-edge")
@click.option("--debug", is_flag=True, help=f"Show the Python traceback of an internal error (or set {DEBUG_ENV}=1).")
@click.pass_context
def main(ctx, debug) -> None:
    """Forward-only personalization of Stable Diffusion on ONNX Runtime (ZOODiP at the edge)."""
    ctx.obj = {"debug": debug}


def _register() -> None:
    import importlib
    for mod in ("convert_cmd", "personalize_cmd", "generate_cmd", "evaluate_cmd", "bench_cmd", "many_cmd"):
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
