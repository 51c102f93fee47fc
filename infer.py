"""Two-step inference (SPEC section 1): the model writes a focus box, the box is cropped, and it answers
looking at the full image and the crop. Batched, greedy or sampled; or an OpenAI-compatible endpoint.

    python infer.py --model DIR [--adapter A] --data records.jsonl --out preds.jsonl [--mode chain]
    python infer.py --model DIR --image photo.jpg --question "What is written on the sign?"
    python infer.py --serve --model DIR [--host 127.0.0.1] [--port 8000] [--image_dir DIR]

Modes: chain (focus box -> crop -> answer), focus (the box step alone), direct (image + question as the
whole prompt, one step, no box), gt_box (the record's annotated box is the crop; no focus step), zoom
(multi-turn: the model answers or writes <zoom>box</zoom> and is shown that region, up to --max_turns turns;
README "Zoom"; rows carry each call's box and view, turns and invalid_call; box is the last call's box).
Output: one JSON line per record, appended as each batch finishes; a rerun with the same --out skips the
records already there. Records whose image fails to load go to OUT.errors.jsonl, the others are answered,
the run exits 1 naming the list, and the next run retries them.

The endpoint serves `POST /v1/chat/completions` and `GET /v1/models`. Model `<name>` is plain chat;
`<name>-two-step` runs the chain on the conversation's one image and its last user text, and returns the
answer as the message content plus the box under `focus`; `<name>-zoom` runs the zoom loop the same way
(--max_turns) and returns its views and turns under `focus`. Images come as base64 `data:` URLs, or as local
paths only under --image_dir; remote URLs are never fetched. It binds to 127.0.0.1 unless told otherwise.
"""
import base64
import binascii
import contextlib
import io
import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from PIL import Image, UnidentifiedImageError

import common

MODES = ("chain", "focus", "direct", "gt_box", "zoom")


def parse_args(argv=None):
    parser = common.ArgumentParser(__doc__)
    common.add_model_args(parser)
    g = parser.add_argument_group("inference")
    g.add_argument("--data", default=None, help="records to answer (JSONL; id, image, question, optional bbox)")
    g.add_argument("--image_root", default=None, help="image root (default: the data file's directory)")
    g.add_argument("--out", default=None, help="output JSONL (appended; a rerun skips records already in it)")
    g.add_argument("--image", default=None, help="one image file (with --question): print one answer")
    g.add_argument("--question", default=None, help="the question for --image")
    g.add_argument("--mode", default="chain", choices=MODES,
                   help="chain, focus (box only), direct (no box), gt_box (annotated crop) or zoom (multi-turn)")
    g.add_argument("--max_turns", type=common.POSITIVE_INT, default=None,
                   help="zoom: model turns, default 3 (a conversation still calling at the last has no answer)")
    g.add_argument("--max_context", type=common.POSITIVE_INT, default=None,
                   help="zoom: a conversation's whole length in tokens (prompt, images, turns); a call that would "
                        "leave no room for a next turn of --max_new_tokens ends it (default: no limit)")
    g.add_argument("--box_format", default="viscot", choices=common.BOX_FORMAT_CHOICES,
                   help="box text format (SPEC 3); native: the model family's")
    g.add_argument("--prompt_set", default="visrl", choices=sorted(common.PROMPT_SETS), help="prompt wording")
    g.add_argument("--batch_size", type=common.POSITIVE_INT, default=16, help="records per generate call")
    g.add_argument("--max_new_tokens", type=common.POSITIVE_INT, default=64, help="tokens per step")
    g.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=common.TEMPERATURE, default=None,
                   help="sampling temperature (with --do_sample; default 1)")
    g.add_argument("--seed", type=common.SEED, default=0, help="sampling seed")
    g.add_argument("--max_pixels", type=common.POSITIVE_INT, default=None,
                   help="the processor's largest resized image in pixels (default: the checkpoint's own)")
    s = parser.add_argument_group("server")
    s.add_argument("--serve", action="store_true", help="serve an OpenAI-compatible endpoint instead")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    s.add_argument("--port", type=common.bounded(int, 0, 65535), default=8000,
                   help="port (0: any free port, printed at start)")
    s.add_argument("--served_name", default=None, help="model name in the API (default: the model directory's name)")
    s.add_argument("--image_dir", default=None, help="allow image paths under this directory (default: none)")
    s.add_argument("--max_body_mb", type=common.POSITIVE, default=20.0, help="largest request body accepted")
    s.add_argument("--max_tokens_limit", type=common.POSITIVE_INT, default=2048,
                   help="largest max_tokens a request may ask for")
    # At most PIL's own limit: above twice it, PIL refuses the image before this server can read its size.
    s.add_argument("--max_image_pixels", type=common.bounded(int, 1, Image.MAX_IMAGE_PIXELS), default=4096 * 4096,
                   help="largest image (width x height) a request may send; checked from its header, before decoding "
                        f"(at most {Image.MAX_IMAGE_PIXELS}, PIL's own limit)")
    # The processor resizes every image to its max_pixels (12.8 Mpx for Qwen2/2.5-VL, 16k vision tokens) and a
    # 7B model's context holds a few such images at most: four at the per-image cap is more than a request can
    # use, and bounds what one request makes the server decode (about 200 MB as RGB, a second or two).
    s.add_argument("--max_request_pixels", type=common.POSITIVE_INT, default=4 * 4096 * 4096,
                   help="largest total of a request's image sizes (width x height, summed); checked from their "
                        "headers, before any is decoded")
    # The pixel caps do not bound many small images, and each costs decoding, processing and vision tokens
    # (the prompt's length is not otherwise bounded): 64 images of 448 x 448 already fill half a 32k context.
    s.add_argument("--max_images", type=common.POSITIVE_INT, default=64, help="most images one request may send")
    s.add_argument("--max_generate_s", type=common.POSITIVE, default=120.0,
                   help="seconds one generate call of a request may run; its completions stop there (finish_reason "
                        "'length')")
    s.add_argument("--read_timeout", type=common.POSITIVE, default=30.0,
                   help="seconds a client may take to send a request's headers, and its whole body")
    args = parser.parse_args(argv)
    common.check_zoom_flags(parser, args, args.mode == "zoom" or args.serve, "--mode zoom and --serve")
    if not args.serve and not args.data and not args.image:
        parser.error("give --data (with --out), --image with --question, or --serve")
    if args.serve and (given := [flag for flag, on in (("--data", args.data), ("--out", args.out), ("--image",
                       args.image), ("--mode", args.mode != "chain"), ("--do_sample", args.do_sample),
                       ("--temperature", args.temperature is not None)) if on]):
        parser.error(f"--serve answers each request by its own model name (two-step or zoom), temperature and "
                     f"max_tokens: {', '.join(given)} would be ignored")
    if args.mode == "gt_box" and not args.data:
        parser.error("--mode gt_box crops each record's annotated bbox: give --data")
    args.temperature = 1.0 if args.temperature is None else args.temperature
    if args.data and not args.out:
        parser.error("--data needs --out")
    if args.image and not args.question:
        parser.error("--image needs --question")
    if args.question and (token := common.special_token_in(args.question)):
        parser.error(f"--question holds the special token {token}")
    return args


# --------------------------------------------------------------------------------------- the chain

def run_batch(model, processor, records, images, mode="chain", box_format="viscot", prompt_set="visrl",
              max_new_tokens=64, do_sample=False, temperature=1.0, max_time=None, max_turns=3, max_context=None):
    """One output row per record. `images` are the records' full images (PIL), decoded once; each goes
    through the vision tower once, and both steps use its features. Timings are the step's batch time
    divided by the batch size (the full images' encode counts to the first step)."""
    n = len(records)
    rows = [{"id": rec.get("id"), "question": rec["question"], "mode": mode, "box_text": None, "box": None,
             "crop": None} for rec in records]
    for row, rec in zip(rows, records):
        row.update({k: rec[k] for k in ("question_id", "dataset") if k in rec})
    gen = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, max_time=max_time)
    t = time.time()
    full = common.image_features(model, processor, images)

    if mode == "zoom":
        first = [common.encode(processor, common.Example(rec, None, common.zoom_messages(rec["question"])), [im],
                               pixels=False)
                 for rec, im in zip(records, images)]
        convs = common.zoom_conversations(model, processor, first, images, full, box_format, max_turns, max_context,
                                          **gen)
        for row, c, e in zip(rows, convs, first):
            last = (c["boxes"][-1], c["views"][-1]) if c["views"] else (None, None)
            # a conversation stopped at a call never answered: its answer is empty, its last turn kept apart
            row.update(answer=c["text"] if c["answered"] else "", last_turn=c["text"], box=last[0], crop=last[1],
                       boxes=c["boxes"], views=c["views"], turns=c["turns"], invalid_call=c["invalid"],
                       max_turns_hit=c["max_turns_hit"], context_hit=c["context_hit"], focus_s=0.0,
                       answer_s=(time.time() - t) / n, usage={"zoom": {
                           "prompt_tokens": len(e["input_ids"]), "completion_tokens": common.model_tokens(c), "stopped": c["stopped"]}})
        return rows

    if mode == "direct":
        examples = [common.Example(rec, None, common.direct_messages(rec["question"])) for rec in records]
        answers = step(model, processor, examples, [[im] for im in images], [[f] for f in full], gen)
        for row, (answer, usage) in zip(rows, answers):
            row.update(answer=answer, focus_s=0.0, answer_s=(time.time() - t) / n, usage={"answer": usage})
        return rows

    if mode in ("chain", "focus"):
        focus = [common.Example(rec, None, common.focus_messages(rec["question"], prompt_set)) for rec in records]
        box_texts = step(model, processor, focus, [[im] for im in images], [[f] for f in full], gen)
        for row, im, (text, usage) in zip(rows, images, box_texts):
            w, h = im.size
            resized = common.smart_resize_hw(processor, w, h) if box_format == "qwen25" else None
            row.update(box_text=text, box=common.parse_box(text, box_format, w, h, resized), usage={"focus": usage})
    else:  # gt_box: the annotated box is the crop
        for row, rec in zip(rows, records):
            if rec.get("bbox") is None:
                raise common.DataError(f"record {rec.get('id')!r}: --mode gt_box needs a bbox")
            row["box"] = rec["bbox"]
    focus_s = (time.time() - t) / n
    if mode == "focus":
        for row in rows:
            row.update(answer=None, focus_s=focus_s, answer_s=0.0)
        return rows

    t = time.time()
    examples, step2_images = [], []
    for row, rec, im in zip(rows, records, images):
        w, h = im.size
        # An unparsable box still gets an answer: the full image stands in for the crop.
        row["crop"] = common.crop_box(row["box"] or [0, 0, w, h], w, h, common.token_pixels(processor))
        ex = common.Example(rec, None, common.answer_messages(rec["question"], prompt_set), crop=row["crop"])
        examples.append(ex)
        step2_images.append(ex.images(full=im))
    crops = common.image_features(model, processor, [pair[1] for pair in step2_images])
    answers = step(model, processor, examples, step2_images, [[f, c] for f, c in zip(full, crops)], gen)
    for row, (answer, usage) in zip(rows, answers):
        row.update(answer=answer, focus_s=focus_s, answer_s=(time.time() - t) / n)
        row.setdefault("usage", {})["answer"] = usage
    return rows


def step(model, processor, examples, images, features, gen):
    """One generate call on precomputed vision features: (text, usage) per example; usage = prompt and
    completion tokens, and whether it stopped at EOS (False: it hit max_new_tokens)."""
    results = common.generate_tokens(model, processor, examples, images=images, features=features, **gen)
    texts = processor.tokenizer.batch_decode([r["ids"] for r in results], skip_special_tokens=True)
    return [(text, {"prompt_tokens": r["prompt_tokens"], "completion_tokens": len(r["ids"]), "stopped": r["stopped"]})
            for text, r in zip(texts, results)]


def run_file(model, processor, records, image_root, out_path, made_by, inputs, batch_size=16, show_progress=True,
             flag="--out", **chain_kw):
    """Answer every record not yet in out_path, appending one line per record as each batch finishes; a
    second run on the same out_path is refused while this one lives (it would answer every record twice), and
    so is a rerun with other weights, settings or data (`made_by`, stamped next to the file: the rows would
    mix), or an out_path that is one of the `inputs` or no earlier run's output (common.claim_appended_output;
    flag: the option that named out_path, for errors).
    Returns (rows written now, rows already there, records whose image failed to load)."""
    common.claim_appended_output(out_path, flag, inputs, made_by)
    done = {row.get("id") for row in common.resume_jsonl(out_path)}
    todo = [rec for rec in records if rec["id"] not in done]
    errors_path = out_path + ".errors.jsonl"
    written, errors = 0, []
    with open(out_path, "a", encoding="utf-8") as out, \
            common.progress(total=len(todo), enabled=show_progress, desc="infer", unit="rec") as bar:
        for start in range(0, len(todo), batch_size):
            batch, images = [], []
            for rec in todo[start:start + batch_size]:
                try:
                    images.append(common.load_image(rec, image_root))
                    batch.append(rec)
                except common.DataError as e:
                    errors.append({"id": rec["id"], "error": str(e)})
            if batch:
                rows = run_batch(model, processor, batch, images, **chain_kw)
                common.append_jsonl(out, rows)
                written += len(rows)
            bar.update(len(todo[start:start + batch_size]))
    common.write_errors(errors_path, errors)  # an error that a fixed file cures leaves the list on the next run
    return written, len(done), errors


# ------------------------------------------------------------------------------------------ server

class RequestError(Exception):
    def __init__(self, status, message, param=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def open_image(url, image_dir, max_pixels):
    """A PIL image from a data: URL, or from a path under image_dir; nothing else (no remote fetch). It comes
    back opened, not decoded (the caller closes it): its size is read from the header and refused above
    max_pixels before any pixel is decoded, since a small PNG can declare 12000 x 12000 pixels, and decoding
    and resizing it holds the model for half a minute."""
    if not isinstance(url, str) or not url:
        raise RequestError(400, "image_url.url must be a non-empty string", "messages")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise RequestError(400, "data: URLs must be base64-encoded", "messages")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "image data: URL is not valid base64", "messages") from None
        source = io.BytesIO(raw)
    elif url.split(":", 1)[0].lower() in ("http", "https", "ftp", "s3", "gs"):
        raise RequestError(400, "remote image URLs are not fetched; send the image as a base64 data: URL",
                           "messages")
    else:
        path = url[len("file://"):] if url.startswith("file://") else url
        if image_dir is None:
            raise RequestError(403, "local image paths are not allowed (start the server with --image_dir)",
                               "messages")
        if "\x00" in path:  # os.path.realpath would raise ValueError: a 500 for a client's mistake
            raise RequestError(400, "image path contains a NUL byte", "messages")
        root = os.path.realpath(image_dir)
        full = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, full]) != root:
            raise RequestError(403, f"image path {path!r} is outside the allowed directory", "messages")
        if not os.path.isfile(full):
            raise RequestError(400, f"image path {path!r} does not exist", "messages")
        source = full
    try:
        im = Image.open(source)
    except Image.DecompressionBombError:
        # PIL refuses a header over twice its own limit before the size reaches us; --max_image_pixels is at
        # most that limit (parse_args), so the image is over the server's cap too, and is answered as such.
        raise RequestError(413, f"image of more than {2 * Image.MAX_IMAGE_PIXELS} pixels exceeds the server's "
                                f"--max_image_pixels ({max_pixels})", "messages") from None
    except UnidentifiedImageError:
        raise RequestError(400, "cannot decode image: not an image format PIL reads", "messages") from None
    except common.IMAGE_ERRORS as e:
        raise RequestError(400, f"cannot decode image: {e}", "messages") from None
    (w, h), refusal = im.size, None
    if w * h > max_pixels:
        refusal = RequestError(413, f"image of {w}x{h} pixels exceeds the server's --max_image_pixels ({max_pixels})",
                               "messages")
    elif max(w, h) > common.MAX_ASPECT * min(w, h):
        refusal = RequestError(400, f"image of {w}x{h} pixels: a side over {common.MAX_ASPECT} times the other, "
                                    "which the processor refuses", "messages")
    if refusal:
        im.close()
        raise refusal
    return im


def decode_image(im):
    """The RGB pixels of an image open_image let through."""
    try:
        return im.convert("RGB")
    except common.IMAGE_ERRORS as e:  # a header that reads well, over data that does not (truncated, corrupt)
        raise RequestError(400, f"cannot decode image: {e}", "messages") from None


def chat_to_messages(messages, args):
    """OpenAI chat messages -> (chat-template messages, images in order). Every image's header is read and
    checked, alone and together (--max_images, --max_request_pixels), before any image is decoded: what one
    request makes the server decode is bounded by those caps, not by --max_body_mb (20 MB of PNG can hold
    billions of pixels), and --max_generate_s does not cover decoding."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    out, opened, pixels = [], [], 0
    with contextlib.ExitStack() as closing:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(400, f"messages[{i}] needs a role of system, user or assistant", "messages")
            content = m.get("content")
            if isinstance(content, str):
                parts = [{"type": "text", "text": content}]
            elif isinstance(content, list):
                if not content:
                    raise RequestError(400, f"messages[{i}]: content is an empty list", "messages")
                parts = []
                for p in content:
                    if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                        parts.append({"type": "text", "text": p["text"]})
                    elif isinstance(p, dict) and p.get("type") == "image_url" and isinstance(p.get("image_url"), dict):
                        if len(opened) == args.max_images:
                            raise RequestError(413, f"more than the server's --max_images ({args.max_images}) "
                                                    "images in one request", "messages")
                        im = closing.enter_context(open_image(p["image_url"].get("url"), args.image_dir,
                                                              args.max_image_pixels))
                        pixels += im.size[0] * im.size[1]
                        if pixels > args.max_request_pixels:
                            raise RequestError(413, f"the request's first {len(opened) + 1} images come to {pixels} "
                                                    f"pixels, over the server's --max_request_pixels "
                                                    f"({args.max_request_pixels})", "messages")
                        opened.append(im)
                        parts.append({"type": "image"})
                    else:
                        raise RequestError(400, f"messages[{i}]: content parts must be text or image_url", "messages")
            else:
                raise RequestError(400, f"messages[{i}]: content must be a string or a list of parts", "messages")
            found = next((t for p in parts if (t := common.special_token_in(p.get("text", "")))), None)
            if found:
                raise RequestError(400, f"messages[{i}] holds the special token {found} (a vision placeholder or a "
                                        "turn marker of the chat template)", "messages")
            out.append({"role": m["role"], "content": parts})
        return out, [decode_image(im) for im in opened]


# Request fields the server reads, and those it accepts only at the value that asks for nothing (what clients
# send when unset); anything else is refused, as OpenAI refuses an argument it does not recognise, rather
# than answered as if it had been honoured.
READ_FIELDS = {"model", "messages", "n", "max_tokens", "max_completion_tokens", "temperature", "stream", "seed", "user"}
NO_OP_VALUES = {"top_p": (1,), "stop": ([],), "logprobs": (False,), "frequency_penalty": (0,),
                "presence_penalty": (0,), "response_format": ({"type": "text"},), "tools": ([],),
                "tool_choice": ("none",), "parallel_tool_calls": (True, False), "store": (False,)}


def check_fields(body):
    for key, value in body.items():
        if key in READ_FIELDS or value is None or value in NO_OP_VALUES.get(key, ()):
            continue
        if key in NO_OP_VALUES:
            raise RequestError(400, f"'{key}' is not supported by this server (accepted only as "
                                    f"{' or '.join(json.dumps(v) for v in NO_OP_VALUES[key])} or null)", key)
        raise RequestError(400, f"unrecognized request argument: '{key}'", key)


class Server:
    """The model behind a lock: requests are answered one generate call at a time."""

    def __init__(self, model, processor, args):
        self.model, self.processor, self.args = model, processor, args
        self.name = args.served_name or os.path.basename(os.path.normpath(args.model))
        self.lock = threading.Lock()

    def models(self):
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "local"}
                                           for name in self.names()]}

    def names(self):
        return (self.name, self.name + "-two-step", self.name + "-zoom")

    def complete(self, body):
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        if body.get("model") not in self.names():
            raise RequestError(404, f"unknown model {body.get('model')!r}; GET /v1/models lists them", "model")
        if body.get("stream"):
            raise RequestError(400, "streaming is not supported", "stream")
        check_fields(body)

        def opt(key, default):  # absent or null takes the default, as in the OpenAI API (clients send null)
            return default if body.get(key) is None else body[key]
        n = opt("n", 1)
        max_tokens = opt("max_completion_tokens", opt("max_tokens", self.args.max_new_tokens))
        temperature = opt("temperature", 1.0)  # OpenAI's default: sample at 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
            raise RequestError(400, "'n' must be an integer in 1..16", "n")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or \
                not 1 <= max_tokens <= self.args.max_tokens_limit:
            key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
            raise RequestError(400, f"'{key}' must be an integer in 1..{self.args.max_tokens_limit}", key)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise RequestError(400, "'temperature' must be a number in [0, 2]", "temperature")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
            raise RequestError(400, "'seed' must be an integer in 0..2**63-1", "seed")
        messages, images = chat_to_messages(body.get("messages"), self.args)
        sample = temperature >= common.MIN_TEMPERATURE  # below it, greedy (as vLLM reads a tiny temperature)
        gen = dict(max_new_tokens=max_tokens, do_sample=sample, temperature=temperature if sample else 1.0,
                   max_time=self.args.max_generate_s)
        rid = "chatcmpl-" + uuid.uuid4().hex
        with self.lock, torch.no_grad():
            if seed is not None:  # requests run one at a time: the same seed samples the same completions
                torch.manual_seed(seed)
            if body["model"] != self.name:
                choices, usage = self._focused(messages, images, n, gen, body["model"][len(self.name) + 1:])
            else:
                choices, usage = self._chat(messages, images, n, gen, rid)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": choices, "usage": usage}

    def _chat(self, messages, images, n, gen, rid):
        examples = [common.Example({"id": rid}, None, messages) for _ in range(n)]
        results = common.generate_tokens(self.model, self.processor, examples, images=[images] * n, **gen)
        texts = self.processor.tokenizer.batch_decode([r["ids"] for r in results], skip_special_tokens=True)
        choices = [{"index": i, "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop" if r["stopped"] else "length"}
                   for i, (text, r) in enumerate(zip(texts, results))]
        prompt, completion = results[0]["prompt_tokens"], sum(len(r["ids"]) for r in results)
        return choices, {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _focused(self, messages, images, n, gen, kind):
        """The two-step chain (kind "two-step") or the zoom loop ("zoom") on the one image and the last user text."""
        if len(images) != 1:
            raise RequestError(400, f"the {kind} model needs exactly one image, got {len(images)}", "messages")
        texts = [p["text"] for m in messages if m["role"] == "user" for p in m["content"] if p["type"] == "text"]
        question = texts[-1] if texts else ""  # as batch mode reads a record's question: unstripped
        if not question.strip():
            raise RequestError(400, f"the {kind} model needs a question in the last user text", "messages")
        mode = "zoom" if kind == "zoom" else "chain"
        rows = run_batch(self.model, self.processor, [{"id": str(i), "question": question} for i in range(n)],
                         images * n, mode, self.args.box_format, self.args.prompt_set, max_turns=self.args.max_turns,
                         max_context=self.args.max_context, **gen)
        shown = ("boxes", "views", "turns", "invalid_call", "max_turns_hit", "context_hit", "last_turn") \
            if mode == "zoom" else ("box_text", "box", "crop")
        choices = [{"index": i, "message": {"role": "assistant", "content": row["answer"]},
                    "finish_reason": "stop" if all(u["stopped"] for u in row["usage"].values())
                    and not (row.get("max_turns_hit") or row.get("context_hit")) else "length",
                    "focus": {k: row[k] for k in shown}}
                   for i, row in enumerate(rows)]
        steps = [u for row in rows for u in row["usage"].values()]
        prompt = sum(u["prompt_tokens"] for u in rows[0]["usage"].values())  # the prompts, counted once
        completion = sum(u["completion_tokens"] for u in steps)
        return choices, {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def make_handler(server):
    max_body = int(server.args.max_body_mb * 1024 * 1024)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = server.args.read_timeout  # per read of the request line and headers (http.server closes on it)

        def _send(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:  # tell the client not to reuse this connection
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _discard_body(self, length, seconds=10.0):
            """Read and drop a rejected body (for a while at most) before the connection closes: a client
            that writes all of it before reading the reply (urllib, http.client) otherwise gets a broken
            pipe or a reset connection instead of the reply."""
            deadline = time.monotonic() + seconds
            self.connection.settimeout(seconds)
            try:
                while length > 0 and time.monotonic() < deadline:
                    chunk = self.rfile.read1(min(length, 1 << 16))
                    if not chunk:
                        break
                    length -= len(chunk)
            except OSError:
                pass

        def _read_body(self, length):
            """The body, or None when it does not arrive within --read_timeout in all: a client that sends
            less than its Content-Length, or trickles it, must not hold a connection and a thread forever."""
            deadline, parts = time.monotonic() + server.args.read_timeout, []
            try:
                while length > 0:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self.connection.settimeout(left)
                    chunk = self.rfile.read1(min(length, 1 << 16))
                    if not chunk:
                        return None
                    parts.append(chunk)
                    length -= len(chunk)
            except OSError:  # socket.timeout is one
                return None
            finally:
                self.connection.settimeout(server.args.read_timeout)
            return b"".join(parts)

        def _error(self, status, message, param=None):
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})

        def do_GET(self):
            if self.headers.get_all("Transfer-Encoding") or self.headers.get("Content-Length", "0").strip() != "0":
                self.close_connection = True  # a body a GET carries is not read: it must not be read as a request
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, server.models())
            elif self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self.close_connection = True  # a body it may carry is not read
                self._error(404, f"no route {self.path}")
                return
            # The body's framing (RFC 9112 section 6.3). Anything but one Content-Length of plain digits is
            # refused and the connection closed: where the body ends is not known, and a server that guessed
            # (the first of two lengths, or the length beside a chunked body) would read the rest as the next
            # request. Chunked bodies are not read (the openai clients and urllib send a Content-Length). Over
            # 18 digits a length is no real body's (and int() refuses one of over 4300).
            lengths = [value.strip(" \t") for value in self.headers.get_all("Content-Length", [])]
            if self.headers.get_all("Transfer-Encoding") or len(lengths) > 1 or \
                    (lengths and not (lengths[0].isascii() and lengths[0].isdigit() and len(lengths[0]) <= 18)):
                self.close_connection = True
                self._error(400, "the request body must be framed by one Content-Length (a decimal number of at "
                                 "most 18 digits) and no Transfer-Encoding (chunked bodies are not supported)")
                return
            if not lengths:
                self.close_connection = True
                self._error(411, "a Content-Length header is required")
                return
            length = int(lengths[0])
            if length > max_body:
                self.close_connection = True  # the unread body must not be parsed as the next request
                self._error(413, f"request body of {length} bytes exceeds --max_body_mb ({max_body} bytes)")
                self._discard_body(length)
                return
            raw = self._read_body(length)
            if raw is None:
                self.close_connection = True
                self._error(408, f"the request body ({length} bytes by its Content-Length) did not arrive within "
                                 f"--read_timeout ({server.args.read_timeout:g} s)")
                return
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:  # RecursionError: deep nesting; ValueError: a 5000-digit int
                self._error(400, f"request body is not valid JSON: {e}")
                return
            try:
                self._send(200, server.complete(body))
            except RequestError as e:
                self._error(e.status, e.message, e.param)
            except Exception as e:  # noqa: BLE001 - the server answers every request, and keeps running
                self._error(500, f"{type(e).__name__}: {e}")

        def _not_allowed(self):
            self.close_connection = True  # a body it may carry is not read
            self._error(405, f"method {self.command} is not allowed: GET /v1/models, /health; POST "
                             "/v1/chat/completions")

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

        def log_message(self, fmt, *a):
            sys.stderr.write("infer.py serve: " + fmt % a + "\n")

    return Handler


def serve(model, processor, args):
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(Server(model, processor, args)))
    host, port = httpd.server_address[:2]
    print(f"infer.py: serving {args.served_name or os.path.basename(os.path.normpath(args.model))} on "
          f"http://{host}:{port}/v1", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


# -------------------------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    records = common.read_records(args.data, need_answer=False) if args.data else None
    for rec in records if args.mode == "gt_box" else []:  # before any model work: mid-run, a partial file is left
        if rec.get("bbox") is None:
            raise common.DataError(f"{args.data}: record {rec['id']!r}: --mode gt_box needs a bbox")
    cli = {"id": "cli", "image": os.path.abspath(args.image), "question": args.question} if args.image else None
    cli_image = common.load_image(cli, None) if cli else None  # before the model loads: a wrong path fails at once
    common.check_model_args(args)
    common.resolve_box_format(args)
    processor = common.load_processor(args.model)
    if args.max_pixels:
        processor.image_processor.size["longest_edge"] = args.max_pixels
    model = common.load_model(args.model, common.resolve_dtype(args.dtype), args.attn, args.adapter).eval()
    if torch.cuda.is_available():
        model.cuda()
    if args.serve:
        serve(model, processor, args)
        return
    chain_kw = dict(mode=args.mode, box_format=args.box_format, prompt_set=args.prompt_set,
                    max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                    **({"max_turns": args.max_turns, "max_context": args.max_context} if args.mode == "zoom" else {}))
    if cli:
        print(json.dumps(run_batch(model, processor, [cli], [cli_image], **chain_kw)[0]))
        return
    image_root = args.image_root or os.path.dirname(os.path.abspath(args.data))
    made_by = dict(common.model_stamp(args), **chain_kw, seed=args.seed, max_pixels=args.max_pixels,
                   data=os.path.abspath(args.data), image_root=os.path.abspath(image_root))
    t = time.time()
    written, skipped, errors = run_file(model, processor, records, image_root, args.out, made_by, [args.data],
                                        args.batch_size, **chain_kw)
    dt = time.time() - t
    print(f"infer.py: {written} records answered in {dt:.1f}s ({written / max(dt, 1e-9):.2f} rec/s), "
          f"{skipped} already done, {len(errors)} image errors"
          + (f" (listed in {args.out}.errors.jsonl)" if errors else "") + f" -> {args.out}")
    if errors:
        raise common.unanswered(len(errors), args.out, "record")


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:
        raise SystemExit(f"infer.py: error: {e}") from None
