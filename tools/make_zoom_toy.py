"""Build the zoom toy world: one where one look is not enough (README "Multi-turn zoom").

    python tools/make_zoom_toy.py --out zoom_toy [--seed 0]

A 1792x1344 image on a 4x3 grid of 448-pixel tiles, each occupied tile tinted by its cell (as tools/make_toy.py)
and framed (48 pixels): the target's tile in the asked colour, the others grey. In each tile a 12-pixel light
shape on a 36-pixel dark plate sits at the centre of one of its four 224-pixel quarters. "What shape is the red
object?" asks for the shape in the red-framed tile. The processor shows every image at about 112 x 112 pixels:
the full image at a sixteenth of its size (the tiles 28 pixels, the frames 3: visible; the plate a 2-pixel
speck, the shape under a pixel: not), a tile at a quarter (the plate 9 pixels: where the shape is, plain; the
shape 3 pixels wide: its form, not), and a crop of the shape (grown to at least 28 pixels) four times larger
(48 pixels: readable). So the answer needs two nested looks: the tile, then the shape. The plate is what makes
the second look learnable: without it (a dark 12-pixel shape alone, 3 pixels in the tile's view) the toy model
never learned where in the tile the shape was (SFT on the two-look traces picked its quarter at chance, 24 %,
with 1000 or 4000 traces), so that second look paid only when it guessed right. (The first zoom world was a
quarter this size, 448x336 with 112-pixel tiles: there a tile was shown at its own size and one look at the
tile read the shape: docs/toy_experiments.md.)

Writes zoom_toy/qwen2-vl/ (the toy model with this processor) and zoom_toy/data/: train.jsonl (bbox: the
shape's box; zooms: [tile, shape box], the two-look trace, or [tile] for a share 1 - --two_looks of them),
questions.jsonl (no box), test.jsonl (bbox: the target's shape).

--trace_tiles any: each training record's trace and bbox look at a tile drawn uniformly among the image's, not
necessarily the asked colour's (the main toy world's --train_boxes any: an annotator who boxed something in the
picture without reading the question); its answer stays the asked shape, so which tile to look at is left to RL.
"""
import json
import os
import random
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script or imported as tools.make_zoom_toy
from make_toy import BACKGROUND, COLOURS, SHAPES, build_model, build_tokenizer, cell_tint, draw_shape  # noqa: E402
import common  # noqa: E402  (make_toy put the repository root on the path)

WIDTH, HEIGHT, TILE, SHAPE, PLATE, FRAME = 1792, 1344, 448, 12, 36, 48
GRID_COLS, GRID_ROWS = WIDTH // TILE, HEIGHT // TILE
SHAPE_COLOUR, PLATE_COLOUR, GREY_FRAME = (230, 230, 230), (30, 30, 30), (90, 90, 90)
IMAGE = {"min_pixels": 112 * 112, "max_pixels": 112 * 112}  # every image, full or crop, shown at about 112 x 112


def make_record(rng, index, split, image_dir, max_tiles, with_boxes, pick_tile):
    """One image and question; with_boxes: the trace and bbox of tile pick_tile(tiles), 0 being the target's."""
    n = rng.randint(1, max_tiles)
    cells = rng.sample(range(GRID_COLS * GRID_ROWS), n)
    colour = rng.choice(list(COLOURS))
    image = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    tiles = []
    for k, cell in enumerate(cells):
        col, row = cell % GRID_COLS, cell // GRID_COLS
        x0, y0 = col * TILE, row * TILE
        draw.rectangle([x0, y0, x0 + TILE - 1, y0 + TILE - 1], fill=COLOURS[colour] if k == 0 else GREY_FRAME)
        draw.rectangle([x0 + FRAME, y0 + FRAME, x0 + TILE - FRAME - 1, y0 + TILE - FRAME - 1], fill=cell_tint(col, row))
        quarter = rng.randrange(4)
        cx, cy = x0 + TILE // 4 + (quarter % 2) * TILE // 2, y0 + TILE // 4 + (quarter // 2) * TILE // 2
        box = [cx - SHAPE // 2, cy - SHAPE // 2, cx + SHAPE // 2, cy + SHAPE // 2]
        shape = rng.choice(SHAPES)
        draw.rectangle([cx - PLATE // 2, cy - PLATE // 2, cx + PLATE // 2 - 1, cy + PLATE // 2 - 1], fill=PLATE_COLOUR)
        draw_shape(draw, shape, box, SHAPE_COLOUR)
        tiles.append(([x0, y0, x0 + TILE, y0 + TILE], shape, box))
    name = f"{split}_{index:05d}.png"
    image.save(os.path.join(image_dir, name))
    shape = tiles[0][1]
    rec = {"id": f"{split}-{index}", "image": f"images/{name}", "question": f"What shape is the {colour} object?",
           "answer": shape, "width": WIDTH, "height": HEIGHT, "dataset": "zoom_toy", "objects": n}
    if with_boxes:
        tile, _, box = tiles[pick_tile(n)]
        rec.update(bbox=box, zooms=[tile, box])
    return rec


def main():
    parser = common.ArgumentParser(__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=common.SEED, default=0)
    parser.add_argument("--n_train", type=common.COUNT, default=1000)
    parser.add_argument("--n_questions", type=common.COUNT, default=2000)
    parser.add_argument("--n_test", type=common.COUNT, default=1000)
    parser.add_argument("--max_tiles", type=common.bounded(int, 1, GRID_COLS * GRID_ROWS), default=3,
                        help="tiles per image: the target's and up to N-1 others")
    parser.add_argument("--two_looks", type=common.FRACTION, default=1.0,
                        help="share of training traces with both looks; the others stop at the tile (a cold start "
                             "that rarely shows the second look); the images are the same at any share")
    parser.add_argument("--trace_tiles", default="target", choices=["target", "any"],
                        help="the training traces' tile: the asked colour's, or any of the image's (RL finds which)")
    args = parser.parse_args()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file, not a directory")
    data_dir = os.path.join(args.out, "data")
    os.makedirs(os.path.join(data_dir, "images"), exist_ok=True)
    rng, cut = random.Random(args.seed), random.Random(f"two looks {args.seed}")
    anyone = random.Random(f"trace tiles {args.seed}")  # its own stream: the images are the same either way

    def target_tile(n):
        return 0

    pick_train = (lambda n: anyone.randrange(n)) if args.trace_tiles == "any" else target_tile
    for split, n, with_boxes in (("train", args.n_train, True), ("questions", args.n_questions, False),
                                 ("test", args.n_test, True)):
        with open(os.path.join(data_dir, f"{split}.jsonl"), "w") as f:
            for i in range(n):
                rec = make_record(rng, i, split, os.path.join(data_dir, "images"), args.max_tiles, with_boxes,
                                  pick_train if split == "train" else target_tile)
                if split == "train" and cut.random() >= args.two_looks:
                    rec["zooms"] = rec["zooms"][:1]
                f.write(json.dumps(rec) + "\n")
    out_dir = os.path.join(args.out, "qwen2-vl")
    os.makedirs(out_dir, exist_ok=True)
    build_model("qwen2-vl", out_dir, build_tokenizer(out_dir), args.seed, image=IMAGE)
    print(f"zoom toy: {args.n_train} traces / {args.n_questions} questions / {args.n_test} test -> {args.out}")


if __name__ == "__main__":
    main()
