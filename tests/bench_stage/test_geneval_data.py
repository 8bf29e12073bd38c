"""GenEval's metadata and image-folder formats: the real file parses, bad lines name their place."""

import json
from pathlib import Path

import pytest

from smpo_cli.benchmark.geneval_data import load_metadata, resolve_metadata, scan_image_folder
from smpo_cli.errors import AssetNotFoundError, DataError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "geneval"


@pytest.mark.skipif(not SHARED.is_dir(), reason="the real benchmark files live in ../shared/data beside the checkout")
def test_the_real_metadata_file_parses_with_the_published_task_counts():
    entries = load_metadata(SHARED / "evaluation_metadata.jsonl")
    assert len(entries) == 553
    counts = {}
    for e in entries:
        counts[e["tag"]] = counts.get(e["tag"], 0) + 1
    assert counts == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}
    counting = [e for e in entries if e["tag"] == "counting"]
    # "exactly N": include N and exclude N+1 of the same class
    assert all(e["exclude"][0]["count"] == e["include"][0]["count"] + 1 for e in counting)
    assert all(e["include"][1]["position"][1] == 0 for e in entries if e["tag"] == "position")


def _write(tmp_path, lines):
    path = tmp_path / "meta.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


GOOD = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", ":2: not JSON"),
        ({**GOOD, "tag": "colour"}, "tag 'colour' is not a GenEval task"),
        ({**GOOD, "prompt": ""}, "missing or empty 'prompt'"),
        ({**GOOD, "include": []}, "'include' must be a non-empty list"),
        ({**GOOD, "include": [{"class": "car", "count": 0}]}, "include[0].count must be a positive integer"),
        ({**GOOD, "include": [{"class": "car", "count": 1, "color": "teal"}]}, "include[0].color 'teal'"),
        ({**GOOD, "include": [{"class": "car", "count": 1, "position": ["left of", 0]}]}, "include[0].position"),
        ({**GOOD, "include": [{"class": "car", "count": 1}, {"class": "dog", "count": 1, "position": ["behind", 0]}]},
         "include[1].position"),
        ({**GOOD, "exclude": [{"class": "car"}]}, "exclude[0].count"),
    ],
)
def test_bad_metadata_lines_name_the_line_and_key(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, bad])
    with pytest.raises(DataError, match="meta.jsonl:2") as info:
        load_metadata(path)
    assert message in str(info.value)


def test_missing_metadata_and_offline_hub_give_one_line_errors(tmp_path):
    with pytest.raises(AssetNotFoundError, match="does not exist"):
        resolve_metadata(str(tmp_path / "nope.jsonl"))
    with pytest.raises(AssetNotFoundError, match="could not fetch it from the hub"):
        resolve_metadata("hf://datasets/someone/geneval/prompts/evaluation_metadata.jsonl")
    with pytest.raises(DataError, match="expected hf://datasets/OWNER/NAME/PATH"):
        resolve_metadata("hf://datasets/someone")


def test_image_folder_scan_follows_the_official_layout(tmp_path):
    from PIL import Image

    for i, meta in enumerate([GOOD, {**GOOD, "prompt": "a photo of a red car!"}]):
        folder = tmp_path / f"{i:05d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps(meta))
        for name in ("0000.png", "0001.png", "grid.png", "10.png"):
            Image.new("RGB", (8, 8)).save(folder / "samples" / name)
    (tmp_path / "notes").mkdir()  # not all digits: ignored
    found = scan_image_folder(tmp_path)
    assert [(x.prompt_index, x.sample_index) for x in found] == [(0, 0), (0, 1), (0, 10), (1, 0), (1, 1), (1, 10)]
    assert found[3].metadata["prompt"].endswith("!")
    (tmp_path / "00002").mkdir()
    with pytest.raises(DataError, match="00002: no metadata.jsonl"):
        scan_image_folder(tmp_path)


def test_empty_or_missing_image_folder(tmp_path):
    with pytest.raises(AssetNotFoundError):
        scan_image_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no GenEval images"):
        scan_image_folder(tmp_path)
