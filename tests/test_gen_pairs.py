"""gen_pairs.py (diversity controller, judges, output and resume after a real kill, ranks, bad input) and
filter_pairs.py (each rule, ties, missing scores). The learning side (an SFT model's pairs prefer boxes that
cover the object) is in test_learning.py, where an SFT model exists."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import ROOT, chat_server, run_script
from PIL import Image

import common
import filter_pairs
import gen_pairs

# ---------------------------------------------------------------------------------- diversity control


@pytest.mark.parametrize("seed", range(5))
def test_random_box_never_overlaps_and_keeps_its_size(seed):
    rng = random.Random(seed)
    made = 0
    for _ in range(300):
        w, h = rng.randint(20, 900), rng.randint(20, 900)
        x1, y1 = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
        first = [x1, y1, rng.uniform(x1 + 1, w), rng.uniform(y1 + 1, h)]
        tries = rng.choice([1, 20, 100])
        box = gen_pairs.random_box(first, w, h, rng, 0.4, 0.1, 20, tries)
        if box is None:
            continue
        made += 1
        assert not gen_pairs.overlaps(box, first) and common.box_iou(box, first) == 0
        assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
        widest = 0.4 + 0.1 * ((tries - 1) // 20)  # the band at the last try allowed
        for side, first_side in ((box[2] - box[0], first[2] - first[0]), (box[3] - box[1], first[3] - first[1])):
            assert first_side * (1 - widest) - 1e-9 <= side <= first_side * (1 + widest) + 1e-9
    assert made > 100  # most boxes leave room for another


def test_random_box_widens_its_band_and_gives_up():
    rng = random.Random(0)
    # A box covering the whole image leaves no room: None after the try limit, never an overlapping box.
    assert gen_pairs.random_box([0, 0, 100, 80], 100, 80, rng, tries=100) is None
    # 60 % of the width: a same-size box cannot fit beside it; one 40 % narrower (band 0.4) just can.
    first = [0, 0, 60, 100]
    boxes = [gen_pairs.random_box(first, 100, 100, rng, 0.4, 0.1, 20, 100) for _ in range(50)]
    assert all(b is None or b[0] >= 60 for b in boxes) and any(b is not None for b in boxes)


@pytest.mark.parametrize("reply,score", [
    ('{"score": 0.8}', 0.8), ("```json\n{\"score\": 1}\n```", 1.0), ("{'score': 0.25}", 0.25),
    ("The score is: 0.5 overall", 0.5), ("0.3", 0.3), ('{"score": 1.7}', 1.0), ('{"score": -2}', 0.0),
    ("I cannot judge this.", None), ("", None), (None, None), ('{"points": 0.9}', None),
    ("score: 0.8.", 0.8), ('{"score": 1e-1}', 0.1), ('{"score": "0.8"}', 0.8), ('{"score": .5}', 0.5),
    ("score: 8/10", None), ("Score 3 out of 5", None),
])
def test_parse_judge_score(reply, score):
    assert gen_pairs.parse_score(reply) == score


def test_coverage():
    assert gen_pairs.coverage([0, 0, 10, 10], [5, 5, 15, 15]) == 0.25
    assert gen_pairs.coverage([0, 0, 100, 100], [5, 5, 15, 15]) == 1.0
    assert gen_pairs.coverage([50, 50, 60, 60], [5, 5, 15, 15]) == 0.0


# -------------------------------------------------------------------------------------------- filter

def cand(s_R, s_B, tag="box"):
    return {"s_R": s_R, "s_B": s_B, "box_text": tag, "answer": tag, "crop": [0, 0, 1, 1], "box": [0, 0, 1, 1]}


FILTER = SimpleNamespace(answer_high=0.8, answer_low=0.2, box_high=0.8, box_low=0.2)


@pytest.mark.parametrize("cands,expected", [
    ([cand(1, 0.9, "a"), cand(0, 0.1, "b")], ("a", "b")),
    ([cand(0.8, 0.8, "a"), cand(0.2, 0.2, "b")], ("a", "b")),                       # thresholds inclusive
    ([cand(0, 0.1, "r1"), cand(1, 0.5, "x"), cand(1, 0.9, "c1"), cand(1, 1.0, "c2"), cand(0, 0.0, "r2")],
     ("c1", "r1")),                                                                  # ties: the first qualifying
    ([cand(None, 0.9, "a"), cand(1, None, "b"), cand(1, 0.9, "c"), cand(0, 0, "d")], ("c", "d")),  # nulls ignored
    ([cand(1, 0.9, "a"), cand(0, 0.1, " "), cand(0, 0.1, "b")], ("a", "b")),        # an empty box text: no side
    ([cand(1, 0.9, "a"), cand(0, 0.1, "")], "min_answer_above_low"),
    ([cand(None, None), cand(1, None)], "no_scored_candidates"),
    ([], "no_scored_candidates"),
    ([cand(0.7, 0.9), cand(0, 0)], "max_answer_below_high"),
    ([cand(1, 0.9), cand(0.3, 0)], "min_answer_above_low"),
    ([cand(1, 0.5), cand(0, 0)], "no_chosen_with_box_high"),
    ([cand(1, 0.9), cand(0, 0.5)], "no_rejected_with_box_low"),
])
def test_select_pair_rules(cands, expected):
    pair, rule = filter_pairs.select_pair(cands, FILTER)
    if isinstance(expected, tuple):
        assert (pair[0]["box_text"], pair[1]["box_text"]) == expected and rule is None
    else:
        assert pair is None and rule == expected


def test_no_spread_rule_with_overlapping_thresholds():
    args = SimpleNamespace(answer_high=0.5, answer_low=0.5, box_high=0.8, box_low=0.2)
    assert filter_pairs.select_pair([cand(0.5, 0.9), cand(0.5, 0.1)], args) == (None, "no_answer_spread")


def test_filter_cli_table_pairs_and_grpo_records(tmp_path, capsys):
    base = {"image": "x.png", "question": "q?", "answer": "ref", "width": 10, "height": 10, "bbox": [0, 0, 5, 5]}
    lines = [dict(base, id="keep", candidates=[cand(1, 0.9, "good"), cand(0, 0.1, "bad")]),
             dict(base, id="flat", candidates=[cand(1, 0.9), cand(1, 0.9)]),
             dict(base, id="none", candidates=[cand(None, None)])]
    common.write_jsonl(str(tmp_path / "c.jsonl"), lines)
    filter_pairs.main(["--candidates", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "p.jsonl"),
                       "--grpo_out", str(tmp_path / "g.jsonl")])
    out = capsys.readouterr().out
    assert "| no_scored_candidates | 1 |" in out and "| min_answer_above_low | 1 |" in out
    assert "3 questions -> 1 pairs" in out
    (pair,) = common.read_jsonl(str(tmp_path / "p.jsonl"))
    assert (pair["id"], pair["chosen_box_text"], pair["rejected_answer"]) == ("keep", "good", "bad")
    assert set(pair) >= {"image", "question", "answer", "chosen_answer", "rejected_box_text", "chosen_crop"}
    grpo = common.read_jsonl(str(tmp_path / "g.jsonl"))
    assert [g["id"] for g in grpo] == ["keep", "flat", "none"] and grpo[0]["solution"] == "<answer>ref</answer>"
    common.write_jsonl(str(tmp_path / "bad.jsonl"), [{"id": "x"}])
    with pytest.raises(common.DataError, match=r"bad.jsonl:1: not a gen_pairs.py line"):
        filter_pairs.main(["--candidates", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "p2.jsonl")])


# -------------------------------------------------------------------------------------------- judges

def judge_items(answers):
    rec = {"id": "r", "question": "What shape?", "answer": "circle"}
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    return [(rec, image, {"answer": a, "crop": [0, 0, 32, 24], "status": "ok", "s_R": None, "s_B": None})
            for a in answers]


def test_http_judge_scores_and_survives_failures():
    def reply(body):  # by the model's answer in the prompt: well-formed, fenced, malformed, a server error
        content = body["messages"][0]["content"]
        assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
        text = content[1]["text"]
        if "Model's answer: fail" in text:
            return 503, None
        if "Model's answer:" not in text:
            return 200, '{"score": 0.6}'  # the box judge
        return 200, {"good": '{"score": 0.9}', "fenced": '```json\n{"score": 1}\n```',
                     "junk": "no idea"}[text.split("Model's answer: ")[1].strip()]

    with chat_server(reply) as url:
        args = gen_pairs.parse_args(["--model", "m", "--data", "d", "--out", "o", "--judge", "http", "--judge_url",
                                     url, "--judge_model", "judge", "--judge_retries", "1", "--judge_workers", "4"])
        items = judge_items(["good", "fenced", "junk", "fail"])
        gen_pairs.Judge(args, None, None).score(items)
    cands = [c for _, _, c in items]
    assert [c["s_R"] for c in cands] == [0.9, 1.0, None, None]
    assert [c["s_B"] for c in cands] == [0.6, 0.6, 0.6, 0.6]
    assert [c["status"] for c in cands] == ["ok", "ok", "judge_unparsable", "judge_failed"]
    assert "HTTP 503" in cands[3]["judge_replies"]["s_R"]


def test_rule_judge_without_a_box_asks_the_crop(toy):
    model, processor = common.load_model(str(toy / "qwen2-vl")).eval(), common.load_processor(str(toy / "qwen2-vl"))
    args = gen_pairs.parse_args(["--model", "m", "--data", "d", "--out", "o", "--max_new_tokens", "6"])
    items = judge_items(["Circle.", "square"])
    boxed = {"id": "b", "question": "q", "answer": "circle", "bbox": [0, 0, 16, 12]}
    items.append((boxed, items[0][1], {"answer": "circle", "box": [0, 0, 32, 24], "crop": [0, 0, 32, 24],
                                       "status": "ok"}))
    gen_pairs.Judge(args, model, processor).score(items)
    cands = [c for _, _, c in items]
    assert [c["s_R"] for c in cands] == [1.0, 0.0, 1.0]
    assert cands[2]["s_B"] == 0.25  # an annotated box: its IoU with the candidate's box (SPEC 4.2)
    assert all(isinstance(c["crop_only_answer"], str) and 0 <= c["s_B"] <= 1 for c in cands[:2])
    # --box_score coverage: the annotated box's share inside the crop, all of it here
    args = gen_pairs.parse_args(["--model", "m", "--data", "d", "--out", "o", "--box_score", "coverage"])
    item = (boxed, items[0][1], {"answer": "circle", "box": [0, 0, 32, 24], "crop": [0, 0, 32, 24], "status": "ok"})
    gen_pairs.Judge(args, model, processor).score([item])
    assert item[2]["s_B"] == 1.0


def test_model_judge_replies_are_parsed_not_fatal(toy):
    model, processor = common.load_model(str(toy / "qwen2-vl")).eval(), common.load_processor(str(toy / "qwen2-vl"))
    args = gen_pairs.parse_args(["--model", "m", "--data", "d", "--out", "o", "--judge", "model", "--judge_model",
                                 str(toy / "qwen2-vl"), "--dtype", "fp32"])
    items = judge_items(["circle"])
    gen_pairs.Judge(args, model, processor).score(items)
    cand = items[0][2]
    assert cand["status"] == "judge_unparsable" and cand["s_R"] is None  # a random model writes no score
    assert isinstance(cand["judge_replies"]["s_R"], str) and isinstance(cand["judge_replies"]["s_B"], str)


# ------------------------------------------------------------------------------------- runs and resume

def gen_cmd(toy, data, out, *extra):
    return [sys.executable, os.path.join(ROOT, "gen_pairs.py"), "--model", str(toy / "qwen2-vl"), "--data", data,
            "--image_root", str(toy / "data"), "--out", out, "--max_new_tokens", "6", "--attempts", "2",
            "--batch_size", "2", *extra]


def test_output_lines_bad_image_and_ranks(toy, tmp_path):
    recs = common.read_records(str(toy / "data" / "train.jsonl"))[:5]
    recs[2] = dict(recs[2], image="images/missing.png")
    data = str(tmp_path / "five.jsonl")
    common.write_jsonl(data, recs)
    out = str(tmp_path / "c.jsonl")
    # Two ranks without torch.distributed: each takes every 2nd question; rank 0 merges when both are done. Each
    # gets --local_rank=r, as the deepspeed launcher adds it.
    procs = [subprocess.Popen(gen_cmd(toy, data, out) + [f"--local_rank={r}"], cwd=ROOT,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    # Rank 1 exits 0 (an early non-zero exit would make torchrun stop rank 0); rank 0, after merging, exits 1
    # naming the list of questions it could not answer.
    errs = [p.communicate()[1] for p in procs]  # no time bound: a loaded machine is slower, not broken
    for p, rc, err in zip(procs, (0, 1), errs):
        assert p.returncode == rc, err[-3000:]
    assert "1 question(s) not answered" in errs[1]
    rows = common.read_jsonl(out)
    assert [r["id"] for r in rows] == [recs[i]["id"] for i in (0, 1, 3, 4)]  # data order, the bad one skipped
    assert [e["id"] for e in common.read_jsonl(out + ".errors.jsonl")] == [recs[2]["id"]]
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f]  # shards merged and removed
    for row in rows:
        assert len(row["candidates"]) + len(row["dropped"]) == 4  # 2 attempts x 2
        for c in row["candidates"]:
            # A random model writes no box: kept, scored 0, counted.
            assert c["status"] == "unparsable_box" and c["box"] is None and c["s_R"] == c["s_B"] == 0.0
    # The image mended, a rerun on both ranks answers only that question; the merged list of errors goes.
    common.write_jsonl(data, common.read_records(str(toy / "data" / "train.jsonl"))[:5])
    procs = [subprocess.Popen(gen_cmd(toy, data, out), cwd=ROOT, env=dict(os.environ, RANK=str(r), WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    for p in procs:
        err = p.communicate()[1]
        assert p.returncode == 0, err[-3000:]
    assert [r["id"] for r in common.read_jsonl(out)] == [r["id"] for r in recs]
    assert common.read_jsonl(out)[:2] == rows[:2] and not os.path.exists(out + ".errors.jsonl")


def test_kill_and_resume_loses_nothing(toy, tmp_path):
    recs = common.read_records(str(toy / "data" / "train.jsonl"))[:12]
    data = str(tmp_path / "twelve.jsonl")
    common.write_jsonl(data, recs)
    out = str(tmp_path / "c.jsonl")
    p = subprocess.Popen(gen_cmd(toy, data, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and (not os.path.exists(out) or len(open(out).readlines()) < 4):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = [r["id"] for r in common.read_jsonl(out)] if open(out).read().endswith("\n") else None
    assert 4 <= len(open(out).readlines()) < 12, "the kill did not land mid-run"
    result = run_script(*gen_cmd(toy, data, out))
    assert "already done" in result.stdout
    ids = [json.loads(line)["id"] for line in open(out)]  # every line parses: no torn line left
    assert sorted(ids) == sorted(r["id"] for r in recs) and len(ids) == len(set(ids))
    if before is not None:
        assert ids[:len(before)] == before  # what was written before the kill is kept as it was


def test_each_image_goes_through_the_vision_tower_once_per_batch(toy):
    """3 questions x 2 attempts x 2 boxes = 12 sampled sequences, but one vision call on 3 images."""
    model, processor = common.load_model(str(toy / "qwen2-vl")).eval(), common.load_processor(str(toy / "qwen2-vl"))
    recs = common.read_records(str(toy / "data" / "train.jsonl"))[:3]
    images = [common.load_image(r, str(toy / "data")) for r in recs]
    calls = []

    def count_images(module, args, kwargs, output):
        calls.append((kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]).shape[0])

    hook = model.model.visual.register_forward_hook(count_images, with_kwargs=True)
    try:
        args = gen_pairs.parse_args(["--model", "m", "--data", "d", "--out", "o", "--attempts", "2",
                                     "--max_new_tokens", "6"])
        per_question, _ = gen_pairs.candidates_for_batch(model, processor, recs, images, args, random.Random(0))
    finally:
        hook.remove()
    assert sum(len(c) for c in per_question) == 12
    assert calls == [3]  # one call, three images (the untrained model's boxes do not parse: no crops to encode)
