"""The shapes world: structured captions, their English grammar, and a renderer with ground truth.

Small images (32x32 by default) of filled circles, squares and upright triangles in eight colours on a
dark background, each paired with a caption from one of GenEval's six skills (Ghosh et al. 2023):

=============== ========================================= =====================================
skill           example                                   what must hold
=============== ========================================= =====================================
single_object   "a circle"                                a circle (any colour)
two_object      "a circle and a square"                   both shapes (different shapes)
counting        "three squares"                           exactly three squares
colors          "a red circle"                            a circle, and it is red
position        "a circle to the left of a square"        both, circle left of square
color_attr      "a red circle and a blue square"          both, each in its colour (colours differ)
=============== ========================================= =====================================

Two extra forms add training variety without changing the taxonomy: coloured counts ("three red
squares", skill ``counting``) and coloured relations ("a red circle above a blue square", skill
``position``, colours differ). ``Caption.geneval_form`` is False for them; evaluate on the GenEval forms.

Rendering never draws anything the caption does not mention, fills unspecified colours at random,
keeps shapes inside the image with a gap between their boxes, and makes every relation unambiguous
(the offset on the relation's axis is at least 1.5x the other). Everything is deterministic given a
``numpy.random.Generator`` (``render``) or a seed (``make_dataset``).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from smpo_cli.errors import SmpoError

DEFAULT_SIZE = 32
BACKGROUND: tuple[int, int, int] = (20, 20, 20)
# Chosen for separation both as RGB points (min pairwise distance 118) and as directions from the
# background (min angle 23 deg), which is what the judge uses to read dimmed or blurred pixels.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 20, 45),
    "green": (40, 200, 60),
    "blue": (40, 80, 240),
    "yellow": (220, 235, 30),
    "purple": (160, 50, 210),
    "orange": (250, 125, 0),
    "cyan": (40, 220, 220),
    "white": (240, 240, 240),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
PALETTE = np.array([COLORS[name] for name in COLOR_NAMES], dtype=np.uint8)  # (8, 3), COLOR_NAMES order
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNTS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SKILLS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HELDOUT_SKILLS: tuple[str, ...] = ("counting", "position", "color_attr")

RADIUS_RANGE = (3, 8)  # pixels at size 32; scaled with the image size
GAP = 2  # empty pixels between the boxes of two shapes, at size 32
RELATION_RATIO = 1.5  # offset on the relation's axis >= this x the offset on the other axis

_RELATION_TEXT = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
_MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_NUMBER_WORDS = {word: n for n, word in COUNTS.items()}
_PLURALS = {f"{shape}s": shape for shape in SHAPES}

# Every word a caption can contain (for building a tokenizer over the world's vocabulary).
VOCABULARY: tuple[str, ...] = tuple(
    ["a", "an", "and", "to", "the", "left", "right", "of", "above", "below"]
    + list(COUNTS.values())
    + list(COLOR_NAMES)
    + list(SHAPES)
    + list(_PLURALS)
)


class PlacementError(SmpoError):
    """The renderer found no valid layout within its bounded number of tries."""


@dataclass(frozen=True)
class ObjectSpec:
    """One noun phrase of a caption: ``count`` shapes of one kind, in ``color`` (None = any colour)."""

    shape: str
    color: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {COLOR_NAMES}")
        if self.count != 1 and self.count not in COUNTS:
            raise ValueError(f"unsupported count {self.count}; expected 1 or one of {tuple(COUNTS)}")

    @property
    def text(self) -> str:
        words = ([self.color] if self.color else []) + [self.shape]
        if self.count == 1:
            return f"{'an' if words[0][0] in 'aeiou' else 'a'} {' '.join(words)}"
        return f"{COUNTS[self.count]} {' '.join(words)}s"


@dataclass(frozen=True)
class Caption:
    """A structured caption. ``relation`` places objects[0] relative to objects[1] (image axes: y down)."""

    skill: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        problem = _caption_problem(self)
        if problem:
            raise ValueError(
                f"invalid {self.skill} caption {self.objects!r} (relation={self.relation!r}): {problem}"
            )

    @property
    def text(self) -> str:
        if self.relation is not None:
            return f"{self.objects[0].text} {_RELATION_TEXT[self.relation]} {self.objects[1].text}"
        return " and ".join(obj.text for obj in self.objects)

    @property
    def geneval_form(self) -> bool:
        """True for GenEval's own templates; False for the coloured counting/position training variants."""
        if self.skill in ("counting", "position"):
            return all(obj.color is None for obj in self.objects)
        return True

    @property
    def n_objects(self) -> int:
        """How many shapes an image of this caption contains."""
        return sum(obj.count for obj in self.objects)

    def mirror(self) -> Caption:
        """The same meaning phrased the other way round ("A left of B" -> "B right of A"; "A and B" -> "B and A")."""
        if len(self.objects) != 2:
            return self
        relation = _MIRROR[self.relation] if self.relation else None
        return Caption(self.skill, (self.objects[1], self.objects[0]), relation)

    def __str__(self) -> str:
        return self.text


def _caption_problem(caption: Caption) -> str | None:
    """Why ``caption`` breaks its skill's template (None when it is fine)."""
    skill, objs, rel = caption.skill, caption.objects, caption.relation
    if skill not in SKILLS:
        return f"unknown skill; expected one of {SKILLS}"
    if not isinstance(objs, tuple) or not all(isinstance(o, ObjectSpec) for o in objs):
        return "objects must be a tuple of ObjectSpec"
    one = len(objs) == 1
    two = len(objs) == 2 and objs[0].shape != objs[1].shape
    singles = all(o.count == 1 for o in objs)
    colours = [o.color for o in objs]
    if rel is not None and rel not in RELATIONS:
        return f"unknown relation; expected one of {RELATIONS}"
    if (rel is not None) != (skill == "position"):
        return "a relation belongs to position captions only"
    if skill == "single_object":
        ok = one and singles and colours == [None]
    elif skill == "colors":
        ok = one and singles and colours[0] is not None
    elif skill == "counting":
        ok = one and objs[0].count in COUNTS
    elif skill == "two_object":
        ok = two and singles and colours == [None, None]
    elif skill == "position":
        # colours free (GenEval) or both given and different (training variant)
        ok = (
            two
            and singles
            and (colours == [None, None] or (None not in colours and colours[0] != colours[1]))
        )
    else:  # color_attr
        ok = two and singles and None not in colours and colours[0] != colours[1]
    return None if ok else "does not match the skill's template (see smpo_cli.shapes.world docstring)"


def parse_caption(text: str) -> Caption:
    """The structured caption of ``text``; exact inverse of ``Caption.text`` (ValueError otherwise)."""
    words = text.split()
    if " ".join(words) != text or not words:
        raise ValueError(f"cannot parse caption {text!r}: expected single spaces between lowercase words")
    unknown = sorted({w for w in words if w not in VOCABULARY})
    if unknown:
        raise ValueError(f"cannot parse caption {text!r}: unknown word(s) {unknown}")
    try:
        first, rest = _parse_noun_phrase(words)
        if not rest:
            obj = first
            skill = "counting" if obj.count > 1 else ("colors" if obj.color else "single_object")
            caption = Caption(skill, (obj,))
        elif rest[0] == "and":
            second, tail = _parse_noun_phrase(rest[1:])
            _expect_end(tail)
            skill = "color_attr" if first.color or second.color else "two_object"
            caption = Caption(skill, (first, second))
        else:
            relation, tail = _parse_relation(rest)
            second, tail = _parse_noun_phrase(tail)
            _expect_end(tail)
            caption = Caption("position", (first, second), relation)
    except ValueError as exc:
        raise ValueError(f"cannot parse caption {text!r}: {exc}") from None
    if caption.text != text:  # e.g. a wrong article; keeps the round trip exact
        raise ValueError(f"cannot parse caption {text!r}: expected the phrasing {caption.text!r}")
    return caption


def _parse_noun_phrase(words: Sequence[str]) -> tuple[ObjectSpec, list[str]]:
    if not words:
        raise ValueError("expected a noun phrase, found the end of the caption")
    determiner, rest = words[0], list(words[1:])
    if determiner in ("a", "an"):
        count = 1
    elif determiner in _NUMBER_WORDS:
        count = _NUMBER_WORDS[determiner]
    else:
        raise ValueError(f"expected 'a', 'an' or a number, found {determiner!r}")
    color = rest.pop(0) if rest and rest[0] in COLORS else None
    if not rest:
        raise ValueError("expected a shape, found the end of the caption")
    noun = rest.pop(0)
    shape = noun if count == 1 else _PLURALS.get(noun)
    if shape not in SHAPES:
        raise ValueError(f"expected a {'singular' if count == 1 else 'plural'} shape, found {noun!r}")
    return ObjectSpec(shape, color, count), rest


def _parse_relation(words: Sequence[str]) -> tuple[str, list[str]]:
    for relation, phrase in _RELATION_TEXT.items():
        n = len(phrase.split())
        if list(words[:n]) == phrase.split():
            return relation, list(words[n:])
    raise ValueError(f"expected 'and' or a relation, found {' '.join(words[:4])!r}")


def _expect_end(words: Sequence[str]) -> None:
    if words:
        raise ValueError(f"unexpected words at the end: {' '.join(words)!r}")


# ----------------------------------------------------------------------------------------------
# Caption sets and the held-out split


@functools.lru_cache(maxsize=1)
def _all_captions() -> tuple[Caption, ...]:
    out: list[Caption] = []
    ordered_pairs = list(itertools.permutations(SHAPES, 2))
    colour_pairs = list(itertools.permutations(COLOR_NAMES, 2))
    out += [Caption("single_object", (ObjectSpec(s),)) for s in SHAPES]
    out += [Caption("two_object", (ObjectSpec(a), ObjectSpec(b))) for a, b in ordered_pairs]
    out += [Caption("counting", (ObjectSpec(s, None, n),)) for s in SHAPES for n in COUNTS]
    out += [Caption("counting", (ObjectSpec(s, c, n),)) for s in SHAPES for n in COUNTS for c in COLOR_NAMES]
    out += [Caption("colors", (ObjectSpec(s, c),)) for s in SHAPES for c in COLOR_NAMES]
    out += [
        Caption("position", (ObjectSpec(a), ObjectSpec(b)), r) for a, b in ordered_pairs for r in RELATIONS
    ]
    out += [
        Caption("position", (ObjectSpec(a, ca), ObjectSpec(b, cb)), r)
        for a, b in ordered_pairs
        for r in RELATIONS
        for ca, cb in colour_pairs
    ]
    out += [
        Caption("color_attr", (ObjectSpec(a, ca), ObjectSpec(b, cb)))
        for a, b in ordered_pairs
        for ca, cb in colour_pairs
    ]
    return tuple(out)


def all_captions(skill: str | None = None, geneval_only: bool = False) -> tuple[Caption, ...]:
    """Every caption of the world (1,818; 402 in GenEval form), optionally of one skill only."""
    if skill is not None and skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; expected one of {SKILLS}")
    return tuple(
        c
        for c in _all_captions()
        if (skill is None or c.skill == skill) and (c.geneval_form or not geneval_only)
    )


def meaning_group(caption: Caption) -> tuple:
    """Key shared by captions that must sit on the same side of a train/held-out split.

    Mirror phrasings share a key ("A left of B" == "B right of A", "A and B" == "B and A"), and so do
    the coloured variants of a counting or position caption: holding out "a circle to the left of a
    square" also holds out "a red circle to the left of a blue square", so the layout is truly unseen.
    """
    objs = caption.objects
    if caption.skill == "position":
        if caption.relation in ("right of", "below"):  # canonical direction: left of / above
            objs = objs[::-1]
        axis = "x" if caption.relation in ("left of", "right of") else "y"
        return ("position", objs[0].shape, objs[1].shape, axis)
    if caption.skill == "counting":
        return ("counting", objs[0].shape, objs[0].count)
    if len(objs) == 2:
        # order-free, and a sorted tuple rather than a frozenset: its repr (the split's sort key) must not
        # depend on string hashing, which changes from one Python process to the next
        return (caption.skill, tuple(sorted((o.shape, o.color or "") for o in objs)))
    return (caption.skill, objs[0].shape, objs[0].color)


def split_captions(
    seed: int = 0, heldout_fraction: float = 0.25
) -> tuple[tuple[Caption, ...], tuple[Caption, ...]]:
    """Deterministic (train, heldout) split of ``all_captions()`` by meaning group.

    For each skill in ``HELDOUT_SKILLS`` (counting, position, color_attr), ``heldout_fraction`` of its
    meaning groups (at least one) go to held-out, chosen by ``seed``; see ``meaning_group`` for what
    travels together. With the default: 2 of 9 counting groups, 3 of 12 position groups (each is 2
    GenEval captions plus their 112 coloured variants), 42 of 168 color_attr groups (84 captions).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    rng = np.random.default_rng(seed)
    heldout_groups: set[tuple] = set()
    for skill in HELDOUT_SKILLS:
        groups = sorted({meaning_group(c) for c in all_captions(skill)}, key=repr)
        n_out = max(1, round(heldout_fraction * len(groups)))
        heldout_groups.update(groups[i] for i in rng.permutation(len(groups))[:n_out])
    train = tuple(c for c in _all_captions() if meaning_group(c) not in heldout_groups)
    heldout = tuple(c for c in _all_captions() if meaning_group(c) in heldout_groups)
    return train, heldout


def sample_caption(
    rng: np.random.Generator,
    skill: str | None = None,
    pool: Sequence[Caption] | None = None,
    geneval_share: float = 0.5,
) -> Caption:
    """One caption: skill uniform (unless given), then uniform within the pool.

    Where a skill has both GenEval-form captions and coloured variants in ``pool`` (default: all
    captions), the GenEval form is drawn with probability ``geneval_share`` (otherwise the 24 plain
    relations would drown among 1,344 coloured ones).
    """
    return sample_captions(rng, 1, skill=skill, pool=pool, geneval_share=geneval_share)[0]


def sample_captions(
    rng: np.random.Generator,
    n: int,
    skill: str | None = None,
    pool: Sequence[Caption] | None = None,
    geneval_share: float = 0.5,
    skill_weights: dict[str, float] | None = None,
) -> list[Caption]:
    """``n`` captions drawn as in ``sample_caption``; ``skill_weights`` (relative) replaces the uniform skill choice."""
    buckets = _buckets(tuple(pool) if pool is not None else _all_captions())
    if skill is not None:
        skill_weights = {skill: 1.0}
    unknown = sorted(set(skill_weights or {}) - set(SKILLS))
    if unknown:
        raise ValueError(f"unknown skill(s) {unknown}; expected some of {SKILLS}")
    if skill_weights is None:
        skills = [s for s in SKILLS if s in buckets]
    else:
        skills = [s for s in SKILLS if skill_weights.get(s, 0.0) > 0]
    missing = [s for s in skills if s not in buckets]
    if missing or not skills:
        raise ValueError(
            f"no captions to sample for skill(s) {missing or skill_weights}; the pool has {sorted(buckets)}"
        )
    weights = np.array([1.0 if skill_weights is None else skill_weights[s] for s in skills])
    skill_idx = rng.choice(len(skills), size=n, p=weights / weights.sum())
    form_draw = rng.random(n)
    pick_draw = rng.random(n)
    out = []
    for k, f, u in zip(skill_idx, form_draw, pick_draw, strict=True):
        plain, variants = buckets[skills[k]]
        group = plain if (not variants or (plain and f < geneval_share)) else variants
        out.append(group[int(u * len(group))])
    return out


@functools.lru_cache(maxsize=8)
def _buckets(pool: tuple[Caption, ...]) -> dict[str, tuple[tuple[Caption, ...], tuple[Caption, ...]]]:
    out = {}
    for skill in SKILLS:
        plain = tuple(c for c in pool if c.skill == skill and c.geneval_form)
        variants = tuple(c for c in pool if c.skill == skill and not c.geneval_form)
        if plain or variants:
            out[skill] = (plain, variants)
    return out


# ----------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class DrawnObject:
    """One shape as drawn: its box is [x - radius, x + radius] x [y - radius, y + radius] (inclusive pixels)."""

    shape: str
    color: str
    center: tuple[int, int]  # (x, y), pixels, y down
    radius: int
    spec_index: int = 0  # which of the caption's objects it realises


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image: the drawn objects, caption objects[0] first."""

    objects: tuple[DrawnObject, ...]
    size: int


@dataclass(frozen=True, eq=False)
class ShapesDataset:
    """``make_dataset`` output: images (n, size, size, 3) uint8 with their captions and scenes."""

    images: np.ndarray
    captions: list[Caption]
    scenes: list[Scene]

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.captions]

    def __len__(self) -> int:
        return len(self.captions)


def layout_limits(size: int = DEFAULT_SIZE) -> tuple[int, int, int]:
    """(min radius, max radius, gap) in pixels for an image of ``size``: 3, 8 and 2 at 32, scaled."""
    scale = size / DEFAULT_SIZE
    r_min = max(2, round(RADIUS_RANGE[0] * scale))
    r_max = max(r_min, round(RADIUS_RANGE[1] * scale))
    return r_min, r_max, max(2, round(GAP * scale))


@functools.lru_cache(maxsize=256)
def shape_stamp(shape: str, radius: int) -> np.ndarray:
    """Boolean (2r+1, 2r+1) mask of ``shape`` drawn by PIL ImageDraw (filled, no anti-aliasing).

    Drawing at integer positions is translation invariant, so stamping this mask equals drawing in place.
    """
    side = 2 * radius + 1
    canvas = Image.new("1", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    box = (0, 0, side - 1, side - 1)
    if shape == "circle":
        draw.ellipse(box, fill=1)
    elif shape == "square":
        draw.rectangle(box, fill=1)
    elif shape == "triangle":  # upright: apex at top centre, base along the bottom row
        draw.polygon([(radius, 0), (side - 1, side - 1), (0, side - 1)], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask = np.array(canvas, dtype=bool)
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=4096)
def _caption_plan(caption: Caption) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
    """Per drawn instance: shape index, colour index (-1 = random), caption object; plus the relation code."""
    shapes, colours, specs = [], [], []
    for k, obj in enumerate(caption.objects):
        for _ in range(obj.count):
            shapes.append(SHAPES.index(obj.shape))
            colours.append(COLOR_NAMES.index(obj.color) if obj.color else -1)
            specs.append(k)
    relation = RELATIONS.index(caption.relation) if caption.relation else -1
    return tuple(shapes), tuple(colours), tuple(specs), relation


def _max_radius(n_objects: int, size: int) -> int:
    """Largest radius drawn in an image of ``n_objects`` shapes: 8 px for one or two, less when crowded."""
    _, r_max, _ = layout_limits(size)
    cap = {1: 8, 2: 8, 3: 7, 4: 6}[n_objects] * size / DEFAULT_SIZE
    return max(layout_limits(size)[0], min(r_max, round(cap)))


def _place(
    rng: np.random.Generator,
    n_objects: int,
    relations: np.ndarray,
    size: int,
    candidates: int = 48,
    max_rounds: int = 60,
) -> tuple[np.ndarray, np.ndarray]:
    """Radii (n, m) and integer centres (n, m, 2) for n images of m shapes, by batched rejection sampling.

    Each round draws ``candidates`` layouts per still-unplaced image and keeps the first valid one;
    every 10 failed rounds the largest radius drops by 1 px (crowded small images); after
    ``max_rounds`` rounds a ``PlacementError`` is raised (bounded work, never an endless loop).
    """
    n, m = len(relations), n_objects
    r_min, _, gap = layout_limits(size)
    r_hi = _max_radius(m, size)
    radii = np.zeros((n, m), dtype=np.int64)
    centres = np.zeros((n, m, 2), dtype=np.int64)
    pending = np.arange(n)
    pairs = list(itertools.combinations(range(m), 2))
    for round_index in range(max_rounds):
        if len(pending) == 0:
            return radii, centres
        p = len(pending)
        r_top = max(r_min, r_hi - round_index // 10)
        r = rng.integers(r_min, r_top + 1, size=(p, candidates, m))
        span = size - 2 * r  # number of valid centre positions per axis
        c = r[..., None] + (rng.random((p, candidates, m, 2)) * span[..., None]).astype(np.int64)
        ok = np.ones((p, candidates), dtype=bool)
        for i, j in pairs:
            free = (
                np.abs(c[:, :, i] - c[:, :, j]) - (r[:, :, i] + r[:, :, j] + 1)[..., None]
            )  # empty px per axis
            ok &= free.max(axis=-1) >= gap
        rel = relations[pending]
        if m >= 2 and (rel >= 0).any():
            d = c[:, :, 0] - c[:, :, 1]  # object 0 relative to object 1
            dx, dy = d[..., 0], d[..., 1]
            want = np.stack(
                [
                    (dx < 0) & (np.abs(dx) >= RELATION_RATIO * np.abs(dy)),
                    (dx > 0) & (np.abs(dx) >= RELATION_RATIO * np.abs(dy)),
                    (dy < 0) & (np.abs(dy) >= RELATION_RATIO * np.abs(dx)),
                    (dy > 0) & (np.abs(dy) >= RELATION_RATIO * np.abs(dx)),
                ]
            )  # (4, p, candidates)
            rel_ok = np.take_along_axis(want, np.maximum(rel, 0)[None, :, None], axis=0)[0]
            ok &= np.where((rel >= 0)[:, None], rel_ok, True)
        found = ok.any(axis=1)
        first = ok.argmax(axis=1)
        done = pending[found]
        radii[done] = r[found, first[found]]
        centres[done] = c[found, first[found]]
        pending = pending[~found]
    if len(pending):
        raise PlacementError(
            f"could not place {m} shapes in a {size}x{size} image for {len(pending)} image(s) "
            f"after {max_rounds * candidates} tries each",
            hint="use a larger image size",
        )
    return radii, centres


def render_batch(
    captions: Sequence[Caption], rng: np.random.Generator, size: int = DEFAULT_SIZE
) -> tuple[np.ndarray, list[Scene]]:
    """Images (n, size, size, 3) uint8 and scenes for ``captions``; deterministic given ``rng``'s state."""
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    n = len(captions)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    images[:] = BACKGROUND
    plans = [_caption_plan(c) for c in captions]
    n_objs = np.array([len(p[0]) for p in plans], dtype=np.int64)
    radii: list[np.ndarray | None] = [None] * n
    centres: list[np.ndarray | None] = [None] * n
    colours: list[np.ndarray | None] = [None] * n
    for m in np.unique(n_objs):
        idx = np.flatnonzero(n_objs == m)
        relations = np.array([plans[i][3] for i in idx], dtype=np.int64)
        r, c = _place(rng, int(m), relations, size)
        fixed = np.array([plans[i][1] for i in idx], dtype=np.int64)
        col = np.where(fixed >= 0, fixed, rng.integers(0, len(COLOR_NAMES), size=fixed.shape))
        for k, i in enumerate(idx):
            radii[i], centres[i], colours[i] = r[k], c[k], col[k]
    scenes = []
    for i, (shape_ids, _, specs, _) in enumerate(plans):
        drawn = []
        for k, shape_id in enumerate(shape_ids):
            x, y = centres[i][k]
            obj = DrawnObject(
                SHAPES[shape_id],
                COLOR_NAMES[int(colours[i][k])],
                (int(x), int(y)),
                int(radii[i][k]),
                specs[k],
            )
            _stamp(images[i], obj)
            drawn.append(obj)
        scenes.append(Scene(tuple(drawn), size))
    return images, scenes


def _stamp(image: np.ndarray, obj: DrawnObject) -> None:
    (x, y), r = obj.center, obj.radius
    image[y - r : y + r + 1, x - r : x + r + 1][shape_stamp(obj.shape, r)] = COLORS[obj.color]


def draw_scene(scene: Scene) -> np.ndarray:
    """The (size, size, 3) uint8 image of an explicit scene (for hand-built test cases and figures).

    Objects must lie inside the image; overlap and relations are not checked here.
    """
    image = np.empty((scene.size, scene.size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in scene.objects:
        (x, y), r = obj.center, obj.radius
        if min(x, y) - r < 0 or max(x, y) + r >= scene.size:
            raise ValueError(f"{obj} does not fit inside a {scene.size}x{scene.size} image")
        _stamp(image, obj)
    return image


def render(caption: Caption, rng: np.random.Generator, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, Scene]:
    """One (size, size, 3) uint8 image of ``caption`` and its scene; deterministic given ``rng``'s state."""
    images, scenes = render_batch([caption], rng, size)
    return images[0], scenes[0]


# A caption source that names colours by another convention: each colour's partner is a neighbour in
# hue or lightness. An involution, so a swapped caption is always a valid caption of the same skill.
COLOUR_PARTNERS: dict[str, str] = {
    "red": "orange", "orange": "red", "green": "yellow", "yellow": "green",
    "blue": "purple", "purple": "blue", "cyan": "white", "white": "cyan",
}  # fmt: skip


def swap_colours(caption: Caption) -> Caption:
    """``caption`` with every colour word replaced by its ``COLOUR_PARTNERS`` partner (uncoloured: unchanged)."""
    objects = tuple(
        ObjectSpec(o.shape, COLOUR_PARTNERS[o.color] if o.color else None, o.count) for o in caption.objects
    )
    return Caption(caption.skill, objects, caption.relation)


def miscaption(captions: Sequence[Caption], rate: float, seed: int) -> list[Caption]:
    """The captions a noisy caption source would write: each, with probability ``rate``, by ``swap_colours``.

    The images stay those of the true captions, so a model trained on the result names colours the
    evaluators' way only ``1 - rate`` of the time: a misalignment that preference data can correct.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"colour swap rate must be in [0, 1], got {rate}")
    flip = np.random.default_rng(seed).random(len(captions)) < rate
    return [swap_colours(c) if f else c for c, f in zip(captions, flip, strict=True)]


def make_dataset(
    n: int,
    seed: int,
    size: int = DEFAULT_SIZE,
    pool: Sequence[Caption] | None = None,
    skill_weights: dict[str, float] | None = None,
    geneval_share: float = 0.5,
) -> ShapesDataset:
    """``n`` captions sampled from ``pool`` (see ``sample_captions``) and their renders; same seed, same data.

    For a base model, pass ``pool=split_captions(seed)[0]`` so that held-out captions stay unseen.
    """
    rng = np.random.default_rng(seed)
    captions = sample_captions(rng, n, pool=pool, geneval_share=geneval_share, skill_weights=skill_weights)
    images, scenes = render_batch(captions, rng, size)
    return ShapesDataset(images, captions, scenes)
