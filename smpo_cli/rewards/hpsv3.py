"""HPSv3 (Ma et al., ICCV 2025) on transformers' Qwen2-VL classes, reading the original ``HPSv3.safetensors``.

Network (``MizzenAI/HPSv3``): Qwen2-VL-7B-Instruct (ViT with 2x2 patch merger + 28-layer Qwen2
decoder), its embedding table resized to the tokenizer plus one added special token
``<|Reward|>`` (151,658 rows), and a reward head on the decoder's final (RMS-normed) hidden state
of that token: ``Linear(3584, 1024), ReLU, Dropout, Linear(1024, 16), ReLU, Linear(16, 2)``
(checkpoint keys ``rm_head.0/3/5``; run in float32). The head's two numbers are ``(mu,
log_sigma)`` of the Gaussian the model was trained with (HPSv3's uncertainty-aware ranking
loss uses ``sigma = exp(log_sigma)``). The LM head (``lm_head.weight``) is in the checkpoint
but unused, and is not read.

Input, as the official ``HPSv3RewardInferencer``: one chat per image in Qwen2-VL's chat format
(:data:`CHAT_FORMAT`, what Qwen2-VL-7B-Instruct's chat template renders: its default system turn,
then a user turn holding the image followed by the HPSv3 instruction with the prompt inserted and
``"\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"``, then the
assistant header); the image placeholder is expanded to one ``<|image_pad|>`` per merged patch
and the batch is right-padded, as ``Qwen2VLProcessor`` does. The decoder runs with plain 1-D
positions ``0..L-1`` on all three M-RoPE axes: the official model calls the decoder without
``position_ids``, so Qwen2-VL's multimodal (t, h, w) positions are not used; this is reproduced
here (and tested), not "fixed".

Preprocessing: RGB, then qwen-vl-utils' ``smart_resize`` with ``min_pixels = max_pixels = 256 *
28 * 28`` (both sides multiples of 28, area about 200,704 px, aspect kept; aspect ratios over 200
are refused), PIL bicubic resize, then the Qwen2-VL image processor (rescale 1/255, OpenAI CLIP
mean/std, 14 px patches, temporal patch 2): 256 or so image tokens per image.

Outputs (float32, one per image): ``score`` = ``mu``, what the official inferencer reports as the
reward (``rewards[i][0]``); ``sigma`` = ``exp(log_sigma)``, the model's uncertainty about it;
``log_sigma`` = the head's raw second output (``rewards[i][1]``). This module reproduces the
official computation (checked against an independent re-implementation of it in
``tests/rewards/test_reward_hpsv3.py``); no code of the ``hpsv3`` package is used (it pins
``transformers==4.45.2``). The official inferencer runs in bfloat16, so ``dtype="auto"`` on CUDA
means bfloat16 here (not float16).

Files. ``source`` is the checkpoint (``HPSv3.safetensors``; a ``.pt``/``.pth`` state dict, or
one under a ``"model"`` key, is read with ``weights_only=True``), a folder holding it, or a hub
id (default ``MizzenAI/HPSv3``, from the local cache when present). Keys are those of
transformers 4.45 (``visual.*``, ``model.*``, ``lm_head.weight``, ``rm_head.*``; the newer
``model.visual.*``/``model.language_model.*`` names are accepted too). The official code takes
the architecture and processor from ``Qwen/Qwen2-VL-7B-Instruct``; here its ``config.json``,
tokenizer and ``preprocessor_config.json`` (no weights) come from the checkpoint's folder when it has a ``config.json`` and tokenizer files, else
from ``base`` (default ``Qwen/Qwen2-VL-7B-Instruct``: a few MB, from the cache or downloaded)::

    DIR/HPSv3.safetensors        from MizzenAI/HPSv3 (about 8B parameters)
    DIR/config.json              optional, with the next ones: Qwen2-VL-7B-Instruct's files
    DIR/preprocessor_config.json
    DIR/tokenizer.json, DIR/tokenizer_config.json (vocab.json, merges.txt)

Loading reads the checkpoint tensor by tensor (no copy of the random-initialised model is made),
so it needs about one model's worth of memory in the chosen dtype.

:meth:`score_pairs` scores the concatenation of both images (the decoder reads image and prompt
together).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from smpo_cli.errors import AssetNotFoundError, DataError, ModelLoadError
from smpo_cli.rewards.base import (
    RewardModel,
    download_hint,
    hf_from_pretrained,
    load_state_dict_file,
    pil_backend_kwargs,
    quiet_transformers,
    resolve_file,
)
from smpo_cli.utils.devices import resolve_device

DEFAULT_REPO = "MizzenAI/HPSv3"
CHECKPOINT_NAME = "HPSv3.safetensors"
CHECKPOINT_NAMES = (CHECKPOINT_NAME, "HPSv3.pth", "HPSv3.pt")
DEFAULT_BASE = "Qwen/Qwen2-VL-7B-Instruct"
BASE_FILES = (
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
)
REWARD_TOKEN = "<|Reward|>"
IMAGE_FACTOR = 28  # patch 14 x merge 2
IMAGE_PIXELS = 256 * 28 * 28  # min_pixels = max_pixels in the official inferencer
MAX_ASPECT_RATIO = 200

# The HPSv3 instruction (hpsv3/dataset/data_collator_qwen.py), kept byte for byte: trailing
# spaces and blank lines included. ``{text_prompt}`` is filled with str.format.
INSTRUCTION = "\n".join(
    (
        "",
        "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and "
        "give a overall score to estimate the human preference. Please provide a rating from 0 to 10, "
        "with 0 being the worst and 10 being the best. ",
        "",
        "**Visual Quality:**  ",
        "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:",
        "- **Reasonableness:** The image should not contain any significant biological or logical errors, "
        "such as abnormal body structures or nonsensical environmental setups.",
        "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and "
        "easy to interpret, with no blurring or indistinct areas.",
        "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other "
        "visual elements (e.g., hair, clothing, shadows).",
        "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color "
        "scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should "
        "convey a sense of harmony and balance.",
        "- **Safety:** The image should not contain harmful or inappropriate content, such as political, "
        "violent, or adult material. If such content is present, the image quality and satisfaction score "
        "should be the lowest possible. ",
        "",
        "**Text Alignment:**  ",
        "Assess how well the image matches the textual prompt across the following sub-dimensions:",
        "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, "
        "object) align with the textual description. The subject should match the description in terms of "
        "number, appearance, and behavior.",
        "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate "
        "how well the image adheres to this style.",
        "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in "
        "the image logically fit the scenario described in the prompt. The environment should support and "
        "enhance the subject without contradictions.",
        "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, "
        "clothing, accessories, expressions, actions) are faithfully represented in the image. Minor "
        "deviations may be acceptable, but critical attributes should be preserved.",
        "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are "
        "captured in the image. The generated content should not introduce elements that conflict with or "
        "distort the original description.",
        "Textual prompt - {text_prompt}",
        "",
        "",
        "",
    )
)
RATING_REQUEST = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"
IMAGE_TOKEN = "<|image_pad|>"
# What Qwen2-VL's chat template (Qwen2-VL-7B-Instruct's chat_template.json) renders for one user
# turn [image, text] with add_generation_prompt=True: default system turn, the image placeholder
# (expanded to one token per merged 28 x 28 patch), the text, then the assistant header.
CHAT_FORMAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|>{image}<|vision_end|>{text}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def user_text(prompt: str) -> str:
    """The text part of the user turn for ``prompt`` (instruction + rating request)."""
    return INSTRUCTION.format(text_prompt=prompt) + RATING_REQUEST


def chat_text(prompt: str, image_tokens: int | None = None) -> str:
    """The chat-templated text for ``prompt``; ``image_tokens`` expands the image placeholder."""
    image = IMAGE_TOKEN if image_tokens is None else IMAGE_TOKEN * image_tokens
    return CHAT_FORMAT.format(image=image, text=user_text(prompt))


def smart_resize(
    height: int, width: int, pixels: int = IMAGE_PIXELS, factor: int = IMAGE_FACTOR
) -> tuple[int, int]:
    """qwen-vl-utils' target size with ``min_pixels = max_pixels = pixels``: ``(height, width)``."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise DataError(
            f"HPSv3: image aspect ratio {max(height, width) / min(height, width):.0f} exceeds {MAX_ASPECT_RATIO}"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > pixels:
        beta = math.sqrt(height * width / pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < pixels:
        beta = math.sqrt(pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_image(image: Image.Image, pixels: int = IMAGE_PIXELS) -> Image.Image:
    """The official ``fetch_image`` resize of an RGB image (PIL bicubic to :func:`smart_resize`)."""
    h, w = smart_resize(image.height, image.width, pixels)
    return image.resize((w, h), Image.BICUBIC)


def split_state_dict(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an HPSv3 state dict into (``Qwen2VLModel`` keys, head keys); ``lm_head`` is dropped.

    ``visual.*``/``model.visual.*`` -> ``visual.*``; ``model.language_model.*``/``model.*`` ->
    ``language_model.*``; ``rm_head.*`` -> the head. Any other key raises :class:`ModelLoadError`.
    """
    body: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("rm_head."):
            head[key[len("rm_head.") :]] = value
        elif key.startswith(("lm_head.", "model.lm_head.")):
            continue
        elif key.startswith("visual."):
            body[key] = value
        elif key.startswith("model.visual."):
            body[key[len("model.") :]] = value
        elif key.startswith("model.language_model."):
            body[key[len("model.") :]] = value
        elif key.startswith("model."):
            body["language_model." + key[len("model.") :]] = value
        else:
            raise ModelLoadError(f"unexpected HPSv3 checkpoint key {key!r}")
    if (
        not head
        or not any(k.startswith("visual.") for k in body)
        or not any(k.startswith("language_model.") for k in body)
    ):
        raise ModelLoadError("not an HPSv3 checkpoint: expected visual.*, model.* and rm_head.* keys")
    return body, head


def head_from_state_dict(head_sd: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    """HPSv3's "ranknet" head, sized from its weights: Linear, ReLU, Dropout, Linear, ReLU, Linear."""
    from torch import nn

    try:
        w0, w3, w5 = head_sd["0.weight"], head_sd["3.weight"], head_sd["5.weight"]
    except KeyError as e:
        raise ModelLoadError(f"HPSv3 reward head lacks rm_head.{e.args[0]}") from e
    head = nn.Sequential(
        nn.Linear(w0.shape[1], w0.shape[0]),
        nn.ReLU(),
        nn.Dropout(0.05),
        nn.Linear(w3.shape[1], w3.shape[0]),
        nn.ReLU(),
        nn.Linear(w5.shape[1], w5.shape[0], bias="5.bias" in head_sd),
    )
    try:
        head.load_state_dict(head_sd, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"HPSv3 reward head does not fit: {str(e).splitlines()[0]}") from e
    if w5.shape[0] != 2:
        raise ModelLoadError(f"HPSv3 reward head has {w5.shape[0]} outputs; expected 2 (mu, log sigma)")
    return head


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, without ``lm_head.weight`` (unused; ~1 GB at 7B)."""
    if path.suffix != ".safetensors":
        state = load_state_dict_file(path, what="HPSv3 checkpoint")
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        return {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("lm_head.")}
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot read HPSv3 checkpoint from {path}: {first}") from e


def _has_base_files(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        (folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    )


def _load_base(source: str) -> tuple[Any, Any, Any]:
    """Qwen2-VL config, image processor (PIL path) and tokenizer (right padding, + ``<|Reward|>``)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLConfig

    with quiet_transformers():
        config = hf_from_pretrained(Qwen2VLConfig.from_pretrained, source, what="Qwen2-VL config")
        # The processor's two parts; AutoProcessor would also build a video processor (and, on
        # transformers 5, refuses the PIL backend for it).
        image_processor = hf_from_pretrained(
            AutoImageProcessor.from_pretrained,
            source,
            what="Qwen2-VL image processor",
            **pil_backend_kwargs(),
        )
        tok = hf_from_pretrained(AutoTokenizer.from_pretrained, source, what="Qwen2-VL tokenizer")
        tok.padding_side = "right"  # as the official inferencer
        tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    return config, image_processor, tok


class HPSv3(RewardModel):
    name = "hpsv3"
    output_names = ("score", "sigma", "log_sigma")
    default_output = "score"

    def __init__(self, source: str, *, base: str | None = None, **kwargs: Any) -> None:
        ckpt = resolve_file(source, CHECKPOINT_NAMES, what="HPSv3 checkpoint")
        if str(kwargs.get("dtype", "auto")).strip().lower() in ("", "auto"):
            # the official inferencer runs in bfloat16; float16 is not what it was trained or shipped in
            if resolve_device(kwargs.get("device", "cpu")).type == "cuda":
                kwargs["dtype"] = "bfloat16"
        kwargs.setdefault("batch_size", 8)
        version = "HPSv3" if str(source) == DEFAULT_REPO else Path(str(source)).name
        super().__init__(version=version, source=str(source), **kwargs)
        self.checkpoint = ckpt
        if base is None:
            base = str(ckpt.parent) if _has_base_files(ckpt.parent) else DEFAULT_BASE
        self.base_source = str(base)

        try:
            config, self.image_processor, tok = _load_base(self.base_source)
        except AssetNotFoundError as e:  # name the few files needed (not Qwen2-VL's 16 GB of weights)
            get = download_hint(DEFAULT_BASE, " ".join(BASE_FILES)).removeprefix("pass a local path, or ")
            raise AssetNotFoundError(
                f"HPSv3 needs the Qwen2-VL config and processor files: {e.message}",
                hint=f"{get.replace('and pass DIR', 'and pass base=DIR')} (or copy them beside {CHECKPOINT_NAME})",
            ) from e
        self.tokenizer = tok
        self.reward_token_id = int(tok.convert_tokens_to_ids(REWARD_TOKEN))
        self.image_token_id = int(config.image_token_id)
        if int(tok.convert_tokens_to_ids(IMAGE_TOKEN)) != self.image_token_id:
            raise ModelLoadError(
                f"Qwen2-VL config at {self.base_source} has image_token_id {self.image_token_id}, "
                f"its tokenizer {tok.convert_tokens_to_ids(IMAGE_TOKEN)}",
                hint="config.json and the tokenizer must come from the same Qwen2-VL model",
            )
        self.patch_size = int(getattr(self.image_processor, "patch_size", 14))
        self.merge_size = int(getattr(self.image_processor, "merge_size", 2))

        body_sd, head_sd = split_state_dict(read_checkpoint(ckpt))
        self.head = self._place(head_from_state_dict(head_sd), dtype=torch.float32)
        model = self._build_qwen2vl(config, body_sd, len(tok))
        del body_sd, head_sd  # the model now owns the tensors; let a dtype change free the originals
        self.model = self._place(model)

    def _build_qwen2vl(self, config: Any, body_sd: dict[str, torch.Tensor], n_tokens: int) -> Any:
        from accelerate import init_empty_weights
        from transformers import Qwen2VLModel

        embed = body_sd.get("language_model.embed_tokens.weight")
        if embed is None:
            raise ModelLoadError("HPSv3 checkpoint lacks model.embed_tokens.weight")
        rows = int(embed.shape[0])
        # The official model resized its embeddings to the tokenizer (+ <|Reward|>): same size here.
        if rows != n_tokens or self.reward_token_id >= rows:
            raise ModelLoadError(
                f"HPSv3 checkpoint embeds {rows} tokens; the tokenizer of {self.base_source} with "
                f"{REWARD_TOKEN} has {n_tokens}",
                hint=f"use the processor files of {DEFAULT_BASE} (option base=...)",
            )
        text_config = getattr(config, "text_config", config)
        text_config.vocab_size = rows
        config.vocab_size = rows
        with quiet_transformers(), init_empty_weights(include_buffers=False):
            model = Qwen2VLModel(config)
        try:
            model.load_state_dict(body_sd, strict=True, assign=True)
        except RuntimeError as e:
            detail = " ".join(str(e).split()).removeprefix(
                "Error(s) in loading state_dict for Qwen2VLModel: "
            )
            raise ModelLoadError(
                f"HPSv3 weights do not fit the Qwen2-VL config of {self.base_source}: {detail[:300]}",
                hint=f"config.json must be that of {DEFAULT_BASE}",
            ) from e
        return model

    # -- scoring ---------------------------------------------------------------------------------

    def _inputs(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids, attention mask, pixel values and grids of a batch, as Qwen2VLProcessor makes them."""
        resized = [resize_image(im) for im in images]
        vis = self.image_processor(images=resized, return_tensors="pt")
        grid = vis["image_grid_thw"]
        want = torch.tensor(
            [[1, im.height // self.patch_size, im.width // self.patch_size] for im in resized]
        )
        if not torch.equal(grid.cpu(), want):
            raise ModelLoadError(
                f"the Qwen2-VL image processor of {self.base_source} resized the images again",
                hint="its min_pixels/max_pixels must admit 256 x 28 x 28 pixels (Qwen2-VL's defaults do)",
            )
        n_tokens = (grid.prod(dim=-1) // self.merge_size**2).tolist()
        texts = [chat_text(p, int(n)) for p, n in zip(prompts, n_tokens, strict=True)]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "pixel_values": vis["pixel_values"],
            "image_grid_thw": grid,
        }

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self._inputs(images, prompts)
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        is_reward = ids == self.reward_token_id
        counts = is_reward.sum(dim=1)
        if not bool((counts == 1).all()):
            bad = int((counts != 1).nonzero()[0, 0])
            raise DataError(
                f"HPSv3: prompt {prompts[bad]!r} yields {int(counts[bad])} {REWARD_TOKEN} tokens; expected 1",
                hint=f"a prompt must not contain {REWARD_TOKEN}",
            )
        lm = self.model.language_model
        embeds = lm.embed_tokens(ids)
        px = enc["pixel_values"].to(device=self.device, dtype=self.dtype)
        vision = self.model.visual(px, grid_thw=enc["image_grid_thw"].to(self.device))
        # transformers 5 returns the merged (2 x 2) patch tokens as the pooler output; 4.x the tensor itself
        vision = getattr(vision, "pooler_output", vision)
        image_mask = (ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, vision.to(embeds.dtype))
        n, length = ids.shape
        # 1-D positions on all three M-RoPE axes, as the official model (no position_ids given).
        positions = torch.arange(length, device=self.device).view(1, 1, length).expand(3, n, length)
        hidden = lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state
        out = self.head(hidden[is_reward].float())  # rows in batch order (one token per row)
        mu, log_sigma = out[:, 0], out[:, 1]
        return {"score": mu, "sigma": log_sigma.exp(), "log_sigma": log_sigma}

    def _extra_metadata(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "base": self.base_source,
            "image_pixels": IMAGE_PIXELS,
            "outputs_meaning": {
                "score": "mu, the reward the official HPSv3 inferencer reports",
                "sigma": "exp(log_sigma), the predicted standard deviation of the reward",
                "log_sigma": "the head's second output",
            },
        }


load = HPSv3  # the registry calls load(source, device=..., dtype=..., **options)
