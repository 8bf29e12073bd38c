"""Tiny SD1.5-, SDXL-, SD3- and FLUX.1-shaped pipelines, built in-process and saved in the real diffusers format.

``tiny-sd15``, ``tiny-sdxl``, ``tiny-sd3`` and ``tiny-flux`` are model names that resolve to these
pipelines. They follow diffusers' own dummy test components (``get_dummy_components``): real classes
and real architectures (cross-attention UNet, 2-level VAE, CLIP text encoders of hidden size 32, the
SDXL ``text_time`` conditioning; for the flow-matching families an MMDiT ``SD3Transformer2DModel``
with SD3.5's qk-norm and dual attention, a guidance-distilled ``FluxTransformer2DModel``, a T5
encoder, 16-channel VAEs and ``FlowMatchEulerDiscreteScheduler``), only small. Every build gives
bit-identical weights. ``TINY_MODELS`` lists the UNet models every stage supports; the flow-matching
ones (``TINY_FLOW_MODELS``) load and generate so far.

``materialize_tiny(name)`` writes the pipeline once under ``cache_dir()/models/<name>-v<N>``
with ``save_pretrained`` (safetensors + ``model_index.json``), so it is loaded back through the
same code path as a real checkpoint.

The CLIP tokenizer those pipelines use is made by this module (no download ever) and shipped in
``smpo_cli/models/assets/tiny_clip_tokenizer``; the T5 tokenizer of the flow models is a Unigram
model over the same words, built in-process (:func:`smpo_cli.models.flow.build_t5_tokenizer`). Regenerate it with::

    python -m smpo_cli.models.tiny --write-tokenizer smpo_cli/models/assets/tiny_clip_tokenizer

This module imports no torch at import time (``TINY_MODELS`` is read by recipe validation).
Bump ``BUILDER_VERSION`` whenever a builder, a size or the tokenizer changes: materialised
folders are keyed by it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from smpo_cli.errors import AssetNotFoundError
from smpo_cli.utils.atomic import atomic_path
from smpo_cli.utils.logging import get_logger
from smpo_cli.utils.paths import cache_dir

logger = get_logger(__name__)

BUILDER_VERSION = 1
TINY_FAMILIES = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}
TINY_MODELS = ("tiny-sd15", "tiny-sdxl")  # UNet models: every stage
TINY_FLOW_MODELS = ("tiny-sd3", "tiny-flux")  # flow matching: loading and generation
ALL_TINY_MODELS = TINY_MODELS + TINY_FLOW_MODELS
TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_clip_tokenizer"
MARKER_FILE = "smpo_tiny.json"

SEED = 0
MODEL_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Words that tokenize to a single token in the tiny CLIP vocabulary. Order matters (it fixes the
# merge list); append new words at the end and bump BUILDER_VERSION.
PROMPT_WORDS: tuple[str, ...] = (
    # articles, prepositions, glue
    "a", "an", "the", "of", "and", "with", "in", "on", "at", "by", "for", "from", "to", "is",
    "up", "over", "under", "near", "inside", "outside", "front", "back", "behind", "top", "side",
    "very", "highly", "one", "two", "three", "his", "her", "their", "its", "this", "that",
    # medium and style
    "photo", "photograph", "portrait", "painting", "drawing", "illustration", "sketch", "render",
    "art", "artwork", "digital", "oil", "watercolor", "style", "realistic", "photorealistic",
    "detailed", "intricate", "beautiful", "cinematic", "lighting", "light", "dark", "bright",
    "soft", "dramatic", "anime", "cartoon", "comic", "pixel", "studio", "concept", "poster",
    "abstract", "surreal", "vintage", "retro", "modern", "minimalist", "fantasy", "futuristic",
    "cyberpunk", "steampunk", "neon", "glowing", "vibrant", "colorful", "epic", "masterpiece",
    "quality", "high", "resolution", "sharp", "focus", "trending", "artstation", "unreal",
    "engine", "octane", "close", "view", "wide", "angle", "shot", "background", "scene",
    # nature and places
    "sky", "cloud", "clouds", "sun", "sunset", "sunrise", "moon", "star", "stars", "space",
    "galaxy", "planet", "night", "day", "morning", "evening", "city", "street", "building",
    "house", "castle", "tower", "bridge", "road", "forest", "tree", "trees", "flower", "flowers",
    "garden", "field", "grass", "mountain", "mountains", "river", "lake", "ocean", "sea",
    "beach", "water", "snow", "rain", "fire", "desert", "island", "landscape", "room", "window",
    "door", "table", "chair", "kitchen", "library", "temple", "village", "jungle", "cave",
    # subjects
    "cat", "cats", "dog", "dogs", "bird", "horse", "fish", "lion", "tiger", "bear", "fox",
    "wolf", "rabbit", "owl", "dragon", "squirrel", "robot", "astronaut", "man", "woman",
    "girl", "boy", "child", "people", "person", "face", "eyes", "hair", "hand", "hands",
    "king", "queen", "knight", "warrior", "wizard", "witch", "princess", "soldier", "monster",
    "car", "train", "ship", "boat", "plane", "bicycle", "book", "cup", "coffee", "tea", "food",
    "pizza", "burger", "cake", "apple", "banana", "bowl", "hat", "dress", "suit", "armor",
    "glasses", "sword", "crown", "mask", "clock", "lamp", "guitar", "sign", "text", "logo",
    # colours and adjectives
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "black", "white", "gray",
    "brown", "golden", "gold", "silver", "small", "large", "big", "tiny", "giant", "old",
    "young", "happy", "sad", "cute", "scary", "ancient", "magic", "magical", "wooden", "stone",
    "metal", "glass", "crystal", "smiling", "wet", "cozy", "empty", "crowded", "peaceful",
    # verbs
    "wearing", "holding", "sitting", "standing", "running", "walking", "flying", "eating",
    "drinking", "playing", "reading", "looking", "riding", "swimming", "dancing", "sleeping",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Tokenizer files (CLIP byte-level BPE)
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte → printable unicode character table (the 256 base symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _clip_bpe(symbols: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one pre-token: the last symbol carries ``</w>``; lowest-rank pair first."""
    word = list(symbols[:-1]) + [symbols[-1] + "</w>"]
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, len(ranks) + 1))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def build_clip_bpe(words: Iterable[str] = PROMPT_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges that make each of ``words`` one token (deterministic).

    Vocabulary order is CLIP's: the 256 byte symbols, the same with ``</w>``, one entry per new
    merge result, then ``<|startoftext|>`` and ``<|endoftext|>``. Merges are found by running
    CLIP's BPE on each word and appending the merge of its two leftmost pieces until the word is
    a single token; the pass repeats until no word needs a new merge (a fixed point).
    """
    byte_encoder = _bytes_to_unicode()
    encoded = [
        "".join(byte_encoder[b] for b in w.encode("utf-8")) for w in dict.fromkeys(w.lower() for w in words)
    ]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for word in encoded:
            pieces = _clip_bpe(word, ranks)
            while len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                changed = True
                pieces = _clip_bpe(word, ranks)
    base = list(byte_encoder.values())
    vocab_list = base + [s + "</w>" for s in base]
    seen = set(vocab_list)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            vocab_list.append(a + b)
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def tokenizer_files(words: Iterable[str] = PROMPT_WORDS) -> dict[str, str]:
    """File name → text of the tiny CLIP tokenizer (``vocab.json``, ``merges.txt``, config)."""
    vocab, merges = build_clip_bpe(words)
    config = {
        "backend": "tokenizers",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS_TOKEN,
    }
    return {
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "vocab.json": json.dumps(vocab, indent=2, ensure_ascii=False) + "\n",
    }


def write_tokenizer(dest: str | os.PathLike[str]) -> Path:
    """Write the tiny CLIP tokenizer files into folder ``dest`` (created if missing)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files().items():
        with open(dest / name, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
    logger.info("wrote the tiny CLIP tokenizer to %s", dest)
    return dest


def load_tiny_tokenizer(pad_token: str | None = None):
    """The shipped tiny ``CLIPTokenizer`` (``pad_token="!"`` gives the SDXL ``tokenizer_2`` flavour)."""
    from transformers import CLIPTokenizer

    kwargs = {"pad_token": pad_token} if pad_token is not None else {}
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True, **kwargs)


# --------------------------------------------------------------------------------------------
# Model builders
# --------------------------------------------------------------------------------------------


def _text_encoder_config(vocab_size: int, bos: int, eos: int, *, hidden: int, intermediate: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        projection_dim=hidden,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def _scheduler_kwargs() -> dict[str, Any]:
    # The betas every SD1.5 / SDXL checkpoint ships (scaled_linear 0.00085..0.012, 1000 steps).
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }


def _vae(scaling_factor: float, force_upcast: bool = True, latent_channels: int = 4, **flow: Any):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
        **flow,
    )


def _flow_vae(scaling_factor: float, shift_factor: float):
    """A 2-level VAE with 16 latent channels and no quant convs, as SD3 and FLUX.1 ship."""
    return _vae(scaling_factor, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=shift_factor)  # fmt: skip


def _t5_encoder_config(vocab_size: int, d_model: int):
    """A T5 v1.1-style encoder (gated GELU, as T5-XXL): 2 layers, ``d_model`` wide."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _build_flow_components(family: str, tokenizer) -> dict[str, Any]:
    """SD3.5- or FLUX.1-shaped components (called inside the builder's forked RNG)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    from smpo_cli.models.flow import build_t5_tokenizer

    vocab_size = len(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    t5_tokenizer = build_t5_tokenizer(PROMPT_WORDS)
    components: dict[str, Any] = {"tokenizer": tokenizer}
    if family == "sd3":
        # CLIP-L-like (32) and bigG-like (64) encoders with projections; their pooled projections are
        # concatenated (96), their hidden states concatenated and zero-padded to the T5 width (128).
        te_config = _text_encoder_config(vocab_size, bos, eos, hidden=32, intermediate=37, act="quick_gelu")
        te2_config = _text_encoder_config(vocab_size, bos, eos, hidden=64, intermediate=128, act="gelu")
        torch.manual_seed(SEED)
        components["transformer"] = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=128,
            caption_projection_dim=32,
            pooled_projection_dim=32 + 64,
            pos_embed_max_size=32,
            qk_norm="rms_norm",  # SD3.5
            dual_attention_layers=(0,),  # SD3.5 medium's MMDiT-X
        )
        torch.manual_seed(SEED)
        components["vae"] = _flow_vae(scaling_factor=1.5305, shift_factor=0.0609)
        torch.manual_seed(SEED)
        components["text_encoder"] = CLIPTextModelWithProjection(te_config)
        torch.manual_seed(SEED)
        components["text_encoder_2"] = CLIPTextModelWithProjection(te2_config)
        components["tokenizer_2"] = load_tiny_tokenizer(pad_token="!")
        torch.manual_seed(SEED)
        components["text_encoder_3"] = T5EncoderModel(_t5_encoder_config(len(t5_tokenizer), 128))
        components["tokenizer_3"] = t5_tokenizer
        components["scheduler"] = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    else:
        te_config = _text_encoder_config(vocab_size, bos, eos, hidden=32, intermediate=37, act="quick_gelu")
        torch.manual_seed(SEED)
        components["transformer"] = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16 * 4,  # 2x2-packed 16-channel latents
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=64,
            pooled_projection_dim=32,
            guidance_embeds=True,  # FLUX.1 [dev] is guidance-distilled
            axes_dims_rope=(4, 6, 6),
        )
        torch.manual_seed(SEED)
        components["vae"] = _flow_vae(scaling_factor=0.3611, shift_factor=0.1159)
        torch.manual_seed(SEED)
        components["text_encoder"] = CLIPTextModel(te_config)
        torch.manual_seed(SEED)
        components["text_encoder_2"] = T5EncoderModel(_t5_encoder_config(len(t5_tokenizer), 64))
        components["tokenizer_2"] = t5_tokenizer
        components["scheduler"] = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    components.update(image_encoder=None, feature_extractor=None)
    return components


def build_tiny_components(name: str) -> dict[str, Any]:
    """Fresh, deterministic components of ``name`` (keyword arguments of the pipeline class).

    Each component is seeded with ``torch.manual_seed`` inside ``torch.random.fork_rng`` so
    that two builds are bit-identical and the caller's RNG state is left untouched.
    """
    import torch
    from diffusers import EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    family = _family_of(name)
    if family in ("sd3", "flux"):
        with torch.random.fork_rng(devices=[]):
            components = _build_flow_components(family, load_tiny_tokenizer())
        for module in components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()
        return components
    tokenizer = load_tiny_tokenizer()
    vocab_size = len(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    te_config = _text_encoder_config(vocab_size, bos, eos, hidden=32, intermediate=37, act="quick_gelu")
    components: dict[str, Any] = {"tokenizer": tokenizer}

    with torch.random.fork_rng(devices=[]):
        if family == "sd15":
            torch.manual_seed(SEED)
            components["unet"] = UNet2DConditionModel(
                sample_size=32,
                in_channels=4,
                out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(32, 64),
                layers_per_block=2,
                cross_attention_dim=32,
                attention_head_dim=8,
                norm_num_groups=32,
            )
            torch.manual_seed(SEED)
            components["vae"] = _vae(scaling_factor=0.18215, force_upcast=True)
            torch.manual_seed(SEED)
            components["text_encoder"] = CLIPTextModel(te_config)
            # SD1.5 ships PNDM (PLMS) with these settings.
            components["scheduler"] = PNDMScheduler(
                **_scheduler_kwargs(), skip_prk_steps=True, set_alpha_to_one=False
            )
            components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            te2_config = _text_encoder_config(vocab_size, bos, eos, hidden=64, intermediate=128, act="gelu")
            torch.manual_seed(SEED)
            components["unet"] = UNet2DConditionModel(
                sample_size=32,
                in_channels=4,
                out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(32, 64),
                layers_per_block=2,
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                transformer_layers_per_block=(1, 2),
                # text encoder hidden states are concatenated: 32 (CLIP-L-like) + 64 (bigG-like)
                cross_attention_dim=32 + 64,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                # 6 size/crop time ids * 8 + pooled text_encoder_2 projection (64)
                projection_class_embeddings_input_dim=6 * 8 + 64,
                norm_num_groups=32,
            )
            torch.manual_seed(SEED)
            components["vae"] = _vae(scaling_factor=0.13025, force_upcast=True)
            torch.manual_seed(SEED)
            components["text_encoder"] = CLIPTextModel(te_config)
            torch.manual_seed(SEED)
            components["text_encoder_2"] = CLIPTextModelWithProjection(te2_config)
            # SDXL's second tokenizer pads with "!" (as in stabilityai/stable-diffusion-xl-base-1.0).
            components["tokenizer_2"] = load_tiny_tokenizer(pad_token="!")
            components["scheduler"] = EulerDiscreteScheduler(
                **_scheduler_kwargs(), timestep_spacing="leading", interpolation_type="linear"
            )
            components.update(image_encoder=None, feature_extractor=None)
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return components


def build_tiny_pipeline(name: str):
    """The stock diffusers pipeline (SD, SDXL, SD3, FLUX) of fresh tiny components."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    components = build_tiny_components(name)
    family = _family_of(name)
    if family in ("sd3", "flux"):
        from smpo_cli.models.flow import build_pipeline

        pipe = build_pipeline(family, components)
    elif family == "sd15":
        pipe = StableDiffusionPipeline(**components)
    else:
        pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _family_of(name: str) -> str:
    try:
        return TINY_FAMILIES[name]
    except KeyError:
        raise AssetNotFoundError(
            f"unknown tiny model {name!r}", hint=f"choose one of {', '.join(ALL_TINY_MODELS)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Materialisation on disk
# --------------------------------------------------------------------------------------------


def is_tiny_name(name: object) -> bool:
    return isinstance(name, str) and name in TINY_FAMILIES


def tiny_model_dir(name: str) -> Path:
    """Where ``materialize_tiny(name)`` keeps the pipeline (it may not exist yet)."""
    _family_of(name)
    return cache_dir() / "models" / f"{name}-v{BUILDER_VERSION}"


def _file_manifest(root: Path) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER_FILE
    }


def is_materialized(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a complete tiny pipeline written by this builder version."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("builder_version") != BUILDER_VERSION or not (path / "model_index.json").is_file():
        return False
    files = marker.get("files", {})
    return bool(files) and all(
        (path / rel).is_file() and (path / rel).stat().st_size == size for rel, size in files.items()
    )


def materialize_tiny(name: str, *, force: bool = False) -> Path:
    """Write tiny pipeline ``name`` in the diffusers format once, and return its folder.

    The folder (``cache_dir()/models/<name>-v<BUILDER_VERSION>``) is built in a temporary
    folder and renamed into place, under a file lock: concurrent callers and reruns after a
    crash see either nothing or a complete pipeline. An existing complete folder is reused.
    """
    from filelock import FileLock

    dest = tiny_model_dir(name)
    if not force and is_materialized(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _distributed_rank() not in (None, 0):
        # transformers' save_pretrained writes nothing on a torch.distributed rank other than 0, which left
        # the text encoder's folder empty when rank 1 got the lock first: build in a plain child process
        _materialize_in_child(name, force)
        if not is_materialized(dest):
            raise AssetNotFoundError(f"{name}: building it in a child process left {dest} incomplete")
        return dest
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        if not force and is_materialized(dest):
            return dest
        import diffusers
        import torch
        import transformers

        pipe = build_tiny_pipeline(name)
        with atomic_path(dest) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            empty = sorted(d.name for d in tmp.iterdir() if d.is_dir() and not any(d.iterdir()))
            if empty:  # never mark a pipeline complete that a library declined to write
                raise AssetNotFoundError(f"{name}: saving wrote nothing into {', '.join(empty)}")
            marker = {
                "name": name,
                "builder_version": BUILDER_VERSION,
                "versions": {
                    "diffusers": diffusers.__version__,
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                },
                "files": _file_manifest(tmp),
            }
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        logger.info("materialised %s (builder v%d) at %s", name, BUILDER_VERSION, dest)
    return dest


def _distributed_rank() -> int | None:
    """This process's torch.distributed rank, or None outside a process group."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def _materialize_in_child(name: str, force: bool) -> None:
    """``python -m smpo_cli.models.tiny --materialize NAME`` without the launcher's process-group variables."""
    import subprocess

    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "ACCELERATE_PROCESS_ID")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    cmd = [sys.executable, "-m", "smpo_cli.models.tiny", "--materialize", name, *(["--force"] if force else [])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise AssetNotFoundError(f"{name}: building it failed: {done.stderr.strip().splitlines()[-1:]}")


# --------------------------------------------------------------------------------------------
# python -m smpo_cli.models.tiny
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smpo_cli.models.tiny",
        description="Regenerate the shipped tiny CLIP tokenizer files or materialise a tiny pipeline.",
    )
    parser.add_argument("--write-tokenizer", metavar="DIR", help="write vocab.json, merges.txt, config")
    parser.add_argument(
        "--materialize", metavar="NAME", choices=ALL_TINY_MODELS, help="write NAME to the cache"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if already materialised")
    args = parser.parse_args(argv)
    if not (args.write_tokenizer or args.materialize):
        parser.error("nothing to do: pass --write-tokenizer DIR and/or --materialize NAME")

    import logging

    from smpo_cli.utils.logging import configure

    configure(logging.INFO, logging.StreamHandler(sys.stderr))
    if args.write_tokenizer:
        write_tokenizer(args.write_tokenizer)
    if args.materialize:
        materialize_tiny(args.materialize, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
