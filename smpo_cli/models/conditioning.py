"""Prompt conditioning for SD1.5 / SDXL UNets and SD3 / FLUX.1 transformers, built the way diffusers'
pipelines build it.

``encode_prompts(components, prompts)`` returns a :class:`Conditioning`:

* SD1.5 family: ``prompt_embeds`` = last hidden state of the CLIP text encoder (attention mask
  passed only when the encoder config asks for it), as ``StableDiffusionPipeline.encode_prompt``.
* SDXL: ``prompt_embeds`` = penultimate hidden states of both text encoders, concatenated on the
  feature axis; ``pooled`` = the projected pooled output (``text_embeds``) of text encoder 2;
  ``time_ids`` = ``(original_h, original_w, crop_top, crop_left, target_h, target_w)`` per sample,
  as ``StableDiffusionXLPipeline.encode_prompt`` / ``_get_add_time_ids``.

* SD3 / SD3.5: a :class:`FlowConditioning` with ``prompt_embeds`` = the penultimate hidden states of
  both CLIP encoders concatenated on the feature axis, zero-padded to the T5 width and followed (on the
  sequence axis) by T5's last hidden state (``max_sequence_length`` 256 tokens); ``pooled`` = both
  projected pooled outputs concatenated, as ``StableDiffusion3Pipeline.encode_prompt``.
* FLUX.1: ``prompt_embeds`` = T5's last hidden state (512 tokens), ``pooled`` = the CLIP pooler output,
  ``txt_ids`` = zeros ``(L, 3)``, as ``FluxPipeline.encode_prompt``; :func:`pack_latents`,
  :func:`latent_image_ids` and :func:`flux_guidance` give the rest of the transformer's inputs.

Text encoders run in their own dtype and, by default, under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from smpo_cli.errors import UsageError
from smpo_cli.utils.logging import get_logger, warning_once

logger = get_logger(__name__)

Size = tuple[int, int]


@dataclass
class Conditioning:
    """What a UNet needs besides the latent and the timestep, for a batch of ``B`` samples.

    ``prompt_embeds`` ``(B, L, D)``; ``pooled`` ``(B, P)`` and ``time_ids`` ``(B, 6)`` for SDXL
    (``None`` for SD1.5). A batch of 1 broadcasts in :meth:`expand`.
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.prompt_embeds.ndim != 3:
            raise UsageError(f"prompt_embeds must be (B, L, D), got shape {tuple(self.prompt_embeds.shape)}")
        if (self.pooled is None) != (self.time_ids is None):
            raise UsageError("SDXL conditioning needs both pooled and time_ids (or neither, for SD1.5)")
        b = self.prompt_embeds.shape[0]
        for name in ("pooled", "time_ids"):
            value = getattr(self, name)
            if value is not None and (value.ndim != 2 or value.shape[0] != b):
                raise UsageError(f"{name} must be ({b}, N), got shape {tuple(value.shape)}")

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])

    @property
    def batch_size(self) -> int:
        return len(self)

    @property
    def is_sdxl(self) -> bool:
        return self.pooled is not None

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``UNet2DConditionModel.forward``: ``encoder_hidden_states`` and
        ``added_cond_kwargs`` (``{"text_embeds", "time_ids"}`` for SDXL, ``None`` otherwise)."""
        added = None if self.pooled is None else {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return {"encoder_hidden_states": self.prompt_embeds, "added_cond_kwargs": added}

    def _map(self, fn) -> Conditioning:
        return Conditioning(
            fn(self.prompt_embeds),
            None if self.pooled is None else fn(self.pooled),
            None if self.time_ids is None else fn(self.time_ids),
        )

    def index(self, idx: torch.Tensor | Sequence[int] | slice | int) -> Conditioning:
        """The samples at ``idx`` (an index tensor, a list, a slice or one int, which keeps the batch axis)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        elif not isinstance(idx, slice):
            idx = torch.as_tensor(idx, dtype=torch.long, device=self.prompt_embeds.device)
        return self._map(lambda t: t[idx])

    def cat(self, other: Conditioning) -> Conditioning:
        """This batch followed by ``other`` (same family and shapes)."""
        if self.is_sdxl != other.is_sdxl:
            raise UsageError("cannot concatenate SD1.5 and SDXL conditioning")
        if self.prompt_embeds.shape[1:] != other.prompt_embeds.shape[1:]:
            raise UsageError(
                f"cannot concatenate prompt_embeds of shapes {tuple(self.prompt_embeds.shape)} "
                f"and {tuple(other.prompt_embeds.shape)}"
            )
        return Conditioning(
            torch.cat([self.prompt_embeds, other.prompt_embeds]),
            None if self.pooled is None else torch.cat([self.pooled, other.pooled]),
            None if self.time_ids is None else torch.cat([self.time_ids, other.time_ids]),
        )

    def expand(self, batch_size: int) -> Conditioning:
        """A batch of ``batch_size``: itself when it already has that size, broadcast from a batch of 1."""
        if len(self) == batch_size:
            return self
        if len(self) != 1:
            raise UsageError(f"conditioning has batch {len(self)}; expected {batch_size} or 1")
        return self._map(lambda t: t.expand(batch_size, *t.shape[1:]))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Moved to ``device`` and (floating tensors) cast to ``dtype``."""
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def zeros_like(self) -> Conditioning:
        """All-zero embeddings with the same time ids: SDXL's unconditional input when
        ``force_zeros_for_empty_prompt`` is set (SDXL base)."""
        return Conditioning(
            torch.zeros_like(self.prompt_embeds),
            None if self.pooled is None else torch.zeros_like(self.pooled),
            self.time_ids,
        )


def _device_of(module: torch.nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:  # pragma: no cover - a text encoder always has parameters
        return torch.device("cpu")


def _tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    longest = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if longest.shape[-1] > inputs.input_ids.shape[-1]:
        warning_once(
            logger, f"prompts longer than {tokenizer.model_max_length} tokens were truncated (CLIP limit)"
        )
    return inputs


def _pairs(value: Any, batch: int, name: str, default: Size) -> list[Size]:
    """One ``(a, b)`` pair per sample from None, one pair, a sequence of pairs or a ``(B, 2)`` tensor."""
    if value is None:
        return [default] * batch
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    value = list(value)
    if len(value) == 2 and all(isinstance(v, int | float) for v in value):
        return [(int(value[0]), int(value[1]))] * batch
    if len(value) != batch:
        raise UsageError(
            f"{name} has {len(value)} entries for {batch} prompts",
            hint="give one (a, b) pair or one per prompt",
        )
    out = []
    for pair in value:
        pair = list(pair)
        if len(pair) != 2:
            raise UsageError(f"{name} entries must be (a, b) pairs, got {pair}")
        out.append((int(pair[0]), int(pair[1])))
    return out


def encode_prompts(
    components: Any,
    prompts: Sequence[str] | str,
    *,
    original_sizes: Any = None,
    crop_coords: Any = None,
    target_size: Any = None,
    device: torch.device | str | None = None,
    grad: bool = False,
) -> Conditioning:
    """Encode ``prompts`` for the UNet of ``components`` (a ``DiffusionComponents``).

    SDXL only: ``original_sizes`` (original image ``(h, w)``), ``crop_coords`` (``(top, left)``)
    and ``target_size`` (``(h, w)``) each take one pair for the whole batch or one pair per
    prompt (a list or a ``(B, 2)`` tensor). Defaults as in ``StableDiffusionXLPipeline.__call__``:
    ``target_size`` = the UNet's default image size (``unet.config.sample_size *
    pipe.vae_scale_factor``), ``original_sizes`` = ``target_size``, ``crop_coords`` = ``(0, 0)``.

    Returns tensors on ``device`` (default: the components' device) in the text encoders' dtype
    (``time_ids`` too, as diffusers does). ``grad=True`` keeps the autograd graph (text-encoder
    training); by default the encoders run under ``torch.no_grad()``.
    """
    prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    if not prompts:
        raise UsageError("encode_prompts needs at least one prompt")
    family = getattr(components, "family", None)
    if family in ("sd3", "flux"):
        if any(v is not None for v in (original_sizes, crop_coords, target_size)):
            raise UsageError("original_sizes / crop_coords / target_size are SDXL conditioning only")
        return encode_flow_prompts(components, prompts, device=device, grad=grad)
    if family not in ("sd15", "sdxl"):
        raise UsageError(
            f"unknown model family {family!r}", hint="pass a DiffusionComponents from load_components"
        )
    if components.text_encoder is None or components.tokenizer is None:
        raise UsageError(
            "encode_prompts needs the text encoder and tokenizer", hint="load them with the model"
        )
    out_device = torch.device(device) if device is not None else getattr(components, "device", None)
    context = torch.enable_grad() if grad else torch.no_grad()
    with context:
        if family == "sd15":
            if any(v is not None for v in (original_sizes, crop_coords, target_size)):
                raise UsageError("original_sizes / crop_coords / target_size are SDXL conditioning only")
            return _encode_sd15(components, prompts, out_device)
        return _encode_sdxl(components, prompts, out_device, original_sizes, crop_coords, target_size)


def _encode_sd15(components: Any, prompts: list[str], device) -> Conditioning:
    encoder = components.text_encoder
    inputs = _tokenize(components.tokenizer, prompts)
    enc_device = _device_of(encoder)
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = inputs.attention_mask.to(enc_device)
    embeds = encoder(inputs.input_ids.to(enc_device), attention_mask=mask)[0]
    return Conditioning(embeds.to(device=device or enc_device, dtype=encoder.dtype))


def _default_image_size(components: Any) -> Size:
    unet, vae = components.unet, components.vae
    if unet is None or vae is None:
        raise UsageError(
            "target_size is needed when the UNet or VAE is not loaded",
            hint="pass target_size=(height, width) of the training images",
        )
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    sample = unet.config.sample_size
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return (int(h) * scale, int(w) * scale)


def _encode_sdxl(
    components: Any, prompts: list[str], device, original_sizes, crop_coords, target_size
) -> Conditioning:
    encoders = [components.text_encoder, components.text_encoder_2]
    tokenizers = [components.tokenizer, components.tokenizer_2]
    if encoders[1] is None or tokenizers[1] is None:
        raise UsageError(
            "SDXL conditioning needs text_encoder_2 and tokenizer_2", hint="load them with the model"
        )
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        enc_device = _device_of(encoder)
        ids = _tokenize(tokenizer, prompts).input_ids.to(enc_device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if encoder is encoders[1]:
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    dtype = encoders[1].dtype
    out_device = device or _device_of(encoders[1])
    embeds = torch.cat([h.to(device=out_device) for h in hidden], dim=-1).to(dtype=dtype)

    b = len(prompts)
    if target_size is None:
        target = [_default_image_size(components)] * b
    else:
        target = _pairs(target_size, b, "target_size", (0, 0))
    original = (
        _pairs(original_sizes, b, "original_sizes", target[0]) if original_sizes is not None else target
    )
    crops = _pairs(crop_coords, b, "crop_coords", (0, 0))
    time_ids = torch.tensor(
        [[*o, *c, *t] for o, c, t in zip(original, crops, target, strict=True)],
        dtype=dtype,
        device=out_device,
    )
    _check_time_embed_dim(components, time_ids.shape[1], pooled.shape[-1])
    return Conditioning(embeds, pooled.to(device=out_device, dtype=dtype), time_ids)


def _check_time_embed_dim(components: Any, n_ids: int, pooled_dim: int) -> None:
    """The check of ``_get_add_time_ids``: the UNet's added-embedding input must match."""
    unet = components.unet
    if unet is None or getattr(unet, "add_embedding", None) is None:
        return
    passed = unet.config.addition_time_embed_dim * n_ids + pooled_dim
    expected = unet.add_embedding.linear_1.in_features
    if passed != expected:
        raise UsageError(
            f"the UNet expects an added embedding of {expected} values but the conditioning gives {passed}",
            hint="check unet.config.addition_time_embed_dim and text_encoder_2.config.projection_dim",
        )


# --------------------------------------------------------------------------------------------
# Flow-matching transformers: SD3 / SD3.5 and FLUX.1
# --------------------------------------------------------------------------------------------

SD3_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s max_sequence_length
FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.__call__'s (FLUX.1 [dev]; [schnell] uses 256)


@dataclass
class FlowConditioning:
    """What an SD3 / FLUX.1 transformer needs from the prompt, for a batch of ``B`` samples.

    ``prompt_embeds`` ``(B, L, D)`` (``encoder_hidden_states``), ``pooled`` ``(B, P)``
    (``pooled_projections``); FLUX.1 also ``txt_ids`` ``(L, 3)`` (shared by the batch, zeros).
    """

    family: str
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    txt_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.family not in ("sd3", "flux"):
            raise UsageError(f"FlowConditioning is for sd3 / flux, got {self.family!r}")
        if self.prompt_embeds.ndim != 3:
            raise UsageError(f"prompt_embeds must be (B, L, D), got shape {tuple(self.prompt_embeds.shape)}")
        b = self.prompt_embeds.shape[0]
        if self.pooled.ndim != 2 or self.pooled.shape[0] != b:
            raise UsageError(f"pooled must be ({b}, P), got shape {tuple(self.pooled.shape)}")
        if (self.family == "flux") != (self.txt_ids is not None):
            raise UsageError("txt_ids is FLUX.1 conditioning (and FLUX.1 needs it)")

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])

    @property
    def batch_size(self) -> int:
        return len(self)

    def _map(self, fn, ids=None) -> FlowConditioning:
        txt = self.txt_ids if ids is None or self.txt_ids is None else ids(self.txt_ids)
        return FlowConditioning(self.family, fn(self.prompt_embeds), fn(self.pooled), txt)

    def index(self, idx: torch.Tensor | Sequence[int] | slice | int) -> FlowConditioning:
        """The samples at ``idx`` (an index tensor, a list, a slice or one int, which keeps the batch axis)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        elif not isinstance(idx, slice):
            idx = torch.as_tensor(idx, dtype=torch.long, device=self.prompt_embeds.device)
        return self._map(lambda t: t[idx])

    def cat(self, other: FlowConditioning) -> FlowConditioning:
        """This batch followed by ``other`` (same family and shapes)."""
        if self.family != other.family or self.prompt_embeds.shape[1:] != other.prompt_embeds.shape[1:]:
            raise UsageError("cannot concatenate flow conditioning of different families or shapes")
        return FlowConditioning(
            self.family,
            torch.cat([self.prompt_embeds, other.prompt_embeds]),
            torch.cat([self.pooled, other.pooled]),
            self.txt_ids,
        )

    def expand(self, batch_size: int) -> FlowConditioning:
        """A batch of ``batch_size``: itself when it already has that size, broadcast from a batch of 1."""
        if len(self) == batch_size:
            return self
        if len(self) != 1:
            raise UsageError(f"conditioning has batch {len(self)}; expected {batch_size} or 1")
        return self._map(lambda t: t.expand(batch_size, *t.shape[1:]))

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> FlowConditioning:
        """Moved to ``device`` and cast to ``dtype``."""
        fn = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return self._map(fn, ids=fn)

    def transformer_kwargs(self) -> dict[str, Any]:
        """The text inputs of ``SD3Transformer2DModel.forward`` (``encoder_hidden_states``,
        ``pooled_projections``) or ``FluxTransformer2DModel.forward`` (plus ``txt_ids``)."""
        kwargs = {"encoder_hidden_states": self.prompt_embeds, "pooled_projections": self.pooled}
        if self.txt_ids is not None:
            kwargs["txt_ids"] = self.txt_ids
        return kwargs


def encode_flow_prompts(
    components: Any,
    prompts: Sequence[str] | str,
    *,
    device: torch.device | str | None = None,
    max_sequence_length: int | None = None,
    grad: bool = False,
) -> FlowConditioning:
    """Encode ``prompts`` for the SD3 / FLUX.1 transformer of ``components`` as the stock pipeline's
    ``encode_prompt`` does (one prompt for every text encoder, no CLIP skip, ``max_sequence_length``
    T5 tokens: by default the pipeline's, 256 for SD3 and 512 for FLUX.1)."""
    prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    if not prompts:
        raise UsageError("encode_prompts needs at least one prompt")
    family = getattr(components, "family", None)
    if family not in ("sd3", "flux"):
        raise UsageError(f"encode_flow_prompts is for sd3 / flux models, got {family!r}")
    names = (
        ("text_encoder", "text_encoder_2", "text_encoder_3")
        if family == "sd3"
        else ("text_encoder", "text_encoder_2")
    )
    for name in names:
        tok = name.replace("text_encoder", "tokenizer")
        if getattr(components, name, None) is None or getattr(components, tok, None) is None:
            raise UsageError(f"{family} conditioning needs {name} and {tok}", hint="load them with the model")
    out_device = torch.device(device) if device is not None else getattr(components, "device", None)
    context = torch.enable_grad() if grad else torch.no_grad()
    with context:
        if family == "sd3":
            return _encode_sd3(
                components, prompts, out_device, max_sequence_length or SD3_MAX_SEQUENCE_LENGTH
            )
        return _encode_flux(components, prompts, out_device, max_sequence_length or FLUX_MAX_SEQUENCE_LENGTH)


def _t5_embeds(tokenizer, encoder, prompts: list[str], max_length: int) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids  # fmt: skip
    longest = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if longest.shape[-1] > ids.shape[-1]:
        warning_once(
            logger, f"prompts longer than {max_length} T5 tokens were truncated (max_sequence_length)"
        )
    return encoder(ids.to(_device_of(encoder)))[0].to(dtype=encoder.dtype)


def _encode_sd3(components: Any, prompts: list[str], device, max_length: int) -> FlowConditioning:
    hidden, pooled = [], []
    first = components.text_encoder
    for tokenizer, encoder in (
        (components.tokenizer, first),
        (components.tokenizer_2, components.text_encoder_2),
    ):
        ids = _tokenize(tokenizer, prompts).input_ids.to(_device_of(encoder))
        out = encoder(ids, output_hidden_states=True)
        hidden.append(
            out.hidden_states[-2].to(dtype=first.dtype)
        )  # the pipeline casts both to encoder 1's dtype
        pooled.append(out[0])
    t5 = _t5_embeds(components.tokenizer_3, components.text_encoder_3, prompts, max_length)
    out_device = device or t5.device
    clip = torch.cat([h.to(out_device) for h in hidden], dim=-1)
    if clip.shape[-1] > t5.shape[-1]:
        raise UsageError(f"the CLIP features ({clip.shape[-1]}) are wider than T5's ({t5.shape[-1]})")
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    embeds = torch.cat([clip, t5.to(out_device)], dim=-2)
    return FlowConditioning("sd3", embeds, torch.cat([p.to(out_device) for p in pooled], dim=-1))


def _encode_flux(components: Any, prompts: list[str], device, max_length: int) -> FlowConditioning:
    clip = components.text_encoder
    ids = _tokenize(components.tokenizer, prompts).input_ids.to(_device_of(clip))
    pooled = clip(ids, output_hidden_states=False).pooler_output.to(dtype=clip.dtype)
    embeds = _t5_embeds(components.tokenizer_2, components.text_encoder_2, prompts, max_length)
    out_device = device or embeds.device
    txt_ids = torch.zeros(embeds.shape[1], 3, device=out_device, dtype=clip.dtype)
    return FlowConditioning("flux", embeds.to(out_device), pooled.to(out_device), txt_ids)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX.1's 2x2 patch packing ``(B, C, H, W) -> (B, H/2 * W/2, 4C)`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise UsageError(f"FLUX.1 latents need an even height and width, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` x ``width``."""
    b, _, channels = packed.shape
    x = packed.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """FLUX.1's ``img_ids`` ``(H/2 * W/2, 3)`` for latents of ``height`` x ``width``
    (``FluxPipeline._prepare_latent_image_ids``: (0, row, column) per packed patch)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


FLUX_TRAIN_GUIDANCE = 3.5  # diffusers' train_dreambooth_lora_flux.py --guidance_scale default (FLUX.1 [dev])


def flux_guidance(transformer: Any, batch_size: int, scale: float = FLUX_TRAIN_GUIDANCE, device=None):
    """The ``guidance`` input ``(B,)`` of a guidance-distilled FLUX.1 transformer (``config.guidance_embeds``),
    float32 as ``FluxPipeline`` builds it; None for a transformer without guidance embedding ([schnell])."""
    if not getattr(transformer.config, "guidance_embeds", False):
        return None
    return torch.full((batch_size,), float(scale), device=device, dtype=torch.float32)
