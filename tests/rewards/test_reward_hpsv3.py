"""HPSv3 against a re-implementation of the official inferencer, written here from its algorithm.

The reference reads ``HPSv3.safetensors`` with its own key mapping into transformers'
``Qwen2VLForConditionalGeneration``, builds the inputs as ``HPSv3RewardInferencer.prepare_batch``
does (qwen-vl-utils resize, ``Qwen2VLProcessor`` with the chat template of the folder's
``chat_template.json``, right padding), runs the official forward (token embeddings, vision tower
scattered into the ``<|image_pad|>`` slots, decoder called without ``position_ids``), applies the
head to every token and keeps the ``<|Reward|>`` row: ``(mu, log_sigma)``. It shares no code with
``smpo_cli.rewards.hpsv3`` except the instruction text, which is pinned here by its SHA-256 as
computed from the ``hpsv3`` 1.0.0 wheel.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from smpo_cli.errors import AssetNotFoundError, DataError, ModelLoadError
from smpo_cli.rewards import load_reward
from smpo_cli.rewards.hpsv3 import user_text

# sha256(INSTRUCTION.format(text_prompt="a cat") + prompt_with_special_token) of hpsv3 1.0.0
OFFICIAL_TEXT_SHA256 = "58f765b8739946ac474c741df3766ebc3df8c43e966cea2edbdce196c41a2bd4"
PIXELS = 256 * 28 * 28


def _official_size(height: int, width: int, factor: int = 28) -> tuple[int, int]:
    """qwen-vl-utils smart_resize with min_pixels = max_pixels = 256 * 28 * 28."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > PIXELS:
        beta = math.sqrt(height * width / PIXELS)
        return math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    if h * w < PIXELS:
        beta = math.sqrt(PIXELS / (height * width))
        return math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _official_image(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    h, w = _official_size(image.height, image.width)
    return image.resize((w, h), Image.BICUBIC)


def _reference_processor(folder):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = AutoTokenizer.from_pretrained(str(folder), padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    image_processor = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),  # unused; the processor requires one
        chat_template=template,
    )


def _reference_model(folder):
    """Qwen2VLForConditionalGeneration with the checkpoint (lm_head included) + the head."""
    from safetensors.torch import load_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    sd = {k: v.float() for k, v in load_file(str(folder / "HPSv3.safetensors")).items()}
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = sd["model.embed_tokens.weight"].shape[0]
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**cfg))
    renamed = {}
    for key, value in sd.items():
        if key.startswith("visual."):
            renamed["model." + key] = value
        elif key.startswith("model."):
            renamed["model.language_model." + key[len("model.") :]] = value
        elif key == "lm_head.weight":
            renamed[key] = value
    model.load_state_dict(renamed, strict=True)
    head = torch.nn.Sequential(
        torch.nn.Linear(*sd["rm_head.0.weight"].shape[::-1]),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.05),
        torch.nn.Linear(*sd["rm_head.3.weight"].shape[::-1]),
        torch.nn.ReLU(),
        torch.nn.Linear(*sd["rm_head.5.weight"].shape[::-1]),
    )
    head.load_state_dict({k[len("rm_head.") :]: v for k, v in sd.items() if k.startswith("rm_head.")})
    return model.float().eval(), head.eval()


def _reference_batch(processor, images, prompts):
    messages = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": im, "min_pixels": PIXELS, "max_pixels": PIXELS},
                    {"type": "text", "text": user_text(p)},
                ],
            }
        ]
        for im, p in zip(images, prompts, strict=True)
    ]
    texts = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(
        text=texts, images=[_official_image(im) for im in images], padding=True, return_tensors="pt"
    )


def _reference_logits(model, head, batch, reward_id, *, mrope=False):
    inner = model.model
    with torch.no_grad():
        if mrope:  # what Qwen2VLForConditionalGeneration would do: multimodal (t, h, w) positions
            hidden = inner(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                image_grid_thw=batch["image_grid_thw"],
                **({"mm_token_type_ids": batch["mm_token_type_ids"]} if "mm_token_type_ids" in batch else {}),
            ).last_hidden_state
        else:  # HPSv3's forward
            ids = batch["input_ids"]
            embeds = inner.language_model.embed_tokens(ids)
            vision = inner.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
            mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, vision)
            hidden = inner.language_model(
                inputs_embeds=embeds, attention_mask=batch["attention_mask"]
            ).last_hidden_state
        logits = head(hidden)  # [B, L, 2]
        picked = logits[batch["input_ids"] == reward_id]
        return picked.view(batch["input_ids"].shape[0], -1)  # [B, 2] = (mu, log sigma)


@pytest.fixture(scope="module")
def reference(tiny_dirs):
    folder = tiny_dirs("hpsv3")
    processor = _reference_processor(folder)
    model, head = _reference_model(folder)
    reward_id = processor.tokenizer.convert_tokens_to_ids("<|Reward|>")
    return processor, model, head, reward_id


def test_instruction_is_the_official_text():
    assert hashlib.sha256(user_text("a cat").encode()).hexdigest() == OFFICIAL_TEXT_SHA256
    assert user_text("{x}").count("{x}") == 1  # the prompt is inserted, not formatted


def test_scores_match_the_official_computation(tiny_reward, reference, images, prompts):
    rm = tiny_reward("hpsv3")
    out = rm.score(images, prompts)
    processor, model, head, reward_id = reference
    logits = _reference_logits(model, head, _reference_batch(processor, images, prompts), reward_id)
    torch.testing.assert_close(out["score"], logits[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["log_sigma"], logits[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["sigma"], logits[:, 1].exp(), atol=1e-5, rtol=1e-5)
    assert out["score"].std() > 1e-3


def test_inputs_match_the_processor(tiny_reward, reference, images, prompts):
    rm = tiny_reward("hpsv3")
    processor = reference[0]
    ours = rm._inputs([im.convert("RGB") for im in images], prompts)
    theirs = _reference_batch(processor, images, prompts)
    for key in ("input_ids", "attention_mask", "image_grid_thw"):
        assert torch.equal(ours[key], theirs[key]), key
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], atol=1e-6, rtol=0)
    assert ((ours["input_ids"] == reference[3]).sum(dim=1) == 1).all()
    assert (ours["attention_mask"][:, 0] == 1).all()  # right padding


def test_pixel_values_follow_the_qwen2vl_algorithm(tiny_reward, images):
    """Rescale, CLIP mean/std, duplicate in time, cut 2x2 groups of 14 px patches (transformers 4.45 order)."""
    rm = tiny_reward("hpsv3")
    image = images[5]  # 300 x 200, resized up to 560 x 392
    resized = _official_image(image)
    assert resized.size == (560, 392)
    x = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)[:, None, None]
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)[:, None, None]
    x = np.tile(((x - mean) / std)[None], (2, 1, 1, 1))  # (t=2, C, H, W)
    gh, gw = 392 // 14, 560 // 14
    x = x.reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    expected = torch.from_numpy(x.reshape(gh * gw, 3 * 2 * 14 * 14).copy())
    got = rm._inputs([image], ["a cat"])
    assert got["image_grid_thw"].tolist() == [[1, gh, gw]]
    torch.testing.assert_close(got["pixel_values"], expected, atol=1e-5, rtol=0)


def test_multimodal_rope_positions_would_change_the_scores(reference, images, prompts):
    """HPSv3 runs its decoder with 1-D positions; Qwen2-VL's own (t, h, w) positions give other numbers."""
    processor, model, head, reward_id = reference
    batch = _reference_batch(processor, images[:3], prompts[:3])
    official = _reference_logits(model, head, batch, reward_id)
    mrope = _reference_logits(model, head, batch, reward_id, mrope=True)
    assert (official - mrope).abs().max() > 1e-4


def test_batch_equals_one_at_a_time(tiny_reward, images, prompts):
    rm = tiny_reward("hpsv3")
    batched = rm.score(images, prompts, batch_size=len(images))
    singles = [rm.score([im], [p], batch_size=1) for im, p in zip(images, prompts, strict=True)]
    for key in rm.output_names:
        torch.testing.assert_close(batched[key], torch.cat([s[key] for s in singles]), atol=1e-5, rtol=0)


def test_prompt_matters(tiny_reward, images):
    rm = tiny_reward("hpsv3")
    image = images[0]
    scores = rm.score([image] * 3, ["a cat", "a photo of the red dog", ""])["score"]
    assert len(set(scores.tolist())) == 3
    assert (scores - scores[0]).abs().max() > 1e-4


def test_prompt_with_the_reward_token_is_refused(tiny_reward, images):
    with pytest.raises(DataError, match="Reward"):
        tiny_reward("hpsv3").score(images[:1], ["a cat <|Reward|>"])


def test_outputs_and_metadata(tiny_reward):
    rm = tiny_reward("hpsv3")
    assert rm.output_names == ("score", "sigma", "log_sigma") and rm.default_output == "score"
    meta = rm.metadata
    assert meta["base"] == meta["checkpoint"].rsplit("/", 1)[0]  # config + processor from the folder
    assert meta["image_pixels"] == PIXELS


def test_checkpoint_file_itself_loads(tiny_dirs, tiny_reward, images, prompts):
    folder = tiny_dirs("hpsv3")
    rm = load_reward("hpsv3", folder / "HPSv3.safetensors")
    torch.testing.assert_close(
        rm.score(images[:2], prompts[:2])["score"],
        tiny_reward("hpsv3").score(images[:2], prompts[:2])["score"],
    )


def test_bad_paths_give_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(AssetNotFoundError) as info:
        load_reward("hpsv3", tmp_path / "nowhere")
    assert "no such file or folder" in info.value.message and "\n" not in str(info.value)
    with pytest.raises(AssetNotFoundError, match="holds none of HPSv3.safetensors"):
        load_reward("hpsv3", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AssetNotFoundError) as info:
        load_reward("hpsv3", "smpo-tests/no-such-hpsv3")
    assert "\n" not in str(info.value)
    assert "smpo-tests/no-such-hpsv3 HPSv3.safetensors" in info.value.hint and "download" in info.value.hint


def test_missing_and_unknown_weights_are_load_errors(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "h"
    shutil.copytree(tiny_dirs("hpsv3"), folder)
    sd = load_file(str(folder / "HPSv3.safetensors"))
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(missing, str(folder / "HPSv3.safetensors"))
    with pytest.raises(ModelLoadError, match="up_proj") as info:
        load_reward("hpsv3", folder)
    assert "\n" not in str(info.value)
    save_file({**sd, "value_head.weight": torch.zeros(1)}, str(folder / "HPSv3.safetensors"))
    with pytest.raises(ModelLoadError, match="value_head"):
        load_reward("hpsv3", folder)


def test_newer_transformers_key_names_load_the_same(tiny_dirs, tiny_reward, tmp_path, images, prompts):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "h"
    shutil.copytree(tiny_dirs("hpsv3"), folder)
    sd = load_file(str(folder / "HPSv3.safetensors"))
    renamed = {}
    for key, value in sd.items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = "model.language_model." + key[len("model.") :]
        renamed[key] = value
    save_file(renamed, str(folder / "HPSv3.safetensors"))
    got = load_reward("hpsv3", folder).score(images[:2], prompts[:2])["score"]
    torch.testing.assert_close(got, tiny_reward("hpsv3").score(images[:2], prompts[:2])["score"])


def test_tokenizer_that_does_not_fit_the_checkpoint_is_a_load_error(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "h"
    shutil.copytree(tiny_dirs("hpsv3"), folder)
    sd = load_file(str(folder / "HPSv3.safetensors"))
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:-1].contiguous()  # no <|Reward|> row
    save_file(sd, str(folder / "HPSv3.safetensors"))
    with pytest.raises(ModelLoadError, match="embeds"):
        load_reward("hpsv3", folder)


def test_base_option_and_missing_base_files(tiny_dirs, tiny_reward, tmp_path, monkeypatch, images, prompts):
    """A folder with only the checkpoint (the hub repo's layout) takes config + processor from ``base``."""
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(tiny_dirs("hpsv3") / "HPSv3.safetensors", only)
    rm = load_reward("hpsv3", only, base=str(tiny_dirs("hpsv3")))
    torch.testing.assert_close(
        rm.score(images[:2], prompts[:2])["score"],
        tiny_reward("hpsv3").score(images[:2], prompts[:2])["score"],
    )
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("Qwen/Qwen2-VL-7B-Instruct", "config.json"), str):
        pytest.skip("Qwen/Qwen2-VL-7B-Instruct is in the local cache: the default base would load")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AssetNotFoundError) as info:
        load_reward("hpsv3", only)
    err = info.value
    assert "Qwen/Qwen2-VL-7B-Instruct" in err.message and "\n" not in str(err)
    assert "preprocessor_config.json" in err.hint and "base=DIR" in err.hint
