"""tools/compare.py: the paired differences pipeline.sh prints, against numpy on the same per-item files."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import common
from tools import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_report(path, label, items, protocol="chain"):
    with open(path, "w") as f:
        json.dump({"protocol": protocol, "label": label, "n": len(items), "answer_score": 0.0}, f)
    with open(str(path).replace(".json", ".items.jsonl"), "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")


def test_paired_difference_is_the_mean_and_standard_error_of_per_question_differences(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 50).astype(float), rng.integers(0, 2, 53).astype(float)
    iou_a, iou_b = rng.random(50), rng.random(53)
    # The baseline has 3 more questions, and one question of another dataset shares an id: neither pairs.
    write_report(tmp_path / "row.json", "row", [{"dataset": "toy", "id": str(i), "answer_score": a[i],
                                                 "iou": iou_a[i]} for i in range(50)])
    write_report(tmp_path / "base.json", "base",
                 [{"dataset": "toy", "id": str(i), "answer_score": b[i], "iou": iou_b[i]} for i in range(53)]
                 + [{"dataset": "other", "id": "0", "answer_score": 1.0, "iou": 1.0}])
    row, base = compare.read_report(str(tmp_path / "row.json")), compare.read_report(str(tmp_path / "base.json"))
    for metric, x, y in (("answer_score", a, b[:50]), ("box_acc", (iou_a > 0.5) * 1.0, (iou_b[:50] > 0.5) * 1.0),
                         ("miou", iou_a, iou_b[:50])):
        mean, se, n = compare.paired_difference(row[1], base[1], metric)
        d = x - y
        assert n == 50
        assert mean == pytest.approx(d.mean(), abs=1e-12)
        assert se == pytest.approx(d.std(ddof=1) / np.sqrt(50), abs=1e-12)
    compare.main([str(tmp_path / "base.json"), str(tmp_path / "row.json"), "--diff", "row", "base"])
    assert f"| row − base | 50 | {(a - b[:50]).mean():+.3f} ± " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--diff names 'nope'"):
        compare.main([str(tmp_path / "base.json"), str(tmp_path / "row.json"), "--diff", "nope", "base"])
    with pytest.raises(SystemExit, match="two reports are labelled 'row'"):  # a --diff of one with itself
        compare.main([str(tmp_path / "row.json"), str(tmp_path / "row.json"), "--diff", "row", "row"])


def test_a_malformed_item_line_names_file_and_line(tmp_path):
    write_report(tmp_path / "row.json", "row", [{"dataset": "toy", "id": "0", "answer_score": 1.0}])
    with open(tmp_path / "row.items.jsonl", "a") as f:
        f.write('{"dataset": "toy", "id": \n')
    with pytest.raises(common.DataError, match=r"row\.items\.jsonl:2: not valid JSON"):
        compare.read_report(str(tmp_path / "row.json"))
    write_report(tmp_path / "row.json", "row", [{"dataset": "toy", "answer_score": 1.0}])
    with pytest.raises(common.DataError, match=r"row\.items\.jsonl:1: a per-item row needs 'id'"):
        compare.read_report(str(tmp_path / "row.json"))


def test_a_missing_or_foreign_report_is_one_line_naming_it(tmp_path):
    (tmp_path / "half.json").write_text('{"protocol": "chain", ')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "foo.json").write_text('{"protocol": "foo", "label": "x"}')
    write_report(tmp_path / "text_score.json", "t", [{"dataset": "toy", "id": "0", "answer_score": "1"}])
    for name, message in (("foo.json", r".*foo\.json: protocol 'foo' is none of eval\.py's"),
                          ("text_score.json", r".*text_score\.items\.jsonl:1: answer_score must be a finite number"),
                          ("absent.json", r"cannot read the report .*absent\.json: No such file"),
                          ("half.json", r".*half\.json is not an eval\.py report \(not JSON"),
                          ("list.json", r".*list\.json is not an eval\.py report \(no 'protocol' and 'label'\)")):
        run = subprocess.run([sys.executable, "tools/compare.py", str(tmp_path / name)], capture_output=True,
                             text=True, cwd=ROOT)
        assert run.returncode == 1 and "Traceback" not in run.stderr
        assert re.fullmatch(r"compare\.py: error: " + message + r".*\n", run.stderr), run.stderr


def test_chain_and_zoom_reports_compare_and_other_protocols_do_not(tmp_path, capsys):
    write_report(tmp_path / "chain.json", "focus", [{"dataset": "toy", "id": "0", "answer_score": 0.0},
                                                    {"dataset": "toy", "id": "1", "answer_score": 1.0}])
    write_report(tmp_path / "zoom.json", "zoom", [{"dataset": "toy", "id": "0", "answer_score": 1.0},
                                                  {"dataset": "toy", "id": "1", "answer_score": 1.0}], "zoom")
    compare.main([str(tmp_path / "chain.json"), str(tmp_path / "zoom.json"), "--diff", "zoom", "focus"])
    out = capsys.readouterr().out
    assert "| model | n | box_acc | miou | answer_score | zoom_calls |" in out
    assert "| zoom − focus | 2 | +0.500 ± " in out
    write_report(tmp_path / "cls.json", "cls", [{"dataset": "toy", "id": "0", "answer_score": 1.0}], "virft-cls")
    with pytest.raises(SystemExit, match="same protocol"):
        compare.main([str(tmp_path / "chain.json"), str(tmp_path / "cls.json")])


def test_a_pairing_that_cannot_hold_is_refused_and_a_partial_one_is_named(tmp_path, capsys):
    """A repeated id, an id that is no string or integer, reports of different questions files under one dataset
    name, fewer than two shared questions, a protocol without per-question scores: each a one-line refusal. A
    pairing that leaves out some questions of either report says so; equal differences have no spread."""
    toy = [{"dataset": "toy", "id": str(i), "answer_score": float(i % 2)} for i in range(4)]
    write_report(tmp_path / "dup.json", "dup", toy + [toy[0]])
    with pytest.raises(common.DataError, match=r"dup\.items\.jsonl:5: id '0' of dataset 'toy' again"):
        compare.read_report(str(tmp_path / "dup.json"))
    write_report(tmp_path / "listed.json", "listed", [{"dataset": "toy", "id": ["0"], "answer_score": 1.0}])
    with pytest.raises(common.DataError, match=r"listed\.items\.jsonl:1: a per-item row needs 'id' \(a string"):
        compare.read_report(str(tmp_path / "listed.json"))
    write_report(tmp_path / "a.json", "a", toy)
    write_report(tmp_path / "b.json", "b", [dict(t, answer_score=t["answer_score"] + 0.1) for t in toy[:3]])
    compare.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--diff", "b", "a"])
    out, err = capsys.readouterr()
    assert "| b − a | 3 | +0.100 ± 0.000 |" in out  # 0.1 is not exact in binary: no spread all the same
    assert "b − a pairs 3 questions of 3 and 4" in err
    write_report(tmp_path / "c.json", "c", [dict(t, dataset="other") for t in toy])
    with pytest.raises(SystemExit, match="'c' and 'a' share 0 scored question"):
        compare.main([str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--diff", "c", "a"])
    for name, digest in (("a", "1111"), ("b", "2222")):  # as eval.py records each questions file's hash
        report = json.loads((tmp_path / f"{name}.json").read_text())
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(report, questions={"toy": digest})))
    with pytest.raises(SystemExit, match="'b' and 'a' scored different questions files as dataset 'toy'"):
        compare.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--diff", "b", "a"])
    for name in ("x", "y"):
        write_report(tmp_path / f"{name}.json", name, [{"dataset": "toy", "id": "0", "correct": True}], "virft-cls")
    with pytest.raises(SystemExit, match="the virft-cls protocol has no per-question score to pair"):
        compare.main([str(tmp_path / "x.json"), str(tmp_path / "y.json"), "--diff", "x", "y"])
