"""`smpo bench geneval` end to end: tiny SD1.5 samples in the GenEval layout, a tiny random Mask2Former, tiny CLIP."""

import json

import pytest

from smpo_cli.cli.main import run

pytestmark = pytest.mark.integration

META = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
     "prompt": "a photo of two dogs"},
]  # fmt: skip
TINY = ["detector.path=tiny", "colour.path=tiny", "sampling.images_per_prompt=2", "sampling.num_inference_steps=2",
        "sampling.height=32", "sampling.width=32"]  # fmt: skip


def test_generate_judge_report_and_resume(tmp_path, capsys):
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(m) + "\n" for m in META))
    out = tmp_path / "geneval"
    args = ["bench", "geneval", "--model", "tiny-sd15", "--metadata", str(meta), "-o", str(out), *TINY]
    assert run(["-q", *args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 3 and result["images"] == 6 and result["judged_now"] == 6
    assert "Mask2Former" in result["detector"]
    # the official layout: NNNNN/metadata.jsonl + NNNNN/samples/KKKK.png
    assert json.loads((out / "images" / "00002" / "metadata.jsonl").read_text()) == META[2]
    assert (out / "images" / "00001" / "samples" / "0001.png").is_file()
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, k) for i in range(3) for k in range(2)]
    for r in rows:
        assert set(r) >= {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
        assert json.loads(r["metadata"]) == META[r["prompt_index"]]
        assert isinstance(json.loads(r["details"]), dict)
    by_task = {}
    for r in rows:
        by_task.setdefault(r["tag"], []).append(r["correct"])
    # per-task accuracy and the overall mean of the tasks present, recomputed from the per-image lines
    for tag, values in by_task.items():
        assert result["tasks"][tag] == pytest.approx(sum(values) / len(values))
    assert result["overall"] == pytest.approx(sum(result["tasks"].values()) / 3)
    md = (out / "results.md").read_text()
    assert "| Overall | Single obj. | Two obj. | Counting | Colors | Position | Color attr. |" in md
    page = (out / "failures.html").read_text()
    assert page.startswith("<!doctype html>")
    failed = sum(not r["correct"] for r in rows)
    assert page.count("<figure>") == failed  # every failure shown (fewer than failures_per_task per task)
    summary = json.loads((out / "results.json").read_text())
    assert summary["rules"]["threshold"] == 0.3 and summary["partial"] is False
    # a rerun with the same settings reuses images and verdicts
    assert run(["-q", *args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["judged_now"] == 0
    # other rules need a new folder or --overwrite
    assert run(["-q", *args, "rules.threshold=0.5"]) != 0
    assert "other settings" in capsys.readouterr().err
    # the same folder judged as an existing GenEval folder gives the same verdicts
    again = tmp_path / "again"
    assert run(["-q", "bench", "geneval", "--images", str(out / "images"), "-o", str(again), "detector.path=tiny",
                "colour.path=tiny", "--json"]) == 0  # fmt: skip
    rows2 = [json.loads(x) for x in (again / "results.jsonl").read_text().splitlines()]
    assert [(r["correct"], r["details"]) for r in rows2] == [(r["correct"], r["details"]) for r in rows]


def test_a_killed_run_resumes_without_losing_verdicts(tmp_path, capsys):
    meta = tmp_path / "m.jsonl"
    meta.write_text("".join(json.dumps(m) + "\n" for m in META))
    out = tmp_path / "g"
    args = ["-q", "bench", "geneval", "--model", "tiny-sd15", "--metadata", str(meta), "-o", str(out), *TINY, "--json"]
    assert run(args) == 0
    rows = (out / "results.jsonl").read_text().splitlines()
    # as if killed mid-write: two verdicts kept, the third torn
    (out / "results.jsonl").write_text(rows[0] + "\n" + rows[1] + "\n" + rows[2][:17])
    capsys.readouterr()
    assert run(args) == 0
    assert json.loads(capsys.readouterr().out)["judged_now"] == 4
    assert (out / "results.jsonl").read_text().splitlines() == rows


def test_usage_errors_exit_2(tmp_path, capsys):
    assert run(["bench", "geneval", "-o", str(tmp_path / "x")]) == 2
    assert "give exactly one of model" in capsys.readouterr().err
    assert run(["bench", "geneval", "--model", "tiny-sd15", "-o", str(tmp_path / "x")]) == 2
    assert "metadata is required" in capsys.readouterr().err
    assert run(["bench", "geneval", "--images", str(tmp_path / "none"), "-o", str(tmp_path / "y"), "detector.path=tiny"]) == 1
    assert "does not exist" in capsys.readouterr().err
