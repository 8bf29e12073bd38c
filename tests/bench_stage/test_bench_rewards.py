"""`smpo bench rewards` end to end on the embedded tiny models and tiny reward models."""

import json

import pytest

from smpo_cli.cli.main import run

pytestmark = pytest.mark.integration


def test_bench_rewards_model_vs_baseline(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    out = tmp_path / "bench"
    args = ["bench", "rewards", "--model", "tiny-sd15", "--baseline", "tiny-sd15", "--prompts", str(tmp_path / "p.txt"),
            "-o", str(out), "sampling.images_per_prompt=2", "sampling.num_inference_steps=2", "sampling.height=32",
            "sampling.width=32", "rewards=[{name: pickscore, path: tiny}, {name: aesthetic, path: tiny}]"]  # fmt: skip
    assert run(["-q", *args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 2 and result["images_per_model"] == 4
    for name in ("pickscore", "aesthetic"):
        m = result["metrics"][name]
        assert m["model"]["n"] == 4
        # the same model with the same seeds makes the same images: every pair ties, 50 %
        assert m["model"]["mean"] == pytest.approx(m["baseline"]["mean"], abs=1e-6)
        assert m["win_rate_vs_baseline"]["win_rate"] == pytest.approx(50.0)
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 2 * 2 * 4
    md = (out / "results.md").read_text()
    assert "| pickscore (" in md and "50.00%" in md
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") == 1 + 2 * 2 * 2
    # both say what produced the numbers: here random-weight rewards, whose win rates mean nothing
    for text in (md, page):
        assert text.count("random weights") == 2 and "say nothing about the images" in text
    from PIL import Image

    assert Image.open(out / "chart.png").size[0] == 640
    assert json.loads((out / "run.json").read_text())["status"] == "success"
    # a rerun reuses the images
    assert run(["-q", *args]) == 0
    assert json.loads((out / "model_images" / "summary.json").read_text())["generated"] == 0
