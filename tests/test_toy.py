"""tools/make_toy.py's splits are the regime pipeline.sh claims: SFT's boxes are some object's, not
necessarily the target's; RL's questions carry no box; the test split boxes the target."""
import json
import subprocess
import sys

import common
from conftest import ROOT


def test_splits_box_what_the_regime_says(tmp_path):
    subprocess.run([sys.executable, f"{ROOT}/tools/make_toy.py", "--out", str(tmp_path), "--n_train", "300",
                    "--n_questions", "20", "--n_test", "50", "--skip_models"], check=True, capture_output=True)
    data = tmp_path / "data"
    targets = json.loads((data / "target_boxes.json").read_text())
    train = common.read_records(str(data / "train.jsonl"))
    one = [r for r in train if r["objects"] == 1]
    many = [r for r in train if r["objects"] > 1]
    assert one and many
    assert all(r["bbox"] == targets[r["id"]] for r in one)  # alone in the picture, the object is the target
    on_target = sum(r["bbox"] == targets[r["id"]] for r in many) / len(many)
    assert 0.25 < on_target < 0.65  # uniform over 2-3 objects: 5/12 expected; target-only boxes would give 1
    assert all("bbox" not in r for r in common.read_jsonl(str(data / "questions.jsonl")))
    assert all(r["bbox"] == targets[r["id"]] for r in common.read_records(str(data / "test.jsonl")))
