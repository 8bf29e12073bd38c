"""The working memory of one training micro-step, measured on meta tensors of the real shapes.

:func:`measure_activations` runs the step the runner runs (``smpo_cli.training.step``: the policy forward
under autocast, the reference forward under ``no_grad``, the backward) on the meta device while a
dispatch-level tracker follows every tensor it allocates and frees: activations saved for backward, gradient
checkpoint recomputation, autocast's half-precision copies of the weights, attention temporaries, the
gradients being made. CUDA's autocast and fused attention kernels are emulated (see
:func:`_autocast_mode`). Should the meta device fail, a narrower UNet runs on the CPU and the result is scaled
up. :func:`measure_vae_encode` does the same for the VAE encoding of a micro-batch. Results are cached per
(config, step shape, library versions) by :mod:`smpo_cli.training.memory.cache`.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from smpo_cli.training.memory.cache import _cached, _clean, _config_key, _quiet
from smpo_cli.training.memory.models import unet_shapes

TEXT_LENGTH = 77  # CLIP tokenizers pad every prompt to 77 tokens


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
