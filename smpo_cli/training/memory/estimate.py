"""The per-GPU memory plan of a train recipe: the training state the runner holds, split as the trainer splits it.

:func:`plan_memory` decides sharding with the trainer's own ``check_sharding`` (so a launch the trainer
refuses gets a :class:`RefusedPlan`), resolves the model offline, adds the closed forms of the state, and
measures the activations of one micro-step with and without gradient checkpointing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from smpo_cli.training.memory.activations import StepShape, measure_activations, measure_vae_encode
from smpo_cli.training.memory.models import ModelInfo, UNetShapes, resolve_model, unet_shapes
from smpo_cli.training.memory.sharding import Sharding, read_sharding, shard_bytes
from smpo_cli.training.memory.state import lora_adapter_shapes, optimizer_state_bytes, optimizer_step_bytes

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MIXED_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU of a training run (see ``smpo_cli.training.memory`` for what each part holds)."""

    weights: int
    gradients: int
    optimizer: int
    reference: int
    frozen: int  # VAE + text encoder(s)
    activations: int  # for the recipe's train.gradient_checkpointing
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    optimizer_step: int  # temporaries of the optimiser step (the activations are gone by then)
    vae_encode: int  # temporaries of the VAE encoding of a micro-batch's pixels (before the UNet runs)
    ddp_buckets: int  # DDP's gradient buckets (more than one process)
    gathered: int  # FSDP2: the unsharded units being computed (approximate)
    total: int
    unet_params: int
    trainable_params: int
    frozen_params: int
    precision: str  # "fp16 mixed precision" | "bf16 mixed precision" | "fp32"
    sharding: str  # "DDP x1", "FSDP2 x8 (train.sharding=fsdp)", ...
    optimizer_name: str
    checkpointing: bool
    config_source: str
    activation_method: str
    seconds: float  # what the activation measurements took (0 when cached)
    peak_of: str  # which moment the total is the peak of: activations | optimiser step | VAE encode
    notes: tuple[str, ...] = ()
    device: str = "GPU"  # "GPU", or "process" for device=cpu recipes
    recipe_sharding: bool = False  # the recipe could set train.sharding=fsdp (full fine-tuning)
    sharded: bool = False  # smpo's FSDP2 / ZeRO split the UNet's state (and, but for ZeRO-2, the UNet and reference)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def over(self, budget_gib: float) -> bool:
        return self.total > budget_gib * GiB


@dataclass(frozen=True)
class UnknownPlan:
    """No parameter count offline: ``reason`` says which model could not be resolved."""

    reason: str


@dataclass(frozen=True)
class RefusedPlan:
    """``smpo train`` would refuse this launch (DeepSpeed offload or ZeRO-1; sharding with fp16 or LoRA): ``reason`` is its error."""

    reason: str


def _accumulation(recipe: Any, processes: int) -> int:
    try:
        from smpo_cli.training.batching import plan_batches

        return plan_batches(recipe, processes, None).grad_accum_steps
    except Exception:  # noqa: BLE001 - a split the runner would refuse: the recipe's own setting
        return recipe.train.grad_accum_steps


def plan_memory(recipe: Any, *, accelerate_config: str | None = None, sharding: Sharding | None = None,
                model_info: ModelInfo | None = None,
                device: str = "meta") -> MemoryPlan | UnknownPlan | RefusedPlan:  # fmt: skip
    """The memory plan of a validated train recipe (no weights, no network).

    Sharded (``train.sharding=fsdp`` or ``distributed_type: FSDP``, more than one process, as the trainer's
    ``check_sharding`` decides): weights, gradients, optimiser state and the reference are divided by the number
    of processes; otherwise DDP replicates them and adds its gradient buckets."""
    from smpo_cli.errors import UsageError
    from smpo_cli.training.sharding import UNIT_CLASSES, check_sharding

    sharding = sharding or read_sharding(accelerate_config)
    try:
        mode = check_sharding(recipe, sharding.processes, sharding.distributed_type, sharding.deepspeed or {})
    except UsageError as exc:
        return RefusedPlan(str(exc))
    sharded = mode != "none"
    info = model_info or resolve_model(recipe.model)
    if info.unet_config is None:
        return UnknownPlan(f"parameter count unknown offline ({info.source})")
    t, method, n = recipe.train, recipe.method.name, sharding.processes
    mixed = MIXED_DTYPES.get(t.mixed_precision)
    frozen_dtype = recipe.model.dtype if recipe.model.dtype != "auto" else (mixed or "float32")
    frozen_b = DTYPE_BYTES[frozen_dtype]
    shapes = unet_shapes(info.unet_config)
    notes: list[str] = []
    if t.lora_rank is not None:
        trainable_shapes = lora_adapter_shapes(shapes.linears, t.lora_rank)
        trainable = sum(math.prod(s) for s in trainable_shapes)
        weights = shapes.params * frozen_b + 4 * trainable
        reference_mode, reference = ("none" if method == "sft" else "adapters"), 0
        policy_dtype, ref_dtype = frozen_dtype, frozen_dtype
    else:
        trainable_shapes, trainable = shapes.shapes, shapes.params
        weights = shapes.params * 4  # fp32 master weights; autocast does the rest
        reference_mode = "none" if method == "sft" else "copy"
        # without autocast the runner moves the reference to fp32 too (see runner.py)
        ref_dtype = "float32" if t.mixed_precision == "no" else frozen_dtype
        reference = 0 if method == "sft" else shapes.params * DTYPE_BYTES[ref_dtype]
        policy_dtype = "float32"
    gradients = trainable * 4
    optimizer = optimizer_state_bytes(recipe.optim.name, trainable_shapes)
    step_temp = optimizer_step_bytes(recipe.optim.name, trainable_shapes)
    frozen_params = sum(info.frozen_counts.values())
    frozen = frozen_params * frozen_b
    if not info.frozen_counts:
        notes.append("VAE and text encoder sizes unknown: not counted")
    images = t.batch_size * (1 if method == "sft" else 2)
    base = StepShape(resolution=recipe.data.resolution, images=images, policy_dtype=policy_dtype, autocast=mixed,
                     reference=reference_mode, reference_dtype=ref_dtype, lora_rank=t.lora_rank)  # fmt: skip
    without = measure_activations(info.unet_config, base, device=device)
    with_ck = measure_activations(info.unet_config, replace(base, checkpointing=True), device=device)
    vae_encode = 0
    if recipe.inversion.source not in ("cache", "plan") and info.vae_config is not None:
        try:  # the runner encodes winners and losers, whatever the method
            vae_encode = measure_vae_encode(
                info.vae_config, 2 * t.batch_size, recipe.data.resolution, frozen_dtype
            )
        except Exception as exc:  # noqa: BLE001 - an exotic VAE config only loses this line
            notes.append(f"VAE encode not measured ({type(exc).__name__})")
    activations = with_ck.bytes if t.gradient_checkpointing else without.bytes

    def split(nbytes: int) -> int:
        return shard_bytes(nbytes, n) if sharded else nbytes

    ddp_buckets = gradients if not sharded and n > 1 else 0
    gathered = 0
    whole_weights = whole_reference = 0  # ZeRO-2 splits only the gradients and the optimiser state
    if mode == "zero2":
        # every process keeps the fp32 UNet and the reference whole, plus its fp32 master slice and DeepSpeed's
        # gradient reduce bucket (5e8 elements by default)
        whole_weights, whole_reference = weights, reference - split(reference)  # split(weights): the master slice
        ddp_buckets = min(gradients, 4 * 500_000_000)
        notes.append("ZeRO-2: whole fp32 UNet and reference on every process, plus a 1/N fp32 master copy")
        label = f"DeepSpeed ZeRO-2 x{n}"
    elif sharded:  # FSDP2 / ZeRO-3 gather fp32 weights block by block (autocast casts them)
        gathered, how = gathered_bytes(shapes, 4, UNIT_CLASSES)
        notes.append(f"sharded weights: {how} (approximate{', ZeRO-3 prefetch not counted' if mode == 'zero3' else ''})")
        if mode == "zero3":
            label = f"DeepSpeed ZeRO-3 x{n}"
        else:
            label = f"FSDP2 x{n} ({'train.sharding=fsdp' if t.sharding == 'fsdp' else 'distributed_type FSDP'})"
    else:
        label = f"DDP x{n}"
    if _accumulation(recipe, n) == 1:
        notes.append("one micro-batch per step: gradients and activations overlap less than this sum says")
    step_g = split(step_temp)
    moments = {"activations": activations, "optimiser step": step_g, "VAE encode": vae_encode}
    peak_of = max(moments, key=lambda k: moments[k])
    weights_held, reference_held = split(weights) + whole_weights, split(reference) + whole_reference
    persistent = (weights_held + split(gradients) + split(optimizer) + reference_held + frozen + ddp_buckets
                  + gathered)  # fmt: skip
    methods = sorted({without.method, with_ck.method})
    return MemoryPlan(
        weights=weights_held, gradients=split(gradients), optimizer=split(optimizer), reference=reference_held,
        frozen=frozen, activations=activations, activations_without_checkpointing=without.bytes,
        activations_with_checkpointing=with_ck.bytes, optimizer_step=step_g, vae_encode=vae_encode,
        ddp_buckets=ddp_buckets, gathered=gathered, total=persistent + moments[peak_of],
        unet_params=shapes.params, trainable_params=trainable, frozen_params=frozen_params,
        precision=f"{t.mixed_precision} mixed precision" if mixed else "fp32", sharding=label,
        optimizer_name=recipe.optim.name, checkpointing=t.gradient_checkpointing, config_source=info.source,
        activation_method=" / ".join(methods),
        seconds=round(sum(a.seconds for a in (without, with_ck) if not a.cached), 2), peak_of=peak_of,
        notes=tuple(notes), device="process" if getattr(recipe, "device", "auto") == "cpu" else "GPU",
        recipe_sharding=t.lora_rank is None, sharded=sharded,
    )  # fmt: skip


def gathered_bytes(shapes: UNetShapes, nbytes: int, units: tuple[str, ...]) -> tuple[int, str]:
    """Unsharded weights held while a UNet sharded into FSDP ``units`` computes, and how that was reckoned."""
    wrapped = [shapes.units[c] for c in units if c in shapes.units]
    if not wrapped:
        return shapes.params * nbytes, f"no {'/'.join(units)} units: the whole UNet is gathered"
    root = max(shapes.params - sum(total for _, total in wrapped), 0)
    largest = max(big for big, _ in wrapped)
    return (root + 2 * largest) * nbytes, f"the root unit and two {'/'.join(units)} units are gathered"
