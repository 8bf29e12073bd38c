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


def test_a_run_that_failed_on_bad_input_does_not_block_the_corrected_rerun(tmp_path, capsys):
    from smpo_cli.cli.main import run

    out = tmp_path / "gen"
    args = ["-q", "generate", "-o", str(out), "--model", "tiny-sd15", "sampling.num_inference_steps=1",
            "sampling.height=32", "sampling.width=32"]  # fmt: skip
    assert run([*args, "--prompts", str(tmp_path / "missing.txt")]) != 0  # bad input: nothing made
    assert (out / "run.json").is_file()
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert run([*args, "--prompts", str(tmp_path / "p.txt")]) == 0  # same folder, no --overwrite
    assert len(list((out / "images").glob("*.png"))) == 1


def test_only_records_and_temporaries_count_as_no_results_and_resume_removes_temporaries(tmp_path):
    from smpo_cli.utils.rundir import RunDir

    rd = RunDir(tmp_path / "r")
    rd.prepare()
    rd.start(stage="x", recipe_source="test")
    rd.finish("failed", error="boom")
    assert rd.holds_no_results()
    (rd.path / ".smpo").mkdir()
    (rd.path / ".smpo" / "fingerprint.json").write_text("{}")
    (rd.path / "images").mkdir()
    (rd.path / "images" / ".00000_00.abc.png.tmp").write_bytes(b"")  # a killed atomic write
    (rd.path / "cache" / ".part-00001.safetensors.xyz.tmp").mkdir(parents=True)
    assert rd.holds_no_results()
    (rd.path / "images" / "00000_00.png").write_bytes(b"png")
    assert not rd.holds_no_results()
    assert rd.remove_temporaries() == 2
    assert not list(rd.path.rglob("*.tmp")) and (rd.path / "images" / "00000_00.png").is_file()
    rd.finish("success")
    assert not rd.holds_no_results()


def test_an_empty_prompts_file_is_an_error_not_zero_images(tmp_path, capsys):
    from smpo_cli.cli.main import run

    (tmp_path / "empty.txt").write_text("\n\n")
    assert run(["generate", "-o", str(tmp_path / "g"), "--model", "tiny-sd15", "--prompts", str(tmp_path / "empty.txt")]) == 1
    assert "holds no prompts" in capsys.readouterr().err


def test_a_size_the_pipeline_cannot_make_fails_before_any_weight_loads(tmp_path, capsys):
    from smpo_cli.cli.main import run

    assert run(["generate", "-o", str(tmp_path / "g"), "--model", "no/such-model", "--prompts", "x.txt",
                "sampling.height=33", "--dry-run"]) == 2  # fmt: skip
    assert "sampling.height=33 must be a multiple of 8 (e.g. 32 or 40)" in capsys.readouterr().err


def test_a_folder_made_before_a_setting_existed_resumes_when_the_setting_is_at_its_null_default(tmp_path):
    """A new recipe field with a null default: the stored fingerprint lacks the key, which means the same."""
    from smpo_cli.errors import OutputDirError
    from smpo_cli.utils.shards import ShardStore

    store = ShardStore(tmp_path, "runs", "")
    store.write_fingerprint({"pairs": {"count": 8}})
    assert store.check_fingerprint({"pairs": {"count": 8, "skill_weights": None}}, str(tmp_path))
    with pytest.raises(OutputDirError, match=r"other settings \(pairs.skill_weights\)"):
        store.check_fingerprint({"pairs": {"count": 8, "skill_weights": {"colors": 1.0}}}, str(tmp_path))
    with pytest.raises(OutputDirError, match=r"other settings \(pairs.count\)"):
        store.check_fingerprint({"pairs": {"count": 9}}, str(tmp_path))
