"""The plan cache: the inversions one training run will use, and nothing else.

``smpo invert plan.train_recipe=<train recipe>`` computes the run's visits
(:func:`smpo_cli.training.visit_plan.visit_plan`: step, global position, pair, t) and, micro-batch by micro-batch
exactly as training composes them, encodes both images (the same VAE posterior seeds), draws t (the same
``PairDraws``) and inverts them with the reference model to exactly t (``step._invert``, the online code).
Each shard ``plan/part-K.safetensors`` covers a range of optimiser steps and holds, for its N visits::

    positions      (N,)            global position in the data order (the lookup key)
    steps          (N,)            optimiser step (0-based)
    rows           (N,)            the pair's smpo_row (checked against the data order when training)
    t              (N,)            the pair's timestep
    latents        (N, 2, C, h, w) x0 of winner and loser, as training encodes them
    inverted       (N, 2, C, h, w) their inversions to exactly t
    original_size  (N, 2, 2)       SDXL time ids
    crop_top_left  (N, 2, 2)

``shards/fingerprint.json`` records the train settings the plan was made for; ``smpo train
inversion.source=plan`` refuses a cache planned for other settings, naming the first key that differs.
Shards are atomic and resumable, split across processes under ``accelerate launch``, as ``smpo invert``.

The cost arithmetic for ``--dry-run`` (:func:`cost_lines`) imports no framework.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from smpo_cli.errors import AssetNotFoundError, DataError, UsageError

PLAN_DIR = "plan"
PICKAPIC_PAIRS = 851_293  # Pick-a-Pic v2 train pairs without human ties (Diffusion-DPO, Wallace et al. 2024)
VISIT_SCALARS_BYTES = 4 * 8 + 2 * 2 * 2 * 8  # positions, steps, rows, t + original_size, crop_top_left (int64)


# ----------------------------------------------------------------------------- settings
def plan_fingerprint(recipe, pairs_per_step: int) -> dict[str, Any]:
    """The train settings a plan depends on, flat and named as overrides (``seed``, ``data.path``, ...)."""
    out: dict[str, Any] = {"seed": recipe.seed, "train.max_steps": recipe.train.max_steps,
                           "train.pairs_per_step": int(pairs_per_step),
                           "train.mixed_precision": recipe.train.mixed_precision}  # fmt: skip
    data = recipe.data.model_dump(mode="json", exclude={"num_workers"})
    data["path"] = str(Path(recipe.data.path).expanduser().resolve())
    out.update({f"data.{k}": v for k, v in data.items()})
    out.update({f"model.{k}": v for k, v in recipe.model.model_dump(mode="json").items()})
    inv = recipe.inversion.model_dump(mode="json", exclude={"source", "cache_path"})
    out.update({f"inversion.{k}": v for k, v in inv.items()})
    return out


def first_difference(planned: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    for key in sorted(set(planned) | set(wanted)):
        if planned.get(key) != wanted.get(key):
            return key
    return None


def planned_train_recipe(recipe):
    """The TrainRecipe an invert recipe's ``plan`` names, checked to be one a plan cache can serve."""
    from smpo_cli.config import load_recipe

    plan = recipe.plan
    train = load_recipe(plan.train_recipe, "train", list(plan.train_overrides)).recipe
    inv = train.inversion
    if train.method.name == "sft" or inv.source in ("none", "cache"):
        raise UsageError(f"plan.train_recipe={plan.train_recipe}: inversion.source={inv.source} "
                         f"(method {train.method.name}) uses no exact-t inversion to plan",
                         hint="plan a SmPO recipe with inversion.source=online or plan")  # fmt: skip
    if inv.timestep_mode != "exact" or inv.model != "reference":
        raise UsageError(f"plan.train_recipe={plan.train_recipe}: a plan cache holds exact-t inversions by the reference "
                         f"model; this recipe has inversion.timestep_mode={inv.timestep_mode}, inversion.model={inv.model}",
                         hint="add plan.train_overrides=[inversion.model=reference,inversion.timestep_mode=exact] "
                         "and train with the same overrides")  # fmt: skip
    same_data = Path(recipe.data.path).expanduser().resolve() == Path(train.data.path).expanduser().resolve()
    if not same_data or recipe.model.pretrained != train.model.pretrained:
        key = "data.path" if not same_data else "model.pretrained"
        mine, theirs = (recipe.data.path, train.data.path) if not same_data else (recipe.model.pretrained, train.model.pretrained)
        raise UsageError(f"plan: {key}={mine} but the train recipe {plan.train_recipe} has {key}={theirs}",
                         hint=f"set {key} the same in both (the plan uses the train recipe's data, model and inversion)")  # fmt: skip
    return train


def invert_fingerprint(recipe) -> dict[str, Any]:
    """What ``smpo invert`` in plan mode resumes on: the planned train settings and the storage settings."""
    from smpo_cli.training.visit_plan import pairs_per_step

    train = planned_train_recipe(recipe)
    return {"plan": plan_fingerprint(train, pairs_per_step(train, recipe.plan.processes)),
            "cache_dtype": recipe.inversion.cache_dtype, "steps_per_shard": recipe.plan.steps_per_shard}  # fmt: skip


# ----------------------------------------------------------------------------- reading (training)
class PlanCache:
    """Lookup by global position of the visits a plan cache holds (``PairExamples`` asks ``by_position``)."""

    by_position = True
    levels: list[int] = []  # noqa: RUF012 - the runner reads cache.levels (the level-cache's t choices); none here

    def __init__(self, root: str | Path) -> None:
        from safetensors import safe_open

        from smpo_cli.utils.shards import ShardStore

        self.root = Path(root)
        store = ShardStore(self.root, PLAN_DIR, ".safetensors")
        if not store.fingerprint_path.is_file():
            raise AssetNotFoundError(f"{self.root} holds no plan cache ({store.fingerprint_path.name} missing)",
                                     hint="write one with `smpo invert plan.train_recipe=<your train recipe>`")  # fmt: skip
        self.fingerprint = json.loads(store.fingerprint_path.read_text(encoding="utf-8"))
        planned = self.fingerprint["plan"]
        shards = store.plan(planned["train.max_steps"], self.fingerprint["steps_per_shard"])
        missing = [s.index for s in shards if not store.is_done(s.index)]
        if missing:
            raise DataError(f"plan cache {self.root} is incomplete: {len(missing)} of {len(shards)} shards missing "
                            f"(first part-{missing[0]:05d})", hint="rerun the same `smpo invert` command: it resumes")  # fmt: skip
        self._files = [store.payload(s.index) for s in shards if store.has_payload(s.index)]
        self._index: dict[int, tuple[int, int, int, int]] = {}  # position -> (file, i, row, step)
        for fi, path in enumerate(self._files):
            with safe_open(str(path), "pt") as f:
                cols = zip(f.get_tensor("positions").tolist(), f.get_tensor("rows").tolist(),
                           f.get_tensor("steps").tolist(), strict=True)  # fmt: skip
                for i, (pos, row, step) in enumerate(cols):
                    self._index[int(pos)] = (fi, i, int(row), int(step))
        self.skipped: dict[int, str] = {}
        for s in shards:
            for item in (store.read_sidecar(s.index) or {}).get("skipped", []):
                self.skipped[int(item["position"])] = item["reason"]
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._index)

    def check(self, recipe, pairs_per_step: int) -> None:
        """DataError naming the first setting this run has other than the one the plan was made for."""
        planned, wanted = self.fingerprint["plan"], plan_fingerprint(recipe, pairs_per_step)
        key = first_difference(planned, wanted)
        if key is not None:
            raise DataError(f"plan cache {self.root} was planned for {key}={planned.get(key)!r}, this run has "
                            f"{key}={wanted.get(key)!r}",
                            hint="train with the settings the plan was made for, or rebuild it with `smpo invert "
                            "plan.train_recipe=...` from this recipe")  # fmt: skip

    def visit(self, position: int, row: int) -> dict[str, Any]:
        """The stored tensors of the visit at ``position`` (winner first), or ``{"skip_reason": ...}``."""
        import torch
        from safetensors import safe_open

        if int(position) not in self._index:
            if int(position) in self.skipped:
                return {"skip_reason": f"position {position}: {self.skipped[int(position)]}"}
            raise DataError(f"position {position} is not in the plan cache {self.root} (planned for "
                            f"{self.fingerprint['plan']['train.max_steps']} steps of "
                            f"{self.fingerprint['plan']['train.pairs_per_step']} pairs)",
                            hint="a step skipped for a non-finite loss consumes positions beyond the plan: "
                            "rebuild the plan with more train.max_steps, or train online")  # fmt: skip
        fi, i, planned_row, step = self._index[int(position)]
        if planned_row != int(row):
            raise DataError(f"plan cache {self.root}: position {position} was planned for pair {planned_row}, "
                            f"the data order gives pair {row}", hint="the dataset changed: rebuild the plan cache")  # fmt: skip
        if fi not in self._handles:  # opened lazily, so a DataLoader worker opens its own
            self._handles[fi] = safe_open(str(self._files[fi]), "pt")
        f = self._handles[fi]
        out = {name: f.get_slice(name)[i] for name in ("latents", "inverted", "original_size", "crop_top_left")}
        out["latents"], out["inverted"] = out["latents"].float(), out["inverted"].float()
        out["plan_t"] = f.get_slice("t")[i : i + 1][0]
        out["plan_step"] = torch.tensor(step)
        return out

    def __getstate__(self) -> dict[str, Any]:  # picklable for DataLoader workers
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def open_plan_cache(recipe) -> PlanCache:
    """The plan cache of a ``source=plan`` train recipe, checked against this run's settings (and its global
    batch as the runner computes it: processes from accelerate, a resumed checkpoint's pairs per step)."""
    from accelerate import PartialState

    from smpo_cli.training.batching import plan_batches
    from smpo_cli.training.checkpoint import resolve_resume

    cache = PlanCache(Path(recipe.inversion.cache_path))
    resume_from = resolve_resume(Path(recipe.output_dir), recipe.train.resume)
    saved = json.loads((resume_from / "state.json").read_text()) if resume_from is not None else None
    cache.check(recipe, plan_batches(recipe, PartialState().num_processes, saved).pairs_per_step)
    return cache


# ----------------------------------------------------------------------------- writing (smpo invert)
def _both(value, P: int):
    """(P, 2, ...) -> (2P, ...), winners first: micro_batch_loss's order."""
    return value.transpose(0, 1).reshape(2 * P, *value.shape[2:])


def _pairs(x, P: int, dtype):
    """(2P, ...) winners first -> (P, 2, ...) on the CPU in the cache dtype."""
    return x.detach().cpu().reshape(2, P, *x.shape[1:]).transpose(0, 1).to(dtype).contiguous()


def run_plan_inversion(recipe):
    """``smpo invert`` with ``plan``: invert every visit of the planned run; see the module docstring."""
    import contextlib

    import torch
    from rich.progress import TextColumn
    from safetensors.torch import save_file

    from smpo_cli.inversion.runner import InvertResult
    from smpo_cli.inversion.schedule import NoiseSchedule, inversion_path
    from smpo_cli.models import load_components
    from smpo_cli.models import vae as vae_ops
    from smpo_cli.training.data import PairExamples, collate, epoch_order, load_pair_table
    from smpo_cli.training.step import PairDraws, StepModels, _cond, _invert, _sample_t, make_grid
    from smpo_cli.training.visit_plan import pairs_per_step
    from smpo_cli.utils.atomic import atomic_path, write_json
    from smpo_cli.utils.distributed import partial_state, stage_device
    from smpo_cli.utils.progress import make_progress
    from smpo_cli.utils.shards import ShardStore, count_reasons

    started = time.perf_counter()
    state = partial_state()
    train = planned_train_recipe(recipe)
    G, B = pairs_per_step(train, recipe.plan.processes), train.train.batch_size
    table = load_pair_table(train)
    store = ShardStore(Path(recipe.output_dir), PLAN_DIR, ".safetensors")
    shards = store.plan(train.train.max_steps, recipe.plan.steps_per_shard)  # Shard.start/stop: optimiser steps
    fp = invert_fingerprint(recipe)
    if state.is_main_process:
        store.write_fingerprint(fp)
    done = {s.index for s in shards if store.is_done(s.index)}
    mine = [s for s in store.mine(shards, state.process_index, state.num_processes) if s.index not in done]
    device = stage_device(state, recipe.device)
    m, mp = train.model, train.train.mixed_precision
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
    comps = load_components(m.pretrained, family=m.family, vae=m.vae, unet=m.unet, config=m.config,
                            revision=m.revision, variant=m.variant,
                            dtype=m.dtype if m.dtype != "auto" else str(weight_dtype).removeprefix("torch."),
                            device=str(device))  # fmt: skip
    if comps.is_flow:  # flow models invert online, inside smpo train (smpo_cli/inversion/flow.py)
        raise UsageError(
            f"smpo invert plan.train_recipe: {m.pretrained} is a flow-matching model ({comps.family}); the plan cache "
            "serves SD1.5/SDXL only",
            hint="for flow models use inversion.source=online or an smpo invert cache (inversion.source=cache)",
        )
    for module in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
        if module is not None:
            module.requires_grad_(False).eval()
    ref = comps.unet
    if mp == "no" and next(ref.parameters()).dtype != torch.float32:
        ref.to(torch.float32)  # as the runner's frozen reference without autocast
    dev = torch.device(device)

    def autocast():  # accelerate's autocast for these mixed-precision settings
        if mp == "no":
            return contextlib.nullcontext()
        return torch.autocast(device_type=dev.type, dtype=weight_dtype)

    schedule = NoiseSchedule.from_scheduler(comps.scheduler, comps.prediction_type)
    models = StepModels(train, comps, ref, ref, ref, schedule, grid=make_grid(train, schedule), autocast=autocast)
    examples = PairExamples(train, table, None)
    dtype = getattr(torch, recipe.inversion.cache_dtype)
    n = len(table.rows)
    estimates_per_step = 1 + train.inversion.renoise_iterations
    images = estimates = 0
    t0 = time.perf_counter()
    with make_progress(TextColumn("{task.fields[rate]}")) as progress:
        task = progress.add_task("invert plan", total=sum(s.stop - s.start for s in mine) * G, rate="")
        for shard in mine:
            micro = []  # (step, [(position, index)]) per global micro-batch, as training composes them
            orders: dict = {}
            for step in range(shard.start, shard.stop):
                for j in range(G // B):
                    batch = []
                    for pos in range(step * G + j * B, step * G + (j + 1) * B):
                        epoch, k = divmod(pos, n)
                        if epoch not in orders:
                            orders = {epoch: epoch_order(table, train.seed, epoch)}
                        batch.append((pos, int(orders[epoch][k])))
                    micro.append((step, batch))
            loader = torch.utils.data.DataLoader(examples, batch_sampler=[b for _, b in micro], collate_fn=collate,
                                                 num_workers=train.data.num_workers)  # fmt: skip
            parts: dict[str, list] = {k: [] for k in ("positions", "steps", "rows", "t", "latents", "inverted",
                                                      "original_size", "crop_top_left")}  # fmt: skip
            skipped = []
            for (step, wanted), batch in zip(micro, loader, strict=True):
                got = set(batch["position"].tolist()) if batch["size"] else set()
                reason = (batch.get("skip_reason") or ["bad image"])[0]  # collate keeps the first reason only
                skipped += [{"position": pos, "step": step, "row": int(table.row_ids[idx]), "reason": reason}
                            for pos, idx in wanted if pos not in got]  # fmt: skip
                if batch["size"]:
                    P = batch["size"]

                    draws = PairDraws(train.seed, step, batch["position"].tolist())
                    sample = train.data.latents == "sample"
                    x0 = vae_ops.encode(comps.vae, _both(batch["pixels"], P).to(dev), sample=sample,
                                        seeds=draws.image_seeds() if sample else None)  # fmt: skip
                    cond = _cond(models, list(batch["prompt"]) * 2, _both(batch["original_size"], P),
                                 _both(batch["crop_top_left"], P), dev)  # fmt: skip
                    t_pair = _sample_t(models, draws)
                    with torch.no_grad():
                        x_t, _, _ = _invert(models, x0, cond, t_pair.repeat(2), dev)
                    parts["latents"].append(_pairs(x0, P, dtype))
                    parts["inverted"].append(_pairs(x_t, P, dtype))
                    parts["positions"].append(batch["position"])
                    parts["steps"].append(torch.full((P,), step, dtype=torch.long))
                    parts["rows"].append(batch["row"])
                    parts["t"].append(t_pair.long())
                    parts["original_size"].append(batch["original_size"])
                    parts["crop_top_left"].append(batch["crop_top_left"])
                    images += 2 * P
                    estimates += 2 * sum((len(inversion_path(int(t), models.grid)) - 1) * estimates_per_step
                                         for t in t_pair.tolist())  # fmt: skip
                progress.update(task, advance=len(wanted),
                                rate=f"{images / max(time.perf_counter() - t0, 1e-9):.2f} img/s")  # fmt: skip
            kept = sum(len(x) for x in parts["positions"])
            store.write_sidecar(shard.index, {"shard": shard.index, "steps": [shard.start, shard.stop],
                                              "visits": (shard.stop - shard.start) * G, "kept": kept,
                                              "skipped": skipped})  # fmt: skip
            if kept:
                tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
                meta = {"plan": fp["plan"], "steps": [shard.start, shard.stop], "family": comps.family,
                        "prediction_type": comps.prediction_type}  # fmt: skip
                with atomic_path(store.payload(shard.index), suffix=".safetensors") as tmp:
                    save_file(tensors, str(tmp), metadata={"smpo": json.dumps(meta)})
    seconds = time.perf_counter() - t0
    state.wait_for_everyone()
    kept = sum((store.read_sidecar(s.index) or {}).get("kept", 0) for s in shards)
    skipped = store.merge_skipped(shards) if state.is_main_process else []
    channels = int(comps.vae.config.latent_channels)
    factor = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    side = train.data.resolution // factor
    per_visit = 4 * channels * side * side * dtype.itemsize + VISIT_SCALARS_BYTES
    result = InvertResult(
        output_dir=recipe.output_dir, layout="plan", rows=train.train.max_steps * G, inverted=kept,
        skipped=count_reasons(skipped), shards=len(shards), shards_resumed=len(done), levels=[],
        unet_calls_per_image=round(estimates / max(images, 1), 3),
        images_per_second=round(images / max(seconds, 1e-9), 3), seconds=round(time.perf_counter() - started, 3),
        storage_bytes_per_pair=per_visit,
    )  # fmt: skip
    if state.is_main_process:
        write_json(Path(recipe.output_dir) / "summary.json", result.to_dict())
    return result


# ----------------------------------------------------------------------------- costs (--dry-run, no torch)
def _expected_inverse_steps(num_steps: int, T: int = 1000) -> float:
    """Mean inverse DDIM steps per image to an exact t drawn uniformly from [0, T) on the trailing grid."""
    from smpo_cli.inversion.schedule import inversion_grid, inversion_path

    grid = inversion_grid(num_steps, T)
    return sum(len(inversion_path(t, grid)) - 1 for t in range(T)) / T


def _dataset_pairs(train) -> tuple[int, str]:
    path = Path(train.data.path).expanduser()
    if path.exists():
        try:
            import pyarrow.parquet as pq

            files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
            rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
            if rows:
                rows = min(rows, train.data.max_pairs or rows)
                return rows, f"{rows:,} pairs: rows in data.path, before dropping ties"
        except Exception:  # noqa: BLE001 - a size probe never breaks a dry run
            pass
    rows = min(PICKAPIC_PAIRS, train.data.max_pairs or PICKAPIC_PAIRS)
    return rows, f"{rows:,} pairs: Pick-a-Pic v2 without ties (data.path not found; assumed)"


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def cost_lines(train, processes: int | None = None, cache_dtype: str = "float16") -> list[str]:
    """UNet forwards (one latent through the UNet) and bytes on disk of one training run: online exact-t
    inversion vs the full cache (every level of every pair) vs the plan cache (the run's visits only)."""
    from smpo_cli.inversion.storage import latent_geometry

    if processes is None:
        processes = int(os.environ.get("WORLD_SIZE") or 8)
    t = train.train
    if t.global_batch_size is not None:
        G, how = t.global_batch_size, "train.global_batch_size"
    else:
        G, how = t.batch_size * t.grad_accum_steps * processes, f"{processes} processes"
    visits = t.max_steps * G
    channels, factor, where = latent_geometry(train)
    side = train.data.resolution // factor
    latent = channels * side * side * {"float16": 2, "bfloat16": 2, "float32": 4}[cache_dtype]
    inv = train.inversion
    per_step = 1 + inv.renoise_iterations
    inv_per_visit = 2 * _expected_inverse_steps(inv.num_steps) * per_step  # both images, mean over t
    train_per_visit = 2 * 2  # policy + reference on both images
    pairs, pairs_note = _dataset_pairs(train)
    touched = min(visits, pairs)
    full_build = pairs * 2 * inv.num_steps * per_step  # every pair to the top level, keeping every grid level
    full_pair = 2 * (1 + inv.num_steps) * latent
    plan_visit = 4 * latent + VISIT_SCALARS_BYTES
    f = lambda x: f"{x:,.0f}"  # noqa: E731
    return [
        f"inversion costs of this run: {t.max_steps} steps x {G:,} pairs ({how}) = {visits:,} pair visits; "
        f"{channels}x{side}x{side} latents ({where}); UNet forwards count one latent through the UNet",
        f"  online (exact t): {f(visits * (inv_per_visit + train_per_visit))} UNet forwards "
        f"({f(visits * inv_per_visit)} inverting, {inv_per_visit / 2:.1f} per image), 0 B on disk",
        f"  full cache ({inv.num_steps} levels x {pairs_note}): {f(full_build)} UNet forwards to build + "
        f"{f(visits * train_per_visit)} training; {_size(pairs * full_pair)} on disk in {cache_dtype} "
        f"({_size(full_pair)} per pair; {_size(touched * full_pair)} for the {touched:,} pairs this run touches)",
        f"  plan cache (the {visits:,} visits, 2 x0 + 2 x_t each): {f(visits * inv_per_visit)} UNet forwards to "
        f"build + {f(visits * train_per_visit)} training; {_size(visits * plan_visit)} on disk in {cache_dtype} "
        f"({_size(plan_visit)} per visit)",
    ]
