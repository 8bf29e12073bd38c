"""smpo's ImageReward vs the ``image-reward`` package (THUDM/ImageReward 1.5), same random weights.

Runs only where ``ImageReward`` is installed; it is not a dependency of smpo (it pins
``timm==0.6.13``, which clashes with open-clip-torch 3). To run it, in a separate scratch venv:

    python3 -m venv /tmp/irvenv && . /tmp/irvenv/bin/activate
    pip install torch torchvision transformers safetensors huggingface_hub pillow numpy pytest
    pip install --no-deps image-reward==1.5 fairscale==0.4.13 clip-anytorch==2.6.0 timm==0.6.13
    pip install accelerate datasets diffusers "setuptools<82" ftfy
    PYTHONPATH=. python -m pytest tests/rewards/test_imagereward_parity.py -s

The package needs shims to import and run on transformers 5 (see the shared rewards-offline notes,
section 4a); they are applied here, before and after ``import ImageReward``, and only when the
package is present. The reference's ViT is hard-coded to ViT-L; ``create_vit`` is swapped for a
narrow one of the same class, and its text tower stays 768 wide (its head is ``MLP(768)``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

if importlib.util.find_spec("ImageReward") is None:
    pytest.skip("the image-reward package is not installed", allow_module_level=True)

VISION_WIDTH, VISION_HEADS = 128, 2
MED_CONFIG = {
    "architectures": ["BertModel"],
    "hidden_size": 768,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 44,
    "max_position_embeddings": 64,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "model_type": "bert",
    "encoder_width": 768,
    "add_cross_attention": True,
}


def _shim_before_import() -> None:
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    try:
        import pkg_resources  # noqa: F401  (clip-anytorch imports it; setuptools >= 82 dropped it)
    except ImportError:
        import packaging

        sys.modules["pkg_resources"] = SimpleNamespace(packaging=packaging)
    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name))
    if not hasattr(mu, "find_pruneable_heads_and_indices"):  # gone in v5; only used to prune heads
        mu.find_pruneable_heads_and_indices = lambda *a, **k: (set(), torch.arange(0))


def _shim_after_import(vocab_dir) -> None:
    from ImageReward.models.BLIP import blip_pretrain, med
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer, PreTrainedModel

    def init_tokenizer():
        tok = BertTokenizer.from_pretrained(str(vocab_dir))
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
        return tok

    def init_weights(self):
        if not hasattr(self, "all_tied_weights_keys"):
            self.post_init()  # transformers 5: sets the attributes, then calls init_weights again
        else:
            PreTrainedModel.init_weights(self)

    def invert_attention_mask(self, mask):
        mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]
        return (1.0 - mask.to(self.dtype)) * torch.finfo(self.dtype).min

    def create_vit(vit, image_size, *args, **kwargs):
        vit_model = VisionTransformer(
            img_size=image_size, patch_size=16, embed_dim=VISION_WIDTH, depth=2, num_heads=VISION_HEADS
        )
        return vit_model, VISION_WIDTH

    blip_pretrain.init_tokenizer = init_tokenizer
    blip_pretrain.create_vit = create_vit
    med.BertPreTrainedModel.init_weights = init_weights
    med.BertModel.invert_attention_mask = invert_attention_mask
    med.BertModel.get_head_mask = lambda self, head_mask, n, *a, **k: [None] * n


_shim_before_import()
ImageRewardPkg = pytest.importorskip("ImageReward")


def _images():
    rng = np.random.default_rng(7)
    noise = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(64, 48), (300, 200), (231, 500)]
    ]
    yy, xx = np.mgrid[0:90, 0:70]
    smooth = Image.fromarray(np.stack([xx * 3, yy * 2, (xx + yy) % 256], -1).astype(np.uint8))
    gray = Image.fromarray(((xx * yy) % 256).astype(np.uint8), "L")
    return [*noise, smooth, gray, Image.new("RGB", (224, 224), (250, 20, 90))]


PROMPTS = ["a cat", "a photo of the dog.", "the cats, of a dog", "", "zebra quiz", "a " * 40]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from smpo_cli.rewards import load_reward
    from smpo_cli.rewards.tiny import _BERT_VOCAB

    folder = tmp_path_factory.mktemp("imagereward-parity")
    (folder / "vocab.txt").write_text("\n".join(_BERT_VOCAB) + "\n")
    (folder / "med_config.json").write_text(json.dumps(MED_CONFIG))
    _shim_after_import(folder)
    torch.manual_seed(0)
    ref = ImageRewardPkg.ImageReward(med_config=str(folder / "med_config.json"), device="cpu")
    with torch.no_grad():  # a head with a larger std than the package's init, so rewards differ
        for name, p in ref.mlp.named_parameters():
            p.normal_(0.0, 0.2 if "weight" in name else 0.05)
    torch.save(ref.state_dict(), folder / "ImageReward.pt")
    # The package's own load path (torch.load + load_state_dict(strict=False)).
    ref = ImageRewardPkg.load(
        str(folder / "ImageReward.pt"), device="cpu", med_config=str(folder / "med_config.json")
    )
    ours = load_reward("imagereward", folder, vision_heads=VISION_HEADS)
    return ref, ours


def test_rewards_equal_the_reference_package(pair):
    """One image at a time (as ``ImageReward.score``): equal to float32 rounding (0.0 measured).

    Batched, the matmul shapes differ, so float32 rounding differs: the tiny head here has a large
    gain (rewards up to ~30), which makes that visible at ~1e-4 absolute, ~1e-5 relative.
    """
    ref, ours = pair
    images = _images()
    all_images, all_prompts = images * len(PROMPTS), [p for p in PROMPTS for _ in images]
    with torch.no_grad():
        expected = torch.tensor([ref.score(p, im) for p in PROMPTS for im in images], dtype=torch.float32)
    single = ours.score(all_images, all_prompts, batch_size=1)["score"]
    batched = ours.score(all_images, all_prompts, batch_size=len(all_images))["score"]
    d_single = (single - expected).abs().max().item()
    d_batched = (batched - expected).abs().max().item()
    print(
        f"\nImageReward parity: {len(expected)} (prompt, image) pairs, rewards in "
        f"[{expected.min():.3f}, {expected.max():.3f}] (std {expected.std():.3f}); max |diff| "
        f"one at a time = {d_single:.3e}, batched = {d_batched:.3e}"
    )
    assert expected.std() > 0.01  # the comparison is not between constants
    torch.testing.assert_close(single, expected, atol=1e-6, rtol=1e-7)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(batched, expected, atol=1e-5 * scale, rtol=0)


def test_ranking_equals_inference_rank(pair):
    ref, ours = pair
    images = _images()
    with torch.no_grad():
        ranks, rewards = ref.inference_rank("a photo of the cat", images)
    got = ours.score(images, "a photo of the cat")["score"]
    print(f"\ninference_rank: max |diff| = {(got - torch.tensor(rewards)).abs().max().item():.3e}")
    torch.testing.assert_close(got, torch.tensor(rewards, dtype=torch.float32), atol=1e-5, rtol=1e-6)
    order = torch.argsort(got, descending=True)
    assert [int(r) for r in torch.argsort(order) + 1] == ranks


def test_state_dict_round_trip_is_exact(pair):
    """Every tensor smpo uses is the reference's tensor, bit for bit, after the key map."""
    from smpo_cli.rewards.imagereward import convert_state_dict

    ref, ours = pair
    vision, text, head = convert_state_dict(ref.state_dict())
    head = {k.removeprefix("layers."): v for k, v in head.items()}
    for module, expected in ((ours.vision, vision), (ours.text, text), (ours.head, head)):
        actual = module.state_dict()
        assert set(actual) >= set(expected)
        for key, value in expected.items():
            assert torch.equal(actual[key], value), key
