"""tools/make_toy.py's splits are the regime pipeline.sh claims: SFT's boxes are some object's, not
necessarily the target's; RL's questions carry no box; the test split boxes the target. tools/make_zoom_toy.py's
world needs two nested looks."""
import json
import os
import subprocess
import sys

from PIL import Image

import common
from conftest import ROOT
from tools.make_zoom_toy import COLOURS, GREY_FRAME, PLATE, PLATE_COLOUR, SHAPE_COLOUR, TILE


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


def test_unnamed_distractors_are_shapes_no_answer_names(tmp_path):
    """--distractors unnamed draws each distractor as a cross or a ring, so no answer read off a distractor's crop
    is right by reading it; the target is one of the named shapes in a colour, as in the default world."""
    import random

    from PIL import ImageDraw

    from tools.make_toy import SHAPES, UNNAMED, draw_shape, make_scene
    for kind, distractor_shapes in (("named", SHAPES), ("unnamed", UNNAMED)):
        rng = random.Random(0)
        scenes = [make_scene(rng, str(tmp_path / f"{kind}_{i}.png"), 3, kind) for i in range(60)]
        assert {shape for scene in scenes for colour, shape, _ in scene[1:]} == set(distractor_shapes)
        assert all(colour == "grey" for scene in scenes for colour, _, _ in scene[1:])
        assert {scene[0][1] for scene in scenes} == set(SHAPES) and all(scene[0][0] != "grey" for scene in scenes)
    # Each of the five shapes draws its own pixels: a cross or a ring is not one of the named shapes redrawn.
    masks = set()
    for shape in SHAPES + UNNAMED:
        image = Image.new("L", (16, 16), 0)
        draw_shape(ImageDraw.Draw(image), shape, [0, 0, 16, 16], 255)
        masks.add(image.tobytes())
    assert len(masks) == len(SHAPES + UNNAMED)


def test_the_zoom_world_needs_two_nested_looks(tmp_path):
    """tools/make_zoom_toy.py: each trace is the asked colour's tile, then the shape inside it (nested, as sft.py
    checks), the box is the shape's, on its plate; and the processor shows the full image at a sixteenth (a tile 28
    pixels), the tile at a quarter (the shape 3 pixels wide, its plate 9) and the shape's smallest crop four times
    larger."""
    subprocess.run([sys.executable, f"{ROOT}/tools/make_zoom_toy.py", "--out", str(tmp_path), "--n_train", "40",
                    "--n_questions", "5", "--n_test", "5"], check=True, capture_output=True)
    train = common.read_records(str(tmp_path / "data" / "train.jsonl"))  # validates the zoom traces too
    for rec in train:
        tile, box = rec["zooms"]
        assert rec["bbox"] == box and common.inside(box, tile) and box[2] - box[0] == 12
        image = Image.open(tmp_path / "data" / rec["image"]).convert("RGB")
        colour = rec["question"].split()[4]
        assert image.getpixel((tile[0] + 2, tile[1] + 2)) == COLOURS[colour]  # the asked colour frames the tile
        cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
        assert image.getpixel((cx, cy)) == SHAPE_COLOUR
        assert image.getpixel((cx - PLATE // 2, cy - PLATE // 2)) == PLATE_COLOUR  # the plate's corner
        assert image.getpixel((cx - PLATE // 2 - 1, cy - PLATE // 2 - 1)) != PLATE_COLOUR
    assert all("bbox" not in r for r in common.read_jsonl(str(tmp_path / "data" / "questions.jsonl")))
    processor = common.load_processor(str(tmp_path / "qwen2-vl"))
    assert common.smart_resize_hw(processor, 1792, 1344) == (84, 112)
    assert common.smart_resize_hw(processor, 448, 448) == (112, 112)
    assert common.smart_resize_hw(processor, 28, 28) == (112, 112)


def test_zoom_cold_start_variants_keep_the_images_and_change_only_the_traces(tmp_path):
    """--two_looks 0.5: the same images and records as the full traces, about half of the traces cut after the
    tile; --trace_tiles any: the same images and answers, each trace at one of the image's tiles (a grey-framed one
    where it is not the asked colour's); a share outside [0, 1] is refused."""
    def world(out, *extra):
        return subprocess.run([sys.executable, f"{ROOT}/tools/make_zoom_toy.py", "--out", str(out), "--n_train", "40",
                               "--n_questions", "2", "--n_test", "2", *extra], capture_output=True, text=True)

    assert world(tmp_path / "full").returncode == 0 and world(tmp_path / "half", "--two_looks", "0.5").returncode == 0
    full, half = (common.read_records(str(tmp_path / w / "data" / "train.jsonl")) for w in ("full", "half"))
    cut = [(f, h) for f, h in zip(full, half) if h["zooms"] != f["zooms"]]
    assert 10 <= len(cut) <= 30 and all(h["zooms"] == f["zooms"][:1] for f, h in cut)
    assert [dict(r, zooms=None) for r in half] == [dict(r, zooms=None) for r in full]
    assert all((tmp_path / "half" / "data" / r["image"]).read_bytes() ==
               (tmp_path / "full" / "data" / r["image"]).read_bytes() for r in full)
    anyone = world(tmp_path / "any", "--trace_tiles", "any")
    assert anyone.returncode == 0
    picked = common.read_records(str(tmp_path / "any" / "data" / "train.jsonl"))
    assert [dict(r, zooms=None, bbox=None) for r in picked] == [dict(r, zooms=None, bbox=None) for r in full]
    elsewhere = 0
    for f, p in zip(full, picked):  # another tile of the same image: framed (asked colour or grey), its shape inside
        tile, box = p["zooms"]
        image = Image.open(tmp_path / "any" / "data" / p["image"]).convert("RGB")
        assert p["bbox"] == box and common.inside(box, tile) and tile[0] % TILE == 0 and tile[1] % TILE == 0
        assert image.getpixel(((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)) == SHAPE_COLOUR
        assert (p["zooms"] == f["zooms"]) == (image.getpixel((tile[0] + 2, tile[1] + 2)) != GREY_FRAME)
        elsewhere += p["zooms"] != f["zooms"]
    assert 5 <= elsewhere <= 25  # of 40: a third of the images have one tile, the others 2 or 3
    refused = world(tmp_path / "bad", "--two_looks", "1.5")
    assert refused.returncode == 1 and "--two_looks: 1.5 is outside [0, 1]" in refused.stderr.splitlines()[-1]
    refused = world(tmp_path / "bad", "--max_tiles", "0")
    assert refused.returncode == 1 and "--max_tiles: 0 is outside [1, 12]" in refused.stderr.splitlines()[-1]


def test_a_run_replaces_only_an_output_folder_a_run_made(tmp_path):
    """tools/fresh_out.sh (pipeline.sh, zoom_world.sh, fewshot_grounding.sh): a relative OUT is read from where the
    script was started; a folder holding files no run wrote, or a file, is refused and kept; a run's own folder
    (its marker) or an empty one is replaced."""
    script = f'source {ROOT}/tools/fresh_out.sh; OUT=$(absolute_out "$1"); cd /; fresh_out "$OUT"; touch "$OUT/result"'

    def run(out):
        return subprocess.run(["bash", "-c", script, "fresh_out", out], cwd=tmp_path, capture_output=True, text=True)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    refused = run("mine")
    assert refused.returncode == 1 and "holds files no run of these scripts wrote" in refused.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert run("run").returncode == 0 and (tmp_path / "run" / "result").exists()
    (tmp_path / "run" / "old").write_text("")
    assert run("run").returncode == 0 and sorted(os.listdir(tmp_path / "run")) == [".toy_run", "result"]
    (tmp_path / "empty").mkdir()
    assert run(str(tmp_path / "empty")).returncode == 0 and (tmp_path / "empty" / "result").exists()
    (tmp_path / "file").write_text("x")
    assert run("file").returncode == 1 and (tmp_path / "file").read_text() == "x"
