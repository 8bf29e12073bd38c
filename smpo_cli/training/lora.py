"""LoRA training through diffusers' peft integration, with the reference model for free.

The reference of a LoRA run is the same UNet with its adapters disabled (``reference_outputs``), so
no second copy of the UNet is held in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections, as the diffusers LoRA scripts


def add_lora(unet, *, rank: int, alpha: float | None = None, target_modules=None, seed: int | None = None):
    """Add a LoRA adapter (lora_B = 0, so training starts from the base UNet); only it is trainable."""
    from peft import LoraConfig

    if seed is not None:
        torch.manual_seed(seed)
    unet.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                        init_lora_weights="gaussian", target_modules=list(target_modules or DEFAULT_TARGETS))  # fmt: skip
    unet.add_adapter(config)
    return unet


@contextlib.contextmanager
def reference_outputs(unet) -> Iterator[None]:
    """Run ``unet`` as the frozen base model (adapters off) inside the block; adapters back on after."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        from smpo_cli.errors import ModelLoadError

        raise ModelLoadError(f"LoRA checkpoint does not fit this UNet (unexpected keys such as {unexpected[0]})")
