"""`smpo invert` on the tiny flow-matching models (tiny-sd3, tiny-flux): the image tool with its reconstruction
PSNR table, and the SmPO training cache (level t = noise level s = t / 1000), its contents and its resume."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from smpo_cli.cli._runner import run_stage
from smpo_cli.cli.main import run
from smpo_cli.inversion.cache import InversionCache
from smpo_cli.inversion.runner import resume_ok, run_inversion
from tests.invert.test_invert_stage import png, smooth_image

pytestmark = pytest.mark.integration
FLOW = ["tiny-sd3", "tiny-flux"]


def invert(model, data, out, *extra):
    overrides = [f"data.path={data}", f"output_dir={out}", f"model.pretrained={model}", "data.resolution=32",
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
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


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


@pytest.mark.parametrize("model", FLOW)
def test_images_tool_prints_the_reconstruction_psnr_table(image_folder, tmp_path, capsys, model):
    out = tmp_path / "inv"
    code = run(["invert", "--data", str(image_folder), "--model", model, "-o", str(out), "data.resolution=32",
                "data.num_workers=0", "inversion.num_steps=5", "inversion.levels=[999]",
                "inversion.renoise_iterations=2"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "smpo invert (images)" in text and "reconstruction PSNR" in text and "VAE alone" in text
    assert "per image" in text and "000002_pic2" in text
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["000000_pic0", "000001_pic1", "000002_pic2"]
    for r in records:
        assert r["timestep"] == 999 and r["sigma"] == pytest.approx(0.999)
        # a random tiny VAE bounds pixel quality; inversion to s = 0.999 and Euler sampling back add little
        assert abs(r["psnr_db"] - r["vae_psnr_db"]) < 0.5 and r["latent_mse"] < 0.01
        with safe_open(str(out / r["noise"]), "pt") as f:
            latents = f.get_tensor("latents")
            assert latents.shape == (1, 16, 16, 16) and 0.3 < latents.std() < 1.5
            assert json.loads(f.metadata()["smpo"])["sigma"] == pytest.approx(0.999)
    summary = json.loads((out / "summary.json").read_text())
    # 5 steps of (1 + 2 re-noise) transformer evaluations to s = 0.999, then 5 Euler steps back
    assert summary["unet_calls_per_image"] == 5 * 3 + 5
    assert summary["reconstruction"]["psnr_db_mean"] == pytest.approx(
        sum(r["psnr_db"] for r in records) / 3, abs=1e-3
    )


def test_more_renoise_iterations_reconstruct_better(image_folder, tmp_path):
    errors = [invert("tiny-sd3", image_folder, tmp_path / f"k{k}", "inversion.levels=[999]",
                     f"inversion.renoise_iterations={k}", f"inversion.average_window={min(2, k + 1)}"
                     ).reconstruction["latent_mse_mean"] for k in (0, 2)]  # fmt: skip
    assert errors[1] < errors[0]


@pytest.mark.parametrize("model", FLOW)
def test_training_cache_holds_each_levels_online_inversion(pair_parquet, tmp_path, model):
    from smpo_cli.inversion.flow import flow_invert
    from smpo_cli.models import load_components
    from smpo_cli.models import vae as vae_ops
    from smpo_cli.models.conditioning import encode_prompts
    from smpo_cli.training.flow_step import train_shift

    out = tmp_path / "cache"
    levels = [200, 600, 999]
    result = invert(model, pair_parquet, out, f"inversion.levels={levels}", "data.rows_per_shard=2",
                    "inversion.cache_dtype=float32")  # fmt: skip
    assert result.layout == "pairs" and result.inverted == 4 and result.shards == 3
    assert result.storage_bytes_per_pair == 2 * (1 + 3) * 16 * 16 * 16 * 4
    cache = InversionCache(out)
    assert cache.levels == levels and cache.rows == [100, 101, 103, 104]
    assert cache.meta["family"] == model.removeprefix("tiny-") and cache.meta["sigmas"] == [0.2, 0.6, 0.999]
    item = cache.get(103)
    assert item["latents"].shape == (2, 16, 16, 16) and item["inverted"].shape == (2, 3, 16, 16, 16)
    # pair 103 recomputed through the library: each level is its own inversion, as training inverts online
    comps = load_components(model)
    pixels = torch.stack([vae_ops.preprocess(smooth_image(13, (48, 40)), 32).pixels,
                          vae_ops.preprocess(smooth_image(23, (40, 56)), 32).pixels])  # fmt: skip
    x0 = vae_ops.encode(comps.vae, pixels, sample=True, seeds=vae_ops.posterior_seeds(0, [103]))
    torch.testing.assert_close(item["latents"], x0, atol=1e-5, rtol=1e-5)
    cond = encode_prompts(comps, ["a dog", "a dog"])
    for j, t in enumerate(levels):
        direct = flow_invert(comps.transformer, x0, cond, t / 1000, num_steps=5,
                             shift=train_shift(comps.scheduler, 16, 16), renoise_iterations=1, average_window=2)  # fmt: skip
        torch.testing.assert_close(item["inverted"][:, j], direct.latents, atol=1e-4, rtol=1e-4)


def test_flow_cache_resumes_exactly_and_refuses_other_settings(pair_parquet, tmp_path):
    from smpo_cli.errors import OutputDirError

    out = tmp_path / "cache"
    args = ["inversion.levels=[300,999]", "data.rows_per_shard=2"]
    invert("tiny-sd3", pair_parquet, out, *args)
    parts = [out / "cache" / f"part-{i:05d}.safetensors" for i in range(3)]
    before = [p.read_bytes() for p in parts]
    for p in parts[1:]:  # killed while writing the last two shards
        p.unlink()
    again = invert("tiny-sd3", pair_parquet, out, *args)
    assert again.shards_resumed == 1 and again.inverted == 4
    assert [p.read_bytes() for p in parts] == before
    with pytest.raises(OutputDirError, match=r"inversion.levels"):
        invert("tiny-sd3", pair_parquet, out, "inversion.levels=[999]", "data.rows_per_shard=2")


@pytest.mark.parametrize(
    ("setting", "message"),
    [("inversion.noise_regularization=true", "noise_regularization is for the UNet families"),
     ("inversion.levels=[0,999]", "level 0 is the image itself"),
     ("inversion.guidance_scale=3", "guidance_scale")],
)  # fmt: skip
def test_flow_refuses_settings_without_meaning_in_one_line(image_folder, tmp_path, capsys, setting, message):
    code = run(["-q", "invert", "--data", str(image_folder), "--model", "tiny-sd3", "-o", str(tmp_path / "o"),
                "data.resolution=32", "data.num_workers=0", setting])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_dry_run_says_what_flow_levels_are(image_folder, tmp_path, capsys):
    assert run(["invert", "--data", str(image_folder), "--model", "tiny-sd3", "-o", str(tmp_path / "o"),
                "inversion.levels=[300,999]", "data.resolution=32", "--dry-run"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "tiny-sd3: embedded tiny model" in err and "s = 0.3, 0.999" in err
    assert "48.0 KiB per pair" in err  # 2 x (1 + 2) latents of 16 x 16 x 16 in float16 (16 channels, not 4)
    assert not (tmp_path / "o").exists()
    assert run(["invert", "--data", str(image_folder), "--model", "tiny-sd3", "-o", str(tmp_path / "o"),
                "inversion.noise_regularization=true", "--dry-run"]) == 0  # fmt: skip
    assert "the run refuses inversion.noise_regularization" in capsys.readouterr().err
