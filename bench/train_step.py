"""Training-step cost: Diffusion-DPO vs SmPO (online inversion, cached inversion) vs the official-style step.

One optimiser step (forward, backward, AdamW) on the same random-weight UNet, the same batch of latent
pairs and prompts, on one machine; the variants are interleaved round by round and the table reports
median ms per step, UNet calls per step and the ratios the targets are about:

  cache_vs_dpo        SmPO from the `smpo invert` cache / Diffusion-DPO        (target <= 1.15)
  online_vs_official  SmPO online (exact t, ReNoise K=1, reference UNet, 5 levels)
                      / the official-style step (the official loop under diffusers 0.20.0:
                      5-entry leading grid, K=1, policy inversion to the grid level at or
                      above t, smpo_cli.inversion.official)                      (target <= 1.0)

    python bench/train_step.py                 # CPU, ~25M-parameter SD1.5-layout UNet, 32x32 latents
    python bench/train_step.py --json
    python bench/train_step.py --device cuda --size sd15      # SD1.5-size UNet at 64x64 latents (GPU)

Flow-matching families (``--family sd3|flux``, smpo_cli.training.flow_step): Diffusion-DPO vs SmPO online
(flow ReNoise to exactly s, K=1, 5 steps, reference transformer) vs SmPO from the cache, on an SD3 / FLUX.1
transformer (``--size tiny``: the embedded tiny-sd3 / tiny-flux one; ``mid``: ~10M parameters, 16x32x32
latents, 256 tokens) with a fixed random prompt embedding; reports cache_vs_dpo (target <= 1.15) and
online_vs_dpo (there is no official flow code to compare with).

    python bench/train_step.py --family sd3    # CPU, mid-size SD3 transformer
    python bench/train_step.py --family flux --size tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

SIZES = {
    # name: (block_out_channels, layers_per_block, cross_attention_dim, latent side)
    "mid": ((128, 256, 256), 1, 256, 32),
    "sd15": ((320, 640, 1280, 1280), 2, 768, 64),
}
# flow transformers: the tiny model's own config, updated with these (None: unchanged); latent side
FLOW_SIZES = {
    "sd3": {"tiny": (None, 16), "mid": ({"num_layers": 6, "num_attention_heads": 8, "attention_head_dim": 32,
                                         "joint_attention_dim": 256, "caption_projection_dim": 256,
                                         "pooled_projection_dim": 128, "dual_attention_layers": ()}, 32)},
    "flux": {"tiny": (None, 16), "mid": ({"num_layers": 2, "num_single_layers": 4, "num_attention_heads": 4,
                                          "attention_head_dim": 64, "axes_dims_rope": (16, 24, 24),
                                          "joint_attention_dim": 256, "pooled_projection_dim": 128}, 32)},
}  # fmt: skip
FLOW_LEVELS = [*range(100, 1000, 100), 999]  # cached levels t (s = t / 1000)


def build_flow(args):
    """StepModels of the flow variants over one transformer, and a cache-layout batch (latents + inverted)."""
    import copy

    import torch

    import smpo_cli.models.conditioning as conditioning
    from smpo_cli.config import load_recipe
    from smpo_cli.models import load_components
    from smpo_cli.models.conditioning import FlowConditioning
    from smpo_cli.training.step import StepModels

    size = args.size or "mid"
    update, side = FLOW_SIZES[args.family][size]
    comps = load_components(f"tiny-{args.family}", device=args.device)
    torch.manual_seed(0)
    cls = type(comps.transformer)
    config = {k: v for k, v in comps.transformer.config.items() if not k.startswith("_")}
    transformer = cls(**{**config, **(update or {})}).to(args.device)
    cfg = transformer.config
    P = args.pairs
    emb = torch.randn(1, 77, cfg.joint_attention_dim, device=args.device).expand(2 * P, -1, -1).contiguous()
    pooled = torch.randn(1, cfg.pooled_projection_dim, device=args.device).expand(2 * P, -1).contiguous()
    txt_ids = torch.zeros(77, 3, device=args.device) if args.family == "flux" else None
    cond = FlowConditioning(args.family, emb, pooled, txt_ids)
    conditioning.encode_prompts = lambda comps, prompts, device=None, **kw: cond  # a fixed random embedding
    variants = {
        "dpo": ["method.name=dpo", "inversion.source=none"],
        "smpo-online": ["inversion.source=online", "inversion.model=reference", "inversion.num_steps=5"],
        "smpo-cache": ["inversion.source=cache", "inversion.cache_path=unused"],
    }
    ref = copy.deepcopy(transformer).requires_grad_(False).eval()
    channels = int(comps.vae.config.latent_channels)
    x0 = torch.randn(P, 2, channels, side, side)
    batch = {"size": P, "skipped": 0, "prompt": ["a photo"] * P, "p": torch.full((P,), 0.8), "latents": x0,
             "inverted": torch.randn(P, 2, len(FLOW_LEVELS), channels, side, side)}  # fmt: skip
    models = {}
    for name, overrides in variants.items():
        recipe = load_recipe(None, "train", ["output_dir=x", f"model.pretrained=tiny-{args.family}", "data.path=x",
                                             "train.max_steps=1", *overrides]).recipe  # fmt: skip
        models[name] = StepModels(recipe, comps, transformer, transformer, ref, None, cache_levels=FLOW_LEVELS)  # fmt: skip
    opt = torch.optim.AdamW(transformer.parameters(), lr=1e-12)
    return models, batch, opt, transformer


def build(args):
    if args.family != "sd15":
        return build_flow(args)
    import torch
    from diffusers import UNet2DConditionModel

    from smpo_cli.config import load_recipe
    from smpo_cli.inversion.schedule import NoiseSchedule, inversion_grid
    from smpo_cli.models import load_components
    from smpo_cli.models.conditioning import Conditioning
    from smpo_cli.training.step import StepModels

    blocks, lpb, xdim, side = SIZES[args.size or "mid"]
    torch.manual_seed(0)
    down = ("CrossAttnDownBlock2D",) * (len(blocks) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(blocks) - 1)
    unet = UNet2DConditionModel(sample_size=side, in_channels=4, out_channels=4, down_block_types=down,
                                up_block_types=up, block_out_channels=blocks, layers_per_block=lpb,
                                cross_attention_dim=xdim, attention_head_dim=8).to(args.device)  # fmt: skip
    comps = load_components("tiny-sd15", device=args.device)
    P = args.pairs
    emb = torch.randn(1, 77, xdim, device=args.device)
    cond = Conditioning(prompt_embeds=emb.expand(2 * P, -1, -1).contiguous())

    # conditioning is fixed (a random embedding of the mid-size UNet's width): replace prompt encoding
    import smpo_cli.training.step as step_mod

    step_mod._cond = lambda models, prompts, sizes, crops, device: cond
    variants = {}
    for name, overrides in {
        "dpo": ["method.name=dpo", "inversion.source=none"],
        "smpo-online": ["inversion.source=online", "inversion.model=reference", "inversion.num_steps=5"],
        "smpo-cache": ["inversion.source=cache", "inversion.cache_path=unused"],
        "official-style": ["inversion.source=online", "inversion.model=policy", "inversion.num_steps=5",
                           "inversion.timestep_mode=official"],
    }.items():  # fmt: skip
        recipe = load_recipe(None, "train", ["output_dir=x", "model.pretrained=tiny-sd15", "data.path=x",
                                             "train.max_steps=1", *overrides]).recipe  # fmt: skip
        variants[name] = recipe
    ref = __import__("copy").deepcopy(unet).requires_grad_(False).eval()
    schedule = NoiseSchedule.from_scheduler(comps.scheduler)
    x0 = torch.randn(P, 2, 4, side, side)
    levels = inversion_grid(10)
    batch = {"size": P, "skipped": 0, "prompt": ["a photo"] * P, "p": torch.full((P,), 0.8),
             "latents": x0, "inverted": torch.randn(P, 2, len(levels), 4, side, side),
             "original_size": torch.full((P, 2, 2), 512), "crop_top_left": torch.zeros(P, 2, 2, dtype=torch.long)}  # fmt: skip
    models = {}
    for name, recipe in variants.items():
        # the official mode walks its own grid (from the scheduler config); the others the trailing one
        models[name] = StepModels(recipe, comps, unet, unet, ref, schedule, grid=inversion_grid(5), cache_levels=levels)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-12)
    return models, batch, opt, unet


def time_step(models, batch, opt, device, seed: int = 0) -> tuple[float, int]:
    import torch

    from smpo_cli.training.step import PairDraws, micro_batch_loss

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss, metrics = micro_batch_loss(models, batch, PairDraws(seed, 0, list(range(batch["size"]))), device)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000, metrics["unet_calls"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--family", choices=("sd15", "sd3", "flux"), default="sd15",
                    help="sd15: a UNet; sd3 / flux: a flow-matching transformer")  # fmt: skip
    ap.add_argument("--size", choices=sorted({*SIZES, "tiny"}), default=None,
                    help="sd15: mid (default) or sd15; sd3 / flux: tiny or mid (default)")  # fmt: skip
    ap.add_argument("--pairs", type=int, default=2, help="pairs per step")
    ap.add_argument("--rounds", type=int, default=9, help="each round draws new timesteps (the same for every variant)")
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    allowed = SIZES if args.family == "sd15" else FLOW_SIZES[args.family]
    if args.size is not None and args.size not in allowed:
        ap.error(f"--size {args.size} is not a {args.family} size ({', '.join(sorted(allowed))})")
    args.size = args.size or "mid"
    import torch

    torch.set_num_threads(args.threads)
    models, batch, opt, unet = build(args)
    params = sum(p.numel() for p in unet.parameters())
    names = list(models)
    for name in names:  # warm-up
        time_step(models[name], batch, opt, args.device)
    ms = {n: [] for n in names}
    calls = {}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            t, c = time_step(models[name], batch, opt, args.device, seed=r)  # round r: the same t for every variant
            ms[name].append(t)
            calls.setdefault(name, []).append(c)
    med = {n: statistics.median(v) for n, v in ms.items()}
    figures = {
        "device": args.device, "family": args.family, "size": args.size, "unet_params": params,
        "pairs_per_step": args.pairs, "rounds": args.rounds, "threads": args.threads,
        "ms_per_step": med, "unet_calls_per_step": {n: statistics.mean(c) for n, c in calls.items()}, "all_ms": ms,
        "cache_vs_dpo": med["smpo-cache"] / med["dpo"],
    }  # fmt: skip
    if "official-style" in med:
        figures["online_vs_official"] = med["smpo-online"] / med["official-style"]
    else:
        figures["online_vs_dpo"] = med["smpo-online"] / med["dpo"]
    if args.device.startswith("cuda"):
        figures["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if args.json:
        print(json.dumps(figures))
        return
    net = "UNet" if args.family == "sd15" else f"{args.family} transformer"
    print(f"train step, {args.size} {net} ({params / 1e6:.1f}M params), {args.pairs} pairs/step, {args.device}, "
          f"{args.threads} threads, {args.rounds} rounds")  # fmt: skip
    print(f"{'variant':<16}{'ms/step (median)':>18}{'UNet calls':>12}{'vs dpo':>9}")
    for n in names:
        print(f"{n:<16}{med[n]:>18.1f}{statistics.mean(calls[n]):>12.1f}{med[n] / med['dpo']:>8.2f}x")
    if "online_vs_official" in figures:
        print(f"cache_vs_dpo {figures['cache_vs_dpo']:.3f} (target <= 1.15), "
              f"online_vs_official {figures['online_vs_official']:.3f} (target <= 1.0)")  # fmt: skip
    else:
        print(f"cache_vs_dpo {figures['cache_vs_dpo']:.3f} (target <= 1.15), "
              f"online_vs_dpo {figures['online_vs_dpo']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
