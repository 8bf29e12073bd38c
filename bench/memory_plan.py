"""Memory plan vs measured GPU memory: the estimate of ``smpo train --dry-run`` against
``torch.cuda.max_memory_allocated`` for one training step of the same shape.

The estimate is ``smpo_cli.training.memory.plan_memory`` (the code the dry run prints) for a recipe of
this shape, with no VAE or text encoder (the step below loads neither). The measurement builds the UNet from
its config with random fp32 weights, a frozen deep copy as the reference (fp16 under mixed precision; none for
sft) and AdamW, runs one warm-up step (it allocates the optimiser state), then measures a step of two
micro-batches as the runner does with ``train.grad_accum_steps`` > 1: policy forward under autocast, reference
forward under no_grad, backward (the second micro-batch with the first one's gradients still held), gradient
clipping and the optimiser step. Peak = ``torch.cuda.max_memory_allocated()`` over that step.

    python bench/memory_plan.py --device cuda --size sd15            # SD1.5 UNet, 512 px, fp16, with/without ckpt
    python bench/memory_plan.py --device cuda --size sd15 --json     # one JSON object
    python bench/memory_plan.py --device cpu --size tiny             # plumbing check: estimate only (measured n/a)

Goal: estimate within 15% of the measured peak for SD1.5-size configs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time

GIB = 2**30
RESOLUTIONS = {"tiny": 256, "sd15": 512, "sdxl": 1024}


def unet_config(size: str) -> dict:
    from smpo_cli.training import memory as mp

    if size == "tiny":
        return mp.resolve_model(_ModelRef("tiny-sd15")).unet_config
    return mp.shipped_unet_config(size)


class _ModelRef:  # the fields of a recipe's model block that resolve_model reads
    def __init__(self, pretrained: str) -> None:
        self.pretrained, self.family, self.unet, self.config, self.revision = (
            pretrained,
            "auto",
            None,
            None,
            None,
        )


def recipe_for(args, checkpointing: bool):
    from smpo_cli.config import load_recipe

    inversion = "none" if args.method in ("dpo", "sft") else "online"
    overrides = [
        "output_dir=unused", "model.pretrained=tiny-sd15", "data.path=unused", "train.max_steps=1",
        f"data.resolution={args.resolution}", f"method.name={args.method}", f"inversion.source={inversion}",
        f"train.batch_size={args.batch_size}", "train.grad_accum_steps=2", f"train.mixed_precision='{args.mixed_precision}'",
        f"train.gradient_checkpointing={str(checkpointing).lower()}", f"optim.name={args.optim}",
        "model.dtype=auto",
    ]  # fmt: skip
    if args.lora_rank:
        overrides.append(f"train.lora_rank={args.lora_rank}")
    return load_recipe(None, "train", overrides).recipe


def estimate(args, config: dict, checkpointing: bool):
    from smpo_cli.training import memory as mp

    family = "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"
    info = mp.ModelInfo(config, family, f"bench --size {args.size}", vae_config=None, frozen_counts={})
    return mp.plan_memory(recipe_for(args, checkpointing), model_info=info, sharding=mp.Sharding())


def measure(args, config: dict, checkpointing: bool) -> dict:
    """Peak and persistent bytes of a real step on ``args.device`` (CUDA)."""
    import torch
    from diffusers import UNet2DConditionModel

    from smpo_cli.training.memory import activations as mp  # the measured step's inputs and forward

    device = torch.device(args.device)
    mixed = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).to(device)
    ref = None
    if args.lora_rank:
        from smpo_cli.training.lora import add_lora

        unet.to(mixed or torch.float32).requires_grad_(False)
        add_lora(unet, rank=args.lora_rank, seed=0)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    elif args.method != "sft":
        ref = copy.deepcopy(unet).requires_grad_(False).eval().to(mixed or torch.float32)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    if args.optim == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-7, weight_decay=1e-2)
    else:
        from transformers.optimization import Adafactor

        opt = Adafactor(params, lr=1e-7, relative_step=False, scale_parameter=False, warmup_init=False)
    images = args.batch_size * (1 if args.method == "sft" else 2)
    shape = mp.StepShape(resolution=args.resolution, images=images)
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = mp._unet_inputs(config, shape, "cpu")
    x, t, enc, extra = (mp._cast_tree(v, torch.float32) for v in inputs)
    x, enc = torch.randn(x.shape, generator=gen).to(device), torch.randn(enc.shape, generator=gen).to(device)
    t = torch.randint(0, 1000, t.shape, generator=gen).to(device)
    extra = {
        k: {n: torch.randn(v.shape, generator=gen).to(device) for n, v in d.items()} for k, d in extra.items()
    }

    def micro():
        with torch.autocast("cuda", dtype=mixed or torch.float32, enabled=mixed is not None):
            pred = mp._forward(unet, config, (x, t, enc, extra))
            target = torch.zeros_like(pred)
            if ref is not None or args.lora_rank:
                module = ref if ref is not None else unet
                context = contextlib.nullcontext() if ref is not None else _reference_outputs(unet)
                with torch.no_grad(), context:
                    target = mp._forward(module, config, (x, t, enc, extra))
        loss = (pred - target).pow(2).mean()
        del pred, target
        loss.backward()

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    micro()
    step()  # warm-up: the optimiser state now exists
    micro()  # first micro-batch of the measured step: its gradients stay for the second
    torch.cuda.synchronize()
    persistent = torch.cuda.memory_allocated() - before
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    micro()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    seconds = time.perf_counter() - start
    return {"peak": peak, "persistent": persistent, "seconds": seconds}  # the models go with this frame


def _reference_outputs(unet):
    from smpo_cli.training.lora import reference_outputs

    return reference_outputs(unet)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (estimate vs measured) | cpu (estimate only)")
    ap.add_argument("--size", choices=sorted(RESOLUTIONS), default="sd15")
    ap.add_argument(
        "--resolution", type=int, default=None, help="pixels (default: 256 tiny, 512 sd15, 1024 sdxl)"
    )
    ap.add_argument("--batch-size", type=int, default=1, help="pairs per micro-batch (the UNet sees 2x)")
    ap.add_argument("--method", choices=("smpo", "dpo", "sft"), default="smpo")
    ap.add_argument("--mixed-precision", choices=("fp16", "bf16", "no"), default=None,
                    help="default: fp16 on cuda, no on cpu")  # fmt: skip
    ap.add_argument("--optim", choices=("adamw", "adafactor"), default="adamw")
    ap.add_argument("--lora-rank", type=int, default=None)
    ap.add_argument("--checkpointing", choices=("both", "no", "yes"), default="both")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    args.resolution = args.resolution or RESOLUTIONS[args.size]
    args.mixed_precision = args.mixed_precision or ("fp16" if args.device.startswith("cuda") else "no")
    cuda = args.device.startswith("cuda")
    import torch

    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here (use --device cpu for the estimate only)")
    config = unet_config(args.size)
    rows = []
    for ckpt in {"both": (False, True), "no": (False,), "yes": (True,)}[args.checkpointing]:
        plan = estimate(args, config, ckpt)
        row = {
            "gradient_checkpointing": ckpt, "estimate_gib": plan.total / GIB,
            "estimate_parts_gib": {k: getattr(plan, k) / GIB for k in ("weights", "gradients", "optimizer", "reference",
                                                                       "activations", "optimizer_step")},
            "peak_of": plan.peak_of, "activation_method": plan.activation_method,
            "measured_gib": None, "error_pct": None, "persistent_estimate_gib": None, "persistent_measured_gib": None,
        }  # fmt: skip
        if cuda:
            m = measure(args, config, ckpt)
            torch.cuda.empty_cache()
            persistent = plan.weights + plan.gradients + plan.optimizer + plan.reference
            row.update(measured_gib=m["peak"] / GIB, error_pct=100 * (plan.total - m["peak"]) / m["peak"],
                       persistent_estimate_gib=persistent / GIB, persistent_measured_gib=m["persistent"] / GIB,
                       step_seconds=m["seconds"])  # fmt: skip
        rows.append(row)
    result = {
        "device": args.device, "size": args.size, "unet_params": plan.unet_params, "resolution": args.resolution,
        "pairs_per_micro_batch": args.batch_size, "method": args.method, "mixed_precision": args.mixed_precision,
        "optim": args.optim, "lora_rank": args.lora_rank, "rows": rows,
    }  # fmt: skip
    if cuda:
        result["gpu"] = torch.cuda.get_device_name()
        result["torch"] = torch.__version__
    if args.json:
        print(json.dumps(result))
        return result
    precision = "fp32" if args.mixed_precision == "no" else f"{args.mixed_precision} mixed precision"
    print(f"memory plan vs measured: {args.size} UNet ({plan.unet_params / 1e6:.1f}M params), {args.resolution} px, "
          f"{args.batch_size} pair(s) per micro-batch, {args.method}, {precision}, {args.optim}, "
          f"{args.device}")  # fmt: skip
    print(
        f"{'checkpointing':<15}{'estimate GiB':>14}{'measured GiB':>14}{'error':>9}   persistent est/meas GiB"
    )
    for r in rows:
        measured = f"{r['measured_gib']:.2f}" if r["measured_gib"] is not None else "n/a"
        error = f"{r['error_pct']:+.1f}%" if r["error_pct"] is not None else "n/a"
        persistent = (f"{r['persistent_estimate_gib']:.2f} / {r['persistent_measured_gib']:.2f}"
                      if r["persistent_measured_gib"] is not None else "n/a")  # fmt: skip
        print(f"{'yes' if r['gradient_checkpointing'] else 'no':<15}{r['estimate_gib']:>14.2f}{measured:>14}{error:>9}   "
              f"{persistent}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
