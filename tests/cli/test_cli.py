"""Wiring, messages and exit codes of the command line (logic is tested in the core)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from smpo_cli import __version__
from smpo_cli.cli.main import app, run
from smpo_cli.errors import AssetNotFoundError

runner = CliRunner()
COMMANDS = [[], ["env"], ["selftest"], ["quickstart"], ["score"], ["pairs"], ["rounds"], ["invert"], ["train"], ["generate"], ["bench"], ["bench", "rewards"], ["bench", "geneval"], ["bench", "shapes"], ["shapes"], ["shapes", "pretrain"], ["shapes", "run"], ["recipe"], ["recipe", "ls"], ["recipe", "show"], ["recipe", "validate"], ["recipe", "cp"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "smpo")
def test_help_exits_zero_with_examples(cmd):
    result = runner.invoke(app, [*cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


@pytest.mark.parametrize("cmd", [["train"], ["recipe", "cp"], ["generate"], ["rounds"]], ids=" ".join)
def test_help_names_parameters_in_upper_case_and_shows_no_python_types(cmd):
    import re

    result = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"})
    text = result.output
    assert not re.search(r"<(bool|str|int|path|list\[str\])>", text), text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "[[" not in usage and "]..." * 2 not in usage, usage
    if cmd == ["recipe", "cp"]:
        assert usage.strip().endswith("NAME DEST")
    if cmd == ["train"]:
        assert usage.strip().endswith("[KEY=VALUE]...") and "--recipe  -r      RECIPE" in text
        lines = text.splitlines()
        first = next(i for i, line in enumerate(lines) if "Reads a scored dataset" in line)
        paragraph = lines[first : next(i for i in range(first, len(lines)) if not lines[i].strip())]
        assert len(paragraph) <= 2, paragraph  # rewrapped to the width, not broken at the docstring's 4 line ends


def test_dashed_override_gets_the_spelling_it_meant(capsys):
    assert run(["train", "--recipe", "tiny_smpo_cpu", "--train.max_steps=3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "did you mean train.max_steps=3" in err and "No such option" not in err


def test_quiet_and_verbose_work_after_the_subcommand(capsys):
    from smpo_cli.cli.main import normalise_argv

    assert normalise_argv(["train", "--dry-run", "-q", "x=1"]) == ["-q", "train", "--dry-run", "x=1"]
    assert normalise_argv(["shapes", "pretrain", "-v"]) == ["-v", "shapes", "pretrain"]
    assert normalise_argv(["recipe", "validate", "a.yaml", "-q"]) == ["recipe", "validate", "a.yaml", "-q"]  # its own -q
    assert run(["train", "--recipe", "tiny_smpo_cpu", "--dry-run", "-q", "train.max_steps=3"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out


def test_a_missing_key_names_the_flag_that_sets_it(capsys):
    assert run(["generate", "-o", "unused"]) == 2
    err = capsys.readouterr().err
    assert "prompts: required key is missing; set it with --prompts/-p (sets prompts.path)" in err
    assert "model: required key is missing; set it with --model/-m (sets model.pretrained)" in err
    assert "no --recipe given" in err


def test_tables_written_to_a_pipe_are_not_truncated():
    done = subprocess.run([sys.executable, "-m", "smpo_cli", "recipe", "ls"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "…" not in done.stdout and "..." not in done.stdout
    assert any("so training skips inversion." in line for line in done.stdout.splitlines())


def test_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"smpo {__version__}"


def test_unknown_command_and_option_exit_2(capsys):
    assert run(["no-such-command"]) == 2
    assert run(["recipe", "ls", "--bogus"]) == 2


def test_recipe_error_exit_2_lists_problems(capsys):
    assert run(["recipe", "validate", "sd15_smpo", "trian.max_steps=4", "method.name=x"]) == 2
    err = capsys.readouterr().err
    assert "did you mean train.max_steps?" in err and "method.name" in err
    assert "Traceback" not in err


def test_runtime_error_exit_1_one_line_with_hint(monkeypatch, capsys):
    def boom():
        raise AssetNotFoundError("model 'x/y' is not in the local cache", hint="download it first")

    monkeypatch.setattr("smpo_cli.utils.envinfo.collect_env", boom)
    assert run(["env"]) == 1
    err = capsys.readouterr().err
    assert "error: model 'x/y' is not in the local cache" in err and "hint: download it first" in err
    assert "SMPO_DEBUG=1" in err and "Traceback" not in err


def test_unexpected_exception_exit_1_and_debug_traceback(monkeypatch, capsys):
    def boom():
        raise ValueError("deep inside\nsecond line")

    monkeypatch.setattr("smpo_cli.utils.envinfo.collect_env", boom)
    assert run(["env"]) == 1
    err = capsys.readouterr().err
    assert "ValueError: deep inside" in err and "second line" not in err and "Traceback" not in err
    monkeypatch.setenv("SMPO_DEBUG", "1")
    with pytest.raises(ValueError):
        run(["env"])


def test_ctrl_c_exit_130(monkeypatch, capsys):
    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr("smpo_cli.utils.envinfo.collect_env", interrupt)
    assert run(["env"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_env_json(capsys):
    assert run(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["smpo"] == __version__ and "diffusers" in info["packages"] and "cuda_available" in info["device"]


def test_recipe_ls_show_validate_cp(tmp_path, capsys):
    assert run(["recipe", "ls"]) == 0
    assert "sdxl_smpo" in capsys.readouterr().out
    assert run(["recipe", "show", "sdxl_smpo"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("# SmPO training of SDXL")
    assert run(["recipe", "show", "sdxl_smpo", "--resolved"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["optim"]["adam_beta1"] == 0.9
    assert run(["recipe", "validate", "sdxl.yaml", "train.max_steps=3"]) == 0
    assert "valid train recipe" in capsys.readouterr().out
    dest = tmp_path / "sub/"
    assert run(["recipe", "cp", "sdxl_smpo", str(dest) + "/"]) == 0
    copied = dest / "sdxl_smpo.yaml"
    assert copied.read_text() == shown
    assert run(["recipe", "cp", "sdxl_smpo", str(copied)]) == 2  # exists, no --force
    assert run(["recipe", "cp", "sdxl_smpo", str(copied), "--force"]) == 0
    assert run(["recipe", "validate", str(copied)]) == 0


def test_recipe_validate_unknown_stage(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("stage: fly\n")
    assert run(["recipe", "validate", str(path)]) == 2
    assert "not a known stage" in capsys.readouterr().err


def test_import_hygiene_no_torch_at_cli_import():
    code = (
        "import sys, smpo_cli.cli.main, smpo_cli.config, smpo_cli.config.plan, smpo_cli.inversion.storage, smpo_cli.models.tiny; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate', 'datasets') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_only_cli_imports_typer():
    root = Path(__file__).resolve().parents[2] / "smpo_cli"
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "cli" not in p.relative_to(root).parts[:1]
        and any(line.strip().startswith(("import typer", "from typer")) for line in p.read_text().splitlines())
    ]
    assert offenders == []
    assert not any("import click" in p.read_text() for p in root.rglob("*.py"))


def test_a_full_disk_says_so_and_that_the_run_resumes(monkeypatch, capsys):
    import errno

    from smpo_cli.cli.main import _disk_full
    from smpo_cli.utils import envinfo

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/images/00001_00.png")

    monkeypatch.setattr(envinfo, "collect_env", full)
    assert run(["env"]) == 1
    err = capsys.readouterr().err
    assert "no space left on the device (writing /data/run/images/00001_00.png)" in err
    assert "resumes where it stopped" in err and "unexpected" not in err
    assert _disk_full(RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")) == ""
    assert _disk_full(ValueError("other")) is None
    try:
        raise RuntimeError("write failed") from OSError(errno.ENOSPC, "No space left on device", "/y")
    except RuntimeError as exc:
        assert _disk_full(exc) == " (writing /y)"
