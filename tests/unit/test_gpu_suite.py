"""bench/gpu_suite.sh: syntax, its --dry listing, the flags it passes, and its table (with stub benchmarks).

No GPU needed: the bench scripts are only asked for --help, and the end-to-end check swaps the interpreter
for a stub that plays one benchmark that works, one that fails, one that hangs and a pytest run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "gpu_suite.sh"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")  # fmt: skip


def _dry(out: Path) -> list[list[str]]:
    proc = subprocess.run(["bash", str(SUITE), "--dry"], env={**ENV, "OUT": str(out)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not out.exists(), "--dry must not create the result folder"
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def _command(tokens: list[str]) -> tuple[list[str], int]:
    """(the benchmark's own argv, its limit + kill grace in seconds) of one `timeout -k K N cmd > f 2> g` line."""
    assert tokens[:2] == ["timeout", "-k"], tokens
    grace, limit = int(tokens[2]), int(tokens[3])
    argv = tokens[4 : tokens.index(">")]
    return argv, limit + grace


def _help_options(argv: list[str]) -> set[str]:
    proc = subprocess.run([sys.executable, *argv, "--help"], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", proc.stdout))


def test_bash_syntax():
    proc = subprocess.run(["bash", "-n", str(SUITE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "set -u" in SUITE.read_text()


def test_dry_lists_the_five_benchmarks(tmp_path):
    commands = [_command(t)[0] for t in _dry(tmp_path / "out")]
    assert len(commands) == 5
    score, inversion, train_step, memory, gpu_tests = commands
    assert score[1:] == ["bench/score_throughput.py", "--device", "cuda", "--bf16", "--json"]
    assert inversion[1:3] == ["bench/inversion.py", "--device"] and {"cuda", "--json"} <= set(inversion)
    assert train_step[1:] == ["bench/train_step.py", "--device", "cuda", "--size", "sd15", "--json"]
    assert memory[1:] == ["bench/memory_plan.py", "--device", "cuda", "--size", "sd15", "--json"]
    assert gpu_tests[1:5] == ["-m", "pytest", "-m", "gpu"]
    assert any(a.startswith("--junit-xml=" + str(tmp_path / "out")) for a in gpu_tests)


def test_limits_fit_in_eight_minutes(tmp_path):
    assert sum(_command(t)[1] for t in _dry(tmp_path / "out")) < 8 * 60


def test_every_bench_script_and_flag_exists(tmp_path):
    for tokens in _dry(tmp_path / "out")[:4]:
        argv, _ = _command(tokens)
        script = argv[1]
        assert (ROOT / script).is_file(), script
        options = _help_options([script])
        for arg in argv[2:]:
            if arg.startswith("-"):
                assert arg.split("=")[0] in options, f"{script} has no {arg}"
        if "--size" in argv:  # a choices= value
            assert argv[argv.index("--size") + 1] in re.sub(r"\s+", " ", _help_text(script))


def _help_text(script: str) -> str:
    return subprocess.run([sys.executable, script, "--help"], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=120).stdout  # fmt: skip


def test_pytest_flags_exist(tmp_path):
    argv, _ = _command(_dry(tmp_path / "out")[4])
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^\s*"gpu: ', pyproject, re.M), "the gpu marker is registered (--strict-markers)"
    # pytest's own options, read outside the repository so that no conftest loads
    proc = subprocess.run([sys.executable, "-m", "pytest", "--help"], env=ENV, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for arg in argv[3:]:
        if arg.startswith("-") and arg != "-m":
            assert re.search(rf"(?<![\w-]){re.escape(arg.split('=')[0])}\b", proc.stdout), arg


STUB = """#!/usr/bin/env bash
# plays the interpreter: one benchmark works, one fails, one hangs, pytest passes
case "$*" in
    -c*) exit 0 ;;
    -\\ *|-) exec "{python}" "$@" ;;
    *score_throughput.py*) echo '{{"smpo_pairs_per_s": 3.0, "loop_pairs_per_s": 1.5, "speedup": 2.0, "pairs": 48}}' ;;
    *inversion.py*) echo "Traceback: CUDA not available" >&2; exit 3 ;;
    *train_step.py*) exec sleep 60 ;;
    *memory_plan.py*) echo '{{"rows": [{{"gradient_checkpointing": false, "estimate_gib": 18.8, "measured_gib": 17.9, "error_pct": 5.0}}]}}' ;;
    *pytest*)
        for a in "$@"; do case "$a" in --junit-xml=*) xml="${{a#--junit-xml=}}" ;; esac; done
        echo '<testsuites><testsuite name="pytest" tests="2" failures="0" errors="0" skipped="1"/></testsuites>' > "$xml"
        echo "1 passed, 1 skipped" ;;
esac
"""


def test_table_reports_ok_failed_and_timed_out(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = {**ENV, "OUT": str(out), "PYTHON": str(stub), "T_TRAIN_STEP": "1"}
    proc = subprocess.run(
        ["bash", str(SUITE)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # not every benchmark ok
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.split()[:1] and
            line.split()[0] in ("score_throughput", "inversion", "train_step", "memory_plan", "pytest_gpu")}  # fmt: skip
    assert len(rows) == 5, proc.stdout
    assert " ok " in rows["memory_plan"] and "estimate 18.80 vs measured 17.90 GiB (5.0%)" in rows["memory_plan"]
    assert " ok " in rows["score_throughput"] and "(2.00x)" in rows["score_throughput"]
    assert "failed (exit 3)" in rows["inversion"] and "CUDA not available" in rows["inversion"]
    assert "timed out" in rows["train_step"]
    assert " ok " in rows["pytest_gpu"] and "1 passed, 0 failed, 1 skipped" in rows["pytest_gpu"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["score_throughput"]["result"]["speedup"] == 2.0
    assert {k: v["status"] for k, v in summary.items()} == {
        "score_throughput": "ok",
        "inversion": "failed (exit 3)",
        "train_step": "timed out",
        "memory_plan": "ok",
        "pytest_gpu": "ok",
    }
