"""virft-det: the COCO mAP in eval.py equals pycocotools (a test-only dependency) on randomised detections;
our strict Visual-RFT answer parsing (common.parse_detections, eval's --parser strict) table by table."""
import contextlib
import copy
import io
import math

import numpy as np
import pytest

from common import extract_answer, parse_detections
from eval import STAT_NAMES, coco_map, virft_to_coco_dets


def pycoco_stats(gt, dets):
    """Reference: pycocotools on deep copies (loadRes and evaluate mutate their inputs)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        res = coco.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco, res, 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STAT_NAMES, ev.stats.tolist()))


def assert_same(gt, dets):
    ours, ref = coco_map(copy.deepcopy(gt), copy.deepcopy(dets)), pycoco_stats(gt, dets)
    for name in STAT_NAMES:
        assert ours[name] == pytest.approx(ref[name], abs=1e-6), (name, ours, ref)
    return ours


def random_box(rng, W, H):
    # log-uniform side lengths so areas span small (<32^2), medium and large (>96^2)
    w, h = np.exp(rng.uniform(np.log(3), np.log(min(W, H) * 0.9), size=2))
    return [float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h)), float(w), float(h)]


def make_case(seed, crowd_frac=0.0, first_ann_id=1):
    rng = np.random.default_rng(seed)
    n_img, n_cat = int(rng.integers(20, 41)), int(rng.integers(3, 7))
    cat_ids = [3 * c + 1 for c in range(n_cat)]  # non-contiguous ids
    images = [{'id': 10 + i, 'width': int(rng.integers(200, 800)), 'height': int(rng.integers(200, 800))}
              for i in range(n_img)]
    anns, dets = [], []
    for im in images:
        W, H = im['width'], im['height']
        n_gt = 0 if rng.random() < 0.15 else int(rng.integers(1, 8))  # some images without gts
        for _ in range(n_gt):  # categories: all but the last, which has no gts
            # sometimes an exact duplicate of the previous gt box: IoU ties between gts
            dup = anns and anns[-1]['image_id'] == im['id'] and rng.random() < 0.15
            box = list(anns[-1]['bbox']) if dup else random_box(rng, W, H)
            crowd = int(rng.random() < crowd_frac)
            # area field deliberately differs from w*h (like a segmentation area)
            anns.append({'id': first_ann_id + len(anns), 'image_id': im['id'],
                         'category_id': anns[-1]['category_id'] if dup else int(rng.choice(cat_ids[:-1])),
                         'bbox': box, 'area': box[2] * box[3] * float(rng.uniform(0.6, 1.0)),
                         'iscrowd': crowd})
            for _ in range(int(rng.integers(0, 3))):  # 0..2 jittered copies (duplicates = FPs)
                j = rng.normal(0, rng.choice([0, 0.03, 0.1, 0.2]), size=4) * [box[2], box[3], box[2], box[3]]
                b = [box[0] + j[0], box[1] + j[1], max(box[2] + j[2], 1.0), max(box[3] + j[3], 1.0)]
                cat = anns[-1]['category_id'] if rng.random() < 0.9 else int(rng.choice(cat_ids))
                dets.append({'image_id': im['id'], 'category_id': cat, 'bbox': [float(v) for v in b],
                             'score': round(float(rng.uniform(0, 1)), 1)})  # rounding -> many ties
        for _ in range(int(rng.integers(0, 4))):  # random false positives
            dets.append({'image_id': im['id'], 'category_id': int(rng.choice(cat_ids)),
                         'bbox': random_box(rng, W, H), 'score': round(float(rng.uniform(0, 1)), 1)})
    # one crowded image: > 100 dets of one category, so the maxDet cut matters
    im = images[0]
    c = cat_ids[0]
    for _ in range(130):
        dets.append({'image_id': im['id'], 'category_id': c, 'bbox': random_box(rng, im['width'], im['height']),
                     'score': round(float(rng.uniform(0, 1)), 2)})
    order = rng.permutation(len(dets))
    dets = [dets[i] for i in order]
    gt = {'images': images, 'annotations': anns,
          'categories': [{'id': c, 'name': f'c{c}'} for c in cat_ids]}
    return gt, dets


@pytest.mark.parametrize('seed', [0, 1, 2, 3, 4, 5])
def test_matches_pycocotools_random(seed):
    gt, dets = make_case(seed)
    s = assert_same(gt, dets)
    assert 0 < s['AP'] < 1  # sanity: the case is neither trivial nor empty


def test_matches_pycocotools_crowd():
    gt, dets = make_case(11, crowd_frac=0.25)
    assert any(a['iscrowd'] for a in gt['annotations'])
    assert_same(gt, dets)


def test_matches_pycocotools_gt_id_zero():
    # pycocotools stores matched gt ids with 0 meaning "unmatched": a det matched to the
    # gt with id 0 counts as a false positive.  We mirror that quirk.
    gt, dets = make_case(12, first_ann_id=0)
    assert_same(gt, dets)


def test_matches_pycocotools_duplicate_gt_ids_and_unknown_category():
    # loadAnns resolves gt ids through a dict, so a reused id means the later annotation
    # replaces the earlier one; dets of categories not in gt['categories'] are dropped.
    gt, dets = make_case(13)
    rng = np.random.default_rng(13)
    for a in gt['annotations']:
        if rng.random() < 0.2:
            a['id'] = int(rng.integers(1, 20))
    dets.append(dict(dets[0], category_id=999))
    assert_same(gt, dets)


# ------------------------------------------------------------------ hand-computed cases
def tiny(det_boxes, gt_box=(0, 0, 10, 10)):
    gt = {'images': [{'id': 1, 'width': 100, 'height': 100}], 'categories': [{'id': 1, 'name': 'a'}],
          'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': list(gt_box),
                           'area': gt_box[2] * gt_box[3], 'iscrowd': 0}]}
    dets = [{'image_id': 1, 'category_id': 1, 'bbox': list(b), 'score': 0.9} for b in det_boxes]
    return gt, dets


@pytest.mark.parametrize('det_box,ap', [
    ((0, 0, 10, 10), 1.0),   # perfect
    ((0, 0, 5.8, 10), 0.2),  # IoU .58: matches at .50 and .55 only
    ((0, 0, 6, 10), 0.3),    # IoU exactly .6 matches the .60 threshold too (>=)
    ((0, 0, 4, 10), 0.0),    # IoU .4: no match
])
def test_tiny_single_det(det_box, ap):
    gt, dets = tiny([det_box])
    s = assert_same(gt, dets)
    assert s['AP'] == pytest.approx(ap, abs=1e-9)
    assert s['AR100'] == pytest.approx(ap, abs=1e-9)
    assert s['AP_small'] == pytest.approx(ap, abs=1e-9)  # gt area 100 is small
    assert s['AP_medium'] == -1 and s['AP_large'] == -1  # no gt in those ranges


def test_gt_tie_goes_to_last_gt_and_gt_id_zero_is_unmatched():
    # Two identical gts (ids 0 and 1), one det: pycocotools replaces its match on
    # iou >= best, so the tie goes to the later gt (id 1) -> a true positive.  Were it
    # matched to id 0 it would count as a false positive (0 means "unmatched").
    gt, dets = tiny([(0, 0, 10, 10)])
    gt['annotations'] = [dict(gt['annotations'][0], id=i) for i in (0, 1)]
    s = assert_same(gt, dets)
    assert s['AP'] == pytest.approx(51 / 101) and s['AR100'] == pytest.approx(0.5)
    gt['annotations'].reverse()  # now the det matches id 0 and scores nothing
    s = assert_same(gt, dets)
    assert s['AP'] == 0 and s['AR100'] == 0


@pytest.mark.parametrize('seed', [21, 22, 23])
def test_matches_pycocotools_with_nan_in_boxes(seed):
    # A model can write NaN (json.loads reads it): pycocotools' C IoU (fmin/fmax, `w <= 0`) gives such a det a
    # NaN or a finite IoU, and a NaN IoU is never `< best` in evaluateImg, so it matches and later free gts
    # replace it. Some dets get a NaN in one coordinate or several, crowd gts among the gts.
    gt, dets = make_case(seed, crowd_frac=0.2)
    rng = np.random.default_rng(seed)
    for d in dets:
        if rng.random() < 0.15:
            for j in rng.choice(4, size=int(rng.integers(1, 4)), replace=False):
                d['bbox'][j] = math.nan
    assert any(math.isnan(v) for d in dets for v in d['bbox'])
    assert_same(gt, dets)
    # Position [NaN, 0, x2, y2] in xywh: x and w NaN, so the det's area and its IoU are NaN: matched, AP 1
    gt, dets = tiny([(math.nan, 0, math.nan, 10)])
    assert assert_same(gt, dets)['AP'] == pytest.approx(1.0)


def test_matches_pycocotools_with_a_confidence_beyond_float_range():
    gt, dets = make_case(24)
    dets[0]['score'], dets[1]['score'] = 10 ** 400, -10 ** 400  # json.loads reads such integers exactly
    assert_same(gt, dets)


def test_no_dets_and_empty_gt():
    gt, _ = tiny([])
    s = coco_map(gt, [])  # pycocotools' loadRes crashes on [], we return zeros
    assert s['AP'] == 0 and s['AR100'] == 0 and s['AP_large'] == -1
    gt['annotations'] = []
    assert all(v == -1 for v in coco_map(gt, []).values())


# ------------------------------------------------------------------ parsing
P = "{'Position': [1, 2, 3, 4], 'Confidence': 0.9}"
Q = "{'Position': [5, 6, 7, 8], 'Confidence': 0.5}"
ONE = [([1.0, 2.0, 3.0, 4.0], 0.9)]
TWO = ONE + [([5.0, 6.0, 7.0, 8.0], 0.5)]


@pytest.mark.parametrize('text,expected', [
    ('<think>hm</think><answer> x </answer>', 'x'),
    ('a <answer>1</answer> b <answer>2</answer>', '1'),
    ('  no tags  ', 'no tags'),
    ('<answer>unclosed', '<answer>unclosed'),
    ('<answer></answer>', ''),
    ('</answer> then <answer>y</answer>', 'y'),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize('text,expected', [
    (f'<answer>[{P}]</answer>', ONE),
    (f'<answer>[{P}, {Q}]</answer>', TWO),
    (f'<think>I see [[boxes]] </think>\n<answer>[{P}]</answer> trailing', ONE),
    (f'[{P}]', ONE),                                  # no tags: whole text
    (f'<answer>[[{P}, {Q}]]</answer>', TWO),          # doubled outer brackets
    (f'<answer>[[{P}]</answer>', ONE),
    (f'<answer>[\n  {P},\n  {Q}\n]</answer>', TWO),    # newlines
    (f'<answer>[{P}, {{\'Position\': [5, 6</answer>', ONE),  # truncated: drop incomplete item
    (f'<answer>[{P}, {Q}, </answer>', TWO),
    (f'<answer>[{P}, {Q}]', None),                    # unclosed <answer>: whole text, fails
    (f'[{P}, {Q}', TWO),                              # no tags + truncated list
    ("<answer>[{'Position': [5, 6</answer>", None),  # nothing complete survives
    ('<answer>[{"Position": [1, 2, 3, 4], "Confidence": 1}]</answer>', [([1.0, 2.0, 3.0, 4.0], 1.0)]),
    ('<answer>[]</answer>', []),
    ('<answer>[ ]</answer>', []),
    ('<answer></answer>', None),
    ('<answer>none</answer>', None),
    (f'<answer>{P}</answer>', None),                 # a dict, not a list
    ('<answer>[[1, 2, 3, 4]]</answer>', None),        # list of lists
    ("<answer>[{'Position': [1, 2, 3, 4]}]</answer>", None),                     # missing Confidence
    ("<answer>[{'Position': [1, 2, 3], 'Confidence': 0.9}]</answer>", None),     # 3 coords
    ("<answer>[{'Position': [1, 'a', 3, 4], 'Confidence': 0.9}]</answer>", None),  # non-numeric
    ("<answer>[{'Position': [1, 2, 3, 4], 'Confidence': 'high'}]</answer>", None),
    ("<answer>[{'Position': [1, 2, 3, 4], 'Confidence': true}]</answer>", None),
    ("<answer>[{'Position': [1, 2, NaN, 4], 'Confidence': 0.9}]</answer>", None),
    ("<answer>[{'Position': [1, 2, 3, 4], 'Confidence': Infinity}]</answer>", None),
    (f'<answer>[{P}, 5]</answer>', None),
    (f'<answer>[{P}] garbage</answer>', None),
    ("<answer>[{'Position': [1, 2, 3, 4], 'Confidence': __import__('os')}]</answer>", None),
])
def test_parse_detections(text, expected):
    assert parse_detections(text) == expected


def test_parse_never_raises():
    for t in ['', '[', ']', '[{', '"', '[{"a": "\\"}', '[' * 5000, None, 123]:
        parse_detections(t)  # None/123 hit the except branch


def test_virft_to_coco_dets():
    gt = {'images': [{'id': 7, 'width': 200, 'height': 100}], 'annotations': [],
          'categories': [{'id': 1, 'name': 'a'}]}
    rows = [{'image_id': 7, 'category_id': 1,
             'text': "<answer>[{'Position': [100, 200, 600, 700], 'Confidence': 0.8}, "
                     "{'Position': [600, 700, 100, 200], 'Confidence': 0.3}]</answer>"},
            {'image_id': 7, 'category_id': 1, 'text': '<answer>oops</answer>'},
            {'image_id': 7, 'category_id': 1, 'text': '<answer>[]</answer>'},
            {'image_id': 7, 'category_id': 1, 'text': "<think>none</think><answer>'No Objects'</answer>"},
            {'image_id': 7, 'category_id': 1, 'text': 'No Objects.'}]
    dets, counts = virft_to_coco_dets(rows, gt, "strict")  # the published reading: test_virft_rules.py
    assert counts["unparsable"] == 1 and len(dets) == 2  # "No Objects" (the prompt's own answer) is no detection
    for d, score in zip(dets, [0.8, 0.3]):  # swapped corners are re-ordered
        assert d['bbox'] == pytest.approx([20, 20, 100, 50]) and d['score'] == score
        assert d['image_id'] == 7 and d['category_id'] == 1
    assert all(math.isfinite(v) for d in dets for v in d['bbox'])
