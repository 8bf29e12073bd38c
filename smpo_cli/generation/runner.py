"""``run_generation(recipe)``: sample a prompt set, one deterministic seed per (prompt, sample index).

Image k of prompt i is drawn from its own CPU generator seeded with (seed, i, k), so its noise does not
depend on the batch size, the device count or which images already exist. Batches are fixed slices of the
whole (prompt, sample) grid, so an image is always computed in the same batch: a killed and resumed run (a
batch with any image missing is drawn again whole), and a run under ``accelerate launch`` (process r takes
batches r, r+N, ...), give the same pixels as one uninterrupted process; another batch_size changes pixels
only by float rounding (at most one 8-bit level). Every file is written atomically. ``metadata.jsonl`` (flat layout) records, per image, its file,
prompt, seed and the sampling settings; the GenEval layout writes the prompt's metadata line beside
its samples, as GenEval's evaluator expects.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smpo_cli.config.schema import GenerateRecipe
from smpo_cli.generation.prompts import PromptRecord, load_prompts
from smpo_cli.utils.atomic import atomic_path, write_json, write_text
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass
class GenerateResult:
    output_dir: str
    prompts: int
    images: int
    generated: int
    skipped_existing: int
    images_per_second: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def image_path(recipe: GenerateRecipe, prompt_index: int, sample_index: int) -> Path:
    root = Path(recipe.output_dir)
    if recipe.layout == "geneval":
        return root / f"{prompt_index:05d}" / "samples" / f"{sample_index:04d}.png"
    return root / "images" / f"{prompt_index:05d}_{sample_index:02d}.png"


def fingerprint(recipe: GenerateRecipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json", include={"seed", "layout", "model", "prompts", "sampling"}, exclude={"sampling": {"batch_size"}})


def resume_ok(recipe: GenerateRecipe) -> bool:
    from smpo_cli.utils.shards import ShardStore

    return ShardStore(Path(recipe.output_dir), "images", ".png", sidecar_dir=".smpo").check_fingerprint(
        fingerprint(recipe), recipe.output_dir
    )


def _metadata_lines(recipe: GenerateRecipe, prompts: list[PromptRecord]) -> list[dict[str, Any]]:
    s = recipe.sampling
    settings = {"model": recipe.model.pretrained, "lora": recipe.model.lora, "steps": s.num_inference_steps,
                "guidance_scale": s.guidance_scale, "scheduler": s.scheduler, "height": s.height, "width": s.width,
                "negative_prompt": s.negative_prompt}  # fmt: skip
    lines = []
    for rec in prompts:
        for k in range(s.images_per_prompt):
            lines.append({"file": str(image_path(recipe, rec.index, k).relative_to(recipe.output_dir)),
                          "prompt_index": rec.index, "sample_index": k, "prompt": rec.prompt,
                          "seed": image_seed(recipe.seed, rec.index, k), **settings,
                          "prompt_metadata": rec.metadata})  # fmt: skip
    return lines


def run_generation(recipe: GenerateRecipe) -> GenerateResult:
    import torch

    from smpo_cli.models import load_components
    from smpo_cli.utils.distributed import partial_state
    from smpo_cli.utils.progress import make_progress
    from smpo_cli.utils.shards import ShardStore

    started = time.perf_counter()
    state = partial_state()
    prompts = load_prompts(recipe.prompts.path, column=recipe.prompts.column, limit=recipe.prompts.limit)
    store = ShardStore(Path(recipe.output_dir), "images", ".png", sidecar_dir=".smpo")
    if state.is_main_process:
        store.write_fingerprint(fingerprint(recipe))
    s = recipe.sampling
    grid = [(p, k) for p in prompts for k in range(s.images_per_prompt)]
    batches = [grid[i : i + s.batch_size] for i in range(0, len(grid), s.batch_size)]
    mine = [b for i, b in enumerate(batches) if i % state.num_processes == state.process_index]
    todo = [b for b in mine if not all(image_path(recipe, p.index, k).exists() for p, k in b)]
    jobs = [job for b in todo for job in b]
    existing = sum(len(b) for b in mine) - len(jobs)
    generated = 0
    gen_seconds = 0.0
    if jobs:
        from smpo_cli.utils.distributed import stage_device

        device = stage_device(state, recipe.device)
        m = recipe.model
        comps = load_components(m.pretrained, family=m.family, vae=m.vae, unet=m.unet, config=m.config,
                                revision=m.revision, variant=m.variant, dtype=m.dtype, device=device)  # fmt: skip
        pipe = comps.pipeline(scheduler=s.scheduler)
        if m.lora:
            pipe.load_lora_weights(m.lora)
            pipe.fuse_lora(lora_scale=m.lora_scale)
        pipe.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        with make_progress() as progress:
            task = progress.add_task("generate", total=len(jobs))
            for batch in todo:
                generators = [torch.Generator("cpu").manual_seed(image_seed(recipe.seed, p.index, k)) for p, k in batch]
                kwargs = {"negative_prompt": [s.negative_prompt] * len(batch)} if s.negative_prompt else {}
                images = pipe(prompt=[p.prompt for p, _ in batch], generator=generators,
                              num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                              height=s.height, width=s.width, output_type="pil", **kwargs).images  # fmt: skip
                for (p, k), img in zip(batch, images, strict=True):
                    with atomic_path(image_path(recipe, p.index, k), suffix=".png") as tmp:
                        img.save(tmp, format="PNG")
                generated += len(batch)
                progress.update(task, advance=len(batch))
        gen_seconds = time.perf_counter() - t0
    state.wait_for_everyone()
    if state.is_main_process:
        root = Path(recipe.output_dir)
        lines = _metadata_lines(recipe, prompts)
        if recipe.layout == "geneval":
            for rec in prompts:
                write_text(root / f"{rec.index:05d}" / "metadata.jsonl", json.dumps(rec.metadata or {"prompt": rec.prompt}) + "\n")
        write_text(root / "metadata.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    result = GenerateResult(
        output_dir=recipe.output_dir, prompts=len(prompts), images=len(prompts) * s.images_per_prompt,
        generated=generated, skipped_existing=existing,
        images_per_second=round(generated / gen_seconds, 3) if gen_seconds else 0.0,
        seconds=round(time.perf_counter() - started, 3),
    )  # fmt: skip
    if state.is_main_process:
        write_json(Path(recipe.output_dir) / "summary.json", result.to_dict())
    return result
