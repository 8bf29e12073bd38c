import json

import pytest

from smpo_cli.errors import OutputDirError
from smpo_cli.utils.atomic import atomic_path, write_json
from smpo_cli.utils.rundir import RunDir


def test_fresh_run_writes_manifest(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.prepare()
    rd.write_recipe("stage: train\n")
    rd.start(stage="train", recipe_source="r.yaml", argv=["smpo", "train"])
    m = rd.read_manifest()
    assert m["status"] == "running" and m["argv"] == ["smpo", "train"] and "torch" in m["packages"]
    assert m["started_at"] and m["ended_at"] is None and "cuda_available" in m["device"]
    rd.finish("success", result={"a": 1})
    m = rd.read_manifest()
    assert m["status"] == "success" and m["result"] == {"a": 1} and m["ended_at"]
    assert (tmp_path / "run" / "recipe.resolved.yaml").read_text() == "stage: train\n"


def test_non_empty_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "file.txt").write_text("x")
    with pytest.raises(OutputDirError, match="not empty"):
        RunDir(out).prepare()
    with pytest.raises(OutputDirError, match="not an smpo run folder"):
        RunDir(out).prepare(overwrite=True)
    assert (out / "file.txt").exists()


def test_overwrite_replaces_earlier_run(tmp_path):
    out = tmp_path / "run"
    rd = RunDir(out)
    rd.prepare()
    rd.start(stage="train", recipe_source="r")
    (out / "old.bin").write_text("x")
    RunDir(out).prepare(overwrite=True)
    assert not (out / "old.bin").exists() and out.is_dir()


def test_resume_keeps_history(tmp_path):
    out = tmp_path / "run"
    rd = RunDir(out)
    rd.prepare()
    rd.start(stage="train", recipe_source="r")
    rd.finish("interrupted")
    rd2 = RunDir(out)
    rd2.prepare(resume=True)
    rd2.start(stage="train", recipe_source="r")
    m = rd2.read_manifest()
    assert m["previous_attempts"][0]["status"] == "interrupted"


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    dest = tmp_path / "out.json"
    write_json(dest, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert json.loads(dest.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_folder_replace(tmp_path):
    dest = tmp_path / "d"
    for version in ("1", "2"):
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            (tmp / "v").write_text(version)
    assert (dest / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
