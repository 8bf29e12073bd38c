"""The memory plan as the dry run prints it: (level, text) lines, and what to change when it exceeds a budget."""

from __future__ import annotations

from smpo_cli.training.memory.estimate import GiB, MemoryPlan, RefusedPlan, UnknownPlan


def gib(nbytes: float) -> str:
    """``3.4 GiB``; below 1 GiB in MiB (``12 MiB``), below 1 MiB in KiB."""
    if nbytes >= GiB or nbytes == 0:
        return f"{nbytes / GiB:.1f} GiB"
    if nbytes >= 2**20:
        return f"{nbytes / 2**20:.0f} MiB"
    return f"{nbytes / 2**10:.0f} KiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def plan_lines(
    plan: MemoryPlan | UnknownPlan | RefusedPlan, budget_gib: float | None = None
) -> list[tuple[str, str]]:
    """(level, text) lines of ``plan`` for the dry-run plan; a "warn" line when it exceeds ``budget_gib``, or
    the one "warn" line of a launch ``smpo train`` refuses."""
    if isinstance(plan, RefusedPlan):
        return [("warn", f"memory per GPU: not estimated, smpo train refuses this run: {plan.reason}")]
    if isinstance(plan, UnknownPlan):
        lines = [("ok", f"memory per GPU: not estimated, {plan.reason}")]
        if budget_gib is not None:
            lines.append(("warn", f"--gpu-memory {budget_gib:g}: cannot check, {plan.reason}"))
        return lines
    p = plan
    lines = [("ok", f"parameters: UNet {_count(p.unet_params)} (trainable {_count(p.trainable_params)}), "
                    f"frozen VAE+text {_count(p.frozen_params)}; UNet config: {p.config_source}")]  # fmt: skip
    parts = [f"weights {gib(p.weights)}", f"gradients {gib(p.gradients)}", f"optimiser {gib(p.optimizer)}",
             f"reference {gib(p.reference)}", f"frozen VAE+text {gib(p.frozen)}"]  # fmt: skip
    if p.ddp_buckets:
        parts.append(f"DDP buckets {gib(p.ddp_buckets)}")
    if p.gathered:
        parts.append(f"gathered blocks {gib(p.gathered)}")
    if p.checkpointing:
        parts.append(f"activations {gib(p.activations)} with gradient checkpointing "
                     f"({gib(p.activations_without_checkpointing)} without)")  # fmt: skip
    else:
        parts.append(
            f"activations {gib(p.activations)} ({gib(p.activations_with_checkpointing)} with gradient checkpointing)"
        )
    text = ", ".join(parts)
    if p.peak_of != "activations":
        what = "the optimiser step's" if p.peak_of == "optimiser step" else "the VAE encoding's"
        text += f"; {what} temporaries ({gib(max(p.optimizer_step, p.vae_encode))}) outweigh them"
    lines.append(
        ("ok", f"memory per {p.device} (estimate, {p.precision}, {p.sharding}): {text} = {gib(p.total)}")
    )
    how = "cached" if p.seconds == 0 else f"{p.seconds:g} s"
    lines.append(("ok", f"memory plan: activations measured on the {p.activation_method} device ({how}); {p.optimizer_name} "
                        f"step temporaries {gib(p.optimizer_step)}, VAE encode {gib(p.vae_encode)}"
                        + "".join(f"; {n}" for n in p.notes)))  # fmt: skip
    if budget_gib is not None:
        if p.over(budget_gib):
            lines.append(("warn", f"estimated {gib(p.total)} per GPU exceeds --gpu-memory {budget_gib:g} GiB: try "
                                  + "; ".join(advice(p))))  # fmt: skip
        else:
            lines.append(
                ("ok", f"fits --gpu-memory {budget_gib:g} GiB ({gib(budget_gib * GiB - p.total)} to spare)")
            )
    return lines


def advice(plan: MemoryPlan) -> list[str]:
    """What to change to fit, in the order to try it."""
    tips: list[str] = []
    if not plan.checkpointing and plan.activations_with_checkpointing < plan.activations:
        after = max(plan.activations_with_checkpointing, plan.optimizer_step, plan.vae_encode)
        tips.append(f"train.gradient_checkpointing=true (saves about {gib(plan.activations - after)})")
    if plan.trainable_params == plan.unet_params:
        tips.append(
            "train.lora_rank=<r> (trains adapters only: no full gradients, optimiser state or reference copy)"
        )
    if plan.recipe_sharding and not plan.sharded:  # smpo train shards full fine-tuning in bf16 or fp32 only
        bf16 = " with train.mixed_precision=bf16" if plan.precision.startswith("fp16") else ""
        tips.append(f"train.sharding=fsdp{bf16} on several GPUs (splits weights, gradients, optimiser state and the "
                    "reference over them; --accelerate-config PATH plans for that many processes)")  # fmt: skip
    tips.append("a smaller train.batch_size (activations grow with it; raise train.grad_accum_steps to keep the "
                "pairs per step)")  # fmt: skip
    if plan.optimizer_name == "adamw":
        tips.append("optim.name=adafactor or adamw8bit (smaller optimiser state)")
    return tips
