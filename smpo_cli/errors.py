"""Exceptions that the command line turns into one-line messages and exit codes.

Core code raises these (never ``sys.exit``); ``smpo_cli.cli`` prints ``message`` and ``hint``
and exits with ``exit_code``.
"""

from __future__ import annotations


class SmpoError(Exception):
    """A failure the user can act on: one line of message plus a hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class UsageError(SmpoError):
    """Bad command-line usage (exit code 2)."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe that does not resolve or validate (exit code 2).

    ``problems`` holds one line per problem (``dotted.path: what is wrong``) so that all of
    them can be reported together.
    """

    def __init__(self, message: str, problems: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint)
        self.problems = list(problems or [])

    def __str__(self) -> str:
        lines = [self.message, *(f"  {p}" for p in self.problems)]
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


class AssetNotFoundError(SmpoError):
    """A model, dataset or file that is not where the recipe says (and cannot be downloaded)."""


class ModelLoadError(SmpoError):
    """A model folder or checkpoint that exists but cannot be loaded."""


class OutputDirError(SmpoError):
    """An output folder that would be overwritten or cannot be written."""

    exit_code = 2


class DataError(SmpoError):
    """Input data that is malformed: a missing column, an unreadable file."""
