"""shapes-pickscore: near misses, training/scoring parity, PickScore's loss, the stage and the shipped model."""

import json

import numpy as np
import pytest
import torch

from smpo_cli.shapes import reward_model as rm
from smpo_cli.shapes.world import all_captions, make_dataset, parse_caption


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    from smpo_cli.shapes.base_model import write_world_tokenizer

    return CLIPTokenizer.from_pretrained(write_world_tokenizer(tmp_path_factory.mktemp("tok")))


def _model(tokenizer, seed=0):
    return rm.build_reward_clip(tokenizer, width=32, layers=1, text_layers=1, patch_size=8, image_size=32, seed=seed)


def test_a_near_miss_is_a_valid_caption_differing_in_exactly_one_attribute():
    rng = np.random.default_rng(0)
    kinds = set()
    for caption in all_captions():
        for _ in range(3):
            miss = rm.near_miss(caption, rng)
            assert miss != caption and miss.skill == caption.skill
            assert parse_caption(miss.text) == miss  # a sentence of the world's grammar
            kinds.add(rm._miss_kind(caption, miss))
    assert kinds == {"shape", "colour", "binding", "relation", "count"}
    assert rm.near_miss(parse_caption("a red circle and a blue square"), np.random.default_rng(1)).text != (
        "a red circle and a blue square"
    )


def test_training_sees_what_scoring_sees(tokenizer, tmp_path):
    """Pixels and embeddings of the training code equal those of load_reward on the saved folder."""
    from PIL import Image
    from transformers import CLIPProcessor

    from smpo_cli.rewards import load_reward

    model = _model(tokenizer).eval()
    data = make_dataset(6, seed=3)
    model.save_pretrained(tmp_path / "m")
    CLIPProcessor(image_processor=rm.image_processor(32), tokenizer=tokenizer).save_pretrained(tmp_path / "m")
    reward = load_reward("pickscore", tmp_path / "m")
    pil = [Image.fromarray(im) for im in data.images]
    processed = reward.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(rm.pixels(data.images), processed, atol=1e-6, rtol=0)
    scores = reward.score(pil, data.texts)
    ours = rm.cosines(model, rm.TextBank(tokenizer), data.images, data.texts)
    np.testing.assert_allclose(scores["cosine"].numpy(), ours, atol=1e-5)
    assert reward.cosine_range is None  # no smpo_reward.json: the official constants apply


def test_preference_loss_is_pickscores_cross_entropy(tokenizer):
    """One step's loss equals the closed form -[y log s_a + (1 - y) log s_b] on the step's batch."""
    model = _model(tokenizer)
    data = make_dataset(8, seed=4)
    pairs = rm.VotedPairs(data.images[:4], data.images[4:], data.texts[:4], np.array([1.0, 0.0, 0.5, 1.0]))
    bank = rm.TextBank(tokenizer)
    idx = np.random.default_rng(9).integers(0, 4, 4)  # the batch preference_finetune draws with seed 9
    b = pairs.take(idx)
    with torch.no_grad():
        ca = torch.from_numpy(rm.cosines(model, bank, b.images_a, b.texts))
        cb = torch.from_numpy(rm.cosines(model, bank, b.images_b, b.texts))
        scale = model.logit_scale.exp()
        la, lb = (torch.stack([scale * ca, scale * cb], 1).log_softmax(1)).T
        y = torch.from_numpy(b.label)
        expected = float(-(y * la + (1 - y) * lb).mean())
    loss = rm.preference_finetune(model, bank, pairs, steps=1, batch_size=4, lr=1e-12, warmup=0, seed=9)
    assert loss == pytest.approx(expected, rel=1e-4)


def test_vote_accuracy_counts_score_ties_half_and_skips_tied_votes():
    a = np.array([1.0, 0.0, 0.5, 0.2, 0.9])
    b = np.array([0.0, 1.0, 0.5, 0.1, 0.1])
    votes = np.array([1.0, 1.0, 1.0, 0.0, 0.5])
    assert rm.vote_accuracy(a, b, votes) == pytest.approx((1 + 0 + 0.5 + 0) / 4)


def test_a_broken_cosine_range_file_is_one_clear_error(tokenizer, tmp_path):
    from transformers import CLIPProcessor

    from smpo_cli.errors import DataError
    from smpo_cli.rewards import load_reward

    _model(tokenizer).save_pretrained(tmp_path / "m")
    CLIPProcessor(image_processor=rm.image_processor(32), tokenizer=tokenizer).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / rm.REWARD_CONFIG).write_text(json.dumps({"cosine_range": [0.5, 0.1]}))
    with pytest.raises(DataError, match="cosine_range"):
        load_reward("pickscore", tmp_path / "m")


@pytest.mark.integration
def test_the_stage_samples_votes_trains_and_writes_a_reward_smpo_score_reads(tmp_path):
    from smpo_cli.config.schema import ShapesRewardRecipe
    from smpo_cli.rewards import load_reward
    from smpo_cli.shapes.reward_run import run_shapes_reward

    recipe = ShapesRewardRecipe.model_validate({
        "output_dir": str(tmp_path / "run"), "logging": {"progress": False}, "renders": 256, "heldout_fraction": 0.3,
        "samples": [{"model": "shapes-sd15", "captions": 6, "images_per_caption": 3}],
        "num_inference_steps": 2, "net": {"width": 32, "vision_layers": 1, "text_layers": 1, "patch_size": 8},
        "contrastive": {"steps": 3, "batch_size": 16, "lr": 1e-3, "warmup_steps": 1},
        "votes": {"steps": 2, "batch_size": 4, "lr": 1e-4, "warmup_steps": 1},
    })  # fmt: skip
    result = run_shapes_reward(recipe)
    assert result.train_pairs + result.heldout_pairs == 6 * 3
    assert result.heldout_pairs > 0 and result.vote_accuracy["pairs"] == result.heldout_pairs
    for source in ("reward", "judge", "population"):
        assert 0.0 <= result.vote_accuracy[source]["accuracy"] <= 1.0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["cosine_range"] == result.cosine_range
    reward = load_reward("pickscore", result.reward_dir)
    assert reward.cosine_range == pytest.approx(tuple(result.cosine_range))
    # rerunning reuses the contrastive phase and the finished samples, and gives the same model
    assert (tmp_path / "run" / "contrastive" / "smpo_contrastive.json").is_file()
    again = run_shapes_reward(recipe)
    assert again.train_pairs == result.train_pairs and again.vote_accuracy == result.vote_accuracy
    assert again.cosine_range == result.cosine_range
