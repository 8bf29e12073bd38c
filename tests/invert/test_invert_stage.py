"""`smpo invert` end to end on the embedded tiny SD1.5 model: the image tool and the training cache."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from smpo_cli.cli._runner import run_stage
from smpo_cli.cli.main import run
from smpo_cli.errors import OutputDirError
from smpo_cli.inversion.cache import InversionCache
from smpo_cli.inversion.runner import resume_ok, run_inversion

pytestmark = pytest.mark.integration


def smooth_image(seed: int, size=(72, 64)) -> Image.Image:
    """A smooth colour gradient: something a VAE reconstructs well, unlike noise."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    arr = (c0 * (1 - x[..., None]) + c1 * y[..., None]).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def invert(data, out, *extra):
    overrides = [f"data.path={data}", f"output_dir={out}", "model.pretrained=tiny-sd15", "data.resolution=32",
                 "data.num_workers=0", "inversion.num_steps=5", *extra]  # fmt: skip
    return run_stage("invert", recipe=None, overrides=overrides, resume=resume_ok, core=run_inversion)


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = []
    for i in range(3):
        smooth_image(i).save(folder / f"pic{i}.png")
        rows.append({"file_name": f"pic{i}.png", "prompt": "a red circle"})
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    rows.insert(1, {"file_name": "broken.png", "prompt": "a blue square"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_images_tool_writes_noise_reconstructions_and_table(image_folder, tmp_path):
    out = tmp_path / "inv"
    # a random tiny UNet is a poor denoiser near t=999; at 399 inversion + sampling back is close
    result = invert(image_folder, out, "inversion.levels=[399]", "inversion.renoise_iterations=2")
    assert result.layout == "images" and result.inverted == 3 and result.skipped == {"cannot decode": 1}
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["000000_pic0", "000002_pic1", "000003_pic2"]
    for r in records:
        assert (out / r["noise"]).is_file() and (out / r["reconstruction"]).is_file()
        # a random tiny VAE bounds pixel quality; inversion + sampling back adds little to it
        assert abs(r["psnr_db"] - r["vae_psnr_db"]) < 1.0 and r["latent_mse"] < 0.1
        with safe_open(str(out / r["noise"]), "pt") as f:
            assert f.get_tensor("latents").shape == (1, 4, 16, 16)
            meta = f.metadata()
            assert json.loads(meta["smpo"])["renoise_iterations"] == 2 and meta["timestep"] == "399"
        assert Image.open(out / r["reconstruction"]).size == (32, 32)
    # grid 199, 399 below t=399: 2 steps of (1 + 2 iterations) estimates, then 2 DDIM steps back
    assert result.unet_calls_per_image == 2 * 3 + 2
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped[0]["row"] == 1 and "image" in skipped[0]["reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reconstruction"]["psnr_db_mean"] == pytest.approx(np.mean([r["psnr_db"] for r in records]))


def test_more_renoise_iterations_reconstruct_no_worse(image_folder, tmp_path):
    errors = []
    for k in (0, 2):
        result = invert(image_folder, tmp_path / f"k{k}", "inversion.levels=[599]", f"inversion.renoise_iterations={k}",
                        f"inversion.average_window={min(2, k + 1)}")  # fmt: skip
        errors.append(result.reconstruction["latent_mse_mean"])
    assert errors[1] <= errors[0]


@pytest.fixture
def pair_parquet(tmp_path):
    n = 5
    cols = {
        "caption": ["a red circle", "two blue squares", "a cat", "a dog", "a green triangle"],
        "jpg_0": [png(smooth_image(10 + i, (48, 40))) for i in range(n)],
        "jpg_1": [png(smooth_image(20 + i, (40, 56))) for i in range(n)],
        "smpo_row": [100 + i for i in range(n)],
        "pickscore_p": [0.6] * n,
    }
    cols["jpg_1"][2] = b"garbage"
    path = tmp_path / "scored" / "data"
    path.mkdir(parents=True)
    pq.write_table(pa.table(cols), path / "part-00000.parquet")
    return tmp_path / "scored"


def test_training_cache_random_access_matches_direct_inversion(pair_parquet, tmp_path):
    out = tmp_path / "cache"
    levels = [199, 500, 999]  # 500 is between grid levels: reached exactly
    result = invert(pair_parquet, out, f"inversion.levels={levels}", "data.rows_per_shard=2",
                    "inversion.cache_dtype=float32")  # fmt: skip
    assert result.layout == "pairs" and result.inverted == 4 and result.shards == 3
    assert result.storage_bytes_per_pair == 2 * (1 + 3) * 4 * 16 * 16 * 4
    cache = InversionCache(out)
    assert cache.levels == levels and cache.rows == [100, 101, 103, 104] and 102 not in cache
    item = cache.get(103)
    assert item["latents"].shape == (2, 4, 16, 16) and item["inverted"].shape == (2, 3, 4, 16, 16)
    assert item["original_size"].tolist() == [[40, 48], [56, 40]]
    # recompute pair 103 (row 3 of the input) directly through the library
    from smpo_cli.inversion.renoise import renoise_invert
    from smpo_cli.inversion.schedule import NoiseSchedule, inversion_grid
    from smpo_cli.models import load_components
    from smpo_cli.models import vae as vae_ops
    from smpo_cli.models.conditioning import encode_prompts

    comps = load_components("tiny-sd15")
    pixels = torch.stack([vae_ops.preprocess(smooth_image(13, (48, 40)), 32).pixels,
                          vae_ops.preprocess(smooth_image(23, (40, 56)), 32).pixels])  # fmt: skip
    # posterior samples seeded by (recipe seed, row id, side): pair 103's own noise, whatever its shard
    x0 = vae_ops.encode(comps.vae, pixels, sample=True, seeds=vae_ops.posterior_seeds(0, [103]))
    torch.testing.assert_close(item["latents"], x0, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(x0, vae_ops.encode(comps.vae, pixels), atol=1e-3)
    sched = NoiseSchedule.from_scheduler(comps.scheduler)
    grid = sorted(set(inversion_grid(5)) | set(levels))
    cond = encode_prompts(comps, ["a dog", "a dog"])
    direct = renoise_invert(comps.unet, x0, cond, torch.tensor([500, 500]), schedule=sched, grid=grid,
                            renoise_iterations=1, average_window=2)  # fmt: skip
    torch.testing.assert_close(item["inverted"][:, 1], direct.latents, atol=1e-4, rtol=1e-4)
    # the cache is picklable for DataLoader workers and reopens its files lazily
    import pickle

    again = pickle.loads(pickle.dumps(cache))
    torch.testing.assert_close(again.get(100)["inverted"], cache.get(100)["inverted"])


def test_cache_resumes_and_refuses_other_settings(pair_parquet, tmp_path):
    out = tmp_path / "cache"
    args = ["inversion.levels=[999]", "data.rows_per_shard=2", "inversion.method=ddim"]
    invert(pair_parquet, out, *args)
    shard1 = out / "cache" / "part-00001.safetensors"
    before = shard1.read_bytes()
    shard1.unlink()
    again = invert(pair_parquet, out, *args)
    assert again.shards_resumed == 2 and shard1.read_bytes() == before
    with pytest.raises(OutputDirError, match=r"inversion.levels"):
        invert(pair_parquet, out, "inversion.levels=[499]", "data.rows_per_shard=2", "inversion.method=ddim")


def test_noise_regularised_cache_resumes_exactly(pair_parquet, tmp_path):
    """The regularisation draws noise and rolls: a run that lost its last two shards (killed while writing them)
    and resumes must write the same bytes as the uninterrupted run, so every shard draws from its own seed."""
    out = tmp_path / "cache"
    args = ["inversion.levels=[999]", "data.rows_per_shard=2", "inversion.noise_regularization=true",
            "inversion.reg_steps=2", "inversion.cache_dtype=float32"]  # fmt: skip
    invert(pair_parquet, out, *args)
    parts = [out / "cache" / f"part-{i:05d}.safetensors" for i in range(3)]
    before = [p.read_bytes() for p in parts]
    for p in parts[1:]:
        p.unlink()
    again = invert(pair_parquet, out, *args)
    assert again.shards_resumed == 1
    assert [p.read_bytes() for p in parts] == before
    # the regularisation is really drawing: another seed inverts the same images differently
    other = invert(pair_parquet, tmp_path / "other", *args, "seed=1")
    assert other.inverted == again.inverted
    assert (tmp_path / "other" / "cache" / "part-00001.safetensors").read_bytes() != before[1]


def test_dry_run_reports_storage_and_cli_table(pair_parquet, tmp_path, capsys):
    assert run(["invert", "--data", str(pair_parquet), "--model", "tiny-sd15", "-o", str(tmp_path / "o"),
                "inversion.levels=[199,999]", "data.resolution=32", "--dry-run"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "KiB per pair" in err and not (tmp_path / "o").exists()
    assert run(["-q", "invert", "--data", str(pair_parquet), "--model", "tiny-sd15", "-o", str(tmp_path / "o"),
                "inversion.levels=[999]", "data.resolution=32", "data.num_workers=0", "inversion.num_steps=3",
                "--limit", "2"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "pairs inverted" in text and "storage per pair" in text


def test_missing_prompt_column_is_one_line(tmp_path, capsys):
    smooth_image(0).save(tmp_path / "a.png")
    (tmp_path / "x.jsonl").write_text(json.dumps({"image": "a.png", "words": "hi"}) + "\n")
    assert run(["invert", "--data", str(tmp_path / "x.jsonl"), "--model", "tiny-sd15", "-o", str(tmp_path / "o")]) == 1
    assert "no prompt column" in capsys.readouterr().err


# smpo invert on SD3 / FLUX.1: tests/invert/test_flow_invert_stage.py
