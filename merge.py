"""Merge a LoRA adapter into its base: one plain checkpoint directory (safetensors shards, config,
tokenizer, processor, chat template) that loads with from_pretrained and starts the next stage, and serves
as that stage's reference model (SPEC trap 12).

    python merge.py --model BASE --adapter runs/sft/final --out runs/sft_merged [--dtype auto]

It checks itself: the merged model's logits on a probe input (an image and a two-step prompt) equal the
adapter model's within --tolerance (relative to the largest logit), and the saved directory, reloaded,
gives the logits of the in-memory merged model. It refuses an adapter trained on a different base: the
adapter's recorded base fingerprint (adapter_base.json, written by our stages) must match --model's
weights, and every adapter tensor must find its layer, with its shape, in --model.

--out is a new or empty directory, or one that merge.py wrote (it leaves merge.json there) and --overwrite
replaces; it never deletes files it did not write. The checkpoint is written and checked next to --out, then
renamed into place (an old --out first renamed aside, deleted last): a failed check leaves --out as it was,
and a kill leaves the old directory or the new one at --out, or, between the two renames, both complete in
hidden .NAME.* folders beside it.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import common


def parse_args(argv=None):
    parser = common.ArgumentParser(__doc__)
    parser.add_argument("--model", required=True, help="base model directory the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    parser.add_argument("--out", required=True, help="output directory for the merged checkpoint")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="dtype to save in; auto = the base checkpoint's own dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier merge.py output in --out")
    parser.add_argument("--tolerance", type=common.POSITIVE, default=1e-4,
                        help="largest allowed |logit difference| / max |logit| between adapter and merged model")
    parser.add_argument("--max_shard_size", type=shard_size, default="5GB",
                        help="safetensors shard size: an integer and a unit (5GB, 500MB, 2GiB)")
    return parser.parse_args(argv)


def fail(message):
    raise SystemExit(f"merge.py: error: {message}")


MARKER = "merge.json"  # what merge.py leaves in --out: its inputs, and the sign that it may replace the directory


def shard_size(text):
    """An argparse type: a size save_pretrained reads (checked now, not after the merge's work)."""
    from transformers.utils.hub import convert_file_size_to_int
    try:
        if convert_file_size_to_int(text) <= 0:
            raise ValueError
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB or 500MB") from None
    return text


def check_out(args):
    """--out must be new, empty, or an earlier merge.py output that --overwrite replaces: one holding only the
    files its marker lists (anything added since is someone else's, and replacing --out would delete it)."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out} is a file, not a directory")
    parent = os.path.dirname(os.path.abspath(args.out))
    while not os.path.exists(parent):  # the folder the merge will be created in, checked before the work
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        fail(f"--out {args.out}: {parent} is a file, not a directory")
    if not os.path.isdir(args.out) or not os.listdir(args.out):
        return
    others = sorted(set(os.listdir(args.out)) - set(written_files(args.out)) - {MARKER})
    if not os.path.exists(os.path.join(args.out, MARKER)) or others:
        listed = f" ({', '.join(others[:4])}{', ...' if len(others) > 4 else ''})" if others else ""
        fail(f"--out {args.out} holds files merge.py did not write{listed}; give a new or empty directory")
    if not args.overwrite:
        fail(f"--out {args.out} holds an earlier merge; --overwrite replaces it")


def written_files(out):
    """The files an earlier merge wrote into out, as its marker lists them (none when there is no readable
    marker: then nothing there counts as merge.py's)."""
    try:
        with open(os.path.join(out, MARKER)) as f:
            files = json.load(f).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [name for name in files if isinstance(name, str)]


def check_base(args):
    """Refuse an adapter recorded as trained on other weights than --model's."""
    if not os.path.exists(os.path.join(args.adapter, "adapter_config.json")):
        fail(f"--adapter {args.adapter} is not a PEFT adapter directory (no adapter_config.json)")
    common.check_model_path(args.model)
    if not os.path.exists(os.path.join(args.adapter, "adapter_base.json")):
        print(f"merge.py: {args.adapter} does not record its base (not written by our stages): "
              "checking layer names and shapes only", file=sys.stderr)
    common.check_adapter_base(args.adapter, args.model)


def load_adapter_model(args):
    """Base in float32 with the adapter on top; every tensor in the adapter file must land in the model."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    model = common.load_model(args.model, torch.float32)
    try:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, args.adapter)
    except (RuntimeError, ValueError, KeyError) as e:  # size mismatch, target modules not found
        fail(f"adapter {args.adapter} does not fit base {args.model}: {str(e).splitlines()[0]}")
    saved = load_file(os.path.join(args.adapter, "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(model)
    missing = [k for k in saved if k not in expected]
    if missing:
        fail(f"adapter {args.adapter} has {len(missing)} tensors with no layer in base {args.model} "
             f"(first: {missing[0]})")
    return model.eval()


def probe_batch(processor):
    """A fixed input through the full two-step prompt path: a gradient image, its crop, and a question."""
    w, h = 224, 168
    grid = np.stack(np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)), -1)
    image = Image.fromarray(np.concatenate([grid, grid[..., :1]], -1).astype(np.uint8))
    ex = common.Example({"id": "probe"}, None, common.answer_messages("What is in the top left corner?"),
                        response="a gradient", crop=[0, 0, 112, 84])
    return common.collate([common.encode(processor, ex, ex.images(full=image))],
                          processor.tokenizer.pad_token_id)


@torch.no_grad()
def logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                 mm_token_type_ids=batch["mm_token_type_ids"], use_cache=False).logits.float()


def checkpoint_dtype(model_dir):
    """The dtype a checkpoint was saved in (its config's dtype / torch_dtype), float32 if it says none."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def cast_as_saved(model, dtype):
    """The model in dtype as a reload of its checkpoint has it: parameters and saved buffers cast; buffers
    that are not saved (RoPE's inv_freq) kept, as from_pretrained recomputes them in float32 (cast to bf16
    they moved the logits by 3e-2 of the largest, with every weight the same)."""
    unsaved = [(m, name, getattr(m, name)) for m in model.modules() for name in m._non_persistent_buffers_set]
    model = model.to(dtype)
    for module, name, buffer in unsaved:
        setattr(module, name, buffer)
    return model


def relative_diff(a, b):
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    check_out(args)
    check_base(args)
    has_processor = any(os.path.exists(os.path.join(args.adapter, f))
                        for f in ("processor_config.json", "preprocessor_config.json"))
    processor = common.load_processor(*((args.adapter, "--adapter") if has_processor else (args.model, "--model")))
    model = load_adapter_model(args)
    batch = probe_batch(processor)
    with_adapter = logits(model, batch)

    merged = model.merge_and_unload()
    merged_logits = logits(merged, batch)
    diff = relative_diff(with_adapter, merged_logits)
    print(f"merge.py: adapter vs merged logits (float32): max |diff| / max |logit| = {diff:.2e} "
          f"(tolerance {args.tolerance:.0e})")
    if not diff <= args.tolerance:
        fail(f"merged model's logits differ from the adapter model's by {diff:.2e} > {args.tolerance:.0e}")

    dtype = common.resolve_dtype(args.dtype) if args.dtype != "auto" else checkpoint_dtype(args.model)
    merged = cast_as_saved(merged, dtype)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=os.path.dirname(out))  # a name no one else has
    old = None
    try:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=args.max_shard_size)
        processor.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"model": os.path.abspath(args.model), "adapter": os.path.abspath(args.adapter),
                       "dtype": str(dtype).replace("torch.", ""), "files": sorted(os.listdir(tmp))}, f, indent=1)

        reloaded = common.load_model(tmp, dtype).eval()
        reload_diff = relative_diff(logits(merged, batch), logits(reloaded, batch))
        del reloaded
        print(f"merge.py: reloaded checkpoint ({str(dtype).replace('torch.', '')}) vs in-memory merged logits: "
              f"max |diff| / max |logit| = {reload_diff:.2e}")
        if not reload_diff <= args.tolerance:
            fail(f"the saved checkpoint does not reproduce the merged model ({reload_diff:.2e}); --out left as it was")

        check_out(args)  # again: something may have appeared in --out meanwhile
        if os.path.isdir(out):  # empty, or merge.py's own (check_out): aside until the new one is in place
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old.", dir=os.path.dirname(out))
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    print(f"merge.py: {args.adapter} + {args.model} -> {args.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:
        fail(e)
