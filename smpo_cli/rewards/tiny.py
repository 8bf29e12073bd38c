"""Tiny random reward models of the real architectures, written in the real on-disk formats.

``build_tiny_reward(name, dest)`` writes a folder that ``load_reward(name, dest)`` reads through
the same code path as the real checkpoint. They are for tests and the offline quick start: the
scores mean nothing, but every tensor, file name and key name is what the real loader sees.
Each builds, saves and loads in well under a second and stays under a few MB.

=============  ==========================================================================
name           folder contents
=============  ==========================================================================
pickscore      ``CLIPModel.save_pretrained`` + ``CLIPProcessor`` (tiny byte-level BPE)
clip           same, QuickGELU as OpenAI CLIP
hpsv2          ``HPS_v2.1_compressed.pt`` (or v2.0) = ``{"state_dict": ...}`` of open_clip
               ViT-H-14 at tiny widths, plus ``open_clip_config.json`` giving those widths
imagereward    ``ImageReward.pt`` (original BLIP/timm/MED key names, incl. unused
               ``blip.vision_proj``/``text_proj`` and the ``position_ids`` buffer),
               ``med_config.json``, BERT ``vocab.txt``
aesthetic      ``CLIPModel.save_pretrained`` (+ image processor) and
               ``sac+logos+ava1-l14-linearMSE.pth`` (head, real hidden sizes)
hpsv3          ``HPSv3.safetensors`` (bfloat16, the official key names ``visual.*``,
               ``model.*``, ``lm_head.weight``, ``rm_head.{0,3,5}.*``; real head widths),
               ``config.json`` in Qwen2-VL-7B-Instruct's flat layout (2+2 layers, width 32),
               and Qwen2-VL processor files (tiny byte-level BPE with Qwen's special
               tokens, ``preprocessor_config.json``, ``chat_template.json``)
=============  ==========================================================================

Tokenizers are made here, offline: CLIP-family models get a tiny byte-level BPE (the 256 byte
symbols, their ``</w>`` forms, a few merges and the two specials; any text tokenises, unknown
words fall back to bytes); HPSv2 uses open_clip's own ``SimpleTokenizer`` (its BPE vocabulary
ships inside open-clip-torch), so its text tower keeps the 49,408-token vocabulary; ImageReward
gets a 42-line BERT ``vocab.txt`` (+ ``[DEC]``, ``[ENC]`` added at load, as the reference does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smpo_cli.errors import UsageError
from smpo_cli.utils.atomic import atomic_path
from smpo_cli.utils.paths import cache_dir

TINY_NAMES = ("pickscore", "clip", "hpsv2", "imagereward", "aesthetic", "hpsv3")
_MARKER = "smpo_tiny.json"

# A few merges so common words become single tokens; everything else falls back to bytes.
_CLIP_WORDS = ("a", "cat", "dog", "photo", "of", "the", "red", "blue", "painting", "on")

_BERT_VOCAB = (
    ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + ["cat", "dog", "photo", "of", "the", "##s", ".", ","]
)


# ------------------------------------------------------------------------------------- tokenizers


def clip_bpe_files(dest: Path) -> None:
    """Write ``vocab.json`` + ``merges.txt`` of a tiny byte-level CLIP BPE into ``dest``."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    for word in _CLIP_WORDS:
        # Merge left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>".
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = ["".join(pair)] + pieces[2:]
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += [a + b for a, b in merges if a + b not in vocab]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (dest / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _clip_processor(tok_dir: Path) -> Any:
    import transformers
    from transformers import CLIPProcessor, CLIPTokenizer

    image_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = image_cls(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return CLIPProcessor(
        image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir))
    )


# ----------------------------------------------------------------------------------------- models


def _tiny_clip(tmp: Path, *, hidden_act: str, logit_scale: float) -> None:
    import torch
    from transformers import CLIPConfig, CLIPModel

    tok_dir = tmp / "_bpe"
    clip_bpe_files(tok_dir)
    processor = _clip_processor(tok_dir)
    tok = processor.tokenizer
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act=hidden_act,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            projection_dim=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=14,
            hidden_act=hidden_act,
            projection_dim=16,  # a vision tower loaded alone reads it here (as openai's config has it)
        ),
        projection_dim=16,
    )
    model = CLIPModel(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(logit_scale))
    model.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()


def _build_pickscore(tmp: Path, **_: Any) -> None:
    _tiny_clip(tmp, hidden_act="gelu", logit_scale=100.0)


def _build_clip(tmp: Path, **_: Any) -> None:
    _tiny_clip(tmp, hidden_act="quick_gelu", logit_scale=1 / 0.07)


HPS_TINY_CFG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
}


def _build_hpsv2(tmp: Path, *, variant: str = "v2.1", **_: Any) -> None:
    import open_clip
    import torch

    from smpo_cli.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from smpo_cli.rewards.hpsv2 import ARCH, CONFIG_NAME, HPS_FILES

    if variant not in HPS_FILES:
        raise UsageError(f"unknown HPSv2 variant {variant!r}", hint="use v2.0 or v2.1")
    from smpo_cli.rewards.hpsv2 import quiet_open_clip

    with quiet_open_clip():
        model = open_clip.create_model(ARCH, pretrained=None, load_weights=False, **HPS_TINY_CFG)
    tmp.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict()}, tmp / HPS_FILES[variant])
    cfg = {
        "model_cfg": HPS_TINY_CFG,
        "preprocess_cfg": {"size": 224, "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)},
    }
    (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2), encoding="utf-8")


# timm/MED names of BLIP's ViT, the inverse of imagereward._VISION_RENAMES.
_VISION_TO_ORIGINAL = [
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
]


def imagereward_original_state_dict(
    vision: Any, text: Any, head: Any, *, embed_dim: int = 16
) -> dict[str, Any]:
    """State dict in ``ImageReward.pt`` layout from transformers BLIP towers and a head."""
    import re

    import torch

    sd: dict[str, Any] = {}
    for key, value in vision.state_dict().items():
        for pattern, repl in _VISION_TO_ORIGINAL:
            new, n = re.subn(pattern, repl, key)
            if n:
                sd[f"blip.visual_encoder.{new}"] = value
                break
        else:  # pragma: no cover - a transformers rename would land here
            raise RuntimeError(f"no original name for BLIP vision key {key}")
    for key, value in text.state_dict().items():
        sd[f"blip.text_encoder.{key}"] = value
    max_pos = text.config.max_position_embeddings
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(max_pos).expand(1, -1).clone()
    # Present in the real checkpoint, unused by the reward.
    sd["blip.vision_proj.weight"] = torch.randn(embed_dim, vision.config.hidden_size) * 0.02
    sd["blip.vision_proj.bias"] = torch.zeros(embed_dim)
    sd["blip.text_proj.weight"] = torch.randn(embed_dim, text.config.hidden_size) * 0.02
    sd["blip.text_proj.bias"] = torch.zeros(embed_dim)
    for key, value in head.state_dict().items():
        sd[f"mlp.layers.{key}"] = value
    return sd


def _five_linear_head(in_dim: int, std: float | None) -> Any:
    import torch
    from torch import nn

    head = nn.Sequential(
        nn.Linear(in_dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
    if std is not None:
        with torch.no_grad():
            for m in head:
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, std)
                    m.bias.normal_(0.0, std)
    return head


def _build_imagereward(tmp: Path, *, vision_width: int = 128, text_width: int = 32, **_: Any) -> None:
    import torch
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from smpo_cli.rewards.imagereward import CHECKPOINT_NAME, MED_CONFIG_NAME, VISION_HEAD_DIM

    tmp.mkdir(parents=True)
    (tmp / "vocab.txt").write_text("\n".join(_BERT_VOCAB) + "\n", encoding="utf-8")
    tok = BertTokenizer.from_pretrained(str(tmp))
    vocab_size = len(tok) + 2  # + [DEC], [ENC]
    vcfg = BlipVisionConfig(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=2,
        num_attention_heads=max(1, vision_width // VISION_HEAD_DIM),
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    med = {
        "architectures": ["BertModel"],
        "hidden_size": text_width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 2 * text_width,
        "vocab_size": vocab_size,
        "max_position_embeddings": 40,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "model_type": "bert",
        "encoder_width": vision_width,
        "add_cross_attention": True,
    }
    tcfg = BlipTextConfig(
        vocab_size=vocab_size,
        hidden_size=text_width,
        encoder_hidden_size=vision_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=40,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        bos_token_id=vocab_size - 2,
        sep_token_id=tok.sep_token_id,
        eos_token_id=tok.sep_token_id,
        is_decoder=True,
    )
    vision, text = BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False)
    # ImageReward initialises its head N(0, 1/(D+1)), which makes random-model rewards almost
    # constant; a larger std makes the tiny model's scores differ from image to image.
    head = _five_linear_head(text_width, std=0.2)
    torch.save(imagereward_original_state_dict(vision, text, head), tmp / CHECKPOINT_NAME)
    (tmp / MED_CONFIG_NAME).write_text(json.dumps(med, indent=2), encoding="utf-8")


def _build_aesthetic(tmp: Path, **_: Any) -> None:
    import torch

    from smpo_cli.rewards.aesthetic import HEAD_FILES

    _tiny_clip(tmp, hidden_act="quick_gelu", logit_scale=1 / 0.07)
    # The original MLP module keeps the stack in `self.layers`: keys layers.0.weight, ...
    head = _five_linear_head(16, std=None)
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, tmp / HEAD_FILES[1])


# Qwen2's special tokens, in the order (and so with the relative ids) of Qwen2-VL's tokenizer.
_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template of Qwen/Qwen2-VL-7B-Instruct (chat_template.json).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_bpe_files(dest: Path, corpus: str) -> None:
    """``vocab.json`` + ``merges.txt`` of a tiny byte-level BPE with Qwen2's pre-tokenizer.

    The 256 byte symbols, plus left-to-right merges that make each distinct pre-token of
    ``corpus`` one token (so the long HPSv3 instruction stays a few hundred tokens); any other
    text falls back to bytes.
    """
    from tokenizers import Regex, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    vocab = list(bytes_to_unicode().values())
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    for piece, _ in pre.pre_tokenize_str(corpus):
        pieces = list(piece)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pair[0] + pair[1]
            if merged not in known:
                known.add(merged)
                vocab.append(merged)
                merges.append(pair)
            pieces = [merged] + pieces[2:]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (dest / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _qwen2vl_tokenizer_and_image_processor(tok_dir: Path) -> tuple[Any, Any]:
    import transformers
    from transformers import AddedToken

    from smpo_cli.rewards.base import transformers_major

    # transformers 5: Qwen2Tokenizer is the tokenizers-backed class; 4.x: the fast one is separate.
    tok_cls = transformers.Qwen2Tokenizer if transformers_major() >= 5 else transformers.Qwen2TokenizerFast
    tok = tok_cls.from_pretrained(str(tok_dir), unk_token=None, bos_token=None, eos_token=None, pad_token=None)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_SPECIALS], special_tokens=True)
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    image_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    # the pixel limits of Qwen2-VL-7B-Instruct's preprocessor_config.json
    return tok, image_cls(min_pixels=3136, max_pixels=12845056)


def _build_hpsv3(tmp: Path, **_: Any) -> None:
    import torch
    from safetensors.torch import save_file
    from torch import nn
    from transformers import Qwen2VLConfig, Qwen2VLModel

    from smpo_cli.rewards.hpsv3 import CHECKPOINT_NAME, INSTRUCTION, RATING_REQUEST, REWARD_TOKEN

    tmp.mkdir(parents=True)
    tok_dir = tmp / "_bpe"
    qwen_bpe_files(tok_dir, INSTRUCTION + RATING_REQUEST.replace(REWARD_TOKEN, "") + "You are a helpful assistant.")
    tok, image_processor = _qwen2vl_tokenizer_and_image_processor(tok_dir)
    ids = {t: int(tok.convert_tokens_to_ids(t)) for t in _QWEN_SPECIALS}
    width = 32
    n_rows = len(tok) + 1  # + <|Reward|>, added at load time as the official code does
    # Qwen2-VL-7B-Instruct's config.json (transformers 4.41 flat layout), at tiny sizes.
    cfg = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": width,
        "initializer_range": 0.02,
        "intermediate_size": 2 * width,
        "max_position_embeddings": 32768,
        "max_window_layers": 2,
        "model_type": "qwen2_vl",
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 2,
            "embed_dim": 32,
            "mlp_ratio": 2,
            "num_heads": 2,
            "in_chans": 3,
            "hidden_size": width,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2
        "vocab_size": n_rows,
    }
    model = Qwen2VLModel(Qwen2VLConfig(**cfg))
    # HPSv3's "ranknet" head at its real widths; std 0.1 so that random rewards differ between inputs.
    head = nn.Sequential(
        nn.Linear(width, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2)
    )
    with torch.no_grad():
        for m in head:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.1)
                m.bias.normal_(0.0, 0.1)
    sd: dict[str, Any] = {}
    for key, value in model.state_dict().items():  # transformers 4.45 names, as the checkpoint has them
        if key.startswith("visual."):
            sd[key] = value
        elif key.startswith("language_model."):
            sd["model." + key[len("language_model.") :]] = value
        else:  # pragma: no cover - a transformers rename would land here
            raise RuntimeError(f"no HPSv3 name for Qwen2-VL key {key}")
    sd["lm_head.weight"] = torch.randn(n_rows, width) * 0.02
    sd.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(tmp / CHECKPOINT_NAME))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    # the processor files as Qwen2-VL-7B-Instruct has them: tokenizer, preprocessor_config.json, chat_template.json
    tok.save_pretrained(str(tmp))
    image_processor.save_pretrained(str(tmp))
    (tmp / "chat_template.json").write_text(
        json.dumps({"chat_template": QWEN2VL_CHAT_TEMPLATE}, indent=2), encoding="utf-8"
    )
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()


_BUILDERS: dict[str, Callable[..., None]] = {
    "pickscore": _build_pickscore,
    "clip": _build_clip,
    "hpsv2": _build_hpsv2,
    "imagereward": _build_imagereward,
    "aesthetic": _build_aesthetic,
    "hpsv3": _build_hpsv3,
}


def build_tiny_reward(name: str, dest: str | Path | None = None, *, seed: int = 0, **options: Any) -> Path:
    """Write a tiny random ``name`` reward model into folder ``dest`` (replaced atomically).

    ``dest=None`` uses ``tiny_reward_path(name)`` in smpo's cache. Options: ``variant`` for
    hpsv2 (``"v2.1"`` default, or ``"v2.0"``). Returns the folder; pass it to ``load_reward``.
    The global RNG state is left untouched.
    """
    import torch

    if name not in _BUILDERS:
        raise UsageError(f"no tiny model for reward {name!r}", hint=f"choose one of: {', '.join(TINY_NAMES)}")
    dest = Path(dest) if dest is not None else tiny_reward_path(name)
    from smpo_cli.rewards.base import quiet_transformers

    with atomic_path(dest) as tmp, torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)
        _BUILDERS[name](tmp, **options)
        marker = {
            "name": name,
            "seed": seed,
            "options": options,
            "note": "random weights; scores are meaningless",
        }
        (tmp / _MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    return dest


def tiny_reward_path(name: str, *, build: bool = False) -> Path:
    """Folder of the cached tiny ``name`` model (``$SMPO_CACHE/tiny-rewards/<name>``); built if asked."""
    path = cache_dir() / "tiny-rewards" / name
    if build and not (path / _MARKER).is_file():
        build_tiny_reward(name, path)
    return path
