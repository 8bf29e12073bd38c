"""LoRA training through diffusers' peft integration, with the reference model for free.

``add_lora`` puts a peft LoRA adapter on the UNet (``unet.add_adapter``, as the diffusers LoRA and
Diffusion-DPO training scripts do) and leaves only its weights trainable. ``lora_B`` starts at zero,
so the adapted UNet starts equal to the base one.

The reference model of a LoRA run is the same UNet with its adapters disabled
(``reference_outputs``), so no second copy of the UNet is held in memory.

``lora_state_dict`` / ``load_lora_state_dict`` move the adapter weights in and out of training
checkpoints (peft key names, e.g. ``...attn1.to_q.lora_A.weight``). The diffusers LoRA format for
``pipeline.load_lora_weights`` is written by :func:`smpo_cli.training.export.save_lora`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from smpo_cli.errors import ModelLoadError, UsageError
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)

# The attention projections, as in diffusers' train_text_to_image_lora / Diffusion-DPO scripts.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# SD3 / FLUX.1 transformers: the image-stream and the text-stream (add_*) attention projections of every
# block, the default of diffusers' train_dreambooth_lora_sd3.py (and the attention part of the FLUX.1
# script's); FLUX.1 single blocks have to_q/to_k/to_v only (their output is proj_out), SD3.5's attn2 is
# matched by the same suffixes. Adapters on these keys load with the stock pipeline's load_lora_weights.
FLOW_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def default_targets(family: str) -> tuple[str, ...]:
    """The LoRA target modules of ``family``: UNet attention, or the flow transformers' joint attention."""
    return FLOW_TARGETS if family in ("sd3", "flux") else DEFAULT_TARGETS


def add_lora(
    unet: Any,
    *,
    rank: int,
    alpha: float | None = None,
    target_modules: str | Iterable[str] | None = None,
    seed: int | None = None,
) -> Any:
    """Add a LoRA adapter to ``unet`` in place and return it; only the adapter stays trainable.

    ``alpha`` defaults to ``rank`` (scale ``alpha / rank`` = 1). ``target_modules`` are module-name
    suffixes (peft semantics); the default is the attention projections. ``lora_A`` is drawn from
    a Gaussian (std ``1/rank``, the diffusers scripts' ``init_lora_weights="gaussian"``) with
    ``seed`` when given (the global RNG is left untouched); ``lora_B`` is zero.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UsageError(
            f"LoRA rank must be a positive integer, got {rank!r}", hint="set train.lora_rank ≥ 1"
        )
    if alpha is not None and not alpha > 0:
        raise UsageError(
            f"LoRA alpha must be > 0, got {alpha!r}", hint="leave train.lora_alpha unset to use the rank"
        )
    if has_lora(unet):
        raise UsageError(
            f"this UNet already carries adapter(s) {sorted(unet.peft_config)}",
            hint="add_lora once per UNet; resume with load_lora_state_dict",
        )
    if target_modules is None:
        targets = list(DEFAULT_TARGETS)
    elif isinstance(target_modules, str):
        targets = [target_modules]
    else:
        targets = list(target_modules)
    config = LoraConfig(
        r=rank,
        lora_alpha=float(alpha if alpha is not None else rank),
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    unet.requires_grad_(False)
    with _seeded(seed):
        try:
            unet.add_adapter(config)
        except ValueError as exc:
            # diffusers sets _hf_peft_config_loaded before peft fails, which breaks every later
            # add_adapter call (no peft_config attribute): undo it when nothing was added.
            if not getattr(unet, "peft_config", None):
                unet._hf_peft_config_loaded = False
            raise UsageError(
                f"cannot add a LoRA adapter on {targets}: {exc}",
                hint="target_modules are module-name suffixes of the UNet, e.g. to_q, to_k, to_v, to_out.0",
            ) from exc
    n_train = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    logger.debug(
        "LoRA rank %d alpha %s on %s: %d trainable parameters", rank, config.lora_alpha, targets, n_train
    )
    return unet


def has_lora(unet: Any) -> bool:
    """Whether ``unet`` carries a peft adapter (added by ``add_lora`` or ``load_lora_weights``)."""
    return bool(getattr(unet, "_hf_peft_config_loaded", False) and getattr(unet, "peft_config", None))


def adapter_name(unet: Any) -> str:
    """The name of the single adapter on ``unet``."""
    names = list(getattr(unet, "peft_config", None) or {}) if has_lora(unet) else []
    if not names:
        raise UsageError("this UNet carries no LoRA adapter", hint="call add_lora(unet, rank=...) first")
    if len(names) > 1:
        raise UsageError(
            f"this UNet carries several adapters {names}", hint="keep one adapter per trained UNet"
        )
    return names[0]


@contextlib.contextmanager
def reference_outputs(unet: Any) -> Iterator[Any]:
    """Inside the block ``unet`` computes the base (reference) model: all LoRA layers bypassed.

    On exit (exceptions included) every LoRA layer is put back as it was: enabled or disabled, and
    each parameter's ``requires_grad`` (peft's own enable/disable toggles ``requires_grad`` of the
    adapter weights, which would otherwise unfreeze adapters that were frozen on purpose).
    Run the reference under ``torch.no_grad()``: inside the block the adapters get no gradient.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter_name(unet)  # a clear error for a UNet without an adapter
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    was_disabled = [layer.disable_adapters for layer in layers]
    grad_flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield unet
    finally:
        for layer, disabled in zip(layers, was_disabled, strict=True):
            layer.enable_adapters(not disabled)
        for p, flag in grad_flags:
            p.requires_grad_(flag)


def lora_state_dict(unet: Any) -> dict[str, torch.Tensor]:
    """A detached copy of the LoRA weights (peft names without the adapter name), for checkpoints."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name(unet))
    return {k: v.detach().clone() for k, v in state.items()}


def load_lora_state_dict(unet: Any, state: dict[str, torch.Tensor]) -> None:
    """Load weights from ``lora_state_dict`` into the adapter of ``unet`` (same rank and targets)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    name = adapter_name(unet)
    expected = set(get_peft_model_state_dict(unet, adapter_name=name))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = []
        if missing:
            what.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            what.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ModelLoadError(
            f"LoRA checkpoint does not fit this UNet: {', '.join(what)} keys",
            hint="resume with the same train.lora_rank, target modules and base model",
        )
    try:
        set_peft_model_state_dict(unet, state, adapter_name=name)
    except RuntimeError as exc:  # shape mismatch (another rank)
        raise ModelLoadError(
            f"LoRA checkpoint does not fit this UNet: {str(exc).splitlines()[-1].strip()}",
            hint="resume with the same train.lora_rank as the checkpoint",
        ) from exc


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed the CPU generator for the block, then give the caller's RNG state back.

    peft builds the LoRA layers on the CPU and moves them to the base layer's device afterwards,
    so the same seed gives the same adapter on every device.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield
