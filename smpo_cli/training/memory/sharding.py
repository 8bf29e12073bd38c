"""The launch a memory plan is made for: accelerate's distributed type and the number of processes.

Read from an accelerate config (``--accelerate-config`` or ``$ACCELERATE_CONFIG_FILE``) or, in a real run under
``accelerate launch``, from the environment the launcher set; default one process. Like the trainer
(``smpo_cli.training.sharding.check_sharding``) the plan takes nothing else from the config: smpo shards with
its own FSDP2 when ``train.sharding=fsdp`` or ``distributed_type: FSDP`` (the FSDP plugin's strategy, wrap and
offload settings are not used), and runs DeepSpeed itself with the ZeRO stage of a DeepSpeed config
(``deepspeed_config.zero_stage``; it refuses offload).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Sharding:
    """How a run is launched: what the trainer's ``check_sharding`` decides sharding by."""

    distributed_type: str = "NO"  # as accelerate names it: NO, MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED, ...
    processes: int = 1
    source: str = "default: one process"
    # DEEPSPEED: the settings smpo reads, as the ACCELERATE_DEEPSPEED_* variables accelerate launch sets
    deepspeed: Mapping[str, str] | None = None


def shard_bytes(nbytes: int, processes: int) -> int:
    """Bytes per process of ``nbytes`` split evenly over ``processes`` (rounded up)."""
    return -(-int(nbytes) // max(int(processes), 1))


def sharding_from_config(config: Mapping[str, Any], source: str = "accelerate config") -> Sharding:
    """:class:`Sharding` of an accelerate config (the YAML of ``accelerate config``, as a mapping)."""
    kind = str(config.get("distributed_type") or "NO").upper()
    processes = 1 if kind == "NO" else max(int(config.get("num_processes") or 1), 1)
    deepspeed = None
    if kind == "DEEPSPEED":
        ds = config.get("deepspeed_config") or {}
        deepspeed = {"ACCELERATE_DEEPSPEED_ZERO_STAGE": str(ds.get("zero_stage", 2)),
                     "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": str(ds.get("offload_optimizer_device") or "none"),
                     "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": str(ds.get("offload_param_device") or "none")}  # fmt: skip
    return Sharding(kind, processes, source, deepspeed)


def _launched_sharding(env: Mapping[str, str]) -> Sharding:
    """Under ``accelerate launch`` (a real run with --gpu-memory): what the launcher put in the environment."""
    world = int(env.get("WORLD_SIZE", "1")) if str(env.get("WORLD_SIZE", "1")).isdigit() else 1
    deepspeed = None
    if str(env.get("ACCELERATE_USE_DEEPSPEED", "")).lower() == "true":
        kind = "DEEPSPEED"
        deepspeed = {k: str(v) for k, v in env.items() if k.startswith("ACCELERATE_DEEPSPEED_")}
    elif str(env.get("ACCELERATE_USE_FSDP", "")).lower() == "true":
        kind = "FSDP"
    elif world > 1:
        kind = "MULTI_GPU"
    else:
        return Sharding()
    return Sharding(kind, max(world, 1), "accelerate launch environment", deepspeed)


def read_sharding(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Sharding:
    """The sharding of accelerate config ``path``, else of ``$ACCELERATE_CONFIG_FILE``, else what ``accelerate
    launch`` set in the environment (``WORLD_SIZE`` and its FSDP / DeepSpeed flags), else one process."""
    env = os.environ if env is None else env
    chosen = path or env.get("ACCELERATE_CONFIG_FILE") or None
    if not chosen:
        return _launched_sharding(env)
    import yaml

    from smpo_cli.errors import UsageError

    file = Path(chosen).expanduser()
    if not file.is_file():
        raise UsageError(f"accelerate config {file} does not exist",
                         hint="pass the YAML that `accelerate config` wrote (--accelerate-config PATH)")  # fmt: skip
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"accelerate config {file} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"accelerate config {file} is not a mapping")
    return sharding_from_config(data, source=str(file))
