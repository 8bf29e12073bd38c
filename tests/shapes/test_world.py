"""The shapes world: caption grammar, caption sets, the held-out split, and the renderer's guarantees."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from smpo_cli.shapes import (
    COLORS,
    SKILLS,
    VOCABULARY,
    Caption,
    ObjectSpec,
    PlacementError,
    all_captions,
    draw_scene,
    make_dataset,
    meaning_group,
    miscaption,
    parse_caption,
    render,
    render_batch,
    sample_caption,
    sample_captions,
    split_captions,
    swap_colours,
    world,
)

EXAMPLES = [
    (Caption("single_object", (ObjectSpec("circle"),)), "a circle"),
    (Caption("colors", (ObjectSpec("circle", "red"),)), "a red circle"),
    (Caption("colors", (ObjectSpec("square", "orange"),)), "an orange square"),
    (Caption("two_object", (ObjectSpec("circle"), ObjectSpec("square"))), "a circle and a square"),
    (Caption("counting", (ObjectSpec("square", None, 3),)), "three squares"),
    (Caption("counting", (ObjectSpec("triangle", "orange", 2),)), "two orange triangles"),
    (
        Caption("position", (ObjectSpec("circle"), ObjectSpec("square")), "left of"),
        "a circle to the left of a square",
    ),
    (
        Caption("position", (ObjectSpec("circle"), ObjectSpec("square")), "right of"),
        "a circle to the right of a square",
    ),
    (
        Caption("position", (ObjectSpec("triangle"), ObjectSpec("square")), "above"),
        "a triangle above a square",
    ),
    (
        Caption("position", (ObjectSpec("triangle"), ObjectSpec("circle")), "below"),
        "a triangle below a circle",
    ),
    (
        Caption("position", (ObjectSpec("circle", "orange"), ObjectSpec("square", "red")), "left of"),
        "an orange circle to the left of a red square",
    ),
    (
        Caption("color_attr", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue"))),
        "a red circle and a blue square",
    ),
]


@pytest.mark.parametrize(("caption", "text"), EXAMPLES, ids=[t for _, t in EXAMPLES])
def test_caption_text_and_parse(caption: Caption, text: str) -> None:
    assert caption.text == text
    assert parse_caption(text) == caption


def test_every_caption_round_trips() -> None:
    captions = all_captions()
    assert len({c.text for c in captions}) == len(captions)  # no two captions share a phrasing
    for caption in captions:
        assert parse_caption(caption.text) == caption


def test_articles_follow_the_next_word() -> None:
    texts = [c.text for c in all_captions()]
    for words in (t.split() for t in texts):
        for article, following in zip(words[:-1], words[1:], strict=True):
            if article in ("a", "an"):
                assert (article == "an") == (following[0] in "aeiou"), " ".join(words)
    assert "an orange circle" in texts and "two orange circles" in texts
    with pytest.raises(ValueError, match="'a orange square'.*expected the phrasing 'an orange square'"):
        parse_caption("a orange square")
    with pytest.raises(ValueError, match="an red circle"):
        parse_caption("an red circle")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a pink circle", "unknown word"),
        ("a circle near a square", "unknown word"),
        ("a circle and a circle", "template"),  # two_object needs two different shapes
        ("a red circle and a square", "template"),  # color_attr needs both colours
        ("a red circle and a red square", "template"),  # ... and different ones
        ("a red circle above a red square", "template"),
        ("two circle", "plural"),
        ("a circles", "singular"),
        ("a circle to the left of", "end of the caption"),
        ("a circle a square", "relation"),
        ("a  circle", "single spaces"),
        ("", "single spaces"),
    ],
)
def test_parse_rejects_bad_captions_naming_the_text(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_caption(text)
    assert repr(text) in str(info.value)


def test_caption_constructor_enforces_skill_templates() -> None:
    with pytest.raises(ValueError, match="template"):
        Caption("counting", (ObjectSpec("circle"),))  # a count of one is not counting
    with pytest.raises(ValueError, match="relation"):
        Caption("two_object", (ObjectSpec("circle"), ObjectSpec("square")), "left of")
    with pytest.raises(ValueError, match="unknown colour"):
        ObjectSpec("circle", "pink")
    with pytest.raises(ValueError, match="unsupported count"):
        ObjectSpec("circle", None, 5)


def test_caption_sets_cover_every_skill() -> None:
    per_skill = Counter(c.skill for c in all_captions())
    assert per_skill == {
        "single_object": 3,
        "two_object": 6,
        "counting": 9 + 72,
        "colors": 24,
        "position": 24 + 1344,
        "color_attr": 336,
    }
    geneval = all_captions(geneval_only=True)
    assert len(geneval) == 402 and {c.skill for c in geneval} == set(SKILLS)
    assert all(c.skill == "position" for c in all_captions("position"))


def test_vocabulary_is_exactly_the_words_used() -> None:
    used = {w for c in all_captions() for w in c.text.split()}
    assert used == set(VOCABULARY) and len(VOCABULARY) == 27


def test_sampling_covers_every_skill_and_is_seeded() -> None:
    captions = sample_captions(np.random.default_rng(0), 3000)
    per_skill = Counter(c.skill for c in captions)
    assert set(per_skill) == set(SKILLS) and min(per_skill.values()) > 400  # uniform over skills: ~500 each
    position = [c for c in captions if c.skill == "position"]
    assert 0.4 < np.mean([c.geneval_form for c in position]) < 0.6  # plain relations are not drowned out
    assert sample_captions(np.random.default_rng(0), 3000) == captions
    assert sample_caption(np.random.default_rng(1), skill="counting").skill == "counting"
    with pytest.raises(ValueError, match="no captions to sample"):
        sample_caption(np.random.default_rng(0), skill="counting", pool=all_captions("colors"))


def test_mirror_phrasings() -> None:
    caption = parse_caption("a circle to the left of a square")
    assert caption.mirror().text == "a square to the right of a circle"
    assert caption.mirror().mirror() == caption
    assert meaning_group(caption) == meaning_group(caption.mirror())
    assert parse_caption("a red circle and a blue square").mirror().text == "a blue square and a red circle"


def test_split_is_deterministic_and_leak_free() -> None:
    train, heldout = split_captions(seed=0)
    assert split_captions(seed=0) == (train, heldout)
    assert split_captions(seed=1)[1] != heldout
    assert set(train).isdisjoint(heldout) and len(train) + len(heldout) == len(all_captions())
    assert {c.skill for c in heldout} == {"counting", "position", "color_attr"}
    assert {c.skill for c in heldout if c.geneval_form} == {"counting", "position", "color_attr"}
    heldout_set = set(heldout)
    for caption in heldout:
        assert caption.mirror() in heldout_set  # "A left of B" and "B right of A" stay together
    train_groups = {meaning_group(c) for c in train}
    assert not train_groups & {meaning_group(c) for c in heldout}
    # a held-out layout is unseen in every colour, too
    plain = next(c for c in heldout if c.skill == "position" and c.geneval_form)
    coloured = [c for c in all_captions("position") if meaning_group(c) == meaning_group(plain)]
    assert len(coloured) == 2 + 2 * 56 and set(coloured) <= heldout_set
    n_groups = Counter(g[0] for g in {meaning_group(c) for c in heldout})
    assert n_groups == {"counting": 2, "position": 3, "color_attr": 42}


def test_render_is_deterministic_by_seed() -> None:
    caption = parse_caption("three red squares")
    image_a, scene_a = render(caption, np.random.default_rng(7))
    image_b, scene_b = render(caption, np.random.default_rng(7))
    assert np.array_equal(image_a, image_b) and scene_a == scene_b
    assert not np.array_equal(image_a, render(caption, np.random.default_rng(8))[0])
    data_a, data_b = make_dataset(200, seed=3), make_dataset(200, seed=3)
    assert np.array_equal(data_a.images, data_b.images) and data_a.captions == data_b.captions
    assert data_a.scenes == data_b.scenes
    assert not np.array_equal(data_a.images, make_dataset(200, seed=4).images)


def _check_scene(caption: Caption, scene: world.Scene, image: np.ndarray) -> None:
    size = scene.size
    r_min, r_max, gap = world.layout_limits(size)
    expected = [(k, o.shape, o.color) for k, o in enumerate(caption.objects) for _ in range(o.count)]
    assert [(d.spec_index, d.shape) for d in scene.objects] == [(k, s) for k, s, _ in expected]
    for drawn, (_, _, colour) in zip(scene.objects, expected, strict=True):
        assert colour is None or drawn.color == colour
        (x, y), r = drawn.center, drawn.radius
        assert r_min <= r <= r_max
        assert 0 <= x - r and x + r < size and 0 <= y - r and y + r < size  # inside the image
        assert tuple(image[y, x]) == COLORS[drawn.color]  # the centre pixel is painted
    for a, b in itertools.combinations(scene.objects, 2):  # boxes separated by >= gap empty pixels
        free = [abs(a.center[i] - b.center[i]) - a.radius - b.radius - 1 for i in (0, 1)]
        assert max(free) >= gap
    if caption.relation:
        (x0, y0), (x1, y1) = scene.objects[0].center, scene.objects[1].center
        dx, dy = x0 - x1, y0 - y1
        horizontal = caption.relation in ("left of", "right of")
        major, minor = (dx, dy) if horizontal else (dy, dx)
        assert abs(major) >= 1.5 * abs(minor) and major != 0  # unambiguous
        assert (major < 0) == (caption.relation in ("left of", "above"))
    assert np.array_equal(draw_scene(scene), image)  # the image shows exactly the scene


def test_renders_respect_layout_rules() -> None:
    data = make_dataset(2000, seed=11)
    assert data.images.shape == (2000, 32, 32, 3) and data.images.dtype == np.uint8
    for caption, scene, image in zip(data.captions, data.scenes, data.images, strict=True):
        _check_scene(caption, scene, image)
    assert {d.radius for s in data.scenes for d in s.objects} == set(range(3, 9))


def test_every_caption_renders() -> None:
    captions = all_captions(geneval_only=True)
    images, scenes = render_batch(captions, np.random.default_rng(0))
    for caption, scene, image in zip(captions, scenes, images, strict=True):
        _check_scene(caption, scene, image)


def test_other_sizes_scale_the_layout() -> None:
    images, scenes = render_batch(
        sample_captions(np.random.default_rng(0), 300), np.random.default_rng(0), size=64
    )
    assert images.shape[1:] == (64, 64, 3)
    radii = {d.radius for s in scenes for d in s.objects}
    assert min(radii) >= 6 and max(radii) <= 16
    four = parse_caption("four triangles")
    for size in (16, 24):  # crowded captions still fit in small images
        image, scene = render(four, np.random.default_rng(0), size=size)
        _check_scene(four, scene, image)


def test_impossible_layouts_fail_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(world, "GAP", 40)  # no two shapes can be 40 px apart in 32 px
    start = time.perf_counter()
    with pytest.raises(PlacementError, match="could not place 2 shapes in a 32x32 image"):
        render(parse_caption("a circle and a square"), np.random.default_rng(0))
    assert time.perf_counter() - start < 2.0  # bounded tries, not an endless loop


def test_dataset_generation_is_fast() -> None:
    """60k images take about 2 s on the 2-core CPU box (0.3 s here for 10k); generous bound for shared CPUs."""
    start = time.perf_counter()
    data = make_dataset(10_000, seed=0)
    assert len(data) == 10_000 and len(data.texts) == 10_000
    assert time.perf_counter() - start < 5.0


def test_importing_the_benchmark_leaves_torch_alone() -> None:
    code = "import sys, smpo_cli.shapes; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_split_and_sampling_do_not_depend_on_the_process(tmp_path):
    """String hashing changes per process (PYTHONHASHSEED): the split must not (the base model's held-out set)."""
    import subprocess
    import sys

    code = ("import hashlib, numpy as np\n"
            "from smpo_cli.shapes.world import split_captions, sample_captions\n"
            "train, held = split_captions(0)\n"
            "text = ' '.join(c.text for c in held) + '|' + ' '.join(c.text for c in sample_captions(np.random.default_rng(0), 64, pool=train))\n"
            "print(hashlib.sha256(text.encode()).hexdigest())\n")  # fmt: skip
    digests = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": str(h)}).stdout  # fmt: skip
        for h in (1, 2, 3)
    }
    assert len(digests) == 1


def test_swap_colours_is_an_involution_that_keeps_the_skill_and_only_changes_colours():
    for caption in all_captions():
        swapped = swap_colours(caption)
        assert swap_colours(swapped) == caption and swapped.skill == caption.skill
        assert [o.shape for o in swapped.objects] == [o.shape for o in caption.objects]
        assert [o.count for o in swapped.objects] == [o.count for o in caption.objects]
        if any(o.color for o in caption.objects):
            assert all(a.color != b.color for a, b in zip(swapped.objects, caption.objects, strict=False) if a.color)
        else:
            assert swapped == caption
    assert swap_colours(parse_caption("a red circle and a blue square")).text == "an orange circle and a purple square"


def test_miscaption_swaps_the_given_fraction_and_is_deterministic():
    captions = sample_captions(np.random.default_rng(0), 4000, skill="colors")
    noisy = miscaption(captions, 0.6, seed=3)
    swapped = np.mean([n != c for n, c in zip(noisy, captions, strict=False)])
    assert abs(swapped - 0.6) < 0.03 and noisy == miscaption(captions, 0.6, seed=3)
    assert miscaption(captions, 0.0, seed=3) == captions
    assert all(n == swap_colours(c) for n, c in zip(miscaption(captions, 1.0, seed=3), captions, strict=False))
    with pytest.raises(ValueError, match="colour swap rate"):
        miscaption(captions, 1.5, seed=3)
