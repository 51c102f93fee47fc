"""Convert Visual-CoT files (SPEC section 5) into our record format (one JSON object per line: id, image,
question, answer, bbox in original-image pixels, width, height, dataset; the source's other fields kept).

    python tools/convert_viscot.py --format benchmark --input benchmark_gqa.json --out gqa.jsonl \
        [--image_root VISCOT_ROOT | --sizes benchmark_det_gqa.jsonl]
    python tools/convert_viscot.py --format det --input benchmark_det_gqa.jsonl --out gqa_det.jsonl
    python tools/convert_viscot.py --format train --input gqa_cot_train.jsonl --out gqa_train.jsonl \
        [--image_prefix cot/gqa/]

benchmark: the pixel box is the one after '###' in image[1]; the gpt box text (viscot format, padded-square
  frame) is checked against it when the image size is known (from --sizes or the image header).
det: detection questions have no answer; records get answer "" (read them with need_answer=False).
train: the box is the union of `bboxs` (what Visual-CoT trains on); image paths are bare file names, so
  --image_prefix puts them under the directory they live in.
"""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

BOX_PROMPT = " Please provide the bounding box coordinate of the region that can help you answer the question better."


def union(boxes):
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def fields(where, shape, get):
    """get() reads an item's fields; a missing or malformed one is an error naming the item and the expected
    shape (the Visual-CoT files hold hundreds of thousands of items: a KeyError would not say which)."""
    try:
        return get()
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise common.DataError(f"{where}: not a Visual-CoT {shape} ({type(e).__name__}: {e})") from None


def read_question_id(row):
    """A row's question_id: a string or an integer (the records' id is built from it)."""
    qid = row["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise TypeError(f"question_id {qid!r} is not a string or integer")
    return qid


def read_benchmark(path):
    """A benchmark file: one JSON list (not JSONL)."""
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except OSError as e:
        raise common.DataError(f"--input {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise common.DataError(f"{path}: not a JSON file ({e}); --format det and train read JSONL") from None
    if not isinstance(items, list) or not items:
        raise common.DataError(f"{path}: expected a non-empty JSON list of benchmark items")
    return items


BENCHMARK_ITEM = ("benchmark item (image: [path, 'path###[x1, y1, x2, y2]'], conversations: 4 turns, dataset, "
                  "question_id)")


def convert_benchmark(items, sizes, image_root, path):
    out = []
    for i, item in enumerate(items):
        where, shape = f"{path}[{i}]", BENCHMARK_ITEM
        image, tagged, conv, dataset, question_id = fields(where, shape, lambda: (
            item["image"][0], item["image"][1], [turn["value"] for turn in item["conversations"][:4]],
            item["dataset"], read_question_id(item)))
        m = re.search(r"###\s*(\[.*\])\s*$", str(tagged))
        if m is None:
            raise common.DataError(f"{where}: image[1] has no '###[x1, y1, x2, y2]' box: {tagged!r}")
        bbox = fields(where, shape, lambda: json.loads(m.group(1)))
        question = fields(where, shape, lambda: conv[0].replace("<image>", "").strip())
        if question.endswith(BOX_PROMPT.strip()):
            question = question[: -len(BOX_PROMPT.strip())].strip()
        rec = {"id": f"{dataset}-{question_id}", "image": image, "question": question,
               "answer": fields(where, shape, lambda: conv[3]), "bbox": bbox, "dataset": dataset,
               "question_id": question_id, "split": item.get("split")}
        size = sizes.get(question_id)
        if size is None and image_root and os.path.exists(os.path.join(image_root, str(image))):
            size = common.image_size({"id": rec["id"], "image": image}, image_root)
        if size:
            rec["width"], rec["height"] = size
            common.check_box(bbox, f"{where}: bbox", *size)
            # Visual-CoT writes the pixel box truncated (%d) and the text from the float box to 3 decimals of
            # max(w, h): they may part by a pixel plus half a unit of the third decimal on every coordinate
            # (an IoU bound refused real text-line boxes, 30 px on a 2156 px page at IoU 0.8996).
            text_box = common.parse_box(str(conv[1]), "viscot", *size)
            slack = 1.5 + 0.0005 * max(size)
            if text_box is None or max(abs(t - b) for t, b in zip(text_box, bbox)) > slack:
                raise common.DataError(f"{where}: box text {conv[1]!r} disagrees with pixel box "
                                       f"{bbox} for a {size[0]}x{size[1]} image")
        out.append((where, rec))
    return out


def read_sizes(path):
    """{question_id: (width, height)} from a benchmark_det file."""
    shape = "benchmark_det row (question_id, width, height)"
    return dict(fields(f"{path}:{lineno}", shape, lambda: (read_question_id(row), (row["width"], row["height"])))
                for lineno, row in common.input_rows(path))


def convert_det(path):
    shape = "benchmark_det row (img_path: .../DATASET/FILE, question_id, expression, bbox, width, height)"
    return [(f"{path}:{lineno}", fields(f"{path}:{lineno}", shape, lambda: dict(
        row, id=f"{row['img_path'].split('/')[-2]}-{read_question_id(row)}", image=row["img_path"],
        question=row["expression"], answer="", dataset=row["img_path"].split("/")[-2])))
        for lineno, row in common.input_rows(path)]


def convert_train(path, prefix):
    shape = "training row (dataset, image, question, answer, bboxs: a non-empty list of [x1, y1, x2, y2])"
    return [(f"{path}:{lineno}", fields(f"{path}:{lineno}", shape, lambda: dict(
        row, id=f"{row['dataset']}-{row.get('split', 'train')}-{i}", image=prefix + row["image"],
        bbox=union(row["bboxs"]))))
        for i, (lineno, row) in enumerate(common.input_rows(path))]


def main():
    parser = common.ArgumentParser(__doc__)
    parser.add_argument("--format", required=True, choices=["benchmark", "det", "train"], help="input format")
    parser.add_argument("--input", required=True, help="Visual-CoT file")
    parser.add_argument("--out", required=True, help="output records (JSONL)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--image_root", default=None, help="benchmark: read image sizes from the images here")
    parser.add_argument("--sizes", default=None, help="benchmark: a benchmark_det JSONL giving width/height by question_id")
    parser.add_argument("--image_prefix", default="", help="train: prefix for the bare image file names")
    args = parser.parse_args()
    common.claim_output_file(args.out, "--out", [p for p in (args.input, args.sizes) if p], args.overwrite)
    if args.format == "benchmark":
        sizes = read_sizes(args.sizes) if args.sizes else {}
        records = convert_benchmark(read_benchmark(args.input), sizes, args.image_root, args.input)
    elif args.format == "det":
        records = convert_det(args.input)
    else:
        records = convert_train(args.input, args.image_prefix)
    seen = {}
    for where, rec in records:  # every record checked before anything is written
        common.validate_record(rec, where, need_answer=args.format != "det")
        common.check_unique(seen, rec["id"], where)
    common.write_jsonl(args.out, [rec for _, rec in records])
    print(f"{len(records)} records -> {args.out}")


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:
        raise SystemExit(f"convert_viscot.py: error: {e}") from None
