"""Prompt-set parsers and `smpo generate` on the embedded tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smpo_cli.cli.main import run
from smpo_cli.errors import AssetNotFoundError, DataError
from smpo_cli.generation.prompts import load_prompts

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert [r.prompt for r in load_prompts(str(tmp_path / "p.txt"))] == ["a cat", "a dog"]
    geneval = [{"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}],
                "prompt": "a photo of two cups"}]  # fmt: skip
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(x) + "\n" for x in geneval))
    rec = load_prompts(str(tmp_path / "g.jsonl"))[0]
    assert rec.prompt == "a photo of two cups" and rec.metadata["exclude"][0]["count"] == 3
    (tmp_path / "list.json").write_text(json.dumps(["x one", "x two"]))
    assert [r.prompt for r in load_prompts(str(tmp_path / "list.json"))] == ["x one", "x two"]
    (tmp_path / "objs.json").write_text(json.dumps([{"id": "7", "prompt": "seven"}]))
    assert load_prompts(str(tmp_path / "objs.json"))[0].metadata["id"] == "7"
    (tmp_path / "map.json").write_text(json.dumps({"a1": "first"}))
    assert load_prompts(str(tmp_path / "map.json"))[0].metadata == {"id": "a1"}
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\tnote\n")
    rec = load_prompts(str(tmp_path / "parti.tsv"))[0]
    assert rec.prompt == "bond" and rec.metadata["Category"] == "Abstract"
    styles = tmp_path / "hpdv2"
    styles.mkdir()
    for style in ("anime", "photo"):
        (styles / f"{style}.json").write_text(json.dumps([f"{style} 1", f"{style} 2"]))
    recs = load_prompts(str(styles))
    assert [(r.index, r.metadata["style"]) for r in recs] == [(0, "anime"), (1, "anime"), (2, "photo"), (3, "photo")]
    pq.write_table(pa.table({"caption": ["b", "a", "b", "c"], "jpg_0": [b"", b"", b"", b""]}), tmp_path / "pick.parquet")
    assert [r.prompt for r in load_prompts(str(tmp_path / "pick.parquet"))] == ["b", "a", "c"]
    assert len(load_prompts(str(tmp_path / "parti.tsv"), limit=1)) == 1


def test_bad_prompt_files(tmp_path):
    with pytest.raises(AssetNotFoundError):
        load_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "nofield.jsonl").write_text('{"words": "x"}\n')
    with pytest.raises(DataError, match="no prompt field"):
        load_prompts(str(tmp_path / "nofield.jsonl"))


@pytest.mark.skipif(not SHARED.is_dir(), reason="the real benchmark files live in ../shared/data beside the checkout")
def test_real_benchmark_files():
    geneval = load_prompts(str(SHARED / "geneval" / "evaluation_metadata.jsonl"))
    assert len(geneval) == 553
    tags = {}
    for r in geneval:
        tags[r.metadata["tag"]] = tags.get(r.metadata["tag"], 0) + 1
    assert tags == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}
    parti = load_prompts(str(SHARED / "parti" / "PartiPrompts.tsv"))
    assert len(parti) == 1632 and parti[0].metadata["Category"] == "Abstract"
    assert len(load_prompts(str(SHARED / "imagereward" / "benchmark-prompts.json"))) == 100


@pytest.mark.integration
def test_generation_is_deterministic_batch_independent_and_resumable(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "p.txt").write_text("a red circle\na blue square\na green triangle\n")
    common = ["--model", "tiny-sd15", "--prompts", str(tmp_path / "p.txt"), "sampling.images_per_prompt=2",
              "sampling.num_inference_steps=2", "sampling.height=32", "sampling.width=32"]  # fmt: skip
    assert run(["-q", "generate", "-o", str(tmp_path / "a"), *common, "sampling.batch_size=4"]) == 0
    assert run(["-q", "generate", "-o", str(tmp_path / "b"), *common, "sampling.batch_size=1"]) == 0
    files = sorted((tmp_path / "a" / "images").glob("*.png"))
    assert [f.name for f in files] == [f"{i:05d}_{k:02d}.png" for i in range(3) for k in range(2)]
    import numpy as np

    for f in files:  # the same noise whatever the batch size; pixels agree up to float rounding
        a, b = (np.asarray(Image.open(x), dtype=int) for x in (f, tmp_path / "b" / "images" / f.name))
        assert np.abs(a - b).max() <= 2
    assert list(Image.open(files[0]).getdata()) != list(Image.open(files[1]).getdata())  # another seed, another image
    meta = [json.loads(x) for x in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 6 and meta[3]["prompt"] == "a blue square" and meta[3]["sample_index"] == 1
    assert len({m["seed"] for m in meta}) == 6
    # resume: only the batch that lost an image is drawn again (images 0-3 of batch_size 4), identically
    before = np.asarray(Image.open(files[2]), dtype=int)
    files[2].unlink()
    capsys.readouterr()
    assert run(["generate", "-o", str(tmp_path / "a"), *common, "sampling.batch_size=4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["generated"] == 4 and result["skipped_existing"] == 2
    assert np.array_equal(np.asarray(Image.open(files[2]), dtype=int), before)  # the same batch, the same pixels
    # other settings in the same folder are refused
    assert run(["-q", "generate", "-o", str(tmp_path / "a"), *common, "seed=1"]) == 2


@pytest.mark.integration
def test_geneval_layout(tmp_path):
    lines = [{"tag": "single_object", "include": [{"class": "cup", "count": 1}], "prompt": "a photo of a cup"},
             {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"}]  # fmt: skip
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert run(["-q", "generate", "--model", "tiny-sd15", "--prompts", str(tmp_path / "meta.jsonl"), "-o",
                str(tmp_path / "g"), "layout=geneval", "sampling.images_per_prompt=2", "sampling.num_inference_steps=1",
                "sampling.height=32", "sampling.width=32"]) == 0  # fmt: skip
    for i, line in enumerate(lines):
        folder = tmp_path / "g" / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == line
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
