"""GenEval's detector: mmdet's preprocessing and Mask2Former post-processing, the tiny model, the backends."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from smpo_cli.benchmark.geneval_detector import (
    GENEVAL_CLASS_NAMES,
    MEAN,
    STD,
    Detector,
    TransformersMask2Former,
    _label_mismatches,
    _split_mmdet3,
    detections_from_mmdet_result,
    load_detector,
    postprocess_instances,
    preprocess,
    resized_shape,
    tiny_mask2former,
)
from smpo_cli.benchmark.geneval_rules import Rules, keep_detections
from smpo_cli.errors import AssetNotFoundError, DataError, ModelLoadError, UsageError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny_mask2former(tmp_path_factory.mktemp("det") / "tiny-mask2former")


@pytest.fixture(scope="module")
def tiny_detector(tiny_path):
    return TransformersMask2Former(tiny_path)


def _noise(height, width, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------- class names


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared data folder not in this checkout")
def test_class_names_are_genevals_object_names_file():
    names = (SHARED_DATA / "geneval" / "object_names.txt").read_text(encoding="utf-8").splitlines()
    assert GENEVAL_CLASS_NAMES == tuple(n for n in names if n)


def test_class_names_are_coco_80_in_mmdet_order():
    assert len(GENEVAL_CLASS_NAMES) == len(set(GENEVAL_CLASS_NAMES)) == 80
    assert GENEVAL_CLASS_NAMES[0] == "person" and GENEVAL_CLASS_NAMES[16] == "dog"
    assert GENEVAL_CLASS_NAMES[62:67] == ("tv", "laptop", "computer mouse", "tv remote", "computer keyboard")
    assert GENEVAL_CLASS_NAMES[-1] == "toothbrush"


# ---------------------------------------------------------------------------------- preprocessing


def test_resized_shape_follows_mmcv_rescale():
    assert resized_shape(512, 512) == (800, 800)
    assert resized_shape(1024, 1024) == (800, 800)
    assert resized_shape(480, 640) == (800, 1067)  # 640 * 5/3 = 1066.67 -> int(x + 0.5)
    assert resized_shape(400, 2000) == (267, 1333)  # long side bound: factor 1333 / 2000


def test_preprocess_resizes_normalises_and_pads():
    wide = Image.new("RGB", (640, 480), (124, 116, 104))
    square = Image.new("RGB", (512, 512), (0, 255, 30))
    pixels, resized = preprocess([wide, square])
    assert resized == [(800, 1067), (800, 800)]
    assert pixels.shape == (2, 3, 800, 1088) and pixels.dtype == torch.float32  # 1067 -> 1088 (32 x 34)
    expect = [(v - m) / s for v, m, s in zip((124, 116, 104), MEAN, STD, strict=True)]
    torch.testing.assert_close(
        pixels[0, :, :, :1067], torch.tensor(expect).view(3, 1, 1).expand(3, 800, 1067)
    )
    # padding is 0 after normalisation (mmdet: Pad after Normalize)
    assert pixels[0, :, :, 1067:].abs().max() == 0
    assert pixels[1, :, :, 800:].abs().max() == 0
    torch.testing.assert_close(
        pixels[1, :, 5, 5],
        torch.tensor([(v - m) / s for v, m, s in zip((0, 255, 30), MEAN, STD, strict=True)]),
    )
    alone, _ = preprocess([wide])
    assert alone.shape == (1, 3, 800, 1088)


def test_preprocess_shrinks_with_bilinear_without_antialiasing():
    # columns alternate 0/100; 1024 -> 800 samples source x = (x + 0.5) * 1.28 - 0.5 (cv2 INTER_LINEAR);
    # an antialiased resize (PIL BILINEAR) would average neighbours towards 50 instead
    row = np.where(np.arange(1024) % 2 == 1, 100, 0).astype(np.uint8)
    image = Image.fromarray(np.repeat(np.tile(row[None, :], (1024, 1))[..., None], 3, axis=2))
    pixels, resized = preprocess([image])
    assert resized == [(800, 800)]
    red = (pixels[0, 0, 10, :4] * STD[0] + MEAN[0]).round()
    assert red.tolist() == [14.0, 58.0, 70.0, 2.0]  # 0.14*100; 0.58*100; 0.7*100; x=3: src 3.98 -> 0.02*100


# -------------------------------------------------------------------------------- post-processing


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_postprocess_scores_boxes_order_and_topk():
    q, c = 3, 80
    cls = torch.zeros(q, c + 1)
    cls[0, 0], cls[0, 16], cls[0, c] = 5.0, 3.0, 1.0  # query 0: person, else dog
    cls[1, 2] = 4.0  # query 1: car, with an empty mask
    cls[2, 0] = 6.0  # query 2: person with a higher class prob but a weaker mask than query 0
    masks = torch.full((q, 8, 8), -3.0)
    masks[0, 1:4, 2:6] = 2.0  # rows 1-3, columns 2-5
    masks[1] = -1.0
    masks[2, 5:8, 0:1] = 0.5
    dets = postprocess_instances(
        cls, masks, padded_size=(8, 8), resized_size=(8, 8), original_size=(8, 8), max_per_image=4
    )
    assert set(dets) == set(GENEVAL_CLASS_NAMES)
    probs = torch.softmax(cls.double(), -1).numpy()
    # the 4 best (query, class) pairs by class prob: (2, person), (0, person), (1, car), (0, dog)
    assert sum(len(v) for v in dets.values()) == 4
    # in top-k (class prob) order, as mmdet's per-class arrays; the rules rank them by detection score
    person = dets["person"]
    assert [d.index for d in person] == [0, 1]
    assert person[0].score == pytest.approx(probs[2, 0] * _sigmoid(0.5), rel=1e-5)  # query 2: best class prob
    assert person[1].score == pytest.approx(probs[0, 0] * _sigmoid(2.0), rel=1e-5)
    assert probs[2, 0] > probs[0, 0] and person[1].score > person[0].score
    ranked = keep_detections(person, 0.0, Rules())
    assert [d.index for d in ranked] == [1, 0]  # best-first by detection score
    assert person[1].box == (2.0, 1.0, 6.0, 4.0)  # x2 = last column + 1, y2 = last row + 1
    assert person[0].box == (0.0, 5.0, 1.0, 8.0)
    assert person[1].mask.dtype == bool and person[1].mask.shape == (8, 8) and person[1].mask.sum() == 12
    assert dets["dog"][0].score == pytest.approx(probs[0, 16] * _sigmoid(2.0), rel=1e-5)
    assert dets["car"][0].score == 0.0 and dets["car"][0].box == (0.0, 0.0, 0.0, 0.0)
    assert not dets["car"][0].mask.any()
    assert all(not dets[n] for n in GENEVAL_CLASS_NAMES if n not in ("person", "dog", "car"))


def test_postprocess_keeps_at_most_100_pairs_and_handles_fewer():
    cls = torch.randn(2, 81, generator=torch.Generator().manual_seed(0))
    masks = torch.ones(2, 4, 4)
    dets = postprocess_instances(cls, masks, padded_size=(4, 4), resized_size=(4, 4), original_size=(4, 4))
    assert sum(len(v) for v in dets.values()) == 100  # of 160 (query, class) pairs
    dets = postprocess_instances(
        cls[:1], masks[:1], padded_size=(4, 4), resized_size=(4, 4), original_size=(4, 4)
    )
    assert sum(len(v) for v in dets.values()) == 80  # only 80 pairs exist
    assert all(len(v) == 1 for v in dets.values())


def test_postprocess_crops_the_padding_and_resizes_to_the_original():
    cls = torch.zeros(2, 81)
    cls[0, 0] = cls[1, 1] = 9.0
    masks = torch.full((2, 4, 4), -10.0)
    masks[0, :, 0] = 10.0  # left quarter column: inside the image
    masks[1, :, 2:] = 10.0  # right half of the padded input: padding only
    dets = postprocess_instances(
        cls, masks, padded_size=(16, 16), resized_size=(16, 8), original_size=(32, 16), max_per_image=2
    )
    inside, padding = dets["person"][0], dets["bicycle"][0]
    assert inside.mask.shape == padding.mask.shape == (32, 16)
    # 4 -> 16 wide: positive at columns 0-3; crop to 8; 8 -> 16 wide: positive at columns 0-7
    assert inside.box == (0.0, 0.0, 8.0, 32.0) and inside.score > 0.5
    assert padding.score == 0.0 and not padding.mask.any()


def test_postprocess_rejects_wrong_shapes():
    with pytest.raises(DataError, match="class logits"):
        postprocess_instances(
            torch.zeros(2, 80),
            torch.zeros(2, 4, 4),
            padded_size=(4, 4),
            resized_size=(4, 4),
            original_size=(4, 4),
        )
    with pytest.raises(DataError, match="mask logits"):
        postprocess_instances(
            torch.zeros(2, 81),
            torch.zeros(3, 4, 4),
            padded_size=(4, 4),
            resized_size=(4, 4),
            original_size=(4, 4),
        )


# ------------------------------------------------------------------------------------ tiny model


def test_tiny_model_round_trip(tiny_detector):
    assert isinstance(tiny_detector, Detector) and tiny_detector.backend == "transformers"
    assert tiny_detector.name.startswith("transformers Mask2Former ")
    images = [_noise(48, 64, 0), _noise(40, 40, 1)]
    out = tiny_detector.detect(images)
    assert len(out) == 2
    for image, dets in zip(images, out, strict=True):
        assert set(dets) == set(GENEVAL_CLASS_NAMES)
        assert sum(len(v) for v in dets.values()) == 100  # 10 queries x 80 classes -> top 100
        for found in dets.values():
            assert [d.index for d in found] == list(range(len(found)))
            for d in found:
                assert 0.0 <= d.score <= 1.0
                assert d.mask.shape == (image.height, image.width) and d.mask.dtype == bool
                x1, y1, x2, y2 = d.box
                assert 0 <= x1 <= x2 <= image.width and 0 <= y1 <= y2 <= image.height
                if d.mask.any():
                    ys, xs = np.nonzero(d.mask)
                    assert d.box == (xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0)
    best = max(d.score for dets in out for v in dets.values() for d in v)
    assert best > 0.3  # the tiny heads are scaled so that plumbing runs see detections pass the threshold
    assert tiny_detector.detect([]) == []


def test_batching_does_not_change_detections(tiny_detector):
    images = [_noise(32, 32, 2), _noise(32, 32, 3)]
    together = tiny_detector.detect(images)
    alone = [tiny_detector.detect([image])[0] for image in images]
    for a, b in zip(together, alone, strict=True):
        sa = np.array([d.score for n in GENEVAL_CLASS_NAMES for d in a[n]])
        sb = np.array([d.score for n in GENEVAL_CLASS_NAMES for d in b[n]])
        np.testing.assert_allclose(sa, sb, atol=1e-5)


def test_tiny_build_is_deterministic_and_leaves_the_rng_alone(tmp_path, tiny_path):
    state = torch.random.get_rng_state()
    again = tiny_mask2former(tmp_path / "again")
    assert torch.equal(state, torch.random.get_rng_state())
    assert (again / "model.safetensors").read_bytes() == (tiny_path / "model.safetensors").read_bytes()


def test_detect_rejects_non_images(tiny_detector):
    with pytest.raises(DataError, match="PIL"):
        tiny_detector.detect([np.zeros((4, 4, 3))])
    with pytest.raises(DataError, match="list of images"):
        tiny_detector.detect(_noise(4, 4, 0))


def test_half_precision_on_cpu_falls_back_to_float32(tiny_path):
    # torch's CPU grid_sample gives NaN for non-contiguous half inputs (the deformable attention's)
    assert TransformersMask2Former(tiny_path, dtype="bfloat16").dtype == torch.float32


def test_label_order_check_accepts_coco_spellings_and_flags_reordering():
    coco = dict(enumerate(GENEVAL_CLASS_NAMES))
    coco.update({62: "tvmonitor", 64: "mouse", 65: "remote", 66: "keyboard", 58: "potted_plant"})
    assert _label_mismatches(coco) == []
    assert _label_mismatches({i: f"LABEL_{i}" for i in range(80)}) == []
    coco[0], coco[1] = coco[1], coco[0]
    assert len(_label_mismatches(coco)) == 2


def test_loading_refuses_checkpoints_that_are_not_coco_80_mask2former(tmp_path):
    from transformers import Mask2FormerConfig, SwinConfig

    Mask2FormerConfig(num_labels=133).save_pretrained(tmp_path / "panoptic")
    with pytest.raises(ModelLoadError, match="133 classes"):
        TransformersMask2Former(tmp_path / "panoptic")
    SwinConfig().save_pretrained(tmp_path / "swin")
    with pytest.raises(ModelLoadError, match="not Mask2Former"):
        TransformersMask2Former(tmp_path / "swin")
    with pytest.raises(AssetNotFoundError):
        TransformersMask2Former(tmp_path / "missing")


# ----------------------------------------------------------------------------------- mmdet backend


def test_mmdet_results_become_detections():
    bbox = [np.zeros((0, 5), dtype=np.float32) for _ in range(80)]
    segm = [[] for _ in range(80)]
    bbox[2] = np.array([[1, 2, 5, 6, 0.4], [0, 0, 3, 3, 0.9]], dtype=np.float32)
    m0, m1 = np.zeros((8, 8), bool), np.ones((8, 8), bool)
    segm[2] = [m0, m1]
    dets = detections_from_mmdet_result(bbox, segm)
    assert set(dets) == set(GENEVAL_CLASS_NAMES)
    car = dets["car"]  # in the array's order; the rules rank them as the official evaluator
    assert [(d.score, d.index) for d in car] == [(pytest.approx(0.4), 0), (pytest.approx(0.9), 1)]
    assert car[1].box == (0.0, 0.0, 3.0, 3.0) and car[1].mask.all() and not car[0].mask.any()
    assert [d.index for d in keep_detections(car, 0.3, Rules())] == [1, 0]
    assert all(not v for n, v in dets.items() if n != "car")
    assert detections_from_mmdet_result(bbox, None)["car"][0].mask is None
    with pytest.raises(DataError, match="79 classes"):
        detections_from_mmdet_result(bbox[:79], None)
    segm[2] = [m0]
    with pytest.raises(DataError, match="2 boxes but 1 masks"):
        detections_from_mmdet_result(bbox, segm)


def test_mmdet3_results_split_per_class():
    class Instances(SimpleNamespace):
        def __contains__(self, key):
            return hasattr(self, key)

        def cpu(self):
            return self

    inst = Instances(labels=torch.tensor([3, 0, 3]), bboxes=torch.arange(12.0).view(3, 4),
                     scores=torch.tensor([0.5, 0.6, 0.7]), masks=torch.zeros(3, 2, 2, dtype=torch.bool))  # fmt: skip
    bbox, segm = _split_mmdet3(SimpleNamespace(pred_instances=inst), 80)
    dets = detections_from_mmdet_result(bbox, segm)
    assert [d.score for d in dets["motorcycle"]] == pytest.approx([0.5, 0.7])
    assert dets["motorcycle"][1].box == (8.0, 9.0, 10.0, 11.0) and len(dets["person"]) == 1


def test_load_detector_backends(monkeypatch, tiny_path):
    monkeypatch.setitem(sys.modules, "mmdet", None)  # mmdet not importable, even where it is installed
    with pytest.raises(UsageError, match="needs mmdet") as err:
        load_detector("mmdet", "ckpt.pth", device="cpu", dtype="float32")
    assert "mmcv-full" in err.value.hint
    with pytest.raises(UsageError, match="needs mmdet"):
        load_detector("auto", "mask2former.pth", device="cpu", dtype="float32")
    with pytest.raises(UsageError, match="mmdet checkpoint"):
        load_detector("transformers", "mask2former.pth", device="cpu", dtype="float32")
    with pytest.raises(UsageError, match="unknown detector backend"):
        load_detector("yolo", None, device="cpu", dtype="float32")
    detector = load_detector("auto", str(tiny_path), device="cpu", dtype="float32")
    assert (
        isinstance(detector, TransformersMask2Former)
        and detector.name == f"transformers Mask2Former {tiny_path}"
    )
