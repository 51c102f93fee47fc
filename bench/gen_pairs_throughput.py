"""Self-evolution candidates per second: gen_pairs.py's batched generation (one generate call per step for a
batch of questions, each image through the vision tower once) vs a naive per-candidate loop (one generate
call per box and per answer, the image re-encoded each time, as VisRL's client-server script does). Same
model, questions, attempts, temperatures and token limit; the judge is left out of both.

    python bench/gen_pairs_throughput.py --model runs/toy/sft/final --data runs/toy/world/data/train.jsonl \
        [--n 48] [--batch_size 16] [--temperature 1]
"""
import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import gen_pairs  # noqa: E402


def naive(model, processor, records, images, args, rng):
    """One candidate at a time: every generate call encodes its image(s) again."""
    n = 0
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature)
    for rec, im in zip(records, images):
        w, h = im.size
        focus = common.Example(rec, None, common.focus_messages(rec["question"]))
        for _ in range(args.attempts):
            first, second = (common.parse_box(common.generate(model, processor, [focus], images=[[im]], **gen)[0],
                                              "viscot", w, h) for _ in range(2))
            if first is not None and second is not None and common.box_iou(first, second) > 0.05:
                second = gen_pairs.random_box(first, w, h, rng)
            for box in (first, second):
                if box is None:
                    continue
                crop = common.crop_box(box, w, h, common.token_pixels(processor))
                ex = common.Example(rec, None, common.answer_messages(rec["question"]), crop=crop)
                common.generate(model, processor, [ex], images=[ex.images(full=im)], **gen)
            n += 2
    return n


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--n", type=int, default=48, help="questions")
    parser.add_argument("--batch_size", type=int, default=16, help="gen_pairs.py questions per batch")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--attempts", type=int, default=3)
    cli = parser.parse_args()
    args = gen_pairs.parse_args(["--model", cli.model, "--data", cli.data, "--out", "unused", "--attempts",
                                 str(cli.attempts), "--box_temperature", str(cli.temperature),
                                 "--answer_temperature", str(cli.temperature), "--max_new_tokens",
                                 str(cli.max_new_tokens), "--box_decimals", "2"])
    processor = common.load_processor(cli.model)
    model = common.load_model(cli.model, common.resolve_dtype("auto")).eval()
    if torch.cuda.is_available():
        model.cuda()
    records = common.read_records(cli.data)[:cli.n]
    root = os.path.dirname(os.path.abspath(cli.data))
    images = [common.load_image(rec, root) for rec in records]
    torch.manual_seed(0)
    with torch.no_grad():
        gen_pairs.candidates_for_batch(model, processor, records[:2], images[:2], args, random.Random(0))  # warm-up
        t = time.time()
        made = 0
        for s in range(0, len(records), cli.batch_size):
            per_question, _ = gen_pairs.candidates_for_batch(model, processor, records[s:s + cli.batch_size],
                                                             images[s:s + cli.batch_size], args, random.Random(s))
            made += sum(len(c) for c in per_question)
        batched = made / (time.time() - t)
        t = time.time()
        made = naive(model, processor, records, images, cli, random.Random(0))
        loop = made / (time.time() - t)
    print(f"gen_pairs.py batched ({cli.batch_size} questions/batch): {batched:.1f} candidates/s")
    print(f"naive per-candidate loop:                {loop:.1f} candidates/s")
    print(f"ratio: {batched / loop:.2f}x")


if __name__ == "__main__":
    main()
