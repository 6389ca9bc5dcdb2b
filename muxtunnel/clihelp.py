"""How ``muxtunnel --help`` looks: metavariables instead of Python types, boxes only on a terminal.

Typer renders a parameter's Python type next to it (``<bool>`` for a flag, ``<str>`` or
``<list[str]>`` for an argument) even when a metavariable (``PORT``, ``CIDR``, ``SPEC...``)
already says what to type, and its rich help draws panels with box characters even into a
pipe. :func:`polish` adjusts the click command tree built from the typer app: every
parameter shows only its metavariable (flags show nothing), usage lines read ``NAME`` and
``[SPEC...]``, and rich panels are used only when stdout is a terminal.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from typer import Context
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

if TYPE_CHECKING:
    from typer import _click as click  # the click that typer vendors

__all__ = ["help_on_terminal", "polish"]


class _Argument(TyperArgument):
    """An argument shown by its metavariable alone."""

    def display_type_rich(self, ctx: click.Context) -> str | None:
        return None

    def _rich_display_name(self) -> str:
        name = self.display_name_raw
        return name if self.nargs == 1 or name.endswith("...") else f"{name}..."

    def _usage_display_name(self) -> str:
        name = self._rich_display_name()
        return name if self.required else f"[{name}]"


class _Option(TyperOption):
    """An option shown by its metavariable; a flag shows none."""

    def display_type_rich(self, ctx: click.Context) -> str | None:
        if self.is_flag or self.count:
            return None
        return super().display_type_rich(ctx)


def help_on_terminal() -> bool:
    """Rich help (panels, colour) only when stdout is a terminal that is not ``TERM=dumb``."""
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def polish(
    command: click.Command, *, rich: bool, parent: click.Context | None = None
) -> click.Command:
    """Adjust ``command`` and its subcommands in place (see the module docstring)."""
    if isinstance(command, TyperGroup | TyperCommand) and not rich:
        command.rich_markup_mode = None
    ctx = Context(command, parent=parent, **command.context_settings)
    help_option = command.get_help_option(ctx)  # made (and kept) on first use
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        if type(param) is TyperArgument:
            param.__class__ = _Argument
        elif type(param) is TyperOption:
            param.__class__ = _Option
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            polish(sub, rich=rich, parent=ctx)
    return command
