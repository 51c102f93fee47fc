"""Self-evolution candidates (SPEC 4.2): for each question the policy samples focus boxes, answers on their
crops, and a judge scores every answer (s_R) and every crop (s_B). filter_pairs.py turns them into pairs.

    python gen_pairs.py --model runs/sft_merged --data train.jsonl --out runs/cands.jsonl [--judge rule]
    torchrun --nproc_per_node 8 gen_pairs.py --model ... --out runs/cands.jsonl    # 8 ranks, 8x the questions/s

Per question, --attempts times (VisRL: 3): sample two boxes at --box_temperature (VisRL: 2); the first is a
candidate; if the second overlaps it (IoU > --overlap_iou), it is replaced by a random box of similar size
(each side within +-d of the first's, d from --size_band, widened by --band_step every --band_every failed
tries, at most --random_tries tries) placed with zero overlap. Each box's crop gets a sampled answer
(--answer_temperature). One generate call per step for the whole batch of questions; each image goes
through the vision tower once per batch (full images once for both steps, each crop once).

Judges: rule (s_R: --rule_metric of the answer vs the reference; s_B: the IoU of the candidate's box with the
annotated box when the record has one (--box_score coverage: the annotated box's share inside the crop), else
the rule score of a greedy answer from the crop alone: the answer prompt with the crop in place of the full
image as well), model (a
local VLM with VisRL's two judge prompts: the answer judge sees the full image, the box judge the crop;
{"score": x} parsed), http (the same prompts to an OpenAI-compatible endpoint, concurrent, retried; a failed
call leaves the score null, recorded and counted, not fatal).

Output: one JSON line per question with every candidate, appended as each batch of questions finishes.
A rerun with the same --out skips finished questions (a kill loses at most the batch in flight; a torn last
line is cut off). Under torchrun/deepspeed each rank writes OUT.rank{r}.jsonl and rank 0 merges them into
OUT when all ranks are done. A question whose image fails to load (or shows the record wrong) is skipped and
listed in OUT.errors.jsonl; the others are answered, and then the run exits 1 naming the list.
"""
import glob
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import common

# VisRL's judge prompts (data_gen/generate.py), verbatim but for whitespace.
ANSWER_JUDGE = (
    "You are responsible for proofreading the answers, you need to give the score to the model's answer by "
    "referring to the standard answer, based on the given question and image.\nThe full score is 1 point and "
    "the minimum score is 0 points. Please directly provide the score in JSON format, for example, "
    "{{\"score\": 0.8}}, without showing the intermediate process.\nThe evaluation criteria require that the "
    "closer the model's answer is to the standard answer, the higher the score.\n\nQuestion: {question}\n"
    "Standard answer: {reference}\nModel's answer: {answer}\n")
BOX_JUDGE = (
    "You are responsible for verifying the relevance of the image based on the provided question and standard "
    "answer, you need to assess whether the image aligns with the standard answer.\nThe full score is 1 point "
    "and the minimum score is 0 points. Please directly provide the score in JSON format, for example, "
    "{{\"score\": 0.8}}, without showing the intermediate process.\nThe evaluation criteria is that, the higher "
    "score will be if the image effectively encompasses the information provided in the standard answer based "
    "on question.\n\nQuestion: {question}\nStandard answer: {reference}\n")


def parse_args(argv=None):
    parser = common.ArgumentParser(__doc__)
    common.add_model_args(parser)
    g = parser.add_argument_group("candidates")
    g.add_argument("--data", required=True, help="records (JSONL: id, image, question, answer, optional bbox)")
    g.add_argument("--image_root", default=None, help="image root (default: the data file's directory)")
    g.add_argument("--out", required=True, help="candidates JSONL (one line per question)")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; do not pass")
    g.add_argument("--box_format", default="viscot", choices=common.BOX_FORMAT_CHOICES,
                   help="box text format (SPEC 3); native: the model family's")
    g.add_argument("--box_decimals", type=common.COUNT, default=3, help="decimals of a random box's text (viscot/norm)")
    g.add_argument("--prompt_set", default="visrl", choices=sorted(common.PROMPT_SETS), help="prompt wording")
    g.add_argument("--attempts", type=common.POSITIVE_INT, default=3,
                   help="attempts per question, 2 candidates each (VisRL: 3)")
    g.add_argument("--box_temperature", type=common.TEMPERATURE, default=2.0,
                   help="box sampling temperature (VisRL: 2)")
    g.add_argument("--answer_temperature", type=common.TEMPERATURE, default=2.0,
                   help="answer sampling temperature (VisRL: 2)")
    g.add_argument("--overlap_iou", type=common.FRACTION, default=0.05,
                   help="the second box is replaced when its IoU with the first is above this")
    g.add_argument("--size_band", type=common.NONNEGATIVE, default=0.4,
                   help="random box: each side within +-d of the first's")
    g.add_argument("--band_step", type=common.NONNEGATIVE, default=0.1, help="random box: d widened by this ...")
    g.add_argument("--band_every", type=common.POSITIVE_INT, default=20, help="... every this many failed tries")
    g.add_argument("--random_tries", type=common.POSITIVE_INT, default=100,
                   help="random box: give up after this many tries")
    g.add_argument("--max_new_tokens", type=common.POSITIVE_INT, default=64, help="tokens per step")
    g.add_argument("--batch_size", type=common.POSITIVE_INT, default=8,
                   help="questions per batch (x 2 x attempts sequences)")
    g.add_argument("--seed", type=common.SEED, default=0, help="sampling seed (rank r uses seed + r)")
    j = parser.add_argument_group("judge")
    j.add_argument("--judge", default="rule", choices=["rule", "model", "http"], help="who scores candidates")
    j.add_argument("--rule_metric", default="f1", choices=sorted(common.RULE_JUDGES),
                   help="rule judge: token F1 (default), normalised exact match or ANLS")
    j.add_argument("--box_score", default="iou", choices=["iou", "coverage"],
                   help="rule, a record with a box: s_B = IoU of the candidate's box with it (SPEC 4.2), or the "
                        "share of it inside the crop (VisRL's judge question read literally; a whole-image box "
                        "scores 1)")
    j.add_argument("--ignore_bbox", action="store_true",
                   help="rule: score crops without the records' annotated boxes (as on box-free data)")
    j.add_argument("--judge_model", default=None, help="model: checkpoint directory; http: the model name")
    j.add_argument("--judge_url", type=common.http_url, default=None,
                   help="http: endpoint base, e.g. http://127.0.0.1:8000/v1")
    j.add_argument("--judge_api_key_env", default="OPENAI_API_KEY", help="http: env var holding the API key")
    j.add_argument("--judge_workers", type=common.POSITIVE_INT, default=16, help="http: concurrent requests")
    j.add_argument("--judge_retries", type=common.COUNT, default=3, help="http: retries per call (back-off 1, 2, 4 s)")
    args = parser.parse_args(argv)
    if args.judge in ("model", "http") and not args.judge_model:
        parser.error(f"--judge {args.judge} needs --judge_model")
    if args.judge == "http" and not args.judge_url:
        parser.error("--judge http needs --judge_url")
    return args


# ----------------------------------------------------------------------------------- diversity control

def overlaps(a, b):
    return not (a[2] <= b[0] or a[0] >= b[2] or a[3] <= b[1] or a[1] >= b[3])


def random_box(first, w, h, rng, band=0.4, band_step=0.1, band_every=20, tries=100):
    """A box of similar size to `first` (each side within +-band of its side, the band widened every
    `band_every` failures) anywhere in the w x h image with zero overlap with `first`; None after `tries`."""
    fw, fh = first[2] - first[0], first[3] - first[1]
    for i in range(tries):
        d = band + band_step * (i // band_every)
        bw, bh = rng.uniform(fw * (1 - d), fw * (1 + d)), rng.uniform(fh * (1 - d), fh * (1 + d))
        if bw <= 0 or bh <= 0 or bw > w or bh > h:
            continue
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        box = [x, y, x + bw, y + bh]
        if not overlaps(box, first):
            return box
    return None


# ------------------------------------------------------------------------------------------- judging

SCORE_NUMBER = r"""["']?(?P<x>-?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?)["']?"""


def parse_score(reply):
    """VisRL's judge reply -> a score in [0, 1], or None: {"score": x} (code fences, prose around it, a quoted
    number, an exponent and a bare number tolerated). A fraction ("8/10", "3 out of 5") is None: its scale is
    not VisRL's, and reading its numerator would score it 1."""
    if not isinstance(reply, str):
        return None
    text = re.sub(r"```(?:json)?", "", reply).strip()
    m = re.search(r"""["']?score["']?\s*(?:is)?\s*[:=]?\s*""" + SCORE_NUMBER + r"(?P<fraction>\s*(?:/|out\s+of)\s*\d)?",
                  text, re.I) or re.fullmatch(r"\s*" + SCORE_NUMBER + r"\s*", text)
    if m is None or m.groupdict().get("fraction"):
        return None
    return min(1.0, max(0.0, float(m.group("x"))))


def coverage(crop, box):
    """Share of the annotated box inside the crop."""
    ix = max(0.0, min(crop[2], box[2]) - max(crop[0], box[0]))
    iy = max(0.0, min(crop[3], box[3]) - max(crop[1], box[1]))
    area = (box[2] - box[0]) * (box[3] - box[1])
    return ix * iy / area if area > 0 else 0.0


class Judge:
    """Scores answers (s_R) and crops (s_B) for a batch of (record, full image, candidate) items, in place:
    each candidate gets s_R, s_B and the judge's raw replies (None for the rule judge)."""

    def __init__(self, args, policy, processor):
        self.args, self.policy, self.processor = args, policy, processor
        self.metric = common.RULE_JUDGES[args.rule_metric]
        self.name = {"rule": f"rule:{args.rule_metric}", "model": f"model:{args.judge_model}",
                     "http": f"http:{args.judge_model}"}[args.judge]
        if args.judge == "model":
            self.model_processor = common.load_processor(args.judge_model, "--judge_model")
            self.model = common.load_model(args.judge_model, common.resolve_dtype(args.dtype), args.attn,
                                           flag="--judge_model").eval()
            self.model.to(policy.device)

    def score(self, items):
        if self.args.judge == "rule":
            self._rule(items)
            return
        # Both judge questions for every candidate: (candidate, key, image, prompt).
        asks = []
        for rec, full, cand in items:
            if cand["answer"] is not None:
                asks.append((cand, "s_R", full, ANSWER_JUDGE.format(question=rec["question"],
                                                                     reference=rec["answer"], answer=cand["answer"])))
                asks.append((cand, "s_B", full.crop(tuple(cand["crop"])),
                             BOX_JUDGE.format(question=rec["question"], reference=rec["answer"])))
        replies = self._http(asks) if self.args.judge == "http" else self._model(asks)
        for (cand, key, _, _), (reply, failed) in zip(asks, replies):
            cand[key] = None if failed else parse_score(reply)
            cand.setdefault("judge_replies", {})[key] = reply
            if failed:
                cand["status"] = "judge_failed"
            elif cand[key] is None:
                cand["status"] = "judge_unparsable"

    def _rule(self, items):
        crop_only = []
        for rec, full, cand in items:
            if cand["answer"] is None:
                continue
            cand["s_R"] = self.metric(cand["answer"], rec["answer"])
            if rec.get("bbox") and not self.args.ignore_bbox:
                cand["s_B"] = (common.box_iou(cand["box"], rec["bbox"]) if self.args.box_score == "iou"
                               else coverage(cand["crop"], rec["bbox"]))
            else:
                crop_only.append((rec, full, cand))
        if crop_only:
            # No annotated box: can the policy answer from the crop alone? The answer prompt, greedy, with the
            # crop shown in place of the full image too (the format it was trained on, without the context).
            # Each crop, shown twice, goes through the vision tower once.
            examples = [common.Example(rec, None, common.answer_messages(rec["question"], self.args.prompt_set))
                        for rec, _, _ in crop_only]
            crops = [full.crop(tuple(cand["crop"])) for _, full, cand in crop_only]
            feats = common.image_features(self.policy, self.processor, crops)
            answers = common.generate(self.policy, self.processor, examples, self.args.max_new_tokens,
                                      images=[[c, c] for c in crops], features=[[f, f] for f in feats])
            for (rec, _, cand), answer in zip(crop_only, answers):
                cand["s_B"] = self.metric(answer, rec["answer"])
                cand["crop_only_answer"] = answer

    def _http(self, asks):
        key = os.environ.get(self.args.judge_api_key_env)

        def one(ask):
            _, _, image, prompt = ask
            content = [{"type": "image_url", "image_url": {"url": png_data_url(image)}},
                       {"type": "text", "text": prompt}]
            try:
                return common.http_chat(self.args.judge_url, self.args.judge_model,
                                        [{"role": "user", "content": content}], key, max_tokens=32,
                                        retries=self.args.judge_retries), False
            except RuntimeError as e:
                return str(e), True

        with ThreadPoolExecutor(self.args.judge_workers) as pool:
            return list(pool.map(one, asks))

    def _model(self, asks):
        examples = [common.Example({"id": "judge"}, None, [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": prompt}]}]) for _, _, _, prompt in asks]
        replies = common.generate(self.model, self.model_processor, examples, 32,
                                  images=[[image] for _, _, image, _ in asks]) if asks else []
        return [(reply, False) for reply in replies]


def png_data_url(image):
    import base64
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------------------------ candidates

def candidates_for_batch(model, processor, records, images, args, rng):
    """Every candidate of every question in the batch: two generate calls (boxes, answers) for all of them."""
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=True)
    full_feats = common.image_features(model, processor, images)
    k = 2 * args.attempts
    focus = [common.Example(rec, None, common.focus_messages(rec["question"], args.prompt_set))
             for rec in records for _ in range(k)]
    box_texts = common.generate(model, processor, focus, images=[[im] for im in images for _ in range(k)],
                                features=[[f] for f in full_feats for _ in range(k)],
                                temperature=args.box_temperature, **gen)
    per_question, dropped = [], []
    for q, (rec, im) in enumerate(zip(records, images)):
        w, h = im.size
        resized = common.smart_resize_hw(processor, w, h) if args.box_format == "qwen25" else None
        cands, lost = [], []
        for a in range(args.attempts):
            texts = box_texts[q * k + 2 * a: q * k + 2 * a + 2]
            first = common.parse_box(texts[0], args.box_format, w, h, resized)
            second = common.parse_box(texts[1], args.box_format, w, h, resized)
            cands.append({"attempt": a, "source": "sampled", "box_text": texts[0], "box": first})
            if first is not None and second is not None and common.box_iou(first, second) > args.overlap_iou:
                second = random_box(first, w, h, rng, args.size_band, args.band_step, args.band_every,
                                    args.random_tries)
                if second is None:
                    lost.append({"attempt": a, "reason": f"no zero-overlap box of similar size in "
                                                         f"{args.random_tries} tries"})
                    continue
                text = common.box_to_text(second, args.box_format, w, h, args.box_decimals, resized)
                cands.append({"attempt": a, "source": "random", "box": second, "box_text": text})
            else:
                cands.append({"attempt": a, "source": "sampled", "box_text": texts[1], "box": second})
        for c in cands:
            crop = common.crop_box(c["box"], w, h, common.token_pixels(processor)) if c["box"] else None
            c.update(crop=crop, answer=None, s_R=None, s_B=None,
                     status="ok" if c["box"] else "unparsable_box")
        per_question.append(cands)
        dropped.append(lost)

    # Answers: one call for every candidate with a box; the full image's features are reused, each crop's
    # computed once.
    todo = [(q, c) for q, cands in enumerate(per_question) for c in cands if c["box"] is not None]
    crops = [images[q].crop(tuple(c["crop"])) for q, c in todo]
    crop_feats = common.image_features(model, processor, crops)
    examples = [common.Example(records[q], None, common.answer_messages(records[q]["question"], args.prompt_set),
                               crop=c["crop"]) for q, c in todo]
    answers = common.generate(model, processor, examples, images=[[images[q], cr] for (q, _), cr in zip(todo, crops)],
                              features=[[full_feats[q], f] for (q, _), f in zip(todo, crop_feats)],
                              temperature=args.answer_temperature, **gen) if todo else []
    for (_, c), answer in zip(todo, answers):
        c["answer"] = answer
    for cands in per_question:
        for c in cands:
            if c["box"] is None:  # unparsable box: kept, scored 0, counted
                c["s_R"] = c["s_B"] = 0.0
    return per_question, dropped


# -------------------------------------------------------------------------------------------- output

def shard_path(out, rank, world):
    return out if world == 1 else f"{out}.rank{rank}.jsonl"


def shards(out, kind=""):
    """Existing per-rank files of one kind: OUT.rank{r}.jsonl (kind "") or OUT.rank{r}.errors.jsonl."""
    pattern = re.escape(os.path.basename(out)) + r"\.rank\d+" + re.escape(kind) + r"\.jsonl"
    return sorted(p for p in glob.glob(f"{out}.rank*") if re.fullmatch(pattern, os.path.basename(p)))


def finished_ids(out):
    """Questions already written: in the merged file and in any rank's shard (the world size may change)."""
    done = set()
    for path in [out] + shards(out):
        done.update(row["id"] for row in common.resume_jsonl(path))
    return done


def merge_shards(out, records, world, timeout=3600):
    """Rank 0: wait for every rank's done marker, then write OUT (existing rows + shards, in data order)."""
    markers = [f"{out}.rank{r}.done" for r in range(world)]
    deadline = time.time() + timeout
    while not all(os.path.exists(m) for m in markers):
        if time.time() > deadline:
            print(f"gen_pairs.py: not all ranks finished; shards left as {out}.rank*.jsonl (rerun to finish)",
                  file=sys.stderr)
            return 0
        time.sleep(2)
    rows = {}
    for path in [out] + shards(out):
        for row in common.resume_jsonl(path):
            rows[row["id"]] = row
    common.write_jsonl(out, [rows[rec["id"]] for rec in records if rec["id"] in rows])
    errors = [e for path in shards(out, ".errors") for e in common.read_jsonl(path)]
    common.write_errors(out + ".errors.jsonl", errors)
    for path in glob.glob(f"{out}.rank*"):
        os.remove(path)
    return len(errors)


def main(argv=None):
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    rng = random.Random(args.seed + rank)
    records = common.read_records(args.data)
    common.check_model_args(args)
    if args.judge == "model":
        common.check_model_path(args.judge_model, "--judge_model")
    common.resolve_box_format(args)
    out_path = shard_path(args.out, rank, world)
    image_root = args.image_root or os.path.dirname(os.path.abspath(args.data))
    settings = {k: v for k, v in vars(args).items() if k not in ("data", "image_root", "out", "batch_size",
                                                                  "judge_workers", "judge_retries", "dtype", "attn",
                                                                  "local_rank")}
    made_by = dict(settings, **common.model_stamp(args), data=os.path.abspath(args.data),
                   image_root=os.path.abspath(image_root))
    # Each rank appends to its own shard (the merged file when alone); the stamp is the run's, beside --out.
    common.claim_appended_output(out_path, "--out", [args.data], made_by, stamp_path=args.out + ".made_by.json")
    processor = common.load_processor(args.model)
    model = common.load_model(args.model, common.resolve_dtype(args.dtype), args.attn, args.adapter).eval()
    if torch.cuda.is_available():
        model.to(f"cuda:{local_rank}")
    judge = Judge(args, model, processor)
    if os.path.exists(f"{args.out}.rank{rank}.done"):
        os.remove(f"{args.out}.rank{rank}.done")
    done = finished_ids(args.out)
    mine = [rec for i, rec in enumerate(records) if i % world == rank and rec["id"] not in done]
    errors_path = (out_path[:-len(".jsonl")] if world > 1 else out_path) + ".errors.jsonl"
    stats = {"questions": 0, "candidates": 0, "unparsable_box": 0, "random_box": 0, "dropped": 0,
             "judge_failed": 0, "judge_unparsable": 0}
    errors, t0 = [], time.time()
    with open(out_path, "a", encoding="utf-8") as out, \
            common.progress(total=len(mine), enabled=rank == 0, desc="gen_pairs", unit="q") as bar:
        for start in range(0, len(mine), args.batch_size):
            batch, images = [], []
            for rec in mine[start:start + args.batch_size]:
                try:
                    images.append(common.load_image(rec, image_root))
                    batch.append(rec)
                except common.DataError as e:
                    errors.append({"id": rec["id"], "error": str(e)})
            if batch:
                with torch.no_grad():
                    per_question, dropped = candidates_for_batch(model, processor, batch, images, args, rng)
                    judge.score([(rec, im, c) for rec, im, cands in zip(batch, images, per_question) for c in cands])
                rows = []
                for rec, im, cands, lost in zip(batch, images, per_question, dropped):
                    rows.append({"id": rec["id"], "image": rec["image"], "question": rec["question"],
                                 "answer": rec["answer"], "bbox": rec.get("bbox"), "width": im.size[0],
                                 "height": im.size[1], "judge": judge.name, "candidates": cands, "dropped": lost})
                    stats["candidates"] += len(cands)
                    stats["dropped"] += len(lost)
                    for c in cands:
                        stats["random_box"] += c["source"] == "random"
                        stats[c["status"]] = stats.get(c["status"], 0) + 1
                common.append_jsonl(out, rows)
                stats["questions"] += len(rows)
            bar.update(len(mine[start:start + args.batch_size]))
    stats.pop("ok", None)
    common.write_errors(errors_path, errors)
    dt = time.time() - t0
    failed = len(errors)
    if world > 1:
        open(f"{args.out}.rank{rank}.done", "w").close()
        # Only rank 0 reports the merged list: a rank that exits non-zero early makes torchrun stop the others.
        failed = merge_shards(args.out, records, world) if rank == 0 else 0
    print(f"gen_pairs.py: rank {rank}: {stats['questions']} questions, {stats['candidates']} candidates in "
          f"{dt:.1f}s ({stats['candidates'] / max(dt, 1e-9):.1f} candidates/s), {len(done)} already done, "
          f"{stats['unparsable_box']} unparsable boxes, {stats['random_box']} random boxes, {stats['dropped']} "
          f"dropped (no random box), {stats['judge_failed']} judge failures, {stats['judge_unparsable']} "
          f"unparsable judge replies, {len(errors)} image errors -> {out_path}")
    if failed:
        raise common.unanswered(failed, args.out, "question")


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:
        raise SystemExit(f"gen_pairs.py: error: {e}") from None
