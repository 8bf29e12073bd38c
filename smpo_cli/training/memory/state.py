"""Closed forms of the training state that needs no measurement: the optimiser's persistent state and the
temporaries of its step, and the shapes of the LoRA adapters that train instead of the UNet."""

from __future__ import annotations

import math

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # smpo_cli.training.lora.DEFAULT_TARGETS


def optimizer_state_bytes(name: str, shapes: list[tuple[int, ...]]) -> int:
    """Persistent optimiser state of trainable fp32 parameters of ``shapes``.

    adamw: exp_avg and exp_avg_sq, 2 x 4 bytes per parameter. adafactor (transformers, beta1=None): the
    factored second moment of every tensor of 2 or more dims (row: all dims but the last; column: all dims
    but the second last) and a full one of 1-dim tensors, fp32. adamw8bit (bitsandbytes): two uint8 states
    plus an fp32 absmax per 256-value block for tensors of at least 4096 values, fp32 states below that.
    """
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if name == "adamw":
            total += 8 * n
        elif name == "adafactor":
            if len(shape) >= 2:
                total += 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
            else:
                total += 4 * n
        elif name == "adamw8bit":
            total += 2 * (n + 4 * -(-n // 256)) if n >= 4096 else 8 * n
        else:
            raise ValueError(f"unknown optimiser {name!r}")
    return total


def optimizer_step_bytes(name: str, shapes: list[tuple[int, ...]]) -> int:
    """Temporary memory of one optimiser step, on top of weights, gradients and state.

    torch's AdamW (foreach, the CUDA default) builds sqrt(exp_avg_sq) for all parameters at once: one fp32
    copy of the trainable parameters. Adafactor works tensor by tensor: about 3 fp32 copies of the largest.
    bitsandbytes' 8-bit AdamW updates in place.
    """
    if not shapes:
        return 0
    if name == "adamw":
        return 4 * sum(math.prod(s) for s in shapes)
    if name == "adafactor":
        return 3 * 4 * max(math.prod(s) for s in shapes)
    return 0


def lora_adapter_shapes(linears: list[tuple[str, int, int]], rank: int) -> list[tuple[int, ...]]:
    """Adapter weight shapes (lora_A: rank x in, lora_B: out x rank) of the targeted ``(name, in, out)`` linears."""
    shapes: list[tuple[int, ...]] = []
    for name, fan_in, fan_out in linears:
        if any(name == t or name.endswith("." + t) for t in LORA_TARGETS):
            shapes += [(rank, fan_in), (fan_out, rank)]
    return shapes
