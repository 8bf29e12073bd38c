"""How much GPU memory a training run needs, worked out before any weight is loaded.

``plan_memory(recipe)`` returns a :class:`MemoryPlan`: bytes per GPU of the trainable UNet's weights, its
gradients and optimiser state, the frozen reference UNet, the frozen VAE and text encoder(s), and the
activations of one micro-batch with and without gradient checkpointing. It loads no weight and needs no
network: parameter counts come from the UNet's config built on the meta device (the configs of the SD1.5
and SDXL UNets ship in ``smpo_cli/models/assets/unet_configs``), and activations are measured, not
guessed: one training micro-step runs on meta tensors of the real shapes while a dispatch-level tracker
follows every tensor the step allocates and frees (activations saved for backward, gradient-checkpoint
recomputation, autocast's fp16 copies of the weights, attention temporaries, the gradients being made).
Results are cached per (config, step shape, library versions) in ``cache_dir()/memory_plan``. Nothing here
prints; :func:`plan_lines` formats a plan for the dry run's plan.

What the step holds (``smpo_cli.training.runner``):

* full fine-tuning: fp32 master weights of the UNet, fp32 gradients, the optimiser state, and for
  dpo/smpo a frozen deep copy of the UNet (the reference) in ``model.dtype``; sft has no reference;
* LoRA (``train.lora_rank``): the frozen base UNet in ``model.dtype`` plus fp32 adapters, which alone
  get gradients and optimiser state; the reference is the same UNet with its adapters off;
* the VAE and text encoder(s), frozen in ``model.dtype``;
* per micro-batch the UNet sees 2 x ``train.batch_size`` latents (winners and losers; sft: the winners)
  of side ``data.resolution / 8``; for dpo/smpo the reference runs the same batch under ``no_grad``.

Under ``mixed_precision`` fp16/bf16 the policy runs under ``torch.autocast``; the measurement emulates
CUDA's autocast on the meta device (matmuls and convolutions in half precision, normalisations in fp32, the
cast copies of fp32 weights cached until the autocast region ends) and CUDA's fused attention kernels
(flash / memory-efficient attention save q, k, v, the output and the log-sum-exp, not the attention
matrix). With more than one micro-batch per step the gradients stay allocated across micro-batches, so the
estimate adds them to the activations (for a single micro-batch per step it is an upper bound). The peak
is the larger of the micro-step, the optimiser step (torch's foreach AdamW makes one fp32 copy of the
trainable parameters) and the VAE encoding of the micro-batch's pixels.

Sharding follows the trainer (``smpo_cli.training.sharding.check_sharding``) for the launch the accelerate
config describes (``--accelerate-config`` or ``$ACCELERATE_CONFIG_FILE``; under ``accelerate launch`` its
environment; default one process). smpo shards with its own FSDP2 when ``train.sharding=fsdp`` or the config
says ``distributed_type: FSDP`` (the plugin's strategy and wrap settings are not used; the units are
``BasicTransformerBlock`` and ``ResnetBlock2D``): the trained UNet, its gradients and optimiser state and the
frozen reference are divided by the number of processes, and the gathered units are an approximation.
DeepSpeed (``train.sharding=zero2/zero3`` or ``distributed_type: DEEPSPEED`` with its ``zero_stage``): ZeRO-3 is
counted as FSDP2; ZeRO-2 divides only the gradients and the optimiser state, keeps the UNet and the reference
whole, and adds a 1/N fp32 master slice and DeepSpeed's gradient reduce bucket. Otherwise DDP replicates everything and adds its gradient buckets (one more copy of the gradients). Where
``smpo train`` refuses the launch (DeepSpeed offload or ZeRO-1; sharding with fp16 or LoRA) the plan is a
:class:`RefusedPlan`, one line saying why.

Modules: :mod:`.sharding` (the launch), :mod:`.models` (model references, configs and parameter counts),
:mod:`.state` (closed forms of the optimiser state and LoRA adapters), :mod:`.activations` (the measured
micro-step), :mod:`.cache` (memoisation in memory and on disk), :mod:`.estimate` (the plan),
:mod:`.report` (its lines), :mod:`.request` (what the command line asks of it).
"""

from __future__ import annotations

from smpo_cli.training.memory.activations import (
    TEXT_LENGTH,
    Activations,
    StepShape,
    measure_activations,
    measure_vae_encode,
)
from smpo_cli.training.memory.cache import MEASURE_VERSION
from smpo_cli.training.memory.estimate import (
    DTYPE_BYTES,
    MIXED_DTYPES,
    GiB,
    MemoryPlan,
    RefusedPlan,
    UnknownPlan,
    gathered_bytes,
    plan_memory,
)
from smpo_cli.training.memory.models import (
    FAMILY_FROZEN,
    FAMILY_NAMES,
    KNOWN_HUB_IDS,
    SD_VAE_CONFIG,
    UNET_CONFIG_DIR,
    ModelInfo,
    UNetShapes,
    clip_text_params,
    count_unet_params,
    resolve_model,
    shipped_unet_config,
    unet_shapes,
)
from smpo_cli.training.memory.report import advice, gib, plan_lines
from smpo_cli.training.memory.request import MemoryRequest, current_request, requested
from smpo_cli.training.memory.sharding import Sharding, read_sharding, shard_bytes, sharding_from_config
from smpo_cli.training.memory.state import (
    LORA_TARGETS,
    lora_adapter_shapes,
    optimizer_state_bytes,
    optimizer_step_bytes,
)

__all__ = [
    "DTYPE_BYTES",
    "FAMILY_FROZEN",
    "FAMILY_NAMES",
    "KNOWN_HUB_IDS",
    "LORA_TARGETS",
    "MEASURE_VERSION",
    "MIXED_DTYPES",
    "SD_VAE_CONFIG",
    "TEXT_LENGTH",
    "UNET_CONFIG_DIR",
    "Activations",
    "GiB",
    "MemoryPlan",
    "MemoryRequest",
    "ModelInfo",
    "RefusedPlan",
    "Sharding",
    "StepShape",
    "UNetShapes",
    "UnknownPlan",
    "advice",
    "clip_text_params",
    "count_unet_params",
    "current_request",
    "gathered_bytes",
    "gib",
    "lora_adapter_shapes",
    "measure_activations",
    "measure_vae_encode",
    "optimizer_state_bytes",
    "optimizer_step_bytes",
    "plan_lines",
    "plan_memory",
    "read_sharding",
    "requested",
    "resolve_model",
    "shard_bytes",
    "sharding_from_config",
    "shipped_unet_config",
    "unet_shapes",
]
