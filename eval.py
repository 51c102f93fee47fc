"""Score predictions under the Visual-CoT and Visual-RFT protocols; with --model, run the model first.

    python eval.py --protocol viscot-det --questions benchmark_det_gqa.jsonl --predictions answers.jsonl --out r.json
    python eval.py --protocol viscot-answer --questions benchmark_gqa.json --predictions answers.jsonl \
        --judge rule|http|model --out r.json
    python eval.py --protocol virft-det --questions coco_val.json --predictions dets.jsonl --out r.json
    python eval.py --protocol virft-cls --questions records.jsonl --predictions preds.jsonl --out r.json
    python eval.py --protocol grounding --questions records.jsonl --predictions preds.jsonl --out r.json
    python eval.py --protocol chain --questions records.jsonl --model runs/sft/final --out r.json
    python eval.py --protocol zoom --questions records.jsonl --model runs/grpo_zoom/final --out r.json

Several --questions files (one per dataset) take as many --predictions files, in the same order; the table
has a row per dataset and their mean. --model DIR [--adapter A] runs inference first (infer.py's code;
resumable) and writes the predictions under --predictions_dir in the protocol's own format, then scores them.

viscot-det    Visual-CoT detection accuracy, exactly its scorer: the text's first four ', '-separated numbers
              (after removing '[', ']' and ' .') times max(w, h), against the ground-truth box shifted into the
              padded square; correct when IoU > 0.5 (float32, as torchvision). Unparsable counts as wrong and
              is counted. Prediction lines carrying bbox/height/width (Visual-CoT's own answer files) are
              scored line by line as its scorer does; otherwise they are joined to --questions by question_id.
              --parser lenient also accepts '[[...]]', missing spaces, trailing periods (not comparable).
viscot-answer Visual-CoT answer score: a judge scores each answer in [0, 1]; rule (exact / f1 / anls, named in
              the report), http (any OpenAI-compatible endpoint, Visual-CoT's prompt and 'score: x' parsing,
              retries; a failed call scores 0 and is counted), model (a local checkpoint as the judge).
virft-det     COCO mAP (AP@[.5:.95], AP50, AP75, by area; AR) of Visual-RFT answers ('Position' on 0..1000,
              'Confidence') against COCO-format ground truth; prediction lines: image_id, category_id, text.
              --parser virft (default): Visual-RFT's published script, quirks kept (common.virft_coco_detections);
              --parser strict: a malformed item voids the answer, swapped corners are reordered.
virft-cls     accuracy. --match virft (default), Visual-RFT's published rule: the first single-line
              <answer>(.*?)</answer> of the text and of the label (none in the text: wrong), lower case, no
              spaces or underscores, label and answer a substring of one another (an empty answer is right:
              counted as empty_answer_correct);
              --match exact: equal and non-empty, from <answer>...</answer> when present, else the whole text.
grounding     one box per record: acc (IoU > 0.5), mIoU, mean gIoU, cIoU (cumulative intersection / union).
chain         our records through the two-step chain: the box metrics of grounding plus the answer score.
"""
import contextlib
import json
import math
import os
import re
import sys
import threading
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import common

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
import convert_viscot  # noqa: E402

PROTOCOLS = ("viscot-det", "viscot-answer", "virft-det", "virft-cls", "grounding", "chain", "zoom")
PARSERS = {"viscot-det": ("viscot", "lenient"), "virft-det": ("virft", "strict")}  # the first is the default
RULE_NAMES = {  # what the report's settings say was used
    "viscot": "viscot (Visual-CoT's own)",
    "lenient": "lenient (common.parse_box; not comparable with published numbers)",
    "virft": "virft (Visual-RFT's published script, quirks kept)",
    "strict": "strict (common.read_detections, corners reordered; not comparable with published numbers)",
    "match virft": "virft (Visual-RFT's published rule: substring either way; an empty answer is right)",
    "match exact": "exact (equal and non-empty; not comparable with published numbers)",
}

# Visual-CoT's judge prompt (llava/eval/eval_cot_score.py), verbatim.
JUDGE_SYSTEM = ("\nYou are responsible for proofreading the answers, you need to give a score to the model's answer "
                "by referring to the standard answer, based on the given question. The full score is 1 point and "
                "the minimum score is 0 points. Please output the score in the form \"score: <score>\". The "
                "evaluation criteria require that the closer the model's answer is to the standard answer, the "
                "higher the score.\n")
JUDGE_USER = "\nquestion: %s\nstandard answer: %s\nmodel's answer: %s\n"


def parse_args(argv=None):
    parser = common.ArgumentParser(__doc__)
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS, help="what to score")
    parser.add_argument("--questions", required=True, nargs="+", help="ground-truth file(s), one per dataset")
    parser.add_argument("--predictions", nargs="+", default=None, help="prediction file(s), same order")
    parser.add_argument("--out", required=True,
                        help="JSON report (per-item scores beside it: r.json -> r.items.jsonl)")
    parser.add_argument("--label", default=None, help="label for the table (default: the model or predictions)")
    parser.add_argument("--parser", default=None, choices=sorted(set(PARSERS["viscot-det"] + PARSERS["virft-det"])),
                        help="viscot-det: viscot (Visual-CoT's own, default) or lenient; virft-det: virft "
                             "(Visual-RFT's published script, default) or strict")
    parser.add_argument("--match", default=None, choices=["virft", "exact"],
                        help="virft-cls: Visual-RFT's published substring rule (default) or exact, non-empty")
    parser.add_argument("--box_format", default="viscot", choices=common.BOX_FORMAT_CHOICES,
                        help="grounding/chain: box text format of the predictions")
    j = parser.add_argument_group("answer judge (viscot-answer, chain)")
    j.add_argument("--judge", default="rule", choices=["rule", "http", "model"], help="who scores answers")
    j.add_argument("--rule_metric", default="exact", choices=sorted(common.RULE_JUDGES),
                   help="rule judge: normalised exact match, token F1 or ANLS")
    j.add_argument("--judge_url", type=common.http_url, default=None,
                   help="http judge: endpoint base, e.g. http://127.0.0.1:8000/v1")
    j.add_argument("--judge_model", default=None, help="http judge: model name; model judge: checkpoint directory")
    j.add_argument("--judge_api_key_env", default="OPENAI_API_KEY", help="http judge: env var holding the API key")
    j.add_argument("--judge_workers", type=common.POSITIVE_INT, default=8, help="http judge: concurrent requests")
    j.add_argument("--judge_retries", type=common.COUNT, default=3,
                   help="http judge: retries per call (back-off 1, 2, 4 s)")
    m = parser.add_argument_group("run a model first (--model)")
    m.add_argument("--model", default=None, help="checkpoint to evaluate end to end (else --predictions)")
    m.add_argument("--adapter", default=None, help="LoRA adapter on top of --model")
    m.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="weights dtype")
    m.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"], help="attention")
    m.add_argument("--image_root", default=None, help="image root (default: the questions file's directory)")
    m.add_argument("--predictions_dir", default=None,
                   help="where --model writes predictions (default: r.json -> r.predictions/)")
    m.add_argument("--prompt_set", default="visrl", choices=sorted(common.PROMPT_SETS), help="prompt wording")
    m.add_argument("--batch_size", type=common.POSITIVE_INT, default=16, help="records per generate call")
    m.add_argument("--max_new_tokens", type=common.POSITIVE_INT, default=64,
                   help="tokens per step (virft: use 512+ for <think>)")
    m.add_argument("--max_turns", type=common.POSITIVE_INT, default=None,
                   help="zoom: model turns, default 3 (a conversation still calling at the last has no answer)")
    m.add_argument("--max_context", type=common.POSITIVE_INT, default=None,
                   help="zoom: a conversation's whole length in tokens (infer.py --max_context)")
    args = parser.parse_args(argv)
    common.check_zoom_flags(parser, args, args.protocol == "zoom", "--protocol zoom")
    allowed = PARSERS.get(args.protocol, ())
    if args.parser is not None and args.parser not in allowed:
        parser.error(f"--parser {args.parser} does not apply to --protocol {args.protocol}"
                     + (f" (choose from {', '.join(allowed)})" if allowed else ""))
    args.parser = args.parser or (allowed[0] if allowed else None)
    if args.match is not None and args.protocol != "virft-cls":
        parser.error(f"--match applies to --protocol virft-cls, not {args.protocol}")
    args.match = args.match or ("virft" if args.protocol == "virft-cls" else None)
    if bool(args.model) == bool(args.predictions):
        parser.error("give either --predictions or --model")
    if args.box_format == "native" and not args.model:
        parser.error("--box_format native takes the format of --model's family: name the format of --predictions")
    if args.protocol == "viscot-det" and args.box_format not in ("viscot", "native"):
        parser.error(VISCOT_DET_FORMAT.format(args.box_format))
    if args.predictions and len(args.predictions) != len(args.questions):
        parser.error(f"{len(args.questions)} --questions files but {len(args.predictions)} --predictions files")
    if args.judge == "http" and not (args.judge_url and args.judge_model):
        parser.error("--judge http needs --judge_url and --judge_model")
    if args.judge == "model" and not args.judge_model:
        parser.error("--judge model needs --judge_model (a checkpoint directory)")
    return args


def dataset_name(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    for prefix in ("benchmark_det_", "benchmark_"):
        stem = stem[len(prefix):] if stem.startswith(prefix) else stem
    return stem


def load_questions(protocol, path):
    """The ground truth of one dataset, which must hold questions: a JSON file (viscot-answer's list, virft-det's
    COCO annotations) or JSONL; chain records are checked as our record format."""
    if protocol in ("viscot-answer", "virft-det"):
        if not os.path.isfile(path):
            raise common.DataError(f"{path}: no such file")
        with open(path, "rb") as f:
            try:
                questions = json.loads(f.read().decode("utf-8"))
            except UnicodeDecodeError:
                raise common.DataError(f"{path}: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise common.DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if protocol == "virft-det":
            has_questions = isinstance(questions, dict) and bool(questions.get("images"))
        else:
            has_questions = isinstance(questions, list) and bool(questions)
        if not has_questions:
            raise common.DataError(f"{path}: no questions" + (" (a COCO file with images, annotations and "
                                                              "categories)" if protocol == "virft-det" else ""))
        return questions
    records = common.read_records(path) if protocol in ("chain", "zoom") else \
        [row for _, row in common.input_rows(path, "questions")]
    if protocol in ("grounding", "chain", "zoom"):  # checked before --model spends an inference pass on them
        for i, rec in enumerate(records, 1):
            if rec.get("bbox") is None:
                raise common.DataError(f"{path}: row {i} ({record_id(rec)!r}) has no bbox (the {protocol} "
                                       "protocol scores the model's box against it)")
    return records


def by_key(rows, key, path):
    """rows indexed by key; a missing or repeated key is a DataError naming the file and row."""
    out = {}
    for i, row in enumerate(rows, 1):
        k = key(row)
        if k is None:
            raise common.DataError(f"{path}: row {i} has no id (question_id / id / image_id+category_id)")
        if k in out:
            raise common.DataError(f"{path}: row {i} repeats id {k!r}")
        out[k] = row
    return out


def record_id(row):
    return row.get("id", row.get("question_id"))


def answered_once(questions, preds, key):
    """(questions no prediction line answers, lines that repeat a question already answered): the published
    Visual-CoT scorers score every line, so a repeated line counts twice there too; these say when it did."""
    asked = {key(q) for q in questions}
    answered = [key(p) for p in preds]
    return len(asked - set(answered)), len(answered) - len(set(answered))


def lines_against_questions(questions, preds, paths):
    """Visual-CoT's answer lines carry their question's box and image size but question_id 0 on every line:
    matched to the questions by (bbox, width, height), counted with multiplicity (two questions may ask about
    one box). Returns (questions no line answers, lines beyond their questions'); a line that matches no
    question (predictions of another file) is an error."""
    def key(row):  # numbers as floats: 215 and 215.0 are one box
        try:
            return tuple(float(v) for v in row["bbox"]) + (float(row["width"]), float(row["height"]))
        except (KeyError, TypeError, ValueError):
            return None
    asked, answered = Counter(key(q) for q in questions), Counter(key(p) for p in preds)
    unknown = [k for k in answered if k not in asked]
    if unknown:
        raise common.DataError(f"{paths[1]}: {sum(answered[k] for k in unknown)} prediction lines carry a box and "
                               f"image size no question of {paths[0]} has (first: {unknown[0]}): predictions of "
                               "another file?")
    return (sum(max(0, n - answered[k]) for k, n in asked.items()),
            sum(max(0, n - asked[k]) for k, n in answered.items()))


def matched_predictions(records, preds, paths):
    """Predictions by id for records whose ids are unique: a repeated question id, or a prediction id that
    names no question (predictions of another file), is an error naming the files."""
    by_key(records, record_id, paths[0])
    by_id = by_key(preds, record_id, paths[1])
    known = {record_id(r) for r in records}
    unknown = [k for k in by_id if k not in known]
    if unknown:
        raise common.DataError(f"{paths[1]}: {len(unknown)} prediction ids name no question of {paths[0]} (first: "
                               f"{unknown[0]!r}): predictions of another file?")
    return by_id


# --------------------------------------------------------------------------------------- viscot-det

def viscot_det_box(text, w, h):
    """Visual-CoT's parsing (playground/data/eval/REC/calculation.py): padded-square pixels, or None."""
    if not isinstance(text, str):
        return None
    parts = text.replace(" .", "").replace("[", "").replace("]", "").split(", ")
    try:
        return [float(parts[i]) * max(w, h) for i in range(4)]
    except (ValueError, IndexError):
        return None


def lenient_det_box(text, w, h):
    box = common.parse_box(text, "viscot", w, h)
    if box is None:
        return None
    _, dx, dy = common.square_frame(w, h)
    return [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]


def iou_float32(a, b):
    """IoU as torchvision.ops.box_iou computes it on float32 tensors (what Visual-CoT's scorer uses)."""
    a, b = torch.tensor([a], dtype=torch.float32), torch.tensor([b], dtype=torch.float32)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = (torch.min(a[:, None, 2:], b[:, 2:]) - torch.max(a[:, None, :2], b[:, :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return (inter / (area_a[:, None] + area_b - inter)).item()


MISSING = object()  # a question with no prediction line: wrong, counted as missing (not as unparsable)


def score_viscot_det(questions, preds, args, paths):
    qpath, ppath = paths
    parse = viscot_det_box if args.parser == "viscot" else lenient_det_box
    if preds and all(all(k in p for k in ("bbox", "height", "width")) for p in preds):
        items = [(p.get("question_id"), p["bbox"], p["width"], p["height"], p.get("text")) for p in preds]
        matched_by = "prediction lines (carry bbox/height/width, as Visual-CoT's answer files)"
        missing, repeated = lines_against_questions(questions, preds, paths)
    else:
        by_id = by_key(preds, lambda p: p.get("question_id"), ppath)
        qs = by_key(questions, lambda q: q.get("question_id"), qpath)
        unknown = [k for k in by_id if k not in qs]
        if unknown:
            raise common.DataError(f"{ppath}: question_id {unknown[0]!r} is not in {qpath}")
        items = [(k, q["bbox"], q["width"], q["height"], by_id[k].get("text") if k in by_id else MISSING)
                 for k, q in qs.items()]
        matched_by, missing, repeated = "question_id", sum(k not in by_id for k in qs), 0
    rows, correct, unparsable = [], 0, 0
    for qid, bbox, w, h, text in items:
        _, dx, dy = common.square_frame(w, h)  # Visual-CoT's expand2square shift
        target = [bbox[0] + dx, bbox[1] + dy, bbox[2] + dx, bbox[3] + dy]
        pred = parse(text, w, h) if text is not MISSING else None
        iou = iou_float32(pred, target) if pred is not None else 0.0
        ok = pred is not None and iou > 0.5  # a NaN IoU is not > 0.5, as in Visual-CoT
        correct += ok
        unparsable += pred is None and text is not MISSING
        rows.append({"question_id": qid, "text": None if text is MISSING else text,
                     "iou": iou if iou == iou else None, "correct": bool(ok)})  # NaN is not JSON
    total = len(items)
    metrics = {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
               "unparsable": unparsable, "missing": missing, "repeated": repeated}
    if questions and matched_by.startswith("prediction") and len(preds) != len(questions):
        metrics["warning"] = f"{len(preds)} prediction lines for {len(questions)} questions"
    return metrics, rows, {"matched_by": matched_by}


# ------------------------------------------------------------------------------------------- judges

class Judge:
    """Scores (question, reference, answer) triples in [0, 1]. rule: in process. http / model: Visual-CoT's
    judge prompt, exactly one 'score: x' parsed and clipped, anything else 0 (counted as unparsable); a call
    that fails after its retries scores 0 and is counted. Verdicts are cached in a JSONL next to the report,
    appended as they come, so a rerun after a kill does not ask again; failed calls are not cached, so a rerun
    asks them again."""

    def __init__(self, args):
        self.args = args
        self.kind = args.judge
        self.name = {"rule": f"rule:{args.rule_metric}", "http": f"http:{args.judge_model}",
                     "model": f"model:{args.judge_model}"}[self.kind]
        if self.kind == "model":
            common.check_model_path(args.judge_model, "--judge_model")
        self.cache_path = args.out + ".judge_cache.jsonl"
        self.cache = {}
        if self.kind != "rule":
            for row in common.resume_jsonl(self.cache_path):
                self.cache[(row["judge"], row["question"], row["reference"], row["answer"])] = row
        self.model = None
        self.lock = threading.Lock()

    @staticmethod
    def parse_score(reply):
        """Visual-CoT's parsing: lower-case; exactly one 'score: <number>'; clipped to [0, 1]; else None. A
        number that ends a sentence ('score: 0.8.') is read without its period, where the published float()
        raises and stops the whole run."""
        reply = reply.lower()
        found = re.findall(r"score: ([\d\.]+)", reply) if "score" in reply else []
        if len(found) != 1:
            return None
        try:
            return min(1.0, max(0.0, float(found[0].removesuffix("."))))
        except ValueError:  # '1.2.3' matches [\d\.]+
            return None

    def messages(self, question, reference, answer):
        return [{"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": JUDGE_USER % (question, reference, answer)}]

    def score(self, triples):
        """List of verdicts {score, status (ok / unparsable / failed), reply} aligned with triples."""
        if self.kind == "rule":
            metric = common.RULE_JUDGES[self.args.rule_metric]
            return [{"score": metric(a, r), "status": "ok", "reply": None} for _, r, a in triples]
        todo = [t for t in dict.fromkeys(triples) if (self.name, *t) not in self.cache]
        if todo:
            with open(self.cache_path, "a", encoding="utf-8") as cache_file:
                if self.kind == "http":
                    self._http(todo, cache_file)
                else:
                    self._model(todo, cache_file)
        return [self.cache[(self.name, *t)] for t in triples]

    def _record(self, triple, reply, failed, cache_file):
        score = None if failed else self.parse_score(reply)
        row = {"judge": self.name, "question": triple[0], "reference": triple[1], "answer": triple[2],
               "score": score or 0.0, "status": "failed" if failed else ("ok" if score is not None else "unparsable"),
               "reply": reply}
        with self.lock:
            self.cache[(self.name, *triple)] = row
            if not failed:  # a failure (a server down for a minute) must not stick to later runs
                common.append_jsonl(cache_file, [row])

    def _http(self, todo, cache_file):
        key = os.environ.get(self.args.judge_api_key_env)

        def one(triple):
            try:
                reply = common.http_chat(self.args.judge_url, self.args.judge_model, self.messages(*triple), key,
                                         retries=self.args.judge_retries)
                self._record(triple, reply, False, cache_file)
            except RuntimeError as e:
                self._record(triple, str(e), True, cache_file)

        with ThreadPoolExecutor(self.args.judge_workers) as pool:
            list(common.progress(pool.map(one, todo), total=len(todo), desc="judge", unit="ans"))

    def _model(self, todo, cache_file):
        if self.model is None:
            self.processor = common.load_processor(self.args.judge_model, "--judge_model")
            self.model = common.load_model(self.args.judge_model, common.resolve_dtype(self.args.dtype),
                                           flag="--judge_model").eval()
            if torch.cuda.is_available():
                self.model.cuda()
        bs = self.args.batch_size
        for start in common.progress(range(0, len(todo), bs), desc="judge", unit="batch"):
            chunk = todo[start:start + bs]
            examples = [common.Example({"id": "judge"}, None, self.messages(*t)) for t in chunk]
            replies = common.generate(self.model, self.processor, examples, max_new_tokens=16, images=[[]] * len(chunk))
            for triple, reply in zip(chunk, replies):
                self._record(triple, reply, False, cache_file)


def judge_summary(verdicts):
    n = len(verdicts)
    return {"answer_score": sum(v["score"] for v in verdicts) / n if n else 0.0,
            "judge_unparsable": sum(v["status"] == "unparsable" for v in verdicts),
            "judge_failed": sum(v["status"] == "failed" for v in verdicts)}


def viscot_question_text(item):
    """Visual-CoT's question text for the judge (eval_cot_score.py), '<image>' prefix and all."""
    first = item["conversations"][0]["value"]
    return first.split(" Please provide the bounding box")[0] if "Please provide the bounding box" in first else first


def score_viscot_answer(questions, preds, args, paths, judge):
    qs = by_key(questions, lambda q: q.get("question_id"), paths[0])
    unknown = [p.get("question_id") for p in preds if p.get("question_id") not in qs]
    if unknown:
        raise common.DataError(f"{paths[1]}: question_id {unknown[0]!r} is not in {paths[0]}")
    triples = [(viscot_question_text(qs[p["question_id"]]), qs[p["question_id"]]["conversations"][-1]["value"],
                p.get("text") or "") for p in preds]
    verdicts = judge.score(triples)
    rows = [{"question_id": p["question_id"], "answer": t[2], "reference": t[1], **v}
            for p, t, v in zip(preds, triples, verdicts)]
    missing, repeated = answered_once(questions, preds, lambda r: r.get("question_id"))
    metrics = {"total": len(preds), "missing": missing, "repeated": repeated, **judge_summary(verdicts)}
    return metrics, rows, {"judge": judge.name}


# ---------------------------------------------------------------------------------------- virft-det
# COCO bbox mAP written out (numpy), replicating pycocotools' COCOeval with default parameters, quirks
# included (tests/test_eval.py compares all 12 numbers with pycocotools on random detections).

# Same expressions as pycocotools.cocoeval.Params.setDetParams.  Note that
# IOU_THRS[8] is 0.8999999999999999, so an IoU of exactly 0.9 passes at ".90".
IOU_THRS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
REC_THRS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
MAX_DETS = [1, 10, 100]
AREA_RNGS = [[0 ** 2, 1e5 ** 2], [0 ** 2, 32 ** 2], [32 ** 2, 96 ** 2], [96 ** 2, 1e5 ** 2]]
STAT_NAMES = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large"]



def virft_to_coco_dets(pred_rows, gt, parser="virft"):
    """Rows {image_id, category_id, text} -> (COCO dets, counts). parser "virft": Visual-RFT's published
    script (common.virft_coco_detections: corners as given, a raising item keeps the items before it);
    "strict": common.read_detections (a malformed item voids the answer) with corners reordered.
    counts: unparsable (rows that gave nothing and do not say 'No Objects'), partial (rows cut short by a
    raising item), unscored (detections dropped because their confidence is not a number: pycocotools would
    crash on them). An image_id missing from gt raises KeyError (a data bug, not a model error)."""
    size = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    dets, counts = [], {"unparsable": 0, "partial": 0, "unscored": 0}
    for row in pred_rows:
        text, (w, h) = row.get("text"), size[row["image_id"]]
        if parser == "virft":
            boxes, failed = common.virft_coco_detections(text, w, h)
            counts["unparsable"] += failed and not boxes and not common.says_no_objects(text)
            counts["partial"] += failed and bool(boxes)
        else:
            parsed = common.read_detections(text)  # 'No Objects' is no detections, not an unparsable reply
            counts["unparsable"] += parsed is None
            boxes = []
            for (x1, y1, x2, y2), conf in parsed or []:
                x1, x2, y1, y2 = x1 * w / 1000, x2 * w / 1000, y1 * h / 1000, y2 * h / 1000
                # Corners ordered: with negative w/h pycocotools' det area (w*h) is < 0, so the det falls
                # outside every area range and is *ignored*, not a false positive -- swapped corners are free.
                boxes.append(([min(x1, x2), min(y1, y2), abs(x2 - x1), abs(y2 - y1)], conf))
        for box, score in boxes:
            if not isinstance(score, (int, float)):  # bool passes, as it would in pycocotools; NaN stays a float
                counts["unscored"] += 1
                continue
            dets.append({"image_id": row["image_id"], "category_id": row["category_id"], "bbox": box,
                         "score": score})
    return dets, counts


def finite_or_inf(score):
    """A confidence as a float; an integer beyond float range ranks first or last, as pycocotools' Python
    comparisons rank it (two such integers tie here, where it would order them)."""
    try:
        return float(score)
    except OverflowError:
        return math.inf if score > 0 else -math.inf


def coco_iou(d, g, crowd):
    """IoU of xywh boxes, (D,4) x (G,4) -> (D,G), as maskUtils.iou (bbIou in maskApi.c).
    For crowd gts the union is the det area alone (a det inside a crowd region = 1). C's fmin/fmax pass over
    a NaN coordinate and its `w <= 0` test lets a NaN width through, so a det with a NaN in its box gets a
    NaN or finite IoU, never the 0 that numpy's minimum/maximum and a `w > 0` test would give."""
    d, g = np.asarray(d, float).reshape(-1, 4), np.asarray(g, float).reshape(-1, 4)
    dx, dy, dw, dh = (d[:, None, j] for j in range(4))
    gx, gy, gw, gh = (g[None, :, j] for j in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):  # NaN and inf boxes are scored, not warned about
        w = np.fmin(dw + dx, gw + gx) - np.fmax(dx, gx)
        h = np.fmin(dh + dy, gh + gy) - np.fmax(dy, gy)
        overlap = ~(w <= 0) & ~(h <= 0)
        inter = np.where(overlap, w * h, 0.0)
        union = np.where(crowd[None, :], dw * dh, dw * dh + gw * gh - inter)
        return np.where(overlap, inter / union, 0.0)


def match_like_pycocotools(row, thrs, gt_taken, crowd, ignored, gid, dtm, dt_ig):
    """One det's matches, threshold by threshold, with evaluateImg's own loop: the vectorised rule below
    reads `iou >= best` where pycocotools skips a gt when `iou < best`, and the two part on NaN (a NaN IoU
    is never below the best, so it matches, and every later free gt then replaces it). Fills dtm and dt_ig
    (this det's columns) and marks the gts taken."""
    for t, best in enumerate(thrs):
        m = -1
        for gi, value in enumerate(row):
            if gt_taken[t, gi] and not crowd[gi]:
                continue
            if m > -1 and not ignored[m] and ignored[gi]:
                break
            if value < best:
                continue
            best, m = value, gi
        if m > -1:
            dtm[t], dt_ig[t], gt_taken[t, m] = gid[m], ignored[m], True


def _evaluate_img(gts, dts, ious, a_rng):
    """pycocotools evaluateImg for one (image, category, area range); dts already sorted
    by score and cut to 100.  Returns (scores, dt_matches (T,D), dt_ignore (T,D), gt_ignore, and which
    scores were integers beyond float range)."""
    lo, hi = a_rng
    area = np.array([g["area"] for g in gts], float)  # gt area is the "area" field, not w*h
    crowd = np.array([bool(g.get("iscrowd", 0)) for g in gts], bool)
    gt_ig = crowd | (area < lo) | (area > hi)
    order = np.argsort(gt_ig, kind="mergesort")  # non-ignored gts first, stable
    ig, cr = gt_ig[order], crowd[order]
    gid = np.array([gts[i]["id"] for i in order], float)
    T, D, G = len(IOU_THRS), len(dts), len(gts)
    thr = np.minimum(IOU_THRS, 1 - 1e-10)[:, None]
    gt_taken = np.zeros((T, G), bool)
    # dtm holds the matched *gt id* with 0 meaning "unmatched", exactly as pycocotools;
    # consequence: a det matched to a gt whose id is 0 later counts as a false positive.
    dtm = np.zeros((T, D))
    dt_ig = np.zeros((T, D), bool)
    if D and G:
        iou = ious[:, order]
        for di in range(D):  # greedy in score order; all thresholds at once
            row = iou[di]
            if np.isnan(row).any():
                match_like_pycocotools(row, thr[:, 0], gt_taken, cr, ig, gid, dtm[:, di], dt_ig[:, di])
                continue
            ok = (~gt_taken | cr) & (row >= thr)  # crowd gts can absorb many dets
            # pycocotools breaks at the first ignored gt once it holds a non-ignored match,
            # so ignored gts are only candidates when no non-ignored gt qualifies.
            ok_ni = ok & ~ig
            use = np.where(ok_ni.any(1, keepdims=True), ok_ni, ok & ig)
            # It replaces the match whenever iou >= best so far: ties go to the LAST gt.
            vals = np.where(use, row, -np.inf)
            m = G - 1 - np.argmax(vals[:, ::-1], axis=1)
            hit = np.nonzero(use.any(1))[0]
            m = m[hit]
            dtm[hit, di], dt_ig[hit, di], gt_taken[hit, m] = gid[m], ig[m], True
    dt_area = np.array([d["bbox"][2] * d["bbox"][3] for d in dts], float)  # as loadRes
    dt_ig |= (dtm == 0) & ((dt_area < lo) | (dt_area > hi))[None, :]
    return (np.array([d["score"] for d in dts], float), dtm, dt_ig, gt_ig,
            np.array([d["beyond_float"] for d in dts], bool))


def coco_map(gt, dets):
    """COCO bbox mAP; returns the 12 summarize() stats by name (-1 where undefined)."""
    img_ids = sorted({im["id"] for im in gt["images"]})
    cat_ids = sorted({c["id"] for c in gt["categories"]})
    img_set, cat_set = set(img_ids), set(cat_ids)

    # Ground truths per (image, category), in pycocotools' order (images sorted, then
    # dataset order).  loadAnns goes through an id->ann dict, so an annotation whose id
    # is reused by a later one is replaced by that later one; mirrored here.
    by_id = {a["id"]: a for a in gt["annotations"]}
    per_img = defaultdict(list)
    for a in gt["annotations"]:
        per_img[a["image_id"]].append(a)
    gts = defaultdict(list)
    for i in img_ids:
        for a in per_img[i]:
            if a["category_id"] in cat_set:
                a = by_id[a["id"]]
                gts[a["image_id"], a["category_id"]].append(a)
    # Detections keep input order within a group (it decides score ties).  pycocotools
    # asserts on unknown image ids; here they are dropped.  Det ids (1..N in loadRes)
    # are only ever tested for > 0, so they need no storing.
    dts = defaultdict(list)
    for d in dets:
        if d["image_id"] in img_set and d["category_id"] in cat_set:
            score = finite_or_inf(d["score"])
            dts[d["image_id"], d["category_id"]].append(
                dict(d, score=score, beyond_float=isinstance(d["score"], int) and math.isinf(score)))

    # evaluate: evals[k][a] = per-image results, None when no gt and no det.
    K, A, M, T, R = len(cat_ids), len(AREA_RNGS), len(MAX_DETS), len(IOU_THRS), len(REC_THRS)
    evals = [[[] for _ in range(A)] for _ in range(K)]
    for k, c in enumerate(cat_ids):
        for i in img_ids:
            g, d = gts[i, c], dts[i, c]
            if not g and not d:
                continue
            scores = np.array([x["score"] for x in d], float)
            d = [d[j] for j in np.argsort(-scores, kind="mergesort")[:MAX_DETS[-1]]]
            ious = coco_iou([x["bbox"] for x in d], [x["bbox"] for x in g],
                           np.array([bool(int(x.get("iscrowd", 0))) for x in g], bool))
            for a, rng in enumerate(AREA_RNGS):
                evals[k][a].append(_evaluate_img(g, d, ious, rng))

    # accumulate
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    for k in range(K):
        for a in range(A):
            E = evals[k][a]
            if not E:
                continue
            npig = int(np.count_nonzero(~np.concatenate([e[3] for e in E])))
            if npig == 0:
                continue  # no non-ignored gt: stays -1 and is left out of the means
            for m, max_det in enumerate(MAX_DETS):
                scores = np.concatenate([e[0][:max_det] for e in E])
                inds = np.argsort(-scores, kind="mergesort")  # ties: image order, then rank
                dtm = np.concatenate([e[1][:, :max_det] for e in E], axis=1)[:, inds]
                dt_ig = np.concatenate([e[2][:, :max_det] for e in E], axis=1)[:, inds]
                beyond = np.concatenate([e[4][:max_det] for e in E])[inds]
                tp = np.cumsum((dtm != 0) & ~dt_ig, axis=1).astype(float)
                fp = np.cumsum((dtm == 0) & ~dt_ig, axis=1).astype(float)
                nd = tp.shape[1]
                rc = tp / npig
                pr = tp / (fp + tp + np.spacing(1))
                recall[:, k, a, m] = rc[:, -1] if nd else 0
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # monotone from right
                for t in range(T):
                    idx = np.searchsorted(rc[t], REC_THRS, side="left")
                    # pycocotools fills q in a bare try/except and leaves the rest 0 from the first index
                    # past the end (IndexError, before q[ri] is set) or the first det whose integer score
                    # its float array cannot hold (OverflowError, after); idx is non-decreasing.
                    filled = idx < nd
                    if nd and beyond.any():
                        overflow = np.nonzero(filled & beyond[np.minimum(idx, nd - 1)])[0]
                        if overflow.size:
                            filled[overflow[0] + 1:] = False
                    q = np.zeros(R)
                    q[filled] = pr[t, idx[filled]]
                    precision[t, :, k, a, m] = q

    # summarize
    def mean(s):
        s = s[s > -1]
        return float(np.mean(s)) if s.size else -1.0

    t50, t75 = np.where(IOU_THRS == .5)[0], np.where(IOU_THRS == .75)[0]
    P, Rc = precision, recall
    stats = [mean(P[:, :, :, 0, 2]), mean(P[t50][:, :, :, 0, 2]), mean(P[t75][:, :, :, 0, 2]),
             mean(P[:, :, :, 1, 2]), mean(P[:, :, :, 2, 2]), mean(P[:, :, :, 3, 2]),
             mean(Rc[:, :, 0, 0]), mean(Rc[:, :, 0, 1]), mean(Rc[:, :, 0, 2]),
             mean(Rc[:, :, 1, 2]), mean(Rc[:, :, 2, 2]), mean(Rc[:, :, 3, 2])]
    return dict(zip(STAT_NAMES, stats))


def score_virft_det(gt, preds, args, paths):
    for i, p in enumerate(preds, 1):
        if p.get("image_id") is None or p.get("category_id") is None:
            raise common.DataError(f"{paths[1]}: row {i} needs image_id and category_id")
    known = {im["id"] for im in gt["images"]}
    unknown = [p["image_id"] for p in preds if p["image_id"] not in known]
    if unknown:
        raise common.DataError(f"{paths[1]}: image_id {unknown[0]!r} is not in {paths[0]}")
    dets, counts = virft_to_coco_dets(preds, gt, args.parser)
    metrics = {**coco_map(gt, dets), "predictions": len(preds), "detections": len(dets), **counts}
    per_row = defaultdict(int)
    for d in dets:
        per_row[d["image_id"], d["category_id"]] += 1
    rows = [{"image_id": p["image_id"], "category_id": p["category_id"],
             "detections": per_row[p["image_id"], p["category_id"]]} for p in preds]
    return metrics, rows, {}


# ---------------------------------------------------------------------------------------- virft-cls

def class_label(solution, match):
    """The record's label. virft: as the published script reads it, the first single-line <answer> content
    unstripped (a bare label without tags, which the published script cannot read, is taken whole); exact: our
    extract_answer."""
    if match == "virft":
        found = common.virft_answer(solution)
        return solution if found is None else found
    return common.extract_answer(solution)


def score_virft_cls(records, preds, args, paths):
    """Accuracy by --match: virft (Visual-RFT's published rule; no single-line <answer> match is wrong and
    counted as unparsable, and empty_answer_correct counts the verdicts its empty-answer quirk decided) or
    exact (common.normalize_class_label equal and non-empty)."""
    by_id = matched_predictions(records, preds, paths)
    rows, counts = [], {"correct": 0, "unparsable": 0, "empty_answer_correct": 0}
    for rec in records:
        label = class_label(rec.get("solution") or rec.get("answer") or "", args.match)
        pred = by_id.get(record_id(rec))
        text = pred.get("text") if pred else None
        if args.match == "virft":
            answer = common.virft_answer(text)
            ok = answer is not None and common.virft_class_match(answer, label)
            counts["unparsable"] += pred is not None and answer is None
            counts["empty_answer_correct"] += ok and not answer.replace(" ", "").replace("_", "")
        else:
            want = common.normalize_class_label(label)
            ok = bool(want) and common.normalize_class_label(text) == want  # an empty answer never matches
        counts["correct"] += ok
        rows.append({"id": record_id(rec), "text": text, "label": label, "correct": ok})
    n, missing = len(records), sum(record_id(r) not in by_id for r in records)
    metrics = {"accuracy": counts["correct"] / n if n else 0.0, **counts, "total": n, "missing": missing}
    return metrics, rows, {"match": RULE_NAMES["match " + args.match]}


# ---------------------------------------------------------------------------------- grounding, chain

def predicted_box(pred, rec, args):
    """The prediction's pixel box: its `box` field (infer.py output) or its text in --box_format."""
    if pred is None:
        return None
    w, h = rec["width"], rec["height"]
    if pred.get("box") is not None:  # a box that is not one (NaN, reversed, not four numbers) is unparsable
        try:  # clamped to the image, as a box read from text is (one past it by 1e308 made gIoU NaN)
            return common.clamp_box(common.check_box(pred["box"], "box"), w, h)
        except common.DataError:
            return None
    resized = (int(rec["resized_height"]), int(rec["resized_width"])) if "resized_height" in rec else None
    return common.parse_box(common.extract_answer(pred.get("text") or pred.get("box_text")),
                            args.box_format, w, h, resized)


def box_metrics(pairs):
    """pairs of (predicted pixel box or None, annotated box): parseable, acc (IoU > 0.5), mIoU, mean gIoU
    (an unparsable box scores IoU 0 and gIoU -1), cIoU (cumulative intersection / cumulative union)."""
    n = len(pairs)
    ious = [common.box_iou(p, g) if p else 0.0 for p, g in pairs]
    gious = [common.box_giou(p, g) if p else -1.0 for p, g in pairs]
    inter = union = 0.0
    for p, g in pairs:
        area_g = (g[2] - g[0]) * (g[3] - g[1])
        if p:
            i = max(0.0, min(p[2], g[2]) - max(p[0], g[0])) * max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
            inter, union = inter + i, union + (p[2] - p[0]) * (p[3] - p[1]) + area_g - i
        else:
            union += area_g
    return ({"n": n, "parseable": sum(p is not None for p, _ in pairs) / n if n else 0.0,
             "box_acc": sum(i > 0.5 for i in ious) / n if n else 0.0, "miou": float(np.mean(ious)) if n else 0.0,
             "giou": float(np.mean(gious)) if n else 0.0, "ciou": inter / union if union else 0.0}, ious)


def with_size(records, image_root):
    """Records with width/height filled in from the image header where missing."""
    return [rec if rec.get("width") and rec.get("height") else
            dict(rec, **dict(zip(("width", "height"), common.image_size(rec, image_root)))) for rec in records]


def score_grounding(records, preds, args, paths):
    by_id = matched_predictions(records, preds, paths)
    records = with_size(records, args.image_root or os.path.dirname(os.path.abspath(paths[0])))
    for i, rec in enumerate(records, 1):
        common.check_box(rec["bbox"], f"{paths[0]}: row {i} ({record_id(rec)!r}): bbox", rec["width"], rec["height"])
    boxes = [predicted_box(by_id.get(record_id(rec)), rec, args) for rec in records]
    metrics, ious = box_metrics([(b, rec["bbox"]) for b, rec in zip(boxes, records)])
    rows = [{"id": record_id(r), "box": b, "iou": i} for r, b, i in zip(records, boxes, ious)]
    return {**metrics, "missing": sum(record_id(r) not in by_id for r in records)}, rows, {}


def score_chain(records, preds, args, paths, judge):
    metrics, rows, _ = score_grounding(records, preds, args, paths)
    by_id = by_key(preds, record_id, paths[1])
    verdicts = judge.score([(r["question"], r["answer"], by_id.get(record_id(r), {}).get("answer") or "")
                            for r in records])
    for row, v in zip(rows, verdicts):
        row.update(answer_score=v["score"])
    return {**metrics, **judge_summary(verdicts)}, rows, {"judge": judge.name}


def score_zoom(records, preds, args, paths, judge):
    """chain's scores on the zoom loop's rows (box: the last call's, none when the model answered at once) and
    its turn statistics: mean turns and calls, invalid calls, conversations stopped at a call by --max_turns
    (max_turns_hit) or --max_context (context_hit), and the answer score by number of turns."""
    # A row whose conversation never answered (an invalid call, or stopped at a call) scores as no answer,
    # as GRPO scores it, whatever text its last turn holds (prediction files written before infer.py emptied it).
    preds = [dict(p, answer="") if p.get("invalid_call") or p.get("max_turns_hit") or p.get("context_hit") else p
             for p in preds]
    metrics, rows, extra = score_chain(records, preds, args, paths, judge)
    by_id = by_key(preds, record_id, paths[1])
    took = [by_id.get(record_id(r), {}) for r in records]
    n = max(len(took), 1)
    metrics.update(turns=sum(p.get("turns", 0) for p in took) / n,
                   zoom_calls=sum(len(p.get("views") or []) for p in took) / n,
                   invalid_calls=sum(bool(p.get("invalid_call")) for p in took),
                   max_turns_hit=sum(bool(p.get("max_turns_hit")) for p in took),
                   context_hit=sum(bool(p.get("context_hit")) for p in took))
    for row, p in zip(rows, took):
        row.update(turns=p.get("turns"), zoom_calls=len(p.get("views") or []))
    for t in sorted({row["turns"] for row in rows if row["turns"]}):
        scores = [row["answer_score"] for row in rows if row["turns"] == t]
        metrics[f"answer_score_turns_{t}"] = float(np.mean(scores))
        metrics[f"n_turns_{t}"] = len(scores)
    return metrics, rows, extra


# ------------------------------------------------------------------------------ --model: infer first

def model_records(protocol, questions, qpath):
    """(records for infer.py, infer mode, infer row + question -> prediction line in the protocol's format)."""
    if protocol == "viscot-det":
        # Visual-CoT's model_cot_det_loader.py asks "<expression lower-cased>. Please provide the bounding box ..."
        recs = [{"id": str(q["question_id"]), "image": q["img_path"], "question": q["expression"].lower() + ".",
                 "q": q} for q in questions]
        return recs, "focus", lambda row, rec: {"question_id": rec["q"]["question_id"], "prompt": row["question"],
                                                "text": row["box_text"], "bbox": rec["q"]["bbox"],
                                                "height": rec["q"]["height"], "width": rec["q"]["width"]}
    if protocol == "viscot-answer":
        recs = [rec for _, rec in convert_viscot.convert_benchmark(questions, {}, None, qpath)]
        return recs, "chain", lambda row, rec: {"question_id": rec["question_id"], "prompt": row["question"],
                                                "text": row["answer"], "box_text": row["box_text"]}
    if protocol == "virft-det":
        images = {im["id"]: im for im in questions["images"]}
        recs = [{"id": f"{i}-{c['id']}", "image": images[i]["file_name"], "image_id": i, "category_id": c["id"],
                 "question": common.VIRFT_DETECTION_PROMPT.format(category=c["name"])}
                for i in sorted(images) for c in questions["categories"]]
        return recs, "direct", lambda row, rec: {"image_id": rec["image_id"], "category_id": rec["category_id"],
                                                 "text": row["answer"]}
    if protocol == "virft-cls":
        recs = [dict(r, id=record_id(r), question=r.get("problem") or r["question"]) for r in questions]
        return recs, "direct", lambda row, rec: {"id": rec["id"], "text": row["answer"]}
    if protocol == "grounding":
        with_problem = bool(questions) and "problem" in questions[0]
        recs = [dict(r, id=record_id(r), question=r.get("problem") or r["question"]) for r in questions]
        return recs, "direct" if with_problem else "focus", lambda row, rec: {
            "id": rec["id"], "text": row["answer"] if with_problem else row["box_text"], "box": row["box"]}
    # chain, zoom: infer.py's rows are the predictions
    return questions, protocol, lambda row, rec: row


@contextlib.contextmanager
def fields_read(protocol, *paths):
    """A question or prediction row without a field the protocol reads, or with one of another type, is a
    one-line error naming the files and the field (the scorers read the published formats as they are)."""
    try:
        yield
    except common.DataError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise common.DataError(f"{' / '.join(paths)}: a row lacks a field the {protocol} protocol reads, or holds "
                               f"one of another type ({type(e).__name__}: {e})") from None


def run_model(model, processor, args, protocol, questions, qpath, pred_path):
    """Run infer.py's code on the questions (resumable), then write the protocol-format predictions."""
    import infer
    with fields_read(protocol, qpath):
        records, mode, to_prediction = model_records(protocol, questions, qpath)
    raw_path = pred_path[:-len(".jsonl")] + ".infer.jsonl"
    image_root = args.image_root or os.path.dirname(os.path.abspath(qpath))
    # Predictions resume across runs; ones made by another model or other settings must not be mixed in.
    made_by = dict(common.model_stamp(args), mode=mode, box_format=args.box_format, prompt_set=args.prompt_set,
                   max_new_tokens=args.max_new_tokens, data=os.path.abspath(qpath),
                   image_root=os.path.abspath(image_root),
                   **({"max_turns": args.max_turns, "max_context": args.max_context} if mode == "zoom" else {}))
    _, _, errors = infer.run_file(model, processor, records, image_root, raw_path, made_by, args.questions,
                                  args.batch_size, flag="--predictions_dir", mode=mode, box_format=args.box_format,
                                  prompt_set=args.prompt_set, max_new_tokens=args.max_new_tokens,
                                  max_turns=args.max_turns, max_context=args.max_context)
    if errors:
        raise common.DataError(f"{len(errors)} images failed to load (first: {errors[0]['error']}); "
                               f"listed in {raw_path}.errors.jsonl")
    rows = {row["id"]: row for row in common.read_jsonl(raw_path)}
    common.write_jsonl(pred_path, [to_prediction(rows[rec["id"]], rec) for rec in records])


# ------------------------------------------------------------------------------------------- report

SUMMED = ("correct", "total", "unparsable", "missing", "repeated", "n", "predictions", "detections",
          "judge_unparsable", "judge_failed", "partial", "unscored", "empty_answer_correct", "invalid_calls",
          "max_turns_hit", "context_hit")
COLUMNS = {
    "viscot-det": ("accuracy", "correct", "total", "unparsable"),
    "viscot-answer": ("answer_score", "total", "judge_unparsable", "judge_failed"),
    "virft-det": ("AP", "AP50", "AP75", "AR100", "unparsable", "partial"),
    "virft-cls": ("accuracy", "correct", "total", "unparsable", "empty_answer_correct"),
    "grounding": ("n", "parseable", "box_acc", "miou", "giou", "ciou"),
    "chain": ("n", "parseable", "box_acc", "miou", "answer_score"),
    "zoom": ("n", "answer_score", "box_acc", "turns", "zoom_calls", "invalid_calls", "max_turns_hit",
             "context_hit"),
}


def mean_over_datasets(per_dataset):
    """Counts summed; every other number averaged over datasets (each dataset weighs the same). The zoom
    protocol's numbers by turns taken exist only where a dataset has rows of that many turns: their counts are
    summed and their scores averaged over the datasets that have them."""
    out = {}
    for key in dict.fromkeys(k for m in per_dataset.values() for k in m):
        values = [m[key] for m in per_dataset.values()
                  if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool)]
        if values and (len(values) == len(per_dataset) or key.startswith(("n_turns_", "answer_score_turns_"))):
            out[key] = sum(values) if key in SUMMED or key.startswith("n_turns_") else float(np.mean(values))
    return out


def fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def items_path(report_path):
    """Where a report's per-item rows go (tools/compare.py pairs reports by them): r.json -> r.items.jsonl."""
    return os.path.splitext(report_path)[0] + ".items.jsonl"


def is_report(obj):
    """A JSON object this script wrote as a report (tools/compare.py reads them too)."""
    return isinstance(obj, dict) and {"protocol", "label"} <= obj.keys()


def check_outputs(args, items_file, pred_dir):
    """The report may replace only an earlier report (a re-score), never an input or another file; the
    datasets, named by their files, are distinct (one would overwrite the other's scores and predictions)."""
    common.claim_output_file(args.out, "--out", [*args.questions, *(args.predictions or [])], overwrite=True,
                             companions=[items_file])
    if os.path.exists(args.out):
        try:
            with open(args.out, encoding="utf-8") as f:
                earlier = json.load(f)
        except (UnicodeDecodeError, ValueError):
            earlier = None
        if not is_report(earlier):
            raise common.DataError(f"--out {args.out} exists and is not an eval.py report: write elsewhere")
    names = {}
    for qpath in args.questions:
        if dataset_name(qpath) in names:
            raise common.DataError(f"--questions {names[dataset_name(qpath)]} and {qpath} are both dataset "
                                   f"{dataset_name(qpath)!r} (named by the file): rename one")
        names[dataset_name(qpath)] = qpath
    if args.model and os.path.exists(pred_dir) and not os.path.isdir(pred_dir):
        raise common.DataError(f"--predictions_dir {pred_dir}: a file, not a directory")


# Visual-CoT's detection scorer reads its own box text; a model run in another format scored 0 on every box.
VISCOT_DET_FORMAT = ("--protocol viscot-det scores Visual-CoT's box text (--box_format viscot), not {}: score "
                     "another format with --protocol grounding")


def main(argv=None):
    args = parse_args(argv)
    items_file = items_path(args.out)
    pred_dir = args.predictions_dir or os.path.splitext(args.out)[0] + ".predictions"
    check_outputs(args, items_file, pred_dir)
    judge = Judge(args) if args.protocol in ("viscot-answer", "chain", "zoom") else None
    per_dataset, settings, items = {}, {}, []
    if args.model:
        common.check_model_args(args)
        if common.resolve_box_format(args) != "viscot" and args.protocol == "viscot-det":
            raise common.DataError(VISCOT_DET_FORMAT.format(f"{args.box_format} (--model's native format)"))
        processor = common.load_processor(args.model)
        model = common.load_model(args.model, common.resolve_dtype(args.dtype), args.attn, args.adapter).eval()
        if torch.cuda.is_available():
            model.cuda()
    for i, qpath in enumerate(args.questions):
        name = dataset_name(qpath)
        questions = load_questions(args.protocol, qpath)
        if args.model:
            ppath = os.path.join(pred_dir, f"{args.protocol}_{name}.jsonl")
            run_model(model, processor, args, args.protocol, questions, qpath, ppath)
        else:
            ppath = args.predictions[i]
        preds = common.read_jsonl(ppath) if args.model else [row for _, row in common.input_rows(ppath, "predictions")]
        with fields_read(args.protocol, qpath, ppath):
            scorer = {"viscot-det": score_viscot_det, "virft-det": score_virft_det, "virft-cls": score_virft_cls,
                      "grounding": score_grounding}.get(args.protocol)
            if scorer:
                metrics, rows, extra = scorer(questions, preds, args, (qpath, ppath))
            else:
                scorer = {"viscot-answer": score_viscot_answer, "chain": score_chain,
                          "zoom": score_zoom}[args.protocol]
                metrics, rows, extra = scorer(questions, preds, args, (qpath, ppath), judge)
        per_dataset[name] = metrics
        settings.update(extra)
        items += [dict(row, dataset=name) for row in rows]
    mean = mean_over_datasets(per_dataset)
    label = args.label or args.model or ", ".join(args.predictions)
    if args.parser:
        settings["parser"] = RULE_NAMES[args.parser]
    report = {"protocol": args.protocol, "label": label, **mean, "datasets": per_dataset, "mean": mean,
              "settings": settings,  # each questions file's hash: compare.py pairs reports of the same questions only
              "questions": {dataset_name(q): common.file_fingerprint(q) for q in args.questions}}
    with open(args.out + ".tmp", "w") as f:
        json.dump(report, f, indent=1, allow_nan=False)  # NaN is not JSON: a NaN here is a bug, not a score
    os.replace(args.out + ".tmp", args.out)
    common.write_jsonl(items_file, items)

    cols = COLUMNS[args.protocol]
    print(f"\n{args.protocol}: {label}" + "".join(f"; {k}: {v}" for k, v in report["settings"].items()))
    print("| dataset | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, m in list(per_dataset.items()) + ([("mean", mean)] if len(per_dataset) > 1 else []):
        print(f"| {name} | " + " | ".join(fmt(m.get(c, "")) for c in cols) + " |")
    print(f"eval.py: report -> {args.out}")


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:
        raise SystemExit(f"eval.py: error: {e}") from None
