"""GenEval's colour judge on a tiny random CLIP saved and loaded like the real one."""

import numpy as np
import torch
from PIL import Image

from smpo_cli.benchmark.geneval_colour import BACKGROUND, COLOURS, TEMPLATES, ColourClassifier, masked_crop
from smpo_cli.benchmark.geneval_rules import Detection


def test_masked_crop_puts_the_object_on_grey():
    img = Image.new("RGB", (10, 10), (255, 0, 0))
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 2:5] = True
    crop = np.asarray(masked_crop(img, mask, (1.4, 1.6, 6.2, 6.0)))
    assert crop.shape == (4, 5, 3)  # rounded box (1, 2, 6, 6)
    assert tuple(crop[1, 1]) == (255, 0, 0) and tuple(crop[0, 0]) == BACKGROUND


def test_classifier_matches_the_zero_shot_formula(tmp_path):
    from smpo_cli.rewards.tiny import build_tiny_reward

    path = build_tiny_reward("clip", tmp_path / "clip")
    clf = ColourClassifier(str(path))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    objects = [Detection((0, 0, 32, 32), 0.9), Detection((16, 16, 64, 64), 0.8)]
    got = clf.classify(image, "car", objects)
    # independently: CLIP features of each crop, template-averaged colour embeddings, argmax of the cosine
    model, proc = clf.model, clf.processor
    with torch.no_grad():
        texts = [t.format(color=c, object="car") for c in COLOURS for t in TEMPLATES]
        tok = proc.tokenizer(texts, padding=True, return_tensors="pt")
        te = model.get_text_features(**tok)
        te = getattr(te, "pooler_output", te)
        te = te / te.norm(dim=-1, keepdim=True)
        cls = te.reshape(10, 3, -1).mean(1)
        cls = cls / cls.norm(dim=-1, keepdim=True)
        crops = [image.crop(o.box) for o in objects]
        ie = model.get_image_features(pixel_values=proc.image_processor(images=crops, return_tensors="pt")["pixel_values"])
        ie = getattr(ie, "pooler_output", ie)
        ie = ie / ie.norm(dim=-1, keepdim=True)
    assert got == [COLOURS[i] for i in (ie @ cls.T).argmax(1).tolist()]
    assert clf.classify(image, "car", []) == []
