"""Flow-matching families: Stable Diffusion 3 / 3.5 (``sd3``) and FLUX.1 (``flux``).

What :mod:`smpo_cli.models.loading` needs to load them besides what it does for the UNet families:

* the components and allow-listed classes of each family (a ``transformer`` instead of a ``unet``;
  SD3: two CLIP text encoders with projection + T5; FLUX.1: one CLIP + T5);
* family detection from ``model_index.json``, the transformer's class name and single-file keys;
* consistency checks between the transformer, the text encoders and the VAE;
* the stock diffusers pipeline over loaded components (``StableDiffusion3Pipeline``, ``FluxPipeline``);
* an offline tiny T5 tokenizer (a Unigram model built in-process, saved as ``tokenizer.json``).

This module imports no torch at import time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from smpo_cli.errors import ModelLoadError

FLOW_FAMILIES = ("sd3", "flux")
FLOW_COMPONENTS = {
    "sd3": (
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
        "scheduler",
    ),
    "flux": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
}
_CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
_T5_TOKENIZERS = ("T5Tokenizer", "T5TokenizerFast")
FLOW_ALLOWED_CLASSES: dict[str, dict[str, tuple[str, ...]]] = {
    "sd3": {
        "transformer": ("SD3Transformer2DModel",),
        "vae": ("AutoencoderKL",),
        "text_encoder": ("CLIPTextModelWithProjection",),
        "text_encoder_2": ("CLIPTextModelWithProjection",),
        "text_encoder_3": ("T5EncoderModel",),
        "tokenizer": _CLIP_TOKENIZERS,
        "tokenizer_2": _CLIP_TOKENIZERS,
        "tokenizer_3": _T5_TOKENIZERS,
    },
    "flux": {
        "transformer": ("FluxTransformer2DModel",),
        "vae": ("AutoencoderKL",),
        "text_encoder": ("CLIPTextModel",),
        "text_encoder_2": ("T5EncoderModel",),
        "tokenizer": _CLIP_TOKENIZERS,
        "tokenizer_2": _T5_TOKENIZERS,
    },
}
PIPELINE_CLASSES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
TRANSFORMER_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
# Where a single-file checkpoint takes its architecture from when no ``config=`` is given.
DEFAULT_CONFIG_REPOS = {
    "sd3": "stabilityai/stable-diffusion-3.5-medium",
    "flux": "black-forest-labs/FLUX.1-dev",
}
# Pipelines of the same families that are not text-to-image base models.
_OTHER_FLUX = ("FluxFill", "FluxKontext", "FluxControl", "FluxPriorRedux", "FluxInpaint")
_OTHER_SD3 = ("StableDiffusion3ControlNet", "StableDiffusion3Inpaint", "StableDiffusion3PAG")


def is_flow_family(family: str) -> bool:
    return family in FLOW_FAMILIES


def tokenizer_kind(family: str, name: str) -> str:
    """``"clip"`` or ``"t5"``: which tokenizer class component ``name`` of ``family`` uses."""
    allowed = FLOW_ALLOWED_CLASSES.get(family, {}).get(name, _CLIP_TOKENIZERS)
    return "t5" if allowed == _T5_TOKENIZERS else "clip"


def family_from_pipeline_class(name: str) -> tuple[str | None, str]:
    """``("sd3" | "flux", why)`` for a flow pipeline class name, ``(None, "")`` for anything else."""
    why = f"model_index.json _class_name {name}"
    if name.startswith(_OTHER_FLUX) or name.startswith(_OTHER_SD3):
        raise ModelLoadError(
            f"model_index.json declares a {name}; smpo supports the text-to-image "
            "StableDiffusion3Pipeline and FluxPipeline of these families only"
        )
    if name.startswith("StableDiffusion3"):
        return "sd3", why
    if name.startswith("Flux") and not name.startswith("Flux2"):
        return "flux", why
    return None, ""


def family_from_index_entries(index: dict[str, Any]) -> tuple[str | None, str]:
    """The family from the transformer class that ``model_index.json`` lists (generic ``_class_name``)."""
    entry = index.get("transformer")
    if isinstance(entry, list | tuple) and len(entry) == 2 and entry[1] in TRANSFORMER_CLASSES:
        return TRANSFORMER_CLASSES[entry[1]], f"model_index.json lists a {entry[1]}"
    return None, ""


def family_from_keys(keys: Iterable[str]) -> tuple[str | None, str]:
    """The flow family of a single-file checkpoint from its tensor names (original or diffusers layout)."""
    keys = set(keys)
    for prefix in ("", "model.diffusion_model."):
        if f"{prefix}joint_blocks.0.context_block.adaLN_modulation.1.bias" in keys:
            return "sd3", "checkpoint has MMDiT joint_blocks (SD3 layout)"
        if f"{prefix}double_blocks.0.img_attn.norm.key_norm.scale" in keys:
            return "flux", "checkpoint has double_blocks (FLUX.1 layout)"
    if "context_embedder.weight" in keys and "pos_embed.proj.weight" in keys:
        return "sd3", "checkpoint is a diffusers SD3Transformer2DModel"
    if (
        "context_embedder.weight" in keys
        and "x_embedder.weight" in keys
        and any(k.startswith("single_transformer_blocks.") for k in keys)
    ):
        return "flux", "checkpoint is a diffusers FluxTransformer2DModel"
    return None, ""


def check_consistency(loaded: dict[str, Any], family: str, display: str) -> None:
    """Raise :class:`ModelLoadError` when the loaded parts of a flow model do not fit together."""
    transformer, vae = loaded.get("transformer"), loaded.get("vae")
    if family == "sd3":
        clips = [loaded.get("text_encoder"), loaded.get("text_encoder_2")]
        t5 = loaded.get("text_encoder_3")
        pooled = sum(e.config.projection_dim for e in clips) if all(e is not None for e in clips) else None
        patch = 1
    else:
        clip, t5 = loaded.get("text_encoder"), loaded.get("text_encoder_2")
        pooled = clip.config.hidden_size if clip is not None else None
        patch = 2  # FLUX packs 2x2 latent patches into the transformer's channels
    if transformer is not None:
        cfg = transformer.config
        if t5 is not None and cfg.joint_attention_dim != t5.config.d_model:
            raise ModelLoadError(
                f"the transformer expects text features of size {cfg.joint_attention_dim} but the T5 encoder of "
                f"{display} gives {t5.config.d_model}",
                hint="the transformer was trained on another base model",
            )
        if pooled is not None and cfg.pooled_projection_dim != pooled:
            raise ModelLoadError(
                f"the transformer expects pooled text features of size {cfg.pooled_projection_dim} but the CLIP "
                f"encoder(s) of {display} give {pooled}",
                hint="the transformer was trained on another base model",
            )
        if vae is not None and vae.config.latent_channels * patch * patch != cfg.in_channels:
            raise ModelLoadError(
                f"the vae has {vae.config.latent_channels} latent channels but the transformer takes "
                f"{cfg.in_channels} input channels (expected {vae.config.latent_channels * patch * patch})"
            )
    encoders = {"tokenizer": "text_encoder", "tokenizer_2": "text_encoder_2", "tokenizer_3": "text_encoder_3"}
    for tok_name, enc_name in encoders.items():
        tok, enc = loaded.get(tok_name), loaded.get(enc_name)
        if tok is not None and enc is not None and len(tok) > enc.config.vocab_size:
            raise ModelLoadError(
                f"{tok_name} has {len(tok)} tokens but its text encoder only {enc.config.vocab_size}",
                hint="the tokenizer and text encoder come from different models",
            )


def build_pipeline(family: str, parts: dict[str, Any]):
    """The stock diffusers pipeline of ``family`` over ``parts`` (component name → object)."""
    import diffusers

    cls = getattr(diffusers, PIPELINE_CLASSES[family])
    kwargs = {name: parts.get(name) for name in FLOW_COMPONENTS[family]}
    return cls(**kwargs, image_encoder=None, feature_extractor=None)


# Where an all-in-one single file keeps each part besides the transformer (SD3 / ComfyUI layout).
_SINGLE_FILE_PARTS = {
    "sd3": {"vae": ("first_stage_model.", "vae."), "text_encoder": ("text_encoders.clip_l.",),
            "text_encoder_2": ("text_encoders.clip_g.",), "text_encoder_3": ("text_encoders.t5xxl.",)},
    "flux": {"vae": ("first_stage_model.", "vae."), "text_encoder": ("text_encoders.clip_l.",),
             "text_encoder_2": ("text_encoders.t5xxl.",)},
}  # fmt: skip


def parts_missing_from(family: str, keys: Iterable[str]) -> list[str]:
    """The VAE / text encoders of ``family`` that a single-file checkpoint with tensor names ``keys`` lacks.

    SD3.5 and FLUX.1 files often hold the transformer (and maybe the VAE) only, and diffusers'
    ``from_single_file`` then fails for the VAE (it looks in the file) and for transformers models (it
    wants diffusers-named weights in the config folder): the caller loads these from the config folder
    itself and passes them in.
    """
    keys = list(keys)
    return [
        name
        for name, prefixes in _SINGLE_FILE_PARTS[family].items()
        if not any(k.startswith(prefixes) for k in keys)
    ]


def single_file_pipeline_class(family: str):
    import diffusers

    return getattr(diffusers, PIPELINE_CLASSES[family])


# --------------------------------------------------------------------------------------------
# Tiny T5 tokenizer (Unigram, built in-process: no sentencepiece model, no download)
# --------------------------------------------------------------------------------------------

T5_MODEL_MAX_LENGTH = 512
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
_T5_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
)


def t5_vocab(words: Iterable[str]) -> list[tuple[str, float]]:
    """A deterministic Unigram vocabulary: T5's specials, ``▁``, one piece per word, then single characters.

    Word pieces score higher than any spelling out of characters, so each word is one token; other text
    falls back to characters, and characters outside the table become ``<unk>``.
    """
    vocab: list[tuple[str, float]] = [(tok, 0.0) for tok in T5_SPECIALS] + [("\u2581", -2.0)]
    seen = {piece for piece, _ in vocab}
    for word in dict.fromkeys(w.lower() for w in words):
        piece = "\u2581" + word
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, -5.0))
    for ch in _T5_CHARS:
        if ch not in seen:
            seen.add(ch)
            vocab.append((ch, -10.0))
    return vocab


def build_t5_tokenizer(words: Iterable[str]):
    """A ``T5Tokenizer`` (tokenizers backend) over :func:`t5_vocab` of ``words``, without sentinel tokens."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_vocab(words), extra_ids=0, model_max_length=T5_MODEL_MAX_LENGTH)
