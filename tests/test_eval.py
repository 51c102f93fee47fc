"""eval.py's protocols: Visual-CoT detection on the real sample files (hand-computed cases), the answer
judges (rule, http against a local server, model), Visual-RFT classification, grounding metrics, the
report and table, and --model end to end."""
import json
import os
import sys

import pytest
from conftest import ROOT, SAMPLES, chat_server, run_script

import common
import eval as ev


def det_rows(name):
    return common.read_jsonl(os.path.join(SAMPLES, f"benchmark_det_{name}.jsonl"))


def args_for(tmp_path, *extra):
    return ev.parse_args(["--protocol", "viscot-det", "--questions", "q", "--predictions", "p",
                          "--out", str(tmp_path / "r.json"), *extra])


# Hand-computed, each on a real sample line. docvqa[0]: 1695x2200 (portrait: the padded square shifts x by
# (2200-1695)//2 = 252), box [74, 398, 404, 1118] -> [326, 398, 656, 1118] / 2200 = [0.148, 0.181, 0.298,
# 0.508]. docvqa[1]: 2156x1695 (landscape: y shifts by 230), a 30x31 box at the right edge [2112, 1623,
# 2142, 1654] -> [0.980, 0.859, 0.994, 0.874]: IoU 0.8998 after 3-decimal rounding. gqa[4]: 500x375, a box
# spanning the whole width [2, 0, 500, 375] -> [0.004, 0.124, 1.000, 0.874].
DET_CASES = [
    ("docvqa", 0, "[0.148, 0.181, 0.298, 0.508]", True, True),
    ("docvqa", 0, "[0.044, 0.181, 0.238, 0.508]", False, True),    # x / w frame, no shift: IoU 0.35
    ("docvqa", 1, "[0.980, 0.859, 0.994, 0.874]", True, True),
    ("docvqa", 1, "[0.980, 0.753, 0.994, 0.767]", False, True),    # y not shifted: no overlap
    ("gqa", 4, "[0.004, 0.124, 1.0, 0.874]", True, True),
    ("gqa", 4, "  [ 0.004,  0.124, 1.0, 0.874 ] ", True, True),    # extra spaces: float() strips them
    ("gqa", 4, "[0.004, 0.124, 1.0, 0.874] .", True, True),       # ' .' is removed
    ("gqa", 4, "[0.004, 0.124, 1.0, 0.874, 0.5]", True, True),     # first four numbers
    ("gqa", 4, "[0.004,0.124,1.0,0.874]", False, False),           # no ', ' separator: unparsable
    ("gqa", 4, "[0.004, 0.124, 1.0, 0.874].", False, False),       # '0.874.' is not a number
    ("gqa", 4, "The region is [0.004, 0.124, 1.0, 0.874]", False, False),
    ("gqa", 4, "[0.1, 0.2, 0.3]", False, False),
    ("gqa", 4, "", False, False),
]


@pytest.mark.parametrize("name,row,text,correct,parsable", DET_CASES)
def test_viscot_det_hand_cases(tmp_path, name, row, text, correct, parsable):
    q = det_rows(name)[row]
    pred = {"question_id": 0, "text": text, "bbox": q["bbox"], "height": q["height"], "width": q["width"]}
    metrics, rows, extra = ev.score_viscot_det([q], [pred], args_for(tmp_path), ("q", "p"))
    assert (metrics["correct"], metrics["unparsable"], metrics["total"]) == (int(correct), int(not parsable), 1)
    assert extra["matched_by"].startswith("prediction lines")


def test_viscot_det_edge_iou_and_lenient_parser(tmp_path):
    q = det_rows("docvqa")[1]
    pred = {"question_id": 0, "text": "[0.980, 0.859, 0.994, 0.874]", "bbox": q["bbox"], "height": 1695,
            "width": 2156}
    _, rows, _ = ev.score_viscot_det([q], [pred], args_for(tmp_path), ("q", "p"))
    # pred [2112.88, 1852.0, 2143.06, 1884.34]; target [2112, 1853, 2142, 1884]
    inter = (2142 - 0.980 * 2156) * (1884 - 1853)
    union = (0.994 - 0.980) * 2156 * (0.874 - 0.859) * 2156 + 30 * 31 - inter
    assert rows[0]["iou"] == pytest.approx(inter / union, rel=1e-5)
    g = det_rows("gqa")[4]
    lenient = args_for(tmp_path, "--parser", "lenient")
    for text in ("[0.004,0.124,1.0,0.874]", "[[0.004, 0.124, 1.0, 0.874]].",
                 "The region is [0.004, 0.124, 1.0, 0.874]"):
        pred = {"question_id": 0, "text": text, "bbox": g["bbox"], "height": 375, "width": 500}
        metrics, _, _ = ev.score_viscot_det([g], [pred], lenient, ("q", "p"))
        assert metrics["correct"] == 1, text


def test_viscot_det_report_join_by_question_id(tmp_path):
    """Predictions without ground truth in them join the questions by question_id; a question with no
    prediction counts as wrong. Report keys and the table come out of the CLI."""
    qpath = os.path.join(SAMPLES, "benchmark_det_gqa.jsonl")
    qs = det_rows("gqa")
    preds = tmp_path / "p.jsonl"
    common.write_jsonl(str(preds), [{"question_id": qs[4]["question_id"], "text": "[0.004, 0.124, 1.0, 0.874]"},
                                    {"question_id": qs[0]["question_id"], "text": "no box"}])
    ev.main(["--protocol", "viscot-det", "--questions", qpath, "--predictions", str(preds),
             "--out", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["accuracy"] == pytest.approx(1 / 6)
    assert (report["correct"], report["total"], report["unparsable"], report["missing"]) == (1, 6, 1, 4)
    assert report["datasets"]["gqa"]["accuracy"] == report["accuracy"]
    assert "Visual-CoT's own" in report["settings"]["parser"]
    # a question_id that is not in the questions file is a data error, not a silent zero
    common.write_jsonl(str(preds), [{"question_id": 123456, "text": "x"}])
    with pytest.raises(common.DataError, match="question_id 123456 is not in"):
        ev.main(["--protocol", "viscot-det", "--questions", qpath, "--predictions", str(preds),
                 "--out", str(tmp_path / "r.json")])


def test_viscot_det_answer_lines_are_counted_against_the_questions_by_box_and_size(tmp_path):
    """Visual-CoT's answer files put question_id 0 on every line: lines are matched to questions by their
    (bbox, width, height), so a complete file has nothing missing or repeated, a short one names how many are
    missing, and a file of another benchmark's answers is refused instead of scored."""
    qs = det_rows("gqa")
    lines = [dict(q, question_id=0, text="[0.1, 0.1, 0.2, 0.2]") for q in qs]
    metrics, _, _ = ev.score_viscot_det(qs, lines, args_for(tmp_path), ("q", "p"))
    assert (metrics["total"], metrics["missing"], metrics["repeated"]) == (len(qs), 0, 0)
    metrics, _, _ = ev.score_viscot_det(qs, lines[1:] + lines[:1] * 2, args_for(tmp_path), ("q", "p"))
    assert (metrics["missing"], metrics["repeated"]) == (0, 1)
    metrics, _, _ = ev.score_viscot_det(qs, lines[2:], args_for(tmp_path), ("q", "p"))
    assert (metrics["missing"], metrics["repeated"]) == (2, 0)
    other = [dict(q, question_id=0, text="x") for q in det_rows("docvqa")]
    with pytest.raises(common.DataError, match=r"p: \d+ prediction lines carry a box and image size no question "
                                               r"of q has .*predictions of another file"):
        ev.score_viscot_det(qs, other, args_for(tmp_path), ("q", "p"))


def test_two_datasets_give_rows_and_mean(tmp_path, capsys):
    paths = []
    for name in ("gqa", "docvqa"):
        p = tmp_path / f"{name}.jsonl"
        q = det_rows(name)[0]
        text = "[0.148, 0.181, 0.298, 0.508]" if name == "docvqa" else "nothing"
        common.write_jsonl(str(p), [dict(q, question_id=0, text=text)])
        paths.append(str(p))
    qs = [os.path.join(SAMPLES, f"benchmark_det_{n}.jsonl") for n in ("gqa", "docvqa")]
    ev.main(["--protocol", "viscot-det", "--questions", *qs, "--predictions", *paths,
             "--out", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["datasets"]["gqa"]["accuracy"] == 0 and report["datasets"]["docvqa"]["accuracy"] == 1
    assert report["mean"]["accuracy"] == 0.5 and report["total"] == 2 and report["correct"] == 1
    table = capsys.readouterr().out
    assert "| gqa | 0.000 | 0 | 1 | 1 |" in table and "| mean | 0.500 | 1 | 2 | 1 |" in table


# ------------------------------------------------------------------------------------------- judges

def answer_args(tmp_path, *extra):
    return ev.parse_args(["--protocol", "viscot-answer", "--questions", "q", "--predictions", "p",
                          "--out", str(tmp_path / "r.json"), *extra])


def test_rule_judges_and_viscot_question_text(tmp_path):
    items = json.load(open(os.path.join(SAMPLES, "benchmark_gqa.json")))[:3]
    preds = [{"question_id": items[0]["question_id"], "text": "The Window."},
             {"question_id": items[1]["question_id"], "text": ""},
             {"question_id": items[2]["question_id"], "text": "something else entirely"}]
    metrics, rows, extra = ev.score_viscot_answer(items, preds, answer_args(tmp_path), ("q", "p"),
                                                  ev.Judge(answer_args(tmp_path)))
    assert extra["judge"] == "rule:exact"
    assert [r["score"] for r in rows] == [1.0, 0.0, 0.0] and metrics["answer_score"] == pytest.approx(1 / 3)
    assert ev.viscot_question_text(items[0]) == "<image>\nWhat are the tree branches in front of?"
    assert common.token_f1("red big square", "big square") == pytest.approx(0.8)
    assert common.anls("squre", "square") == pytest.approx(1 - 1 / 6) and common.anls("abc", "xyz") == 0.0


def test_http_judge_parsing_failures_and_cache(tmp_path):
    calls, flaky_failed = [], set()

    def reply(body):  # by the model's answer in the prompt
        answer = body["messages"][1]["content"].split("model's answer: ")[1].strip()
        calls.append(answer)
        if answer == "fail" or (answer == "flaky" and answer not in flaky_failed):
            flaky_failed.add(answer)
            return 500, None
        return 200, {"good": "Score: 0.7", "over": "score: 1.5", "two": "score: 0.2, no, score: 0.3",
                     "prose": "I think it is fine", "dots": "score: 1.2.3", "flaky": "score: 1"}[answer]

    with chat_server(reply) as url:
        args = answer_args(tmp_path, "--judge", "http", "--judge_url", url, "--judge_model", "fake",
                           "--judge_retries", "1", "--judge_workers", "3")
        answers = ["good", "over", "two", "prose", "dots", "flaky", "fail"]
        triples = [("q", "ref", a) for a in answers]
        verdicts = ev.Judge(args).score(triples)
        assert [v["score"] for v in verdicts] == [0.7, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert [v["status"] for v in verdicts] == ["ok", "ok", "unparsable", "unparsable", "unparsable", "ok",
                                                   "failed"]
        assert ev.judge_summary(verdicts) == {"answer_score": pytest.approx(2.7 / 7), "judge_unparsable": 3,
                                              "judge_failed": 1}
        assert calls.count("flaky") == 2 and calls.count("fail") == 2  # one retry each
        # A rerun (after a kill, say) reads the cached verdicts and asks again only the call that failed.
        n_calls = len(calls)
        assert [v["score"] for v in ev.Judge(args).score(triples)] == [v["score"] for v in verdicts]
        assert calls[n_calls:] == ["fail", "fail"]


def test_a_judge_score_that_ends_a_sentence_is_read():
    assert ev.Judge.parse_score("The answer matches. Score: 0.8.") == 0.8  # published float('0.8.') raises
    assert ev.Judge.parse_score("score: 1.2.3") is None and ev.Judge.parse_score("score: .") is None


def test_model_judge_runs_text_only(toy, tmp_path):
    """A local checkpoint as the judge: text-only prompts through the generation code. The toy model's
    replies are noise, so they must come back as 'unparsable', scored 0."""
    args = answer_args(tmp_path, "--judge", "model", "--judge_model", str(toy / "qwen2-vl"), "--dtype", "fp32")
    verdicts = ev.Judge(args).score([("q", "ref", "a"), ("q2", "ref", "b")])
    assert len(verdicts) == 2 and all(v["score"] == 0.0 and isinstance(v["reply"], str) for v in verdicts)


# ------------------------------------------------------------------------------ virft-cls, grounding

def test_virft_cls(tmp_path):
    records = [{"id": "a", "solution": "<answer>Red_Fox</answer>"}, {"id": "b", "solution": "<answer>cat</answer>"},
               {"id": "c", "answer": "dog"}, {"id": "d", "answer": "owl"}]
    preds = [{"id": "a", "text": "<think>fur</think> <answer>red fox</answer>"},
             {"id": "b", "text": "<answer></answer>"},          # empty: right by the published rule only
             {"id": "c", "text": "a dog"}]                      # no tags: wrong by the published rule
    args = ev.parse_args(["--protocol", "virft-cls", "--questions", "q", "--predictions", "p", "--out", "r.json"])
    metrics, _, _ = ev.score_virft_cls(records, preds, args, ("q", "p"))  # published rule (default)
    assert metrics == {"accuracy": 0.5, "correct": 2, "total": 4, "missing": 1, "unparsable": 1,
                       "empty_answer_correct": 1}
    args.match = "exact"
    metrics, _, _ = ev.score_virft_cls(records, preds, args, ("q", "p"))
    assert metrics == {"accuracy": 0.25, "correct": 1, "total": 4, "missing": 1, "unparsable": 0,
                       "empty_answer_correct": 0}


def test_grounding_metrics(tmp_path):
    args = ev.parse_args(["--protocol", "grounding", "--questions", "q", "--predictions", "p", "--box_format",
                          "qwen2", "--out", str(tmp_path / "r.json")])
    records = [{"id": str(i), "image": "x.png", "question": "q", "bbox": [0, 0, 10, 10], "width": 100,
                "height": 100} for i in range(4)]
    preds = [{"id": "0", "box": [0, 0, 10, 5]},                               # IoU 0.5 (not > 0.5), gIoU 0.5
             {"id": "1", "text": "<answer>(50,0),(150,100)</answer>"},       # [5, 0, 15, 10]: IoU 1/3
             {"id": "2", "text": "no box"}]                                 # unparsable: IoU 0, gIoU -1
    metrics, rows, _ = ev.score_grounding(records, preds, args, ("q", "p"))
    assert [r["iou"] for r in rows] == pytest.approx([0.5, 1 / 3, 0, 0])
    assert metrics["box_acc"] == 0 and metrics["miou"] == pytest.approx((0.5 + 1 / 3) / 4)
    assert metrics["giou"] == pytest.approx((0.5 + 1 / 3 - 1 - 1) / 4)
    assert metrics["ciou"] == pytest.approx((50 + 50) / (100 + 150 + 100 + 100))
    assert metrics["parseable"] == 0.5 and metrics["missing"] == 1


def test_chain_protocol_with_model_end_to_end(toy, tmp_path):
    """One command: infer (resumable, under --predictions_dir) then score; a rerun reuses the predictions."""
    data = str(toy / "data" / "train.jsonl")
    recs = common.read_records(data)[:6]
    common.write_jsonl(str(tmp_path / "six.jsonl"), recs)
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--protocol", "chain", "--questions",
           str(tmp_path / "six.jsonl"), "--image_root", str(toy / "data"), "--model", str(toy / "qwen2-vl"),
           "--out", str(tmp_path / "r.json"), "--max_new_tokens", "8", "--batch_size", "4"]
    out = run_script(*cmd).stdout
    assert "| six | 6 |" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == 6 and 0 <= report["answer_score"] <= 1 and report["settings"]["judge"] == "rule:exact"
    # each questions file's hash, by which tools/compare.py refuses to pair reports of different questions
    assert report["questions"] == {"six": common.file_fingerprint(str(tmp_path / "six.jsonl"))}
    preds = common.read_jsonl(str(tmp_path / "r.predictions" / "chain_six.jsonl"))
    assert [p["id"] for p in preds] == [r["id"] for r in recs] and all("box_text" in p for p in preds)
    raw = tmp_path / "r.predictions" / "chain_six.infer.jsonl"
    before = raw.read_text()
    run_script(*cmd)
    assert raw.read_text() == before  # nothing re-generated
    # Predictions from another model in the same place are refused, not mixed in.
    with pytest.raises(AssertionError, match="were made with other model, weights"):
        run_script(*[c if c != str(toy / "qwen2-vl") else str(toy / "qwen2.5-vl") for c in cmd])


def protocol_questions(protocol, toy, tmp_path):
    """Three toy records in each protocol's own ground-truth format; returns (path, prediction keys)."""
    recs = common.read_records(str(toy / "data" / "train.jsonl"))[:3]
    if protocol == "viscot-det":
        rows = [{"img_path": r["image"], "expression": r["question"], "bbox": r["bbox"], "height": 168,
                 "width": 224, "question_id": i} for i, r in enumerate(recs)]
        keys = {"question_id", "text", "bbox", "height", "width"}
    elif protocol == "viscot-answer":
        prompt = (" Please provide the bounding box coordinate of the region that can help you answer the question"
                  " better.")
        rows = [{"dataset": "toy", "split": "val", "question_id": i,
                 "image": [r["image"], f"{r['image']}###{r['bbox']}"],
                 "conversations": [{"from": "human", "value": "<image>\n" + r["question"] + prompt},
                                   {"from": "gpt", "value": common.box_to_text(r["bbox"], "viscot", 224, 168)},
                                   {"from": "human", "value": "<image>"}, {"from": "gpt", "value": r["answer"]}]}
                for i, r in enumerate(recs)]
        keys = {"question_id", "text", "box_text"}
    elif protocol == "virft-det":
        xywh = [[r["bbox"][0], r["bbox"][1], r["bbox"][2] - r["bbox"][0], r["bbox"][3] - r["bbox"][1]] for r in recs]
        rows = {"images": [{"id": i + 1, "file_name": r["image"], "width": 224, "height": 168}
                           for i, r in enumerate(recs)],
                "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "bbox": b,
                                 "area": b[2] * b[3]} for i, b in enumerate(xywh)],
                "categories": [{"id": 1, "name": "shape"}]}
        keys = {"image_id", "category_id", "text"}
    elif protocol == "virft-cls":
        rows = [{"id": r["id"], "image": r["image"], "problem": r["question"],
                 "solution": f"<answer>{r['answer']}</answer>"} for r in recs]
        keys = {"id", "text"}
    else:  # grounding: our records, the focus step
        rows, keys = recs, {"id", "text", "box"}
    path = tmp_path / ("q.json" if protocol in ("viscot-answer", "virft-det") else "q.jsonl")
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        common.write_jsonl(str(path), rows)
    return str(path), keys


@pytest.mark.parametrize("protocol", ["viscot-det", "viscot-answer", "virft-det", "virft-cls", "grounding"])
def test_every_protocol_runs_a_model_first(toy, tmp_path, protocol):
    """--model on each protocol's own files: infer.py's code answers in the protocol's prediction format,
    one line per question, and the scorer reads it back."""
    qpath, keys = protocol_questions(protocol, toy, tmp_path)
    ev.main(["--protocol", protocol, "--questions", qpath, "--model", str(toy / "qwen2-vl"), "--image_root",
             str(toy / "data"), "--out", str(tmp_path / "r.json"), "--max_new_tokens", "4"])
    preds = common.read_jsonl(str(tmp_path / "r.predictions" / f"{protocol}_q.jsonl"))
    assert len(preds) == 3 and all(keys <= set(p) for p in preds)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["protocol"] == protocol and "q" in report["datasets"]
    if protocol == "viscot-det":  # Visual-CoT's model_cot_det_loader.py asks "<expression lower-cased>. Please ..."
        questions = common.read_jsonl(qpath)
        assert [p["prompt"] for p in preds] == [q["expression"].lower() + "." for q in questions]


def test_several_datasets_keep_the_turn_counts_one_of_them_lacks():
    """Over several questions files the zoom protocol's numbers by turns taken are summed (counts) and averaged
    (scores) over the datasets that have rows of that many turns: kept only where every dataset had them, the
    overall counts fell short of n."""
    one_look = {"n": 3, "answer_score": 0.5, "n_turns_2": 3, "answer_score_turns_2": 0.5, "zoomed": True}
    mixed = {"n": 2, "answer_score": 1.0, "n_turns_1": 1, "answer_score_turns_1": 1.0, "n_turns_2": 1,
             "answer_score_turns_2": 1.0}
    assert ev.mean_over_datasets({"a": one_look, "b": mixed}) == {
        "n": 5, "answer_score": 0.75, "n_turns_2": 4, "answer_score_turns_2": 0.75, "n_turns_1": 1,
        "answer_score_turns_1": 1.0}


def test_a_predicted_box_is_clamped_to_the_image_as_a_box_read_from_text_is():
    """A `box` field past the image is clamped to it (a finite one of 1e308 made the gIoU NaN, which the JSON
    report cannot hold); one wholly outside, or not a box, is unparsable."""
    args = ev.parse_args(["--protocol", "grounding", "--questions", "q", "--predictions", "p", "--out", "r.json"])
    rec = {"id": "a", "width": 224, "height": 168, "bbox": [0, 0, 112, 84]}
    assert ev.predicted_box({"box": [0, 0, 1e308, 1e308]}, rec, args) == [0, 0, 224, 168]
    assert ev.predicted_box({"box": [300, 200, 400, 300]}, rec, args) is None
    assert ev.predicted_box({"box": [-5, 0, 10, 10]}, rec, args) is None  # negative: not a pixel box
    metrics, _ = ev.box_metrics([(ev.predicted_box({"box": [0, 0, 1e308, 1e308]}, rec, args), rec["bbox"])])
    assert metrics["giou"] == pytest.approx(0.25) and json.dumps(metrics, allow_nan=False)
