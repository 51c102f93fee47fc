"""Two-step bbox SFT (SPEC 4.1): each annotated record gives two examples,
  step 1 (focus):  [image, question + focus prompt]          -> the box as text
  step 2 (answer): [image, question + answer prompt, crop]  -> the answer
and a record with a zoom trace (`zooms`: a list of boxes in original pixels, each inside the one before; [] for
an answer without a call) one multi-turn example, the cold start of the zoom policy (README "Zoom"):
  zoom: [image, question + zoom prompt] -> <zoom>box 1</zoom> -> [view 1] -> ... -> the answer
with token cross-entropy on the assistant tokens only (every model turn of a trace). Defaults are VisRL's:
LoRA r8/a16 on the language model, vision tower frozen, lr 1e-4, 3 epochs, cosine with 10 % warm-up.

    python sft.py --model Qwen/Qwen2-VL-7B-Instruct --data train.jsonl --image_root imgs --output_dir out/sft
    deepspeed --num_gpus 8 sft.py --deepspeed configs/zero2.json ...
    torchrun --nproc_per_node 8 sft.py ...

The loss of a step is the sum of token losses over the whole global batch (all ranks, all micro-batches)
divided by its number of label tokens, so 1 rank x 8 examples and 2 ranks x 4 give the same loss.
Writes output_dir/metrics.jsonl, output_dir/checkpoint-N/ (model + exact training state) and
output_dir/final/ (the trained model or adapter, a from_pretrained directory).
"""
import os
import time

import torch

import common
from common import Example, Runtime, crop_box, box_to_text, smart_resize_hw

parser = common.ArgumentParser(__doc__)
g = parser.add_argument_group("data")
g.add_argument("--data", required=True, help="training records (JSONL, our record format)")
g.add_argument("--image_root", default=None, help="directory image paths are relative to (default: the data file's)")
g.add_argument("--prompt_set", default="visrl", choices=sorted(common.PROMPT_SETS), help="prompt wording")
g.add_argument("--box_format", default="viscot", choices=common.BOX_FORMAT_CHOICES,
               help="box text format (SPEC 3); native: the model family's")
g.add_argument("--box_decimals", type=common.COUNT, default=3, help="decimals of viscot/norm box text")
g.add_argument("--steps", default="focus,answer,zoom",
               help="which examples to train on: focus and answer (records with a bbox), zoom (records with zooms)")
g.add_argument("--cutoff_len", type=common.POSITIVE_INT, default=4096,
               help="longest sequence; longer examples are skipped and counted, never truncated")
g.add_argument("--num_workers", type=common.COUNT, default=0, help="DataLoader workers that load and encode images")
common.add_model_args(parser)
common.add_finetune_args(parser)
common.add_runtime_args(parser)
args = parser.parse_args()
KINDS = ("focus", "answer", "zoom")
if not set(args.steps.split(",")) <= set(KINDS):
    parser.error(f"--steps takes a comma-separated subset of {KINDS}, got {args.steps!r}")


def build_examples(records, processor, show_progress):
    """The --steps of every record: both steps of a record that has a box, the zoom trace of one that has one;
    records with nothing for these steps (no_bbox) and over-long examples are skipped and counted. Every image
    is decoded and checked against its record first (common.check_images)."""
    steps = set(args.steps.split(","))
    usable = [rec for rec in records if (rec.get("bbox") is not None and steps & {"focus", "answer"})
              or (rec.get("zooms") is not None and "zoom" in steps)]
    examples, skipped = [], {"no_bbox": len(records) - len(usable), "too_long": 0}
    sizes = common.check_images(usable, args.image_root, show_progress)
    min_crop = common.token_pixels(processor)
    for rec, (w, h) in zip(common.progress(usable, show_progress, desc="examples"), sizes):
        resized = smart_resize_hw(processor, w, h) if args.box_format == "qwen25" else None
        candidates, question, root = [], rec["question"], args.image_root
        if "focus" in steps and rec.get("bbox") is not None:
            box_text = box_to_text(rec["bbox"], args.box_format, w, h, args.box_decimals, resized)
            candidates.append(("focus", Example(rec, root, common.focus_messages(question, args.prompt_set),
                                                box_text)))
        if "answer" in steps and rec.get("bbox") is not None:
            crop = crop_box(rec["bbox"], w, h, min_crop)
            candidates.append(("answer", Example(rec, root, common.answer_messages(question, args.prompt_set),
                                                 rec["answer"], crop=crop)))
        if "zoom" in steps and rec.get("zooms") is not None:
            candidates.append(("zoom", zoom_example(rec, processor, w, h, min_crop)))
        for kind, ex in candidates:
            ex.kind = kind
            ex.n_tokens = common.estimate_tokens(processor, ex, w, h)
            ex.n_labels = sum(len(common.response_ids(processor, text)) for text in ex.calls + [ex.response])
            if ex.n_tokens > args.cutoff_len:
                skipped["too_long"] += 1
            else:
                examples.append(ex)
    return examples, skipped


def zoom_example(rec, processor, w, h, min_crop):
    """A zoom trace as one conversation: each call written relative to the view before it (the full image,
    then the crop the last call opened), each view the crop the runtime opens for that call's text (the box
    read back after the text's rounding, as zoom_conversations reads it), then the answer."""
    calls, views, view = [], [], [0, 0, w, h]
    for n, box in enumerate(rec["zooms"], 1):
        call = common.zoom_call_text(box, view, args.box_format, args.box_decimals, processor)
        opened = common.zoom_box(call, view, args.box_format, processor)
        if opened in (None, "invalid"):
            raise common.DataError(f"record {rec['id']!r}: zoom {n} {box} is written {call!r} in --box_format "
                                   f"{args.box_format}, which reads back as no box (too thin for its decimals)")
        calls.append(call)
        view = crop_box(opened, w, h, min_crop)
        views.append(view)
    return Example(rec, args.image_root, common.zoom_messages(rec["question"]), rec["answer"], calls=calls,
                   views=views)


def main():
    if args.image_root is None:
        args.image_root = os.path.dirname(os.path.abspath(args.data))
    common.check_model_args(args)
    common.resolve_box_format(args)
    records = common.read_records(args.data)
    rt = Runtime(args, "sft")
    processor = common.load_processor(args.model)
    examples, skipped = build_examples(records, processor, rt.is_main)
    global_batch, steps_per_epoch, total_steps = common.step_counts(len(examples), args, rt.world, "examples")

    # Resume: the weights come from the checkpoint directory (a full model, or an adapter on --model).
    order = rt.data_order(len(examples), global_batch)
    ckpt = common.resolve_resume(args, "sft", total_steps, order) if args.resume else None
    common.claim_output_dir(args)  # inputs are checked: from here on this run writes to --output_dir
    log = common.MetricsLog(os.path.join(args.output_dir, "metrics.jsonl"), rt.is_main)
    model = common.load_for_training(args, ckpt)
    trainable, total = common.count_params(model)
    model = rt.setup(model, total_steps)
    start_step = common.start_step(rt, ckpt, log)
    if rt.is_main:
        print(f"sft: {len(examples)} examples ({skipped}), {total_steps} steps of {global_batch}, "
              f"{trainable / 1e6:.2f}M/{total / 1e6:.1f}M params trainable, world {rt.world}"
              + (f", resuming at step {start_step}" if ckpt else ""), flush=True)

    # This rank's micro-batches for every remaining step, in order: rank r takes its contiguous share of
    # the global batch, then cuts it into grad_accum micro-batches.
    per_rank = args.batch_size * args.grad_accum
    plan = []
    for step in range(start_step, total_steps):
        idx = common.step_indices(len(examples), step, global_batch, args.seed)
        mine = idx[rt.rank * per_rank:(rt.rank + 1) * per_rank]
        # Label-token counts of the whole global batch: the loss normaliser, overall and per step kind.
        n_labels = {kind: sum(examples[i].n_labels for i in idx if examples[i].kind == kind) for kind in KINDS}
        for m in range(args.grad_accum):
            plan.append((mine[m * args.batch_size:(m + 1) * args.batch_size], n_labels))
    pad_id = processor.tokenizer.pad_token_id
    # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG, which would shift
    # every dropout mask after a resume (the RNG state is restored before the loader starts).
    loader = torch.utils.data.DataLoader(
        plan, batch_size=None, num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed),
        collate_fn=lambda item: (common.collate([common.encode(processor, examples[i]) for i in item[0]], pad_id),
                                 [examples[i].kind for i in item[0]], item[1]))

    model.train()
    meter = common.Throughput()
    batches = iter(loader)
    bar = common.progress(range(start_step, total_steps), rt.is_main, desc="sft", initial=start_step,
                          total=total_steps)
    loss_sum = 0.0
    t0 = time.time()
    for step in bar:
        lr = rt.lr()  # the rate this step uses (the schedule moves on at its end)
        summed = {kind: 0.0 for kind in KINDS}  # summed token losses of this rank, per step kind
        for m in range(args.grad_accum):
            batch, kinds, n_labels = next(batches)
            batch = common.to_device(batch, rt.device)
            with rt.no_sync(m == args.grad_accum - 1), rt.autocast():
                logp, _ = common.token_logprobs(model, batch)
                loss = -logp.sum() / sum(n_labels.values())
                rt.backward(loss)
            for kind, row_logp in zip(kinds, logp.sum(-1).tolist()):
                summed[kind] -= row_logp
            meter.add(len(batch["input_ids"]), int(batch["attention_mask"].sum()))
        grad_norm = rt.step()
        summed = {kind: rt.all_sum(value) for kind, value in summed.items()}
        step_loss = sum(summed.values()) / sum(n_labels.values())
        loss_sum += step_loss
        if rt.is_main:
            bar.set_postfix(loss=f"{step_loss:.4f}")
        if (step + 1) % args.log_steps == 0:
            rates = meter.rates()
            log.write({"step": step + 1, "loss": step_loss,
                       **{f"loss_{kind}": summed[kind] / n_labels[kind] for kind in KINDS if n_labels[kind]},
                       "lr": lr, "grad_norm": grad_norm, "samples_per_s": rates["samples_per_s"] * rt.world,
                       "tokens_per_s": rates["tokens_per_s"] * rt.world, "epoch": (step + 1) / steps_per_epoch})
        if args.save_steps and (step + 1) % args.save_steps == 0 and step + 1 < total_steps:
            common.save_checkpoint(rt, processor, args.output_dir, step + 1)
    common.save_last(rt, processor, args.output_dir, total_steps)
    if rt.is_main:
        n = total_steps - start_step
        print(f"sft done: {n} steps in {time.time() - t0:.0f}s, mean loss {loss_sum / max(1, n):.4f}, "
              f"last {step_loss if n else float('nan'):.4f}, model -> {os.path.join(args.output_dir, 'final')}",
              flush=True)
    rt.close()


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:  # bad input: the message names file and line, or the record
        raise SystemExit(f"sft.py: error: {e}")
