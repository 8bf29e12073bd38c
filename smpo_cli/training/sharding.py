"""FSDP2 for full fine-tuning (``train.sharding=fsdp``): torch's ``fully_shard`` over the processes.

The trained UNet (weights, gradients, optimiser state) and the frozen reference UNet are split across the
processes, one FSDP unit per transformer block and per ResNet block plus the root, so each process holds
about 1/N of them between the units' all-gathers. smpo applies ``fully_shard`` itself rather than through
accelerate's FSDP plugin: the same code then runs on GPUs (NCCL) and on CPU processes (gloo), where
accelerate falls back to DDP. Checkpoints and the exported pipeline hold full (unsharded) tensors, gathered
collectively, so a sharded run's checkpoint reads like any other and the exported pipeline is a plain one.
"""

from __future__ import annotations

from typing import Any

import torch

from smpo_cli.errors import UsageError

# diffusers blocks that become FSDP units (most of a UNet's parameters; the root holds the rest)
UNIT_CLASSES = ("BasicTransformerBlock", "ResnetBlock2D")


def check_sharding(recipe, processes: int, distributed_type: str = "NO", deepspeed_env=None) -> str:
    """How this run shards: ``none`` (DDP), ``fsdp`` (``train.sharding=fsdp`` or an accelerate config with
    ``distributed_type: FSDP``; smpo shards itself, the plugin's wrap settings are not used), ``zero2`` / ``zero3``
    (``train.sharding=zero2/zero3`` or an accelerate DeepSpeed config: its ZeRO stage, read from ``deepspeed_env``,
    by default the environment ``accelerate launch`` set). Refuses what it cannot do."""
    from smpo_cli.training.zero import sharding_of_accelerate_deepspeed

    t = recipe.train
    mode = t.sharding
    if distributed_type == "FSDP" and mode == "none":
        mode = "fsdp"
    elif distributed_type == "DEEPSPEED":
        launched = sharding_of_accelerate_deepspeed(deepspeed_env)
        if mode not in ("none", launched):
            raise UsageError(f"train.sharding={mode} under an accelerate DeepSpeed config (ZeRO {launched[-1]})",
                             hint=f"set train.sharding={launched} or none, or launch with another accelerate config")  # fmt: skip
        mode = launched
    if mode == "none":
        return "none"
    if t.lora_rank is not None:
        raise UsageError(
            f"train.sharding={mode} shards full fine-tuning; with train.lora_rank only the adapters train",
            hint="LoRA needs no sharding (the adapters are a few MB): use train.sharding=none and a DDP config",
        )
    if mode in ("zero2", "zero3") and recipe.optim.name != "adamw":
        raise UsageError(f"train.sharding={mode} with optim.name={recipe.optim.name}: smpo's ZeRO checkpoints hold "
                         "AdamW's state", hint="use optim.name=adamw, or train.sharding=fsdp")  # fmt: skip
    if t.mixed_precision == "fp16":
        raise UsageError(
            f"train.sharding={mode} with train.mixed_precision=fp16: fp16 needs a sharded gradient scaler",
            hint="use train.mixed_precision=bf16 (or no)",
        )
    return mode if processes > 1 else "none"  # one process: nothing to split


def device_mesh(device: torch.device, processes: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (processes,))


def shard_unet(unet: torch.nn.Module, mesh) -> torch.nn.Module:
    """``fully_shard`` each transformer / ResNet block, then the whole UNet (in place; returns it)."""
    from torch.distributed.fsdp import fully_shard

    for module in unet.modules():
        if type(module).__name__ in UNIT_CLASSES:
            fully_shard(module, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    return unet


def local_fraction(params) -> float:
    """The share of the parameters' elements this process holds (1.0 unsharded, about 1/N with FSDP)."""
    local = full = 0
    for p in params:
        full += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local / max(full, 1)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on the main process ({} on the others). Collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(unet, options=_options())


def full_optimizer_state(unet: torch.nn.Module, optimizer) -> dict[str, Any]:
    """The optimiser's full state (keyed by parameter name) on the main process. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(unet, optimizer, options=_options())


def load_optimizer_state(unet: torch.nn.Module, optimizer, state: dict[str, Any]) -> None:
    """Load a full optimiser state (from ``full_optimizer_state``) into the sharded optimiser. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unet, optimizer, state, options=StateDictOptions(full_state_dict=True))


def plain_unet(unet_class, config, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded UNet of ``unet_class`` holding ``state`` (for export on the main process)."""
    plain = unet_class.from_config(config)
    plain.load_state_dict(state)
    return plain


def trainable_names(unet: torch.nn.Module) -> list[str]:
    """Names of the trained parameters in the optimiser's order (FSDP2 keeps the names)."""
    return [name for name, p in unet.named_parameters() if p.requires_grad]


def load_any_optimizer_state(unet: torch.nn.Module, optimizer, state: dict[str, Any], sharded: bool) -> None:
    """Load an optimiser state saved sharded (keyed by parameter name) or not (keyed by index) into this run,
    sharded or not: a run may resume on another number of processes, which decides whether it shards."""
    names = trainable_names(unet)
    named = any(isinstance(k, str) for k in state.get("state", {})) or any(
        isinstance(p, str) for g in state.get("param_groups", []) for p in g.get("params", [])
    )
    if sharded:
        load_optimizer_state(unet, optimizer, state if named else _reindex(state, names, to_names=True))
    else:
        optimizer.load_state_dict(_reindex(state, names, to_names=False) if named else state)


def _reindex(state: dict[str, Any], names: list[str], to_names: bool) -> dict[str, Any]:
    index = {n: i for i, n in enumerate(names)}
    key = (lambda k: names[k]) if to_names else (lambda k: index[k])
    return {
        "state": {key(k): v for k, v in state.get("state", {}).items()},
        "param_groups": [{**g, "params": [key(p) for p in g["params"]]} for g in state.get("param_groups", [])],
    }
