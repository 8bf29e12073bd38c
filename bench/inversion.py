"""Inversion throughput: DDIM and ReNoise, batched (per-sample t, sub-batched) vs one image at a time.

For each setting (plain DDIM, ReNoise with 1 and 2 re-noise iterations) the table gives the UNet
noise estimates per inverted image, images/s of one batched call (every sample with its own t,
finished samples dropped from the UNet batch) and of the same images inverted one at a time, their
ratio, and the reconstruction error (invert to a fixed t, DDIM-sample back, MSE to x0).

Models are random-weight UNets in the SD1.5 layout (4 levels, 3 cross-attention levels, 2 layers
per block, CLIP-L-width cross-attention) built in this script:

* CPU, always: a mid-size UNet (about 25M parameters) on 32x32 latents, float32;
* ``--device cuda`` adds: an SD1.5-size UNet (about 860M parameters) on 64x64 latents, float16.

Latents are smooth random fields with unit variance (like real SD latents); prompts are random
77-token embeddings. Batched and one-at-a-time runs are interleaved round by round and the table
reports medians; a random UNet is not a denoiser, so reconstruction errors only compare settings.

    python bench/inversion.py                         # CPU, 1 thread, batch 8, 3 rounds
    python bench/inversion.py --threads 2 --rounds 5
    python bench/inversion.py --device cuda --json    # one JSON object, with "batched_speedup"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

SETTINGS = [
    # name, renoise_iterations, average_window
    ("ddim", 0, 1),
    ("renoise K=1 W=2 (SmPO)", 1, 2),
    ("renoise K=2 W=2", 2, 2),
]

SD15_LAYOUT = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "cross_attention_dim": 768,
}
MODELS = {
    # name: (block_out_channels, latent side)
    "mid-25M": ((64, 128, 192, 192), 32),
    "sd15-size": ((320, 640, 1280, 1280), 64),
}


@dataclass
class Row:
    setting: str
    nfe_per_image: float
    batched_ips: float
    single_ips: float
    ratio: float
    recon_mse: float


def build_unet(name: str, device: str, dtype):
    import torch
    from diffusers import UNet2DConditionModel

    channels, side = MODELS[name]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=side, block_out_channels=channels, **SD15_LAYOUT)
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False), side


def smooth_latents(batch: int, side: int, seed: int):
    """Unit-variance smooth random fields: 4x4 noise upsampled bicubically, standardised per sample."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 4, 4, 4, generator=g)
    x = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    x = x + 0.1 * torch.randn(x.shape, generator=g)
    return (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True)


def run_model(name: str, args, device: str) -> dict:
    import torch

    from smpo_cli.inversion import NoiseSchedule, ddim_sample, renoise_invert
    from smpo_cli.models.conditioning import Conditioning

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    unet, side = build_unet(name, device, dtype)
    params = sum(p.numel() for p in unet.parameters())
    schedule = NoiseSchedule.from_scheduler(
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "num_train_timesteps": 1000,
        }
    )
    batch = args.batch_size
    x0 = smooth_latents(batch, side, seed=0).to(device)
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(batch, 77, SD15_LAYOUT["cross_attention_dim"], generator=g)).to(
        device, dtype
    )
    if args.t is None:
        t = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(2))
    else:
        t = torch.full((batch,), args.t)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def invert(k, w, idx=None, tt=None):
        x = x0 if idx is None else x0[idx : idx + 1]
        c = cond if idx is None else cond.index(idx)
        return renoise_invert(
            unet, x, c, t if tt is None else tt, schedule=schedule, num_steps=args.num_steps,
            renoise_iterations=k, average_window=w,
        )  # fmt: skip

    # warm-up (allocator, kernels, lazy init)
    invert(1, 2, 0, int(t[0]))
    invert(1, 2)
    sync()

    timings = {name_: {"batched": [], "single": []} for name_, _, _ in SETTINGS}
    nfe = {}
    for rnd in range(args.rounds):
        for setting, k, w in SETTINGS:
            order = ("batched", "single") if rnd % 2 == 0 else ("single", "batched")
            for kind in order:
                sync()
                start = time.perf_counter()
                if kind == "batched":
                    res = invert(k, w)
                    nfe[setting] = res.nfe.float().mean().item()
                else:
                    for b in range(batch):
                        invert(k, w, b, int(t[b]))
                sync()
                timings[setting][kind].append(batch / (time.perf_counter() - start))
        print(f"  {name}: round {rnd + 1}/{args.rounds} done", file=sys.stderr)

    rows = []
    recon_t = torch.full((batch,), args.recon_t)
    for setting, k, w in SETTINGS:
        res = invert(k, w, tt=recon_t)
        back = ddim_sample(
            unet, res.latents, cond, res.timesteps, schedule=schedule, num_steps=args.num_steps
        )
        mse = (back.latents - x0.float()).pow(2).mean().item()
        b_ips = statistics.median(timings[setting]["batched"])
        s_ips = statistics.median(timings[setting]["single"])
        ratios = [b / s for b, s in zip(timings[setting]["batched"], timings[setting]["single"], strict=True)]
        rows.append(Row(setting, nfe[setting], b_ips, s_ips, statistics.median(ratios), mse))
    return {
        "model": name,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "params_m": round(params / 1e6, 1),
        "latent": [4, side, side],
        "batch_size": batch,
        "t": t.tolist(),
        "rows": [row.__dict__ for row in rows],
    }


def table(result: dict) -> str:
    head = (
        f"{result['model']} ({result['params_m']}M params, {result['dtype']}, latents {result['latent']}, "
        f"{result['device']}, batch {result['batch_size']})"
    )
    lines = [
        head,
        f"{'setting':<24} {'UNet evals/img':>14} {'batched img/s':>14} {'single img/s':>13} {'ratio':>6} {'recon MSE':>10}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['setting']:<24} {r['nfe_per_image']:>14.2f} {r['batched_ips']:>14.3f} {r['single_ips']:>13.3f} "
            f"{r['ratio']:>5.2f}x {r['recon_mse']:>10.2e}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to add the SD1.5-size run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-steps", type=int, default=5, help="inversion grid size (SmPO: 5 for SD1.5)")
    parser.add_argument(
        "--t", type=int, default=None, help="one t for all images (default: t ~ U{0..999} per image)"
    )
    parser.add_argument("--recon-t", type=int, default=300, help="t of the reconstruction-error pass")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)

    import torch
    from diffusers.utils import logging as diffusers_logging

    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()  # random-weight models: no load/cast notices
    results = [run_model("mid-25M", args, "cpu")]
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error("--device cuda asked but CUDA is not available")
        results.append(run_model("sd15-size", args, args.device))
    cpu_rows = results[0]["rows"]
    speedup = statistics.median(r["ratio"] for r in cpu_rows)
    if args.json:
        out = {
            "batched_speedup": round(speedup, 3),
            "batched_speedup_definition": "median over settings of batched/single images per second, CPU mid-size UNet",
            "threads": args.threads,
            "torch": torch.__version__,
            "results": results,
        }
        print(json.dumps(out, indent=2))
    else:
        for result in results:
            print(table(result))
            print()
        print(
            f"threads={args.threads}  t per image: {results[0]['t']}  batched_speedup (CPU, median over settings): {speedup:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
