"""Two-step chain throughput (records/s): infer.py batched (16) vs infer.py at batch 1 vs a naive loop that
does what HF's model-card example does per record (processor + generate for the box, parse, crop, processor +
generate for the answer; the image decoded from disk for each step), all greedy, one process, same records.

    python bench/infer_throughput.py --model runs/toy/sft/final --data runs/toy/world/data/test.jsonl [--n 128]

Prints one line per variant and the ratios; checks that the three give the same answers.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import infer  # noqa: E402


def naive(model, processor, records, image_root, max_new_tokens):
    answers = []
    for rec in records:
        image = common.load_image(rec, image_root)
        prompt = processor.apply_chat_template(common.focus_messages(rec["question"]), add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        box_text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        w, h = image.size
        box = common.parse_box(box_text, "viscot", w, h)
        crop = common.crop_box(box or [0, 0, w, h], w, h, common.token_pixels(processor))
        image = common.load_image(rec, image_root)
        prompt = processor.apply_chat_template(common.answer_messages(rec["question"]), add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[image, image.crop(tuple(crop))], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
    return answers


def batched(model, processor, records, image_root, max_new_tokens, batch_size):
    answers = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = [common.load_image(rec, image_root) for rec in chunk]
        answers += [r["answer"] for r in infer.run_batch(model, processor, chunk, images,
                                                         max_new_tokens=max_new_tokens)]
    return answers


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--n", type=int, default=128, help="records")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    processor = common.load_processor(args.model)
    model = common.load_model(args.model, common.resolve_dtype("auto")).eval()
    if torch.cuda.is_available():
        model.cuda()
    records = common.read_records(args.data)[:args.n]
    root = os.path.dirname(os.path.abspath(args.data))
    batched(model, processor, records[:4], root, args.max_new_tokens, 4)  # warm-up
    results = {}
    for name, fn in [("naive loop", lambda: naive(model, processor, records, root, args.max_new_tokens)),
                     ("infer.py batch 1", lambda: batched(model, processor, records, root, args.max_new_tokens, 1)),
                     ("infer.py batch 16", lambda: batched(model, processor, records, root, args.max_new_tokens, 16))]:
        t = time.time()
        with torch.no_grad():
            answers = fn()
        dt = time.time() - t
        results[name] = (len(records) / dt, answers)
        print(f"{name:18s} {len(records) / dt:8.1f} records/s")
    base = results["naive loop"][0]
    print(f"ratios: batch 16 / naive = {results['infer.py batch 16'][0] / base:.2f}x, "
          f"batch 1 / naive = {results['infer.py batch 1'][0] / base:.2f}x, "
          f"batch 16 / batch 1 = {results['infer.py batch 16'][0] / results['infer.py batch 1'][0]:.2f}x")
    same = [sum(a == b for a, b in zip(results["naive loop"][1], results[k][1])) for k in results]
    print(f"answers equal to the naive loop's: {same} of {len(records)}")


if __name__ == "__main__":
    main()
