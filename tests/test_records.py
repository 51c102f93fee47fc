"""Records: JSONL errors name file and line, images name the record; Visual-CoT converters on the real samples."""
import json
import os
import random
import re
import subprocess
import sys

import pytest
from conftest import SAMPLES, run

import common
from common import DataError


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


GOOD = {"id": "a", "image": "x.png", "question": "q?", "answer": "yes", "bbox": [1, 2, 3, 4]}


def test_malformed_line_names_file_and_line(tmp_path):
    f = write(tmp_path / "r.jsonl", [json.dumps(GOOD), "", '{"id": "b", "image": ', json.dumps(GOOD)])
    with pytest.raises(DataError, match=r"r\.jsonl:3: not valid JSON"):
        common.read_records(f)
    f = write(tmp_path / "s.jsonl", [json.dumps(GOOD), "[1, 2]"])
    with pytest.raises(DataError, match=r"s\.jsonl:2: expected a JSON object"):
        common.read_jsonl(f)


@pytest.mark.parametrize("change,message", [
    ({"bbox": [5, 2, 3, 4]}, r"r\.jsonl:2: record 'b': bbox \[5, 2, 3, 4\] is degenerate"),
    ({"bbox": [1, 2, 3, 2]}, r"is degenerate"),
    ({"bbox": [1, 2, 3]}, r"bbox must be \[x1, y1, x2, y2\] finite numbers"),
    ({"bbox": [1, 2, float("nan"), 4]}, r"bbox must be"),
    ({"bbox": [1, 2, True, 4]}, r"bbox must be"),
    ({"bbox": [-5, 2, 3, 4]}, r"bbox \[-5, 2, 3, 4\] lies outside the image \(negative coordinates\)"),
    ({"bbox": [1, 2, 300, 4], "width": 224, "height": 168}, r"bbox \[1, 2, 300, 4\] lies outside the 224x168 image"),
    ({"question": ""}, r"r\.jsonl:2: field 'question'"),
    ({"answer": None}, r"field 'answer'"),
    ({"width": -3}, r"width must be a positive integer"),
    ({"height": True}, r"height must be a positive integer"),
    ({"id": "a"}, r"r\.jsonl:2: duplicate id 'a' \(first at .*r\.jsonl:1\)"),
])
def test_invalid_records(tmp_path, change, message):
    bad = {**GOOD, "id": "b", **change}
    f = write(tmp_path / "r.jsonl", [json.dumps(GOOD), json.dumps(bad)])
    with pytest.raises(DataError, match=message):
        common.read_records(f)


def test_a_box_may_touch_the_edge_within_a_pixel_of_rounding(tmp_path):
    f = write(tmp_path / "r.jsonl", [json.dumps(dict(GOOD, bbox=[-0.5, 0, 224.6, 168], width=224, height=168))])
    assert common.read_records(f)[0]["bbox"] == [-0.5, 0, 224.6, 168]


def test_text_that_is_not_utf8_empty_files_and_byte_order_marks(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" +
                                            json.dumps(dict(GOOD, id="b", question="caf\u00e9?")).encode("utf-8")
                                            .replace(b"\\u00e9", b"\xe9") + b"\n")
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte b'\\xe9' at column"):
        common.read_records(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records \(the file is empty\)"):
        common.read_records(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert common.read_records(str(tmp_path / "bom.jsonl"))[0]["id"] == "a"


def test_records_are_checked_against_their_real_image(tmp_path):
    from PIL import Image
    Image.new("RGB", (30, 20)).save(tmp_path / "x.png")
    with pytest.raises(DataError, match=r"record 'a': width/height 40x20 disagree with its image .*x\.png' \(30x20\)"):
        common.image_size(dict(GOOD, width=40, height=20), str(tmp_path))
    with pytest.raises(DataError, match=r"record 'a': bbox \[1, 2, 33, 4\] lies outside the 30x20 image"):
        common.load_image(dict(GOOD, bbox=[1, 2, 33, 4]), str(tmp_path))
    # check_images decodes every file in full: a PNG cut short passes the header read, not the decode.
    Image.new("RGB", (300, 200), "red").save(tmp_path / "big.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "big.png").read_bytes()[:200])
    cut = dict(GOOD, id="cut", image="cut.png")
    assert common.image_size(cut, str(tmp_path)) == (300, 200)
    with pytest.raises(DataError, match=r"record 'cut': cannot load image .*cut\.png"):
        common.check_images([GOOD, cut], str(tmp_path))
    assert common.check_images([GOOD, GOOD], str(tmp_path)) == [(30, 20), (30, 20)]


def test_detection_records_may_lack_answer(tmp_path):
    f = write(tmp_path / "r.jsonl", [json.dumps(dict(GOOD, answer=""))])
    assert common.read_records(f, need_answer=False)[0]["answer"] == ""
    with pytest.raises(DataError):
        common.read_records(f)


def test_extra_fields_carried(tmp_path):
    f = write(tmp_path / "r.jsonl", [json.dumps(dict(GOOD, source="web", meta={"k": 1}))])
    assert common.read_records(f)[0]["meta"] == {"k": 1}


def test_missing_and_corrupt_image_name_the_record(tmp_path):
    with pytest.raises(DataError, match=r"record 'a': cannot load image .*x\.png"):
        common.load_image(GOOD, str(tmp_path))
    (tmp_path / "x.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"record 'a': cannot load image"):
        common.load_image(GOOD, str(tmp_path))
    with pytest.raises(DataError, match=r"record 'a'"):
        common.image_size(GOOD, str(tmp_path))


def test_image_root_and_absolute_paths(tmp_path):
    from PIL import Image
    Image.new("RGB", (30, 20)).save(tmp_path / "x.png")
    assert common.load_image(GOOD, str(tmp_path)).size == (30, 20)
    assert common.image_size(dict(GOOD, image=str(tmp_path / "x.png")), "/nonexistent") == (30, 20)


def test_write_jsonl_round_trip(tmp_path):
    rows = [GOOD, dict(GOOD, id="ü", question="naïve?")]
    common.write_jsonl(str(tmp_path / "o.jsonl"), rows)
    assert common.read_jsonl(str(tmp_path / "o.jsonl")) == rows


def run_convert(*argv):
    """tools/convert_viscot.py as a command, forked from the fork server (torch already imported)."""
    p = run("tools/convert_viscot.py", *map(str, argv))
    return subprocess.CompletedProcess(argv, p.rc, p.stdout, p.stderr)


def convert(tmp_path, *argv):
    out = str(tmp_path / f"out{len(list(tmp_path.glob('out*.jsonl')))}.jsonl")
    run = run_convert(*argv, "--out", out)
    assert run.returncode == 0, run.stderr
    return common.read_jsonl(out)


def test_convert_benchmark_round_trips_box_text(tmp_path):
    bench = os.path.join(SAMPLES, "benchmark_gqa.json")
    records = convert(tmp_path, "--format", "benchmark", "--input", bench,
                      "--sizes", os.path.join(SAMPLES, "benchmark_det_gqa.jsonl"))
    with open(bench) as f:
        items = json.load(f)
    assert len(records) == len(items)
    for rec, item in zip(records, items):
        assert rec["bbox"] == json.loads(item["image"][1].split("###")[1])
        assert rec["answer"] == item["conversations"][3]["value"]
        assert not rec["question"].endswith("better.") and "<image>" not in rec["question"]
        # The pixel box written back in Visual-CoT's padded-square frame is exactly the file's box text.
        assert common.box_to_text(rec["bbox"], "viscot", rec["width"], rec["height"]) == item["conversations"][1]["value"]
    assert records[0]["id"] == "gqa-7" and records[0]["question"] == "What are the tree branches in front of?"


def test_convert_benchmark_without_sizes(tmp_path):
    records = convert(tmp_path, "--format", "benchmark", "--input", os.path.join(SAMPLES, "benchmark_textvqa.json"))
    assert all("width" not in r and len(r["bbox"]) == 4 for r in records)


def test_convert_benchmark_accepts_small_boxes_on_large_pages_as_visual_cot_writes_them():
    """Visual-CoT's tools/convert_data_to_llava_format.py writes a benchmark item's pixel box with %d and its
    text from the float box shifted into the padded square by an integer division, to 3 decimals of max(w, h):
    on a 2156 px page a 30 px text line's two forms part by 2 px. Every such item converts, its box kept."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import convert_viscot
    rng = random.Random(0)
    for k in range(500):
        w, h = rng.choice([(2156, 1695), (1695, 2200), (1653, 2339), (500, 374)])
        bw, bh = rng.randint(20, 400), rng.randint(10, 40)
        x, y = rng.randint(0, w - bw) + rng.random(), rng.randint(0, h - bh) + rng.random()
        box = [x, y, min(x + bw, w), min(y + bh, h)]
        side, shift = max(w, h), abs(w - h) // 2
        square = [box[0], box[1] + shift, box[2], box[3] + shift] if w > h else \
            [box[0] + shift, box[1], box[2] + shift, box[3]]
        item = {"dataset": "docvqa", "split": "val", "question_id": k,
                "image": ["cot/docvqa/a.png", "cot/docvqa/a.png###[%d, %d, %d, %d]" % tuple(box)],
                "conversations": [{"from": "human", "value": "<image>\nq?" + convert_viscot.BOX_PROMPT},
                                  {"from": "gpt", "value": "[%0.3f, %0.3f, %0.3f, %0.3f]" % tuple(v / side for v in square)},
                                  {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}
        [(_, rec)] = convert_viscot.convert_benchmark([item], {k: (w, h)}, None, "x.json")
        assert rec["bbox"] == [int(v) for v in box]


def test_convert_benchmark_rejects_inconsistent_box(tmp_path):
    with open(os.path.join(SAMPLES, "benchmark_gqa.json")) as f:
        items = json.load(f)
    items[0]["conversations"][1]["value"] = "[0.1, 0.1, 0.2, 0.2]"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(items))
    p = run_convert("--format", "benchmark", "--input", str(bad), "--out", str(tmp_path / "o.jsonl"),
                    "--sizes", os.path.join(SAMPLES, "benchmark_det_gqa.jsonl"))
    assert p.returncode == 1 and re.fullmatch(r"convert_viscot\.py: error: .*bad\.json\[0\]: box text .* disagrees "
                                              r"with pixel box .*\n", p.stderr), p.stderr
    assert not os.path.exists(tmp_path / "o.jsonl")


def test_convert_answers_bad_input_with_one_line_and_writes_nothing(tmp_path):
    """Each malformed input, and each misuse of --out, exits 1 with one line naming the file and the item (list
    index for a benchmark file, line for JSONL), and leaves no output."""
    with open(os.path.join(SAMPLES, "benchmark_gqa.json")) as f:
        items = json.load(f)
    sizes = os.path.join(SAMPLES, "benchmark_det_gqa.jsonl")
    with open(sizes) as f:
        det_row = json.loads(f.readline())
    train_row = {"question": "q", "answer": "a", "image": "i.jpg", "width": 100, "height": 50, "dataset": "d",
                 "bboxs": [[10, 5, 20, 15]]}

    def bench_with(change):
        bad = json.loads(json.dumps(items))
        change(bad)
        return json.dumps(bad)

    def set_(key_path, value):
        def change(bad):
            target = bad
            for key in key_path[:-1]:
                target = target[key]
            target[key_path[-1]] = value
        return change

    cases = [  # (format, input file text, extra flags, what the one line must say)
        ("benchmark", None, [], r"--input .*absent\.json: No such file"),
        ("benchmark", '{"image": ', [], r".*in\.json: not a JSON file"),
        ("benchmark", "[]", [], r".*in\.json: expected a non-empty JSON list"),
        ("benchmark", bench_with(lambda b: b[1].pop("conversations")), [],
         r".*in\.json\[1\]: not a Visual-CoT benchmark item .*KeyError: 'conversations'"),
        ("benchmark", bench_with(set_([2, "image", 1], "x.jpg")), [],
         r".*in\.json\[2\]: image\[1\] has no '###\[x1, y1, x2, y2\]' box: 'x\.jpg'"),
        ("benchmark", bench_with(set_([0, "image", 1], "x.jpg###[1, 2, 3, x]")), [],
         r".*in\.json\[0\]: not a Visual-CoT benchmark item .*\(JSONDecodeError"),
        ("benchmark", bench_with(lambda b: b.append(b[0])), [], r".*in\.json\[%d\]: duplicate id" % len(items)),
        ("benchmark", bench_with(set_([0, "image", 1], items[0]["image"][0] + "###[0, 0, 100000, 10]")),
         ["--sizes", sizes], r".*in\.json\[0\]: bbox \[0, 0, 100000, 10\] lies outside the \d+x\d+ image"),
        ("benchmark", json.dumps(items), ["--sizes", str(tmp_path / "no_sizes.jsonl")],
         r".*no_sizes\.jsonl: no such file"),
        ("benchmark", bench_with(set_([0, "question_id"], [1])), [],
         r".*in\.json\[0\]: not a Visual-CoT benchmark item .*TypeError: question_id \[1\] is not a string or integer"),
        ("benchmark", json.dumps(items), ["--sizes", str(tmp_path / "listed.jsonl")],
         r".*listed\.jsonl:1: not a Visual-CoT benchmark_det row .*TypeError: question_id \[1\]"),
        ("det", json.dumps(dict(det_row, question_id=[1])) + "\n", [],
         r".*in\.json:1: not a Visual-CoT benchmark_det row .*TypeError: question_id \[1\]"),
        ("det", json.dumps({k: v for k, v in det_row.items() if k != "img_path"}) + "\n", [],
         r".*in\.json:1: not a Visual-CoT benchmark_det row .*KeyError: 'img_path'"),
        ("det", json.dumps(det_row) + "\n" + json.dumps(dict(det_row, bbox=[5, 5, 1, 1])) + "\n", [],
         r".*in\.json:2: record .*: bbox \[5, 5, 1, 1\] is degenerate"),
        ("train", json.dumps(dict(train_row, bboxs=[])) + "\n", [],
         r".*in\.json:1: not a Visual-CoT training row .*ValueError"),
        ("train", "\n" + json.dumps(train_row)[:-1] + "\n", [], r".*in\.json:2: not valid JSON"),
        ("train", "", [], r".*in\.json: no records \(the file is empty\)"),
    ]
    (tmp_path / "listed.jsonl").write_text(json.dumps(dict(det_row, question_id=[1])) + "\n")
    for fmt, text, flags, message in cases:
        source = tmp_path / ("absent.json" if text is None else "in.json")
        if text is not None:
            source.write_text(text)
        out = tmp_path / "o.jsonl"
        run = run_convert("--format", fmt, "--input", str(source), "--out", str(out), *flags)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert re.fullmatch(r"convert_viscot\.py: error: " + message + r".*\n", run.stderr), (message, run.stderr)
        assert not out.exists()
    (tmp_path / "in.json").write_text(json.dumps(train_row) + "\n")
    assert run_convert("--format", "train", "--input", str(tmp_path / "in.json"), "--out", str(out)).returncode == 0
    run = run_convert("--format", "train", "--input", str(tmp_path / "in.json"), "--out", str(out))
    assert run.returncode == 1 and re.fullmatch(r"convert_viscot\.py: error: --out .*o\.jsonl exists: --overwrite "
                                                r"replaces it.*\n", run.stderr), run.stderr
    run = run_convert("--format", "train", "--input", str(tmp_path / "in.json"), "--out", str(tmp_path / "in.json"))
    assert run.returncode == 1 and "is also an input of this run" in run.stderr
    assert json.loads((tmp_path / "in.json").read_text()) == train_row


def test_convert_det(tmp_path):
    records = convert(tmp_path, "--format", "det", "--input", os.path.join(SAMPLES, "benchmark_det_docvqa.jsonl"))
    assert records[1]["id"] == "docvqa-1" and records[1]["bbox"] == [2112, 1623, 2142, 1654]
    assert (records[1]["width"], records[1]["height"]) == (2156, 1695) and records[1]["answer"] == ""


def test_convert_train_unions_boxes(tmp_path):
    src = os.path.join(SAMPLES, "vsr_cot_train.jsonl")
    records = convert(tmp_path, "--format", "train", "--input", src, "--image_prefix", "cot/vsr/")
    raw = common.read_jsonl(src)
    for rec, row in zip(records, raw):
        bs = row["bboxs"]
        assert rec["bbox"] == [min(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs), max(b[3] for b in bs)]
        assert rec["image"] == "cot/vsr/" + row["image"] and rec["answer"] == row["answer"]
    multi = {"question": "q", "answer": "a", "image": "i.jpg", "width": 100, "height": 50, "dataset": "d",
             "bboxs": [[10, 5, 20, 15], [30, 2, 40, 12]]}
    f = write(tmp_path / "m.jsonl", [json.dumps(multi)])
    assert convert(tmp_path, "--format", "train", "--input", f)[0]["bbox"] == [10, 2, 40, 15]
