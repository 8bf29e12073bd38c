"""What a run would do, for ``--dry-run`` and ``smpo recipe validate``: no weights, no network.

Each line is (level, text); level "warn" marks inputs that do not exist yet, or settings the real run
would refuse. Nothing here downloads or loads a weight, but a train plan may import torch and diffusers:
the inversion cost lines of a train recipe (and of an invert recipe's plan cache) read the noise schedule
with torch, and ``smpo train --dry-run`` adds the memory plan (``smpo_cli.training.memory``), which builds
the UNet on torch's meta device with diffusers and measures a training step there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

TINY_NAMES = ("tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux")


def describe_model_ref(ref: str) -> tuple[str, str]:
    """Classify a model reference without loading it: (level, description)."""
    if ref in TINY_NAMES:
        return "ok", "embedded tiny model (built locally on first use)"
    if ref == "shapes-sd15":
        return "ok", "the shapes testbed's base model, shipped with smpo"
    if ref == "shapes-sd15-miscaptioned":
        return "ok", "the shapes testbed's miscaptioned base model (colours named by their partners), shipped with smpo"
    if ref == "shapes-sd15-miscaptioned-clip":
        return "ok", "the miscaptioned shapes base with a frozen CLIP-pretrained text encoder, shipped with smpo"
    path = Path(ref).expanduser()
    if path.is_dir():
        return "ok", "local folder"
    if path.is_file():
        return "ok", "single-file checkpoint"
    looks_local = ref.startswith(("/", "./", "../", "~")) or path.suffix in (".safetensors", ".ckpt", ".pt") or ref.count("/") != 1
    if looks_local:
        return "warn", "local path that does not exist yet"
    try:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model_index.json", "config.json"):
            cached = try_to_load_from_cache(ref, filename)
            if isinstance(cached, str):
                return "ok", "hub id, in the local Hugging Face cache"
    except Exception:  # noqa: BLE001 - a cache probe must never break a dry run
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline:
        return "warn", "hub id, not in the local cache and HF_HUB_OFFLINE is set"
    return "ok", "hub id (downloaded on first use if not cached)"


def describe_local_input(ref: str) -> tuple[str, str]:
    from smpo_cli.generation.prompts import SHAPES_PROMPT_SETS

    if ref in SHAPES_PROMPT_SETS:
        return "ok", SHAPES_PROMPT_SETS[ref]
    path = Path(ref).expanduser()
    if path.exists():
        return "ok", "exists"
    return "warn", "does not exist yet"


def _model_lines(model: BaseModel, prefix: str) -> list[tuple[str, str]]:
    lines = []
    for key in ("pretrained", "unet", "vae", "config"):
        ref = getattr(model, key, None)
        if ref:
            level, what = describe_model_ref(ref)
            lines.append((level, f"{prefix}.{key} = {ref}: {what}"))
    return lines


def _flow_invert_lines(recipe: Any) -> list[tuple[str, str]]:
    """smpo invert on an SD3 / FLUX.1 model (family read from the files, no weights): what its levels mean and
    the settings the run would refuse."""
    try:
        from smpo_cli.models.loading import detect_family

        family = detect_family(recipe.model.pretrained, revision=recipe.model.revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - an unknown or remote model: no flow lines
        return []
    if family not in ("sd3", "flux"):
        return []
    inv = recipe.inversion
    sigmas = ", ".join(f"{t / 1000:g}" for t in inv.levels)
    how = "inverse Euler" if inv.method == "ddim" else "flow ReNoise"
    lines = [("ok", f"{family} (flow matching): level t is the noise level s = t / 1000 (s = {sigmas}); {how}, "
                    "Euler back (images); pairs: each level inverted separately, as online training does")]  # fmt: skip
    if inv.noise_regularization or inv.guidance_scale is not None or min(inv.levels) < 1:
        lines.append(("warn", f"{family}: the run refuses inversion.noise_regularization, inversion.guidance_scale "
                              "and level 0"))  # fmt: skip
    return lines


def plan_lines(recipe: BaseModel, memory: Any = None) -> list[tuple[str, str]]:
    """Human-readable plan of a validated recipe.

    ``memory``: a :class:`smpo_cli.training.memory.MemoryRequest` adds a train recipe's memory plan
    (parameter counts and GPU memory per process; imports torch and diffusers, loads no weight). None:
    the request ``smpo train`` set with ``smpo_cli.training.memory.requested``, if any (``smpo recipe validate`` sets none).
    """
    data: Any = recipe
    lines: list[tuple[str, str]] = [("ok", f"stage: {data.stage}")]
    out = Path(data.output_dir)
    if out.exists() and any(out.iterdir()):
        lines.append(("warn", f"output_dir = {out}: not empty (needs --overwrite or a resume)"))
    else:
        lines.append(("ok", f"output_dir = {out}"))
    if getattr(data, "model", None) is not None:
        lines.extend(_model_lines(data.model, "model"))
    if hasattr(data, "data") and getattr(data.data, "path", None):
        level, what = describe_local_input(data.data.path)
        lines.append((level, f"data.path = {data.data.path}: {what}"))
    if data.stage == "score":
        rw = data.reward
        src = rw.path or "official weights"
        lines.append(("ok", f"reward: {rw.name} ({src}), {rw.batch_size} pairs per batch, dtype {rw.dtype}"))
        if rw.path and rw.path != "tiny":
            level, what = describe_model_ref(rw.path)
            lines.append((level, f"reward.path = {rw.path}: {what}"))
        output = rw.output or ("cosine" if rw.name == "pickscore" else "the model's default output")
        if rw.normalization == "dataset" or (rw.r_min is None and not (rw.name == "pickscore" and output == "cosine")):
            norm = "min/max of this dataset's scores (second pass)"
        else:
            lo, hi = (rw.r_min, rw.r_max) if rw.r_min is not None else ("0.1154 (official)", "0.2820 (official)")
            norm = f"fixed r_min={lo}, r_max={hi}"
        lines.append(("ok", f"p from {output}, normalisation: {norm}"))
        lines.append(("ok", f"shards of {data.data.rows_per_shard} rows; ties {'dropped' if data.data.drop_ties else 'kept'}"))
    if data.stage == "invert" and getattr(data, "plan", None) is not None:
        from smpo_cli.config import load_recipe
        from smpo_cli.inversion.plan_cache import cost_lines

        train = load_recipe(data.plan.train_recipe, "train", list(data.plan.train_overrides)).recipe
        lines.append(("ok", f"plan cache: the visits of train recipe {data.plan.train_recipe} (its model, data and "
                            f"inversion settings; this recipe's inversion.method/levels/num_steps are not used), "
                            f"{data.plan.steps_per_shard} steps per shard"))  # fmt: skip
        lines.extend(("ok", x) for x in cost_lines(train, data.plan.processes, data.inversion.cache_dtype))
    elif data.stage == "invert":
        inv = data.inversion
        steps = f"{inv.num_steps}-level grid"
        how = "DDIM" if inv.method == "ddim" else f"ReNoise, {inv.renoise_iterations} iteration(s), window {inv.average_window}"
        lines.append(("ok", f"inversion: {how}, {steps}, levels {inv.levels}"))
        lines.extend(_flow_invert_lines(data))
        from smpo_cli.inversion.storage import storage_per_pair

        per_pair, where = storage_per_pair(recipe)
        lines.append(("ok", f"training cache (pairs layout): {per_pair / 1024:.1f} KiB per pair in {inv.cache_dtype}, "
                            f"{per_pair * 1e6 / 2**30:.1f} GiB per million pairs (latent size from {where})"))  # fmt: skip
    if data.stage == "generate":
        level, what = describe_local_input(data.prompts.path)
        lines.append((level, f"prompts.path = {data.prompts.path}: {what}"))
        if data.model.lora:
            level, what = describe_local_input(data.model.lora)
            lines.append((level, f"model.lora = {data.model.lora}: {what}"))
        sp = data.sampling
        lines.append(("ok", f"{sp.images_per_prompt} image(s) per prompt, {sp.num_inference_steps} steps, "
                            f"guidance {sp.guidance_scale}, layout {data.layout}"))  # fmt: skip
    if data.stage == "geneval":
        for key in ("metadata", "images"):
            ref = getattr(data, key)
            if ref is not None and not ref.startswith("hf://"):
                level, what = describe_local_input(ref)
                lines.append((level, f"{key} = {ref}: {what}"))
        det = data.detector
        lines.append(("ok", f"detector: {det.backend} backend, {det.path or 'facebook/mask2former-swin-small-coco-instance'}"))
        lines.append(("ok", f"colour judge: {data.colour.path or 'openai/clip-vit-large-patch14'}; rules: threshold "
                            f"{data.rules.threshold} (counting {data.rules.counting_threshold}), position margin "
                            f"{data.rules.position_threshold}"))  # fmt: skip
        if data.model is not None:
            sp = data.sampling
            n = f"the first {data.limit}" if data.limit else "all"
            lines.append(("ok", f"generate {n} prompts x {sp.images_per_prompt} images, {sp.num_inference_steps} steps, "
                                f"guidance {sp.guidance_scale}"))  # fmt: skip
    if data.stage == "shapes_pretrain":
        # step costs measured on 2 CPU cores at batch 64 (shapes-feasibility): VAE ~0.33 s, UNet ~0.31 s
        minutes = (data.vae.steps * 0.33 * data.vae.batch_size / 64 + data.unet.steps * 0.31 * data.unet.batch_size / 64) / 60
        te = data.text_encoder
        what = "UNet + text encoder" if te.training == "joint" else "UNet (text encoder frozen)"
        lines.append(("ok", f"{data.data.images} scenes of {data.data.size}px; VAE {data.vae.steps} steps, {what} "
                            f"{data.unet.steps} steps: about {minutes:.0f} min on 2 CPU cores"))  # fmt: skip
        if te.training == "contrastive":
            lines.append(("ok", f"text encoder: CLIP-pretrained {te.steps} steps x {te.batch_size} on true captions, then frozen"))
    if data.stage == "pairs":
        level, what = describe_local_input(data.prompts.path)
        lines.append((level, f"prompts.path = {data.prompts.path}: {what}"))
        sp, pr = data.sampling, data.pairing
        lines.append(("ok", f"{sp.images_per_prompt} images per prompt, {sp.num_inference_steps} steps, guidance {sp.guidance_scale}; "
                            f"pairing {pr.strategy}" + (f", min margin {pr.min_margin:g}" if pr.min_margin else "")))  # fmt: skip
        for r in data.rewards:
            lines.append(("ok", f"reward {r.prefix}: {r.name} ({r.path or 'official weights'}), weight {r.weight:g}"))
        lines.append(("ok", f"pairs written with prefix {data.pair_prefix} (smpo train data.reward={data.pair_prefix})"))
    if data.stage == "shapes_reward":
        for spec in data.samples:
            lines.append(("ok", f"samples: {spec.model}, {spec.captions} captions x {spec.images_per_caption} images "
                                f"(guidance {spec.guidance_scale}), every pair voted on"))  # fmt: skip
        lines.append(("ok", f"CLIP width {data.net.width}, {data.net.vision_layers}+{data.net.text_layers} layers, "
                            f"patch {data.net.patch_size}; contrastive {data.contrastive.steps} steps x "
                            f"{data.contrastive.batch_size}, votes {data.votes.steps} steps x {data.votes.batch_size} pairs"))  # fmt: skip
    if data.stage == "train":
        t, o = data.train, data.optim
        per_process = t.batch_size * t.grad_accum_steps
        lines.append(("ok", f"method: {data.method.name}, labels: {data.data.labels}, inversion: {data.inversion.source}"))
        lines.append(
            ("ok", f"pairs per optimiser step per process: {per_process} (x number of processes)")
        )
        lr = f"{o.lr:g} x {per_process} x processes" if o.scale_lr else f"{o.lr:g}"
        lines.append(("ok", f"optimiser: {o.name}, lr {lr}, {t.max_steps} steps, {t.mixed_precision} precision"))
        if data.inversion.source in ("cache", "plan") and data.inversion.cache_path:
            level, what = describe_local_input(data.inversion.cache_path)
            lines.append((level, f"inversion.cache_path = {data.inversion.cache_path}: {what}"))
        if data.method.name != "sft" and data.inversion.source != "none":
            from smpo_cli.inversion.plan_cache import cost_lines

            lines.extend(("ok", x) for x in cost_lines(data))
        from smpo_cli.training import memory as memory_plan

        request = memory if memory is not None else memory_plan.current_request()
        if request is not None:
            from smpo_cli.errors import SmpoError

            try:
                estimate = memory_plan.plan_memory(recipe, accelerate_config=request.accelerate_config)
            except SmpoError:
                raise
            except Exception as exc:  # noqa: BLE001 - an estimate must never break a dry run
                lines.append(("warn", f"memory plan failed: {type(exc).__name__}: {exc}"))
            else:
                lines.extend(memory_plan.plan_lines(estimate, request.gpu_memory_gib))
    return lines
