"""Box formats (SPEC 3): exact inverses, slop-tolerant parsing that never raises, crops, IoU/GIoU."""
import random

import pytest

import common
from common import BOX_FORMATS, box_giou, box_iou, box_to_text, crop_box, parse_box

SHAPES = [(391, 500), (500, 374), (500, 500), (168, 112), (1695, 2200), (2156, 1695)]


@pytest.mark.parametrize("fmt", BOX_FORMATS)
@pytest.mark.parametrize("w,h", SHAPES)
def test_round_trip(fmt, w, h):
    rng = random.Random(hash((fmt, w, h)) % 1000)
    resized = (round(h / 28) * 28, round(w / 28) * 28)
    for _ in range(50):
        x1, x2 = sorted(rng.sample(range(w + 1), 2))
        y1, y2 = sorted(rng.sample(range(h + 1), 2))
        box = [x1, y1, x2, y2]
        text = box_to_text(box, fmt, w, h, decimals=3, resized_hw=resized)
        back = parse_box(text, fmt, w, h, resized_hw=resized)
        # One unit of the text's grid, in pixels: the rounding a format can lose.
        unit = {"viscot": max(w, h) / 1000, "norm": max(w, h) / 1000, "qwen2": max(w, h) / 1000,
                "qwen25": max(w / resized[1], h / resized[0]), "qwen3": max(w, h) / 1000}[fmt]
        if back is None:  # only a box thinner than the grid may collapse
            assert min(x2 - x1, y2 - y1) <= 2 * unit
            continue
        assert all(abs(a - b) <= unit + 1e-9 for a, b in zip(back, box)), (text, box, back)


def test_viscot_matches_visual_cot_samples():
    # From benchmark_gqa.json / benchmark_det_gqa.jsonl (question 7, a 391x500 portrait; 20, a landscape).
    assert box_to_text([217, 343, 242, 393], "viscot", 391, 500) == "[0.542, 0.686, 0.592, 0.786]"
    assert box_to_text([2, 0, 500, 375], "viscot", 500, 375) == "[0.004, 0.124, 1.000, 0.874]"
    assert box_to_text([0, 211, 366, 357], "viscot", 500, 382) == "[0.000, 0.540, 0.732, 0.832]"


def test_viscot_and_norm_differ_on_non_square():
    # VisRL's bug: cropping with x/w, y/h a box written in the padded-square frame. Not repeated here.
    text = box_to_text([217, 343, 242, 393], "viscot", 391, 500)
    assert parse_box(text, "viscot", 391, 500) == pytest.approx([217, 343, 242, 393], abs=0.5)
    assert box_iou(parse_box(text, "norm", 391, 500), [217, 343, 242, 393]) < 0.5


def test_qwen3_is_relative_json_on_0_to_1000():
    """Qwen3-VL / Qwen3.5 ground in {"bbox_2d": [...]} on 0..1000 per axis (1000 included), unlike Qwen2.5-VL's
    JSON in resized pixels and Qwen2-VL's (x1,y1),(x2,y2) on [0, 1000)."""
    assert box_to_text([0, 42, 224, 126], "qwen3", 224, 168) == '{"bbox_2d": [0, 250, 1000, 750]}'
    assert box_to_text([0, 42, 224, 126], "qwen2", 224, 168) == "(0,250),(999,750)"
    assert parse_box('{"bbox_2d": [0, 250, 1000, 750]}', "qwen3", 224, 168) == [0, 42, 224, 126]
    assert parse_box('[{"bbox_2d": [500, 500, 1000, 1000], "label": "cat"}]', "qwen3", 200, 100) == [100, 50, 200, 100]


def test_decimals_setting():
    assert box_to_text([10, 20, 30, 40], "norm", 100, 100, decimals=2) == "[0.10, 0.20, 0.30, 0.40]"


@pytest.mark.parametrize("text", ["[0.1, 0.2, 0.5, 0.6]", " [ 0.1 ,0.2,  0.5, 0.6 ] ", "[[0.1, 0.2, 0.5, 0.6]]",
                                  "[0.1, 0.2, 0.5, 0.6].", "'[0.1, 0.2, 0.5, 0.6]'", '"[0.1, 0.2, 0.5, 0.6]"',
                                  "The region is [0.1, 0.2, 0.5, 0.6]", "[.1, .2, .5, .6]"])
def test_parse_slop(text):
    assert parse_box(text, "norm", 100, 100) == pytest.approx([10, 20, 50, 60])


@pytest.mark.parametrize("text", ["", "no box", "[0.1, 0.2, 0.5]", "[nan, 0.2, 0.5, 0.6]", "[0.1, inf, 0.5, 0.6]",
                                  "[0.5, 0.2, 0.1, 0.6]", "[0.1, 0.6, 0.5, 0.6]", "[-0.5, -0.4, -0.2, -0.1]", None, 12, "[1e999, 0, 1, 1]"])
def test_parse_rejects(text):
    for fmt in BOX_FORMATS:
        assert parse_box(text, fmt, 100, 80, resized_hw=(84, 112)) is None


def test_parse_rejects_outside_normalised_frame():
    for fmt in ("viscot", "norm"):
        assert parse_box("[1.2, 1.3, 1.5, 1.6]", fmt, 100, 80) is None


def test_parse_clamps_to_image():
    assert parse_box("[-0.1, 0.2, 1.3, 0.6]", "norm", 100, 100) == [0, 20, 100, 60]


def test_qwen_formats():
    assert box_to_text([50, 25, 100, 75], "qwen2", 200, 100) == "(250,250),(500,750)"
    assert parse_box("<|box_start|>(250,250),(500,750)<|box_end|>", "qwen2", 200, 100) == [50, 25, 100, 75]
    assert box_to_text([50, 25, 100, 75], "qwen25", 200, 100, resized_hw=(112, 196)) == '{"bbox_2d": [49, 28, 98, 84]}'
    assert parse_box("```json\n[{'bbox_2d': [49, 28, 98, 84]}]\n```", "qwen25", 200, 100, resized_hw=(112, 196)) \
        == pytest.approx([50, 25, 100, 75])


def test_crop_clamps_and_grows():
    assert crop_box([10, 10, 50, 40], 100, 80, 28) == [10, 10, 50, 40]
    assert crop_box([-20, -5, 50, 90], 100, 80, 28) == [0, 0, 50, 80]
    small = crop_box([50, 40, 52, 41], 100, 80, min_size=28)
    assert small[2] - small[0] == 28 and small[3] - small[1] == 28
    assert small[0] <= 50 and small[2] >= 52 and small[1] <= 40 and small[3] >= 41
    edge = crop_box([95, 75, 100, 80], 100, 80, min_size=28)  # grows inward at the corner
    assert edge == [72, 52, 100, 80]
    assert crop_box([0, 0, 5, 5], 20, 20, min_size=28) == [0, 0, 20, 20]  # image smaller than the minimum
    # A thin box (a text line across a wide scan): its short side grows to keep the crop within the
    # processor's aspect limit, around the box.
    thin = crop_box([100, 500, 8100, 502], 9000, 1000, min_size=28)
    assert thin == [100, 481, 8100, 521] and (thin[2] - thin[0]) <= common.MAX_ASPECT * (thin[3] - thin[1])
    # Start and size rounded half to even apart once put the crop a pixel past the edge: 69.5 -> 70, 31.5 -> 32.
    assert crop_box([69.5, 0, 101, 50], 101, 50, 28) == [69, 0, 101, 50]


def test_crop_stays_inside_the_image_on_half_pixel_boxes():
    rng = random.Random(0)
    for _ in range(20000):
        w, h = rng.randint(20, 300), rng.randint(20, 300)
        x1, y1 = rng.randint(0, 2 * w - 2) / 2, rng.randint(0, 2 * h - 2) / 2
        box = [x1, y1, rng.randint(int(2 * x1) + 1, 2 * w) / 2, rng.randint(int(2 * y1) + 1, 2 * h) / 2]
        c = crop_box(box, w, h, 28)
        assert 0 <= c[0] < c[2] <= w and 0 <= c[1] < c[3] <= h, (box, w, h, c)


def test_iou_giou_closed_form():
    a, b = [0, 0, 2, 2], [1, 1, 3, 3]
    assert box_iou(a, b) == pytest.approx(1 / 7)
    assert box_giou(a, b) == pytest.approx(1 / 7 - (9 - 7) / 9)
    assert box_iou(a, a) == 1 and box_giou(a, a) == 1
    far = [10, 10, 11, 11]
    assert box_iou(a, far) == 0
    assert box_giou(a, far) == pytest.approx(0 - (121 - 5) / 121)
    assert box_iou([0, 0, 0, 1], [0, 0, 0, 1]) == 0  # zero area never divides by zero
