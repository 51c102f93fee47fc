"""Plumbing shared by the stage scripts: records, boxes, prompts, model loading, batching, the distributed
runtime, checkpoints and logging. Each stage's algorithm lives in its own script; nothing here trains.

Sections, in order: records (JSONL) | boxes | prompts | answers and judges | model and processor |
examples and batches | runtime (launchers, optimizer, schedule) | checkpoints | logging.
"""
import argparse
import atexit
import contextlib
import functools
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
import weakref
from typing import NamedTuple

import numpy as np
from PIL import Image
from safetensors import SafetensorError

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad input data: the message names the file and line, or the record."""


# ----------------------------------------------------------------------------------------------- records

def iter_jsonl(path):
    """(line number, object) for each non-blank line; a malformed line, or one that is not UTF-8, raises
    DataError naming file and line (a byte-order mark on the first line is accepted)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at column "
                                f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def input_rows(path, what="records"):
    """(line number, object) of an input file that must hold at least one row: an empty one is an error that
    names it (a stage that read nothing would otherwise exit 0 having done nothing)."""
    rows = list(iter_jsonl(path))
    if not rows:
        raise DataError(f"{path}: no {what} (the file is empty)")
    return rows


def check_unique(seen, key, where, what="id"):
    """Refuse a key seen before in the same input (its rows would share one output row, or be trained twice)."""
    if key in seen:
        raise DataError(f"{where}: duplicate {what} {key!r} (first at {seen[key]})")
    seen[key] = where


def finite_number(value, where, name, low=-math.inf, high=math.inf, allow_none=False):
    """A real number in [low, high]: not a string, bool, NaN or infinity (JSON readers accept NaN)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise DataError(f"{where}: {name} must be a finite number in [{low:g}, {high:g}]"
                        + (" or null" if allow_none else "") + f", got {value!r}")
    return value


def read_jsonl(path):
    return [row for _, row in iter_jsonl(path)]


def write_jsonl(path, rows):
    """Write rows atomically: a reader never sees a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_errors(path, errors):
    """A long job's list of the records it could not use (OUT.errors.jsonl), rewritten each run: with none, an
    earlier run's list, whose records this run retried and answered, is removed."""
    if errors:
        write_jsonl(path, errors)
    elif os.path.exists(path):
        os.remove(path)


def unanswered(n, out, unit):
    """The one-line error a long job exits with after answering everything else: n records (gen_pairs:
    questions) that write_errors listed."""
    return DataError(f"{n} {unit}(s) not answered: the image failed to load or disagrees with the record (listed "
                     f"in {out}.errors.jsonl; the others are in {out}, and a rerun retries only these)")


def resume_jsonl(path):
    """Rows already in an output file that a job appends to, so a rerun skips them. A kill can leave a torn
    last line: it is cut off here (that record is redone), never read as data."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return read_jsonl(path)


def append_jsonl(f, rows):
    """Append rows to an open file and push them to disk: a kill after this loses none of them."""
    for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def validate_record(rec, where, need_answer=True):
    """Check one record of our format (issue 2 section 4); `where` is 'file:line' for the message. Questions
    to answer (inference, detection) need no answer: need_answer=False accepts an empty or absent one."""
    optional = () if need_answer else ("answer",)
    for key in ("id", "image", "question", "answer"):
        if key in optional and rec.get(key) is None:
            continue
        if not isinstance(rec.get(key), str) or not (rec[key].strip() or key in optional):
            raise DataError(f"{where}: field '{key}' must be a non-empty string, got {rec.get(key)!r}")
    for key in ("question", "answer"):
        if token := special_token_in(rec.get(key) or ""):
            raise DataError(f"{where}: record {rec['id']!r}: {key} holds the special token {token} (a vision "
                            "placeholder or a turn marker of the chat template)")
    for key in ("width", "height"):
        if rec.get(key) is not None and not (isinstance(rec[key], int) and not isinstance(rec[key], bool)
                                             and rec[key] > 0):
            raise DataError(f"{where}: record {rec['id']!r}: {key} must be a positive integer, got {rec[key]!r}")
    if rec.get("bbox") is not None:
        check_box(rec["bbox"], f"{where}: record {rec['id']!r}: bbox", rec.get("width"), rec.get("height"))
    if rec.get("zooms") is not None:  # a zoom trace: successive views, each inside the one before ([]: answer at once)
        zooms = rec["zooms"]
        if not isinstance(zooms, list):
            raise DataError(f"{where}: record {rec['id']!r}: zooms must be a list of boxes, got {zooms!r}")
        for k, box in enumerate(zooms):
            check_box(box, f"{where}: record {rec['id']!r}: zooms[{k}]", rec.get("width"), rec.get("height"))
            if k and not inside(box, zooms[k - 1]):
                raise DataError(f"{where}: record {rec['id']!r}: zooms[{k}] {box} is not inside zooms[{k - 1}] "
                                f"{zooms[k - 1]} (each zoom looks into the view before it)")
    return rec


BOX_SLACK = 1.0  # pixels a box may stick out of its image (rounding in converted annotations)


def inside(box, outer, slack=BOX_SLACK):
    return (box[0] >= outer[0] - slack and box[1] >= outer[1] - slack and box[2] <= outer[2] + slack
            and box[3] <= outer[3] + slack)


def check_box(box, where, width=None, height=None):
    """A pixel box [x1, y1, x2, y2] of finite numbers with x2 > x1, y2 > y1, inside the width x height image
    when its size is known. A box past the edge would be clamped into another region than the annotator
    drew, and trained on as if it were that one."""
    if not (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        raise DataError(f"{where} must be [x1, y1, x2, y2] finite numbers, got {box!r}")
    if not (box[2] > box[0] and box[3] > box[1]):
        raise DataError(f"{where} {box!r} is degenerate (needs x2 > x1 and y2 > y1)")
    if min(box) < -BOX_SLACK or (width and box[2] > width + BOX_SLACK) or (height and box[3] > height + BOX_SLACK):
        size = f"the {width}x{height} image" if width and height else "the image (negative coordinates)"
        raise DataError(f"{where} {box!r} lies outside {size}")
    return box


def read_records(path, need_answer=True):
    """Our records from a JSONL file that holds at least one, validated, ids unique."""
    seen, records = {}, []
    for lineno, rec in input_rows(path):
        where = f"{path}:{lineno}"
        validate_record(rec, where, need_answer)
        check_unique(seen, rec["id"], where)
        records.append(rec)
    return records


def image_path(rec, image_root):
    return rec["image"] if os.path.isabs(rec["image"]) else os.path.join(image_root or "", rec["image"])


IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on a bad file


def load_image(rec, image_root):
    """The record's image as RGB; a missing or unreadable file, or a record that disagrees with it
    (check_against_image), raises DataError naming the record."""
    path = image_path(rec, image_root)
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except IMAGE_ERRORS as e:
        raise DataError(f"record {rec.get('id')!r}: cannot load image {path!r}: {e}") from None
    check_against_image(rec, image.size, path)
    return image


MAX_ASPECT = 200  # the Qwen processors (smart_resize) refuse an image whose long side exceeds 200 short sides


def check_against_image(rec, size, path):
    """The record's width/height (when given) are its image's, its bbox lies inside the image, and the image's
    shape is one the processor takes."""
    if max(size) > MAX_ASPECT * min(size):
        raise DataError(f"record {rec.get('id')!r}: image {path!r} is {size[0]}x{size[1]}, a side over "
                        f"{MAX_ASPECT} times the other, which the processor refuses")
    stated = (rec.get("width"), rec.get("height"))
    if stated != (None, None) and not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in stated):
        raise DataError(f"record {rec.get('id')!r}: width/height must be positive integers, got {stated[0]!r} and "
                        f"{stated[1]!r}")
    if stated != (None, None) and tuple(stated) != tuple(size):
        raise DataError(f"record {rec.get('id')!r}: width/height {stated[0]}x{stated[1]} disagree with its image "
                        f"{path!r} ({size[0]}x{size[1]})")
    if rec.get("bbox") is not None:
        check_box(rec["bbox"], f"record {rec.get('id')!r}: bbox", *size)


def image_size(rec, image_root):
    """(width, height) of the record's image from its header (no pixel decode), checked against the record
    (check_against_image). A missing file fails here, before training starts, not hours into it."""
    path = image_path(rec, image_root)
    if not os.path.isfile(path):
        raise DataError(f"record {rec.get('id')!r}: cannot load image {path!r}: no such file")
    try:
        with Image.open(path) as im:
            size = im.size
    except IMAGE_ERRORS as e:
        raise DataError(f"record {rec.get('id')!r}: cannot load image {path!r}: {e}") from None
    check_against_image(rec, size, path)
    return size


def check_images(records, image_root, show_progress=False):
    """(width, height) of every record's image, each distinct file decoded in full once (in threads) before a
    training stage starts: a missing or corrupt file, a stated size that is not the image's, or a box outside
    it is a DataError naming the record now, not when its batch is drawn after hours of training."""
    from concurrent.futures import ThreadPoolExecutor

    def decode(path):
        try:
            with Image.open(path) as im:
                im.load()
                return im.size, None
        except IMAGE_ERRORS as e:
            return None, e if os.path.isfile(path) else "no such file"

    paths = list(dict.fromkeys(image_path(rec, image_root) for rec in records))
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        decoded = dict(zip(paths, progress(pool.map(decode, paths), show_progress and len(paths) > 1000,
                                           total=len(paths), desc="checking images", unit="img")))
    sizes = []
    for rec in records:
        path = image_path(rec, image_root)
        size, error = decoded[path]
        if error is not None:
            raise DataError(f"record {rec.get('id')!r}: cannot load image {path!r}: {error}")
        check_against_image(rec, size, path)
        sizes.append(size)
    return sizes


# ------------------------------------------------------------------------------------------------- boxes
# One internal truth: pixel boxes [x1, y1, x2, y2] of the original image. Text formats only at the model's
# boundary (SPEC section 3).

BOX_FORMATS = ("viscot", "norm", "qwen2", "qwen25", "qwen3")
BOX_FORMAT_CHOICES = BOX_FORMATS + ("native",)  # native: the model family's own (FAMILIES, resolve_box_format)
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf(?:inity)?)"
_LIST4 = re.compile(rf"\[\s*\[?\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]?\s*\]", re.I)
_PAIRS = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)", re.I)
_BBOX2D = re.compile(rf"""["']?bbox_2d["']?\s*:\s*\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]""",
                     re.I)


def square_frame(w, h):
    """Visual-CoT's frame: pad to a square of side max(w, h), centred on the short axis."""
    side = max(w, h)
    return side, ((h - w) // 2 if h > w else 0), ((w - h) // 2 if w > h else 0)


def token_pixels(processor):
    """The side in pixels of one merged vision token (patch x merge: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL and
    Qwen3.5): the processor's smallest image, so no crop is smaller."""
    return processor.image_processor.patch_size * processor.image_processor.merge_size


def smart_resize_hw(processor, w, h):
    """(height, width) the Qwen image processor resizes a w x h image to (multiples of patch*merge)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    ip = processor.image_processor
    return smart_resize(h, w, factor=token_pixels(processor), min_pixels=ip.size["shortest_edge"],
                        max_pixels=ip.size["longest_edge"])


def box_to_text(box, fmt, w, h, decimals=3, resized_hw=None):
    """Pixel box -> the text the model reads/writes. resized_hw is needed for qwen25 only."""
    x1, y1, x2, y2 = box
    if fmt == "viscot":
        side, dx, dy = square_frame(w, h)
        vals = [(x1 + dx) / side, (y1 + dy) / side, (x2 + dx) / side, (y2 + dy) / side]
    elif fmt == "norm":
        vals = [x1 / w, y1 / h, x2 / w, y2 / h]
    elif fmt == "qwen2":
        q = [min(999, max(0, round(v))) for v in (x1 / w * 1000, y1 / h * 1000, x2 / w * 1000, y2 / h * 1000)]
        return f"({q[0]},{q[1]}),({q[2]},{q[3]})"
    elif fmt == "qwen25":
        rh, rw = resized_hw
        q = [round(x1 * rw / w), round(y1 * rh / h), round(x2 * rw / w), round(y2 * rh / h)]
        return json.dumps({"bbox_2d": q})
    elif fmt == "qwen3":  # Qwen3-VL / Qwen3.5: relative, 0..1000 per axis, as JSON
        q = [min(1000, max(0, round(v))) for v in (x1 / w * 1000, y1 / h * 1000, x2 / w * 1000, y2 / h * 1000)]
        return json.dumps({"bbox_2d": q})
    else:
        raise ValueError(f"unknown box format {fmt!r}; choose from {BOX_FORMATS}")
    vals = [min(1.0, max(0.0, v)) for v in vals]
    return "[" + ", ".join(f"{v:.{decimals}f}" for v in vals) + "]"


def parse_box(text, fmt, w, h, resized_hw=None, clamp=True):
    """Model text -> pixel box clamped to the image (clamp=False: as written, to check an annotation), or None.
    Never raises."""
    try:
        if not isinstance(text, str):
            return None
        if fmt in ("viscot", "norm"):
            m = _LIST4.search(text)
        elif fmt == "qwen2":
            m = _PAIRS.search(text)
        elif fmt in ("qwen25", "qwen3"):
            m = _BBOX2D.search(text) or _LIST4.search(text)
        else:
            return None
        if m is None:
            return None
        v = [float(g) for g in m.groups()]
        if not all(math.isfinite(x) for x in v):
            return None
        if fmt == "viscot":
            side, dx, dy = square_frame(w, h)
            box = [v[0] * side - dx, v[1] * side - dy, v[2] * side - dx, v[3] * side - dy]
        elif fmt == "norm":
            box = [v[0] * w, v[1] * h, v[2] * w, v[3] * h]
        elif fmt in ("qwen2", "qwen3"):
            box = [v[0] / 1000 * w, v[1] / 1000 * h, v[2] / 1000 * w, v[3] / 1000 * h]
        else:
            rh, rw = resized_hw
            box = [v[0] * w / rw, v[1] * h / rh, v[2] * w / rw, v[3] * h / rh]
        if clamp:
            return clamp_box(box, w, h)
        return box if box[2] > box[0] and box[3] > box[1] else None
    except Exception:  # noqa: BLE001 - the contract is "never raises": any surprise is "unparsable"
        return None


def clamp_box(box, w, h):
    """A pixel box clamped to the w x h image, or None when nothing of it is left inside."""
    box = [min(max(box[0], 0.0), w), min(max(box[1], 0.0), h), min(max(box[2], 0.0), w), min(max(box[3], 0.0), h)]
    return box if box[2] > box[0] and box[3] > box[1] else None


def crop_box(box, w, h, min_size):
    """Integer crop box inside the image, at least min_size on each side (grown around its centre): pass
    token_pixels(processor), the processor's minimum (SPEC 3)."""
    x1, y1, x2, y2 = box
    # A thin box's short side grows too, so the crop keeps within the processor's MAX_ASPECT.
    longest = max(min(x2, w) - max(x1, 0), min(y2, h) - max(y1, 0))
    out = []
    for lo, hi, limit in ((x1, x2, w), (y1, y2, h)):
        lo, hi = max(0.0, min(lo, limit)), max(0.0, min(hi, limit))
        size = min(limit, max(min_size, hi - lo, math.ceil(longest / MAX_ASPECT)))
        centre = (lo + hi) / 2
        start, length = int(round(min(max(centre - size / 2, 0), limit - size))), int(round(size))
        start = min(start, limit - length)  # start and size, each rounded half to even, can pass the edge by one
        out.append((start, start + length))
    return [out[0][0], out[1][0], out[0][1], out[1][1]]


def box_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_giou(a, b):
    """Generalised IoU in [-1, 1]: IoU minus the share of the enclosing box that neither covers."""
    iou = box_iou(a, b)
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return iou - (hull - union) / hull if hull > 0 else iou


# ----------------------------------------------------------------------------------------------- prompts
# Step 1 sees [full image, text]; step 2 sees [full image, text, crop] (the crop after the text, as VisRL).

PROMPT_SETS = {
    "visrl": {
        "focus": "{question} Please provide the bounding box coordinate of the region that can help you answer "
                 "the question better.",
        "answer": "{question} Please first provide the bounding box coordinate of the region, then refer to the "
                  "corresponding sub-image to answer the question better.",
    },
    "viscot": {
        "focus": "{question} Please provide the bounding box coordinate of the region that can help you answer "
                 "the question better.",
        "answer": "Please answer the question based on the original image and local detail image. {question}",
    },
}


# Multi-turn zoom (README "Zoom"): the model may answer, or zoom in by writing ZOOM_OPEN box ZOOM_CLOSE.
ZOOM_OPEN, ZOOM_CLOSE = "<zoom>", "</zoom>"
ZOOM_PROMPT = ("{question} To see a region better, write <zoom>its bounding box</zoom> and it will be shown to "
               "you; answer when you can.")


def focus_messages(question, prompt_set="visrl"):
    return [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": PROMPT_SETS[prompt_set]["focus"].format(question=question)}]}]


def direct_messages(question):
    """One step, no focus box: the image and the bare question (Visual-CoT's ablation without the chain)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def zoom_messages(question):
    """The first turn of a zoom conversation: the full image and the question with the zoom instruction."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ZOOM_PROMPT.format(question=question)}]}]


def answer_messages(question, prompt_set="visrl"):
    return [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": PROMPT_SETS[prompt_set]["answer"].format(question=question)},
                                         {"type": "image"}]}]


# Visual-RFT's detection prompt (its data carries it as `problem`; eval.py builds it for COCO ground truth).
VIRFT_DETECTION_PROMPT = (
    "Detect all objects belonging to the category '{category}' in the image, and provide the bounding boxes "
    "(between 0 and 1000, integer) and confidence (between 0 and 1, with two decimal places).\n"
    "If no object belonging to the category '{category}' in the image, return 'No Objects'.\n"
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    "The output answer format should be as follows:\n"
    "<think> ... </think> <answer>[{{'Position': [x1, y1, x2, y2], 'Confidence': number}}, ...]</answer>\n"
    "Please strictly follow the format.")


# ------------------------------------------------------------------------------------ answers and judges
# Rule judges score a model answer against a reference in [0, 1]: the offline judge for VisRL's answer
# score and Visual-CoT's answer protocol (names say which metric, so reports can too). A served judge is
# one OpenAI-compatible call. Visual-RFT answers: <answer>...</answer> extraction and the detection list
# parser (eval.py, grpo.py).

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text):
    """SQuAD's normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", _PUNCT.sub("", str(text).lower())).split())


def exact_match(pred, ref):
    """1 when the normalised answers are equal and not empty (an empty answer never scores)."""
    p = normalize_answer(pred)
    return float(bool(p) and p == normalize_answer(ref))


def token_f1(pred, ref):
    """SQuAD token F1 of the normalised answers."""
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    common_tokens = sum(min(p.count(t), r.count(t)) for t in set(p) & set(r))
    if not p or not r or common_tokens == 0:
        return float(p == r and bool(p))
    precision, recall = common_tokens / len(p), common_tokens / len(r)
    return 2 * precision * recall / (precision + recall)


def anls(pred, ref, threshold=0.5):
    """Average Normalised Levenshtein Similarity for one pair (DocVQA): 1 - edit distance / longer length
    of the lower-cased, whitespace-collapsed strings; 0 when that distance is >= threshold."""
    a, b = " ".join(str(pred).lower().split()), " ".join(str(ref).lower().split())
    if not a and not b:
        return 0.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    distance = prev[-1] / max(len(a), len(b))
    return 1.0 - distance if distance < threshold else 0.0


RULE_JUDGES = {"exact": exact_match, "f1": token_f1, "anls": anls}


def http_chat(url, model, messages, api_key=None, temperature=0.0, max_tokens=64, timeout=60, retries=3,
              backoff=1.0):
    """The reply text of one chat completion from an OpenAI-compatible endpoint (url: its base, e.g.
    http://127.0.0.1:8000/v1). Retries with exponential back-off, except on a request the server rejects
    as malformed (400/401/403/404: retrying cannot help); raises RuntimeError when it gives up."""
    import urllib.error
    import urllib.request
    body = json.dumps({"model": model, "messages": messages, "temperature": temperature,
                       "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body, headers=headers)
            with urllib.request.urlopen(req, timeout=timeout) as reply:
                content = json.loads(reply.read())["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise ValueError(f"reply content is {type(content).__name__}, not text")
            return content
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code}: {e.read()[:200]!r}"
            if e.code in (400, 401, 403, 404):
                break
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # refused, timeout, bad JSON/shape
            error = f"{type(e).__name__}: {e}"
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise RuntimeError(f"{url}: {error}")


def extract_answer(text):
    """Text between the first <answer> and the next </answer>, else the whole text (stripped)."""
    text = text if isinstance(text, str) else ""
    start = text.find("<answer>")
    if start >= 0:
        end = text.find("</answer>", start + len("<answer>"))
        if end >= 0:
            return text[start + len("<answer>"):end].strip()
    return text.strip()


def normalize_class_label(text):
    """Our strict class reading: extract_answer's content, lower case, no spaces or underscores (compared
    by exact match, non-empty; Visual-RFT's own verdict is virft_class_match)."""
    return extract_answer(text).lower().replace(" ", "").replace("_", "")


def says_no_objects(text):
    """The detection prompt's own reply for an absent category: 'No Objects' (quotes and a period allowed)."""
    return extract_answer(text).strip(" .'\"").lower() == "no objects"


def read_detections(text):
    """parse_detections, except that the detection prompt's own reply for an absent category ('No Objects')
    is no detections ([]), not an unparsable answer (None)."""
    if says_no_objects(text):
        return []
    return parse_detections(text)


def _close_truncated_list(s):
    """If the top-level list is unclosed (generation cut off), keep only the complete
    items and close it.  Returns s unchanged when brackets balance; None when nothing
    complete survives (a cut-off answer with zero finished items is not an answer)."""
    depth, in_str, escaped, last_item_end = 0, False, False, -1
    for i, ch in enumerate(s):
        if in_str:  # brackets inside strings do not count
            if escaped:
                escaped = False
            elif ch == '\\':
                escaped = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if ch == "}" and depth == 1:
                last_item_end = i  # a top-level item just closed
    if depth <= 0 or not s.startswith("["):
        return s  # balanced, or not a list at all: leave it to json / validation
    return s[:last_item_end + 1] + "]" if last_item_end >= 0 else None


def _is_num(x):
    # bool is an int subclass in Python; "Confidence": true is not a number.
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_detections(text):
    """Parse "[{'Position': [x1,y1,x2,y2], 'Confidence': c}, ...]" (0..1000 grid).

    Returns [(box[4 floats], conf float), ...], [] for an empty list, or None when
    the answer is unparsable or malformed.  Never raises."""
    try:
        s = extract_answer(text).replace('\r', '').replace('\n', '').replace("'", '"').strip()
        # A valid list of objects can never start with "[[" or end with "]]", so stripping
        # one outer bracket on each side is safe and fixes "[[{...}]]".
        if s.startswith("[["):
            s = s[1:]
        if s.endswith("]]"):
            s = s[:-1]
        s = _close_truncated_list(s)
        if s is None:
            return None
        items = json.loads(s)  # json, never eval: the text is model output
        if not isinstance(items, list):
            return None
        out = []
        for it in items:
            if not isinstance(it, dict):
                return None
            pos, conf = it.get("Position"), it.get("Confidence")
            if not (isinstance(pos, list) and len(pos) == 4 and all(map(_is_num, pos))
                    and _is_num(conf)):
                return None  # also rejects NaN/Infinity, which json accepts
            out.append(([float(v) for v in pos], float(conf)))
        return out
    except Exception:
        return None


# -------------------------------------------------------------- Visual-RFT's published readings, quirks kept
# The defaults of eval.py's virft-* protocols and grpo.py's det_* / cls_virft rewards, so that our numbers
# compare with the paper's (classification/Qwen2_VL_classification_infere.py, coco_evaluation/
# Qwen2_VL_coco_infere.py and src/virft/src/open_r1/grpo*.py in the Visual-RFT repository). The strict
# readings above (parse_detections, normalize_class_label with exact match) are the named alternatives.

VIRFT_ANSWER = re.compile(r"<answer>(.*?)</answer>")  # no DOTALL: an answer that spans lines does not match


def virft_answer(text):
    """The first single-line <answer>...</answer> content, or None when there is none."""
    found = VIRFT_ANSWER.search(text) if isinstance(text, str) else None
    return found.group(1) if found else None


def virft_class_match(answer, label):
    """Visual-RFT's class verdict: both lower-cased without spaces and underscores, then a substring either
    way -- so an empty answer matches every label (a known quirk, kept)."""
    answer, label = (s.replace(" ", "").replace("_", "").lower() for s in (answer, label))
    return label in answer or answer in label


def _virft_repair(s, drop_ellipsis):
    s = s.replace("[[", "[").replace("]]", "]").replace("\n", "")
    return s.replace(", ...", "") if drop_ellipsis else s


def _virft_list(tagged):
    """The published list reader on text holding <answer>: the content from the first <answer> to the first
    </answer> anywhere (or the end); if it does not end with ']' it is cut after its last '},' and closed
    with '}]' -- so '[{a}, {b}' keeps only {a}, '[{a}' gives nothing, and an unclosed '[{a' becomes [{a}];
    single quotes become double; json.loads. None when there is no <answer> or the JSON does not decode."""
    start = tagged.find("<answer>")
    if start < 0:
        return None
    end = tagged.find("</answer>")
    s = tagged[start + len("<answer>"):end if end >= 0 else len(tagged)]
    if not s.endswith("]"):
        s = s.rsplit("},", 1)[0] + "}]"
    try:
        return json.loads(s.replace("'", '"'))  # json, never eval: NaN/Infinity decode, as published
    except (ValueError, RecursionError):
        return None


def virft_detection_json(text, reading):
    """A detection answer decoded as Visual-RFT's published code does; the JSON value or None.
    reading "eval" (its COCO script): '[['->'[', ']]'->']', newlines and ', ...' removed from the whole
    response, then the first <answer> match re-extracted (else the whole response), stripped, then _virft_list.
    reading "reward" (its GRPO rewards): the answer extracted from the raw text first (so one spanning lines
    falls back to the whole text), stripped, then '[[', ']]' and newlines repaired (', ...' kept), then
    _virft_list. reading "solution": a ground-truth answer, read by _virft_list as it stands (text without
    <answer> tags is read as if wrapped in them; the published code would score every completion 0)."""
    text = text if isinstance(text, str) else ""
    if reading == "solution":
        text = text.strip()
        return _virft_list(text if "<answer>" in text else f"<answer>{text}</answer>")
    if reading == "eval":
        text = _virft_repair(text, drop_ellipsis=True)
    found = virft_answer(text)
    tagged = "<answer>" + (found if found is not None else text).strip() + "</answer>"
    return _virft_list(_virft_repair(tagged, drop_ellipsis=False) if reading == "reward" else tagged)


def first_unique(items, key):
    """Items whose key(item) was seen before dropped, the first kept (Visual-RFT's duplicate removal: key is
    the Position as a tuple; an item without one raises, as published)."""
    seen, unique = set(), []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            unique.append(item)
    return unique


def virft_coco_detections(text, width, height):
    """Visual-RFT's COCO script on one response: ([(xywh box in pixels, confidence as decoded), ...], failed).
    A first item that is a string ('No Objects') means no detections; duplicate Positions keep the first;
    Positions scale from 0..1000 by the image's width and height with no reordering of corners (a box with
    x2 < x1 gets a negative width); items are appended one by one, so an item that raises (a short
    Position, no Confidence) keeps those before it. failed: the answer did not decode, or raised (the
    published script's error count, plus undecodable answers that it silently skips)."""
    items, dets = virft_detection_json(text, "eval"), []
    if items is None:
        return dets, True
    try:
        if isinstance(items[0], str):
            return dets, False
        for item in first_unique(items, lambda item: tuple(item["Position"])):
            x1, y1, x2, y2 = item["Position"]
            x1, x2 = x1 / 1000.0 * width, x2 / 1000.0 * width
            y1, y2 = y1 / 1000.0 * height, y2 / 1000.0 * height
            dets.append(([x1, y1, x2 - x1, y2 - y1], item["Confidence"]))
    except Exception:  # the published script's per-response except: what was appended stays
        return dets, True
    return dets, False


# ------------------------------------------------------------------------------------ model and processor

LM_ONLY_TARGETS = r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"
# Qwen3.5's linear-attention layers have their own projections instead of q/k/v/o.
LM_HYBRID_TARGETS = r".*language_model.*\.((q|k|v|o|gate|up|down)_proj|linear_attn\.(in_proj_\w+|out_proj))"


# The special tokens that frame or stand for vision input in the Qwen chat templates (all four families).
QWEN_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


class Family(NamedTuple):
    """What differs between model families, in one place: a stage asks this table, never `if family == ...`."""
    processor: str      # the transformers processor class (saved files name it; the CPU fallback builds it)
    box_format: str     # the box text the family's released checkpoints ground in (SPEC 3)
    deepstack: bool     # intermediate vision layers feed the language model (VisionFeatures carries them)
    lora_targets: str   # the language model's linear layers, LoRA's default targets
    recurrent: bool     # linear-attention layers keep recurrent and convolution state instead of a KV cache
    vision_tokens: tuple  # special tokens of vision input: text (a response, a call, a request) may not hold them


FAMILIES = {  # by config.model_type
    "qwen2_vl": Family("Qwen2VLProcessor", "qwen2", False, LM_ONLY_TARGETS, False, QWEN_VISION_TOKENS),
    "qwen2_5_vl": Family("Qwen2_5_VLProcessor", "qwen25", False, LM_ONLY_TARGETS, False, QWEN_VISION_TOKENS),
    "qwen3_vl": Family("Qwen3VLProcessor", "qwen3", True, LM_ONLY_TARGETS, False, QWEN_VISION_TOKENS),
    "qwen3_5": Family("Qwen3VLProcessor", "qwen3", False, LM_HYBRID_TARGETS, True, QWEN_VISION_TOKENS),
}
# Any family's: text is checked before a model is known (records, requests), so against every family's tokens.
VISION_TOKENS = tuple(dict.fromkeys(t for family in FAMILIES.values() for t in family.vision_tokens))
TURN_TOKENS = ("<|im_start|>", "<|im_end|>")  # the chat template's turn markers (all four families)


def special_token_in(text):
    """The first vision special token or turn marker in text that a person or a model wrote, else None. A
    vision token would tokenize to an image placeholder (image tokens would stop matching features), a turn
    marker would end the turn early: a question, answer, response or request may hold neither."""
    return next((t for t in VISION_TOKENS + TURN_TOKENS if t in text), None)


def resolve_box_format(args):
    """--box_format native: the box text the model's family grounds in (FAMILIES), read from its config."""
    if args.box_format == "native":
        from transformers import AutoConfig
        with loading(args.model):
            args.box_format = family_of(AutoConfig.from_pretrained(args.model)).box_format
    return args.box_format


def family_of(model_or_config):
    """The FAMILIES entry of a model (PEFT-wrapped or not) or config; an unknown one is a one-line error."""
    config = getattr(model_or_config, "config", model_or_config)
    if config.model_type not in FAMILIES:
        raise DataError(f"model type {config.model_type!r} is not supported; families: {', '.join(FAMILIES)}")
    return FAMILIES[config.model_type]


def check_model_path(path, flag="--model", processor_only=False):
    """A local directory that holds a model (an adapter for --adapter), or what can only be a hub id
    (owner/name); anything else is a one-line error before transformers' own ("Repo id must be in the form
    ..."). An adapter given as a model is refused: transformers would load its base and the adapter as one
    model, with nothing left to train and no weights of its own to fingerprint. processor_only: only the
    processor is read, which an adapter directory saved by our stages also holds."""
    if os.path.isdir(path):
        has_model, has_adapter = (os.path.exists(os.path.join(path, f)) for f in ("config.json", "adapter_config.json"))
        if flag == "--adapter" and not has_adapter:
            raise DataError(f"{flag} {path}: not a PEFT adapter directory (no adapter_config.json)")
        if flag != "--adapter" and not has_model and not (processor_only and has_adapter):
            raise DataError(f"{flag} {path}: " + ("a LoRA adapter, not a model: give its base as --model and this as "
                                                  "--adapter (or merge.py them)" if has_adapter else
                                                  "not a model directory (no config.json)"))
    elif os.path.exists(path):
        raise DataError(f"{flag} {path}: a file, not a model directory")
    elif path.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise DataError(f"{flag} {path}: no such directory")


@contextlib.contextmanager
def loading(path, flag="--model", processor_only=False):
    """Checks the path, and turns what from_pretrained raises on a bad one (missing files, a hub id that is
    not there or not reachable, an unknown model type) into a one-line error naming the flag."""
    check_model_path(path, flag, processor_only)
    try:
        yield
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{flag} {path}: cannot load it ({reason})") from None


def load_processor(path, flag="--model"):
    """AutoProcessor where it works; without torchvision (CPU machines) Qwen's video processor cannot be
    built, so construct the processor from tokenizer + PIL image processor with no video processor."""
    with loading(path, flag, processor_only=True):
        return _load_processor(path)


def _load_processor(path):
    from transformers import AutoProcessor
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (ImportError, OSError):  # no torchvision; or a directory saved without a video processor
        import transformers
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        base = getattr(transformers, processor_class(path))

        class ImageOnlyProcessor(base):
            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        # Saved files name the processor class: keep the real one so AutoProcessor reads them on a GPU box.
        ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = base.__name__

        tokenizer = AutoTokenizer.from_pretrained(path)
        processor = ImageOnlyProcessor(Qwen2VLImageProcessorPil.from_pretrained(path), tokenizer,
                                       chat_template=tokenizer.chat_template)
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = "<|endoftext|>"
    return processor


def processor_class(path):
    """The processor class a directory was saved with, else its model family's (an adapter directory has no
    model config, but our stages save the processor with it)."""
    from transformers import AutoConfig
    for name in ("processor_config.json", "preprocessor_config.json"):
        if os.path.exists(os.path.join(path, name)):
            with open(os.path.join(path, name)) as f:
                cls = json.load(f).get("processor_class") or ""
            if cls:
                return cls
    return family_of(AutoConfig.from_pretrained(path)).processor


def resolve_dtype(name):
    if name == "auto":
        # including_emulation=False: a V100 or T4 "supports" bf16 only emulated (slow, and no flash attention)
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False) \
            else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_model(path, dtype=torch.float32, attn="sdpa", adapter=None, adapter_trainable=False, flag="--model"):
    """A FAMILIES model through the Auto class; optionally a PEFT adapter on top, refused when it records
    another base (check_adapter_base). flag: the option that named path, for errors."""
    from transformers import AutoModelForImageTextToText
    with loading(path, flag):
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    if adapter:
        from peft import PeftModel
        check_adapter_base(adapter, path)
        with loading(adapter, "--adapter"):
            model = PeftModel.from_pretrained(model, adapter, is_trainable=adapter_trainable)
    return model


def check_model_args(args):
    """--model and --adapter checked before a stage claims its outputs: a wrong path or an adapter of another
    base is refused without leaving anything behind."""
    check_model_path(args.model)
    if args.adapter:
        check_model_path(args.adapter, "--adapter")
        check_adapter_base(args.adapter, args.model)
    if getattr(args, "ref_model", None):
        check_model_path(args.ref_model, "--ref_model")
    check_lora_targets(args)


def check_lora_targets(args):
    """--lora_targets, when given for a new adapter, must match a module of --model's architecture: checked on a
    weightless (meta-device) build of its config, before the stage claims its outputs, not after the weights
    have loaded. PEFT full-matches a string pattern against every module name."""
    if getattr(args, "finetune", None) != "lora" or not getattr(args, "lora_targets", None) or args.adapter:
        return
    from transformers import AutoConfig, AutoModelForImageTextToText
    with loading(args.model):
        config = AutoConfig.from_pretrained(args.model)
        with torch.device("meta"):
            names = [name for name, _ in AutoModelForImageTextToText.from_config(config).named_modules()]
    if not any(re.fullmatch(args.lora_targets, name) for name in names):
        default = family_of(config).lora_targets
        example = next((name for name in names if re.fullmatch(default, name)), names[-1])
        raise DataError(f"--lora_targets {args.lora_targets!r} matches no module of --model {args.model} (the "
                        f"default matches names like {example!r})")


def check_adapter_base(adapter, model_dir):
    """Refuse an adapter whose recorded base (adapter_base.json, written by our stages) has other weights than
    model_dir: on another base its low-rank updates mean nothing, and nothing else would say so."""
    record = os.path.join(adapter, "adapter_base.json")
    if not os.path.exists(record) or not os.path.isdir(model_dir):
        return
    try:
        with open(record) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"--adapter {adapter}: unreadable adapter_base.json ({e})") from None
    if not isinstance(recorded, dict) or not {"fingerprint", "base_model"} <= recorded.keys():
        raise DataError(f"--adapter {adapter}: adapter_base.json lacks 'fingerprint' and 'base_model' (our stages "
                        "write both with the adapter)")
    actual = weights_fingerprint(model_dir)
    if actual != recorded["fingerprint"]:
        raise DataError(f"--adapter {adapter} was trained on {recorded['base_model']} (weights fingerprint "
                        f"{recorded['fingerprint']}), but --model {model_dir} has other weights (fingerprint "
                        f"{actual}): give the model it was trained from (a stage started from a merged checkpoint "
                        "has that checkpoint as its base)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the script's docstring as its help, and a bad flag answered like every other bad input:
    one line, `script: error: ...`, exit status 1 (not argparse's usage dump and 2)."""

    def __init__(self, doc, **kw):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    def error(self, message):
        raise SystemExit(f"{self.prog}: error: {message} (--help lists the flags)")

    def parse_known_args(self, args=None, namespace=None):
        """An empty value is refused wherever the flag's default is not itself empty: `--out ""` or
        `--output_dir ""` would otherwise name the working directory."""
        parsed, rest = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(parsed, action.dest, None)
            if action.option_strings and isinstance(value, str) and not value.strip() and action.default != value:
                self.error(f"{action.option_strings[0]} is empty")
        return parsed, rest


def regex(text):
    """An argparse type: a pattern re compiles (PEFT reads a string target_modules as a full-match regex)."""
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression ({e})") from None
    return text


def http_url(text):
    """An argparse type: an http(s) endpoint with a host (one without is only found when the first call fails,
    which a judge records as a failed verdict)."""
    from urllib.parse import urlparse
    parts = urlparse(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL with a host")
    return text


def bounded(kind, low=None, high=None, open_low=False, open_high=False):
    """An argparse type: a `kind` number in a range, so a bad flag value is refused before any model loads."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if open_low else value < low)) \
                or (high is not None and (value >= high if open_high else value > high)):
            lo = "-inf" if low is None else f"{low:{'d' if kind is int else 'g'}}"
            hi = "inf" if high is None else f"{high:{'d' if kind is int else 'g'}}"
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if open_low or low is None else '['}{lo}, "
                                             f"{hi}{')' if open_high or high is None else ']'}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT, COUNT, SEED = bounded(int, 1), bounded(int, 0), bounded(int, 0, 2**32 - 1 - 64)  # seed + rank
POSITIVE, NONNEGATIVE, FRACTION = bounded(float, 0, open_low=True), bounded(float, 0), bounded(float, 0, 1)
MIN_TEMPERATURE = 1e-5  # below it logits / T overflow to inf (sampling then fails); the server reads it as greedy
TEMPERATURE = bounded(float, MIN_TEMPERATURE)


def add_model_args(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="model directory or hub id (Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3.5; HF format)")
    g.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory to load on top of --model")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weights dtype; auto = bf16 on a GPU that has it, else fp32")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                   help="attention implementation")


def add_finetune_args(parser):
    g = parser.add_argument_group("fine-tuning")
    g.add_argument("--finetune", default="lora", choices=["lora", "full"], help="LoRA or full fine-tuning")
    g.add_argument("--lora_r", type=POSITIVE_INT, default=8, help="LoRA rank")
    g.add_argument("--lora_alpha", type=POSITIVE_INT, default=16, help="LoRA alpha")
    g.add_argument("--lora_dropout", type=bounded(float, 0, 1, open_high=True), default=0.0, help="LoRA dropout")
    g.add_argument("--lora_targets", type=regex, default=None,
                   help="regex of module names that get LoRA (default: the language model's linear layers, "
                        "FAMILIES[...].lora_targets)")
    g.add_argument("--train_vision", action="store_true",
                   help="also train the vision tower (full fine-tuning); frozen by default")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")


def prepare_for_training(model, args):
    """Freeze what does not train, explicitly (requires_grad=False, SPEC trap 14), then wrap LoRA."""
    if args.finetune == "lora":
        from peft import LoraConfig, get_peft_model
        if not hasattr(model, "peft_config"):
            for p in model.parameters():
                p.requires_grad_(False)
            targets = args.lora_targets or family_of(model).lora_targets
            model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                     lora_dropout=args.lora_dropout,
                                                     target_modules=targets, task_type="CAUSAL_LM"))
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(args.train_vision or not is_vision_param(name))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def load_for_training(args, ckpt=None):
    """The model a training stage starts from, prepared (prepare_for_training): --model (+ --adapter), or,
    resuming, the checkpoint's full model or its adapter on --model."""
    dtype = resolve_dtype(args.dtype)
    if ckpt and args.finetune == "full":
        model = load_model(ckpt, dtype, args.attn, flag="--resume")
    else:
        model = load_model(args.model, dtype, args.attn, adapter=ckpt or args.adapter, adapter_trainable=True)
    return prepare_for_training(model, args)


def plain_name(name):
    """A parameter's name in the bare model: PEFT's wrapper prefix and its base_layer step removed, so a
    LoRA policy's weights and a plain reference's line up."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def is_vision_param(name):
    return ".visual." in f".{name}"


def count_params(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# --------------------------------------------------------------------------------- examples and batches

class Example:
    """One chat turn to train on or generate from: images (each a record image, optionally cropped), the
    user messages, and the assistant response (None when generating). Pixels load only when encoded."""

    def __init__(self, rec, image_root, messages, response=None, crop=None, calls=(), views=()):
        """calls, views: a zoom trace's earlier model turns (each a zoom call's text) and the view each one
        opened (a crop box of the original image), shown after it as a tool turn."""
        for text in ([response] if response is not None else []) + list(calls):
            if token := special_token_in(text):
                raise DataError(f"record {rec.get('id')!r}: response holds the special token {token} "
                                f"(common.special_token_in): {text!r}")
        self.rec, self.image_root, self.messages, self.response, self.crop = rec, image_root, messages, response, crop
        self.calls, self.views = list(calls), list(views)
        self.n_tokens = self.n_labels = None  # sequence and label lengths, when a stage measures them

    def images(self, full=None):
        """The images in the order the sequence shows them: the prompt's (full image, then the crop) and each
        zoom call's view."""
        n_images = sum(1 for m in self.messages if isinstance(m["content"], list)
                       for c in m["content"] if c["type"] == "image")
        if n_images == 0:
            return []
        full = full if full is not None else load_image(self.rec, self.image_root)
        shown = [full] if n_images == 1 else [full, full.crop(tuple(self.crop))]
        return shown + [full.crop(tuple(v)) for v in self.views]


def image_token_count(processor, w, h):
    rh, rw = smart_resize_hw(processor, w, h)
    ip = processor.image_processor
    return (rh // ip.patch_size) * (rw // ip.patch_size) // (ip.merge_size ** 2)


_PROMPT_LENGTHS = weakref.WeakKeyDictionary()  # processor -> {messages as JSON: rendered prompt's token count}


def prompt_length(processor, messages):
    """Tokens of the rendered chat prompt, each image placeholder one token. Cached per processor: rendering
    the template is most of estimate_tokens' time, and a dataset repeats its prompt wordings."""
    cache = _PROMPT_LENGTHS.setdefault(processor, {})
    key = json.dumps(messages, sort_keys=True)
    if key not in cache:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        cache[key] = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return cache[key]


def estimate_tokens(processor, ex, w, h):
    """Sequence length of an example without decoding pixels: template + image tokens + response + EOS,
    and each zoom call's turn with its view's tool turn."""
    tok = processor.tokenizer
    n = prompt_length(processor, ex.messages) - (1 if ex.crop else 0) - 1
    n += image_token_count(processor, w, h)
    if ex.crop:
        n += image_token_count(processor, ex.crop[2] - ex.crop[0], ex.crop[3] - ex.crop[1])
    for call, view in zip(ex.calls, ex.views):
        n += len(tok(call, add_special_tokens=False)["input_ids"]) + 1
        n += len(tok(tool_turn_text(processor), add_special_tokens=False)["input_ids"]) - 1
        n += image_token_count(processor, view[2] - view[0], view[3] - view[1])
    if ex.response is not None:
        n += len(tok(ex.response, add_special_tokens=False)["input_ids"]) + 1
    return n


def response_ids(processor, text):
    """A model turn as the model writes it: the text's tokens and EOS."""
    tok = processor.tokenizer
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def process(processor, text, images, pixels=True):
    """processor(text, images) for one sequence. pixels=False: the same input_ids, mm_token_type_ids and
    image_grid_thw from the images' sizes alone, and no pixel_values: for a sequence whose images' vision
    features are computed once elsewhere (generation, the RL stages), so no image is preprocessed twice."""
    if pixels or not images:
        return processor(text=[text], images=images or None, return_tensors="pt")
    patch = processor.image_processor.patch_size
    grid = torch.tensor([[1, rh // patch, rw // patch] for rh, rw in (smart_resize_hw(processor, *im.size)
                                                                      for im in images)])
    pieces = text.split(processor.image_token)
    if len(pieces) != len(images) + 1:
        raise ValueError(f"{len(pieces) - 1} image placeholders in the text for {len(images)} images")
    text = pieces[0] + "".join(processor.replace_image_token({"image_grid_thw": grid}, i) + piece
                               for i, piece in enumerate(pieces[1:]))
    ids = processor.tokenizer([text], return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "mm_token_type_ids": torch.tensor(processor.create_mm_token_type_ids(ids.tolist())),
            "image_grid_thw": grid}


def encode(processor, ex, images=None, pixels=True):
    """Token ids, labels (assistant tokens + EOS only: every model turn of a zoom trace), mm_token_type_ids
    and pixels of one example. A text-only example (no image in its messages) has pixel_values and
    image_grid_thw None; pixels=False (process): image_grid_thw without pixel_values."""
    prompt = processor.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
    images = images if images is not None else ex.images()
    shown = len(images) - len(ex.views)  # the prompt's images; each zoom call's view follows its turn
    out = process(processor, prompt, images[:shown], pixels)
    ids = out["input_ids"][0]
    enc = {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX),
           "mm_token_type_ids": out["mm_token_type_ids"][0] if "mm_token_type_ids" in out else torch.zeros_like(ids),
           "pixel_values": out.get("pixel_values"), "image_grid_thw": out.get("image_grid_thw")}
    for call, image in zip(ex.calls, images[shown:]):
        enc = extend_turn(processor, enc, response_ids(processor, call), image, pixels)
    if ex.response is not None:
        enc = extend_turn(processor, enc, response_ids(processor, ex.response))
    return enc


_TOOL_TURNS = weakref.WeakKeyDictionary()  # processor -> the template text of a tool turn (tool_turn_text)


def tool_turn_text(processor):
    """What the chat template writes between a model turn's EOS and the next model turn when the runtime shows
    an image: the end of the line, a user turn holding only the image, and the assistant prompt. Read off the
    template itself, so a family's own template (Qwen3's) is followed."""
    if processor not in _TOOL_TURNS:
        mark, eos = "\x00TURN\x00", processor.tokenizer.eos_token
        messages = zoom_messages("?") + [{"role": "assistant", "content": mark},
                                         {"role": "user", "content": [{"type": "image"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if mark + eos not in text:
            raise DataError("the chat template does not close an assistant turn with EOS right after its text: "
                            "zoom conversations cannot be encoded turn by turn")
        _TOOL_TURNS[processor] = text.split(mark + eos, 1)[1]
    return _TOOL_TURNS[processor]


def extend_turn(processor, enc, ids, image=None, pixels=True):
    """A conversation's encoding (encode's dict) continued by a model turn, `ids` (EOS last; labelled), and,
    given an image, the tool turn that shows it, up to the next assistant prompt (not labelled); pixels as in
    process. The ids are the model's own tokens when it generated them: nothing is re-tokenised."""
    ids = torch.as_tensor(ids, dtype=enc["input_ids"].dtype)
    parts = {"input_ids": [enc["input_ids"], ids], "labels": [enc["labels"], ids],
             "mm_token_type_ids": [enc["mm_token_type_ids"], torch.zeros_like(ids)]}
    values, grid = enc["pixel_values"], enc["image_grid_thw"]
    if image is not None:
        tool = process(processor, tool_turn_text(processor), [image], pixels)
        t_ids = tool["input_ids"][0]
        parts["input_ids"].append(t_ids)
        parts["labels"].append(torch.full_like(t_ids, IGNORE_INDEX))
        parts["mm_token_type_ids"].append(tool["mm_token_type_ids"][0] if "mm_token_type_ids" in tool
                                          else torch.zeros_like(t_ids))
        if "pixel_values" not in tool:  # pixels=False: the conversation's images go by their features
            values = None
        else:
            values = tool["pixel_values"] if values is None else torch.cat([values, tool["pixel_values"]])
        grid = tool["image_grid_thw"] if grid is None else torch.cat([grid, tool["image_grid_thw"]])
    return {**{k: torch.cat(v) for k, v in parts.items()}, "pixel_values": values, "image_grid_thw": grid}


def collate(encoded, pad_id, side="right"):
    """Pad a list of encoded examples into one batch. Qwen's pixel_values are flat (all patches of all
    images), so they concatenate in example order, and image_grid_thw says which rows are whose."""
    n = max(len(e["input_ids"]) for e in encoded)
    batch = {"input_ids": [], "labels": [], "attention_mask": [], "mm_token_type_ids": []}
    for e in encoded:
        pad = n - len(e["input_ids"])
        for key, value in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("mm_token_type_ids", 0)):
            fill = torch.full((pad,), value, dtype=e[key].dtype)
            batch[key].append(torch.cat([e[key], fill] if side == "right" else [fill, e[key]]))
        ones, zeros = torch.ones(len(e["input_ids"]), dtype=torch.long), torch.zeros(pad, dtype=torch.long)
        batch["attention_mask"].append(torch.cat([ones, zeros] if side == "right" else [zeros, ones]))
    batch = {k: torch.stack(v) for k, v in batch.items()}
    with_images = [e for e in encoded if e["image_grid_thw"] is not None]
    batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images]) if with_images else None
    with_pixels = with_images and all(e["pixel_values"] is not None for e in with_images)  # else: features given
    batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images]) if with_pixels else None
    return batch


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def token_logprobs(model, batch, temperature=1.0, features=None):
    """Log-probabilities of the labelled tokens: (B, T-1) with 0 where unlabelled, and the label mask.
    Only labelled positions are projected onto the vocabulary (the image-heavy prompt never is), in
    float32 or wider, with the sampling temperature applied (SPEC trap 10). `features`: the batch's images' vision
    features in order (vision_features), used instead of batch["pixel_values"], so sequences that share an
    image (chosen and rejected) share one encode; sequences that open with the same prompt and images run it
    once (prefix_groups)."""
    labels = batch["labels"]
    labelled = labels[:, 1:] != IGNORE_INDEX
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labelled  # the logits at t predict token t+1
    groups = prefix_groups(model, batch, features)
    if groups is not None:
        logits = shared_prefix_logits(model, batch, features, keep, *groups)
    else:
        vision = {"pixel_values": batch.get("pixel_values")} if features is None else \
            {"mm_encoder_outputs": {"image": _encoder_outputs(features)}}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       image_grid_thw=batch.get("image_grid_thw"), mm_token_type_ids=batch["mm_token_type_ids"],
                       logits_to_keep=keep, use_cache=False, **vision).logits
    # at least float32 (a bf16 model's logits are not), in row-major order: (number of labelled tokens, vocab)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, labels[:, 1:][labelled].unsqueeze(-1)).squeeze(-1)
    per_token = torch.zeros(labelled.shape, dtype=logp.dtype, device=logp.device)
    per_token = per_token.masked_scatter(labelled, logp)
    return per_token, labelled


# Shared prefixes. The G rollouts of a GRPO prompt, a DPO pair's chosen and rejected response, open with the same
# prompt and image: its tokens run through the language model once, and each sequence continues from that
# prompt's KV cache (the same logits and gradients, to float rounding: tests/test_batching.py). A prompt of P tokens
# with G completions of C costs P + G*C tokens instead of G*(P + C).

def prefix_groups(model, batch, features):
    """Which rows of a batch share a prefix: for each row, the length of its prefix and its group's index, and
    each group's first row; None when no two rows share one, or when the model cannot continue a batch from a
    KV cache as the full forward would run (shared_prefix_logits). Rows share a prefix when its tokens are the
    same and so are its images, by identity: one VisionFeatures object, so one encode. A prefix ends before the
    first position whose logits are kept and before an image of the row's (a crop) the others need not share;
    each row takes the longest prefix another row shares (none: its own, and no saving)."""
    if not features or not _continues_from_cache(model):
        return None
    if not bool(batch["attention_mask"][:, 0].all()):  # a left-padded batch (collate pads right): run it whole,
        return None                                     # as the prefixes below start every row at position 0
    ids, types = batch["input_ids"].tolist(), batch["mm_token_type_ids"].tolist()
    labelled = (batch["labels"] != IGNORE_INDEX).tolist()
    lengths = batch["attention_mask"].sum(1).tolist()
    candidates, seen, first = [], {}, 0
    for row in range(len(ids)):
        n = lengths[row]
        runs = _image_runs(types[row][:n])  # one run of image tokens per image, in the order of `features`
        images = [id(f) for f in features[first:first + len(runs)]]
        first += len(runs)
        cut = min([t for t in range(1, n) if labelled[row][t]] or [n]) - 1  # logits at cut predict the first label
        cuts = sorted({max(1, min([s for s, e in runs if s < c < e] or [c])) for c in
                       [s for s, _ in runs[1:] if s <= cut] + [cut]})
        keys = [(tuple(ids[row][:c]), tuple(im for im, (_, e) in zip(images, runs) if e <= c)) for c in cuts]
        candidates.append(list(zip(cuts, keys)))
        for key in keys:
            seen[key] = seen.get(key, 0) + 1
    if first != len(features):  # not one run per image (a video): no sharing
        return None
    chosen = [max([ck for ck in row if seen[ck[1]] > 1] or row, key=lambda ck: ck[0]) for row in candidates]
    group, owners, cuts = {}, [], []
    for row, (cut, key) in enumerate(chosen):
        if key not in group:
            group[key] = len(owners)
            owners.append(row)
        cuts.append(cut)
    if len(owners) == len(ids):
        return None
    return cuts, [group[key] for _, key in chosen], owners


def _image_runs(types):
    """(start, end) of each run of image tokens (mm_token_type_ids 1) in one row."""
    runs, start = [], None
    for t, kind in enumerate(types + [0]):
        if kind == 1 and start is None:
            start = t
        elif kind != 1 and start is not None:
            runs.append((start, t))
            start = None
    return runs


def _continues_from_cache(model):
    """Whether a forward can continue from another forward's KV cache with explicit positions and padding
    inside the cache, as shared_prefix_logits does: attention layers only (Qwen3.5's linear-attention layers
    keep a recurrent state instead), an attention whose masks take padding anywhere (sdpa, eager), and no
    gradient checkpointing (a checkpointed layer drops the cache)."""
    inner = _base_model(model)
    return (not family_of(inner).recurrent and not inner.is_activation_checkpointing
            and inner.config._attn_implementation in ("sdpa", "eager")
            and hasattr(getattr(inner, "model", None), "get_rope_index"))


def _base_model(model):
    """The transformers model under a DeepSpeed engine and a PEFT wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shared_prefix_logits(model, batch, features, keep, cuts, group_of, owners):
    """The logits at `keep` (token_logprobs) in two forwards: each group's prefix once (its first row's first
    `cut` tokens), then every row's rest on its group's KV cache. Positions are the full rows' (multimodal RoPE
    counts an image as fewer positions than tokens), so each token is where the single forward puts it."""
    device, mask = batch["input_ids"].device, batch["attention_mask"]
    positions, _ = _base_model(model).model.get_rope_index(  # prefix_groups shares only batches with images
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=mask)
    lengths = mask.sum(1).tolist()
    image_of = []  # each image's row and span, in the order of `features`
    for row, types in enumerate(batch["mm_token_type_ids"].tolist()):
        image_of += [(row, span) for span in _image_runs(types[:lengths[row]])]

    def part(rows, spans, in_part):
        """A padded batch of the given (row, start, end) pieces, and the images whose tokens they hold."""
        width = max(end - start for start, end in spans)
        ids = torch.full((len(rows), width), 0, dtype=batch["input_ids"].dtype, device=device)
        types = torch.zeros_like(ids)
        att = torch.zeros_like(ids)
        pos = torch.zeros((positions.shape[0], len(rows), width), dtype=positions.dtype, device=device)
        for i, (row, (start, end)) in enumerate(zip(rows, spans)):
            ids[i, :end - start] = batch["input_ids"][row, start:end]
            types[i, :end - start] = batch["mm_token_type_ids"][row, start:end]
            att[i, :end - start] = 1
            pos[:, i, :end - start] = positions[:, row, start:end]
        shown = [k for k, (row, span) in enumerate(image_of) if in_part(row, span)]
        vision = {"image_grid_thw": batch["image_grid_thw"][shown] if shown else None}
        if shown:
            vision["mm_encoder_outputs"] = {"image": _encoder_outputs(features[k] for k in shown)}
        return ids, types, att, pos, vision

    is_owner = set(owners)
    ids, types, att, pos, vision = part(owners, [(0, cuts[r]) for r in owners],
                                        lambda row, span: row in is_owner and span[1] <= cuts[row])
    cache = model(input_ids=ids, attention_mask=att, position_ids=pos, mm_token_type_ids=types, use_cache=True,
                  logits_to_keep=torch.zeros_like(att, dtype=torch.bool), **vision).past_key_values
    cache.batch_select_indices(torch.tensor(group_of, device=device))
    rows = list(range(len(cuts)))
    prefix_att = att[group_of]
    ids, types, att, pos, vision = part(rows, [(cuts[r], lengths[r]) for r in rows],
                                        lambda row, span: span[0] >= cuts[row])
    rest_keep = torch.zeros_like(att, dtype=torch.bool)
    for r in rows:
        rest_keep[r, :lengths[r] - cuts[r]] = keep[r, cuts[r]:lengths[r]]
    return model(input_ids=ids, attention_mask=torch.cat([prefix_att, att], 1), position_ids=pos,
                 mm_token_type_ids=types, past_key_values=cache, use_cache=True, logits_to_keep=rest_keep,
                 **vision).logits


def _encoder_outputs(features):
    """Per-image features (vision_features) as the model's forward takes them back (mm_encoder_outputs)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    features = list(features)
    out = BaseModelOutputWithPooling(pooler_output=[f.embeds for f in features])
    if features and features[0].deepstack:  # one list per injected layer, each with one tensor per image
        out["deepstack_features"] = [[f.deepstack[k] for f in features] for k in range(len(features[0].deepstack))]
    return out


class VisionFeatures(tuple):
    """One image's vision features: its final embeddings (tokens, hidden) and, for families that inject
    intermediate vision layers into the language model (Qwen3-VL's DeepStack), one tensor per such layer.
    A sequence that shows the image takes both back; computed once, they serve every sequence."""

    def __new__(cls, embeds, deepstack=()):
        return super().__new__(cls, (embeds, tuple(deepstack)))

    embeds = property(lambda self: self[0])
    deepstack = property(lambda self: self[1])


def vision_features(model, processor, images):
    """The vision tower's output for each image (VisionFeatures), with gradients when the vision tower
    trains. Computed once, it serves every sequence that shows the image; the same image object given
    twice is encoded once."""
    if not images:
        return []
    unique = list({id(im): im for im in images}.values())
    pixels = processor.image_processor(images=unique, return_tensors="pt")
    base = _base_model(model)
    dtype = next(base.parameters()).dtype
    out = base.get_image_features(pixels["pixel_values"].to(base.device, dtype),
                                  pixels["image_grid_thw"].to(base.device), return_dict=True)
    layers = getattr(out, "deepstack_features", None) or []  # each layer already split per image
    per_image = [VisionFeatures(embeds, [layer[i] for layer in layers]) for i, embeds in enumerate(out.pooler_output)]
    by_id = dict(zip((id(im) for im in unique), per_image))
    return [by_id[id(im)] for im in images]


@torch.no_grad()
def image_features(model, processor, images):
    """vision_features without gradients, for generation."""
    return vision_features(model, processor, images)


@torch.no_grad()
def generate_tokens(model, processor, examples, max_new_tokens=32, do_sample=False, temperature=1.0, images=None,
                    features=None, max_time=None):
    """Batched generation (left padding) for a list of Examples. Returns, per example, the prompt length and
    the completion's token ids up to and including the first EOS (cut there: what follows is padding),
    and whether it stopped at EOS (False: it hit max_new_tokens, or ran max_time seconds). `features`: per
    example, its images' precomputed vision features (image_features), used instead of running the vision
    tower again."""
    encoded = [encode(processor, ex, images[i] if images else None, pixels=features is None)
               for i, ex in enumerate(examples)]
    return generate_encoded(model, processor, encoded, max_new_tokens, do_sample, temperature, features, max_time)


@torch.no_grad()
def generate_encoded(model, processor, encoded, max_new_tokens=32, do_sample=False, temperature=1.0, features=None,
                     max_time=None):
    """generate_tokens on prompts already encoded (encode): a prompt sampled G times is encoded once and
    listed G times."""
    batch = to_device(collate(encoded, processor.tokenizer.pad_token_id, side="left"), model.device)
    batch.pop("labels")
    if batch["image_grid_thw"] is None:  # text-only prompts
        batch.pop("pixel_values"), batch.pop("image_grid_thw")
    elif features is not None:
        batch.pop("pixel_values")
        batch["mm_encoder_outputs"] = {"image": _encoder_outputs(f for per_example in features for f in per_example)}
    eos = processor.tokenizer.eos_token_id
    # synced_gpus=False: under ZeRO-3 training generates on gathered weights (Runtime.gathered), so a rank
    # need not keep stepping until every rank is done (HF's default there), nor call generate when others do.
    # Every setting that shapes the distribution given here, so a checkpoint's generation_config.json (Qwen2-VL's
    # and Qwen2.5-VL's carry top_k 1, top_p 0.001, repetition_penalty 1.05) cannot reach in: samples come from
    # the policy at `temperature` as the GRPO loss assumes, and greedy is the argmax.
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                         temperature=temperature if do_sample else None, top_p=None, top_k=None,
                         repetition_penalty=1.0, no_repeat_ngram_size=0,
                         pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=eos, synced_gpus=False,
                         max_time=max_time)
    results = []
    for e, row in zip(encoded, out[:, batch["input_ids"].shape[1]:].tolist()):
        stop = row.index(eos) + 1 if eos in row else len(row)
        results.append({"prompt_tokens": len(e["input_ids"]), "ids": row[:stop], "stopped": eos in row})
    return results


def generate(model, processor, examples, max_new_tokens=32, do_sample=False, temperature=1.0, images=None,
             features=None):
    """Batched generation; returns the decoded responses (special tokens dropped)."""
    results = generate_tokens(model, processor, examples, max_new_tokens, do_sample, temperature, images, features)
    return processor.tokenizer.batch_decode([r["ids"] for r in results], skip_special_tokens=True)


# ------------------------------------------------------------------------------------- multi-turn zoom
# A zoom call's box is written in the run's box format relative to the image the model is looking at (its
# view: the full image, or the crop the last call opened); the runtime maps it back to the original image by
# the view's offset (exact: a view is an integer crop and the box is read in the view's own frame, however the
# processor rescales it), crops the original there (at least one
# vision token a side), and shows that crop as a tool turn.

def zoom_call_text(box, view, box_format, decimals, processor):
    """The zoom call that opens `box` (original pixels) from `view` (a crop box of the original): the inverse of
    zoom_box's reading, up to the box format's rounding."""
    vw, vh = view[2] - view[0], view[3] - view[1]
    resized = smart_resize_hw(processor, vw, vh) if box_format == "qwen25" else None
    local = [box[0] - view[0], box[1] - view[1], box[2] - view[0], box[3] - view[1]]
    return ZOOM_OPEN + box_to_text(local, box_format, vw, vh, decimals, resized) + ZOOM_CLOSE


def zoom_box(text, view, box_format, processor):
    """What a model turn asks for: None when it makes no zoom call (the turn is the answer), "invalid" when it
    opens a call that does not close ("<zoom>[...]</zooom>": read as an answer it would hide a broken call among
    the wrong answers) or whose box does not parse, else the box in original pixels (the runtime shows crop_box
    of it)."""
    start = text.find(ZOOM_OPEN)
    if start < 0:
        return None
    end = text.find(ZOOM_CLOSE, start + len(ZOOM_OPEN))
    if end < 0:
        return "invalid"
    vw, vh = view[2] - view[0], view[3] - view[1]
    resized = smart_resize_hw(processor, vw, vh) if box_format == "qwen25" else None
    box = parse_box(text[start + len(ZOOM_OPEN):end], box_format, vw, vh, resized)
    if box is None:
        return "invalid"
    return [view[0] + box[0], view[1] + box[1], view[0] + box[2], view[1] + box[3]]


def cut_vision_tokens(ids, vision_ids):
    """Generated ids up to the first vision special token (SPEC trap 3: it would be read as an image
    placeholder in a training forward or the next turn), and whether one was there."""
    for i, t in enumerate(ids):
        if t in vision_ids:
            return ids[:i], True
    return ids, False


def model_tokens(seq):
    """The model's own tokens in a sequence (a GRPO sequence, or a zoom conversation): its last turn and the
    earlier turns labelled in its prompt's encoding."""
    return len(seq["ids"]) + int((seq["enc"]["labels"] != IGNORE_INDEX).sum())


@torch.no_grad()
def zoom_conversations(model, processor, encoded, images, features, box_format, max_turns, max_context=None, **gen):
    """Multi-turn zoom for a batch of conversations, turn by turn: every conversation still going generates in
    one batched call, the views its calls open are encoded in one vision pass (each once), and each new turn
    continues the conversation's encoding (extend_turn: its own tokens, never re-tokenised). encoded[k]: the
    first turn's prompt (zoom_messages, encoded; a prompt sampled G times is listed G times), images[k] its
    full image, features[k] that image's features. Conversations that open the same view of the same image
    (samples of one prompt often do) share one crop and one encode of it. A conversation ends at a turn without
    a zoom call (the answer), at an invalid call, at a vision token, at a turn cut by max_new_tokens (an answer
    if it holds no call, else an invalid call, closed or not), after max_turns turns, or at a call whose view
    would leave no room for a next turn of max_new_tokens within max_context tokens (the whole conversation:
    prompt, images and turns; the first turn always runs), so no conversation grows past max_context.

    Returns, per conversation: enc (everything before its last turn, earlier turns labelled), ids (the last
    turn), text (the last turn, decoded), stopped (the last turn ended with EOS), images and features (every
    image shown, in order), boxes (each call's box in original pixels) and views (the crop it opened, at least
    one vision token a side), turns, invalid (an unparsable call or a vision token), max_turns_hit (its last
    allowed turn was still a zoom call), context_hit (its last turn was a call that max_context refused), and
    answered (none of those three: its last turn is an answer, not a call)."""
    tok = processor.tokenizer
    vision_ids = set(tok.convert_tokens_to_ids(list(VISION_TOKENS)))
    convs = [{"enc": e, "images": [im], "features": [f], "boxes": [], "views": [], "turns": 0, "invalid": False,
              "max_turns_hit": False, "context_hit": False} for e, im, f in zip(encoded, images, features)]
    going, shown = list(range(len(convs))), {}  # (id of the full image, view) -> (crop, its features)
    for turn in range(max_turns):
        results = generate_encoded(model, processor, [convs[k]["enc"] for k in going],
                                   features=[convs[k]["features"] for k in going], **gen)
        opened = []
        for k, res in zip(going, results):
            c = convs[k]
            ids, bad = cut_vision_tokens(res["ids"], vision_ids)
            text = tok.decode(ids, skip_special_tokens=True)
            c["turns"] += 1
            full = c["images"][0]
            view = c["views"][-1] if c["views"] else [0, 0, full.width, full.height]
            call = None if bad else zoom_box(text, view, box_format, processor)
            if call is not None and not res["stopped"]:
                call = "invalid"  # a call in a turn max_new_tokens cut: never finished, and not an answer either
            if call is None or call == "invalid" or turn == max_turns - 1:
                c.update(ids=ids, text=text, stopped=res["stopped"] and not bad, invalid=bad or call == "invalid",
                         max_turns_hit=call not in (None, "invalid"))
            else:
                opened.append((k, ids, call, crop_box(call, full.width, full.height, token_pixels(processor))))
        crops, going = {}, []  # a view shown in this batch is cut from its image once
        for k, ids, call, view in opened:
            c = convs[k]
            key = (id(c["images"][0]), tuple(view))
            if key not in shown and key not in crops:
                crops[key] = c["images"][0].crop(view)
            crop = shown[key][0] if key in shown else crops[key]
            enc = extend_turn(processor, c["enc"], ids, crop, pixels=False)
            if max_context and len(enc["input_ids"]) + gen["max_new_tokens"] > max_context:
                c.update(ids=ids, text=tok.decode(ids, skip_special_tokens=True), stopped=True, context_hit=True)
                continue
            c.update(enc=enc, key=key)
            c["images"].append(crop)
            c["boxes"].append(call)
            c["views"].append(view)
            going.append(k)
        new = [key for key in dict.fromkeys(convs[k]["key"] for k in going) if key not in shown]  # each once
        new_crops = [crops[key] for key in new]
        shown.update(zip(new, zip(new_crops, image_features(model, processor, new_crops))))
        for k in going:
            convs[k]["features"].append(shown[convs[k].pop("key")][1])
        if not going:
            break
    for c in convs:
        c["answered"] = not (c["invalid"] or c["max_turns_hit"] or c["context_hit"])
    return convs


def check_zoom_flags(parser, args, zoom, where):
    """--max_turns and --max_context mean something to the zoom loop only: given to a run without one they
    would be ignored, so they are refused; --max_turns then takes its default, 3."""
    given = [flag for flag, value in (("--max_turns", args.max_turns), ("--max_context", args.max_context))
             if value is not None]
    if given and not zoom:
        parser.error(f"{' and '.join(given)} only apply to {where}")
    args.max_turns = 3 if args.max_turns is None else args.max_turns


# ----------------------------------------------------------------------------------------------- runtime

def add_runtime_args(parser):
    g = parser.add_argument_group("runtime")
    g.add_argument("--output_dir", required=True, help="where checkpoints, metrics and the final model go")
    g.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (e.g. configs/zero2.json)")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; do not pass")
    g.add_argument("--seed", type=SEED, default=42, help="seed for data order, init and sampling")
    g.add_argument("--lr", type=POSITIVE, default=1e-4, help="peak learning rate")
    g.add_argument("--min_lr_ratio", type=FRACTION, default=0.0, help="cosine decays to lr * this")
    g.add_argument("--weight_decay", type=NONNEGATIVE, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup_ratio", type=FRACTION, default=0.1, help="share of steps with linear warm-up")
    g.add_argument("--epochs", type=POSITIVE, default=3.0, help="passes over the data")
    g.add_argument("--max_steps", type=COUNT, default=0, help="stop after this many optimizer steps (0: epochs)")
    g.add_argument("--batch_size", type=POSITIVE_INT, default=4, help="examples per micro-batch per rank")
    g.add_argument("--grad_accum", type=POSITIVE_INT, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max_grad_norm", type=NONNEGATIVE, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--save_steps", type=COUNT, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--save_total_limit", type=COUNT, default=2, help="keep this many step checkpoints (0: all)")
    g.add_argument("--resume", default=None,
                   help="checkpoint directory to continue from exactly, or 'latest' for the newest in --output_dir")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's outputs in --output_dir (without it, or --resume, they are refused)")
    g.add_argument("--log_steps", type=POSITIVE_INT, default=1, help="write a metrics line every N steps")


class Runtime:
    """The distributed side of a training loop, the same under `deepspeed`, `torchrun` and plain `python`:
    process group, device, wrapped model, optimizer and cosine schedule, backward/step with accumulation and
    clipping, and checkpoints. The loop itself stays in the stage script."""

    def __init__(self, args, stage):
        self.args, self.stage = args, stage  # the stage's name is written into its checkpoints (resolve_resume)
        if args.dtype == "fp16" and not args.deepspeed:
            raise DataError("--dtype fp16 trains only under --deepspeed (its loss scaling keeps small gradients "
                            "from underflowing to 0); use bf16 or fp32")
        self.order = None  # what decides each step's items, written into checkpoints too (data_order)
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
            if self.world > 1 and "OMP_NUM_THREADS" not in os.environ:
                # CPU ranks each default to every core and then fight over them (steps 10x slower). torchrun
                # sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
                local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or self.world)
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        self.use_deepspeed = bool(args.deepspeed)
        self.ds_config = self._deepspeed_config() if self.use_deepspeed else None  # read before any process group
        if self.use_deepspeed:
            import deepspeed
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        elif self.world > 1:
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.is_main = self.rank == 0
        self.zero3 = bool(self.ds_config) and self.ds_config.get("zero_optimization", {}).get("stage") == 3
        # The same seed on every rank while the model is built (LoRA init must agree across ranks, ZeRO-3
        # partitions whatever each rank holds); setup() then gives each rank its own stream for dropout.
        seed_everything(args.seed)
        self._hf_ds = None
        if self.zero3:
            # Tells from_pretrained to partition weights as they load (a 7B model never sits whole on a rank).
            from transformers.integrations import HfDeepSpeedConfig
            self._hf_ds = HfDeepSpeedConfig(self.ds_config)

    def data_order(self, n_items, global_batch):
        """What decides the items each step draws (step_indices): kept for this run's checkpoints, and a
        --resume from a checkpoint drawn in another order is refused (resolve_resume)."""
        self.order = {"items": n_items, "global_batch": global_batch, "seed": self.args.seed,
                      "data": file_fingerprint(self.args.data)}
        return self.order

    def _deepspeed_config(self):
        a = self.args
        try:
            with open(a.deepspeed) as f:
                cfg = json.load(f)
        except OSError as e:
            raise DataError(f"--deepspeed {a.deepspeed}: {e.strerror}") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f"--deepspeed {a.deepspeed}: not a JSON config ({e})") from None
        if not isinstance(cfg, dict):
            raise DataError(f"--deepspeed {a.deepspeed}: not a JSON object")
        dtype = resolve_dtype(a.dtype)
        fill = {"train_micro_batch_size_per_gpu": a.batch_size, "gradient_accumulation_steps": a.grad_accum,
                "train_batch_size": a.batch_size * a.grad_accum * self.world,
                "gradient_clipping": a.max_grad_norm, "zero_allow_untested_optimizer": True}
        for key, value in fill.items():
            if cfg.get(key, "auto") == "auto":
                cfg[key] = value
        for key, on in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
            if cfg.get(key, {}).get("enabled") == "auto":
                cfg[key]["enabled"] = on
        zero = cfg.get("zero_optimization", {})
        for key in list(zero):
            if zero[key] == "auto":
                zero.pop(key)  # DeepSpeed's own default (HF derives these from the hidden size; we keep it simple)
        return cfg

    def setup(self, model, total_steps):
        """Wrap the model for the launcher and build AdamW + warm-up/cosine schedule over trainable params."""
        a = self.args
        params = [p for p in model.parameters() if p.requires_grad]
        self.total_steps = total_steps
        warmup = int(round(a.warmup_ratio * total_steps))

        def lr_lambda(step):
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total_steps - warmup)
            return a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        if not self.use_deepspeed:
            # Trainable weights in float32 (AdamW updates vanish in bf16); matmuls run under autocast.
            # DeepSpeed keeps its own float32 master copy instead.
            for p in params:
                p.data = p.data.float()
        # A plain torch AdamW: DeepSpeed's fused/CPU Adam would JIT-compile C++ for minutes on a cold machine.
        optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.999))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.module = model
        if self.use_deepspeed:
            import deepspeed
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
                model_parameters=params)
            self.model = self.engine
        else:
            model.to(self.device)
            self.optimizer, self.scheduler = optimizer, scheduler
            self.model = model
            if self.world > 1:
                self.model = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        self.autocast_dtype = resolve_dtype(a.dtype) if not self.use_deepspeed else None
        seed_everything(a.seed + self.rank)
        return self.model

    def frozen(self, model):
        """A model that only runs forward (a reference), on this rank's device. Under ZeRO-3 it was loaded
        partitioned (from_pretrained sees the ZeRO-3 config), so it gets an inference engine whose hooks
        gather each layer's weights as it runs, and DeepSpeed casts it as it casts the policy. Elsewhere it is a
        plain copy on the device, each weight in the dtype of the policy's weight of that name: setup() keeps
        the policy's trainable weights in float32 (without DeepSpeed) or ZeRO-2 casts a LoRA policy's adapter to
        bf16 (PEFT loads the reference's in float32), and under autocast embeddings, norms and LoRA run in
        their weight's dtype, so a reference loaded as is would start the run with a non-zero KL."""
        model.eval().requires_grad_(False)
        if self.zero3:
            import deepspeed
            engine, *_ = deepspeed.initialize(model=model, config=self.ds_config)
            engine.eval()
            return engine.module
        policy = {plain_name(n): p.dtype for n, p in self.module.named_parameters()}
        for name, p in model.named_parameters():
            dtype = policy.get(plain_name(name), p.dtype)
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
        return model.to(self.device)

    @contextlib.contextmanager
    def gathered(self):
        """ZeRO-3: the whole model's weights gathered on every rank while generating, with DeepSpeed's hooks
        off meanwhile, so decoding runs on full weights instead of all-gathering every layer for every new
        token; memory for one full copy per rank. Elsewhere nothing to do."""
        if not self.zero3:
            yield
            return
        import deepspeed
        offload = self.engine.optimizer.parameter_offload
        for p in self.module.parameters():
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
                yield
        finally:
            coordinator = offload.param_coordinator
            if not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()  # the generation forwards are not the training trace
            offload._register_deepspeed_module(offload.module)

    def autocast(self):
        """bf16/fp16 autocast outside DeepSpeed (DeepSpeed casts the module itself)."""
        on = self.autocast_dtype in (torch.bfloat16, torch.float16) and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=on)

    def no_sync(self, last_micro):
        """Skip the DDP gradient all-reduce on all but the last micro-batch of a step."""
        if not last_micro and isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss):
        """Backward of a loss already normalised for the whole global step (every rank, every micro-batch):
        gradients must add up across both. DDP and DeepSpeed average over ranks, DeepSpeed also divides by
        the accumulation steps, so undo those averages here. DeepSpeed's contract is one engine.step() per
        micro-batch (it updates only at the accumulation boundary), so it is called here too."""
        if self.use_deepspeed:
            self.engine.backward(loss * self.world * self.args.grad_accum)
            self.engine.step()
        else:
            (loss * self.world).backward()

    def step(self):
        """Clip, optimizer and schedule step, zero grads; returns the pre-clip gradient norm."""
        if self.use_deepspeed:
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        params = [p for p in self.module.parameters() if p.requires_grad]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self):
        return self.scheduler.get_last_lr()[0]

    def all_sum(self, value):
        """Sum a number over ranks (e.g. the global count of label tokens that normalises the loss)."""
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return float(t.item())

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def close(self):
        """Tear down in order: DeepSpeed's engine first (ZeRO-3's prefetch and hooks can hold gloo work), then,
        once every rank is past its last collective, the process groups. A rank that aborted at exit after a
        finished run (std::terminate in rank 1 of a two-rank ZeRO-3 run on CPU, once in CI) made the launcher
        report failure for a complete run."""
        if getattr(self, "engine", None) is not None:
            self.engine.destroy()
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def global_order(n_items, seed, epoch):
    """The data order of one epoch, the same on every rank and in every run with the same seed: the
    position in it is the only data state a checkpoint needs."""
    return np.random.default_rng([seed, epoch]).permutation(n_items).tolist()


def step_counts(n_items, args, world, what):
    """(global batch, steps per epoch, total steps) of a stage over n_items training items."""
    global_batch = args.batch_size * args.grad_accum * world
    if n_items < global_batch:
        raise DataError(f"{n_items} usable {what}, fewer than one global batch of {global_batch} (--batch_size "
                        f"{args.batch_size} x --grad_accum {args.grad_accum} x {world} rank(s))")
    steps_per_epoch = n_items // global_batch
    return global_batch, steps_per_epoch, args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))


def step_indices(n_items, step, global_batch, seed):
    """Indices of the examples that make up optimizer step `step` (all ranks, all micro-batches), walking
    through epochs of shuffled orders; a partial last batch of an epoch is dropped."""
    per_epoch = n_items // global_batch
    epoch, k = divmod(step, per_epoch)
    order = global_order(n_items, seed, epoch)
    return order[k * global_batch:(k + 1) * global_batch]


# ------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(rt, processor, out_dir, step, extra=None):
    """An HF/PEFT model directory plus the exact training state, written to a temporary directory and
    renamed into place, so a kill never leaves a half checkpoint that --resume would take."""
    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    rt.barrier()
    if rt.use_deepspeed:
        rt.engine.save_checkpoint(tmp, tag="deepspeed", client_state={"step": step})
    state_dict = gathered_state_dict(rt)
    if rt.is_main:
        save_model(rt.module, processor, tmp, state_dict)
        state = {"step": step, "extra": extra or {}}
        if not rt.use_deepspeed:
            state.update(optimizer=rt.optimizer.state_dict(), scheduler=rt.scheduler.state_dict())
        torch.save(state, os.path.join(tmp, "training_state.pt"))
        with open(os.path.join(tmp, CHECKPOINT_INFO), "w") as f:  # what --resume checks before loading anything
            json.dump({"stage": rt.stage, "finetune": rt.args.finetune, "step": step, "order": rt.order,
                       "model": model_identity(rt.args.model)}, f)
    # Every rank's RNG: dropout and sampling continue as if never stopped.
    torch.save(rng_state(), os.path.join(tmp, f"rng_state_{rt.rank}.pt"))
    rt.barrier()
    if rt.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune_checkpoints(out_dir, rt.args.save_total_limit)
    rt.barrier()
    return final


def save_last(rt, processor, out_dir, step):
    """The end of a stage: the last step's checkpoint (what --resume reads) and the model alone as OUT/final."""
    save_checkpoint(rt, processor, out_dir, step)
    return save_final(rt, processor, out_dir)


def gathered_state_dict(rt):
    """Under ZeRO-3 each rank holds a slice of every weight: gather a full 16-bit copy for saving (a
    collective, every rank calls it). None elsewhere: save_pretrained reads the module itself."""
    if rt.zero3:
        return rt.engine._zero3_consolidated_16bit_state_dict()
    return None


def save_final(rt, processor, out_dir):
    """The trained model alone (no training state) as out_dir/final, written then renamed into place."""
    final = os.path.join(out_dir, "final")
    tmp = final + ".tmp"
    state_dict = gathered_state_dict(rt)
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(rt.module, processor, tmp, state_dict)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    rt.barrier()
    return final


def save_model(module, processor, out_dir, state_dict=None):
    """Save weights (a PEFT adapter, or the full model) with the processor, as a from_pretrained directory.
    An adapter also records which base it was trained on (adapter_base.json), so merge.py can refuse a
    different one."""
    module.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    base = getattr(module, "peft_config", {}).get("default")
    if base is not None and os.path.isdir(base.base_model_name_or_path or ""):
        with open(os.path.join(out_dir, "adapter_base.json"), "w") as f:
            json.dump({"base_model": base.base_model_name_or_path,
                       "fingerprint": weights_fingerprint(base.base_model_name_or_path)}, f, indent=1)
    processor.save_pretrained(out_dir)
    # preprocessor_config.json as in the checkpoints Qwen ships: AutoProcessor builds the video processor
    # from it too, so the saved directory loads like the original one.
    processor.image_processor.save_pretrained(out_dir)


def weights_fingerprint(model_dir):
    """A hash of a model directory's weights that reads little: every tensor's shape and first row, rounded
    to bf16 (a bf16 and an fp32 copy of the same weights agree), ignoring tensor names (checkpoints re-saved
    by another transformers version rename them). Two checkpoints that differ anywhere in training (an SFT
    merge changes every LoRA-targeted layer) differ here."""
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors") and not f.startswith("adapter_"))
    stats = tuple((f, os.stat(os.path.join(model_dir, f)).st_size, os.stat(os.path.join(model_dir, f)).st_mtime_ns)
                  for f in files)
    return _weights_fingerprint(os.path.realpath(model_dir), stats)


@functools.lru_cache(maxsize=16)
def _weights_fingerprint(model_dir, stats):
    """weights_fingerprint of files with these sizes and times: a stage checks its base (check_model_args,
    load_model) and stamps its outputs (model_stamp) with one read of the weights, not three."""
    import hashlib
    from safetensors import safe_open
    files = [name for name, _, _ in stats]
    if not files:
        raise DataError(f"{model_dir}: no *.safetensors weights to fingerprint")
    rows = []
    for name in files:
        with safe_open(os.path.join(model_dir, name), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shape = tuple(sl.get_shape())
                row = sl[:1] if shape else f.get_tensor(key).reshape(1)
                h = hashlib.sha256(str(shape).encode() + row.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
                rows.append(h.hexdigest())
    return hashlib.sha256("".join(sorted(rows)).encode()).hexdigest()[:16]


def file_fingerprint(path):
    """A hash of a whole (small) file: an adapter's weights, a data file."""
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def adapter_fingerprint(adapter_dir):
    """A hash of a LoRA adapter's weights; None without an adapter."""
    return file_fingerprint(os.path.join(adapter_dir, "adapter_model.safetensors")) if adapter_dir else None


def model_stamp(args):
    """The weights a run generates with (--model, --adapter and their fingerprints), for check_made_by."""
    local = os.path.isdir(args.model)
    return {"model": args.model, "weights": weights_fingerprint(args.model) if local else None,
            "adapter": args.adapter, "adapter_weights": adapter_fingerprint(args.adapter)}


def check_made_by(stamp_path, made_by):
    """Outputs that resume across runs carry a stamp of the weights and settings that made them; a rerun with
    others is refused instead of silently mixing two models' outputs in one file."""
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            previous = json.load(f)
        if previous != made_by:
            changed = sorted(k for k in set(previous) | set(made_by) if previous.get(k) != made_by.get(k))
            raise DataError(f"{stamp_path}: the outputs next to it were made with other {', '.join(changed)} "
                            f"({previous}); delete them or write elsewhere")
    else:
        # Written to a temporary file and renamed into place: ranks check the same stamp at the same time, and
        # one must never read another's half-written file.
        os.makedirs(os.path.dirname(os.path.abspath(stamp_path)), exist_ok=True)
        tmp = f"{stamp_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(made_by, f, indent=1)
        os.replace(tmp, stamp_path)


STAGE_OUTPUTS = re.compile(r"(metrics|samples|reference_logps)\.jsonl|reference_logps\.made_by\.json"
                           r"|final(\.tmp)?|checkpoint-\d+(\.tmp)?")  # what a training stage writes
_HELD_LOCKS = {}  # path -> open lock file: each flock lasts as long as this process (the kernel drops it on a kill)


def hold_lock(path, what):
    """Hold an exclusive lock on `path` (created if absent) until this process exits; a second process is
    refused, told the holder's pid. An advisory flock: a killed run leaves no stale lock behind."""
    import fcntl
    import socket
    path = os.path.realpath(path)
    if path in _HELD_LOCKS:  # a stage run twice in one process (a notebook, a test) already holds it
        return
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its pid yet"
        f.close()
        raise DataError(f"{what} is in use by another run ({holder}, lock {path}); wait for it or write elsewhere") \
            from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _HELD_LOCKS[path] = f


def claim_output_dir(args):
    """Make --output_dir this run's own before anything is written there (rank 0; the launchers stop the other
    ranks when it fails): a lock (OUT/run.lock) refuses a second run on it while this one lives; an earlier
    run's outputs are continued only with --resume and replaced only with --overwrite, which removes what a
    stage writes (STAGE_OUTPUTS) and nothing else."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    out = args.output_dir
    if args.resume and args.overwrite:
        raise DataError("--resume continues the run in --output_dir and --overwrite replaces it: give one")
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--output_dir {out}: a file, not a directory")
    created = not os.path.exists(out)
    make_dirs(out, "--output_dir")
    hold_lock(os.path.join(out, "run.lock"), f"--output_dir {out}")
    atexit.register(drop_if_unused, out, created)
    earlier = sorted(name for name in os.listdir(out) if STAGE_OUTPUTS.fullmatch(name))
    if earlier and not args.resume:
        if not args.overwrite:
            listed = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
            raise DataError(f"--output_dir {out} holds an earlier run ({listed}): --resume latest continues it, "
                            "--overwrite replaces it")
        doomed = [os.path.join(out, name) for name in earlier]
        for flag, given in run_inputs(args):
            inside = next((path for path in doomed if within(given, path)), None)
            if inside:
                raise DataError(f"{flag} {given} is in {inside}, which --overwrite would delete: move it out of "
                                "--output_dir first")
        for path in doomed:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def make_dirs(path, flag):
    """os.makedirs, its failure (a parent that is a file, no permission) one line naming the flag."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise DataError(f"{flag} {path}: cannot create it ({e.strerror or e})") from None


def run_inputs(args):
    """(flag, path) of each file or folder a stage reads: what its outputs must not replace."""
    pairs = []
    for key in ("model", "adapter", "ref_model", "data", "eval_data", "image_root"):
        given = getattr(args, key, None)
        if given and os.path.exists(given):
            pairs.append((f"--{key}", given))
    return pairs


def within(path, folder):
    """Whether path is folder or lies inside it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def drop_if_unused(out, created):
    """At exit: an output folder that holds nothing but this run's lock (the run failed before writing
    anything) is left as it was found: the lock removed, the folder too when this run created it."""
    try:
        if os.listdir(out) == ["run.lock"]:
            os.remove(os.path.join(out, "run.lock"))
            if created:
                os.rmdir(out)
    except OSError:
        pass  # another run took it over, or it is gone: nothing of ours to tidy


def check_not_input(path, flag, inputs, companions=()):
    """Neither an output file nor a companion written beside it is one of the run's inputs (writing it would
    destroy the input), and the output is not a directory."""
    for out in (path, *companions):
        for given in inputs:
            if os.path.abspath(given) == os.path.abspath(out) or (
                    os.path.exists(given) and os.path.exists(out) and os.path.samefile(given, out)):
                raise DataError(f"{flag} {path}: {out} is also an input of this run: writing it would destroy the "
                                "input")
    if os.path.isdir(path):
        raise DataError(f"{flag} {path}: a directory, not a file")
    make_dirs(os.path.dirname(os.path.abspath(path)), flag)


def claim_output_file(path, flag, inputs, overwrite, companions=()):
    """Make an output file that a stage writes whole at its end (filter_pairs' pairs, eval's report) this run's
    own before any work: not an input (check_not_input), an existing one replaced only with `overwrite`, and a
    lock (PATH.lock) refuses a second run on it while this one lives."""
    check_not_input(path, flag, inputs, companions)
    hold_lock(path + ".lock", f"{flag} {path}")
    if os.path.exists(path) and not overwrite:
        raise DataError(f"{flag} {path} exists: --overwrite replaces it, or write elsewhere")


def claim_appended_output(path, flag, inputs, made_by, stamp_path=None):
    """Make an output that a stage appends to as it goes, and that a rerun resumes (infer's answers, gen_pairs'
    candidates), this run's own: not an input (check_not_input), a lock (PATH.lock) held, and a stamp of what
    made it (weights, settings, the data it answers) checked against this run's. A file there without a stamp
    is not an earlier run's output (another stage's, or a data file): appending to it would mix the two."""
    check_not_input(path, flag, inputs)
    hold_lock(path + ".lock", f"{flag} {path}")
    stamp_path = stamp_path or path + ".made_by.json"
    if os.path.exists(path) and os.path.getsize(path) and not os.path.exists(stamp_path):
        raise DataError(f"{flag} {path} exists and is no earlier run's output (no {stamp_path} beside it): "
                        "write elsewhere")
    check_made_by(stamp_path, made_by)


def prune_checkpoints(out_dir, keep):
    steps = sorted(checkpoint_steps(out_dir))
    for step in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(out_dir, f"checkpoint-{step}"), ignore_errors=True)


def checkpoint_steps(out_dir):
    if not os.path.isdir(out_dir):
        return []
    return [int(m.group(1)) for d in os.listdir(out_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", d))]


CHECKPOINT_INFO = "checkpoint.json"  # a checkpoint's stage, --finetune, step, data order and --model


def model_identity(model):
    """--model as a checkpoint records it: a local folder by its resolved path, a hub id as given."""
    return os.path.realpath(model) if os.path.isdir(model) else model


def resolve_resume(args, stage, total_steps, order=None):
    """--resume latest -> the newest complete checkpoint in --output_dir (None if there is none); a directory
    given by name must be a checkpoint. Either must be this stage's, trained with this --finetune, not past
    total_steps (its optimizer state would not fit another stage's or mode's parameters, and a run that ends
    before the checkpoint would save it again as its own step), and drawn in this run's data order (Runtime.
    data_order: the same data, item count, seed and global batch, or the resumed run would skip or repeat
    items). At total_steps the run only writes final/ again: what a run killed between its last checkpoint
    and final/ needs."""
    if args.resume != "latest":
        if not os.path.isfile(os.path.join(args.resume, "training_state.pt")):
            raise DataError(f"--resume {args.resume}: not a checkpoint (no training_state.pt); give a checkpoint-N "
                            "directory of this stage's --output_dir, or 'latest'")
        ckpt = args.resume
    else:
        steps = checkpoint_steps(args.output_dir)
        if not steps:
            return None
        ckpt = os.path.join(args.output_dir, f"checkpoint-{max(steps)}")
    info_path = os.path.join(ckpt, CHECKPOINT_INFO)
    if os.path.exists(info_path):
        try:
            with open(info_path) as f:
                info = json.load(f)
            saved_stage, saved_finetune, saved_step = info["stage"], info["finetune"], int(info["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"--resume {ckpt}: unreadable {CHECKPOINT_INFO} ({e})") from None
        if saved_stage != stage:
            raise DataError(f"--resume {ckpt}: a checkpoint of {saved_stage}, not of {stage}")
        if saved_finetune != args.finetune:
            raise DataError(f"--resume {ckpt}: trained with --finetune {saved_finetune}, this run has --finetune "
                            f"{args.finetune}")
        if info.get("model", model_identity(args.model)) != model_identity(args.model):
            # full fine-tuning takes the weights from the checkpoint and the processor from --model: two models
            raise DataError(f"--resume {ckpt}: trained from --model {info['model']}, this run has --model "
                            f"{args.model}")
        if saved_step > total_steps:
            raise DataError(f"--resume {ckpt}: at step {saved_step}, past this run's last step {total_steps} (a "
                            "larger --max_steps or more epochs continues it)")
        saved_order = info.get("order")
        if order and saved_order and saved_order != order:
            changed = ", ".join(f"{k} {saved_order.get(k)!r} -> {v!r}" for k, v in order.items()
                                if saved_order.get(k) != v)
            raise DataError(f"--resume {ckpt}: drawn in another data order ({changed}), so the rest of the run "
                            "would skip or repeat items; resume with its --data, --seed and global batch "
                            "(--batch_size x --grad_accum x ranks)")
    named = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(ckpt)))
    newer = sorted(s for s in checkpoint_steps(args.output_dir) if named and s > int(named.group(1)))
    if newer:  # the abandoned run's: pruning keeps the highest steps, and --resume latest would take them
        raise DataError(f"--resume {ckpt}: --output_dir holds later checkpoints ("
                        + ", ".join(f"checkpoint-{s}" for s in newer) + ") of the run this one would replace; "
                        "move them away first, or resume from the latest")
    return ckpt


def start_step(rt, ckpt, *logs):
    """The step a run starts at: its checkpoint's, with optimizer, schedule and RNG restored, or 0. The metric
    lines after it, which a killed run wrote and this one writes again, are dropped (all of them when it
    starts from scratch), so each step has one line."""
    step = load_checkpoint(rt, ckpt)["step"] if ckpt else 0
    for log in logs:
        log.rewind(step if ckpt else -1)
    return step


def load_checkpoint(rt, ckpt):
    """Restore optimizer, schedule, RNG; returns the saved training state (step, extra). The weights were
    loaded with the model (load_model from the checkpoint directory)."""
    # On the CPU first: saved from rank 0's GPU, the optimizer state would otherwise land whole on every rank's
    # cuda:0 before load_state_dict moves it to the parameters' device.
    state = load_state_file(os.path.join(ckpt, "training_state.pt"))
    if rt.use_deepspeed:
        rt.engine.load_checkpoint(ckpt, tag="deepspeed", load_module_strict=False)
    else:
        rt.optimizer.load_state_dict(state["optimizer"])
        rt.scheduler.load_state_dict(state["scheduler"])
    rng_file = os.path.join(ckpt, f"rng_state_{rt.rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(load_state_file(rng_file))
    return state


def load_state_file(path):
    """torch.load of a checkpoint's state file; one cut short or damaged is a one-line error naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"--resume: {path} is unreadable ({reason})") from None


# ----------------------------------------------------------------------------------------------- logging

class MetricsLog:
    """Metrics as JSONL lines (appended, flushed per line) from the main rank only."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(self, row):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def rewind(self, step):
        """Drop the lines after `step`: a run resumed from that checkpoint writes them again."""
        if self.enabled and os.path.exists(self.path):
            write_jsonl(self.path, [row for row in resume_jsonl(self.path) if row.get("step", 0) <= step])


def add_sums(total, part):
    """total[k] += part[k]: metric sums over micro-batches, before all_sum over ranks."""
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v
    return total


def progress(iterable=None, enabled=True, **kw):
    from tqdm import tqdm
    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, file=sys.stderr, **kw)


class Throughput:
    """Samples/s and tokens/s since the last call."""

    def __init__(self):
        self.t, self.samples, self.tokens = time.time(), 0, 0

    def add(self, samples, tokens):
        self.samples += samples
        self.tokens += tokens

    def rates(self):
        now = time.time()
        dt = max(now - self.t, 1e-9)
        out = {"samples_per_s": self.samples / dt, "tokens_per_s": self.tokens / dt}
        self.t, self.samples, self.tokens = now, 0, 0
        return out
