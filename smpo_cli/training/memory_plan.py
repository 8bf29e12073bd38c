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

Sharding follows ``train.sharding`` and the accelerate config (``--accelerate-config`` or
``$ACCELERATE_CONFIG_FILE``; default one process): DDP replicates everything and adds its gradient buckets
(one more copy of the gradients); ``train.sharding=fsdp`` (smpo's own FSDP2) divides weights, gradients,
optimiser state and the reference by the number of processes; an accelerate FSDP full-shard config or
DeepSpeed ZeRO-3 divides weights, gradients and optimiser state (the reference, outside
``accelerator.prepare``, stays whole), ZeRO-2 / SHARD_GRAD_OP gradients and optimiser state, ZeRO-1 the
optimiser state. Gathered units and DeepSpeed's buffers are approximations.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

GiB = 2**30
MEASURE_VERSION = 1  # bump when the measured step changes: invalidates the on-disk cache
UNET_CONFIG_DIR = Path(__file__).resolve().parents[1] / "models" / "assets" / "unet_configs"
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
TEXT_LENGTH = 77  # CLIP tokenizers pad every prompt to 77 tokens

# Hub ids whose UNet is the shipped config of their family (all SD1.5 v1.x checkpoints share one UNet
# architecture; SDXL base 0.9 and 1.0 share theirs).
KNOWN_HUB_IDS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "sd-legacy/stable-diffusion-v1-5": "sd15",
    "benjamin-paine/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-1": "sd15",
    "CompVis/stable-diffusion-v1-2": "sd15",
    "CompVis/stable-diffusion-v1-3": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-xl-base-0.9": "sdxl",
}
# Frozen parameter counts of the hub families (verified by building their configs on the meta device):
# AutoencoderKL (SD and SDXL VAEs, including madebyollin/sdxl-vae-fp16-fix), CLIP ViT-L/14 text model,
# OpenCLIP bigG/14 text model with projection.
FAMILY_FROZEN = {
    "sd15": {"vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}
# The SD / SDXL VAE architecture (stable-diffusion-v1-5 vae/config.json; SDXL's differs only in
# scaling_factor, sample_size and force_upcast, none of which changes memory).
SD_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # smpo_cli.training.lora.DEFAULT_TARGETS
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MIXED_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


# ----------------------------------------------------------------------------- request (CLI -> plan)
@dataclass(frozen=True)
class MemoryRequest:
    """What the command line asks of the plan: a budget in GiB and an accelerate config file."""

    gpu_memory_gib: float | None = None
    accelerate_config: str | None = None


_REQUEST: contextvars.ContextVar[MemoryRequest | None] = contextvars.ContextVar(
    "smpo_memory_request", default=None
)


@contextlib.contextmanager
def requested(request: MemoryRequest) -> Iterator[MemoryRequest]:
    """Within this block ``smpo_cli.config.plan.plan_lines`` adds the memory plan of train recipes."""
    token = _REQUEST.set(request)
    try:
        yield request
    finally:
        _REQUEST.reset(token)


def current_request() -> MemoryRequest | None:
    return _REQUEST.get()


# ----------------------------------------------------------------------------- sharding
@dataclass(frozen=True)
class Sharding:
    """How the accelerate config spreads the training state over the processes."""

    kind: str = "ddp"  # ddp | fsdp | deepspeed
    processes: int = 1
    params: bool = False  # weights sharded
    grads: bool = False
    optimizer: bool = False
    offload_optimizer: bool = False  # optimiser state on the CPU
    offload_params: bool = False
    zero_stage: int | None = None
    strategy: str | None = None  # FSDP sharding strategy as written
    source: str = "default: one process"
    shard_group: int | None = None  # processes one shard group spans (hybrid sharding: one machine's)
    wrap_classes: tuple[str, ...] = ()  # FSDP TRANSFORMER_BASED_WRAP classes (the gathered units)
    reference: bool = False  # the frozen reference UNet is sharded too (train.sharding=fsdp)

    @property
    def shard_count(self) -> int:
        return max(self.shard_group or self.processes, 1)

    @property
    def label(self) -> str:
        n = max(self.processes, 1)
        if self.kind == "fsdp" and self.reference:
            return f"FSDP2 train.sharding=fsdp x{n}"
        if self.kind == "fsdp":
            what = {"FULL_SHARD": "full shard", "SHARD_GRAD_OP": "shard grad op", "NO_SHARD": "no shard",
                    "HYBRID_SHARD": "hybrid shard", "HYBRID_SHARD_ZERO2": "hybrid shard zero2"}.get(
                        self.strategy or "FULL_SHARD", (self.strategy or "").lower())  # fmt: skip
            return f"FSDP {what} x{n}"
        if self.kind == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage or 0} x{n}"
        return f"DDP x{n}"

    def divide(self, nbytes: int, sharded: bool) -> int:
        return shard_bytes(nbytes, self.shard_count) if sharded else nbytes


def shard_bytes(nbytes: int, processes: int) -> int:
    """Bytes per process of ``nbytes`` split evenly over ``processes`` (rounded up)."""
    return -(-int(nbytes) // max(int(processes), 1))


_FSDP_STRATEGIES = {
    1: "FULL_SHARD",
    2: "SHARD_GRAD_OP",
    3: "NO_SHARD",
    4: "HYBRID_SHARD",
    5: "HYBRID_SHARD_ZERO2",
}


def sharding_from_config(config: Mapping[str, Any], source: str = "accelerate config") -> Sharding:
    """:class:`Sharding` of an accelerate config (the YAML of ``accelerate config``, as a mapping)."""
    kind = str(config.get("distributed_type") or "NO").upper()
    n = int(config.get("num_processes") or 1)
    machines = max(int(config.get("num_machines") or 1), 1)
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        offload = bool(fsdp.get("fsdp_offload_params"))
        wrap = ()
        if str(fsdp.get("fsdp_auto_wrap_policy") or "").upper() == "TRANSFORMER_BASED_WRAP":
            classes = fsdp.get("fsdp_transformer_layer_cls_to_wrap") or ""
            wrap = tuple(
                c.strip()
                for c in (classes if isinstance(classes, list) else str(classes).split(","))
                if c.strip()
            )
        if int(fsdp.get("fsdp_version") or 1) >= 2:  # FSDP2 always shards at rest
            return Sharding("fsdp", n, True, True, True, offload, offload, strategy="FULL_SHARD", source=source,
                            wrap_classes=wrap)  # fmt: skip
        raw = fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")
        strategy = _FSDP_STRATEGIES.get(int(raw), "FULL_SHARD") if str(raw).isdigit() else str(raw).upper()
        sharded = strategy != "NO_SHARD"
        group = max(n // machines, 1) if strategy.startswith("HYBRID") else None  # sharded within a machine
        return Sharding("fsdp", n, strategy in ("FULL_SHARD", "HYBRID_SHARD"), sharded, sharded, offload, offload,
                        strategy=strategy, source=source, shard_group=group, wrap_classes=wrap)  # fmt: skip
    if kind == "DEEPSPEED":
        ds = dict(config.get("deepspeed_config") or {})
        stage = ds.get("zero_stage")
        offload_opt = str(ds.get("offload_optimizer_device") or "none").lower()
        offload_par = str(ds.get("offload_param_device") or "none").lower()
        ds_file = ds.get("deepspeed_config_file")
        if ds_file and Path(ds_file).is_file():
            zero = json.loads(Path(ds_file).read_text()).get("zero_optimization") or {}
            stage = zero.get("stage", stage)
            offload_opt = str((zero.get("offload_optimizer") or {}).get("device") or offload_opt).lower()
            offload_par = str((zero.get("offload_param") or {}).get("device") or offload_par).lower()
        stage = int(stage or 0)
        return Sharding("deepspeed", n, stage >= 3, stage >= 2, stage >= 1, offload_opt not in ("none", ""),
                        offload_par not in ("none", ""), zero_stage=stage, source=source)  # fmt: skip
    if kind in ("NO", ""):
        n = 1
    return Sharding("ddp", n, source=source)


def _launched_sharding(env: Mapping[str, str]) -> Sharding:
    """Under ``accelerate launch`` (a real run with --gpu-memory): what the launcher put in the environment."""
    world = int(env.get("WORLD_SIZE", "1")) if str(env.get("WORLD_SIZE", "1")).isdigit() else 1
    if world <= 1:
        return Sharding()
    source = "accelerate launch environment"
    if str(env.get("ACCELERATE_USE_DEEPSPEED", "")).lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0")
        config = {"zero_stage": int(stage) if str(stage).isdigit() else 0}
        return sharding_from_config({"distributed_type": "DEEPSPEED", "num_processes": world, "deepspeed_config": config},
                                    source)  # fmt: skip
    if str(env.get("ACCELERATE_USE_FSDP", "")).lower() == "true":
        config = {"fsdp_sharding_strategy": env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD"),
                  "fsdp_version": env.get("FSDP_VERSION", "1")}  # fmt: skip
        return sharding_from_config(
            {"distributed_type": "FSDP", "num_processes": world, "fsdp_config": config}, source
        )
    return Sharding("ddp", world, source=source)


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


# ----------------------------------------------------------------------------- closed forms
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


def clip_text_params(config: Mapping[str, Any], projection: bool = False) -> int:
    """Parameters of a transformers CLIP text model (with ``projection``: CLIPTextModelWithProjection)."""
    h, i, layers = (
        int(config["hidden_size"]),
        int(config["intermediate_size"]),
        int(config["num_hidden_layers"]),
    )
    embeddings = int(config.get("vocab_size", 49408)) * h + int(config.get("max_position_embeddings", 77)) * h
    per_layer = 4 * (h * h + h) + 2 * 2 * h + (h * i + i) + (i * h + h)
    proj = h * int(config.get("projection_dim", h)) if projection else 0
    return embeddings + layers * per_layer + 2 * h + proj


def lora_adapter_shapes(linears: list[tuple[str, int, int]], rank: int) -> list[tuple[int, ...]]:
    """Adapter weight shapes (lora_A: rank x in, lora_B: out x rank) of the targeted ``(name, in, out)`` linears."""
    shapes: list[tuple[int, ...]] = []
    for name, fan_in, fan_out in linears:
        if any(name == t or name.endswith("." + t) for t in LORA_TARGETS):
            shapes += [(rank, fan_in), (fan_out, rank)]
    return shapes


# ----------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelInfo:
    """What the plan knows of the model without loading it."""

    unet_config: dict[str, Any] | None
    family: str | None
    source: str  # where the UNet config came from, or why there is none
    vae_config: dict[str, Any] | None = None
    frozen_counts: dict[str, int] = field(default_factory=dict)  # vae / text_encoder(_2) -> parameters


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def shipped_unet_config(family: str) -> dict[str, Any]:
    """The SD1.5 / SDXL UNet config shipped with smpo (``unet/config.json`` of the reference hub repo)."""
    return json.loads((UNET_CONFIG_DIR / f"{family}.json").read_text())


def _family_of_config(config: Mapping[str, Any]) -> str:
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"


def _folder_frozen(folder: Path) -> tuple[dict[str, Any] | None, dict[str, int]]:
    """VAE config and frozen counts of a diffusers pipeline folder (None / missing keys when absent)."""
    counts: dict[str, int] = {}
    vae = _read_json(folder / "vae" / "config.json")
    for name in ("text_encoder", "text_encoder_2"):
        cfg = _read_json(folder / name / "config.json")
        if cfg and "hidden_size" in cfg:
            projection = "WithProjection" in " ".join(cfg.get("architectures") or [])
            counts[name] = clip_text_params(cfg, projection)
    return vae, counts


def _hub_cached(repo: str, filename: str, revision: str | None) -> dict[str, Any] | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename, revision=revision)
    except Exception:  # noqa: BLE001 - a cache probe never breaks a plan
        return None
    return _read_json(Path(found)) if isinstance(found, str) else None


def _unet_folder_config(ref: str) -> dict[str, Any] | None:
    path = Path(ref).expanduser()
    for candidate in (path / "config.json", path / "unet" / "config.json"):
        cfg = _read_json(candidate)
        if (
            cfg
            and cfg.get("_class_name", "UNet2DConditionModel") == "UNet2DConditionModel"
            and "block_out_channels" in cfg
        ):
            return cfg
    return None


def _tiny_info(name: str) -> ModelInfo:
    from smpo_cli.models.tiny import TINY_FAMILIES, is_materialized, tiny_model_dir

    family = TINY_FAMILIES[name]
    if family not in FAMILY_NAMES:  # the flow-matching models train a transformer, not a UNet
        return ModelInfo(
            None, family, f"{name} is a {family} transformer model; the memory plan covers UNets"
        )
    folder = tiny_model_dir(name)
    if is_materialized(folder):
        unet = _read_json(folder / "unet" / "config.json")
        vae, counts = _folder_frozen(folder)
        vae_module = None
    else:  # built in memory (tiny: well under a second), nothing written
        from smpo_cli.models.tiny import build_tiny_components

        comps = build_tiny_components(name)
        unet, vae_module = dict(comps["unet"].config), comps["vae"]
        vae = dict(vae_module.config)
        counts = {n: sum(p.numel() for p in comps[n].parameters()) for n in ("text_encoder", "text_encoder_2")
                  if comps.get(n) is not None}  # fmt: skip
    if vae is not None:
        counts["vae"] = (
            _count_vae(vae) if vae_module is None else sum(p.numel() for p in vae_module.parameters())
        )
    return ModelInfo(unet, family, f"embedded tiny model {name}", vae, counts)


def resolve_model(model: Any) -> ModelInfo:
    """The UNet config (and frozen parts) of a recipe's ``model`` block, offline.

    Order: a ``model.unet`` folder's config; a tiny or shipped model's own config; a local diffusers
    folder's ``unet/config.json``; a hub id's config in the local Hugging Face cache; a known SD1.5 /
    SDXL hub id (or an explicit ``model.family``) -> the shipped config of that family. Otherwise the
    config is None and ``source`` says why.
    """
    from smpo_cli.models.shipped import shipped_model_path
    from smpo_cli.models.tiny import is_tiny_name

    pretrained = str(model.pretrained)
    asked = model.family if model.family in FAMILY_NAMES else None
    unet_override = _unet_folder_config(model.unet) if model.unet else None
    override_note = f"model.unet = {model.unet}" if unet_override else None
    if is_tiny_name(pretrained):
        info = _tiny_info(pretrained)
    elif shipped_model_path(pretrained) is not None:
        folder = shipped_model_path(pretrained)
        vae, counts = _folder_frozen(folder)
        if vae is not None:
            counts["vae"] = _count_vae(vae)
        unet = _read_json(folder / "unet" / "config.json")
        info = ModelInfo(unet, _family_of_config(unet or {}), f"shipped model {pretrained}", vae, counts)
    elif Path(pretrained).expanduser().is_dir():
        folder = Path(pretrained).expanduser()
        unet = _unet_folder_config(str(folder))
        vae, counts = _folder_frozen(folder)
        if vae is not None:
            counts["vae"] = _count_vae(vae)
        family = _family_of_config(unet) if unet else asked
        info = ModelInfo(unet, family, f"{folder / 'unet' / 'config.json'}" if unet else f"{folder}: no unet/config.json",
                         vae, counts)  # fmt: skip
    else:
        cached = (
            None
            if Path(pretrained).expanduser().is_file()
            else _hub_cached(pretrained, "unet/config.json", model.revision)
        )
        family = KNOWN_HUB_IDS.get(pretrained) or asked
        if cached is not None:
            fam = _family_of_config(cached)
            info = ModelInfo(cached, fam, f"{pretrained} unet/config.json (local Hugging Face cache)", SD_VAE_CONFIG,
                             dict(FAMILY_FROZEN[fam]))  # fmt: skip
        elif family is None and Path(pretrained).expanduser().is_file() and model.config:
            config_unet = _unet_folder_config(model.config)
            family = _family_of_config(config_unet) if config_unet else KNOWN_HUB_IDS.get(model.config)
            info = ModelInfo(config_unet, family, f"model.config = {model.config}", SD_VAE_CONFIG,
                             dict(FAMILY_FROZEN.get(family or "", {})))  # fmt: skip
        elif family is None and Path(pretrained).expanduser().is_file():
            family = _single_file_family(Path(pretrained).expanduser())
            info = ModelInfo(None, family, f"{pretrained}: single-file checkpoint", SD_VAE_CONFIG,
                             dict(FAMILY_FROZEN.get(family or "", {})))  # fmt: skip
        else:
            why = (
                f"known {FAMILY_NAMES[family]} hub id"
                if pretrained in KNOWN_HUB_IDS
                else f"model.family={family}"
            )
            info = ModelInfo(None, family, f"{pretrained}: {why}" if family else
                             f"{pretrained} is not a known SD1.5/SDXL hub id and not in the local cache",
                             SD_VAE_CONFIG, dict(FAMILY_FROZEN.get(family or "", {})))  # fmt: skip
        if info.unet_config is None and info.family in FAMILY_NAMES:
            info = replace(info, unet_config=shipped_unet_config(info.family),
                           source=f"shipped {FAMILY_NAMES[info.family]} UNet config ({info.source})")  # fmt: skip
    if unet_override is not None:
        info = replace(
            info, unet_config=unet_override, family=_family_of_config(unet_override), source=override_note
        )
    return info


def _single_file_family(path: Path) -> str | None:
    try:
        from smpo_cli.models.loading import detect_family

        return detect_family(str(path))
    except Exception:  # noqa: BLE001
        return None


def _count_vae(config: Mapping[str, Any]) -> int:
    def build() -> int:
        import torch
        from diffusers import AutoencoderKL

        with torch.device("meta"), _quiet():
            vae = AutoencoderKL.from_config(_clean(config))
        return sum(p.numel() for p in vae.parameters())

    return int(_cached("vae-params", _config_key(config), build)[0])


def _clean(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _config_key(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_clean(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- cache
_MEMO: dict[str, Any] = {}


def _cache_file() -> Path:
    from smpo_cli.utils.paths import cache_dir

    return cache_dir() / "memory_plan" / f"cache-v{MEASURE_VERSION}.json"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "diffusers", "transformers", "peft"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def _cached(kind: str, parts: Any, compute: Any, *, use_cache: bool = True) -> tuple[Any, bool]:
    """``compute()`` (JSON-able) memoised in this process and in ``cache_dir()/memory_plan``: (value, was cached).

    Keys include the torch / diffusers / transformers / peft versions, so an upgrade measures again."""
    digest = hashlib.sha256(
        json.dumps([parts, _versions()], sort_keys=True, default=str).encode()
    ).hexdigest()[:24]
    key = f"{kind}:{digest}"
    if use_cache:
        if key in _MEMO:
            return _MEMO[key], True
        stored = (_read_json(_cache_file()) or {}).get(key)
        if stored is not None:
            _MEMO[key] = stored
            return stored, True
    value = compute()
    if use_cache:
        _MEMO[key] = value
        _store(_cache_file(), key, value)
    return value, False


def _store(file: Path, key: str, value: Any) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        data = _read_json(file) or {}
        data[key] = value
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, file)
    except OSError:  # a read-only cache only costs the next dry run the measurement again
        pass


# ----------------------------------------------------------------------------- UNet shapes
@dataclass(frozen=True)
class UNetShapes:
    """Parameter count and trainable shapes of a UNet config, from a meta-device build."""

    params: int
    shapes: list[tuple[int, ...]]
    linears: list[tuple[str, int, int]]  # (module name, in_features, out_features) of every nn.Linear
    largest_block: int  # parameters of the largest down/mid/up block
    units: dict[str, tuple[int, int]] = field(default_factory=dict)  # class name -> (largest, all) parameters


def unet_shapes(config: Mapping[str, Any]) -> UNetShapes:
    """Build ``UNet2DConditionModel.from_config(config)`` on the meta device and read its shapes (cached)."""

    def build() -> dict[str, Any]:
        import torch
        from diffusers import UNet2DConditionModel

        with torch.device("meta"), _quiet():
            unet = UNet2DConditionModel.from_config(_clean(config))
        shapes = [list(p.shape) for p in unet.parameters()]
        linears = [
            [n, m.in_features, m.out_features]
            for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear)
        ]
        blocks = [
            *unet.down_blocks,
            *([unet.mid_block] if unet.mid_block is not None else []),
            *unet.up_blocks,
        ]
        largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
        units: dict[str, list[int]] = {}
        for module in unet.modules():
            n = sum(p.numel() for p in module.parameters())
            big, total = units.get(type(module).__name__, [0, 0])
            units[type(module).__name__] = [max(big, n), total + n]
        return {"params": sum(math.prod(s) for s in shapes), "shapes": shapes, "linears": linears, "largest": largest,
                "units": units}  # fmt: skip

    d, _ = _cached("unet", _config_key(config), build)
    return UNetShapes(int(d["params"]), [tuple(s) for s in d["shapes"]], [tuple(x) for x in d["linears"]],
                      int(d["largest"]), {k: (int(v[0]), int(v[1])) for k, v in d["units"].items()})  # fmt: skip


def count_unet_params(config: Mapping[str, Any]) -> int:
    """Parameters of ``UNet2DConditionModel.from_config(config)``, built on the meta device."""
    return unet_shapes(config).params


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ----------------------------------------------------------------------------- the measured step
@dataclass(frozen=True)
class StepShape:
    """One training micro-step, as the activation measurement runs it."""

    resolution: int
    images: int  # UNet batch: 2 x pairs (dpo, smpo) or pairs (sft)
    policy_dtype: str = "float32"  # the trainable UNet's (full fine-tuning) or base weights' (LoRA) dtype
    autocast: str | None = None  # float16 / bfloat16 under mixed precision, None without autocast
    reference: str = "copy"  # copy | adapters (LoRA) | none (sft)
    reference_dtype: str = "float16"
    lora_rank: int | None = None
    checkpointing: bool = False


@dataclass(frozen=True)
class Activations:
    """Peak bytes of one micro-step's working memory above the persistent state."""

    bytes: int
    method: str  # "meta" (measured at full size on the meta device) | "cpu-scaled (...)"
    seconds: float  # what the measurement took when it ran
    cached: bool = False


class _Tracker:
    """Follows every storage allocated under it: ``current`` live bytes, ``peak`` of (live - kept gradients)."""

    def __init__(self) -> None:
        self.live: dict[int, Any] = {}
        self.current = 0
        self.grads = 0  # bytes that became .grad of a parameter (counted as gradients, not activations)
        self.peak = 0

    def add(self, storage: Any) -> None:
        key = id(storage)
        if key in self.live:
            return
        n = storage.nbytes()

        def freed(_ref, key=key, n=n, tracker=self):
            if tracker.live.pop(key, None) is not None:
                tracker.current -= n

        self.live[key] = weakref.ref(storage, freed)
        self.current += n
        self.peak = max(self.peak, self.current - self.grads)

    @property
    def working(self) -> int:
        return self.current - self.grads


def _dispatch_mode(tracker: _Tracker):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    tensor = torch.Tensor

    def tensors(value: Any, found: list) -> list:  # a flat walk: cheaper than pytree on every op
        if isinstance(value, tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                tensors(v, found)
        elif isinstance(value, dict):
            for v in value.values():
                tensors(v, found)
        return found

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {id(a.untyped_storage()) for a in tensors(kwargs, tensors(args, []))}
            for t in tensors(out, []):
                storage = t.untyped_storage()
                if id(storage) not in inputs:  # views and in-place results allocate nothing
                    tracker.add(storage)
            return out

    return Track()


def _autocast_mode(dtype: Any, device_type: str):
    """A torch-function mode that does what ``torch.autocast`` does on CUDA, for any device.

    Matmuls, convolutions and attention run in ``dtype`` (None: no casting), normalisations, softmax and
    the losses in fp32. Casts of fp32 leaf tensors that require grad (the policy's weights) are cached
    until the outermost region ends, as autocast's weight cache does (with or without grad mode).
    Attention goes to the fused kernel CUDA would pick (flash attention for fp16/bf16, memory-efficient
    attention otherwise; the CPU flash kernel on the CPU), whose backward needs q, k, v, the output and the
    log-sum-exp only, never the attention matrix.
    """
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_map

    low = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.bmm, torch.baddbmm,
           torch.mm, torch.addmm, torch.einsum, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm}  # fmt: skip
    high = {F.group_norm, F.layer_norm, F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax,
            F.mse_loss, torch.exp, torch.pow, torch.Tensor.pow, F.softplus}  # fmt: skip
    halves = (torch.float16, torch.bfloat16)

    class Autocast(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.depth = 0
            self.cache: dict[int, Any] = {}

        def __enter__(self):
            self.depth += 1
            return super().__enter__()

        def __exit__(self, *exc):
            self.depth -= 1
            if self.depth == 0:
                self.cache.clear()
            return super().__exit__(*exc)

        def _cast(self, x, to):
            if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype == to:
                return x
            if x.dtype not in (torch.float32, *halves):
                return x
            if to in halves and x.dtype == torch.float32 and x.is_leaf and x.requires_grad:
                cached = self.cache.get(id(x))
                if cached is None:
                    cached = self.cache[id(x)] = x.to(to)
                return cached
            return x.to(to)

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if dtype is not None and func in low:
                args, kwargs = tree_map(lambda x: self._cast(x, dtype), (args, kwargs))
            elif dtype is not None and func in high:
                args, kwargs = tree_map(lambda x: self._cast(x, torch.float32), (args, kwargs))
            if func is F.scaled_dot_product_attention:
                if dtype is not None:
                    args, kwargs = tree_map(lambda x: self._cast(x, dtype), (args, kwargs))
                return _fused_attention(*args, device_type=device_type, **kwargs)
            return func(*args, **kwargs)

    return Autocast()


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                     device_type="meta"):  # fmt: skip
    import torch

    aten = torch.ops.aten
    if attn_mask is not None or enable_gqa:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask, dropout_p, is_causal, scale=scale
        )
    if device_type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)[0]
    if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    need_lse = q.requires_grad or k.requires_grad or v.requires_grad
    return aten._scaled_dot_product_efficient_attention(
        q, k, v, None, need_lse, dropout_p, is_causal, scale=scale
    )[0]


_DTYPES = ("float32", "float16", "bfloat16")


def _dtype(name: str | None) -> Any:
    import torch

    return None if name is None else getattr(torch, name)


def _unet_inputs(config: Mapping[str, Any], shape: StepShape, device: Any) -> tuple[Any, Any, Any, dict]:
    import torch

    n, side = shape.images, max(shape.resolution // 8, 1)
    x = torch.zeros(n, int(config.get("in_channels", 4)), side, side, device=device)
    t = torch.zeros(n, dtype=torch.long, device=device)
    enc = torch.zeros(n, TEXT_LENGTH, int(config["cross_attention_dim"]), device=device)
    extra: dict[str, Any] = {}
    if config.get("addition_embed_type") == "text_time":
        time_dim = int(config["addition_time_embed_dim"])
        pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * time_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(n, pooled, device=device),
                                       "time_ids": torch.zeros(n, 6, device=device)}}  # fmt: skip
    return x, t, enc, extra


def _cast_tree(value: Any, dtype: Any) -> Any:
    import torch

    if isinstance(value, dict):
        return {k: _cast_tree(v, dtype) for k, v in value.items()}
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _forward(unet: Any, config: Mapping[str, Any], inputs: tuple[Any, Any, Any, dict]) -> Any:
    """``smpo_cli.training.step._forward``: inputs cast to the UNet's dtype, prediction in float32."""
    x, t, enc, extra = inputs
    dtype = next(unet.parameters()).dtype
    return unet(
        x.to(dtype), t, encoder_hidden_states=enc.to(dtype), **_cast_tree(extra, dtype)
    ).sample.float()


def _simulate_policy(config: Mapping[str, Any], shape: StepShape, device_type: str) -> tuple[int, int]:
    """Policy forward (under autocast), loss, backward: (peak working bytes, working bytes when the
    reference would run, i.e. after the policy forward with autocast's weight cache still held)."""
    import torch
    from diffusers import UNet2DConditionModel

    device = torch.device(device_type)
    with device, _quiet():
        unet = UNet2DConditionModel.from_config(_clean(config)).to(_dtype(shape.policy_dtype))
    if shape.lora_rank is not None:
        unet.requires_grad_(False)
        try:
            from smpo_cli.training.lora import add_lora

            with _quiet():
                add_lora(unet, rank=shape.lora_rank)
            for p in unet.parameters():
                if p.requires_grad:  # the adapters train in fp32, as the runner does
                    p.data = p.data.float()
        except ImportError:  # without peft: the frozen UNet's activations (the adapters' own are small)
            pass
    unet.train()
    autocast = _autocast_mode(_dtype(shape.autocast), device_type)
    if shape.checkpointing:

        def checkpointed(module, *args):
            def run(*inner):
                if autocast.depth:
                    return module(*inner)
                # recomputation during backward re-enters autocast, as torch.utils.checkpoint does
                with autocast:
                    return module(*inner)

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

        unet.enable_gradient_checkpointing(checkpointed)
    tracker = _Tracker()

    def accumulated(p):
        tracker.grads += p.grad.untyped_storage().nbytes()

    hooks = [p.register_post_accumulate_grad_hook(accumulated) for p in unet.parameters() if p.requires_grad]
    try:
        with _dispatch_mode(tracker), _quiet():
            inputs = _unet_inputs(config, shape, device)
            with autocast:
                pred = _forward(unet, config, inputs)
                at_reference = tracker.working
            loss = pred.pow(2).mean()
            del pred
            loss.backward()
            del loss
    finally:
        for h in hooks:
            h.remove()
    return tracker.peak, at_reference


def _simulate_reference(config: Mapping[str, Any], shape: StepShape, device_type: str) -> int:
    """Peak bytes of the reference's no_grad forward (its own temporaries and its float32 prediction)."""
    import torch
    from diffusers import UNet2DConditionModel

    device = torch.device(device_type)
    dtype = _dtype(shape.reference_dtype)
    with device, _quiet():
        ref = UNet2DConditionModel.from_config(_clean(config)).to(dtype).requires_grad_(False).eval()
    inputs = _unet_inputs(config, shape, device)  # made before tracking: the policy's step already holds them
    tracker = _Tracker()
    with (
        _dispatch_mode(tracker),
        _autocast_mode(_dtype(shape.autocast), device_type),
        torch.no_grad(),
        _quiet(),
    ):
        out = _forward(ref, config, inputs)
        del out
    return tracker.peak


def _simulate(config: Mapping[str, Any], shape: StepShape, device_type: str) -> int:
    """Peak working bytes of one micro-step: policy forward, reference forward (no_grad), backward."""
    peak, at_reference = _simulate_policy(config, shape, device_type)
    if shape.reference == "none":
        return peak
    reference, _ = _cached("reference", [_config_key(config), _reference_parts(shape), device_type],
                           lambda: _simulate_reference(config, shape, device_type))  # fmt: skip
    return max(peak, at_reference + int(reference))


def _reference_parts(shape: StepShape) -> list[Any]:
    dtype = shape.policy_dtype if shape.reference == "adapters" else shape.reference_dtype
    return [shape.resolution, shape.images, dtype, shape.autocast]


def _shrunk(config: Mapping[str, Any], factor: int) -> tuple[dict[str, Any], float]:
    """The same UNet with every width divided by about ``factor`` (for the CPU fallback), and the
    factor the widths were really divided by (widths stay multiples of 8)."""
    cfg = _clean(config)
    old = [int(c) for c in cfg["block_out_channels"]]
    channels = [max(8, -(-c // factor // 8) * 8) for c in old]
    cfg["block_out_channels"] = channels
    cfg["norm_num_groups"] = math.gcd(int(cfg.get("norm_num_groups") or 32), *channels)
    cfg["cross_attention_dim"] = max(int(cfg["cross_attention_dim"]) // factor, 8)
    if cfg.get("addition_embed_type") == "text_time":
        time_dim = int(cfg["addition_time_embed_dim"])
        pooled = int(cfg["projection_class_embeddings_input_dim"]) - 6 * time_dim
        cfg["addition_time_embed_dim"] = max(time_dim // factor // 2 * 2, 2)  # sinusoidal: even
        cfg["projection_class_embeddings_input_dim"] = 6 * cfg["addition_time_embed_dim"] + max(
            pooled // factor, 8
        )
    return cfg, sum(old) / sum(channels)


def measure_activations(config: Mapping[str, Any], shape: StepShape, *, device: str = "meta",
                        use_cache: bool = True) -> Activations:  # fmt: skip
    """Peak working memory of one micro-step of ``shape`` (cached in memory and on disk).

    ``device="meta"`` runs the step at full size on meta tensors. Should an op fail there, or with
    ``device="cpu"``, the step runs on the CPU with every width divided by 8 (32 for a UNet of over
    100M parameters) at the real resolution, and the result is scaled back up by that factor (activations
    grow linearly with the widths; the fp32-to-half weight copies grow with their square, so the fallback
    overstates them less than it would understate the rest).
    """
    if shape.reference == "copy" and shape.reference_dtype not in _DTYPES:
        raise ValueError(f"unknown reference dtype {shape.reference_dtype!r}")

    def measure() -> dict[str, Any]:
        started = time.perf_counter()
        reason = ""
        if device == "meta":
            try:
                return {"bytes": _simulate(config, shape, "meta"), "method": "meta",
                        "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - fall back to a scaled CPU measurement
                reason = f" after the meta device failed ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''})"
        small, factor = _shrunk(config, 32 if unet_shapes(config).params > 100_000_000 else 8)
        measured = _simulate(small, shape, "cpu")
        return {"bytes": int(measured * factor), "method": f"cpu-scaled (widths / {factor:.3g}, x {factor:.3g}){reason}",
                "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip

    value, cached = _cached(
        "step", [_config_key(config), asdict(shape), device], measure, use_cache=use_cache
    )
    return Activations(int(value["bytes"]), str(value["method"]), float(value["seconds"]), cached)


def measure_vae_encode(vae_config: Mapping[str, Any], images: int, resolution: int, dtype: str) -> int:
    """Peak bytes of encoding ``images`` pictures with the frozen VAE (no_grad, on the meta device)."""

    def measure() -> int:
        import torch
        from diffusers import AutoencoderKL

        with torch.device("meta"), _quiet():
            vae = AutoencoderKL.from_config(_clean(vae_config)).to(_dtype(dtype)).requires_grad_(False)
        tracker = _Tracker()
        with _dispatch_mode(tracker), _autocast_mode(None, "meta"), torch.no_grad(), _quiet():
            pixels = torch.zeros(images, 3, resolution, resolution, device="meta", dtype=_dtype(dtype))
            dist = vae.encode(pixels).latent_dist
            latents = dist.mean.float() + dist.std.float()
            del dist, latents, pixels
        return tracker.peak

    return int(_cached("vae-encode", [_config_key(vae_config), images, resolution, dtype], measure)[0])


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU of a training run (see the module docstring for what each part holds)."""

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
    gathered: int  # FSDP / ZeRO-3: the unsharded blocks being computed (approximate)
    total: int
    unet_params: int
    trainable_params: int
    frozen_params: int
    precision: str  # "fp16 mixed precision" | "bf16 mixed precision" | "fp32"
    sharding: str  # "DDP x1", "FSDP full shard x8", ...
    optimizer_name: str
    checkpointing: bool
    config_source: str
    activation_method: str
    seconds: float  # what the activation measurements took (0 when cached)
    peak_of: str  # which moment the total is the peak of: activations | optimiser step | VAE encode
    notes: tuple[str, ...] = ()
    device: str = "GPU"  # "GPU", or "process" for device=cpu recipes
    recipe_sharding: bool = (
        False  # the recipe could set train.sharding=fsdp (full fine-tuning, schema has it)
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def over(self, budget_gib: float) -> bool:
        return self.total > budget_gib * GiB


@dataclass(frozen=True)
class UnknownPlan:
    """No parameter count offline: ``reason`` says which model could not be resolved."""

    reason: str


def gib(nbytes: float) -> str:
    """``3.4 GiB``; below 1 GiB in MiB (``12 MiB``), below 1 MiB in KiB."""
    if nbytes >= GiB or nbytes == 0:
        return f"{nbytes / GiB:.1f} GiB"
    if nbytes >= 2**20:
        return f"{nbytes / 2**20:.0f} MiB"
    return f"{nbytes / 2**10:.0f} KiB"


# smpo_cli.training.sharding.UNIT_CLASSES: the FSDP units of train.sharding=fsdp
RECIPE_FSDP_UNITS = ("BasicTransformerBlock", "ResnetBlock2D")


def effective_sharding(recipe: Any, sharding: Sharding) -> Sharding:
    """``sharding`` as the runner applies it: ``train.sharding=fsdp`` (full fine-tuning, several processes) shards
    the UNet and the reference with torch's FSDP2 itself, one unit per transformer / ResNet block, and keeps
    accelerate from wrapping the UNet in DDP."""
    t = recipe.train
    if getattr(t, "sharding", "none") == "fsdp" and t.lora_rank is None and sharding.processes > 1:
        return Sharding("fsdp", sharding.processes, True, True, True, strategy="FULL_SHARD",
                        source=f"train.sharding=fsdp over {sharding.source}", wrap_classes=RECIPE_FSDP_UNITS,
                        reference=True)  # fmt: skip
    return sharding


def _accumulation(recipe: Any, processes: int) -> int:
    try:
        from smpo_cli.training.batching import plan_batches

        return plan_batches(recipe, processes, None).grad_accum_steps
    except Exception:  # noqa: BLE001 - a split the runner would refuse: the recipe's own setting
        return recipe.train.grad_accum_steps


def plan_memory(recipe: Any, *, accelerate_config: str | None = None, sharding: Sharding | None = None,
                model_info: ModelInfo | None = None, device: str = "meta") -> MemoryPlan | UnknownPlan:  # fmt: skip
    """The memory plan of a validated train recipe (no weights, no network)."""
    info = model_info or resolve_model(recipe.model)
    if info.unet_config is None:
        return UnknownPlan(f"parameter count unknown offline ({info.source})")
    sharding = effective_sharding(recipe, sharding or read_sharding(accelerate_config))
    t, method = recipe.train, recipe.method.name
    mixed = MIXED_DTYPES.get(t.mixed_precision)
    frozen_dtype = recipe.model.dtype if recipe.model.dtype != "auto" else (mixed or "float32")
    frozen_b = DTYPE_BYTES[frozen_dtype]
    shapes = unet_shapes(info.unet_config)
    # DeepSpeed with mixed precision keeps half-precision weights and gradients (no autocast) and fp32
    # master weights inside its optimiser
    deepspeed_half = sharding.kind == "deepspeed" and mixed is not None and t.lora_rank is None
    notes: list[str] = []
    if t.lora_rank is not None:
        trainable_shapes = lora_adapter_shapes(shapes.linears, t.lora_rank)
        trainable = sum(math.prod(s) for s in trainable_shapes)
        weights = shapes.params * frozen_b + 4 * trainable
        reference_mode, reference = ("none" if method == "sft" else "adapters"), 0
        policy_dtype, ref_dtype = frozen_dtype, frozen_dtype
    else:
        trainable_shapes, trainable = shapes.shapes, shapes.params
        weights = shapes.params * (DTYPE_BYTES[mixed] if deepspeed_half else 4)
        reference_mode = "none" if method == "sft" else "copy"
        # without autocast the runner moves the reference to fp32 too (see runner.py)
        ref_dtype = "float32" if t.mixed_precision == "no" else frozen_dtype
        reference = 0 if method == "sft" else shapes.params * DTYPE_BYTES[ref_dtype]
        policy_dtype = mixed if deepspeed_half else "float32"
    gradients = trainable * (2 if deepspeed_half else 4)
    optimizer = optimizer_state_bytes(recipe.optim.name, trainable_shapes) + (
        4 * trainable if deepspeed_half else 0
    )
    step_temp = optimizer_step_bytes(recipe.optim.name, trainable_shapes)
    frozen_params = sum(info.frozen_counts.values())
    frozen = frozen_params * frozen_b
    if not info.frozen_counts:
        notes.append("VAE and text encoder sizes unknown: not counted")
    images = t.batch_size * (1 if method == "sft" else 2)
    base = StepShape(resolution=recipe.data.resolution, images=images, policy_dtype=policy_dtype,
                     autocast=None if deepspeed_half else mixed, reference=reference_mode,
                     reference_dtype=ref_dtype, lora_rank=t.lora_rank)  # fmt: skip
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
    weights_g = (
        0 if (sharding.offload_params and sharding.params) else sharding.divide(weights, sharding.params)
    )
    gradients_g = sharding.divide(gradients, sharding.grads)
    optimizer_g = 0 if sharding.offload_optimizer else sharding.divide(optimizer, sharding.optimizer)
    step_g = 0 if sharding.offload_optimizer else sharding.divide(step_temp, sharding.optimizer)
    reference_g = sharding.divide(reference, sharding.reference)
    ddp_buckets = gradients if sharding.kind == "ddp" and sharding.shard_count > 1 else 0
    gathered = 0
    if sharding.params and sharding.shard_count > 1:
        # train.sharding=fsdp gathers fp32 weights (no FSDP mixed-precision policy; autocast casts them)
        nbytes = 4 if sharding.reference else DTYPE_BYTES[mixed or "float32"]
        gathered, how = gathered_bytes(sharding, shapes, nbytes)
        notes.append(f"sharded weights: {how} (approximate)")
    if sharding.kind == "deepspeed":
        notes.append("DeepSpeed's communication buckets are not included")
    if _accumulation(recipe, sharding.processes) == 1:
        notes.append("one micro-batch per step: gradients and activations overlap less than this sum says")
    moments = {"activations": activations, "optimiser step": step_g, "VAE encode": vae_encode}
    peak_of = max(moments, key=lambda k: moments[k])
    persistent = weights_g + gradients_g + optimizer_g + reference_g + frozen + ddp_buckets + gathered
    methods = sorted({without.method, with_ck.method})
    return MemoryPlan(
        weights=weights_g, gradients=gradients_g, optimizer=optimizer_g, reference=reference_g, frozen=frozen,
        activations=activations, activations_without_checkpointing=without.bytes,
        activations_with_checkpointing=with_ck.bytes, optimizer_step=step_g, vae_encode=vae_encode,
        ddp_buckets=ddp_buckets, gathered=gathered, total=persistent + moments[peak_of],
        unet_params=shapes.params, trainable_params=trainable, frozen_params=frozen_params,
        precision=f"{t.mixed_precision} mixed precision" if mixed else "fp32", sharding=sharding.label,
        optimizer_name=recipe.optim.name, checkpointing=t.gradient_checkpointing, config_source=info.source,
        activation_method=" / ".join(methods),
        seconds=round(sum(a.seconds for a in (without, with_ck) if not a.cached), 2), peak_of=peak_of,
        notes=tuple(notes), device="process" if getattr(recipe, "device", "auto") == "cpu" else "GPU",
        recipe_sharding=hasattr(t, "sharding") and t.lora_rank is None,
    )  # fmt: skip


def gathered_bytes(sharding: Sharding, shapes: UNetShapes, nbytes: int) -> tuple[int, str]:
    """Unsharded weights held while a sharded UNet computes, and how that was reckoned."""
    if sharding.kind == "deepspeed":  # stage3_max_live_parameters defaults to 1e9
        return min(shapes.params, 1_000_000_000) * nbytes, "ZeRO-3 keeps up to 1e9 gathered parameters live"
    wrapped = [shapes.units[c] for c in sharding.wrap_classes if c in shapes.units]
    if not wrapped:
        return shapes.params * nbytes, "no FSDP transformer wrap policy: the whole UNet is gathered"
    root = max(shapes.params - sum(total for _, total in wrapped), 0)
    largest = max(big for big, _ in wrapped)
    how = f"the root unit and two {'/'.join(sharding.wrap_classes)} units are gathered"
    return (root + 2 * largest) * nbytes, how


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def plan_lines(plan: MemoryPlan | UnknownPlan, budget_gib: float | None = None) -> list[tuple[str, str]]:
    """(level, text) lines of ``plan`` for the dry-run plan; a "warn" line when it exceeds ``budget_gib``."""
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
    if "FSDP" not in plan.sharding and "ZeRO-3" not in plan.sharding:
        if plan.recipe_sharding:
            tips.append("train.sharding=fsdp on several GPUs (splits weights, gradients, optimiser state and the "
                        "reference over them; --accelerate-config PATH plans for that many processes)")  # fmt: skip
        else:
            tips.append("an FSDP or DeepSpeed ZeRO accelerate config that shards weights, gradients and optimiser "
                        "state over the GPUs (--accelerate-config PATH)")  # fmt: skip
    tips.append("a smaller train.batch_size (activations grow with it; raise train.grad_accum_steps to keep the "
                "pairs per step)")  # fmt: skip
    if plan.optimizer_name == "adamw":
        tips.append("optim.name=adafactor or adamw8bit (smaller optimiser state)")
    return tips
