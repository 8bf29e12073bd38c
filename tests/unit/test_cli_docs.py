"""docs/cli.md is generated from the Typer app and must match it (regenerate: see STALE)."""

from pathlib import Path

from smpo_cli.cli.cli_docs import command_paths, render_cli_markdown

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
STALE = "docs/cli.md is stale: run python -m smpo_cli.cli.cli_docs > docs/cli.md"


def test_cli_docs_are_current():
    assert DOCS.is_file(), STALE
    assert DOCS.read_text(encoding="utf-8") == render_cli_markdown(), STALE


def test_every_command_is_documented():
    paths = command_paths()
    # the groups and their subcommands are walked, not only the top level
    for expected in ("smpo", "smpo train", "smpo bench geneval", "smpo shapes run", "smpo recipe validate"):
        assert expected in paths
    text = render_cli_markdown()
    for path in paths:
        assert f"`{path}`" in text, f"{path} missing from docs/cli.md"
        assert f"\n{path} " in text or f"\n{path}\n" in text, f"{path}: no usage line"


def test_rendering_is_deterministic_and_plain(monkeypatch):
    first = render_cli_markdown()
    monkeypatch.setenv("COLUMNS", "40")  # no terminal-width dependence
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert render_cli_markdown() == first
    assert "\x1b[" not in first  # no ANSI styling
    assert "`--recipe`" in first and "`KEY=VALUE...`" in first and "`-h`, `--help`" in first
