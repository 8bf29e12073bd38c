"""``run_inversion(recipe)``: ``smpo invert``.

Two uses of one pipeline (decode -> resize/crop -> VAE encode -> prompt encode -> invert):

* **images** (a tool, e.g. for editing): each image is inverted to the highest of
  ``inversion.levels``, sampled back with DDIM along the same levels and decoded. Writes
  ``noise/<id>.safetensors`` (the inverted latent, settings in its metadata),
  ``reconstruction/<id>.png`` and ``results.jsonl`` (reconstruction PSNR, the VAE-only PSNR that
  bounds it, latent error), plus ``summary.json``.
* **pairs** (the SmPO training cache): for every pair of a scored dataset, both images' clean
  latents and their inversions to every level, in ``cache/part-K.safetensors`` shards that
  ``InversionCache`` reads with random access.

Flow-matching models (SD3 / SD3.5, FLUX.1; :class:`_FlowInverter`): a level t of ``inversion.levels`` is
the noise level s = t / 1000 (t = 1000 s is the timestep the transformer is told; levels 1..999). Each
image is inverted with flow ReNoise (:func:`smpo_cli.inversion.flow.flow_invert`; ``method=ddim`` is the
plain inverse Euler step, K = 0) with the sampler's shift at the data resolution; the images layout
samples back with Euler steps along the same levels. The pairs layout inverts every image to every
level separately, along exactly the path online training inversion takes to that level (so a cached
x_s equals the online one), at the sum of the levels' step counts per image.

Shards are atomic and resumable, and split across processes under ``accelerate launch``, exactly as
in ``smpo score``; a corrupt image skips its whole row, recorded in ``skipped.jsonl``.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smpo_cli.config.schema import InvertRecipe
from smpo_cli.errors import DataError
from smpo_cli.inversion.cache import CACHE_DIR
from smpo_cli.inversion.storage import storage_per_pair
from smpo_cli.scoring.decode import RowDecoder, collate
from smpo_cli.scoring.sources import LAYOUTS, PairSource, data_signature, open_source
from smpo_cli.utils.atomic import atomic_path, write_json, write_text
from smpo_cli.utils.logging import get_logger
from smpo_cli.utils.shards import Shard, ShardStore, count_reasons

logger = get_logger(__name__)
ROW_COLUMN = "smpo_row"
PROMPT_COLUMNS = ("prompt", "caption", "text")
IMAGE_COLUMNS = ("image", "file_name", "path")


@dataclass
class InvertResult:
    output_dir: str
    layout: str
    rows: int
    inverted: int
    skipped: dict[str, int]
    shards: int
    shards_resumed: int
    levels: list[int]
    unet_calls_per_image: float
    images_per_second: float
    seconds: float
    storage_bytes_per_pair: int | None = None
    reconstruction: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- settings
def fingerprint(recipe: InvertRecipe) -> dict[str, Any]:
    if recipe.plan is not None:
        from smpo_cli.inversion.plan_cache import invert_fingerprint

        return invert_fingerprint(recipe)
    data = recipe.data.model_dump(mode="json", exclude={"num_workers"})
    data["path"] = str(Path(recipe.data.path).expanduser().resolve())
    inv = recipe.inversion.model_dump(mode="json", exclude={"batch_size"})
    return {
        "data": data,
        "inversion": inv,
        "model": recipe.model.model_dump(mode="json"),
        "seed": recipe.seed,
    }


def _layout(recipe: InvertRecipe, source: PairSource) -> str:
    if recipe.data.layout != "auto":
        return recipe.data.layout
    names = source.column_names
    pair = any(v["image_0"] in names and v["image_1"] in names for v in LAYOUTS.values())
    return "pairs" if pair else "images"


def _store(recipe: InvertRecipe, layout: str) -> ShardStore:
    if layout == "pairs":
        return ShardStore(Path(recipe.output_dir), CACHE_DIR, ".safetensors")
    return ShardStore(Path(recipe.output_dir), "results", ".jsonl")


def resume_ok(recipe: InvertRecipe) -> bool:
    """True when output_dir holds shards made with these settings (a rerun then resumes)."""
    store = ShardStore(Path(recipe.output_dir), "results", ".jsonl")  # fingerprint lives in shards/ for both
    return store.check_fingerprint(fingerprint(recipe), recipe.output_dir)


def _columns(recipe: InvertRecipe, source: PairSource, layout: str) -> tuple[list[str], str]:
    names = source.column_names
    d = recipe.data

    def pick(explicit: str | None, options: tuple[str, ...], what: str) -> str:
        if explicit:
            if explicit not in names:
                raise DataError(
                    f"{source.path}: no column {explicit!r} ({what}); columns found: {', '.join(names)}"
                )
            return explicit
        found = next((c for c in options if c in names), None)
        if found is None:
            raise DataError(
                f"{source.path}: no {what} column (looked for {', '.join(options)}); columns found: {', '.join(names)}",
                hint=f"name it with data.{'prompt' if what == 'prompt' else 'image'}_column=...",
            )
        return found

    if layout == "pairs":
        layout_cols = (
            next(v for v in LAYOUTS.values() if v["image_0"] in names and v["image_1"] in names)
            if any(v["image_0"] in names for v in LAYOUTS.values())
            else None
        )
        if layout_cols is None:
            raise DataError(
                f"{source.path}: no image_0/image_1 (or jpg_0/jpg_1) columns; columns found: {', '.join(names)}"
            )
        prompt = pick(d.prompt_column, (layout_cols["prompt"], *PROMPT_COLUMNS), "prompt")
        return [layout_cols["image_0"], layout_cols["image_1"]], prompt
    return [pick(d.image_column, IMAGE_COLUMNS, "image")], pick(d.prompt_column, PROMPT_COLUMNS, "prompt")


def _safe_id(value: Any, row: int) -> str:
    text = Path(str(value)).stem if value is not None else ""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:80]
    return f"{row:06d}" + (f"_{text}" if text else "")


# ----------------------------------------------------------------------------- the work
class _Inverter:
    def __init__(self, recipe: InvertRecipe, comps) -> None:
        from smpo_cli.inversion.renoise import NoiseRegularization
        from smpo_cli.inversion.schedule import NoiseSchedule, inversion_grid

        self.recipe, self.comps = recipe, comps
        inv = recipe.inversion
        self.schedule = NoiseSchedule.from_scheduler(comps.scheduler, comps.prediction_type)
        self.grid = sorted(
            set(inversion_grid(inv.num_steps, self.schedule.num_train_timesteps)) | set(inv.levels)
        )
        self.reg = (
            NoiseRegularization(lambda_ac=inv.lambda_ac, lambda_kl=inv.lambda_kl, num_reg_steps=inv.reg_steps)
            if inv.noise_regularization
            else None
        )
        self.generator = torch.Generator()
        self.start_shard(0)
        self.uncond = None
        if inv.guidance_scale is not None:
            from smpo_cli.models.conditioning import encode_prompts

            self.uncond = encode_prompts(comps, [""])
        self.noise_estimates = 0  # UNet evaluations, counted per image (a batch of 4 counts 4)
        self.images = 0  # images inverted by this process

    def start_shard(self, index: int) -> None:
        """Draw the shard's regularisation noise and rolls from (seed, shard) alone: a resumed run, which skips
        finished shards, and a run split over processes then invert every shard exactly as one uninterrupted run."""
        import numpy as np

        state = np.random.SeedSequence([self.recipe.seed, index]).generate_state(1, dtype=np.uint64)[0]
        self.generator.manual_seed(int(state % 2**63))

    def cond(self, prompts: list[str], sizes: list[tuple[int, int]], crops: list[tuple[int, int]]):
        from smpo_cli.models.conditioning import encode_prompts

        res = self.recipe.data.resolution
        kwargs = {}
        if self.comps.family == "sdxl":
            kwargs = {"original_sizes": sizes, "crop_coords": crops, "target_size": (res, res)}
        return encode_prompts(self.comps, prompts, **kwargs)

    def invert(self, x0: torch.Tensor, cond, t: int, trajectory: bool):
        from smpo_cli.inversion.ddim import ddim_invert
        from smpo_cli.inversion.renoise import renoise_invert

        inv = self.recipe.inversion
        common = dict(schedule=self.schedule, grid=self.grid, first_prediction=inv.first_prediction,
                      guidance_scale=inv.guidance_scale, uncond=self.uncond.expand(len(x0)) if self.uncond else None,
                      return_trajectory=trajectory)  # fmt: skip
        ts = torch.full((len(x0),), t, dtype=torch.long)
        if inv.method == "ddim":
            out = ddim_invert(self.comps.unet, x0, cond, ts, **common)
        else:
            out = renoise_invert(self.comps.unet, x0, cond, ts, renoise_iterations=inv.renoise_iterations,
                                 average_window=inv.average_window, regularization=self.reg,
                                 generator=self.generator, **common)  # fmt: skip
        self.noise_estimates += int(out.nfe.sum())
        self.images += len(x0)
        return out

    def level_info(self, t: int) -> dict[str, Any]:
        return {}

    def cache_meta(self) -> dict[str, Any]:
        return {}

    def invert_levels(self, x0: torch.Tensor, cond, levels: list[int]) -> torch.Tensor:
        """(B, L, C, h, w): each image's latent at every level of ``levels``, from one trajectory to the top
        level (the grid holds every level)."""
        out = self.invert(x0, cond, max(levels), trajectory=True)
        per_level = []
        for traj in out.trajectory:
            where = {lvl: i for i, lvl in enumerate(traj.levels)}
            per_level.append(torch.stack([traj.latents[where[lvl]] for lvl in levels]))
        return torch.stack(per_level)

    def sample_back(self, x_t: torch.Tensor, cond, t: int) -> torch.Tensor:
        from smpo_cli.inversion.ddim import ddim_sample

        inv = self.recipe.inversion
        out = ddim_sample(self.comps.unet, x_t, cond, torch.full((len(x_t),), t, dtype=torch.long),
                          schedule=self.schedule, grid=self.grid, guidance_scale=inv.guidance_scale,
                          uncond=self.uncond.expand(len(x_t)) if self.uncond else None)  # fmt: skip
        self.noise_estimates += int(out.nfe.sum())
        return out.latents


class _FlowInverter:
    """The :class:`_Inverter` of the flow-matching families (SD3 / SD3.5, FLUX.1): level t is s = t / 1000,
    inverted with :func:`~smpo_cli.inversion.flow.flow_invert` and sampled back with
    :func:`~smpo_cli.inversion.flow.flow_euler_sample` (see the module docstring)."""

    def __init__(self, recipe: InvertRecipe, comps) -> None:
        from smpo_cli.inversion.flow import check_flow_invert

        check_flow_invert(recipe.inversion, comps.family)
        self.recipe, self.comps = recipe, comps
        inv = recipe.inversion
        self.n_train = int(comps.scheduler.config.get("num_train_timesteps", 1000))
        self.iterations = 0 if inv.method == "ddim" else int(inv.renoise_iterations)
        self.window = 1 if inv.method == "ddim" else int(inv.average_window)
        self.noise_estimates = 0  # transformer evaluations, counted per image
        self.images = 0

    def start_shard(self, index: int) -> None:  # no random draws: nothing to seed
        pass

    def sigma(self, t: int) -> float:
        return t / self.n_train

    def level_info(self, t: int) -> dict[str, Any]:
        return {"sigma": self.sigma(t)}

    def cache_meta(self) -> dict[str, Any]:
        levels = list(self.recipe.inversion.levels)
        return {"sigmas": [self.sigma(t) for t in levels], "num_train_timesteps": self.n_train}

    def cond(self, prompts: list[str], sizes, crops):
        from smpo_cli.models.conditioning import encode_prompts

        return encode_prompts(self.comps, prompts)

    def _levels(self, x: torch.Tensor, t: int) -> tuple[float, list[list[float]]]:
        from smpo_cli.inversion.flow import inversion_levels
        from smpo_cli.training.flow_step import train_shift

        shift = train_shift(self.comps.scheduler, x.shape[-2], x.shape[-1])
        return shift, inversion_levels([self.sigma(t)] * len(x), self.recipe.inversion.num_steps, shift)

    def invert(self, x0: torch.Tensor, cond, t: int, trajectory: bool = False, count: bool = True):
        from smpo_cli.inversion.flow import flow_invert

        inv = self.recipe.inversion
        shift, levels = self._levels(x0, t)
        out = flow_invert(self.comps.transformer, x0, cond, self.sigma(t), num_steps=inv.num_steps, shift=shift,
                          renoise_iterations=self.iterations, average_window=self.window,
                          first_prediction=inv.first_prediction, num_train_timesteps=self.n_train)  # fmt: skip
        self.noise_estimates += sum(len(lv) - 1 for lv in levels) * (1 + self.iterations)
        self.images += len(x0) if count else 0
        return out

    def invert_levels(self, x0: torch.Tensor, cond, levels: list[int]) -> torch.Tensor:
        """(B, L, C, h, w): each image inverted to each level separately (online training's path to it)."""
        per_level = [self.invert(x0, cond, t, count=i == 0).latents.float() for i, t in enumerate(levels)]
        return torch.stack(per_level, dim=1)

    def sample_back(self, x_t: torch.Tensor, cond, t: int) -> torch.Tensor:
        from smpo_cli.inversion.flow import flow_euler_sample

        _, levels = self._levels(x_t, t)
        self.noise_estimates += sum(len(lv) - 1 for lv in levels)
        return flow_euler_sample(self.comps.transformer, x_t, cond, levels, num_train_timesteps=self.n_train)


def _decoded_batches(
    recipe: InvertRecipe, source: PairSource, shard: Shard, image_cols: list[str], prompt_col: str
):
    table = source.read(shard.start, shard.stop)
    decoder = RowDecoder(
        [table.column(c).to_pylist() for c in image_cols],
        ["image_0", "image_1"] if len(image_cols) == 2 else ["image"],
        table.column(prompt_col).to_pylist(),
        source.base_dir,
        recipe.data.max_image_pixels,
    )
    rows_per_batch = max(1, recipe.inversion.batch_size // len(image_cols))
    loader = torch.utils.data.DataLoader(
        decoder, batch_size=rows_per_batch, collate_fn=collate,
        num_workers=recipe.data.num_workers if len(decoder) > rows_per_batch else 0,
    )  # fmt: skip
    return table, loader


def _prepare(batch, resolution: int):
    from smpo_cli.models.vae import preprocess

    pixels, sizes, crops, prompts = [], [], [], []
    for item in batch:
        for img in item.images:
            pre = preprocess(img, resolution)
            pixels.append(pre.pixels)
            sizes.append(pre.original_size)
            crops.append(pre.crop_top_left)
            prompts.append(item.prompt)
    return torch.stack(pixels), sizes, crops, prompts


def _images_shard(
    inverter: _Inverter, recipe, source, shard, cols, prompt_col, store: ShardStore, progress, task
):
    from safetensors.torch import save_file

    from smpo_cli.models import vae as vae_ops

    comps, res = inverter.comps, recipe.data.resolution
    t = max(recipe.inversion.levels)
    table, loader = _decoded_batches(recipe, source, shard, cols, prompt_col)
    ids = table.column("id").to_pylist() if "id" in table.column_names else table.column(cols[0]).to_pylist()
    out_dir = Path(recipe.output_dir)
    results, skipped = [], []
    level = inverter.level_info(t)  # flow models: the noise level s of t
    settings = json.dumps(
        {"model": recipe.model.pretrained, "t": t, **level, **recipe.inversion.model_dump(mode="json")}
    )
    for batch in loader:
        valid = [b for b in batch if b.skip_reason is None]
        skipped += [
            {"row": shard.start + b.row, "shard": shard.index, "reason": b.skip_reason}
            for b in batch
            if b.skip_reason
        ]
        if valid:
            pixels, sizes, crops, prompts = _prepare(valid, res)
            x0 = vae_ops.encode(comps.vae, pixels)
            cond = inverter.cond(prompts, sizes, crops)
            inverted = inverter.invert(x0, cond, t, trajectory=False)
            x0_rec = inverter.sample_back(inverted.latents, cond, t)
            rec = vae_ops.decode(comps.vae, x0_rec).cpu()
            vae_only = vae_ops.decode(comps.vae, x0).cpu()
            psnr, vae_psnr = vae_ops.psnr(rec, pixels), vae_ops.psnr(vae_only, pixels)
            latent_mse = ((x0_rec.cpu() - x0.cpu()) ** 2).flatten(1).mean(1)
            for j, item in enumerate(valid):
                row = shard.start + item.row
                name = _safe_id(ids[item.row], row)
                noise_path = out_dir / "noise" / f"{name}.safetensors"
                recon_path = out_dir / "reconstruction" / f"{name}.png"
                with atomic_path(noise_path, suffix=".safetensors") as tmp:
                    save_file({"latents": inverted.latents[j : j + 1].cpu().contiguous()}, str(tmp),
                              metadata={"smpo": settings, "prompt": item.prompt, "timestep": str(t)})  # fmt: skip
                with atomic_path(recon_path, suffix=".png") as tmp:
                    vae_ops.to_pil(rec[j : j + 1])[0].save(tmp, format="PNG")
                results.append({
                    "row": row, "id": name, "prompt": item.prompt, "timestep": t, **level,
                    "psnr_db": round(float(psnr[j]), 4), "vae_psnr_db": round(float(vae_psnr[j]), 4),
                    "latent_mse": float(latent_mse[j]),
                    "noise_std": float(inverted.latents[j].std()),
                    "noise": str(noise_path.relative_to(out_dir)), "reconstruction": str(recon_path.relative_to(out_dir)),
                })  # fmt: skip
        progress.update(task, advance=len(batch))
    store.write_sidecar(shard.index, {"shard": shard.index, "start": shard.start, "stop": shard.stop,
                                      "rows": table.num_rows, "kept": len(results), "skipped": skipped})  # fmt: skip
    if results:
        write_text(store.payload(shard.index), "".join(json.dumps(r) + "\n" for r in results))


def _pairs_shard(
    inverter: _Inverter, recipe, source, shard, cols, prompt_col, store: ShardStore, progress, task, *, signature: str
):
    from safetensors.torch import save_file

    from smpo_cli.models import vae as vae_ops

    comps, res, levels = inverter.comps, recipe.data.resolution, list(recipe.inversion.levels)
    table, loader = _decoded_batches(recipe, source, shard, cols, prompt_col)
    row_ids = table.column(ROW_COLUMN).to_pylist() if ROW_COLUMN in table.column_names else None
    dtype = getattr(torch, recipe.inversion.cache_dtype)
    parts: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("latents", "inverted", "rows", "original_size", "crop_top_left")
    }
    skipped = []
    for batch in loader:
        valid = [b for b in batch if b.skip_reason is None]
        skipped += [
            {"row": shard.start + b.row, "shard": shard.index, "reason": b.skip_reason}
            for b in batch
            if b.skip_reason
        ]
        if valid:
            pixels, sizes, crops, prompts = _prepare(valid, res)  # image_0, image_1 of each pair, interleaved
            ids = [row_ids[b.row] if row_ids else shard.start + b.row for b in valid]
            sample = recipe.data.latents == "sample"
            seeds = vae_ops.posterior_seeds(recipe.seed, ids) if sample else None
            x0 = vae_ops.encode(comps.vae, pixels, sample=sample, seeds=seeds)
            cond = inverter.cond(prompts, sizes, crops)
            inverted = inverter.invert_levels(x0, cond, levels)  # (2n, L, C, h, w)
            n = len(valid)
            parts["latents"].append(x0.cpu().reshape(n, 2, *x0.shape[1:]).to(dtype))
            parts["inverted"].append(inverted.cpu().reshape(n, 2, *inverted.shape[1:]).to(dtype))
            rows = [shard.start + b.row for b in valid]
            parts["rows"].append(
                torch.tensor([row_ids[b.row] if row_ids else r for b, r in zip(valid, rows, strict=True)])
            )
            parts["original_size"].append(torch.tensor(sizes).reshape(n, 2, 2))
            parts["crop_top_left"].append(torch.tensor(crops).reshape(n, 2, 2))
        progress.update(task, advance=len(batch))
    kept = sum(len(r) for r in parts["rows"])
    store.write_sidecar(shard.index, {"shard": shard.index, "start": shard.start, "stop": shard.stop,
                                      "rows": table.num_rows, "kept": kept, "skipped": skipped})  # fmt: skip
    if kept:
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
        meta = {"levels": levels, "resolution": res, "model": recipe.model.model_dump(mode="json"),
                "data_signature": signature,  # training checks that it reads the same table
                "inversion": recipe.inversion.model_dump(mode="json"), "family": comps.family,
                "prediction_type": comps.prediction_type, **inverter.cache_meta()}  # fmt: skip
        with atomic_path(store.payload(shard.index), suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"smpo": json.dumps(meta)})


def _check_resumed_signature(recipe: InvertRecipe, store: ShardStore, shard: int, signature: str) -> None:
    """Finished shards of another version of the table would pair old latents with the new rows' labels."""
    from safetensors import safe_open

    path = store.payload(shard)
    if not path.is_file():
        return
    with safe_open(str(path), "pt") as f:
        made_from = json.loads((f.metadata() or {}).get("smpo", "{}")).get("data_signature")
    if made_from is not None and made_from != signature:
        raise DataError(f"{recipe.output_dir}: its finished shards were inverted from another version of data.path "
                        f"{recipe.data.path} (the table changed since)", hint="rerun with --overwrite to invert the table as it is now")  # fmt: skip


def run_inversion(recipe: InvertRecipe) -> InvertResult:
    """Invert ``recipe.data`` (images or pairs) with ``recipe.model``; see the module docstring."""
    from rich.progress import TextColumn

    from smpo_cli.models import load_components
    from smpo_cli.utils.distributed import partial_state
    from smpo_cli.utils.progress import make_progress

    if recipe.plan is not None:  # the plan cache: the visits of one training run (smpo_cli.inversion.plan_cache)
        from smpo_cli.inversion.plan_cache import run_plan_inversion

        return run_plan_inversion(recipe)
    started = time.perf_counter()
    state = partial_state()
    source = open_source(recipe.data.path, recipe.data.split)
    layout = _layout(recipe, source)
    cols, prompt_col = _columns(recipe, source, layout)
    n = min(source.num_rows, recipe.data.limit) if recipe.data.limit else source.num_rows
    if n == 0:
        raise DataError(f"data.path {recipe.data.path}: the dataset has no rows")
    store = _store(recipe, layout)
    shards = store.plan(n, recipe.data.rows_per_shard)
    if state.is_main_process:
        store.write_fingerprint(fingerprint(recipe))
    done = {s.index for s in shards if store.is_done(s.index)}
    signature = data_signature(recipe.data.path, recipe.data.split) if layout == "pairs" else None
    if done and signature is not None:
        _check_resumed_signature(recipe, store, min(done), signature)
    mine = [s for s in store.mine(shards, state.process_index, state.num_processes) if s.index not in done]
    from smpo_cli.utils.distributed import stage_device

    device = stage_device(state, recipe.device)
    m = recipe.model
    comps = load_components(m.pretrained, family=m.family, vae=m.vae, unet=m.unet, config=m.config,
                            revision=m.revision, variant=m.variant, dtype=m.dtype, device=device)  # fmt: skip
    for module in (comps.denoiser, comps.vae, comps.text_encoder, comps.text_encoder_2, comps.text_encoder_3):
        if module is not None:
            module.requires_grad_(False).eval()
    inverter = _FlowInverter(recipe, comps) if comps.is_flow else _Inverter(recipe, comps)
    per_row = 2 if layout == "pairs" else 1
    todo = sum(s.stop - s.start for s in mine)
    logger.info("inverting %d %s in %d shards (%d done) with %s to levels %s on %s",
                n, layout, len(shards), len(done), recipe.inversion.method, recipe.inversion.levels, comps.device)  # fmt: skip
    work = functools.partial(_pairs_shard, signature=signature) if layout == "pairs" else _images_shard
    t0 = time.perf_counter()
    rate = TextColumn("{task.fields[rate]}")
    with make_progress(rate) as progress:
        task = progress.add_task(f"invert {layout}", total=todo, rate="")
        for shard in mine:
            inverter.start_shard(shard.index)
            work(inverter, recipe, source, shard, cols, prompt_col, store, progress, task)
            done_rows = progress.tasks[task].completed
            progress.update(
                task, rate=f"{per_row * done_rows / max(time.perf_counter() - t0, 1e-9):.2f} img/s"
            )
    seconds = time.perf_counter() - t0
    state.wait_for_everyone()
    calls_per_image = inverter.noise_estimates / max(inverter.images, 1)
    kept, rows = 0, 0
    for s in shards:
        side = store.read_sidecar(s.index) or {}
        kept += side.get("kept", 0)
        rows += side.get("rows", 0)
    skipped = store.merge_skipped(shards) if state.is_main_process else []
    result = InvertResult(
        output_dir=recipe.output_dir, layout=layout, rows=rows, inverted=kept, skipped=count_reasons(skipped),
        shards=len(shards), shards_resumed=len(done), levels=list(recipe.inversion.levels),
        unet_calls_per_image=round(calls_per_image, 3),
        images_per_second=round(inverter.images / max(seconds, 1e-9), 3), seconds=round(time.perf_counter() - started, 3),
    )  # fmt: skip
    if layout == "pairs":
        result.storage_bytes_per_pair = storage_per_pair(recipe)[0]
    elif state.is_main_process:
        lines = []
        for s in shards:
            if store.has_payload(s.index):
                lines += store.payload(s.index).read_text(encoding="utf-8").splitlines()
        records = [json.loads(x) for x in lines]
        write_text(Path(recipe.output_dir) / "results.jsonl", "".join(x + "\n" for x in lines))
        if records:
            psnr = np.array([r["psnr_db"] for r in records])
            result.reconstruction = {
                "psnr_db_mean": float(psnr.mean()), "psnr_db_min": float(psnr.min()),
                "vae_psnr_db_mean": float(np.mean([r["vae_psnr_db"] for r in records])),
                "latent_mse_mean": float(np.mean([r["latent_mse"] for r in records])),
                "per_image": records[:50],
            }  # fmt: skip
    if state.is_main_process:
        write_json(Path(recipe.output_dir) / "summary.json", result.to_dict())
    return result
