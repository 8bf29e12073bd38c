"""``smpo``: the root command. Imports no torch, so ``smpo --help`` is instant.

``main()`` maps outcomes to exit codes: 0 success, 1 runtime error (one line + hint), 2 usage or
recipe error, 130 interrupted. ``SMPO_DEBUG=1`` shows full tracebacks.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from smpo_cli import __version__
from smpo_cli.cli import _help
from smpo_cli.cli import bench as bench_cmd
from smpo_cli.cli import env as env_cmd
from smpo_cli.cli import generate as generate_cmd
from smpo_cli.cli import invert as invert_cmd
from smpo_cli.cli import pairs as pairs_cmd
from smpo_cli.cli import quickstart as quickstart_cmd
from smpo_cli.cli import recipe as recipe_cmd
from smpo_cli.cli import rounds as rounds_cmd
from smpo_cli.cli import score as score_cmd
from smpo_cli.cli import selftest as selftest_cmd
from smpo_cli.cli import shapes as shapes_cmd
from smpo_cli.cli import train as train_cmd
from smpo_cli.cli._console import debug_enabled, err, print_error, print_traceback, setup_logging
from smpo_cli.errors import SmpoError

_help.install()

app = typer.Typer(
    name="smpo",
    help="Align Stable Diffusion 1.5 / SDXL with human preferences: SmPO-Diffusion (Lu et al., ICML 2025, "
    "arXiv 2506.02698), with Diffusion-DPO and SFT as baselines.\n\n"
    "Each stage reads a YAML recipe (a file or a bundled name) plus KEY=VALUE overrides.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
    add_completion=False,
    epilog="Examples:\n\n"
    "  smpo selftest                      # check the install on the embedded tiny models\n\n"
    "  smpo recipe ls                     # bundled recipes\n\n"
    "  smpo recipe validate sdxl_smpo train.max_steps=10\n\n"
    "  smpo env                           # versions and GPUs, for bug reports",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"smpo {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More logging (-vv: debug, libraries too).")
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only; no progress bars.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Set verbosity for every subcommand (SMPO_LOG_LEVEL sets the default level)."""
    from smpo_cli.utils.logging import env_log_level
    from smpo_cli.utils.progress import set_progress_enabled

    if quiet:
        level = logging.WARNING
    elif verbose:
        level = logging.DEBUG
    else:
        level = env_log_level(logging.INFO)
    setup_logging(level)
    set_progress_enabled(not quiet)


app.command(name="score", epilog=score_cmd.EPILOG)(score_cmd.score)
app.command(name="pairs", epilog=pairs_cmd.EPILOG)(pairs_cmd.pairs)
app.command(name="rounds", epilog=rounds_cmd.EPILOG)(rounds_cmd.rounds)
app.command(name="invert", epilog=invert_cmd.EPILOG)(invert_cmd.invert)
app.command(name="train", epilog=train_cmd.EPILOG)(train_cmd.train)
app.command(name="generate", epilog=generate_cmd.EPILOG)(generate_cmd.generate)
app.command(name="quickstart", epilog=quickstart_cmd.EPILOG)(quickstart_cmd.quickstart)
app.add_typer(bench_cmd.app, name="bench")
app.add_typer(recipe_cmd.app, name="recipe")
app.add_typer(shapes_cmd.app, name="shapes")
app.command(name="env", epilog=env_cmd.EPILOG)(env_cmd.env)
app.command(name="selftest", epilog=selftest_cmd.EPILOG)(selftest_cmd.selftest)


def _usage_exception(exc: BaseException) -> bool:
    """Typer's own usage errors (bad flag, missing argument) carry ``exit_code`` and ``show``."""
    return isinstance(getattr(exc, "exit_code", None), int) and callable(getattr(exc, "show", None))


GLOBAL_FLAGS = ("-q", "--quiet", "-v", "-vv", "-vvv", "--verbose")


def _leaf_command(argv: list[str]):
    """(the command argv names, index of the token after its name) by walking the command groups."""
    from typer import _click  # typer 0.29 vendors click; its groups are not click.Group

    cmd = typer.main.get_command(app)
    i = 0
    while hasattr(cmd, "list_commands") and i < len(argv):
        token = argv[i]
        i += 1
        if token.startswith("-"):
            continue
        sub = cmd.get_command(_click.Context(cmd), token)
        if sub is None:
            return None, i
        cmd = sub
    return cmd, i


def normalise_argv(argv: list[str]) -> list[str]:
    """``-q``/``-v`` may follow the subcommand (moved before it unless the command has its own), and
    ``--a.b=value`` gets the override spelling it meant instead of Click's "No such option"."""
    from smpo_cli.errors import UsageError

    cmd, start = _leaf_command(argv)
    if cmd is None:
        return argv
    own = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    head, tail, moved = list(argv[:start]), [], []
    for j, token in enumerate(argv[start:]):
        if token == "--":
            tail.extend(argv[start + j :])
            break
        if token.startswith("--") and "." in token.split("=", 1)[0] and token not in own:
            spelled = token[2:] if "=" in token else f"{token[2:]}=VALUE"
            raise UsageError(f"no such option {token}: recipe overrides are written without dashes",
                             hint=f"did you mean {spelled}")  # fmt: skip
        if token in GLOBAL_FLAGS and token not in own:
            moved.append(token)
        else:
            tail.append(token)
    return moved + head + tail


def _disk_full(exc: BaseException) -> str | None:
    """`` (writing PATH)`` when ``exc`` or its causes say the disk is full, else None. torch's writers report it
    as "unexpected pos", safetensors and the rest as OSError ENOSPC."""
    import errno

    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return f" (writing {seen.filename})" if seen.filename else ""
        if "No space left on device" in str(seen) or "unexpected pos" in str(seen):
            return ""
        seen = seen.__cause__ or seen.__context__
    return None


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (``main`` exits with it; tests call this)."""
    try:
        argv = normalise_argv(list(sys.argv[1:] if argv is None else argv))
        rv = app(args=argv, prog_name="smpo", standalone_mode=False)
        if rv == 130:  # typer turns Ctrl-C inside a command into Exit(130), silently
            err.print("interrupted", style="yellow")
        return rv if isinstance(rv, int) else 0
    except typer.Abort as exc:  # Ctrl-C: typer turns KeyboardInterrupt into Abort
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            err.print("interrupted", style="yellow")
            return 130
        err.print("aborted", style="yellow")
        return 1
    except KeyboardInterrupt:
        err.print("interrupted", style="yellow")
        return 130
    except SmpoError as exc:
        if debug_enabled():
            print_traceback()
        problems = getattr(exc, "problems", [])
        print_error(exc.message, None if problems else exc.hint, debug_tip=exc.exit_code == 1)
        for problem in problems:
            err.print(f"  {problem}", highlight=False, markup=False)
        if problems and exc.hint:  # the hint after the problems it is about
            err.print(f"[yellow]hint:[/] {exc.hint}", markup=True, highlight=False)
        return exc.exit_code
    except Exception as exc:
        if _usage_exception(exc):
            exc.show()  # type: ignore[attr-defined]
            return int(exc.exit_code)  # type: ignore[attr-defined]
        if debug_enabled():
            raise
        full = _disk_full(exc)
        if full is not None:
            print_error(f"no space left on the device{full}",
                        "free some space and rerun the same command: the run resumes where it stopped",
                        debug_tip=False)  # fmt: skip
            return 1
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print_error(
            f"{type(exc).__name__}: {first_line}",
            "this is unexpected: rerun with SMPO_DEBUG=1 and report the traceback together with `smpo env`",
            debug_tip=False,
        )
        return 1


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
