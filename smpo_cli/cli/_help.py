"""How ``--help`` names parameters: ``RECIPE``, ``OUTPUT_DIR``, ``[KEY=VALUE]...``, and nothing after a flag.

Typer 0.29 writes each parameter's Python type (``<bool>``, ``<str>``, ``<list[str]>``) in the help tables,
lower-case ``{name}`` in usage lines, and keeps the docstring's line breaks after the first paragraph (so the
text breaks mid-sentence). ``install()`` replaces those renderings for this process (the smpo command line
only): options show their metavar or their name in upper case, flags and counters nothing; arguments appear as
``NAME`` (required) or ``[NAME]`` (optional), with ``...`` when they repeat; a paragraph's lines are joined
unless it is a list or indented (examples) or starts with click's ``\b`` no-rewrap marker.
"""

from __future__ import annotations

from typing import Any


def _option_type(self: Any, ctx: Any) -> str | None:
    if self.is_flag or self.count:
        return None
    return self.metavar or self.name.upper()


def _argument_type(self: Any, ctx: Any) -> str | None:
    return None  # the name column already says what it is


def _argument_usage(self: Any) -> str:
    name = self.metavar or self.name.upper()
    name = name if self.required else f"[{name}]"
    return name + ("..." if self.nargs != 1 else "")


def _argument_rich_name(self: Any) -> str:
    return (self.metavar or self.name.upper()) + ("..." if self.nargs != 1 else "")


def _paragraphs(paragraphs: list[str], markup_mode: str) -> str:
    joined = []
    for p in paragraphs:
        lines = p.split("\n")
        if p.startswith("\b"):
            joined.append(p.replace("\b\n", "", 1))
        elif any(line.startswith((" ", "-", "*")) for line in lines[1:]):
            joined.append(p)
        else:
            joined.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(joined)


def install() -> None:
    from typer import rich_utils
    from typer.core import TyperArgument, TyperOption

    TyperOption.display_type_rich = _option_type
    TyperArgument.display_type_rich = _argument_type
    TyperArgument.display_name_raw = property(lambda self: self.metavar or self.name.upper())
    TyperArgument._usage_display_name = _argument_usage
    TyperArgument._rich_display_name = _argument_rich_name
    rich_utils._fix_linebreaks = _paragraphs
