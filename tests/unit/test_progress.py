"""Progress where stderr is not a terminal: plain lines every SMPO_PROGRESS_EVERY seconds, and the last one."""

import pytest

from smpo_cli.utils import progress


@pytest.fixture(autouse=True)
def _enabled(monkeypatch):
    """Progress on (an earlier `smpo -q` in this process turns it off), stderr captured (not a terminal)."""
    monkeypatch.setattr(progress, "_enabled", True)
    monkeypatch.delenv("SMPO_NO_PROGRESS", raising=False)


def test_progress_writes_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setenv("SMPO_PROGRESS_EVERY", "0")
    with progress.make_progress() as bar:  # pytest's captured stderr is not a terminal
        assert isinstance(bar, progress.LineProgress)
        task = bar.add_task("generate", total=4)
        for _ in range(4):
            bar.update(task, advance=1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("generate: 1/4 (25%)") and lines[-1].startswith("generate: 4/4 (100%)")
    assert len(lines) == 4 and "eta" not in lines[-1]


def test_progress_lines_are_rate_limited_and_off_under_quiet(monkeypatch, capsys):
    monkeypatch.setenv("SMPO_PROGRESS_EVERY", "3600")
    with progress.make_progress() as bar:
        task = bar.add_task("train", total=100)
        for _ in range(100):
            bar.advance(task)
    assert capsys.readouterr().err.splitlines() == ["train: 100/100 (100%), 0 s"]  # only the last line
    progress.set_progress_enabled(False)
    try:
        with progress.make_progress() as bar:
            bar.update(bar.add_task("x", total=1), advance=1)
        assert capsys.readouterr().err == ""
    finally:
        progress.set_progress_enabled(True)
