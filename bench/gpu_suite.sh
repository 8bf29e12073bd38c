#!/usr/bin/env bash
# The GPU benchmarks in one run on one CUDA GPU, in under 8 minutes (the time limits below add up to
# 7 min 55 s at most), then one table of their headline numbers.
#
#   bash bench/gpu_suite.sh           # run; results in $OUT (default runs/gpu_suite, from the repo root)
#   bash bench/gpu_suite.sh --dry     # print the commands only
#
# Each benchmark runs under its own `timeout`; one that fails or times out does not stop the others. Per
# benchmark, <name>.json holds its JSON output (pytest: <name>.xml, JUnit XML: pytest has no --json),
# <name>.log its stderr, <name>.rc "exit-code seconds"; summary.json and the table sum them up. Exit
# status: 0 when every benchmark is ok, 1 otherwise.
#
# Environment: OUT (result folder), PYTHON (interpreter, default python), and the limits in seconds
# T_SCORE, T_INVERSION, T_TRAIN_STEP, T_MEMORY, T_PYTEST.
#
# bench/inversion.py always measures its CPU model too (there is no flag to skip it): --threads 8 keeps that
# part short on a GPU machine's cores. bench/score_throughput.py starts one process per variant and round
# (3 variants x 3 rounds with --bf16), most of its time.
set -u

DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry | --dry-run) DRY=1 ;;
        -h | --help)
            sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "gpu_suite.sh: unknown argument $arg (use --dry or --help)" >&2
            exit 2
            ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
OUT_DIR="${OUT:-runs/gpu_suite}"
PY="${PYTHON:-python}"
T_SCORE="${T_SCORE:-120}"
T_INVERSION="${T_INVERSION:-110}"
T_MEMORY="${T_MEMORY:-60}"
T_TRAIN_STEP="${T_TRAIN_STEP:-110}"
T_PYTEST="${T_PYTEST:-50}"
KILL_AFTER=5   # seconds between timeout's TERM and KILL
NAMES=(score_throughput inversion train_step memory_plan pytest_gpu)

# name, limit, output file, command
run_bench() {
    local name="$1" limit="$2" out="$3"
    shift 3
    if [ "$DRY" = 1 ]; then
        printf 'timeout -k %s %s' "$KILL_AFTER" "$limit"
        printf ' %q' "$@"
        printf ' > %q 2> %q\n' "$OUT_DIR/$out" "$OUT_DIR/$name.log"
        return 0
    fi
    echo "== $name (limit ${limit}s): $*" >&2
    local start=$SECONDS rc
    timeout -k "$KILL_AFTER" "$limit" "$@" > "$OUT_DIR/$out" 2> "$OUT_DIR/$name.log"
    rc=$?
    echo "$rc $((SECONDS - start))" > "$OUT_DIR/$name.rc"
    echo "   exit $rc after $((SECONDS - start))s" >&2
    return 0
}

if [ "$DRY" = 0 ]; then
    mkdir -p "$OUT_DIR" || exit 2
    for name in "${NAMES[@]}"; do
        rm -f "$OUT_DIR/$name".json "$OUT_DIR/$name".xml "$OUT_DIR/$name".out "$OUT_DIR/$name".log "$OUT_DIR/$name".rc
    done
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null; then
        echo "gpu_suite.sh: warning: torch sees no CUDA device; the benchmarks will fail or skip" >&2
    fi
fi

run_bench score_throughput "$T_SCORE" score_throughput.json \
    "$PY" bench/score_throughput.py --device cuda --bf16 --json
run_bench inversion "$T_INVERSION" inversion.json \
    "$PY" bench/inversion.py --device cuda --threads 8 --json
run_bench train_step "$T_TRAIN_STEP" train_step.json \
    "$PY" bench/train_step.py --device cuda --size sd15 --json
run_bench memory_plan "$T_MEMORY" memory_plan.json \
    "$PY" bench/memory_plan.py --device cuda --size sd15 --json
run_bench pytest_gpu "$T_PYTEST" pytest_gpu.out \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider --junit-xml="$OUT_DIR/pytest_gpu.xml"

[ "$DRY" = 1 ] && exit 0

OUT_DIR="$OUT_DIR" "$PY" - "${NAMES[@]}" << 'PYEOF'
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(os.environ["OUT_DIR"])


def load_json(path):
    """The benchmark's JSON object: the whole stdout, else its last line that parses."""
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        for line in reversed(text.splitlines()):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def f(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def score(d):
    s = (f"smpo {f(d.get('smpo_pairs_per_s'))} vs loop {f(d.get('loop_pairs_per_s'))} pairs/s "
         f"({f(d.get('speedup'))}x)")
    if "bf16_speedup_vs_loop_fp32" in d:
        s += (f"; bf16 {f(d['bf16_speedup_vs_loop_fp32'])}x vs loop, winner flips "
              f"{d.get('bf16_winner_flips')}/{d.get('pairs')}")
    peak = d.get("peak_gpu_mib") or {}
    if peak:
        s += f"; peak GPU {max(peak.values()):.0f} MiB"
    return s


def inversion(d):
    parts = []
    for res in d.get("results", []):
        row = next((r for r in res.get("rows", []) if "SmPO" in r.get("setting", "")), None)
        if row:
            parts.append(f"{res.get('model')} ({res.get('device')}): ReNoise K=1 batched {f(row['batched_ips'])} "
                         f"vs single {f(row['single_ips'])} img/s ({f(row['ratio'])}x)")
    return "; ".join(parts) or f"batched_speedup {d.get('batched_speedup')}"


def train_step(d):
    ms = d.get("ms_per_step") or {}
    s = ", ".join(f"{k} {v:.0f}" for k, v in ms.items()) + " ms/step"
    s += f"; cache/dpo {f(d.get('cache_vs_dpo'))}, online/official {f(d.get('online_vs_official'))}"
    if d.get("peak_gpu_mib") is not None:
        s += f"; peak GPU {d['peak_gpu_mib']:.0f} MiB"
    return s


def memory_plan(d):
    parts = []
    for row in d.get("rows", []):
        ckpt = "ckpt" if row.get("gradient_checkpointing") else "no ckpt"
        parts.append(f"{ckpt}: estimate {f(row.get('estimate_gib'))} vs measured {f(row.get('measured_gib'))} GiB "
                     f"({f(row.get('error_pct'), 1)}%)")
    return "; ".join(parts) or None


def pytest_gpu(_d):
    xml = out / "pytest_gpu.xml"
    if not xml.is_file():
        return None
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return f"{passed} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped"


HEADLINES = {"score_throughput": score, "inversion": inversion, "train_step": train_step, "memory_plan": memory_plan,
             "pytest_gpu": pytest_gpu}
rows, summary = [], {}
for name in sys.argv[1:]:
    rc_file = out / f"{name}.rc"
    rc, secs = (rc_file.read_text().split() + ["?", "?"])[:2] if rc_file.is_file() else ("?", "?")
    data = None if name == "pytest_gpu" else load_json(out / f"{name}.json")
    if rc in ("124", "137"):
        status = "timed out"
    elif rc == "0" and (data is not None or name == "pytest_gpu"):
        status = "ok"
    elif rc == "0":
        status = "failed (no JSON)"
    elif name == "pytest_gpu" and rc == "5":
        status = "failed (no gpu tests collected)"
    else:
        status = f"failed (exit {rc})"
    try:
        headline = HEADLINES[name](data) if (data is not None or name == "pytest_gpu") else None
    except Exception as exc:  # a changed JSON layout must not hide the others
        headline = f"(could not read: {exc!r})"
    if headline is None:
        log = out / f"{name}.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
        headline = ("log: " + tail[0][:100]) if tail else "-"
    rows.append((name, status, secs, headline))
    summary[name] = {"status": status, "exit_code": rc, "seconds": secs, "headline": headline, "result": data}

(out / "summary.json").write_text(json.dumps(summary, indent=2))
widths = [max(len(str(r[i])) for r in rows + [("benchmark", "status", "s", "")]) for i in range(3)]
print()
print(f"{'benchmark':<{widths[0]}}  {'status':<{widths[1]}}  {'s':>{widths[2]}}  headline")
for name, status, secs, headline in rows:
    print(f"{name:<{widths[0]}}  {status:<{widths[1]}}  {secs:>{widths[2]}}  {headline}")
print(f"\nresults: {out}/ (summary.json, <name>.json, <name>.log)")
sys.exit(0 if all(r[1] == "ok" for r in rows) else 1)
PYEOF
