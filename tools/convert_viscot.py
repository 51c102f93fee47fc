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


def convert_benchmark(items, sizes, image_root, where):
    out = []
    for i, item in enumerate(items):
        path, tagged = item["image"][0], item["image"][1]
        m = re.search(r"###\s*(\[.*\])\s*$", tagged)
        if m is None:
            raise common.DataError(f"{where}[{i}]: image[1] has no '###[x1, y1, x2, y2]' box: {tagged!r}")
        bbox = json.loads(m.group(1))
        conv = item["conversations"]
        question = conv[0]["value"].replace("<image>", "").strip()
        if question.endswith(BOX_PROMPT.strip()):
            question = question[: -len(BOX_PROMPT.strip())].strip()
        rec = {"id": f"{item['dataset']}-{item['question_id']}", "image": path, "question": question,
               "answer": conv[3]["value"], "bbox": bbox, "dataset": item["dataset"],
               "question_id": item["question_id"], "split": item.get("split")}
        size = sizes.get(item["question_id"])
        if size is None and image_root and os.path.exists(os.path.join(image_root, path)):
            size = common.image_size({"id": rec["id"], "image": path}, image_root)
        if size:
            rec["width"], rec["height"] = size
            text_box = common.parse_box(conv[1]["value"], "viscot", *size)
            if text_box is None or common.box_iou(text_box, bbox) < 0.9:
                raise common.DataError(f"{where}[{i}]: box text {conv[1]['value']!r} disagrees with pixel box "
                                       f"{bbox} for a {size[0]}x{size[1]} image")
        out.append(rec)
    return out


def convert_det(rows):
    return [dict(row, id=f"{row['img_path'].split('/')[-2]}-{row['question_id']}", image=row["img_path"],
                 question=row["expression"], answer="", dataset=row["img_path"].split("/")[-2]) for row in rows]


def convert_train(rows, prefix):
    return [dict(row, id=f"{row['dataset']}-{row.get('split', 'train')}-{i}", image=prefix + row["image"],
                 bbox=union(row["bboxs"])) for i, row in enumerate(rows)]


def main():
    parser = common.ArgumentParser(__doc__)
    parser.add_argument("--format", required=True, choices=["benchmark", "det", "train"], help="input format")
    parser.add_argument("--input", required=True, help="Visual-CoT file")
    parser.add_argument("--out", required=True, help="output records (JSONL)")
    parser.add_argument("--image_root", default=None, help="benchmark: read image sizes from the images here")
    parser.add_argument("--sizes", default=None, help="benchmark: a benchmark_det JSONL giving width/height by question_id")
    parser.add_argument("--image_prefix", default="", help="train: prefix for the bare image file names")
    args = parser.parse_args()
    if args.format == "benchmark":
        with open(args.input, encoding="utf-8") as f:
            items = json.load(f)
        sizes = {r["question_id"]: (r["width"], r["height"]) for r in common.read_jsonl(args.sizes)} if args.sizes else {}
        records = convert_benchmark(items, sizes, args.image_root, args.input)
    elif args.format == "det":
        records = convert_det(common.read_jsonl(args.input))
    else:
        records = convert_train(common.read_jsonl(args.input), args.image_prefix)
    for i, rec in enumerate(records):
        common.validate_record(rec, f"{args.input} item {i}", need_answer=args.format != "det")
    common.write_jsonl(args.out, records)
    print(f"{len(records)} records -> {args.out}")


if __name__ == "__main__":
    main()
