"""Visual-RFT's published scoring rules, table by table, as the defaults of eval.py (--protocol virft-cls,
virft-det) and grpo.py (det_iou, det_confidence, cls_virft). Each expected value was worked out by hand from
the published scripts (classification/Qwen2_VL_classification_infere.py, coco_evaluation/
Qwen2_VL_coco_infere.py, src/virft/src/open_r1/grpo.py and grpo_classification.py), not from our code; the
comment on a row names the rule or quirk it pins. The strict alternatives are in test_grpo.py and
test_coco_map.py."""
import json
import math

import pytest

import common
import eval as ev
import grpo
from test_coco_map import assert_same


def item(pos, conf):
    return f"{{'Position': {pos}, 'Confidence': {conf}}}"


# --------------------------------------------------------------------------------- classification (eval)
# Published: re.search(r"<answer>(.*?)</answer>") on the response (no DOTALL), no match is wrong; label and
# answer .replace(' ', '').replace('_', '').lower(); right iff one is a substring of the other.

@pytest.mark.parametrize("text,label,correct,unparsable,empty", [
    ("<think>fur</think> <answer>red fox</answer>", "Red_Fox", True, False, False),
    ("<answer>CAT</answer>", "cat", True, False, False),                        # lower-cased
    ("<answer>fox</answer>", "arctic fox", True, False, False),                 # answer inside the label
    ("<answer>an arctic fox, probably</answer>", "arctic fox", True, False, False),  # label inside the answer
    ("<answer></answer>", "cat", True, False, True),                           # empty: inside every label
    ("<answer> _ </answer>", "cat", True, False, True),                        # empty once normalised
    ("<answer>dog</answer>", "cat", False, False, False),
    ("<answer>Red-Fox</answer>", "red fox", False, False, False),                # only spaces and underscores go
    ("<answer>red\tfox</answer>", "red fox", False, False, False),              # a tab is not a space
    ("<answer>red\nfox</answer>", "red fox", False, True, False),               # spans lines: no match
    ("<answer>red\nfox</answer> <answer>dog</answer>", "dog", True, False, False),  # the first single-line match
    ("<answer>Dog</answer><answer>cat</answer>", "cat", False, False, False),   # the first match decides
    ("red fox", "red fox", False, True, False),                                 # no tags: wrong
    ("<answer>cat", "cat", False, True, False),                                 # unclosed: wrong
])
def test_cls_published_verdicts(text, label, correct, unparsable, empty):
    args = ev.parse_args(["--protocol", "virft-cls", "--questions", "q", "--predictions", "p", "--out", "r.json"])
    assert args.match == "virft"  # the default
    metrics, rows, settings = ev.score_virft_cls([{"id": "a", "solution": f"<answer>{label}</answer>"}],
                                                 [{"id": "a", "text": text}], args, ("q", "p"))
    assert rows[0]["correct"] is correct
    assert (metrics["correct"], metrics["unparsable"], metrics["empty_answer_correct"]) == \
        (int(correct), int(unparsable), int(empty))
    assert "published" in settings["match"]


# Published: the label is read the same way, re.search(r"<answer>(.*?)</answer>", solution).group(1), unstripped.
@pytest.mark.parametrize("solution,text,correct", [
    ("<answer>red\tfox</answer>", "<answer>red fox</answer>", False),   # a tab inside the label stays
    ("<answer>red fox\t</answer>", "<answer>red fox</answer>", True),    # label inside the answer
    ("<answer>red fox\t</answer>", "<answer>a red fox</answer>", False),  # the label's trailing tab stays
    ("<answer>cat</answer> <answer>dog</answer>", "<answer>dog</answer>", False),  # the label's first match
    ("<answer>a\nb</answer> <answer>dog</answer>", "<answer>dog</answer>", True),  # ... on one line
    ("Red Fox", "<answer>redfox</answer>", True),                        # a bare label, taken whole
])
def test_cls_published_label_reading(solution, text, correct):
    args = ev.parse_args(["--protocol", "virft-cls", "--questions", "q", "--predictions", "p", "--out", "r.json"])
    metrics, rows, _ = ev.score_virft_cls([{"id": "a", "solution": solution}], [{"id": "a", "text": text}], args,
                                          ("q", "p"))
    assert rows[0]["correct"] is correct


def test_cls_exact_is_the_named_strict_option():
    args = ev.parse_args(["--protocol", "virft-cls", "--questions", "q", "--predictions", "p", "--out", "r.json",
                          "--match", "exact"])
    records = [{"id": str(i), "answer": lab} for i, lab in enumerate(["arctic fox", "cat", "red fox", "Red_Fox"])]
    preds = [{"id": "0", "text": "<answer>fox</answer>"},       # substring: no
             {"id": "1", "text": "<answer></answer>"},          # empty: never
             {"id": "2", "text": "red fox"},                    # no tags: the whole text
             {"id": "3", "text": "<answer>red fox</answer>"}]
    metrics, rows, settings = ev.score_virft_cls(records, preds, args, ("q", "p"))
    assert [r["correct"] for r in rows] == [False, False, True, True]
    assert metrics["accuracy"] == 0.5 and "exact" in settings["match"]


# ------------------------------------------------------------------------------ classification (reward)
# Published accuracy_reward: the first <answer>(.*?)</answer> of the completion, else the whole completion;
# the same for the solution; .strip(); normalised as above; 1 iff a substring either way.

@pytest.mark.parametrize("text,solution,virft,ours", [
    ("<answer>red fox</answer>", "<answer>Red_Fox</answer>", 1.0, 1.0),
    ("<answer>fox</answer>", "<answer>arctic fox</answer>", 1.0, 0.0),         # substring credit
    ("<answer></answer>", "<answer>cat</answer>", 1.0, 0.0),                   # the empty answer wins
    ("red fox", "<answer>red fox</answer>", 1.0, 1.0),                          # no tags: the whole completion
    ("<think>it is a cat</think>", "<answer>cat</answer>", 1.0, 0.0),           # ... label inside it
    ("<answer>red\nfox</answer>", "<answer>red fox</answer>", 0.0, 0.0),        # spans lines: whole text, no
    ("<answer>dog</answer>", "<answer>cat</answer>", 0.0, 0.0),
    ("<answer>cat</answer>", "cat", 1.0, 1.0),                                  # a bare label
    ("<answer>\tfox</answer>", "<answer>arctic fox</answer>", 1.0, 0.0),        # stripped: the tab goes
])
def test_cls_rewards(text, solution, virft, ours):
    assert grpo.REWARDS["cls_virft"]([text], solution=[solution]) == [virft]
    assert grpo.REWARDS["cls"]([text], solution=[solution]) == [ours]


# -------------------------------------------------------------------------------- detection (eval)
# Published COCO script: the response gets '[['->'[', ']]'->']', '\n'->'', ', ...'->'' first; then
# re.search(r'<answer>(.*?)</answer>') or the whole response, .strip(), wrapped in <answer></answer>;
# extract_bbox: from the first <answer> to the first </answer>; if not ending with ']', rsplit('},', 1)[0]
# + '}]'; "'"->'"'; json.loads (None on failure). None or a str first item: no detections. remove_duplicates
# on tuple(Position); then per item: x /1000.0 * width (y by height), [x1, y1, x2 - x1, y2 - y1], score =
# Confidence, appended one by one inside one try.

W, H = 200, 100
P = item([100, 200, 300, 400], 0.9)
Q = item([500, 500, 700, 900], 0.5)
PD = ([20.0, 20.0, 40.0, 20.0], 0.9)      # P on a 200 x 100 image
QD = ([100.0, 50.0, 40.0, 40.0], 0.5)


@pytest.mark.parametrize("text,dets,failed", [
    (f"<answer>[{P}, {Q}]</answer>", [PD, QD], False),
    (f"<think>[[x]]</think><answer>[[{P}, {Q}]]</answer>", [PD, QD], False),   # '[[' and ']]' repaired
    (f"<answer>[{P},\n {Q}]</answer>", [PD, QD], False),                     # newlines removed first
    (f"<answer>\n[{P}]\n</answer>", [PD], False),                            # ... so a multi-line answer reads
    (f"<answer>[{P}, {Q}, ...]</answer>", [PD, QD], False),                  # ', ...' removed
    (f"[{P}, {Q}]", [PD, QD], False),                                         # no tags: the whole response
    (f"<think>x</think><answer>[{P}]</answer><answer>[{Q}]</answer>", [PD], False),  # the first answer
    ('<answer>[{"Position": [100, 200, 300, 400], "Confidence": 0.9}]</answer>', [PD], False),
    (f"<answer>[{P}, {Q}</answer>", [PD], False),          # unclosed list: cut after the last '},': Q is lost
    (f"<answer>[{P}, {Q}, {item([0, 0, 1000, 1000], 0.2)}</answer>", [PD, QD], False),  # ... the last, not the first
    (f"<answer>[{P}] </answer>", [PD], False),             # stripped before the closing check
    (f"[{P}]</answer>", [PD], False),                      # no opening tag: wrapped, read to the first </answer>
    (f"<answer>[{P},...]</answer>", [], True),             # only ', ...' with its space is removed
    (f"<answer>[{P}, {{'Position': [5</answer>", [PD], False),              # a cut-off item goes
    (f"<answer>[{P}</answer>", [], True),                   # one closed item, list unclosed: '[P}]' fails
    ("<answer>[{'Position': [100, 200, 300, 400], 'Confidence': 0.9</answer>", [PD], False),  # '+}]' closes it
    (f"<answer>[{P}, {Q}", [], True),                       # no </answer>: whole response, double tag, fails
    (f"<answer>[{P}] and more</answer>", [], True),        # text after the list: '...}]' fails
    ("<answer>'No Objects'</answer>", [], True),            # the prompt's own reply does not decode
    ('<answer>["No Objects"]</answer>', [], False),         # a string first item: no detections
    ("<answer>[]</answer>", [], True),                      # [][0] raises
    (f"<answer>[{P}, {item([100, 200, 300, 400], 0.3)}]</answer>", [PD], False),  # duplicate: the first kept
    (f"<answer>[{P}, {item([100.0, 200.0, 300.0, 400.0], 0.3)}]</answer>", [PD], False),  # 100 == 100.0
    (f"<answer>[{item([300, 400, 100, 200], 0.7)}]</answer>", [([60.0, 40.0, -40.0, -20.0], 0.7)], False),  # as given
    (f"<answer>[{P}, {item([1, 2, 3], 0.5)}, {Q}]</answer>", [PD], True),    # a raising item keeps those before
    (f"<answer>[{P}, {{'Position': [500, 500, 700, 900]}}, {Q}]</answer>", [PD], True),  # no Confidence
    (f"<answer>[{P}, 5]</answer>", [], True),              # duplicates are removed before any append
    (f"<answer>[{{'Confidence': 0.9}}, {P}]</answer>", [], True),
    ("<answer>[{'Position': ['100', 200, 300, 400], 'Confidence': 0.9}]</answer>", [], True),
    ("<answer>[{'Position': [100, 200, 300, 400], 'Confidence': 'high'}]</answer>", [(PD[0], "high")], False),
])
def test_det_published_reading(text, dets, failed):
    got, got_failed = common.virft_coco_detections(text, W, H)
    assert got_failed is failed
    assert [(pytest.approx(b), c) for b, c in got] == dets


def test_det_published_reading_nan_confidence():
    got, failed = common.virft_coco_detections("<answer>[{'Position': [0, 0, 10, 10], 'Confidence': NaN}]</answer>",
                                               W, H)
    assert not failed and len(got) == 1 and math.isnan(got[0][1])


def test_det_published_counts_and_coco_rows():
    gt = {"images": [{"id": 7, "width": W, "height": H}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    texts = [f"<answer>[{P}, {item([300, 400, 100, 200], 0.7)}]</answer>",  # 2 dets, one with negative w/h
             "<answer>oops</answer>",                                      # unparsable
             "<think>none</think><answer>'No Objects'</answer>",           # no dets, not unparsable
             f"<answer>[{P}, {item([1, 2, 3], 0.5)}]</answer>",            # partial
             "<answer>[{'Position': [0, 0, 10, 10], 'Confidence': 'high'}]</answer>"]  # unscored
    rows = [{"image_id": 7, "category_id": 1, "text": t} for t in texts]
    dets, counts = ev.virft_to_coco_dets(rows, gt)
    assert counts == {"unparsable": 1, "partial": 1, "unscored": 1}
    assert [d["bbox"] for d in dets] == [pytest.approx(b) for b in (PD[0], [60, 40, -40, -20], PD[0])]
    strict, strict_counts = ev.virft_to_coco_dets(rows, gt, "strict")
    assert strict_counts == {"unparsable": 3, "partial": 0, "unscored": 0}  # a malformed item voids the answer
    assert [d["bbox"] for d in strict] == [pytest.approx(b) for b in (PD[0], PD[0])]


def test_det_published_dets_score_as_pycocotools():
    """Dets the published reading keeps as they are -- reversed corners (negative width and height: area < 0
    or > 0), a NaN score -- give the same twelve numbers as pycocotools."""
    gt = {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 30, 30], "area": 900,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "a"}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [50, 50, -40, -40], "score": 0.95},  # area > 0, IoU 0
            {"image_id": 2, "category_id": 1, "bbox": [80, 50, -30, 30], "score": 0.99},   # area < 0: ignored
            {"image_id": 2, "category_id": 1, "bbox": [50, 50, 30, 30], "score": float("nan")}]
    assert_same(gt, dets)


def test_parser_and_match_flags():
    base = ["--questions", "q", "--predictions", "p", "--out", "r.json"]
    assert ev.parse_args(["--protocol", "virft-det"] + base).parser == "virft"
    assert ev.parse_args(["--protocol", "virft-det", "--parser", "strict"] + base).parser == "strict"
    assert ev.parse_args(["--protocol", "viscot-det"] + base).parser == "viscot"
    for protocol, parser in (("virft-det", "lenient"), ("viscot-det", "virft"), ("virft-cls", "strict")):
        with pytest.raises(SystemExit):
            ev.parse_args(["--protocol", protocol, "--parser", parser] + base)
    assert ev.parse_args(["--protocol", "virft-cls"] + base).match == "virft"
    with pytest.raises(SystemExit):
        ev.parse_args(["--protocol", "virft-det", "--match", "exact"] + base)  # not silently ignored


@pytest.mark.parametrize("protocol,flags,named", [
    ("virft-det", [], "Visual-RFT's published script"), ("virft-det", ["--parser", "strict"], "strict ("),
    ("virft-cls", [], "Visual-RFT's published rule"), ("virft-cls", ["--match", "exact"], "exact (")])
def test_the_report_names_the_rule_it_scored_by(tmp_path, protocol, flags, named):
    """A number read from a report says which rule made it: the published one by default, the strict one
    when asked (and then it says it is not comparable with published numbers)."""
    if protocol == "virft-det":
        questions = tmp_path / "q.json"
        questions.write_text(json.dumps({"images": [{"id": 1, "width": W, "height": H}], "categories": [
            {"id": 1, "name": "a"}], "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50],
                                                      "area": 2500, "iscrowd": 0}]}))
        preds = [{"image_id": 1, "category_id": 1, "text": f"<answer>[{item([0, 0, 100, 100], 0.9)}]</answer>"}]
    else:
        questions = tmp_path / "q.jsonl"
        common.write_jsonl(str(questions), [{"id": "a", "image": "a.png", "problem": "what?",
                                             "solution": "<answer>cat</answer>"}])
        preds = [{"id": "a", "text": "<answer>cat</answer>"}]
    common.write_jsonl(str(tmp_path / "p.jsonl"), preds)
    ev.main(["--protocol", protocol, "--questions", str(questions), "--predictions", str(tmp_path / "p.jsonl"),
             "--out", str(tmp_path / "r.json"), *flags])
    settings = json.loads((tmp_path / "r.json").read_text())["settings"]
    rule = settings["parser" if protocol == "virft-det" else "match"]
    assert named in rule and ("not comparable with published numbers" in rule) == bool(flags)


# ------------------------------------------------------------------------------ detection (rewards)
# Published accuracy_reward_iou / _confidence: the completion's first <answer>(.*?)</answer> (no DOTALL) or
# the whole completion, .strip(), wrapped, then '[['->'[', ']]'->']', '\n'->'' (no ', ...'); extract_bbox as
# above; ground truth extract_bbox(solution.strip()). None or a non-dict first item: 0. remove_duplicates;
# sort by Confidence (reverse, stable); each prediction takes the unmatched gt of highest IoU (strictly
# greater replaces: the first of ties), kept iff IoU > 0.5, else IoU 0. IoU reward: sum / max(#gt, #pred),
# capped at 1; confidence reward: mean of c (matched) or (1 - 0) * (1 - c), clipped to [0, 1]; both loops
# accumulate both sums. Any exception: 0.

GT2 = f"<answer>[{item([0, 0, 100, 100], 1)}, {item([200, 200, 300, 300], 1)}]</answer>"
GT1 = f"<answer>[{item([0, 0, 100, 100], 1)}]</answer>"
A, B = item([0, 0, 100, 100], 0.9), item([200, 200, 300, 300], 0.8)


@pytest.mark.parametrize("text,sol,iou,conf", [
    (f"<answer>[{A}, {B}]</answer>", GT2, 1.0, 0.85),
    (f"<answer>[{A}, {item([0, 0, 100, 100], 0.7)}]</answer>", GT2, 0.5, 0.9),          # duplicate: first kept
    (f"<answer>[{A}, {B}, {item([500, 500, 600, 600], 0.3)}]</answer>", GT2, 2 / 3, (0.9 + 0.8 + 0.7) / 3),
    (f"<answer>[{item([0, 0, 100, 100], 0.3)}, {item([0, 0, 100, 80], 0.9)}]</answer>", GT1, 0.4, 0.8),  # by confidence
    (f"<answer>[{item([0, 0, 100, 50], 0.6)}]</answer>", GT1, 0.0, 0.4),                 # IoU 0.5 is no match
    (f"<answer>[{item([0, 0, 100, 50], 0.9)}, {item([0, 0, 100, 100], 0.8)}]</answer>", GT1, 0.5, 0.45),  # nor takes
    # equal IoUs (0.6 with both gts): the first gt is taken, so the exact box for it finds nothing left
    (f"<answer>[{item([25, 0, 125, 100], 0.9)}, {item([0, 0, 100, 100], 0.8)}]</answer>",
     f"<answer>[{item([0, 0, 100, 100], 1)}, {item([50, 0, 150, 100], 1)}]</answer>", 0.3, 0.55),
    (f"<answer>[[{A}]]</answer>", GT1, 1.0, 0.9),                                         # '[[ ]]' repaired
    (f"[{item([0, 0, 100, 100], 0.5)}, {{'Position': [20", GT1, 1.0, 0.5),                # no tags, cut off
    (f"<answer>[{item([0, 0, 100, 100], 0.5)}, {{'Position': [20", GT1, 0.0, 0.0),         # unclosed <answer>
    (f"<answer>[{A}, {B}</answer>", GT2, 0.5, 0.9),              # unclosed list: B is cut with the tail
    (f"<answer>[{A}</answer>", GT1, 0.0, 0.0),                   # one closed item, list unclosed: nothing
    ("<answer>[{'Position': [0, 0, 100, 100], 'Confidence': 0.9</answer>", GT1, 1.0, 0.9),  # one unclosed item
    (f"<answer>[{A}, ...]</answer>", GT1, 0.0, 0.0),             # ', ...' is not removed in the reward
    (f"<answer>[{A},\n{B}]</answer>", GT2, 0.0, 0.0),            # spans lines: the whole text, double tag
    ("<answer></answer>", GT1, 0.0, 0.0),
    ("<answer>[]</answer>", GT1, 0.0, 0.0),                      # [][0] raises
    (f"<answer>[{A}]</answer>", f"<answer>[{item([0, 0, 100, 100], 1)},\n{item([200, 200, 300, 300], 1)}]</answer>",
     0.5, 0.9),                                                  # the solution is read raw: its newline stays
    ("<answer>No Objects</answer>", "<answer>No Objects</answer>", 0.0, 0.0),
    (f"<answer>['cat', {A}]</answer>", GT1, 0.0, 0.0),           # first item not an object
    (f"<answer>[{A}, 5]</answer>", GT1, 0.0, 0.0),               # an item without Position raises
    (f"<answer>[{item([0, 0, 100, 100], 1.7)}]</answer>", GT1, 1.0, 1.0),                # mean clipped to 1
    (f"<answer>[{item([0, 0, 100, 100], 1.7)}, {item([500, 500, 600, 600], 0.2)}]</answer>", GT1, 0.5, 1.0),
    (f"<answer>[{item([500, 500, 600, 600], 1.7)}]</answer>", GT1, 0.0, 0.0),            # 1 - 1.7 -> 0
    (f"<answer>[{{'Position': [0, 0, 100, 100]}}]</answer>", GT1, 0.0, 0.0),               # no Confidence
    (f"<answer>[{item([0, 0, 100, 100], repr('0.9'))}]</answer>", GT1, 0.0, 0.0),  # a string: both sums fail
    (f"<answer>[{item([0, 0, 100], 0.9)}]</answer>", GT1, 0.0, 0.0),                     # 3 numbers
    (f"<answer>[{item([100, 100, 0, 0], 0.6)}]</answer>", GT1, 0.0, 0.4),                # reversed: IoU 0
    (f"<answer>[{item([100, 0, 200, 100], 0.6)}]</answer>", GT1, 0.0, 0.4),              # touching edges
    (f"<answer>[{A}]</answer>", f"[{item([0, 0, 100, 100], 1)}]", 1.0, 0.9),             # solution without tags
    (f"<answer>[{item([0, 0, 100, 100], 0.2)}]</answer>", "<answer>[]</answer>", 0.0, 0.8),  # nothing to find
])
def test_det_rewards_published(text, sol, iou, conf):
    assert grpo.REWARDS["det_iou"]([text], solution=[sol]) == [pytest.approx(iou)]
    assert grpo.REWARDS["det_confidence"]([text], solution=[sol]) == [pytest.approx(conf)]


def test_det_rewards_nan_confidence_scores_0_not_nan():
    """The published confidence reward would be NaN and poison the batch's advantages; ours is 0. The IoU
    reward stays as published."""
    text = f"<answer>[{item([0, 0, 100, 100], 'NaN')}]</answer>"
    assert grpo.REWARDS["det_iou"]([text], solution=[GT1]) == [1.0]
    assert grpo.REWARDS["det_confidence"]([text], solution=[GT1]) == [0.0]


def test_readings_never_raise():
    for t in ["", "[", "]", "[{", '"', '<answer>[{"a": "\\"}</answer>', "<answer>" + "[" * 5000, None, 123,
              "<answer>[" + "{'Position': [1, 2, 3, 4], 'Confidence': 1}, " * 3 + "</answer>"]:
        common.virft_coco_detections(t, W, H)
        grpo.REWARDS["det_iou"]([t], solution=[GT1])
        grpo.REWARDS["cls_virft"]([t], solution=["cat"])
    json.dumps(common.virft_coco_detections("<answer>[" + "[" * 5000 + "</answer>", W, H))


# ------------------------------------------------------------------ the symbolic check first (--math_verify)
# Published accuracy_reward_iou / _confidence and grpo_classification's accuracy_reward first run
# `answer = parse(content); if float(verify(answer, parse(sol))) > 0: reward = 1.0` (math_verify; any exception:
# go on), and read the text only when that gave 0. parse takes one number out of free text.

DET_SOL = f"<answer>[{item([254, 303, 291, 365], 1)}, {item([500, 500, 600, 600], 1)}]</answer>"


@pytest.mark.parametrize("reward,text,sol,published,without", [
    # a box sharing one number (303) with the solution: parse finds 303 in both
    ("det_iou", f"<think>x</think> <answer>[{item([900, 303, 950, 310], 0.1)}]</answer>", DET_SOL, 1.0, 0.0),
    ("det_confidence", f"<think>x</think> <answer>[{item([900, 303, 950, 310], 0.1)}]</answer>", DET_SOL, 1.0, 0.9),
    ("det_iou", f"<answer>[{item([0, 0, 10, 10], 0.5)}]</answer>", DET_SOL, 0.0, 0.0),  # nothing shared
    ("cls_virft", "<answer>Boeing 747-400</answer>", "<answer>Boeing 747-100</answer>", 1.0, 0.0),  # both 747
    ("cls_virft", "<answer>cat</answer>", "<answer>dog</answer>", 0.0, 0.0),      # no number: text rule alone
    ("cls_virft", "<answer>red fox</answer>", "<answer>Red_Fox</answer>", 1.0, 1.0),
])
def test_math_verify_first_as_published(reward, text, sol, published, without):
    assert grpo.REWARDS[reward]([text], solution=[sol], math_verify=True) == [pytest.approx(published)]
    assert grpo.REWARDS[reward]([text], solution=[sol]) == [pytest.approx(without)]  # the default: text only


def test_math_verify_flag_is_checked():
    base = ["--data", "x", "--model", "x", "--output_dir", "x", "--math_verify"]
    assert grpo.parse_args(base + ["--task", "detection"]).math_verify
    with pytest.raises(SystemExit):  # no reward it applies to
        grpo.parse_args(base + ["--task", "grounding"])
