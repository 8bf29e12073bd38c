"""GenEval's rules on hand-made detections: every task and the edge cases."""

import numpy as np
import pytest

from smpo_cli.benchmark.geneval_rules import (
    Detection,
    Rules,
    evaluate_image,
    official_ranking,
    relations,
    summarize,
)


def det(x1, y1, x2, y2, score=0.95, index=0):
    return Detection((x1, y1, x2, y2), score, index)


def test_single_object_threshold():
    meta = {"tag": "single_object", "include": [{"class": "cup", "count": 1}]}
    assert evaluate_image(meta, {"cup": [det(0, 0, 10, 10, 0.31)]}).correct
    v = evaluate_image(meta, {"cup": [det(0, 0, 10, 10, 0.29)]})
    assert not v.correct and "expected cup>=1, found 0" in v.reason


def test_two_objects_and_max_objects():
    meta = {"tag": "two_object", "include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1}]}
    assert evaluate_image(meta, {"cup": [det(0, 0, 5, 5)], "dog": [det(10, 10, 20, 20)]}).correct
    assert not evaluate_image(meta, {"cup": [det(0, 0, 5, 5)]}).correct
    many = [det(i, i, i + 1, i + 1, 0.5 + i / 100) for i in range(20)]
    v = evaluate_image({"tag": "single_object", "include": [{"class": "cup", "count": 1}]}, {"cup": many})
    assert len(v.kept["cup"]) == 16 and v.kept["cup"][0].score == pytest.approx(0.69)


def test_counting_is_exact_with_the_09_threshold():
    meta = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}
    two = [det(0, 0, 5, 5, 0.95), det(10, 0, 15, 5, 0.92)]
    assert evaluate_image(meta, {"dog": two}).correct
    assert evaluate_image(meta, {"dog": [*two, det(20, 0, 25, 5, 0.5)]}).correct  # third below 0.9: not counted
    v = evaluate_image(meta, {"dog": [*two, det(20, 0, 25, 5, 0.91)]})  # N+1 -> wrong
    assert not v.correct and "expected dog<3, found 3" in v.reason
    assert not evaluate_image(meta, {"dog": [det(0, 0, 5, 5, 0.95), det(10, 0, 15, 5, 0.85)]}).correct


def test_colours_use_the_top_objects_only():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    colours = {0: "blue", 1: "red"}
    by_index = lambda cls, d: colours[d.index]  # noqa: E731
    dets = [det(0, 0, 5, 5, 0.9, index=0), det(10, 10, 20, 20, 0.8, index=1)]
    v = evaluate_image(meta, {"car": dets}, by_index)  # the top car is blue: wrong, even though a red car exists
    assert not v.correct and "expected red car>=1, found 0 red" in v.reason
    dets = [det(0, 0, 5, 5, 0.7, index=0), det(10, 10, 20, 20, 0.8, index=1)]
    assert evaluate_image(meta, {"car": dets}, by_index).correct


def test_color_attr_checks_each_object_its_own_colour():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "cup", "count": 1, "color": "blue"}]}  # fmt: skip
    truth = {"car": "red", "cup": "blue"}
    dets = {"car": [det(0, 0, 5, 5)], "cup": [det(10, 10, 15, 15)]}
    assert evaluate_image(meta, dets, lambda cls, d: truth[cls]).correct
    swapped = {"car": "blue", "cup": "red"}  # colours bound to the wrong objects
    assert not evaluate_image(meta, dets, lambda cls, d: swapped[cls]).correct


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ((0, 0, 10, 10), (50, 0, 60, 10), {"left of"}),
        ((50, 0, 60, 10), (0, 0, 10, 10), {"right of"}),
        ((0, 0, 10, 10), (0, 50, 10, 60), {"above"}),
        ((0, 50, 10, 60), (0, 0, 10, 10), {"below"}),
        ((0, 0, 10, 10), (1, 1, 11, 11), set()),  # offsets inside the margin: no relation
        ((0, 0, 10, 10), (40, 40, 50, 50), {"left of", "above"}),  # diagonal: both hold
    ],
)
def test_relations(a, b, expected):
    assert relations(a, b, 0.1) == expected


def test_position_margin_boundary():
    # widths 10 + 10 -> margin 2 on x. Offset 2 shrinks to 0 (no relation at all); the shrunk offset is divided
    # by the unshrunk one, so offset 4 gives exactly -0.5 (not < -0.5: no relation) and 4.5 gives -0.56 (left of)
    assert relations((0, 0, 10, 10), (2, 0, 12, 10), 0.1) == set()
    assert relations((0, 0, 10, 10), (4, 0, 14, 10), 0.1) == set()
    assert relations((0, 0, 10, 10), (4.5, 0, 14.5, 10), 0.1) == {"left of"}


def test_position_clause_refers_to_group_zero():
    meta = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                           {"class": "cup", "count": 1, "position": ["left of", 0]}]}  # fmt: skip
    assert evaluate_image(meta, {"dog": [det(50, 0, 60, 10)], "cup": [det(0, 0, 10, 10)]}).correct
    assert not evaluate_image(meta, {"dog": [det(0, 0, 10, 10)], "cup": [det(50, 0, 60, 10)]}).correct
    v = evaluate_image(meta, {"cup": [det(0, 0, 10, 10)]})
    assert not v.correct and "no target" in v.reason


def test_nms_only_when_asked():
    dets = [det(0, 0, 10, 10, 0.9), det(0, 0, 10, 10, 0.8)]
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 1}], "exclude": [{"class": "cup", "count": 2}]}
    assert not evaluate_image(meta, {"cup": [det(0, 0, 10, 10, 0.95), det(0, 0, 10, 10, 0.94)]}).correct
    assert evaluate_image(meta, {"cup": [det(0, 0, 10, 10, 0.95), det(0, 0, 10, 10, 0.94)]}, rules=Rules(max_overlap=0.5)).correct
    assert len(dets) == 2


def test_summary_is_the_mean_of_task_accuracies():
    results = [{"tag": "single_object", "prompt_index": 0, "correct": True},
               {"tag": "single_object", "prompt_index": 0, "correct": True},
               {"tag": "counting", "prompt_index": 1, "correct": False},
               {"tag": "counting", "prompt_index": 1, "correct": True},
               {"tag": "counting", "prompt_index": 2, "correct": False},
               {"tag": "counting", "prompt_index": 2, "correct": False}]  # fmt: skip
    s = summarize(results)
    assert s["tasks"] == {"single_object": 1.0, "counting": 0.25}
    assert s["overall"] == pytest.approx(0.625)  # not the 3/6 image mean
    assert s["images_correct"] == pytest.approx(0.5) and s["prompts_with_a_correct_image"] == pytest.approx(2 / 3)


def test_threshold_is_strict_as_the_official_code():
    meta = {"tag": "single_object", "include": [{"class": "cup", "count": 1}]}
    assert not evaluate_image(meta, {"cup": [det(0, 0, 5, 5, 0.3)]}).correct
    assert evaluate_image(meta, {"cup": [det(0, 0, 5, 5, 0.3001)]}).correct
    counting = {"tag": "counting", "include": [{"class": "cup", "count": 1}], "exclude": [{"class": "cup", "count": 2}]}
    assert not evaluate_image(counting, {"cup": [det(0, 0, 5, 5, 0.9)]}).correct


def test_a_wrong_colour_unmatches_the_group_and_skips_its_position():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "cup", "count": 1, "color": "blue", "position": ["left of", 0]}]}  # fmt: skip
    dets = {"car": [det(50, 0, 60, 10)], "cup": [det(0, 0, 10, 10)]}
    v = evaluate_image(meta, dets, lambda cls, d: {"car": "green", "cup": "blue"}[cls])
    # the car is green: its group is unmatched, so the cup has no target (official reason texts)
    assert not v.correct
    assert v.reason.splitlines() == ["expected red car>=1, found 0 red; and 1 green", "no target for cup to be left of"]
    v = evaluate_image(meta, {"car": [det(0, 0, 10, 10)], "cup": [det(50, 0, 60, 10)]}, lambda cls, d: {"car": "red", "cup": "pink"}[cls])
    assert v.reason == "expected blue cup>=1, found 0 blue; and 1 pink"  # colour failed: position not checked


def test_position_reports_the_first_failing_pair_only():
    meta = {"tag": "position", "include": [{"class": "dog", "count": 2},
                                           {"class": "cup", "count": 1, "position": ["right of", 0]}]}  # fmt: skip
    dets = {"dog": [det(50, 0, 60, 10), det(80, 0, 90, 10, 0.9)], "cup": [det(0, 0, 10, 10)]}
    v = evaluate_image(meta, dets)
    assert not v.correct and v.reason == "expected cup right of target, found left of target"


# ------------------------------------------------------------------ parity with evaluate_images.py (issue 14)


def test_threshold_is_compared_in_float32():
    """The official code compares mmdet's float32 scores with the threshold in float32: a score of exactly
    float32(0.3) (0.30000001..., above 0.3 in float64) is dropped; the next float32 up is kept."""
    meta = {"tag": "single_object", "include": [{"class": "cup", "count": 1}]}
    at = float(np.float32(0.3))
    assert at > 0.3
    assert not evaluate_image(meta, {"cup": [det(0, 0, 5, 5, at)]}).correct
    assert evaluate_image(meta, {"cup": [det(0, 0, 5, 5, float(np.nextafter(np.float32(0.3), np.float32(1))))]}).correct
    counting = {"tag": "counting", "include": [{"class": "cup", "count": 1}]}
    assert not evaluate_image(counting, {"cup": [det(0, 0, 5, 5, float(np.float32(0.9)))]}).correct


# np.argsort(scores)[::-1] under numpy 1.23.5 (the series GenEval's environment.yml pins, 1.23.1), recorded with
# `pip install --target /tmp/np123 --no-deps numpy==1.23.5` and PYTHONPATH=/tmp/np123.
FORTY = [((i * 7) % 5) / 10 for i in range(40)]
FORTY_RANKED = [37, 2, 7, 32, 12, 17, 22, 27, 39, 24, 4, 9, 14, 19, 29, 34, 31, 11, 26, 16, 36, 1, 21, 6, 18, 38, 3,
                13, 28, 33, 8, 23, 5, 35, 25, 10, 30, 15, 20, 0]  # fmt: skip
# a median-of-3 adversary (McIlroy's antiqsort) with ties: numpy's introsort falls back to heapsort on it
ADVERSARY = [0, 23, 1, 22, 2, 22, 3, 21, 4, 21, 5, 20, 6, 20, 7, 19, 8, 19, 9, 18, 10, 11, 24, 23, 0, 1, 2, 3, 4, 5, 6,
             7, 8, 9, 10, 18, 17, 17, 16, 16, 15, 15, 14, 14, 13, 13, 12, 12, 24, 11]  # fmt: skip
ADVERSARY_RANKED = [22, 48, 23, 1, 3, 5, 9, 7, 11, 13, 15, 17, 19, 35, 37, 36, 38, 39, 40, 41, 42, 43, 44, 45, 47, 46,
                    49, 21, 34, 20, 33, 18, 32, 16, 31, 14, 30, 12, 29, 10, 28, 8, 27, 6, 26, 4, 25, 2, 24, 0]  # fmt: skip


@pytest.mark.parametrize(
    "scores, ranked",
    [
        ([0.5, 0.5], [1, 0]),  # a two-way tie: the later detection first
        ([0.9, 0.4, 0.9, 0.2, 0.9], [4, 2, 0, 1, 3]),
        (FORTY, FORTY_RANKED),  # more than 16: quicksort partitions, not the stable insertion sort
        (ADVERSARY, ADVERSARY_RANKED),
        ([], []),
        ([0.7], [0]),
    ],
)
def test_ties_are_ranked_as_numpy_123_argsort(scores, ranked):
    assert official_ranking(scores) == ranked


def test_equal_scores_keep_the_officially_first_detection():
    """Which of two equal-score cups is kept (max_objects) and coloured is the one numpy 1.23 ranks first:
    the later one in the detector's order, where a stable sort kept the earlier."""
    meta = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}]}
    colours = {0: "blue", 1: "red"}
    dets = [det(0, 0, 5, 5, 0.8, index=0), det(10, 10, 20, 20, 0.8, index=1)]
    v = evaluate_image(meta, {"cup": dets}, lambda cls, d: colours[d.index])
    assert v.correct and [d.index for d in v.kept["cup"]] == [1, 0]
    one = evaluate_image(meta, {"cup": dets}, lambda cls, d: colours[d.index], Rules(max_objects=1))
    assert [d.index for d in one.kept["cup"]] == [1]


def test_position_margin_uses_absolute_box_sizes():
    """A box given with x2 < x1 has a negative signed width; the official margin uses |x2 - x1|."""
    # centres 5 and 9 on x, widths 10 + 10: margin 2, shrunk offset 2 / 4 = 0.5 -> not "left of"
    assert relations((0, 0, 10, 10), (4, 0, 14, 10), 0.1) == set()
    # the same boxes with a's corners swapped: a signed width of -10 gave margin 0 and "left of"
    assert relations((10, 10, 0, 0), (4, 0, 14, 10), 0.1) == set()
    assert relations((10, 0, 0, 10), (14, 0, 4, 10), 0.1) == set()
    assert relations((10, 0, 0, 10), (25, 0, 15, 10), 0.1) == {"left of"}
