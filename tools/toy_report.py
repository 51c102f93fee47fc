"""Score a model on records with the two-step chain (focus box -> crop -> answer), greedy and batched.

    python tools/toy_report.py --model toy/qwen2-vl [--adapter out/sft/final] --data toy/data/test.jsonl \
        --out report.json [--label "SFT"]

Prints one table row and writes a JSON report: parseable (share of step-1 outputs that parse as a box),
box_acc (IoU > 0.5 with the annotated box), miou, answer_acc (normalised exact match of the step-2 answer
given the crop of the model's own box; the full image stands in for an unparsable box).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def normalise(text):
    return " ".join(text.lower().strip().rstrip(".").split())


def evaluate(model, processor, records, image_root, box_format="viscot", prompt_set="visrl", batch_size=32,
             max_new_tokens=32):
    """Two-step greedy evaluation; returns (metrics, per-record rows)."""
    rows = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = [common.load_image(rec, image_root) for rec in chunk]
        focus = [common.Example(rec, image_root, common.focus_messages(rec["question"], prompt_set)) for rec in chunk]
        box_texts = common.generate(model, processor, focus, max_new_tokens, images=[[im] for im in images])
        answer_examples, answer_images = [], []
        for rec, im, text in zip(chunk, images, box_texts):
            w, h = im.size
            resized = common.smart_resize_hw(processor, w, h) if box_format == "qwen25" else None
            box = common.parse_box(text, box_format, w, h, resized)
            crop = common.crop_box(box if box else [0, 0, w, h], w, h)
            ex = common.Example(rec, image_root, common.answer_messages(rec["question"], prompt_set), crop=crop)
            answer_examples.append(ex)
            answer_images.append(ex.images(full=im))
            rows.append({"id": rec["id"], "box_text": text, "box": box,
                         "iou": common.box_iou(box, rec["bbox"]) if box and rec.get("bbox") else 0.0})
        answers = common.generate(model, processor, answer_examples, max_new_tokens, images=answer_images)
        for row, rec, answer in zip(rows[start:], chunk, answers):
            row.update(answer=answer, correct=normalise(answer) == normalise(rec["answer"]))
    n = max(1, len(rows))
    metrics = {"n": len(rows), "parseable": sum(r["box"] is not None for r in rows) / n,
               "box_acc": sum(r["iou"] > 0.5 for r in rows) / n, "miou": sum(r["iou"] for r in rows) / n,
               "answer_acc": sum(r["correct"] for r in rows) / n}
    return metrics, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory on top of --model")
    parser.add_argument("--data", required=True, help="records to score (JSONL)")
    parser.add_argument("--image_root", default=None, help="image root (default: the data file's directory)")
    parser.add_argument("--box_format", default="viscot", choices=common.BOX_FORMATS, help="box text format")
    parser.add_argument("--prompt_set", default="visrl", choices=sorted(common.PROMPT_SETS), help="prompt wording")
    parser.add_argument("--batch_size", type=int, default=32, help="records per generate call")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--label", default=None, help="row label in the printed table")
    args = parser.parse_args()
    image_root = args.image_root or os.path.dirname(os.path.abspath(args.data))
    processor = common.load_processor(args.model)
    model = common.load_model(args.model, adapter=args.adapter).eval()
    metrics, rows = evaluate(model, processor, common.read_records(args.data), image_root, args.box_format,
                             args.prompt_set, args.batch_size)
    label = args.label or args.adapter or args.model
    print(f"| {label} | {metrics['n']} | {metrics['parseable']:.3f} | {metrics['box_acc']:.3f} | "
          f"{metrics['miou']:.3f} | {metrics['answer_acc']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"label": label, "metrics": metrics, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
